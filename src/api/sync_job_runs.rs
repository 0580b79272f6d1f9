//! `/sync-job-run`: runs of sync jobs (Truto's shape). Creating a run publishes a `start`
//! command for executors and delivers `sync_job_run:created` to the run's webhook; stopping one
//! publishes a `stop` command and delivers `sync_job_run:stopped`.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::sync_jobs::off_thread;
use super::{check_target_url, list_response, read_body, PageQuery, State};
use crate::domain::{check_json_size, check_text, limits, now_ms, parse_uuid, rfc3339_ms, Envelope, Payload};
use crate::error::{parse_json, ApiError};
use crate::runs::lifecycle::relay_event_prefix;
use crate::runs::validate::{compile_args_schema, validate_args};
use crate::runs::{ErrorHandling, Run, Runs, Status};
use crate::store::RunFilter;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRun {
    sync_job_id: String,
    integrated_account_id: String,
    webhook_id: Option<String>,
    daemon_group_key: Option<String>,
    args: Option<Value>,
    error_handling: Option<ErrorHandling>,
    #[serde(default)]
    ignore_previous_run: bool,
    callback_url: Option<String>,
    /// The DevRev-style sync unit this run syncs (CONTRACT §3, DevRev sync units).
    sync_unit_id: Option<String>,
    #[serde(default)]
    validate_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRun {
    status: String,
}

#[derive(Debug, Deserialize)]
pub struct RunQuery {
    limit: Option<i64>,
    cursor: Option<String>,
    sync_job_id: Option<String>,
    status: Option<String>,
    integrated_account_id: Option<String>,
    webhook_id: Option<String>,
}

async fn load(state: &State, id: &str) -> Result<Run, ApiError> {
    let id = parse_uuid("id", id).map_err(|_| ApiError::not_found("sync job run", id))?;
    state
        .engine
        .store
        .get_run(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("sync job run", &id))
}

/// The engine's run lifecycle (one instance per process).
fn runs(state: &State) -> &Runs {
    &state.engine.runs
}

/// A run the API stopped or deleted reached its final status.
fn count_stopped(state: &State) {
    state.engine.metrics.runs_finished.with_label_values(&["stopped"]).inc();
}

fn payload_of(run: &Run) -> Map<String, Value> {
    match run.to_json() {
        Value::Object(o) => o,
        _ => Map::new(),
    }
}

/// An event of this run, to its webhook and callback URL. `None` when it has neither (a daemon
/// run without a callback): nothing to deliver.
fn run_event(run: &Run, id: String, event: &str) -> Option<Envelope> {
    if run.webhook_id.is_none() && run.callback_url.is_none() {
        return None;
    }
    Some(Envelope {
        id,
        event: event.to_string(),
        sync_job_run_id: Some(run.id.clone()),
        webhook_id: run.webhook_id.clone(),
        callback_url: run.callback_url.as_deref().and_then(|u| url::Url::parse(u).ok()),
        environment_id: run
            .sync_job
            .get("environment_id")
            .and_then(Value::as_str)
            .map(str::to_string),
        created_at_ms: now_ms(),
        payload: Payload::made(payload_of(run)),
        relay_made: true,
    })
}

pub async fn create(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: CreateRun = parse_json(&body)?;
    let store = &state.engine.store;
    let job_id = parse_uuid("sync_job_id", &req.sync_job_id)?;
    let job = store
        .get_job(&job_id)
        .await?
        .ok_or_else(|| ApiError::field("sync_job_id", format!("no sync job {job_id}")))?;
    let account = parse_uuid("integrated_account_id", &req.integrated_account_id)?;
    let (webhook_id, daemon_group_key) = match (&req.webhook_id, &req.daemon_group_key) {
        (Some(w), None) => {
            let w = parse_uuid("webhook_id", w)?;
            match state.engine.webhooks.get(&w) {
                None => return Err(ApiError::field("webhook_id", format!("no webhook {w}"))),
                Some(h) if !h.is_active => {
                    return Err(ApiError::field(
                        "webhook_id",
                        format!("webhook {w} is disabled (is_active=false)"),
                    ))
                }
                Some(_) => (Some(w), None),
            }
        }
        (None, Some(k)) if k.trim().is_empty() => {
            return Err(ApiError::field("daemon_group_key", "must not be empty"));
        }
        (None, Some(k)) => {
            check_text("daemon_group_key", k, limits::NAME, false)?;
            (None, Some(k.clone()))
        }
        _ => {
            return Err(ApiError::field(
                "webhook_id",
                "exactly one of webhook_id (RapidBridge) or daemon_group_key (daemon) is required",
            ))
        }
    };
    let args = req.args.unwrap_or_else(|| json!({}));
    if !args.is_object() {
        return Err(ApiError::field("args", "must be a JSON object"));
    }
    check_json_size("args", &args, limits::SCHEMA_BYTES)?;
    let args = match job.args_schema.clone() {
        Some(schema) => {
            off_thread(move || {
                let v = compile_args_schema(&schema).map_err(|e| e.within("sync_job"))?;
                validate_args(&v, &args)?;
                Ok(args)
            })
            .await?
        }
        None => args,
    };
    let callback_url = match &req.callback_url {
        Some(raw) => Some(check_target_url(&state, "callback_url", raw).await?.to_string()),
        None => None,
    };
    let sync_unit_id = match &req.sync_unit_id {
        Some(id) => {
            check_text("sync_unit_id", id, limits::ID, false)?;
            match store.runs().get_sync_unit(id).await? {
                Some(u) if u.is_archived => {
                    return Err(ApiError::field("sync_unit_id", format!("sync unit {id} is archived")))
                }
                Some(u) => Some(u.id),
                None => return Err(ApiError::field("sync_unit_id", format!("no sync unit {id}"))),
            }
        }
        None => None,
    };
    if req.validate_only {
        return Ok(HttpResponse::Ok().json(json!({"valid": true})));
    }
    let now = now_ms();
    let job_json = job.to_json();
    let run = Run {
        id: uuid::Uuid::new_v4().to_string(),
        sync_job_id: job.id.clone(),
        integrated_account_id: account,
        webhook_id,
        daemon_group_key,
        daemon_id: None,
        callback_url,
        args,
        resources: job_json["resources"].clone(),
        sync_job: job_json.clone(),
        error_handling: req.error_handling.unwrap_or_default(),
        ignore_previous_run: req.ignore_previous_run,
        status: Status::Created,
        resource_stats: Default::default(),
        illegal_transitions: 0,
        stop_reason: None,
        created_at: now,
        updated_at: now,
        started_at: None,
        finished_at: None,
        sync_unit_id,
        seq: 0,
    };
    let previous_run_date = if run.ignore_previous_run {
        None
    } else {
        store
            .previous_run_date(&run.sync_job_id, &run.integrated_account_id)
            .await?
    };
    let run = store.insert_run(&run).await?;
    let body = run.to_json();
    let command = json!({
        "type": "start",
        "run": body,
        "sync_job": job_json,
        "previous_run_date": previous_run_date.map(rfc3339_ms),
    });
    if let Err(e) = state.commands.publish(&run.id, command).await {
        // Without its command no executor will run it: do not leave it behind as `created`.
        let _ = store.delete_run(&run.id).await;
        return Err(ApiError::Unavailable(format!(
            "could not publish the run's start command: {e:#}"
        )));
    }
    if run.sync_unit_id.is_some() {
        state.engine.metrics.sync_unit_runs.inc();
    }
    let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
    if let Some(e) = run_event(&run, id, "sync_job_run:created") {
        state.engine.ingest(&[e], "api").await?;
    }
    Ok(HttpResponse::Created().json(body))
}

pub async fn list(state: State, q: web::Query<RunQuery>) -> Result<HttpResponse, ApiError> {
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor.clone(),
    };
    if let Some(s) = &q.status {
        if Status::parse(s).is_none() {
            return Err(ApiError::field(
                "status",
                format!("must be one of {}", Status::ALL.join(", ")),
            ));
        }
    }
    let uuid = |f: &str, v: &Option<String>| v.as_deref().map(|s| parse_uuid(f, s)).transpose();
    let filter = RunFilter {
        sync_job_id: uuid("sync_job_id", &q.sync_job_id)?,
        status: q.status.clone(),
        integrated_account_id: uuid("integrated_account_id", &q.integrated_account_id)?,
        webhook_id: uuid("webhook_id", &q.webhook_id)?,
    };
    let p = state
        .engine
        .store
        .list_runs(&filter, page.after()?, page.limit()?)
        .await?;
    Ok(list_response(
        p.results.iter().map(Run::to_json).collect(),
        p.next_cursor,
    ))
}

