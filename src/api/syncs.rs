//! `/syncs`: Census-style syncs (CONTRACT §3, Census syncs), in Census's shapes: a create
//! answers 201 `{"status":"created","data":{"sync_id":…}}`, reads `{"status":"success",
//! "data":…}`, the list pages like Census (`page`, `per_page`, `pagination`). Errors are the
//! relay's typed errors, naming the field path (`mappings[2].to`).
//!
//! A sync is routing configuration (`Engine::syncs`): once created, every record of a run of its
//! source job also goes to its destination webhook, mapped. Pausing holds its deliveries in the
//! store; unpausing releases them in order (`Queue::pause_queued` / `Queue::release_paused`).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{read_body, State};
use crate::domain::now_ms;
use crate::error::{parse_json, ApiError};
use crate::syncs::{Sync, SyncInput, Validated};

/// Census's page size: default and largest.
const PER_PAGE: i64 = 25;
const MAX_PER_PAGE: i64 = 100;

/// The deprecated alert fields (Census's precedence: `alert_attributes` wins).
const DEPRECATED: [&str; 3] = [
    "failed_run_notifications_enabled",
    "failed_record_notifications_enabled",
    "failed_record_notifications_threshold_percent",
];

#[derive(Deserialize)]
pub struct SyncPage {
    page: Option<i64>,
    per_page: Option<i64>,
}

/// The job and the webhook a sync names must exist (the webhook active), checked for
/// `validate_only` too.
async fn check_refs(state: &State, v: &Validated) -> Result<(), ApiError> {
    if state.engine.store.get_job(&v.sync_job_id).await?.is_none() {
        return Err(ApiError::field(
            "source_attributes.object.id",
            format!("no sync job {}", v.sync_job_id),
        ));
    }
    match state.engine.webhooks.get(&v.webhook_id) {
        Some(w) if w.is_active => Ok(()),
        Some(_) => Err(ApiError::field(
            "destination_attributes.connection_id",
            format!("webhook {} is disabled", v.webhook_id),
        )),
        None => Err(ApiError::field(
            "destination_attributes.connection_id",
            format!("no webhook {}", v.webhook_id),
        )),
    }
}

async fn load(state: &State, id: &str) -> Result<Sync, ApiError> {
    let n: i64 = id.parse().map_err(|_| ApiError::not_found("sync", id))?;
    let row = state
        .engine
        .store
        .runs()
        .get_census_sync(n)
        .await?
        .ok_or_else(|| ApiError::not_found("sync", id))?;
    Ok(Sync::from_row(&row)?)
}

/// Deliveries held for each paused sync.
async fn held(state: &State) -> Result<std::collections::HashMap<i64, i64>, ApiError> {
    Ok(state.engine.store.queue().paused_counts().await?.into_iter().collect())
}

pub async fn create(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let v = parse_json::<SyncInput>(&body)?.validate()?;
    check_refs(&state, &v).await?;
    if v.validate_only {
        // Everything was checked; nothing is created.
        return Ok(
            HttpResponse::Ok().json(json!({"status": "success", "data": {"sync_id": null, "validate_only": true}}))
        );
    }
    let now = now_ms();
    let sync = Sync {
        id: 0,
        sync_job_id: v.sync_job_id,
        webhook_id: v.webhook_id,
        paused: v.paused,
        config: v.config,
        created_at: now,
        updated_at: now,
    };
    let row = state.engine.store.runs().insert_census_sync(&sync.to_row()).await?;
    let sync = Sync { id: row.id, ..sync };
    state.engine.syncs.put(sync.clone());
    Ok(HttpResponse::Created()
        .insert_header(("location", format!("/syncs/{}", sync.id)))
        .json(json!({"status": "created", "data": {"sync_id": sync.id}})))
}

pub async fn get(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let s = load(&state, &id).await?;
    let held = held(&state).await?.get(&s.id).copied().unwrap_or(0);
    Ok(HttpResponse::Ok().json(json!({"status": "success", "data": s.to_json(Some(held))})))
}

