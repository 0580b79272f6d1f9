//! Parsed, valid types: handlers and the delivery engine only ever see these.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use url::Url;

use crate::error::ApiError;

/// Field limits of the API (CONTRACT §3, "Field limits"). Lengths count characters.
pub mod limits {
    /// Any URL: `target_url`, `callback_url`, `callbackURL`.
    pub const URL: usize = 2048;
    /// Webhook `description`.
    pub const DESCRIPTION: usize = 1024;
    /// Names and keys: `integration_name`, `environment_id`, `daemon_group_key`, resource names,
    /// `loop_on`, `depends_on`, filters given in a query string.
    pub const NAME: usize = 256;
    /// A resource's `method`.
    pub const METHOD: usize = 64;
    /// A resource's `id` (a template with placeholders).
    pub const RESOURCE_ID: usize = 1024;
    /// A resource's `query`, as compact JSON bytes.
    pub const QUERY_BYTES: usize = 16 * 1024;
    /// `args_schema` of a job and `args` of a run, as compact JSON bytes.
    pub const SCHEMA_BYTES: usize = 64 * 1024;
    /// A webhook's `event_types`.
    pub const EVENT_TYPES: usize = 100;
    /// A webhook's own `secret`.
    pub const SECRET: usize = 256;
    /// Eloqua's `syncedInstanceUri`.
    pub const URI: usize = 2048;
    /// `ids` of `POST /dead-letters/replay`, and each id's length.
    pub const REPLAY_IDS: usize = 10_000;
    pub const ID: usize = 128;
}

/// A string field within `max` characters and without control characters (`multiline` lets
/// newlines and tabs through, for free text).
pub fn check_text(field: &str, s: &str, max: usize, multiline: bool) -> Result<(), ApiError> {
    if s.chars().count() > max {
        return Err(ApiError::field(field, format!("is longer than {max} characters")));
    }
    if s.chars()
        .any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\r' | '\t')))
    {
        return Err(ApiError::field(field, "must not contain control characters"));
    }
    Ok(())
}

/// A JSON value no larger than `max` bytes written compactly.
pub fn check_json_size(field: &str, v: &Value, max: usize) -> Result<(), ApiError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = serde_json::to_writer(&mut n, v);
    if n.0 > max {
        return Err(ApiError::field(field, format!("is larger than {max} bytes as JSON")));
    }
    Ok(())
}

pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The first millisecond at or after `d` from now. Due times are whole milliseconds and are
/// compared with `now_ms()`, which rounds down; rounding this one down too would let a retry go
/// up to a millisecond before its backoff has passed.
pub fn ms_after(d: std::time::Duration) -> i64 {
    let at = OffsetDateTime::now_utc().unix_timestamp_nanos() + d.as_nanos() as i128;
    at.div_euclid(1_000_000) as i64 + i64::from(at.rem_euclid(1_000_000) != 0)
}

/// `2026-11-25T10:00:00.000Z`: RFC 3339, UTC, milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z: the instants `rfc3339_ms` can write.
pub const MIN_TIME_MS: i64 = -62_167_219_200_000;
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

pub fn parse_uuid(field: &str, s: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ApiError::field(field, "must be a UUID"))
}

fn valid_event_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `<entity>:<action>`, each part `[a-z0-9_]+`; `*` is allowed as the action in subscriptions.
pub fn valid_event_name(s: &str, allow_wildcard: bool) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 64
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    match s.split_once(':') {
        Some((e, a)) => part(e) && (part(a) || (allow_wildcard && a == "*")),
        None => allow_wildcard && s == "*",
    }
}

/// Does a subscription list (empty = everything) include `event`?
pub fn subscribed(event_types: &[String], event: &str) -> bool {
    event_types.is_empty()
        || event_types
            .iter()
            .any(|t| t == "*" || t == event || (t.ends_with(":*") && event.split(':').next() == t.split(':').next()))
}

/// An event's payload: the bytes it came with and, only when something asks, their parsed form.
///
/// `POST /events` parsing was 6.8 % of the relay's CPU in the throughput profile: each payload
/// was parsed into a `Map` (an allocation per object and string), scanned again for its bytes,
/// and deep-cloned for each routed run event, while the relay reads a payload only for run
/// bookkeeping (`resource`), Census-style mappings, batches of record errors and `to_json`. So
/// the bytes are kept as given (compacted) and parsed on first use; clones share both.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The payload's JSON text as it was given (compacted: whitespace outside strings removed),
    /// when the event came from outside (the API, a Kafka message, a replayed dead letter). The
    /// delivery body and the stored event carry these bytes, so big or negative-zero numbers,
    /// exponents, key order and repeated keys reach the receiver as sent (CONTRACT §1). `None`
    /// for a payload the relay made or transformed ([`Payload::made`]): the map is written then.
    raw: Option<Arc<Box<RawValue>>>,
    /// The parsed form, set at construction for made payloads and on first use for given ones.
    parsed: OnceLock<Arc<Map<String, Value>>>,
}

impl Payload {
    /// A payload the relay builds or transforms itself: the map is what is delivered.
    pub fn made(map: Map<String, Value>) -> Payload {
        Payload {
            raw: None,
            parsed: OnceLock::from(Arc::new(map)),
        }
    }

    /// A payload's given bytes: a JSON object's text that [`check_json`] accepted (only
    /// `Envelope::parse_text` makes these), so its lazy parse cannot fail.
    fn given(raw: Arc<Box<RawValue>>) -> Payload {
        Payload {
            raw: Some(raw),
            parsed: OnceLock::new(),
        }
    }

    /// The bytes the payload came with, compacted; `None` for a made payload.
    pub fn raw(&self) -> Option<&RawValue> {
        self.raw.as_deref().map(|b| &**b)
    }

    /// The parsed payload, parsed on first use.
    pub fn map(&self) -> &Map<String, Value> {
        self.parsed.get_or_init(|| {
            let text = self.raw().map_or("{}", RawValue::get);
            // Never fails: the bytes were checked at intake for everything a `Value` parse
            // refuses (`Envelope::parse_text`: syntax, an object, numbers' range, surrogate
            // escapes, nesting). Should that ever not hold, an empty map beats a panic.
            Arc::new(serde_json::from_str(text).unwrap_or_else(|e| {
                tracing::error!(error = %e, "a payload checked at intake did not parse; read as empty");
                Map::new()
            }))
        })
    }

    /// `resource` of the payload when it is a string (what a run counts records by), as
    /// `map().get("resource").and_then(Value::as_str)` says. Every record of a known run asks
    /// this, so it reads just that member from the bytes, skipping the rest without building
    /// a map; when that targeted read fails (`resource` repeated, where the last one wins, or
    /// not a string) the parsed form answers.
    pub fn resource(&self) -> Option<Cow<'_, str>> {
        if let (Some(raw), None) = (&self.raw, self.parsed.get()) {
            if let Ok(only) = serde_json::from_str::<ResourceOnly>(raw.get()) {
                return only.resource;
            }
        }
        self.map().get("resource").and_then(Value::as_str).map(Cow::Borrowed)
    }
}

