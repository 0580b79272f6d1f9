//! `/webhook`: registrations. The secret is returned on create and rotate only, never by list
//! or get.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_target_url, list_response, read_body, PageQuery, State};
use crate::domain::{check_text, limits, now_ms, parse_uuid, rfc3339_ms, valid_event_name};
use crate::error::{parse_json, ApiError};
use crate::signing::Secret;
use crate::store::{Webhook, WebhookOverrides};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWebhook {
    target_url: String,
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default = "yes")]
    is_active: bool,
    description: Option<String>,
    /// Optional: bring your own `whsec_…` secret.
    secret: Option<String>,
    #[serde(default)]
    validate_only: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateWebhook {
    target_url: Option<String>,
    event_types: Option<Vec<String>>,
    is_active: Option<bool>,
    description: Option<String>,
    /// Absent: unchanged; `null`: back to the configured settings; an object: replaces them.
    #[serde(default, deserialize_with = "present")]
    overrides: Option<Option<WebhookOverrides>>,
}

/// A field given (even as `null`) is `Some`, an absent one `None` (with `#[serde(default)]`).
/// Given, it is `null` or an object: `parse_json` refuses anything else for a struct.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Per-webhook overrides must make a valid policy together with the configured settings.
fn check_overrides(state: &State, o: &WebhookOverrides) -> Result<(), ApiError> {
    let (max_in_flight, _) = state.engine.caps();
    if let Some(n) = o.max_in_flight {
        if n == 0 || n > max_in_flight {
            return Err(ApiError::field(
                "overrides.max_in_flight",
                format!("must be between 1 and delivery.max_in_flight ({max_in_flight})"),
            ));
        }
    }
    let Some(r) = &o.retry else { return Ok(()) };
    let p = state.engine.policy_with(Some(o));
    const DAY_MS: u64 = 86_400_000;
    if r.max_attempts.is_some() && !(1..=1000).contains(&p.max_attempts) {
        return Err(ApiError::field(
            "overrides.retry.max_attempts",
            "must be between 1 and 1000",
        ));
    }
    if r.multiplier.is_some() && !(p.multiplier >= 1.0 && p.multiplier <= 100.0) {
        return Err(ApiError::field(
            "overrides.retry.multiplier",
            "must be between 1 and 100",
        ));
    }
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    if r.max_interval_ms.is_some() && !(1..=30 * DAY_MS).contains(&ms(p.max_interval)) {
        return Err(ApiError::field(
            "overrides.retry.max_interval_ms",
            "must be between 1 and 2592000000 (30 days)",
        ));
    }
    if (r.initial_interval_ms.is_some() || r.max_interval_ms.is_some())
        && (p.initial.is_zero() || p.initial > p.max_interval)
    {
        return Err(ApiError::field(
            "overrides.retry.initial_interval_ms",
            "must be between 1 and the webhook's max_interval_ms",
        ));
    }
    if r.max_elapsed_ms.is_some() && !(1..=30 * DAY_MS).contains(&ms(p.max_elapsed)) {
        return Err(ApiError::field(
            "overrides.retry.max_elapsed_ms",
            "must be between 1 and 2592000000 (30 days)",
        ));
    }
    Ok(())
}

pub fn webhook_json(w: &Webhook) -> Value {
    json!({
        "id": w.id,
        "target_url": w.target_url,
        "event_types": w.event_types,
        "is_active": w.is_active,
        "description": w.description,
        "previous_secret_expires_at": w.previous_secret.as_ref().filter(|(_, e)| *e > now_ms()).map(|(_, e)| rfc3339_ms(*e)),
        "overrides": w.overrides,
        "created_at": rfc3339_ms(w.created_at),
        "updated_at": rfc3339_ms(w.updated_at),
    })
}

fn check_event_types(types: &[String]) -> Result<(), ApiError> {
    if types.len() > limits::EVENT_TYPES {
        return Err(ApiError::field(
            "event_types",
            format!("holds more than {} event types", limits::EVENT_TYPES),
        ));
    }
    for (i, t) in types.iter().enumerate() {
        if !valid_event_name(t, true) {
            return Err(ApiError::field(
                format!("event_types[{i}]"),
                "must be an event name like sync_job_run:record, or entity:* or *",
            ));
        }
    }
    Ok(())
}

