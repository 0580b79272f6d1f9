//! Delivery log, dead letters, health and metrics.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{list_response, read_body, PageQuery, State};
use crate::domain::{check_text, limits, now_ms, rfc3339_ms, Envelope};
use crate::error::{parse_json, ApiError};
use crate::store::{AttemptRow, CommandRow, DeadLetterFilter, DeadLetterRow, DeliveryFilter, DeliveryRow};

fn opt_time(ms: Option<i64>) -> Value {
    ms.map(|m| Value::String(rfc3339_ms(m))).unwrap_or(Value::Null)
}

/// JSON text stored by the relay, as JSON (null should it not parse).
fn parsed(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn delivery_json(d: &DeliveryRow) -> Value {
    json!({
        "id": d.id,
        "event_id": d.event_id,
        "event": d.event,
        "sync_job_run_id": d.run_id,
        "kind": d.kind,
        "webhook_id": d.webhook_id,
        // The API's names for the queue states.
        "status": match d.state.as_str() {
            "waiting" => "queued",
            "ready" => "pending",
            other => other,
        },
        "attempts_made": d.attempts,
        "next_attempt_at": if d.finished_at.is_some() { Value::Null } else { opt_time(Some(d.next_attempt_at)) },
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": rfc3339_ms(d.created_at),
        "finished_at": opt_time(d.finished_at),
    })
}

fn attempt_json(a: &AttemptRow) -> Value {
    json!({
        "attempt": a.n,
        "started_at": rfc3339_ms(a.started_at),
        "duration_ms": a.duration_ms,
        "status": a.status,
        "error": a.error,
        "response_excerpt": a.response_excerpt,
    })
}

fn dead_letter_json(d: &DeadLetterRow) -> Value {
    json!({
        "id": d.id,
        "delivery_id": d.delivery_id,
        "event_id": d.event_id,
        "event": d.event,
        "webhook_id": d.webhook_id,
        "kind": d.kind,
        "reason": d.reason,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "event_body": parsed(&d.raw),
        "created_at": rfc3339_ms(d.created_at),
        "replayed_at": opt_time(d.replayed_at),
    })
}

fn command_json(c: &CommandRow) -> Value {
    json!({
        "key": c.key,
        "command": parsed(&c.command),
        "created_at": rfc3339_ms(c.created_at),
    })
}

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready when the store and the bus answer a real round trip (Kafka: a metadata request).
pub async fn ready(state: State) -> Result<HttpResponse, ApiError> {
    if let Err(e) = state.engine.store.ping().await {
        return Err(ApiError::Unavailable(format!("store: {e}")));
    }
    match &state.kafka {
        Some(k) => match k.ping().await {
            Ok(()) => Ok(HttpResponse::Ok().json(json!({"status": "ok", "store": "ok", "bus": "kafka"}))),
            Err(e) => Err(ApiError::Unavailable(format!("bus: {e}"))),
        },
        None => Ok(HttpResponse::Ok().json(json!({"status": "ok", "store": "ok", "bus": "embedded"}))),
    }
}

pub async fn metrics(state: State) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.engine.metrics.render())
}

pub async fn list_deliveries(
    state: State,
    page: web::Query<PageQuery>,
    filter: web::Query<DeliveryFilter>,
) -> Result<HttpResponse, ApiError> {
    let mut f = filter.into_inner();
    for (name, v) in [
        ("event_id", &f.event_id),
        ("webhook_id", &f.webhook_id),
        ("sync_job_run_id", &f.sync_job_run_id),
    ] {
        if let Some(v) = v {
            check_text(name, v, limits::ID, false)?;
        }
    }
    if let Some(s) = &f.status {
        // The API's names for the queue states.
        f.status = Some(
            match s.as_str() {
                "pending" => "ready",
                "queued" => "waiting",
                "delivered" | "dead" | "dropped" | "paused" => s.as_str(),
                _ => {
                    return Err(ApiError::field(
                        "status",
                        "must be one of pending, queued, paused, delivered, dead, dropped",
                    ))
                }
            }
            .to_string(),
        );
    }
    let p = state
        .engine
        .store
        .list_deliveries(&f, page.after()?, page.limit()?)
        .await?;
    Ok(list_response(
        p.results.iter().map(delivery_json).collect(),
        p.next_cursor,
    ))
}