pub async fn list(state: State, q: web::Query<SyncPage>) -> Result<HttpResponse, ApiError> {
    let page = q.page.unwrap_or(1);
    if !(1..=1_000_000).contains(&page) {
        return Err(ApiError::field("page", "must be between 1 and 1000000"));
    }
    let per_page = q.per_page.unwrap_or(PER_PAGE);
    if !(1..=MAX_PER_PAGE).contains(&per_page) {
        return Err(ApiError::field(
            "per_page",
            format!("must be between 1 and {MAX_PER_PAGE}"),
        ));
    }
    let (rows, total) = state
        .engine
        .store
        .runs()
        .list_census_syncs((page - 1) * per_page, per_page)
        .await?;
    let held = held(&state).await?;
    let mut data = Vec::with_capacity(rows.len());
    for r in &rows {
        let s = Sync::from_row(r)?;
        data.push(s.to_json(Some(held.get(&s.id).copied().unwrap_or(0))));
    }
    let last = ((total + per_page - 1) / per_page).max(1);
    Ok(HttpResponse::Ok().json(json!({
        "status": "success",
        "pagination": {
            "total_records": total,
            "per_page": per_page,
            "page": page,
            "prev_page": if page > 1 { json!(page - 1) } else { Value::Null },
            "next_page": if page < last { json!(page + 1) } else { Value::Null },
            "last_page": last,
        },
        "data": data,
    })))
}

/// Census's PATCH: top-level fields replace the sync's (nested objects are sent whole); the
/// result is validated as a create would be.
pub async fn update(state: State, id: web::Path<String>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let old = load(&state, &id).await?;
    let body = read_body(&state, body).await?;
    let patch: Map<String, Value> = parse_json(&body)?;
    let Value::Object(mut merged) = old.input_json() else {
        return Err(ApiError::Internal(anyhow::anyhow!("a sync renders as an object")));
    };
    // Changing the deprecated fields alone means changing the alerts they stand for.
    if DEPRECATED.iter().any(|k| patch.contains_key(*k)) && !patch.contains_key("alert_attributes") {
        merged.shift_remove("alert_attributes");
    }
    for (k, v) in patch {
        merged.insert(k, v);
    }
    let bytes = serde_json::to_vec(&Value::Object(merged)).map_err(anyhow::Error::from)?;
    let v = parse_json::<SyncInput>(&bytes)?.validate()?;
    check_refs(&state, &v).await?;
    if v.validate_only {
        return Ok(
            HttpResponse::Ok().json(json!({"status": "success", "data": {"sync_id": old.id, "validate_only": true}}))
        );
    }
    let new = Sync {
        sync_job_id: v.sync_job_id,
        webhook_id: v.webhook_id,
        paused: v.paused,
        config: v.config,
        updated_at: now_ms(),
        ..old.clone()
    };
    if !state.engine.store.runs().update_census_sync(&new.to_row()).await? {
        return Err(ApiError::not_found("sync", &id));
    }
    let engine = &state.engine;
    match (old.paused, new.paused) {
        (false, true) => {
            // New rows are written paused from the stored flag on; rows already waiting are
            // paused here (a row ready or in flight finishes).
            engine.syncs.put(new.clone());
            engine.store.queue().pause_queued(new.id).await?;
        }
        (true, false) => {
            // Released before the cache says unpaused, so a Kafka delivery routed meanwhile is
            // written to the store behind them rather than sent from memory ahead of them.
            engine.release_sync(new.id).await?;
            engine.syncs.put(new.clone());
        }
        _ => engine.syncs.put(new.clone()),
    }
    let held = held(&state).await?.get(&new.id).copied().unwrap_or(0);
    Ok(HttpResponse::Ok().json(json!({"status": "updated", "data": new.to_json(Some(held))})))
}

/// Deleting a paused sync releases what it held (never lost): those deliveries go out.
pub async fn delete(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let s = load(&state, &id).await?;
    state.engine.store.runs().delete_census_sync(s.id).await?;
    state.engine.syncs.remove(s.id);
    state.engine.release_sync(s.id).await?;
    Ok(HttpResponse::Ok().json(json!({"status": "deleted", "data": {"sync_id": s.id}})))
}