pub async fn get(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(load(&state, &id).await?.to_json()))
}

/// `{"status":"stopped"}`: stop an active run.
pub async fn update(state: State, id: web::Path<String>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: UpdateRun = parse_json(&body)?;
    if req.status != "stopped" {
        return Err(ApiError::field("status", "only \"stopped\" can be set"));
    }
    let run = load(&state, &id).await?;
    if run.status == Status::Stopped {
        return Ok(HttpResponse::Ok().json(run.to_json()));
    }
    let Some(flushed) = runs(&state).stop(&run.id, "api").await? else {
        let run = load(&state, &id).await?;
        return Err(ApiError::Conflict(format!(
            "sync job run {} is {}; only created, running or rate_limited runs can be stopped",
            run.id,
            run.status.as_str()
        )));
    };
    count_stopped(&state);
    state
        .commands
        .publish(&run.id, json!({"type": "stop", "run_id": run.id, "reason": "api"}))
        .await
        .map_err(ApiError::Internal)?;
    let run = load(&state, &id).await?;
    let mut events = flushed;
    events.extend(run_event(
        &run,
        format!("{}stopped", relay_event_prefix(&run.id)),
        "sync_job_run:stopped",
    ));
    if !events.is_empty() {
        state.engine.ingest(&events, "api").await?;
    }
    Ok(HttpResponse::Ok().json(run.to_json()))
}

pub async fn delete(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let run = load(&state, &id).await?;
    let mut events = Vec::new();
    if let Some(flushed) = runs(&state).stop(&run.id, "deleted").await? {
        count_stopped(&state);
        state
            .commands
            .publish(&run.id, json!({"type": "stop", "run_id": run.id, "reason": "deleted"}))
            .await
            .map_err(ApiError::Internal)?;
        events = flushed;
    }
    state.engine.store.delete_run(&run.id).await?;
    events.extend(run_event(
        &run,
        format!("{}deleted", relay_event_prefix(&run.id)),
        "sync_job_run:deleted",
    ));
    if !events.is_empty() {
        state.engine.ingest(&events, "api").await?;
    }
    Ok(HttpResponse::NoContent().finish())
}
