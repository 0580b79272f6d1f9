//! Typed API errors (CONTRACT §3, DevRev's model): `{"type","message","detail"}` plus
//! type-specific fields. Anything unexpected is logged with a reference id and answered as an
//! opaque `internal_error` carrying that id.

mod strict;

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
    #[error("method {method} is not allowed here; allowed: {}", allowed.join(", "))]
    MethodNotAllowed { method: String, allowed: Vec<String> },
    #[error("request body is larger than {max_bytes} bytes")]
    TooLarge { max_bytes: usize, field: Option<String> },
    #[error("the request body was not received within {timeout_ms} ms")]
    RequestTimeout { timeout_ms: u64 },
    #[error("too many requests for this token; retry after {retry_after} s")]
    TooManyRequests { retry_after: u64 },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(anyhow::Error),
}

/// A failure from below the API: `service_unavailable` when the store could not be reached
/// or could not take the work just now (see [`crate::store::unavailable`]: the client should
/// send the request again), else an `internal_error`.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        if crate::store::unavailable(&e) {
            tracing::warn!(error = %format!("{e:#}"), "the store is unavailable; answered 503");
            return ApiError::Unavailable("the store is unavailable for the moment; send the request again".into());
        }
        ApiError::Internal(e)
    }
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
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
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
            ApiError::MethodNotAllowed { method, allowed } => json!({
                "type": "method_not_allowed",
                "message": self.to_string(),
                "detail": { "method": method, "allowed": allowed },
            }),
            ApiError::TooLarge { max_bytes, field } => json!({
                "type": "request_entity_too_large",
                "message": match field { Some(f) => format!("{f}: larger than {max_bytes} bytes"), None => self.to_string() },
                "detail": { "field": field },
                "max_bytes": max_bytes,
            }),
            ApiError::RequestTimeout { timeout_ms } => json!({
                "type": "request_timeout",
                "message": self.to_string(),
                "detail": { "field": "body", "timeout_ms": timeout_ms },
            }),
            ApiError::TooManyRequests { retry_after } => json!({
                "type": "too_many_requests",
                "message": self.to_string(),
                "detail": null,
                "retry_after": retry_after,
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
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            // The rest of the body may still be trickling in: do not keep the connection.
            ApiError::RequestTimeout { .. } => {
                resp.force_close();
            }
            ApiError::TooManyRequests { retry_after } => {
                resp.insert_header(("retry-after", retry_after.to_string()));
            }
            ApiError::Unavailable(_) => {
                resp.insert_header(("retry-after", "1"));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                resp.insert_header(("allow", allowed.join(", ")));
            }
            _ => {}
        }
        resp.json(body)
    }
}

/// A step of the path to a value in a JSON document: an object's key or an array's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<'a> {
    Key(std::borrow::Cow<'a, str>),
    Index(usize),
}

