//! `/api/bulk/2.0/syncs`: Eloqua-style bulk syncs (CONTRACT §3). The callback URL is checked
//! like a webhook's target (scheme, credentials, the address policy).
//!
//! Creating a sync starts a run of it (a run without a sync job, `runs::eloqua::NO_SYNC_JOB`):
//! its start command goes where run commands go; the sync's status is its run's; when the run
//! finishes, one signed callback carries the sync (`Engine::eloqua_callbacks`).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_target_url, read_body, State};
use crate::domain::{check_text, limits, now_ms, parse_uuid};
use crate::error::{parse_json, ApiError};
use crate::runs::eloqua::{log_items, sync_json, uri_of, NO_SYNC_JOB};
use crate::runs::{Run, Status};
use crate::store::EloquaSync;

/// Eloqua's page size: default and largest.
const MAX_LIMIT: i64 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSync {
    #[serde(rename = "syncedInstanceUri")]
    synced_instance_uri: String,
    #[serde(rename = "callbackURL")]
    callback_url: Option<String>,
    /// Relay extension: the webhook that receives the run's records (signed like any run's).
    #[serde(rename = "webhookId")]
    webhook_id: Option<String>,
    #[serde(default)]
    validate_only: bool,
}

#[derive(Deserialize)]
pub struct EloquaPage {
    limit: Option<i64>,
    offset: Option<i64>,
}

impl EloquaPage {
    fn get(&self) -> Result<(i64, i64), ApiError> {
        let limit = self.limit.unwrap_or(MAX_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::field("limit", format!("must be between 1 and {MAX_LIMIT}")));
        }
        let offset = self.offset.unwrap_or(0);
        if offset < 0 {
            return Err(ApiError::field("offset", "must not be negative"));
        }
        Ok((limit, offset))
    }
}

fn page(items: Vec<Value>, total: i64, limit: i64, offset: i64) -> Value {
    json!({
        "items": items,
        "totalResults": total,
        "limit": limit,
        "offset": offset,
        "count": items.len(),
        "hasMore": offset + (items.len() as i64) < total,
    })
}

async fn run_of(state: &State, s: &EloquaSync) -> Result<Option<Run>, ApiError> {
    Ok(match &s.run_id {
        Some(id) => state.engine.store.get_run(id).await?,
        None => None,
    })
}

async fn load(state: &State, id: &str) -> Result<EloquaSync, ApiError> {
    let n: i64 = id.parse().map_err(|_| ApiError::not_found("sync", id))?;
    state
        .engine
        .store
        .get_eloqua_sync(n)
        .await?
        .ok_or_else(|| ApiError::not_found("sync", id))
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
    let webhook_id = match &req.webhook_id {
        Some(w) => {
            let w = parse_uuid("webhookId", w)?;
            match state.engine.webhooks.get(&w) {
                Some(h) if h.is_active => Some(w),
                Some(_) => return Err(ApiError::field("webhookId", format!("webhook {w} is disabled"))),
                None => return Err(ApiError::field("webhookId", format!("no webhook {w}"))),
            }
        }
        None => None,
    };
    if req.validate_only {
        return Ok(HttpResponse::Ok().json(json!({"valid": true})));
    }
    let store = &state.engine.store;
    let now = now_ms();
    let run = Run {
        id: uuid::Uuid::new_v4().to_string(),
        sync_job_id: NO_SYNC_JOB.into(),
        integrated_account_id: NO_SYNC_JOB.into(),
        webhook_id,
        daemon_group_key: None,
        daemon_id: None,
        callback_url: None,
        args: json!({}),
        resources: json!([]),
        sync_job: json!({"type": "eloqua_sync", "syncedInstanceUri": uri}),
        error_handling: Default::default(),
        ignore_previous_run: false,
        status: Status::Created,
        resource_stats: Default::default(),
        illegal_transitions: 0,
        stop_reason: None,
        created_at: now,
        updated_at: now,
        started_at: None,
        finished_at: None,
        sync_unit_id: None,
        seq: 0,
    };
    let run = store.insert_run(&run).await?;
    let s = store
        .insert_eloqua_sync(uri, callback.as_deref(), Some(&run.id), "api", now)
        .await?;
    let command = json!({
        "type": "start",
        "sync_job_run_id": run.id,
        "uri": uri_of(&s),
        "syncedInstanceUri": uri,
        "run": run.to_json(),
        "sync_job": null,
        "previous_run_date": null,
    });
    if let Err(e) = state.commands.publish(&run.id, command).await {
        // Without its command no executor runs it: the run is stopped (the sync `error`, and its
        // callback, if any, is sent).
        let _ = state.engine.stop_run(&run.id, "start_command_failed").await;
        return Err(ApiError::Unavailable(format!(
            "could not publish the sync's start command: {e:#}"
        )));
    }
    // Where the new sync is read (RFC 9110 §10.2.2): `uri` is Eloqua's, relative to its API.
    Ok(HttpResponse::Created()
        .insert_header(("location", format!("/api/bulk/2.0{}", uri_of(&s))))
        .json(sync_json(&s, Some(&run))))
}

pub async fn get(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let s = load(&state, &id).await?;
    let run = run_of(&state, &s).await?;
    Ok(HttpResponse::Ok().json(sync_json(&s, run.as_ref())))
}

pub async fn list(state: State, q: web::Query<EloquaPage>) -> Result<HttpResponse, ApiError> {
    let (limit, offset) = q.get()?;
    let (syncs, total) = state.engine.store.runs().list_eloqua_syncs(offset, limit).await?;
    let mut items = Vec::with_capacity(syncs.len());
    for s in &syncs {
        let run = run_of(&state, s).await?;
        items.push(sync_json(s, run.as_ref()));
    }
    Ok(HttpResponse::Ok().json(page(items, total, limit, offset)))
}

pub async fn logs(state: State, id: web::Path<String>, q: web::Query<EloquaPage>) -> Result<HttpResponse, ApiError> {
    let (limit, offset) = q.get()?;
    let s = load(&state, &id).await?;
    let all = match run_of(&state, &s).await? {
        Some(run) => log_items(&s, &run),
        None => Vec::new(),
    };
    let total = all.len() as i64;
    let items: Vec<Value> = all.into_iter().skip(offset as usize).take(limit as usize).collect();
    Ok(HttpResponse::Ok().json(page(items, total, limit, offset)))
}
