//! `/api/bulk/2.0/syncs`: Eloqua-style bulk syncs (CONTRACT §3). The callback URL is checked
//! like a webhook's target (scheme, credentials, the address policy).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_target_url, read_body, State};
use crate::domain::{check_text, limits, now_ms, rfc3339_ms};
use crate::error::{parse_json, ApiError};
use crate::store::EloquaSync;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSync {
    #[serde(rename = "syncedInstanceUri")]
    synced_instance_uri: String,
    #[serde(rename = "callbackURL")]
    callback_url: Option<String>,
    #[serde(default)]
    validate_only: bool,
}

fn sync_json(s: &EloquaSync) -> Value {
    json!({
        "syncedInstanceUri": s.synced_instance_uri,
        "callbackUrl": s.callback_url,
        "status": s.status,
        "createdAt": rfc3339_ms(s.created_at),
        "createdBy": s.created_by,
        "uri": format!("/syncs/{}", s.n),
    })
}

pub async fn create(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: CreateSync = parse_json(&body)?;
    check_text("syncedInstanceUri", &req.synced_instance_uri, limits::URI, false)?;
    let uri = req.synced_instance_uri.trim();
    if !uri.starts_with('/') || uri.len() < 2 || uri.contains(char::is_whitespace) {
        return Err(ApiError::field(
            "syncedInstanceUri",
            "must be the URI of an export or import definition, e.g. /contacts/exports/1",
        ));
    }
    let callback = match &req.callback_url {
        Some(raw) => Some(check_target_url(&state, "callbackURL", raw).await?.to_string()),
        None => None,
    };
    if req.validate_only {
        return Ok(HttpResponse::Ok().json(json!({"valid": true})));
    }
    let s = state
        .engine
        .store
        .insert_eloqua_sync(uri, callback.as_deref(), "api", now_ms())
        .await?;
    Ok(HttpResponse::Created().json(sync_json(&s)))
}

pub async fn get(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let n: i64 = id.parse().map_err(|_| ApiError::not_found("sync", &id))?;
    let s = state
        .engine
        .store
        .get_eloqua_sync(n)
        .await?
        .ok_or_else(|| ApiError::not_found("sync", &id))?;
    Ok(HttpResponse::Ok().json(sync_json(&s)))
}