/// A path as errors name it: `resources[2].query.q`.
fn path_text(steps: &[Step<'_>]) -> String {
    let mut out = String::new();
    for s in steps {
        match s {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Refuse a JSON document in which an object repeats a key (serde would silently keep the last
/// one, or name the field `body`): a typed 400 naming the repeated key's path, e.g.
/// `resources[2].query.q`. Values at paths for which `opaque` is true are not looked into (an
/// event's `payload` is the producer's, passed on as given). Syntax errors are left to the
/// parser that follows, which names them.
///
/// Every `POST /events` body is read through here first, so it costs no allocation a key: the
/// path is one stack of steps borrowed from the text (made into text only for the error), and
/// an object's keys are compared with the ones before them (a set only for large objects).
/// Allocating a path and a key for every member was 1.6 % of the relay's CPU in the embedded
/// throughput profile.
pub fn check_duplicate_keys(bytes: &[u8], opaque: &dyn Fn(&[Step<'_>]) -> bool) -> Result<(), ApiError> {
    use crate::domain::JsonKey;
    use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;

    /// Keys an object compares by scanning the ones before; past this, a set.
    const SCANNED_KEYS: usize = 32;

    #[derive(Clone, Copy)]
    struct Node<'a, 'de> {
        path: &'a RefCell<Vec<Step<'de>>>,
        opaque: &'a dyn Fn(&[Step<'_>]) -> bool,
        found: &'a RefCell<Option<String>>,
    }
    impl<'a, 'de> Node<'a, 'de> {
        /// Read a child value at `step` (pushed for its reading only).
        fn at<T>(&self, step: Step<'de>, read: impl FnOnce(Node<'a, 'de>) -> T) -> T {
            self.path.borrow_mut().push(step);
            let out = read(*self);
            self.path.borrow_mut().pop();
            out
        }
    }
    impl<'de> DeserializeSeed<'de> for Node<'_, 'de> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            let skip = {
                let path = self.path.borrow();
                !path.is_empty() && (self.opaque)(&path)
            };
            if skip {
                <IgnoredAny as serde::Deserialize>::deserialize(d)?;
                return Ok(());
            }
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Node<'_, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while self.at(Step::Index(i), |n| seq.next_element_seed(n))?.is_some() {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut keys: Vec<std::borrow::Cow<'de, str>> = Vec::new();
            let mut set: Option<std::collections::HashSet<std::borrow::Cow<'de, str>>> = None;
            while let Some(JsonKey(key)) = map.next_key::<JsonKey<'de>>()? {
                let repeated = match &mut set {
                    Some(set) => !set.insert(key.clone()),
                    None if keys.len() < SCANNED_KEYS => keys.contains(&key),
                    None => {
                        let mut all: std::collections::HashSet<_> = keys.drain(..).collect();
                        let repeated = !all.insert(key.clone());
                        set = Some(all);
                        repeated
                    }
                };
                if repeated {
                    let mut path = self.path.borrow().clone();
                    path.push(Step::Key(key));
                    *self.found.borrow_mut() = Some(path_text(&path));
                    return Err(A::Error::custom("duplicate key"));
                }
                if set.is_none() {
                    keys.push(key.clone());
                }
                self.at(Step::Key(key), |n| map.next_value_seed(n))?;
            }
            Ok(())
        }
    }

    let found = RefCell::new(None);
    let path = RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let _ = Node {
        path: &path,
        opaque,
        found: &found,
    }
    .deserialize(&mut de);
    match found.into_inner() {
        Some(path) => Err(ApiError::field(
            path,
            "appears more than once in the same object; give each key once",
        )),
        None => Ok(()),
    }
}

/// Parse a JSON body into `T`, naming the offending field on failure (a repeated key too).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every request body is an object. serde would take `[]` (or `[true]`) for a struct whose
    // fields have defaults (schemathesis: `POST /webhook/{id}/enable` with `[]` answered 200).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::bad("body must be a JSON object, not an array"));
    }
    check_duplicate_keys(bytes, &|_| false)?;
    // Not JSON at all: no field to name; serde_json's message says where (line, column).
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("body is not valid JSON: {e}")))?;
    // Read through `Strict`: a struct, at any depth, is only ever an object (see strict.rs).
    serde_path_to_error::deserialize(strict::Strict(&value)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
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
    fn duplicate_keys_are_named_by_path() {
        let cases = [
            (r#"{"a":1,"a":2}"#, "a"),
            (r#"{"a":1,"b":[{"c":"x"},{"c":"y","c":"z"}]}"#, "b[1].c"),
            (r#"{"q":{"x":{"y":1,"y":2}}}"#, "q.x.y"),
        ];
        for (body, want) in cases {
            let e = check_duplicate_keys(body.as_bytes(), &|_| false).unwrap_err();
            assert_eq!(field_of(e).as_deref(), Some(want), "{body}");
        }
        // A key written with an escape is the same key; past the keys compared one by one, a
        // set finds the repeat (and a large object without one passes).
        let e = check_duplicate_keys(br#"{"x":[{"ab":1,"a\u0062":2}]}"#, &|_| false).unwrap_err();
        assert_eq!(field_of(e).as_deref(), Some("x[0].ab"));
        let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let e = check_duplicate_keys(format!(r#"{{"o":{{{},"k3":0}}}}"#, many.join(",")).as_bytes(), &|_| {
            false
        })
        .unwrap_err();
        assert_eq!(field_of(e).as_deref(), Some("o.k3"));
        check_duplicate_keys(format!(r#"{{"o":{{{}}}}}"#, many.join(",")).as_bytes(), &|_| false).unwrap();
        // Same key in different objects is fine; opaque values are not looked into.
        check_duplicate_keys(br#"{"a":{"k":1},"b":{"k":1}}"#, &|_| false).unwrap();
        check_duplicate_keys(br#"{"p":{"k":1,"k":2}}"#, &|p| p == [Step::Key("p".into())]).unwrap();
        // Syntax errors are left to the parser.
        check_duplicate_keys(br#"{"a":"#, &|_| false).unwrap();
        assert_eq!(
            field_of(parse_json::<T>(br#"{"a":1,"a":2,"b":[]}"#).unwrap_err()).as_deref(),
            Some("a")
        );
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
