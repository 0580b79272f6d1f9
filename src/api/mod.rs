//! The HTTP API (CONTRACT §3). One file per resource; this one holds what they share: state,
//! bearer authentication, request metrics, body reading with a typed 413, list paging.

mod devrev;
mod eloqua;
mod events;
mod openapi;
mod ops;
mod sync_job_runs;
mod sync_jobs;
mod syncs;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse, ResponseError, Route};
use futures_util::StreamExt;
use subtle::ConstantTimeEq;

use crate::config::Settings;
use crate::delivery::engine::Engine;
use crate::error::ApiError;

pub struct AppState {
    pub settings: Settings,
    pub engine: Arc<Engine>,
    /// Where run commands are published for executors.
    pub commands: Arc<dyn crate::runs::commands::CommandSink>,
    /// Set when `bus.kind = "kafka"`: `POST /events` produces to the events topic.
    pub kafka: Option<Arc<crate::intake::kafka::KafkaBus>>,
    /// SHA-256 digests of `auth.tokens` (see `token_matches`).
    pub token_digests: Vec<[u8; 32]>,
    /// `http.rate_limit`, when on.
    pub rate_limiter: Option<RateLimiter>,
    /// The query parameters each operation takes (from the OpenAPI document).
    pub query_params: QueryParams,
}

pub type State = web::Data<AppState>;

pub use events::{parse_events, EventsRequest};

/// Every route of the API: (method, path template, handler). `configure` registers exactly
/// these and nothing else; the OpenAPI document (`openapi.rs`) documents exactly these
/// (`tests/openapi.rs` checks both ways).
fn routes() -> Vec<(Method, &'static str, Route)> {
    vec![
        (Method::GET, "/health/live", web::to(ops::live)),
        (Method::GET, "/health/ready", web::to(ops::ready)),
        (Method::GET, "/metrics", web::to(ops::metrics)),
        (Method::GET, "/openapi.json", web::to(openapi::serve)),
        (Method::POST, "/webhook", web::to(webhooks::create)),
        (Method::GET, "/webhook", web::to(webhooks::list)),
        (Method::GET, "/webhook/{id}", web::to(webhooks::get)),
        (Method::PATCH, "/webhook/{id}", web::to(webhooks::update)),
        (Method::DELETE, "/webhook/{id}", web::to(webhooks::delete)),
        (
            Method::POST,
            "/webhook/{id}/rotate-secret",
            web::to(webhooks::rotate_secret),
        ),
        (Method::POST, "/webhook/{id}/test", web::to(webhooks::test)),
        (Method::POST, "/webhook/{id}/enable", web::to(webhooks::enable)),
        (Method::POST, "/events", web::to(events::ingest)),
        (Method::GET, "/deliveries", web::to(ops::list_deliveries)),
        (Method::GET, "/deliveries/{id}", web::to(ops::get_delivery)),
        (Method::GET, "/dead-letters", web::to(ops::list_dead_letters)),
        (Method::POST, "/dead-letters/replay", web::to(ops::replay_dead_letters)),
        (Method::GET, "/sync-job-run-commands", web::to(ops::list_commands)),
        (Method::POST, "/sync-job", web::to(sync_jobs::create)),
        (Method::GET, "/sync-job", web::to(sync_jobs::list)),
        (Method::GET, "/sync-job/{id}", web::to(sync_jobs::get)),
        (Method::PATCH, "/sync-job/{id}", web::to(sync_jobs::update)),
        (Method::DELETE, "/sync-job/{id}", web::to(sync_jobs::delete)),
        (Method::POST, "/sync-job-run", web::to(sync_job_runs::create)),
        (Method::GET, "/sync-job-run", web::to(sync_job_runs::list)),
        (Method::GET, "/sync-job-run/{id}", web::to(sync_job_runs::get)),
        (Method::PATCH, "/sync-job-run/{id}", web::to(sync_job_runs::update)),
        (Method::DELETE, "/sync-job-run/{id}", web::to(sync_job_runs::delete)),
        (Method::POST, "/api/bulk/2.0/syncs", web::to(eloqua::create)),
        (Method::GET, "/api/bulk/2.0/syncs", web::to(eloqua::list)),
        (Method::GET, "/api/bulk/2.0/syncs/{id}", web::to(eloqua::get)),
        (Method::GET, "/api/bulk/2.0/syncs/{id}/logs", web::to(eloqua::logs)),
        (
            Method::POST,
            "/airdrop.sync-units.create.bulk",
            web::to(devrev::create_bulk),
        ),
        (Method::GET, "/airdrop.sync-units.get", web::to(devrev::get)),
        (Method::GET, "/airdrop.sync-units.list", web::to(devrev::list)),
        (Method::POST, "/airdrop.sync-units.update", web::to(devrev::update)),
        (Method::POST, "/syncs", web::to(syncs::create)),
        (Method::GET, "/syncs", web::to(syncs::list)),
        (Method::GET, "/syncs/{id}", web::to(syncs::get)),
        (Method::PATCH, "/syncs/{id}", web::to(syncs::update)),
        (Method::DELETE, "/syncs/{id}", web::to(syncs::delete)),
    ]
}

