//! `/airdrop.sync-units.*`: DevRev-style airdrop sync units (CONTRACT §3, DevRev sync units).
//!
//! A unit is a thing an executor syncs again and again; a run names it (`sync_unit_id` on
//! `POST /sync-job-run`) and the unit's `sync_run` shows its latest run. Bulk create is all or
//! nothing: every item is checked first, and the units are inserted in one transaction.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{read_body, PageQuery, State};
use crate::domain::{check_text, limits, now_ms, rfc3339_ms};
use crate::error::{parse_json, ApiError};
use crate::runs::eloqua::totals;
use crate::runs::{Run, Status};
use crate::store::SyncUnit;

/// The most units one bulk create takes.
pub const MAX_BULK_UNITS: usize = 100;
/// The largest bulk create body.
pub const MAX_BULK_BYTES: usize = 64 * 1024;

/// DevRev-style object ids: `don:integration:<partition>:<dev org>:sync_unit/<id>`.
const DON_PREFIX: &str = "don:integration:dvrv-us-1:devo/syncrelay:sync_unit/";

/// The relay's "user" for `created_by` / `modified_by`.
fn relay_user() -> Value {
    json!({"type": "sys_user", "id": "don:identity:dvrv-us-1:devo/syncrelay:sysu/1",
           "display_name": "syncrelay", "display_id": "SYSU-1"})
}

/// A run's status on DevRev's airdrop `progress.state` (CONTRACT §3 has the table).
pub fn progress_state(run: &Run) -> &'static str {
    match run.status {
        Status::Created => "starting",
        Status::Running => "in_progress",
        Status::RateLimited => "rate_limited",
        Status::Completed => {
            let (_, errors, dead) = totals(run);
            if errors > 0 || dead > 0 {
                "completed_with_errors"
            } else {
                "completed"
            }
        }
        Status::Failed => "failed",
        Status::Stopped => "cancelled",
    }
}

/// The unit's first run, or a run that ignores the previous one, is `initial`; later runs are
/// `incremental`.
pub fn mode(run: &Run, runs_of_unit: i64) -> &'static str {
    if runs_of_unit <= 1 || run.ignore_previous_run {
        "initial"
    } else {
        "incremental"
    }
}

fn opt_time(t: Option<i64>) -> Value {
    t.map(|m| json!(rfc3339_ms(m))).unwrap_or(Value::Null)
}

fn unit_json(u: &SyncUnit, latest: Option<&(Run, i64)>) -> Value {
    let sync_run = match latest {
        Some((run, n)) => json!({
            "id": run.id,
            "started_at": opt_time(run.started_at),
            "ended_at": opt_time(run.finished_at),
            "mode": mode(run, *n),
            "progress": {"state": progress_state(run)},
        }),
        None => Value::Null,
    };
    json!({
        "id": u.id,
        "display_id": format!("SYNCUNIT-{}", u.seq),
        "created_by": relay_user(),
        "modified_by": relay_user(),
        "created_date": rfc3339_ms(u.created_at),
        "modified_date": rfc3339_ms(u.updated_at),
        "object_version": u.object_version,
        "external_sync_unit_id": u.external_sync_unit,
        "external_sync_unit_name": u.external_sync_unit,
        "external_system_name": u.keyring,
        "external_system_type": "keyring",
        "is_archived": u.is_archived,
        "name": u.name,
        "sync_run": sync_run,
        "sync_type": "airdrop",
    })
}

async fn render(state: &State, u: &SyncUnit) -> Result<Value, ApiError> {
    let latest = state.engine.store.runs().latest_unit_run(&u.id).await?;
    Ok(unit_json(u, latest.as_ref()))
}

fn text_field(item: &Map<String, Value>, i: usize, key: &str) -> Result<String, ApiError> {
    let field = format!("sync_units[{i}].{key}");
    match item.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => {
            check_text(&field, s, limits::NAME, false)?;
            Ok(s.trim().to_string())
        }
        Some(Value::String(_)) => Err(ApiError::field(field, "must not be empty")),
        Some(_) => Err(ApiError::field(field, "must be a string")),
        None => Err(ApiError::field(field, "is required")),
    }
}

