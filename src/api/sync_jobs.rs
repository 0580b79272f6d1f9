//! `/sync-job`: sync jobs (Truto's shape). Every write is validated as a whole (args_schema,
//! resources, placeholders, the dependency graph); errors name the field path.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{list_response, read_body, PageQuery, State};
use crate::domain::{check_text, limits, now_ms, parse_uuid};
use crate::error::{parse_json, ApiError};
use crate::runs::validate::validate_job;
use crate::runs::{ResourceSpec, SyncJob};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    integration_name: String,
    #[serde(default)]
    args_schema: Option<Value>,
    resources: Vec<ResourceSpec>,
    #[serde(default)]
    environment_id: Option<String>,
    #[serde(default)]
    validate_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateJob {
    integration_name: Option<String>,
    args_schema: Option<Value>,
    resources: Option<Vec<ResourceSpec>>,
    environment_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct JobQuery {
    limit: Option<i64>,
    cursor: Option<String>,
    integration_name: Option<String>,
}

/// Run CPU-heavy validation (JSON Schema compilation, the dependency graph) on the blocking
/// pool, so the async workers keep answering other requests (`/health/live` included).
pub(super) async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("validation task failed: {e}")))?
}

async fn load(state: &State, id: &str) -> Result<SyncJob, ApiError> {
    let id = parse_uuid("id", id).map_err(|_| ApiError::not_found("sync job", id))?;
    state
        .engine
        .store
        .get_job(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("sync job", &id))
}

pub async fn create(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let mut req: CreateJob = parse_json(&body)?;
    if let Some(e) = &req.environment_id {
        check_text("environment_id", e, limits::NAME, false)?;
    }
    // Schema compilation and the graph checks are CPU work: off the async worker threads.
    let req = off_thread(move || {
        validate_job(&req.integration_name, req.args_schema.as_ref(), &mut req.resources)?;
        Ok(req)
    })
    .await?;
    if req.validate_only {
        return Ok(HttpResponse::Ok().json(json!({"valid": true})));
    }
    let now = now_ms();
    let job = SyncJob {
        id: uuid::Uuid::new_v4().to_string(),
        integration_name: req.integration_name,
        args_schema: req.args_schema,
        resources: req.resources,
        environment_id: req.environment_id,
        created_at: now,
        updated_at: now,
        seq: 0,
    };
    let job = state.engine.store.insert_job(&job).await?;
    Ok(HttpResponse::Created().json(job.to_json()))
}

pub async fn list(state: State, q: web::Query<JobQuery>) -> Result<HttpResponse, ApiError> {
    if let Some(n) = &q.integration_name {
        check_text("integration_name", n, limits::NAME, false)?;
    }
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor.clone(),
    };
    let p = state
        .engine
        .store
        .list_jobs(q.integration_name.as_deref(), page.after()?, page.limit()?)
        .await?;
    Ok(list_response(
        p.results.iter().map(SyncJob::to_json).collect(),
        p.next_cursor,
    ))
}

pub async fn get(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(load(&state, &id).await?.to_json()))
}

pub async fn update(state: State, id: web::Path<String>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: UpdateJob = parse_json(&body)?;
    if let Some(e) = &req.environment_id {
        check_text("environment_id", e, limits::NAME, false)?;
    }
    let mut job = load(&state, &id).await?;
    if let Some(n) = req.integration_name {
        job.integration_name = n;
    }
    if let Some(s) = req.args_schema {
        job.args_schema = Some(s);
    }
    if let Some(r) = req.resources {
        job.resources = r;
    }
    if req.environment_id.is_some() {
        job.environment_id = req.environment_id;
    }
    let mut job = off_thread(move || {
        validate_job(&job.integration_name, job.args_schema.as_ref(), &mut job.resources)?;
        Ok(job)
    })
    .await?;
    job.updated_at = now_ms();
    state.engine.store.update_job(&job).await?;
    Ok(HttpResponse::Ok().json(job.to_json()))
}

pub async fn delete(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let job = load(&state, &id).await?;
    match state.engine.store.delete_job(&job.id).await? {
        Ok(_) => Ok(HttpResponse::NoContent().finish()),
        Err(n) => Err(ApiError::Conflict(format!(
            "sync job {} has {n} active run(s) (created, running or rate_limited); stop them first",
            job.id
        ))),
    }
}
