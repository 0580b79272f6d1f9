//! The HTTP API (CONTRACT §3). One file per resource; this one holds what they share: state,
//! bearer authentication, request metrics, body reading with a typed 413, list paging.

mod eloqua;
mod events;
mod ops;
mod sync_job_runs;
mod sync_jobs;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse, ResponseError};
use futures_util::StreamExt;
use subtle::ConstantTimeEq;

use crate::config::Settings;
use crate::delivery::engine::Engine;
use crate::error::ApiError;

pub struct AppState {
    pub settings: Settings,
    pub engine: Arc<Engine>,
    /// Where run commands are published for executors.
    pub commands: Arc<dyn crate::intake::CommandSink>,
    /// Set when `bus.kind = "kafka"`: `POST /events` produces to the events topic.
    pub kafka: Option<Arc<crate::intake::kafka::KafkaBus>>,
}

pub type State = web::Data<AppState>;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("")
            .wrap(from_fn(authenticate))
            .wrap(from_fn(observe))
            .route("/health/live", web::get().to(ops::live))
            .route("/health/ready", web::get().to(ops::ready))
            .route("/metrics", web::get().to(ops::metrics))
            .route("/webhook", web::post().to(webhooks::create))
            .route("/webhook", web::get().to(webhooks::list))
            .route("/webhook/{id}", web::get().to(webhooks::get))
            .route("/webhook/{id}", web::patch().to(webhooks::update))
            .route("/webhook/{id}", web::delete().to(webhooks::delete))
            .route("/webhook/{id}/rotate-secret", web::post().to(webhooks::rotate_secret))
            .route("/webhook/{id}/test", web::post().to(webhooks::test))
            .route("/events", web::post().to(events::ingest))
            .route("/deliveries", web::get().to(ops::list_deliveries))
            .route("/deliveries/{id}", web::get().to(ops::get_delivery))
            .route("/dead-letters", web::get().to(ops::list_dead_letters))
            .route("/dead-letters/replay", web::post().to(ops::replay_dead_letters))
            .route("/sync-job-run-commands", web::get().to(ops::list_commands))
            .route("/sync-job", web::post().to(sync_jobs::create))
            .route("/sync-job", web::get().to(sync_jobs::list))
            .route("/sync-job/{id}", web::get().to(sync_jobs::get))
            .route("/sync-job/{id}", web::patch().to(sync_jobs::update))
            .route("/sync-job/{id}", web::delete().to(sync_jobs::delete))
            .route("/sync-job-run", web::post().to(sync_job_runs::create))
            .route("/sync-job-run", web::get().to(sync_job_runs::list))
            .route("/sync-job-run/{id}", web::get().to(sync_job_runs::get))
            .route("/sync-job-run/{id}", web::patch().to(sync_job_runs::update))
            .route("/sync-job-run/{id}", web::delete().to(sync_job_runs::delete))
            .route("/api/bulk/2.0/syncs", web::post().to(eloqua::create))
            .route("/api/bulk/2.0/syncs/{id}", web::get().to(eloqua::get))
            .default_service(web::to(not_found)),
    );
}

async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route {} {}", req.method(), req.path())))
}

fn is_public(path: &str) -> bool {
    path == "/metrics" || path.starts_with("/health/")
}

/// Bearer tokens from configuration, compared in constant time. Health and metrics are public.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if !is_public(req.path()) {
        let state = req.app_data::<State>().expect("state is configured");
        let presented = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let ok = presented.is_some_and(|p| {
            state
                .settings
                .auth
                .tokens
                .iter()
                .fold(false, |acc, t| acc | bool::from(t.as_bytes().ct_eq(p.as_bytes())))
        });
        if !ok {
            let (http_req, _) = req.into_parts();
            let resp = ApiError::Unauthenticated.error_response();
            return Ok(ServiceResponse::new(http_req, resp));
        }
    }
    next.call(req).await.map(|r| r.map_into_boxed_body())
}

/// Request count and latency by route template (never the raw path: ids would explode label
/// cardinality) and status class.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let state = req.app_data::<State>().cloned();
    let method = req.method().to_string();
    let res = next.call(req).await?;
    if let Some(state) = state {
        let route = res.request().match_pattern().unwrap_or_else(|| "unmatched".to_string());
        let class = match res.status().as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let m = &state.engine.metrics;
        m.http_requests.with_label_values(&[&route, &method, class]).inc();
        m.http_request_duration
            .with_label_values(&[&route])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}

/// Parse a delivery target URL given in `field` and refuse it when it resolves to an address
/// deliveries may not reach (the registration-time half of the SSRF guard).
pub async fn check_target_url(state: &State, field: &str, raw: &str) -> Result<url::Url, ApiError> {
    let url = crate::domain::parse_target_url(field, raw, state.settings.delivery.https_only)?;
    state
        .engine
        .client()
        .policy()
        .check_url(&url)
        .await
        .map_err(|m| ApiError::field(field, m))?;
    Ok(url)
}

/// Read a request body up to `max` bytes; beyond that a typed 413 naming the limit.
pub async fn read_body(mut payload: web::Payload, max: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(format!("could not read request body: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(ApiError::TooLarge {
                max_bytes: max,
                field: None,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Debug, serde::Deserialize)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(50),
            Some(n) if (1..=1000).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::field("limit", "must be between 1 and 1000")),
        }
    }
    pub fn after(&self) -> Result<i64, ApiError> {
        crate::store::parse_cursor(self.cursor.as_deref())
    }
}

pub fn list_response<T: serde::Serialize>(results: Vec<T>, next_cursor: Option<String>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "results": results, "next_cursor": next_cursor }))
}

/// Query-string errors become typed errors naming the parameter.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _| {
        let msg = err.to_string();
        ApiError::bad(format!("invalid query string: {msg}")).into()
    })
}