pub async fn create_bulk(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    if body.len() > MAX_BULK_BYTES {
        return Err(ApiError::TooLarge {
            max_bytes: MAX_BULK_BYTES,
            field: Some("sync_units".into()),
        });
    }
    let req: Value = parse_json(&body)?;
    let Some(items) = req.get("sync_units").and_then(Value::as_array) else {
        return Err(ApiError::field("sync_units", "is required and must be an array"));
    };
    if items.is_empty() {
        return Err(ApiError::field("sync_units", "must not be empty"));
    }
    if items.len() > MAX_BULK_UNITS {
        return Err(ApiError::field(
            "sync_units",
            format!("at most {MAX_BULK_UNITS} units per request"),
        ));
    }
    let now = now_ms();
    let mut units = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(o) = item.as_object() else {
            return Err(ApiError::field(format!("sync_units[{i}]"), "must be an object"));
        };
        if let Some(k) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "external_sync_unit" | "keyring"))
        {
            return Err(ApiError::field(format!("sync_units[{i}].{k}"), "unknown field"));
        }
        let external = text_field(o, i, "external_sync_unit")?;
        let keyring = text_field(o, i, "keyring")?;
        units.push(SyncUnit {
            id: format!("{DON_PREFIX}{}", uuid::Uuid::new_v4().simple()),
            name: external.clone(),
            external_sync_unit: external,
            keyring,
            is_archived: false,
            object_version: 1,
            created_by: "api".into(),
            created_at: now,
            updated_at: now,
            seq: 0,
        });
    }
    let units = state.engine.store.runs().insert_sync_units(&units).await?;
    state.engine.metrics.sync_units_created.inc_by(units.len() as u64);
    let out: Vec<Value> = units.iter().map(|u| unit_json(u, None)).collect();
    Ok(HttpResponse::Created().json(json!({ "sync_units": out })))
}

#[derive(Deserialize)]
pub struct IdQuery {
    id: String,
}

async fn load(state: &State, id: &str) -> Result<SyncUnit, ApiError> {
    state
        .engine
        .store
        .runs()
        .get_sync_unit(id)
        .await?
        .ok_or_else(|| ApiError::not_found("sync unit", id))
}

pub async fn get(state: State, q: web::Query<IdQuery>) -> Result<HttpResponse, ApiError> {
    let u = load(&state, &q.id).await?;
    Ok(HttpResponse::Ok().json(json!({ "sync_unit": render(&state, &u).await? })))
}

pub async fn list(state: State, q: web::Query<PageQuery>) -> Result<HttpResponse, ApiError> {
    let p = state
        .engine
        .store
        .runs()
        .list_sync_units(q.after()?, q.limit()?)
        .await?;
    let mut out = Vec::with_capacity(p.results.len());
    for u in &p.results {
        out.push(render(&state, u).await?);
    }
    Ok(HttpResponse::Ok().json(json!({ "sync_units": out, "next_cursor": p.next_cursor })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateUnit {
    id: String,
    is_archived: Option<bool>,
    name: Option<String>,
}

/// `{"id", "is_archived"?, "name"?}`: archive (or unarchive) and rename; `object_version` counts
/// the changes.
pub async fn update(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: UpdateUnit = parse_json(&body)?;
    let mut u = load(&state, &req.id).await?;
    let mut changed = false;
    if let Some(a) = req.is_archived {
        changed |= a != u.is_archived;
        u.is_archived = a;
    }
    if let Some(n) = &req.name {
        check_text("name", n, limits::NAME, false)?;
        if n.trim().is_empty() {
            return Err(ApiError::field("name", "must not be empty"));
        }
        changed |= n.trim() != u.name;
        u.name = n.trim().to_string();
    }
    if changed {
        u.object_version += 1;
        u.updated_at = now_ms();
        state.engine.store.runs().update_sync_unit(&u).await?;
    }
    Ok(HttpResponse::Ok().json(json!({ "sync_unit": render(&state, &u).await? })))
}