/// A payload's text read for its `resource` member alone, the rest skipped without a map (a
/// string, borrowed unless it holds escapes; the read fails when `resource` is something else
/// or repeated). Run bookkeeping reads it from an event's payload ([`Payload::resource`]) and
/// from a delivery body's (`delivery::attempt::payload_resource`).
#[derive(serde::Deserialize)]
pub(crate) struct ResourceOnly<'a> {
    #[serde(borrow)]
    pub resource: Option<Cow<'a, str>>,
}

/// One valid event (CONTRACT §1).
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub event: String,
    pub sync_job_run_id: Option<String>,
    pub webhook_id: Option<String>,
    pub callback_url: Option<Url>,
    pub environment_id: Option<String>,
    pub created_at_ms: i64,
    /// Code that changes the payload for delivery makes a new one ([`Payload::made`]), so the
    /// given bytes are not sent with it.
    pub payload: Payload,
    /// Made by the relay itself (a batch of record errors, a synthesized `failed`, a run the
    /// API stopped or deleted, operational events): its run's lifecycle already decided on it.
    /// Only code sets this — `parse_text` (every way in: the API, Kafka, replay) always leaves
    /// it false — so a client cannot claim it, whatever id it picks (an id starting with the
    /// relay's own `sr_<run>_` prefix gets the rules like any other).
    pub relay_made: bool,
}

