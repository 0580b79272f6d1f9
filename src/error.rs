//! Typed API errors (CONTRACT §3, DevRev's model): `{"type","message","detail"}` plus
//! type-specific fields. Anything unexpected is logged with a reference id and answered as an
//! opaque `internal_error` carrying that id.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than {max_bytes} bytes")]
    TooLarge { max_bytes: usize, field: Option<String> },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field: None,
            message: message.into(),
        }
    }

    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::NotFound(format!("{what} {id} not found"))
    }

    /// Prefix the field path, for errors raised while validating an item of a list.
    pub fn within(self, prefix: &str) -> ApiError {
        match self {
            ApiError::BadRequest { field, message } => ApiError::BadRequest {
                field: Some(match field {
                    Some(f) if f.starts_with('[') => format!("{prefix}{f}"),
                    Some(f) => format!("{prefix}.{f}"),
                    None => prefix.to_string(),
                }),
                message,
            },
            ApiError::TooLarge { max_bytes, .. } => ApiError::TooLarge {
                max_bytes,
                field: Some(prefix.to_string()),
            },
            other => other,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let body: Value = match self {
            ApiError::BadRequest { field, message } => json!({
                "type": "bad_request",
                "message": match field { Some(f) => format!("{f}: {message}"), None => message.clone() },
                "detail": { "field": field, "reason": message },
            }),
            ApiError::Unauthenticated => json!({
                "type": "unauthenticated",
                "message": self.to_string(),
                "detail": { "header": "authorization" },
            }),
            ApiError::NotFound(m) => json!({"type": "not_found", "message": m, "detail": null}),
            ApiError::Conflict(m) => json!({"type": "conflict", "message": m, "detail": null}),
            ApiError::TooLarge { max_bytes, field } => json!({
                "type": "request_entity_too_large",
                "message": match field { Some(f) => format!("{f}: larger than {max_bytes} bytes"), None => self.to_string() },
                "detail": { "field": field },
                "max_bytes": max_bytes,
            }),
            ApiError::Unavailable(m) => {
                json!({"type": "service_unavailable", "message": m, "detail": null})
            }
            ApiError::Internal(e) => {
                let reference_id = uuid::Uuid::new_v4().to_string();
                tracing::error!(%reference_id, error = %format!("{e:#}"), "internal error");
                json!({
                    "type": "internal_error",
                    "message": "internal error; quote reference_id when reporting it",
                    "detail": null,
                    "reference_id": reference_id,
                })
            }
        };
        HttpResponse::build(self.status_code()).json(body)
    }
}

/// Parse a JSON body into `T`, naming the offending field on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        let message = inner.to_string();
        // Strip serde_json's " at line X column Y": the path says where.
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad(format!("body is not valid JSON: {message}"));
        }
        let field = if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default();
            if path == "." {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        } else if let Some(rest) = message.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default();
            if path == "." {
                name.to_string()
            } else if path == name || path.ends_with(&format!(".{name}")) {
                path
            } else {
                format!("{path}.{name}")
            }
        } else if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::field(field, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: u32,
        b: Vec<Inner>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        c: String,
    }

    fn field_of(e: ApiError) -> Option<String> {
        match e {
            ApiError::BadRequest { field, .. } => field,
            _ => panic!("not bad_request"),
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(
            field_of(parse_json::<T>(br#"{"b":[]}"#).unwrap_err()).as_deref(),
            Some("a")
        );
        assert_eq!(
            field_of(parse_json::<T>(br#"{"a":"x","b":[]}"#).unwrap_err()).as_deref(),
            Some("a")
        );
        assert_eq!(
            field_of(parse_json::<T>(br#"{"a":1,"b":[{"c":"x"},{"c":3}]}"#).unwrap_err()).as_deref(),
            Some("b[1].c")
        );
        assert_eq!(
            field_of(parse_json::<T>(br#"{"a":1,"b":[],"z":1}"#).unwrap_err()).as_deref(),
            Some("z")
        );
        assert_eq!(field_of(parse_json::<T>(b"{nope").unwrap_err()), None);
    }
}