pub async fn get_delivery(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let store = &state.engine.store;
    let Some(row) = store.get_delivery(&id).await? else {
        return Err(ApiError::not_found("delivery", &id));
    };
    let attempts = store.list_attempts(&id).await?;
    let mut d = delivery_json(&row);
    d["attempts"] = attempts.iter().map(attempt_json).collect();
    d["body"] = parsed(&row.body);
    Ok(HttpResponse::Ok().json(d))
}

pub async fn list_dead_letters(
    state: State,
    page: web::Query<PageQuery>,
    filter: web::Query<DeadLetterFilter>,
) -> Result<HttpResponse, ApiError> {
    check_dead_letter_filter(&filter)?;
    let p = state
        .engine
        .store
        .list_dead_letters(&filter, page.after()?, page.limit()?)
        .await?;
    Ok(list_response(
        p.results.iter().map(dead_letter_json).collect(),
        p.next_cursor,
    ))
}

fn check_dead_letter_filter(f: &DeadLetterFilter) -> Result<(), ApiError> {
    for (name, v) in [
        ("webhook_id", &f.webhook_id),
        ("reason", &f.reason),
        ("event_id", &f.event_id),
    ] {
        if let Some(v) = v {
            check_text(name, v, limits::ID, false)?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    ids: Option<Vec<String>>,
    webhook_id: Option<String>,
    reason: Option<String>,
    event_id: Option<String>,
    #[serde(default, deserialize_with = "integral")]
    limit: Option<i64>,
}

/// An integer given as a JSON number: `5` and `5.0` alike (JSON Schema's `integer` is any number
/// without a fractional part, so clients generated from the OpenAPI document may send either).
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    n.as_i64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= 9.0e15)
                .map(|f| f as i64)
        })
        .or_else(|| n.as_u64().map(|_| i64::MAX))
        .map(Some)
        .ok_or_else(|| D::Error::custom("must be an integer"))
}

/// Re-drive dead letters with the same `webhook-id`: by id, or every open one matching a filter.
pub async fn replay_dead_letters(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: Replay = parse_json(&body)?;
    if req.ids.is_none() && req.webhook_id.is_none() && req.reason.is_none() && req.event_id.is_none() {
        return Err(ApiError::field(
            "ids",
            "name dead letters by ids, or filter by webhook_id, reason or event_id",
        ));
    }
    if let Some(ids) = &req.ids {
        if ids.len() > limits::REPLAY_IDS {
            return Err(ApiError::field(
                "ids",
                format!("holds more than {} ids; replay in pages", limits::REPLAY_IDS),
            ));
        }
        for (i, id) in ids.iter().enumerate() {
            check_text(&format!("ids[{i}]"), id, limits::ID, false)?;
        }
    }
    let limit = req.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 10000"));
    }
    let filter = DeadLetterFilter {
        webhook_id: req.webhook_id,
        reason: req.reason,
        event_id: req.event_id,
        include_replayed: false,
    };
    check_dead_letter_filter(&filter)?;
    let now = now_ms();
    let (requeued, raws) = state
        .engine
        .replay_dead_letters(req.ids.as_deref(), &filter, limit, now)
        .await?;
    // Unroutable events are routed again: their webhook may exist now.
    let mut envelopes = Vec::new();
    for raw in raws {
        if let Ok(e) = Envelope::parse_text(&raw, now, false) {
            envelopes.push(e);
        }
    }
    let rerouted = state.engine.ingest(&envelopes, "api").await?;
    state.engine.notify();
    let total = requeued as usize + rerouted.len();
    state.engine.metrics.dead_letters_replayed.inc_by(total as u64);
    Ok(HttpResponse::Accepted().json(json!({"replayed": total, "requeued": requeued, "rerouted": rerouted})))
}

/// Run commands published in embedded mode, for executors to poll (Kafka mode publishes them to
/// the commands topic instead).
pub async fn list_commands(state: State, page: web::Query<PageQuery>) -> Result<HttpResponse, ApiError> {
    let p = state.engine.store.list_commands(page.after()?, page.limit()?).await?;
    Ok(list_response(
        p.results.iter().map(command_json).collect(),
        p.next_cursor,
    ))
}
