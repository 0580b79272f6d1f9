//! Dead letters: every one is built here (one constructor, three causes), stored
//! (`GET /dead-letters`, replay) and, when the bus has a dead-letter topic, published there
//! too (`outcome` does both, in that order).

use crate::domain::Envelope;
use crate::store::{NewDeadLetter, QueuedDelivery};

/// Why something became a dead letter, with what it knows.
pub enum Cause<'a> {
    /// A bus message that is not an event (not UTF-8 or JSON, a missing field, too large):
    /// kept as text, under a made-up event id naming where it was read.
    Poison {
        event_id: String,
        detail: &'a str,
        raw: &'a [u8],
    },
    /// A valid event refused before any delivery was made for it (unknown webhook or run, a
    /// finished run…): replay routes it again.
    Refused {
        event: &'a Envelope,
        webhook_id: Option<String>,
    },
    /// A delivery that failed (exhausted, 413, 410, refused run) or could not be attempted: it
    /// names its row, so replay re-drives exactly this (event, target) pair.
    Delivery {
        q: &'a QueuedDelivery,
        last_status: Option<i64>,
        last_error: Option<String>,
        attempts: i64,
        body: &'a str,
    },
}

/// The one dead-letter constructor.
pub fn dead_letter(reason: &'static str, cause: Cause<'_>) -> NewDeadLetter {
    match cause {
        Cause::Poison { event_id, detail, raw } => NewDeadLetter {
            delivery_id: None,
            event_id,
            event: "unknown:unknown".into(),
            webhook_id: None,
            kind: "webhook",
            reason,
            attempts: 0,
            last_status: None,
            last_error: Some(detail.chars().take(500).collect()),
            raw: serde_json::Value::String(String::from_utf8_lossy(&raw[..raw.len().min(64 * 1024)]).into_owned())
                .to_string(),
        },
        Cause::Refused { event, webhook_id } => NewDeadLetter {
            delivery_id: None,
            event_id: event.id.clone(),
            event: event.event.clone(),
            webhook_id,
            kind: "webhook",
            reason,
            attempts: 0,
            last_status: None,
            last_error: None,
            raw: event.to_json_text(),
        },
        Cause::Delivery {
            q,
            last_status,
            last_error,
            attempts,
            body,
        } => NewDeadLetter {
            delivery_id: Some(q.id.clone()),
            event_id: q.event_id.clone(),
            event: q.event.clone(),
            webhook_id: q.webhook_id.clone(),
            kind: crate::store::kind_str(&q.kind),
            reason,
            attempts,
            last_status,
            last_error,
            raw: body.to_string(),
        },
    }
}

pub type SinkFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Where dead letters are published besides the store (Kafka: the dead-letter topic, with the
/// `x-dlq-*` headers of CONTRACT §1).
pub trait DeadLetterSink: Send + Sync + 'static {
    /// `source` is `topic/partition/offset` and `original` the message's bytes when the event
    /// came from a bus message (without them the dead letter's stored body is published).
    fn publish<'a>(
        &'a self,
        dead: &'a NewDeadLetter,
        source: Option<&'a str>,
        original: Option<&'a [u8]>,
    ) -> SinkFuture<'a>;
}

/// `topic/partition/offset` (topic names cannot contain `/`).
pub fn source_of(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// The parts of a `source_of` string.
pub fn parse_source(s: &str) -> Option<(&str, &str, &str)> {
    let mut it = s.rsplitn(3, '/');
    let offset = it.next()?;
    let partition = it.next()?;
    let topic = it.next()?;
    Some((topic, partition, offset))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_source_round_trips() {
        let s = super::source_of("sync_job_run.events", 3, 42);
        assert_eq!(super::parse_source(&s), Some(("sync_job_run.events", "3", "42")));
        assert_eq!(super::parse_source("nope"), None);
    }
}