fn check_description(d: Option<&str>) -> Result<(), ApiError> {
    match d {
        Some(d) => check_text("description", d, limits::DESCRIPTION, true),
        None => Ok(()),
    }
}

fn webhook_id(raw: &str) -> Result<String, ApiError> {
    parse_uuid("id", raw).map_err(|_| ApiError::not_found("webhook", raw))
}

async fn load(state: &State, id: &str) -> Result<Webhook, ApiError> {
    let id = webhook_id(id)?;
    state
        .engine
        .store
        .get_webhook(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook", &id))
}

pub async fn create(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: CreateWebhook = parse_json(&body)?;
    check_event_types(&req.event_types)?;
    check_description(req.description.as_deref())?;
    if let Some(s) = &req.secret {
        check_text("secret", s, limits::SECRET, false)?;
    }
    let url = check_target_url(&state, "target_url", &req.target_url).await?;
    let secret = match &req.secret {
        Some(s) => Secret::parse(s).map_err(|e| ApiError::field("secret", e.to_string()))?,
        None => Secret::generate(),
    };
    if req.validate_only {
        return Ok(HttpResponse::Ok().json(json!({"valid": true})));
    }
    let now = now_ms();
    let w = Webhook {
        id: uuid::Uuid::new_v4().to_string(),
        target_url: url.to_string(),
        event_types: req.event_types,
        is_active: req.is_active,
        description: req.description,
        secret,
        previous_secret: None,
        created_at: now,
        updated_at: now,
        seq: 0,
        overrides: None,
    };
    let w = state.engine.store.insert_webhook(&w).await?;
    state.engine.webhooks.put(w.clone());
    let mut body = webhook_json(&w);
    body["secret"] = Value::String(w.secret.expose().to_string());
    Ok(HttpResponse::Created().json(body))
}

pub async fn list(state: State, q: web::Query<PageQuery>) -> Result<HttpResponse, ApiError> {
    let page = state.engine.store.list_webhooks(q.after()?, q.limit()?).await?;
    Ok(list_response(
        page.results.iter().map(webhook_json).collect(),
        page.next_cursor,
    ))
}

pub async fn get(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let w = load(&state, &id).await?;
    let mut body = webhook_json(&w);
    body["delivery"] = delivery_state(&state, &w);
    Ok(HttpResponse::Ok().json(body))
}

/// What this instance's delivery core knows of the webhook's target right now: its circuit
/// breaker, its adaptive in-flight limit, and since when it has only failed.
fn delivery_state(state: &State, w: &Webhook) -> Value {
    let (breaker, limit, failing_since) = state.engine.target_state(&format!("w:{}", w.id));
    json!({
        "breaker": breaker,
        "concurrency_limit": limit,
        "failing_since": failing_since.map(rfc3339_ms),
    })
}

pub async fn update(state: State, id: web::Path<String>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: UpdateWebhook = parse_json(&body)?;
    if let Some(t) = &req.event_types {
        check_event_types(t)?;
    }
    check_description(req.description.as_deref())?;
    if let Some(Some(o)) = &req.overrides {
        check_overrides(&state, o)?;
    }
    let mut w = load(&state, &id).await?;
    if let Some(o) = req.overrides {
        // An empty object is no override at all.
        w.overrides = o.filter(|o| *o != WebhookOverrides::default());
    }
    if let Some(u) = &req.target_url {
        w.target_url = check_target_url(&state, "target_url", u).await?.to_string();
    }
    if let Some(t) = req.event_types {
        w.event_types = t;
    }
    if let Some(a) = req.is_active {
        w.is_active = a;
    }
    if req.description.is_some() {
        w.description = req.description;
    }
    w.updated_at = now_ms();
    state.engine.store.update_webhook(&w).await?;
    state.engine.webhooks.put(w.clone());
    // A disabled webhook's pending events are held (kept, not attempted) until it is enabled.
    state.engine.targets.hold(&format!("w:{}", w.id), !w.is_active);
    if w.is_active {
        // Deliveries parked for a re-enabled webhook may be due now.
        state.engine.notify();
    }
    Ok(HttpResponse::Ok().json(webhook_json(&w)))
}

pub async fn delete(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let w = load(&state, &id).await?;
    state.engine.store.delete_webhook(&w.id).await?;
    state.engine.webhooks.remove(&w.id);
    state.engine.targets.forget(&format!("w:{}", w.id));
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EnableWebhook {
    #[serde(default)]
    replay: bool,
}

/// Enable a webhook (disabled by a 410, by prolonged failure, or by hand): its held events go
/// again in order; `{"replay": true}` also re-queues what was dead-lettered because it was
/// disabled. Answers the webhook and `replayed`.
pub async fn enable(state: State, id: web::Path<String>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, body).await?;
    let req: EnableWebhook = if body.iter().all(u8::is_ascii_whitespace) {
        EnableWebhook::default()
    } else {
        parse_json(&body)?
    };
    let w = load(&state, &id).await?;
    let (w, replayed) = state.engine.enable_webhook(w, req.replay).await?;
    let mut body = webhook_json(&w);
    body["delivery"] = delivery_state(&state, &w);
    body["replayed"] = json!(replayed);
    Ok(HttpResponse::Ok().json(body))
}

pub async fn rotate_secret(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let mut w = load(&state, &id).await?;
    let now = now_ms();
    let old = std::mem::replace(&mut w.secret, Secret::generate());
    w.previous_secret = Some((old, now + state.engine.rotation_grace_ms()));
    w.updated_at = now;
    state.engine.store.update_webhook(&w).await?;
    state.engine.webhooks.put(w.clone());
    // Subscribers (never the secret itself) learn that the signing key changed and until when
    // the previous one still signs.
    let payload = json!({
        "webhook_id": w.id,
        "rotated_at": rfc3339_ms(now),
        "previous_secret_expires_at": w.previous_secret.as_ref().map(|(_, e)| rfc3339_ms(*e)),
    });
    if let Err(e) = state
        .engine
        .broadcast("webhook:secret_rotated", payload, Some(&w.id))
        .await
    {
        tracing::error!(error = %format!("{e:#}"), "could not queue webhook:secret_rotated");
    }
    let mut body = webhook_json(&w);
    body["secret"] = Value::String(w.secret.expose().to_string());
    Ok(HttpResponse::Ok().json(body))
}

/// Send a signed `webhook:test` event now and return the attempt.
pub async fn test(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let w = load(&state, &id).await?;
    if !w.is_active {
        return Err(ApiError::Conflict(format!(
            "webhook {} is disabled (is_active=false); enable it with PATCH {{\"is_active\":true}} first",
            w.id
        )));
    }
    let url = url::Url::parse(&w.target_url).map_err(|e| ApiError::Internal(e.into()))?;
    let event_id = format!("test_{}", uuid::Uuid::now_v7().simple());
    let now = now_ms();
    let body = json!({
        "id": event_id,
        "event": "webhook:test",
        "payload": {"message": "syncrelay test event"},
        "environment_id": null,
        "created_at": rfc3339_ms(now),
        "webhook_id": w.id,
    })
    .to_string();
    let mut secrets = vec![w.secret.clone()];
    if let Some((p, until)) = &w.previous_secret {
        if *until > now {
            secrets.push(p.clone());
        }
    }
    let a = state.engine.send(&url, &secrets, &event_id, 1, body).await;
    Ok(HttpResponse::Ok().json(json!({
        "event_id": event_id,
        "delivered": a.status.is_some_and(|s| (200..300).contains(&s)),
        "attempt": {
            "status": a.status,
            "duration_ms": a.duration.as_millis() as u64,
            "response_excerpt": a.excerpt,
            "error": a.error,
        }
    })))
}