/// An object key, borrowed from the JSON text unless it holds escapes.
pub(crate) struct JsonKey<'a>(pub Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for JsonKey<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key;
        impl<'de> serde::de::Visitor<'de> for Key {
            type Value = JsonKey<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<JsonKey<'de>, E> {
                Ok(JsonKey(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<JsonKey<'de>, E> {
                Ok(JsonKey(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(Key)
    }
}

/// The members of an event object the relay reads, as their JSON text borrowed from the event's
/// text (the last of a repeated key, as a parsed map would keep). Every member's text, read or
/// not, has passed [`check_json`], except the last `payload`'s: [`compact_checked`] checks that
/// one as it compacts it.
#[derive(Default)]
struct EventMembers<'a> {
    id: Option<&'a RawValue>,
    event: Option<&'a RawValue>,
    sync_job_run_id: Option<&'a RawValue>,
    webhook_id: Option<&'a RawValue>,
    callback_url: Option<&'a RawValue>,
    environment_id: Option<&'a RawValue>,
    created_at: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
}

impl<'a> EventMembers<'a> {
    /// Read an event's JSON text. Refuses what `serde_json::from_str::<Value>` refuses, with its
    /// message (syntax) or naming the member ([`JsonProblem`]), and a JSON value that is not an
    /// object.
    fn read(text: &'a str) -> Result<EventMembers<'a>, ApiError> {
        use serde::de::{Deserializer as _, MapAccess, Visitor};
        if !text.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{') {
            // Not an object: a syntax error is named as before, else the shape is.
            return Err(match serde_json::from_str::<Value>(text) {
                Err(e) => ApiError::bad(e.to_string()),
                Ok(_) => ApiError::bad("an event must be a JSON object"),
            });
        }
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Result<EventMembers<'de>, ApiError>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = EventMembers::default();
                // The first member whose text a `Value` parse would refuse; the rest of the
                // object is still read (a syntax error after it is reported instead).
                let mut problem: Option<ApiError> = None;
                while let Some(JsonKey(key)) = m.next_key()? {
                    let value: &'de RawValue = m.next_value()?;
                    let (slot, name) = match key.as_ref() {
                        "id" => (&mut out.id, "id"),
                        "event" => (&mut out.event, "event"),
                        "sync_job_run_id" => (&mut out.sync_job_run_id, "sync_job_run_id"),
                        "webhook_id" => (&mut out.webhook_id, "webhook_id"),
                        "callback_url" => (&mut out.callback_url, "callback_url"),
                        "environment_id" => (&mut out.environment_id, "environment_id"),
                        "created_at" => (&mut out.created_at, "created_at"),
                        "payload" => {
                            // The payload is checked once it is known to be the last one
                            // (its check compacts it); one it replaces is checked now.
                            if let Some(earlier) = out.payload.replace(value) {
                                if problem.is_none() {
                                    problem = check_json(earlier.get(), 1).err().map(|p| p.at("payload"));
                                }
                            }
                            continue;
                        }
                        _ => {
                            if problem.is_none() {
                                problem = check_json(value.get(), 1).err().map(|p| p.within_event());
                            }
                            continue;
                        }
                    };
                    *slot = Some(value);
                    if problem.is_none() {
                        problem = check_json(value.get(), 1).err().map(|p| p.at(name));
                    }
                }
                Ok(match problem {
                    Some(p) => Err(p),
                    None => Ok(out),
                })
            }
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let read = de.deserialize_map(Members).and_then(|m| de.end().map(|()| m));
        read.map_err(|e| ApiError::bad(e.to_string()))?
    }
}

/// The text of a string member; `None` when absent or `null`.
fn string_member(raw: Option<&RawValue>, field: &str, required: bool) -> Result<Option<String>, ApiError> {
    match raw.map(RawValue::get) {
        None | Some("null") if required => Err(ApiError::field(field, "is required")),
        None | Some("null") => Ok(None),
        // Checked already (`EventMembers::read`): the string parses.
        Some(t) if t.starts_with('"') => serde_json::from_str(t)
            .map(Some)
            .map_err(|e| ApiError::field(field, e.to_string())),
        Some(_) => Err(ApiError::field(field, "must be a string")),
    }
}

impl Envelope {
    /// Validate a JSON value as an event: [`Envelope::parse_text`] of its text.
    pub fn parse(v: Value, now: i64, https_only: bool) -> Result<Envelope, ApiError> {
        Envelope::parse_text(&v.to_string(), now, https_only)
    }

    /// Validate an event's JSON text (every way in: the API, Kafka messages, replayed dead
    /// letters). Errors name the field. The text is read once, into the envelope's fields and
    /// the payload's bytes (compacted); the payload is parsed only when something reads it
    /// ([`Payload`]). Accepts exactly the texts a `serde_json::Value` parse accepts and whose
    /// fields are valid.
    pub fn parse_text(text: &str, now: i64, https_only: bool) -> Result<Envelope, ApiError> {
        let m = EventMembers::read(text)?;
        // What a `Value` parse of the payload refuses is refused first, as it was when the
        // whole event was parsed before its fields were looked at.
        let payload = match m.payload {
            Some(p) if p.get().starts_with('{') => Some(compact_checked(p.get(), 1).map_err(|e| e.at("payload"))?),
            Some(p) => {
                check_json(p.get(), 1).map_err(|e| e.at("payload"))?;
                None
            }
            None => None,
        };
        let id = string_member(m.id, "id", true)?.unwrap_or_default();
        if !valid_event_id(&id) {
            return Err(ApiError::field("id", "must be 1-128 characters of [A-Za-z0-9_-]"));
        }
        let event = string_member(m.event, "event", true)?.unwrap_or_default();
        if !valid_event_name(&event, false) {
            return Err(ApiError::field(
                "event",
                "must look like <entity>:<action>, e.g. sync_job_run:record",
            ));
        }
        let sync_job_run_id = match string_member(m.sync_job_run_id, "sync_job_run_id", false)? {
            Some(s) => Some(parse_uuid("sync_job_run_id", &s)?),
            None if event.starts_with("sync_job_run:") => {
                return Err(ApiError::field(
                    "sync_job_run_id",
                    "is required for sync_job_run:* events",
                ))
            }
            None => None,
        };
        let webhook_id = string_member(m.webhook_id, "webhook_id", false)?
            .map(|s| parse_uuid("webhook_id", &s))
            .transpose()?;
        if webhook_id.is_none() && sync_job_run_id.is_none() {
            return Err(ApiError::field(
                "webhook_id",
                "is required when the event has no sync_job_run_id",
            ));
        }
        let callback_url = string_member(m.callback_url, "callback_url", false)?
            .map(|s| parse_target_url("callback_url", &s, https_only))
            .transpose()?;
        let environment_id = string_member(m.environment_id, "environment_id", false)?;
        if let Some(e) = &environment_id {
            check_text("environment_id", e, limits::NAME, false)?;
        }
        let created_at_ms = match string_member(m.created_at, "created_at", false)? {
            Some(s) => {
                let ms =
                    parse_rfc3339_ms(&s).ok_or_else(|| ApiError::field("created_at", "must be an RFC 3339 time"))?;
                // The delivery body says it again in UTC (`rfc3339_ms`): it must be a year
                // RFC 3339 can write there.
                if !(MIN_TIME_MS..=MAX_TIME_MS).contains(&ms) {
                    return Err(ApiError::field(
                        "created_at",
                        "must be between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z in UTC",
                    ));
                }
                ms
            }
            None => now,
        };
        let payload = match (m.payload, payload) {
            (Some(given), Some(compact)) => Payload::given(raw_of(given, compact)),
            (Some(p), None) if p.get() != "null" => return Err(ApiError::field("payload", "must be a JSON object")),
            _ => return Err(ApiError::field("payload", "is required")),
        };
        Ok(Envelope {
            id,
            event,
            sync_job_run_id,
            webhook_id,
            callback_url,
            environment_id,
            created_at_ms,
            payload,
            relay_made: false,
        })
    }

    /// About how long this event's JSON text is: exact for the payload when its bytes are kept,
    /// the members' values and their names and punctuation (an estimate: escapes add to it).
    fn text_len_hint(&self) -> usize {
        const FRAMING: usize = 160;
        let payload = self.payload.raw().map_or(64, |r| r.get().len());
        payload
            + self.id.len()
            + self.event.len()
            + self.sync_job_run_id.as_deref().map_or(0, str::len)
            + self.environment_id.as_deref().map_or(0, str::len)
            + FRAMING
    }

    /// The payload as written into bodies: its bytes as given, else the parsed form.
    fn payload_out(&self) -> PayloadOut<'_> {
        match self.payload.raw() {
            Some(raw) => PayloadOut::Raw(raw),
            None => PayloadOut::Parsed(self.payload.map()),
        }
    }

    /// The delivery body (CONTRACT §2): compact JSON, the bytes that are signed.
    pub fn body(&self, webhook_id: Option<&str>) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            event: &'a str,
            payload: PayloadOut<'a>,
            environment_id: Option<&'a str>,
            created_at: String,
            webhook_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            sync_job_run_id: Option<&'a str>,
        }
        json_text(
            &Body {
                id: &self.id,
                event: &self.event,
                payload: self.payload_out(),
                environment_id: self.environment_id.as_deref(),
                created_at: rfc3339_ms(self.created_at_ms),
                webhook_id,
                sync_job_run_id: self.sync_job_run_id.as_deref(),
            },
            self.text_len_hint() + webhook_id.map_or(0, str::len),
        )
    }

    /// The event as received, normalised (for dead letters and replay). The payload is parsed
    /// here; [`Envelope::to_json_text`] keeps its bytes.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("id".into(), self.id.clone().into());
        o.insert("event".into(), self.event.clone().into());
        if let Some(r) = &self.sync_job_run_id {
            o.insert("sync_job_run_id".into(), r.clone().into());
        }
        if let Some(w) = &self.webhook_id {
            o.insert("webhook_id".into(), w.clone().into());
        }
        if let Some(c) = &self.callback_url {
            o.insert("callback_url".into(), c.as_str().into());
        }
        if let Some(e) = &self.environment_id {
            o.insert("environment_id".into(), e.clone().into());
        }
        o.insert("created_at".into(), rfc3339_ms(self.created_at_ms).into());
        o.insert("payload".into(), Value::Object(self.payload.map().clone()));
        Value::Object(o)
    }

    /// [`Envelope::to_json`] as compact text with the payload's bytes as given: what is stored
    /// for dead letters and produced to the events topic, so replay and Kafka keep them.
    pub fn to_json_text(&self) -> String {
        #[derive(Serialize)]
        struct Event<'a> {
            id: &'a str,
            event: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            sync_job_run_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            webhook_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            callback_url: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            environment_id: Option<&'a str>,
            created_at: String,
            payload: PayloadOut<'a>,
        }
        json_text(
            &Event {
                id: &self.id,
                event: &self.event,
                sync_job_run_id: self.sync_job_run_id.as_deref(),
                webhook_id: self.webhook_id.as_deref(),
                callback_url: self.callback_url.as_ref().map(Url::as_str),
                environment_id: self.environment_id.as_deref(),
                created_at: rfc3339_ms(self.created_at_ms),
                payload: self.payload_out(),
            },
            self.text_len_hint()
                + self.webhook_id.as_deref().map_or(0, str::len)
                + self.callback_url.as_ref().map_or(0, |u| u.as_str().len()),
        )
    }
}