/// `(METHOD, path template)` of every route `configure` registers.
pub fn route_table() -> Vec<(String, String)> {
    routes()
        .into_iter()
        .map(|(m, p, _)| (m.as_str().to_string(), p.to_string()))
        .collect()
}

/// The OpenAPI 3.1 document of the API for these settings (served at `GET /openapi.json`).
pub fn openapi_document(settings: &Settings) -> serde_json::Value {
    openapi::document(settings)
}

/// `(METHOD, path template)` of every operation in an OpenAPI document.
pub fn documented_operations(doc: &serde_json::Value) -> Vec<(String, String)> {
    openapi::documented_operations(doc)
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Wrapped last runs first: observe, then authenticate, then the query parameter check.
    let mut scope = web::scope("")
        .wrap(from_fn(known_query_parameters))
        .wrap(from_fn(authenticate))
        .wrap(from_fn(observe));
    for (method, path, route) in routes() {
        scope = scope.route(path, route.method(method));
    }
    cfg.service(scope.default_service(web::to(not_found)));
}

/// No route matched: 405 with `Allow` when the path is a route's under another method (RFC 9110
/// §15.5.6), else 404.
async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    let allowed = allowed_methods(req.path());
    if !allowed.is_empty() {
        return Err(ApiError::MethodNotAllowed {
            method: method_label(req.method()).to_string(),
            allowed,
        });
    }
    Err(ApiError::NotFound(format!("no route {} {}", req.method(), req.path())))
}

/// The methods routed for a path (empty when no route template matches it).
pub fn allowed_methods(path: &str) -> Vec<String> {
    let mut allowed: Vec<String> = route_table()
        .into_iter()
        .filter(|(_, template)| actix_web::dev::ResourceDef::new(template.as_str()).is_match(path))
        .map(|(m, _)| m)
        .collect();
    allowed.dedup();
    allowed
}

fn is_public(path: &str) -> bool {
    path == "/metrics" || path == "/openapi.json" || path.starts_with("/health/")
}

/// The token of an `Authorization` header value: scheme `Bearer` in any case (RFC 9110 §11.1),
/// one or more spaces, the token.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim_start().split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// SHA-256 of a token: tokens are compared by digest, so the comparison takes the same time
/// whatever the presented token's length and wherever it first differs.
pub fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Does `presented` match one of the configured tokens' digests? Every digest is compared (no
/// early exit), each in constant time.
pub fn token_matches(digests: &[[u8; 32]], presented: &str) -> bool {
    token_index(digests, presented).is_some()
}

/// Which configured token `presented` is (its index in `auth.tokens`), compared as in
/// `token_matches`.
pub fn token_index(digests: &[[u8; 32]], presented: &str) -> Option<usize> {
    use subtle::ConditionallySelectable;
    let p = token_digest(presented);
    let mut found = subtle::Choice::from(0);
    let mut index = 0u64;
    for (i, d) in digests.iter().enumerate() {
        let eq = d.ct_eq(&p);
        index.conditional_assign(&(i as u64), eq);
        found |= eq;
    }
    bool::from(found).then_some(index as usize)
}

/// `http.rate_limit`: one token bucket per configured API token (so the state is bounded by
/// the configuration, never by what clients send).
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: std::sync::Mutex<Vec<(f64, Instant)>>,
}

impl RateLimiter {
    /// `None` when the limit is off.
    pub fn new(s: &crate::config::RateLimitSettings, tokens: usize) -> Option<RateLimiter> {
        if s.per_second <= 0.0 {
            return None;
        }
        let burst = if s.burst == 0 {
            s.per_second.ceil()
        } else {
            f64::from(s.burst)
        }
        .max(1.0);
        Some(RateLimiter {
            per_second: s.per_second,
            burst,
            buckets: std::sync::Mutex::new(vec![(burst, Instant::now()); tokens]),
        })
    }

    /// Take one request from token `i`'s bucket; `Err(seconds)` to wait when it is empty.
    pub fn take(&self, i: usize, now: Instant) -> Result<(), u64> {
        let mut b = self.buckets.lock().expect("lock");
        let Some((level, at)) = b.get_mut(i) else {
            return Ok(());
        };
        *level = (*level + now.saturating_duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - *level) / self.per_second).ceil() as u64).max(1))
        }
    }
}

