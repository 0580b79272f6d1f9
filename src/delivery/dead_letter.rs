//! Dead letters: every one is stored (`GET /dead-letters`, replay) and, when the bus has a
//! dead-letter topic, published there too. One constructor per cause lives beside its cause
//! (`routing::event_dead_letter` for refused events, `attempt::dead` for failed deliveries,
//! the Kafka intake's for poison messages); this module is where they all go.

use crate::store::NewDeadLetter;

pub type SinkFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Where dead letters are published besides the store (Kafka: the dead-letter topic, with the
/// `x-dlq-*` headers of CONTRACT §1).
pub trait DeadLetterSink: Send + Sync + 'static {
    /// `source` is `topic/partition/offset` when the event came from a bus message.
    fn publish<'a>(&'a self, dead: &'a NewDeadLetter, source: Option<&'a str>) -> SinkFuture<'a>;
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
