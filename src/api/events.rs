//! `POST /events`: one event or `{"events":[…]}`; 202 once durably queued.

use actix_web::{web, HttpResponse};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::json;
use serde_json::value::RawValue;

use super::{read_body, State};
use crate::domain::{now_ms, Envelope, JsonKey};
use crate::error::{ApiError, Step};

/// `payload` of a single event or `events[i].payload` of a batch.
fn is_payload(path: &[Step<'_>]) -> bool {
    match path {
        [Step::Key(k)] => k == "payload",
        [Step::Key(e), Step::Index(_), Step::Key(k)] => e == "events" && k == "payload",
        _ => false,
    }
}

/// The members of a `POST /events` body the route reads, as their text borrowed from the body
/// (the last of a repeated key, as a map would keep; `check_duplicate_keys` refuses those first).
#[derive(Default)]
struct Top<'a> {
    events: Option<&'a RawValue>,
    validate_only: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Top<'de>, A::Error> {
                let mut top = Top::default();
                while let Some(JsonKey(key)) = m.next_key()? {
                    match key.as_ref() {
                        "events" => top.events = Some(m.next_value()?),
                        "validate_only" => top.validate_only = Some(m.next_value()?),
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(top)
            }
        }
        d.deserialize_map(Members)
    }
}

/// Split a request into raw events: a batch object `{"events":[…]}` or one event object.
/// Raw values let each event's own size be checked against `events.max_event_bytes`. They are
/// borrowed from the body, not copied (copies of the events array and then of each event were
/// part of the 6.8 % of the relay's CPU `POST /events` parsing took in the throughput profile);
/// each event's text is then read once, by `Envelope::parse_text`.
fn split(body: &[u8]) -> Result<(Vec<&RawValue>, bool, bool), ApiError> {
    // A repeated key anywhere in the envelope (not inside the producer's payload) is refused.
    crate::error::check_duplicate_keys(body, &is_payload)?;
    // Top-level keys only; each event stays raw until it is parsed on its own.
    let top: Top =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("body is not a JSON object: {e}")))?;
    let validate_only = match top.validate_only.map(RawValue::get) {
        None | Some("null" | "false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::field("validate_only", "must be a boolean")),
    };
    match top.events {
        Some(events) => {
            let events: Vec<&RawValue> = serde_json::from_str(events.get())
                .map_err(|_| ApiError::field("events", "must be an array of event objects"))?;
            Ok((events, true, validate_only))
        }
        None => {
            let raw: &RawValue = serde_json::from_slice(body).map_err(|e| ApiError::bad(e.to_string()))?;
            Ok((vec![raw], false, validate_only))
        }
    }
}

/// A parsed `POST /events` body.
pub struct EventsRequest {
    pub events: Vec<Envelope>,
    /// `{"events":[…]}` (error fields are then `events[i].…`).
    pub batch: bool,
    pub validate_only: bool,
}

/// Parse and validate a `POST /events` body as the route does before anything is queued: one
/// event or a batch, repeated keys outside payloads, the batch size, each event's size and
/// shape (`Envelope::parse_text`). Errors name the field. No I/O (callback hosts are checked later).
pub fn parse_events(
    body: &[u8],
    max_batch: usize,
    max_event_bytes: usize,
    https_only: bool,
    now: i64,
) -> Result<EventsRequest, ApiError> {
    let (raws, batch, validate_only) = split(body)?;
    if raws.is_empty() {
        return Err(ApiError::field("events", "must hold at least one event"));
    }
    if raws.len() > max_batch {
        return Err(ApiError::field("events", format!("holds more than {max_batch} events")));
    }
    let mut events = Vec::with_capacity(raws.len());
    for (i, raw) in raws.iter().enumerate() {
        let prefix = if batch { format!("events[{i}]") } else { String::new() };
        let within = |e: ApiError| if batch { e.within(&prefix) } else { e };
        if raw.get().len() > max_event_bytes {
            return Err(within(ApiError::TooLarge {
                max_bytes: max_event_bytes,
                field: Some("event".into()),
            }));
        }
        // A single event's `validate_only` is a member `parse_text` does not read.
        events.push(Envelope::parse_text(raw.get(), now, https_only).map_err(within)?);
    }
    Ok(EventsRequest {
        events,
        batch,
        validate_only,
    })
}