/// Bearer tokens from configuration, compared in constant time. Health and metrics are public.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if !is_public(req.path()) {
        let state = req.app_data::<State>().expect("state is configured");
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .and_then(|p| token_index(&state.token_digests, p));
        let refused = match (token, &state.rate_limiter) {
            (None, _) => Some(ApiError::Unauthenticated),
            (Some(i), Some(limiter)) => limiter.take(i, Instant::now()).err().map(|retry_after| {
                state.engine.metrics.http_rate_limited.inc();
                ApiError::TooManyRequests { retry_after }
            }),
            (Some(_), None) => None,
        };
        if let Some(e) = refused {
            let (http_req, _) = req.into_parts();
            return Ok(ServiceResponse::new(http_req, e.error_response()));
        }
    }
    next.call(req).await.map(|r| r.map_into_boxed_body())
}

/// The query parameters each operation takes, read from the OpenAPI document so that what is
/// documented and what is accepted cannot drift: `(method, path template, names)`.
pub struct QueryParams(Vec<(Method, actix_web::dev::ResourceDef, Vec<String>)>);

impl QueryParams {
    pub fn from_document(doc: &serde_json::Value) -> QueryParams {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let Ok(method) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
                    continue;
                };
                let names = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect();
                out.push((method, actix_web::dev::ResourceDef::new(path.as_str()), names));
            }
        }
        QueryParams(out)
    }

    /// The parameters of the operation at `method path`, or None when no operation is there.
    fn of(&self, method: &Method, path: &str) -> Option<&[String]> {
        self.0
            .iter()
            .find(|(m, def, _)| m == method && def.is_match(path))
            .map(|(_, _, names)| names.as_slice())
    }
}

/// A query parameter an operation does not take is refused (400 naming it), as an unknown body
/// field is: a misspelt filter (`?stauts=dead`) silently ignored would answer with everything.
async fn known_query_parameters(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    // Most requests (every POST /events) carry no query: nothing to look up.
    if !req.query_string().is_empty() {
        let state = req.app_data::<State>().expect("state is configured");
        if let Some(known) = state.query_params.of(req.method(), req.path()) {
            let unknown = url::form_urlencoded::parse(req.query_string().as_bytes())
                .map(|(name, _)| name)
                .find(|name| !known.iter().any(|k| k == name));
            if let Some(name) = unknown {
                let takes = if known.is_empty() {
                    "this operation takes no query parameters".to_string()
                } else {
                    format!("this operation takes {}", known.join(", "))
                };
                let e = ApiError::field(name.to_string(), format!("unknown query parameter; {takes}"));
                let (http_req, _) = req.into_parts();
                return Ok(ServiceResponse::new(http_req, e.error_response()));
            }
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
    let method = method_label(req.method());
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
        m.http_requests.with_label_values(&[&route, method, class]).inc();
        m.http_request_duration
            .with_label_values(&[&route])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}

/// The `method` label: the standard methods by name, anything else `other` (a client may send
/// any token as a method; the label must stay a small fixed set, CONTRACT §5).
pub fn method_label(m: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method as M;
    match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::PATCH => "PATCH",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
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

/// Read a request body up to `http.max_body_bytes` (beyond that a typed 413 naming the limit)
/// within `http.body_read_timeout_ms` (a client that sends its headers and then trickles the
/// body is answered 408 and its connection closed).
pub async fn read_body(state: &State, mut payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    let max = state.settings.http.max_body_bytes;
    let timeout_ms = state.settings.http.body_read_timeout_ms;
    let read = async {
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
    };
    match tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), read).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::RequestTimeout { timeout_ms }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for h in ["Bearer t", "bearer t", "BEARER t", "BeArEr   t ", "Bearer\tt"] {
            assert_eq!(bearer_token(h), Some("t"), "{h:?}");
        }
        for h in ["Basic t", "Bearer", "Bearer ", "Bearert", "t", ""] {
            assert_eq!(bearer_token(h), None, "{h:?}");
        }
    }

    #[test]
    fn tokens_are_compared_by_digest() {
        let digests = vec![token_digest("first-token"), token_digest("second-token")];
        assert!(token_matches(&digests, "first-token"));
        assert!(token_matches(&digests, "second-token"));
        for p in ["", "f", "first-toke", "first-token2", "first-tokeN", "second-token "] {
            assert!(!token_matches(&digests, p), "{p:?}");
        }
        assert!(!token_matches(&[], "first-token"));
        assert_eq!(token_index(&digests, "second-token"), Some(1));
        assert_eq!(token_index(&digests, "first-token"), Some(0));
    }

    #[test]
    fn rate_limit_buckets_refill_per_token() {
        let s = crate::config::RateLimitSettings {
            per_second: 2.0,
            burst: 3,
        };
        let l = RateLimiter::new(&s, 2).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            l.take(0, t0).unwrap();
        }
        assert_eq!(l.take(0, t0), Err(1));
        l.take(1, t0).unwrap(); // another token has its own bucket
        l.take(0, t0 + std::time::Duration::from_millis(500)).unwrap();
        assert!(l.take(0, t0 + std::time::Duration::from_millis(500)).is_err());
        assert!(RateLimiter::new(
            &crate::config::RateLimitSettings {
                per_second: 0.0,
                burst: 5
            },
            1
        )
        .is_none());
    }
}