/// `v` as compact JSON text, written into a buffer of `hint` bytes. `serde_json::to_string`
/// starts at 128 bytes and doubles, so a 1.2 KiB body would keep a 2 KiB allocation for as long
/// as its delivery is buffered (16,000 of them on a Kafka instance at its bounds, issue 14).
fn json_text<T: Serialize>(v: &T, hint: usize) -> String {
    let mut out = Vec::with_capacity(hint);
    serde_json::to_writer(&mut out, v).expect("JSON values serialize");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// A payload written into a body: its bytes as given, or the parsed map.
#[derive(Serialize)]
#[serde(untagged)]
enum PayloadOut<'a> {
    Raw(&'a RawValue),
    Parsed(&'a Map<String, Value>),
}

/// The payload's bytes to keep: the given text when it was compact already (most producers
/// write compact JSON: no copy through the compactor, no second parse to check it).
///
/// Kept as `Arc<Box<RawValue>>`: an `Arc<RawValue>` made from the box copied the payload a second
/// time (0.34 % of the relay's CPU in the Kafka throughput profile); clones share the one copy.
fn raw_of(given: &RawValue, compact: Cow<'_, str>) -> Arc<Box<RawValue>> {
    Arc::new(match compact {
        Cow::Borrowed(_) => given.to_owned(),
        // Valid JSON without its whitespace is valid JSON; were it not, the bytes as given do.
        Cow::Owned(text) => RawValue::from_string(text).unwrap_or_else(|_| given.to_owned()),
    })
}

/// What a `serde_json::Value` parse refuses in syntactically valid JSON text, which skipping a
/// value as raw text (`RawValue`, `IgnoredAny`) lets through: events are read that way, so
/// [`check_json`] looks for these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonProblem {
    /// A number that is infinite as an `f64` (`1e400`, an integer of 400 digits).
    OutOfRange,
    /// A `\u` escape of a UTF-16 surrogate that is not a leading one followed by a trailing one.
    LoneSurrogate,
    /// Arrays and objects nested deeper than serde_json's recursion limit.
    TooDeep,
}

impl JsonProblem {
    fn message(self) -> &'static str {
        match self {
            JsonProblem::OutOfRange => "holds a number out of range",
            JsonProblem::LoneSurrogate => "holds a lone surrogate escape",
            JsonProblem::TooDeep => "nests arrays and objects too deeply",
        }
    }

    /// The error naming the member that holds it.
    fn at(self, field: &str) -> ApiError {
        ApiError::field(field, self.message())
    }

    /// The error for a member the relay does not read (its name is the client's).
    fn within_event(self) -> ApiError {
        ApiError::bad(format!("the event {}", self.message()))
    }
}

/// serde_json's recursion limit: a `Value` parse refuses the 128th array or object open at once.
const MAX_JSON_DEPTH: usize = 128;

/// [`compact_checked`] without the compacting: `text` (valid JSON) parses as a `Value` nested
/// within `depth` arrays and objects.
pub fn check_json(text: &str, depth: usize) -> Result<(), JsonProblem> {
    walk_json(text, depth, false).map(drop)
}

/// Valid JSON text without the whitespace outside strings (the bytes of every token kept),
/// borrowed when there is none, if a `serde_json::Value` parse of it, nested within `depth`
/// arrays and objects, accepts it. Syntax is checked before (the text was read as a
/// `RawValue`); this walk, which compacting needs anyway, adds what a `Value` parse checks and
/// skipping does not (`JsonProblem`), so the payload is walked once more, not parsed.
pub fn compact_checked(text: &str, depth: usize) -> Result<Cow<'_, str>, JsonProblem> {
    walk_json(text, depth, true)
}

/// The walk of [`compact_checked`]. Works on bytes: whitespace, quotes, backslashes, brackets
/// and number characters are ASCII, and no byte of a multi-byte UTF-8 character is, so removing
/// whitespace keeps the text UTF-8.
fn walk_json(s: &str, mut depth: usize, compact: bool) -> Result<Cow<'_, str>, JsonProblem> {
    let b = s.as_bytes();
    // Allocated at the first whitespace to remove; `kept` is where the bytes not yet copied start.
    let mut out: Option<Vec<u8>> = None;
    let mut kept = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => i = string_end(b, i + 1)?,
            b' ' | b'\t' | b'\n' | b'\r' => {
                if compact {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(b.len()));
                    o.extend_from_slice(&b[kept..i]);
                    kept = i + 1;
                }
                i += 1;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth >= MAX_JSON_DEPTH {
                    return Err(JsonProblem::TooDeep);
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                let mut exponent = false;
                i += 1;
                while let Some(&c) = b.get(i) {
                    match c {
                        b'0'..=b'9' | b'.' | b'+' | b'-' => {}
                        b'e' | b'E' => exponent = true,
                        _ => break,
                    }
                    i += 1;
                }
                number_in_range(&s[start..i], exponent)?;
            }
            _ => i += 1,
        }
    }
    match out {
        None => Ok(Cow::Borrowed(s)),
        Some(mut o) => {
            o.extend_from_slice(&b[kept..]);
            // Always UTF-8 (only ASCII bytes were removed); never a panic on the way in.
            Ok(Cow::Owned(String::from_utf8(o).unwrap_or_else(|e| {
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            })))
        }
    }
}