pub async fn ingest(state: State, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let s = &state.settings;
    let body = read_body(&state, body).await?;
    let EventsRequest {
        events,
        batch,
        validate_only,
    } = parse_events(
        &body,
        s.events.max_batch,
        s.events.max_event_bytes,
        s.delivery.https_only,
        now_ms(),
    )?;
    // Callback URLs are checked now as far as possible without DNS (IP literals, loopback
    // names); host names are resolved when they are dialled, by the guarded resolver.
    for (i, e) in events.iter().enumerate() {
        if let Some(url) = &e.callback_url {
            if let Err(m) = state.engine.client().policy().check_given(url) {
                let err = ApiError::field("callback_url", m);
                return Err(if batch {
                    err.within(&format!("events[{i}]"))
                } else {
                    err
                });
            }
        }
    }
    if validate_only {
        return Ok(HttpResponse::Ok().json(json!({"valid": true, "events": events.len()})));
    }
    if let Some(kafka) = &state.kafka {
        // Kafka mode: the events topic is the queue; routing happens when it is consumed.
        let produced = futures_util::future::join_all(events.iter().map(|e| kafka.produce_event(e))).await;
        for (i, r) in produced.into_iter().enumerate() {
            if let Err(e) = r {
                tracing::error!(error = %format!("{e:#}"), "producing an event failed");
                return Err(ApiError::Unavailable(format!(
                    "the bus did not acknowledge events[{i}] (events before it were produced; resend the batch, ids make duplicates harmless)"
                )));
            }
        }
        let results: Vec<_> = events
            .iter()
            .map(|e| json!({"id": e.id, "status": "produced", "deliveries": null}))
            .collect();
        return Ok(HttpResponse::Accepted().json(json!({ "accepted": results.len(), "events": results })));
    }
    let routed = state.engine.ingest(&events, "api").await?;
    Ok(HttpResponse::Accepted().json(json!({ "accepted": routed.len(), "events": routed })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11";

    fn event(id: &str) -> String {
        format!(r#"{{"id":"{id}","event":"x:y","webhook_id":"{RUN}","payload":{{"a":1}}}}"#)
    }

    fn refusal(body: &str) -> (Option<String>, String) {
        match parse_events(body.as_bytes(), 10, 1024, false, 0) {
            Err(ApiError::BadRequest { field, message }) => (field, message),
            Err(other) => panic!("{body}: {other:?}"),
            Ok(_) => panic!("{body}: accepted"),
        }
    }

    /// The top level is read from the body without copying it; what it accepts and how it
    /// refuses are what a map of its members gave.
    #[test]
    fn the_body_is_split_as_a_map_of_its_members_split_it() {
        let one = event("e1");
        let r = parse_events(format!(" {one}\n").as_bytes(), 10, one.len(), false, 0).unwrap();
        assert!(!r.batch && !r.validate_only && r.events.len() == 1);
        let body = format!(
            r#"{{"ev\u0065nts":[{}, {}],"validate_only":true,"other":[1e400]}}"#,
            one,
            event("e2")
        );
        let r = parse_events(body.as_bytes(), 10, one.len(), false, 0).unwrap();
        assert!(r.batch && r.validate_only);
        assert_eq!(r.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e1", "e2"]);
        let single = one.replacen('{', r#"{"validate_only":null,"#, 1);
        assert!(
            !parse_events(single.as_bytes(), 10, 1024, false, 0)
                .unwrap()
                .validate_only
        );

        assert_eq!(refusal(r#"{"events":null}"#).0.as_deref(), Some("events"));
        assert_eq!(refusal(r#"{"events":{}}"#).0.as_deref(), Some("events"));
        assert_eq!(refusal(r#"{"events":[]}"#).0.as_deref(), Some("events"));
        assert_eq!(refusal(r#"{"events":[1]}"#).0.as_deref(), Some("events[0]"));
        let bad = one.replacen('{', r#"{"validate_only":"yes","#, 1);
        assert_eq!(refusal(&bad).0.as_deref(), Some("validate_only"));
        let (field, message) = refusal("[1]");
        assert_eq!(field, None);
        assert!(
            message.starts_with("body is not a JSON object: invalid type: sequence, expected a map"),
            "{message}"
        );
        let big = format!(r#"{{"events":[{one},{}]}}"#, event(&"x".repeat(100)));
        match parse_events(big.as_bytes(), 10, one.len(), false, 0) {
            Err(ApiError::TooLarge { field, .. }) => assert_eq!(field.as_deref(), Some("events[1]")),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("accepted"),
        }
    }
}