/// Where the string whose contents start at `i` ends (past its closing quote), refusing a
/// surrogate escape serde_json refuses when it parses a string (`parse_unicode_escape`, read.rs,
/// with `validate`): a trailing surrogate (`DC00`-`DFFF`) on its own, and a leading one
/// (`D800`-`DBFF`) not followed at once by `\u` and a trailing one.
fn string_end(b: &[u8], mut i: usize) -> Result<usize, JsonProblem> {
    let hex = |at: usize| {
        let digits = std::str::from_utf8(b.get(at..at + 4)?).ok()?;
        u16::from_str_radix(digits, 16).ok()
    };
    while let Some(&c) = b.get(i) {
        match c {
            b'"' => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => match hex(i + 2) {
                Some(0xDC00..=0xDFFF) => return Err(JsonProblem::LoneSurrogate),
                Some(0xD800..=0xDBFF) => {
                    let paired = b.get(i + 6) == Some(&b'\\')
                        && b.get(i + 7) == Some(&b'u')
                        && matches!(hex(i + 8), Some(0xDC00..=0xDFFF));
                    if !paired {
                        return Err(JsonProblem::LoneSurrogate);
                    }
                    i += 12;
                }
                _ => i += 6,
            },
            // Any other escape is two bytes (`\"` must not end the string).
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// Is this number token finite as serde_json parses it into a `Value` ("number out of range"
/// otherwise)? Without the `float_roundtrip` feature serde_json scales the first 19 or 20
/// significant digits by a power of ten (`f64_from_parts`, de.rs), so just where it overflows
/// near `f64::MAX` is its own: a token that could overflow is handed to serde_json itself. Only
/// an exponent or a long integer part can overflow: without an exponent, a token of 300 bytes
/// is below 1.9e300, so the common numbers are judged by the walk alone.
fn number_in_range(token: &str, exponent: bool) -> Result<(), JsonProblem> {
    if !exponent && token.len() <= 300 {
        return Ok(());
    }
    match serde_json::from_str::<Value>(token) {
        Ok(_) => Ok(()),
        Err(_) => Err(JsonProblem::OutOfRange),
    }
}

/// The members of a JSON object's text in order, values as their bytes (repeated keys kept).
pub fn object_members(text: &str) -> Option<Vec<(String, Box<RawValue>)>> {
    struct Members;
    impl<'de> serde::de::Visitor<'de> for Members {
        type Value = Vec<(String, Box<RawValue>)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(kv) = m.next_entry::<String, Box<RawValue>>()? {
                out.push(kv);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    serde::Deserializer::deserialize_map(&mut de, Members).ok()
}

/// An object's compact text from its members, in order.
pub fn write_members(members: &[(String, Box<RawValue>)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(k).expect("strings serialize"));
        out.push(':');
        out.push_str(v.get());
    }
    out.push('}');
    out
}

/// A delivery target URL: http(s), a host, no fragment. IP-literal hosts are checked for being
/// global here; host names are checked when resolved (registration and connect time).
pub fn parse_target_url(field: &str, s: &str, https_only: bool) -> Result<Url, ApiError> {
    check_text(field, s, limits::URL, false)?;
    let url = Url::parse(s).map_err(|e| ApiError::field(field, format!("is not a valid URL ({e})")))?;
    // Stored, delivered and replayed in its normalised form (percent-encoded, IDNA), which may be
    // longer than what was given: the limit holds for that form too.
    if url.as_str().len() > limits::URL {
        return Err(ApiError::field(
            field,
            format!(
                "is longer than {} characters once normalised (percent-encoding)",
                limits::URL
            ),
        ));
    }
    match url.scheme() {
        "https" => {}
        "http" if !https_only => {}
        _ if https_only => return Err(ApiError::field(field, "must be an https URL")),
        _ => return Err(ApiError::field(field, "must be an http or https URL")),
    }
    if url.host().is_none() {
        return Err(ApiError::field(field, "must have a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::field(
            field,
            "must not carry credentials; use the signature to authenticate",
        ));
    }
    Ok(url)
}

/// The address an IP-literal URL host names, if it is one.
pub fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    }
}

/// Does the URL's host name a loopback host by name: `localhost`, any `*.localhost` (RFC 6761),
/// and the loopback names of common `/etc/hosts` files, in any case, with trailing dots? The URL
/// parser has already applied IDNA mapping, so full-width and other forms that normalise to
/// these names are caught too.
pub fn is_loopback_name(url: &Url) -> bool {
    let Some(url::Host::Domain(host)) = url.host() else {
        return false;
    };
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "localhost"
        || h.ends_with(".localhost")
        || h == "localhost.localdomain"
        || h == "ip6-localhost"
        || h == "ip6-loopback"
}

/// Is this address reachable on the public internet? Loopback, private, link-local (cloud
/// metadata at 169.254.169.254), CGNAT, documentation, benchmarking, multicast, reserved and
/// unspecified ranges are not; IPv6 is global only inside `2000::/3` outside the special-purpose
/// blocks there, and the forms that embed an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged
/// by that IPv4 address (IANA's special-purpose address registries).
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_global_v4(a),
        IpAddr::V6(a) => match embedded_ipv4(a) {
            Some(v4) => is_global_v4(v4),
            None => is_global_v6(a),
        },
    }
}

fn is_global_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_broadcast()
        || a.is_documentation()
        || a.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared address space
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 192 && o[1] == 88 && o[2] == 99) // 192.88.99.0/24 6to4 relay anycast
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240) // reserved
}

/// The IPv4 address an IPv6 address stands for, where the network delivers it to that IPv4
/// address: IPv4-mapped `::ffff:0:0/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`.
pub fn embedded_ipv4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = a.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = a.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(v4(s[1], s[2]));
    }
    None
}

/// IPv6 without an embedded IPv4 address (see `embedded_ipv4`).
fn is_global_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    // Global unicast is 2000::/3; everything outside it is loopback, unspecified, IPv4-compatible
    // (::/96), SIIT (::ffff:0:0:0/96), local-use NAT64 (64:ff9b:1::/48), discard-only
    // (100::/64), unique local (fc00::/7), link-local (fe80::/10), site-local (fec0::/10),
    // multicast, SRv6 SIDs (5f00::/16) or unassigned.
    if (s[0] & 0xe000) != 0x2000 {
        return false;
    }
    // 2001::/23 IETF protocol assignments: Teredo 2001::/32, benchmarking 2001:2::/48, ORCHID.
    let ietf = s[0] == 0x2001 && s[1] < 0x0200;
    // Documentation: 2001:db8::/32 and 3fff::/20.
    let documentation = (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000);
    !(ietf || documentation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A due time is never before its backoff has passed, however the clock's sub-millisecond
    /// part falls (`now_ms` rounds down; a due time rounded down would let a retry go early).
    #[test]
    fn a_due_time_is_never_early() {
        for d in [0, 1, 100, 900, 30_000] {
            for _ in 0..1_000 {
                let before = OffsetDateTime::now_utc().unix_timestamp_nanos();
                let at = ms_after(std::time::Duration::from_millis(d));
                assert!(at as i128 * 1_000_000 >= before + d as i128 * 1_000_000, "{d} ms");
            }
        }
    }

    /// A buffered Kafka delivery keeps its body for as long as it waits: the body's allocation
    /// is sized for it, not rounded up to the next power of two by doubling.
    #[test]
    fn a_body_keeps_no_more_memory_than_it_needs() {
        for pad in [0, 900, 1500, 16_000] {
            let run = "0190b3a4-0000-7000-8000-000000000001";
            let webhook = "0190b3a4-0000-7000-8000-000000000002";
            let text = json!({"id": "e1", "event": "sync_job_run:record", "sync_job_run_id": run,
                              "webhook_id": webhook, "payload": {"pad": "x".repeat(pad), "n": 1}})
            .to_string();
            let e = Envelope::parse_text(&text, 0, false).unwrap();
            for s in [e.body(Some(webhook)), e.to_json_text()] {
                assert!(s.capacity() <= s.len() + 200, "{} bytes in {}", s.len(), s.capacity());
                let v: Value = serde_json::from_str(&s).unwrap();
                assert_eq!(v["payload"]["pad"].as_str().unwrap().len(), pad);
            }
        }
    }

    #[test]
    fn non_global_addresses_are_recognised() {
        for a in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.3.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2001:db8::1",
            // 6to4 of loopback and of cloud metadata, Teredo, SIIT, site-local, discard-only,
            // benchmarking, the new documentation block, IPv4-compatible, local-use NAT64.
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "2002:a00:1::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::ffff:0:7f00:1",
            "::ffff:0:808:808",
            "fec0::1",
            "feff::1",
            "100::1",
            "100::ffff:ffff:ffff:ffff",
            "2001:2::1",
            "2001:2:0:ffff::1",
            "3fff::1",
            "3fff:fff::1",
            "::7f00:1",
            "::808:808",
            "::ffff:10.0.0.1",
            "::ffff:100.64.0.1",
            "64:ff9b:1::a00:1",
            "5f00::1",
            "ff02::1",
            "4000::1",
        ] {
            assert!(!is_global(a.parse().unwrap()), "{a} should not be global");
        }
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:200::1",
            "2a00:1450:4001::1",
            "3ffe::1",
        ] {
            assert!(is_global(a.parse().unwrap()), "{a} should be global");
        }
    }

    fn field(e: ApiError) -> String {
        match e {
            ApiError::BadRequest { field, .. } => field.unwrap_or_default(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn envelope_validation_names_fields() {
        let run = "3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11";
        let ok = json!({"id":"e1","event":"sync_job_run:record","sync_job_run_id":run,"payload":{"a":1}});
        assert!(Envelope::parse(ok.clone(), 0, false).is_ok());
        let cases = [
            (json!({"event":"x:y","webhook_id":run,"payload":{}}), "id"),
            (
                json!({"id":"bad id!","event":"x:y","webhook_id":run,"payload":{}}),
                "id",
            ),
            (
                json!({"id":"e","event":"nocolon","webhook_id":run,"payload":{}}),
                "event",
            ),
            (
                json!({"id":"e","event":"sync_job_run:record","payload":{}}),
                "sync_job_run_id",
            ),
            (
                json!({"id":"e","event":"sync_job_run:record","sync_job_run_id":"nope","payload":{}}),
                "sync_job_run_id",
            ),
            (json!({"id":"e","event":"x:y","payload":{}}), "webhook_id"),
            (
                json!({"id":"e","event":"x:y","webhook_id":"zz","payload":{}}),
                "webhook_id",
            ),
            (json!({"id":"e","event":"x:y","webhook_id":run}), "payload"),
            (
                json!({"id":"e","event":"x:y","webhook_id":run,"payload":[1]}),
                "payload",
            ),
            (
                json!({"id":"e","event":"x:y","webhook_id":run,"payload":{},"created_at":"yesterday"}),
                "created_at",
            ),
            (
                json!({"id":"e","event":"x:y","webhook_id":run,"payload":{},"callback_url":"ftp://x"}),
                "callback_url",
            ),
            (json!({"id":1,"event":"x:y","webhook_id":run,"payload":{}}), "id"),
        ];
        for (v, f) in cases {
            assert_eq!(field(Envelope::parse(v.clone(), 0, false).unwrap_err()), f, "{v}");
        }
    }

    /// Found by `cargo fuzz` (fuzz target `envelope`): an offset that moves `created_at` out of
    /// years 0000-9999 in UTC was accepted, and the delivery body then said `-001-12-31T23:59:00.000Z`
    /// (not RFC 3339) or, past 9999, `1970-01-01T00:00:00.000Z`.
    #[test]
    fn created_at_outside_years_0000_to_9999_in_utc_is_refused() {
        let run = "3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11";
        let ev = |t: &str| json!({"id":"e","event":"x:y","webhook_id":run,"created_at":t,"payload":{}});
        for t in [
            "0000-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59-23:59",
            "9999-12-31T23:30:00-00:30",
        ] {
            assert_eq!(
                field(Envelope::parse(ev(t), 0, false).unwrap_err()),
                "created_at",
                "{t}"
            );
        }
        for (t, want) in [
            ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00.000Z"),
            ("0000-01-01T00:01:00+00:01", "0000-01-01T00:00:00.000Z"),
            ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"),
            ("2026-11-25T12:00:00+02:00", "2026-11-25T10:00:00.000Z"),
        ] {
            let e = Envelope::parse(ev(t), 0, false).unwrap();
            assert_eq!(rfc3339_ms(e.created_at_ms), want, "{t}");
            assert_eq!(parse_rfc3339_ms(want), Some(e.created_at_ms), "{t}");
        }
        assert_eq!(rfc3339_ms(MIN_TIME_MS), "0000-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(MAX_TIME_MS), "9999-12-31T23:59:59.999Z");
    }

    /// Found by `cargo fuzz` (fuzz target `envelope`): a callback URL within 2048 characters as
    /// given but longer once normalised (each `û` becomes `%C3%BB`) was accepted; its stored form
    /// then failed validation, so replaying the event's dead letter dropped it silently.
    #[test]
    fn a_url_longer_than_the_limit_once_normalised_is_refused() {
        let run = "3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11";
        let given = format!("https://example.com/{}", "û".repeat(1000));
        assert!(given.chars().count() <= limits::URL);
        let ev = json!({"id":"e","event":"x:y","webhook_id":run,"callback_url":given,"payload":{}});
        assert_eq!(field(Envelope::parse(ev, 0, false).unwrap_err()), "callback_url");
        assert_eq!(
            field(parse_target_url("target_url", &given, false).unwrap_err()),
            "target_url"
        );
        // At the limit once normalised it is accepted, and its stored form parses back.
        let fits = format!("https://example.com/{}", "a".repeat(limits::URL - 20));
        let ev = json!({"id":"e","event":"x:y","webhook_id":run,"callback_url":fits,"payload":{}});
        let e = Envelope::parse(ev, 0, false).unwrap();
        assert_eq!(e.callback_url.as_ref().unwrap().as_str().len(), limits::URL);
        Envelope::parse(e.to_json(), 0, false).unwrap();
    }

    #[test]
    fn body_is_compact_ordered_and_keeps_payload_key_order() {
        let v = json!({"id":"e1","event":"a:b","webhook_id":"3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11",
            "created_at":"2026-11-25T10:00:00Z","payload":{"z":1,"a":{"y":2,"b":3}}});
        let e = Envelope::parse(v, 0, false).unwrap();
        assert_eq!(
            e.body(Some("w")),
            r#"{"id":"e1","event":"a:b","payload":{"z":1,"a":{"y":2,"b":3}},"environment_id":null,"created_at":"2026-11-25T10:00:00.000Z","webhook_id":"w"}"#
        );
    }

    #[test]
    fn payload_bytes_are_kept_compacted() {
        let compact_json = |s| compact_checked(s, 0).unwrap();
        assert_eq!(
            compact_json("{ \"a\" : [1, 2.50 ,1E2],\n\t\"s\": \" q \\\" \\\\ \" }"),
            r#"{"a":[1,2.50,1E2],"s":" q \" \\ "}"#
        );
        // Multi-byte characters, in and out of strings' escapes, come through whole.
        assert_eq!(
            compact_json("{ \"é\" : \"ü \\\"€\" ,\"\u{1F600}\":[ 1 ] }"),
            "{\"é\":\"ü \\\"€\",\"\u{1F600}\":[1]}"
        );
        // Already compact: the same bytes, not a copy.
        let compact = r#"{"a":[1,2.50],"s":" q \" \\ "}"#;
        assert!(matches!(compact_json(compact), Cow::Borrowed(b) if b == compact));
        let text = r#"{"id":"e","event":"a:b","webhook_id":"3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11",
            "payload": {"n": 123456789012345678901234567890, "d": 1, "d": -0}}"#;
        let e = Envelope::parse_text(text, 0, false).unwrap();
        let want = r#"{"n":123456789012345678901234567890,"d":1,"d":-0}"#;
        assert_eq!(e.payload.raw().map(RawValue::get), Some(want));
        assert!(e.body(None).contains(&format!(r#""payload":{want},"#)));
        // The stored form keeps the bytes too, and parses back to the same.
        let again = Envelope::parse_text(&e.to_json_text(), 0, false).unwrap();
        assert_eq!(again.body(None), e.body(None));
        let members = object_members(want).unwrap();
        assert_eq!(members.len(), 3);
        assert_eq!(write_members(&members), want);
    }

    /// The payload walk as it was before payloads were parsed lazily (`compact_json` and
    /// `raw_payload`, verbatim): the bytes kept now must be the same.
    mod before {
        use super::*;

        pub fn raw_payload(event_text: &str) -> Option<Arc<RawValue>> {
            #[derive(serde::Deserialize)]
            struct Only<'a> {
                #[serde(borrow)]
                payload: Option<&'a RawValue>,
            }
            let raw = serde_json::from_str::<Only>(event_text).ok()?.payload?;
            if !raw.get().starts_with('{') {
                return None;
            }
            let compact = match compact_json(raw.get()) {
                Cow::Borrowed(_) => raw.to_owned(),
                Cow::Owned(text) => RawValue::from_string(text).ok()?,
            };
            Some(Arc::from(compact))
        }

        fn compact_json(s: &str) -> Cow<'_, str> {
            let b = s.as_bytes();
            let mut out: Option<Vec<u8>> = None;
            let mut kept = 0;
            let (mut in_str, mut escaped) = (false, false);
            for (i, &c) in b.iter().enumerate() {
                if in_str {
                    if escaped {
                        escaped = false;
                    } else if c == b'\\' {
                        escaped = true;
                    } else if c == b'"' {
                        in_str = false;
                    }
                } else if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(b.len()));
                    o.extend_from_slice(&b[kept..i]);
                    kept = i + 1;
                } else if c == b'"' {
                    in_str = true;
                }
            }
            match out {
                None => Cow::Borrowed(s),
                Some(mut o) => {
                    o.extend_from_slice(&b[kept..]);
                    Cow::Owned(String::from_utf8(o).unwrap())
                }
            }
        }
    }

    const RUN: &str = "3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11";

    /// Payloads a `Value` parse refuses although they are valid JSON syntax, those it takes
    /// that look alike, and the usual tricky ones. Each is a payload object's text.
    fn tricky_payloads() -> Vec<String> {
        let mut values: Vec<String> = [
            // Numbers: out of f64's range, or only just in it.
            "1e400",
            "-1e400",
            "1E400",
            "1e+400",
            "1e309",
            "1e308",
            "0e400",
            "0.0e99999999999",
            "-0e400",
            "1e99999999999",
            "1e-99999999999",
            "-1e-99999999999",
            "1e-400",
            "-0",
            "-0.0",
            "1E2",
            "2.50",
            "1.7976931348623157e308",
            "1.7976931348623158e308",
            "1.7976931348623159e308",
            "-1.7976931348623157e308",
            "1.8e308",
            "17976931348623157e292",
            "17976931348623159e292",
            "0.00000000000000000000000000001e330",
            "123456789012345678901234567890.5e280",
            "123456789012345678901234567890.5e279",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            // Strings: surrogate escapes, paired or not, and other escapes.
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\udfff""#,
            r#""\ud800x""#,
            r#""\ud800\u0041""#,
            r#""\ud800\ud800""#,
            r#""\ud800\udbff""#,
            r#""\ud800\\""#,
            r#""\ud800\n""#,
            r#""a\ud800""#,
            r#""\udc00\ud800""#,
            r#""\ud83d\ude00""#,
            r#""\uD83D\uDE00""#,
            r#""\udbff\udfff""#,
            r#""\ud800\udc00\udc00""#,
            r#""\\ud800""#,
            r#""\\\ud800""#,
            r#""x\"\ud800""#,
            r#""\u0000\u001f\uffff\ud7ff\ue000""#,
            r#""\"\\\/\b\f\n\r\t""#,
            r#""ü € 😀""#,
            // Structures, repeated keys, whitespace everywhere.
            r#"{"a":{"b":[1,{"c":[]}]},"a":2}"#,
            r#"{"k":1,"k":{"k":[1e400]}}"#,
            r#"[1, 1e400]"#,
            r#"[1e400 ]"#,
            r#"{"\ud800":1}"#,
            r#"{"\ud83d\ude00":1}"#,
            "[ 1 ,\t2 ,\n{ \"a\" :\r\n-0 } ]",
            "true",
            "null",
            "[]",
            "{}",
        ]
        .iter()
        .map(|v| v.to_string())
        .collect();
        // Integers around where an f64 overflows (309 digits) and where the walk hands them to
        // serde_json (over 300 bytes).
        for (digit, n) in [
            ('9', 300),
            ('9', 301),
            ('1', 308),
            ('9', 308),
            ('1', 309),
            ('9', 309),
            ('9', 310),
            ('1', 400),
        ] {
            values.push(digit.to_string().repeat(n));
            values.push(format!("-{}", digit.to_string().repeat(n)));
            values.push(format!("{}.5", digit.to_string().repeat(n)));
            values.push(format!("{}e-20", digit.to_string().repeat(n)));
        }
        values.push(format!("1{}", "0".repeat(308)));
        values.push(format!("0.{}1", "0".repeat(400)));
        values.push(format!("1.{}", "9".repeat(400)));
        // Nesting around serde_json's recursion limit (the event and the payload count).
        for n in 123..=128 {
            values.push(format!("{}{}", "[".repeat(n), "]".repeat(n)));
            values.push(format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)));
        }
        let mut payloads: Vec<String> = values
            .iter()
            .flat_map(|v| {
                [
                    format!(r#"{{"v":{v}}}"#),
                    format!("{{ \"v\" :\n\t{v} , \"w\" : [ {v} ] }}"),
                ]
            })
            .collect();
        payloads.extend(
            [
                r#"{"a":1,"a":2}"#,
                r#"{"resource":"r","n":1e400}"#,
                "{\n}",
                " {\"a\" : \"b c\" } ",
            ]
            .map(String::from),
        );
        payloads
    }

    /// `parse_text` reads an event without a DOM; it must accept exactly the events a `Value`
    /// parse accepts (with valid fields), give the payload a `Value` parse gives, and keep the
    /// payload's bytes as `raw_payload` kept them.
    #[test]
    fn payloads_are_accepted_as_a_value_parse_accepts_them() {
        let (mut accepted, mut refused) = (0, 0);
        for p in tricky_payloads() {
            let text = format!(r#"{{"id":"e","event":"x:y","webhook_id":"{RUN}","payload":{p}}}"#);
            match (
                serde_json::from_str::<Value>(&text),
                Envelope::parse_text(&text, 0, false),
            ) {
                (Ok(v), Ok(e)) => {
                    accepted += 1;
                    assert_eq!(&Value::Object(e.payload.map().clone()), &v["payload"], "{p}");
                    let want = before::raw_payload(&text).unwrap();
                    assert_eq!(e.payload.raw().map(RawValue::get), Some(want.get()), "{p}");
                    assert_eq!(
                        e.payload.resource().as_deref(),
                        v["payload"]["resource"].as_str(),
                        "{p}"
                    );
                }
                (Err(_), Err(e)) => {
                    refused += 1;
                    assert_eq!(field(e), "payload", "{p}");
                }
                (want, got) => panic!("{p}: a Value parse says {want:?}, parse_text {got:?}"),
            }
        }
        assert!(accepted > 100 && refused > 50, "{accepted} accepted, {refused} refused");
    }

    /// The same for what is outside the payload: members the relay does not read, a repeated
    /// member (the last one wins, the others are parsed all the same), strings of the envelope.
    #[test]
    fn events_are_accepted_as_a_value_parse_accepts_them() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let mut texts = vec![
            r#"{"x":1e400,"id":"e","event":"x:y","webhook_id":"W","payload":{}}"#.to_string(),
            r#"{"x":"\ud800","id":"e","event":"x:y","webhook_id":"W","payload":{}}"#.into(),
            r#"{"x":"\ud83d\ude00","id":"e","event":"x:y","webhook_id":"W","payload":{}}"#.into(),
            r#"{"\ud800":1,"id":"e","event":"x:y","webhook_id":"W","payload":{}}"#.into(),
            r#"{"id":"\ud800","id":"e","event":"x:y","webhook_id":"W","payload":{}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{"a":1e400},"payload":{"b":1}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{"a":1},"payload":{"b":2}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{"a":1},"payload":null}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":null,"payload":{"a":1}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":[1e400]}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":"\ud800"}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","created_at":1e400,"payload":{}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","callback_url":null,"environment_id":null,"payload":{}}"#
                .into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","environment_id":"\ud83d\ude00","payload":{}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","p\u0061yload":{"a":1}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{}} "#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{}} x"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{"a":01}}"#.into(),
            r#"{"id":"e","event":"x:y","webhook_id":"W","payload":{"a":"\x"}}"#.into(),
            "[1e400]".into(),
            "[1]".into(),
            "\"\\ud800\"".into(),
            " 1 ".into(),
            "".into(),
        ];
        for n in 124..=128 {
            texts.push(format!(
                r#"{{"x":{},"id":"e","event":"x:y","webhook_id":"W","payload":{{}}}}"#,
                deep(n)
            ));
        }
        for t in texts {
            let t = t.replace("\"W\"", &format!("\"{RUN}\""));
            match (serde_json::from_str::<Value>(&t), Envelope::parse_text(&t, 0, false)) {
                (Ok(v), Ok(e)) => assert_eq!(&Value::Object(e.payload.map().clone()), &v["payload"], "{t}"),
                (Err(_), Err(_)) => {}
                (Ok(_), Err(e)) if t.contains("\"payload\":null") => assert_eq!(field(e), "payload", "{t}"),
                (Ok(v), Err(e)) if !v.is_object() || !v["payload"].is_object() => {
                    assert!(matches!(e, ApiError::BadRequest { .. }), "{t}")
                }
                (want, got) => panic!("{t}: a Value parse says {want:?}, parse_text {got:?}"),
            }
        }
    }

    /// `resource()` reads one member from the bytes; it says what the parsed map says.
    #[test]
    fn the_resource_is_what_the_parsed_payload_says() {
        for p in [
            r#"{"resource":"a"}"#,
            r#"{"resource":"a","resource":"b"}"#,
            r#"{"resource":"a","resource":1}"#,
            r#"{"resource":1,"resource":"b"}"#,
            r#"{"resource":1}"#,
            r#"{"resource":null}"#,
            r#"{"resource":["a"]}"#,
            r#"{"resource":"t\u00e9l\"x"}"#,
            r#"{"x":{"resource":"no"}}"#,
            r#"{"r\u0065source":"escaped key"}"#,
            r#"{}"#,
        ] {
            let text = format!(r#"{{"id":"e","event":"x:y","webhook_id":"{RUN}","payload":{p}}}"#);
            let e = Envelope::parse_text(&text, 0, false).unwrap();
            let r = e.payload.resource().map(Cow::into_owned);
            assert_eq!(
                r.as_deref(),
                e.payload.map().get("resource").and_then(Value::as_str),
                "{p}"
            );
            // Once parsed, the map answers; the same.
            assert_eq!(e.payload.resource().map(Cow::into_owned), r, "{p}");
        }
        let made = Payload::made(json!({"resource": "m"}).as_object().unwrap().clone());
        assert_eq!(made.resource().as_deref(), Some("m"));
        assert!(made.raw().is_none());
    }

    /// A clone shares the bytes and the parsed map (a routed run event is cloned).
    #[test]
    fn a_clone_shares_the_payload() {
        let text = format!(r#"{{"id":"e","event":"x:y","webhook_id":"{RUN}","payload":{{"a":[1,2]}}}}"#);
        let e = Envelope::parse_text(&text, 0, false).unwrap();
        let before_parse = e.clone();
        assert!(std::ptr::eq(
            e.payload.raw().unwrap(),
            before_parse.payload.raw().unwrap()
        ));
        let m = e.payload.map() as *const _;
        let after_parse = e.clone();
        assert!(std::ptr::eq(m, after_parse.payload.map()));
        assert_eq!(before_parse.payload.map(), e.payload.map());
    }

    #[test]
    fn subscriptions_match() {
        assert!(subscribed(&[], "a:b"));
        assert!(subscribed(&["a:b".into()], "a:b"));
        assert!(subscribed(&["a:*".into()], "a:c"));
        assert!(!subscribed(&["a:b".into()], "a:c"));
        assert!(!subscribed(&["x:*".into()], "a:c"));
    }
}
