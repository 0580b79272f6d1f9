//! A delivery job: one event for one target, with what acknowledges it.
//!
//! Both buses hand the delivery core the same jobs. What differs is the acknowledgement:
//! - a **stored** job is a queue row (embedded bus, parked Kafka deliveries, events the relay
//!   makes, replays): its outcome is committed to the row, which promotes its chain's next row;
//! - a **memory** job is a Kafka delivery not written anywhere: its message's offset may be
//!   committed once every delivery of the message is finished — answered 2xx, dead-lettered, or
//!   written to the store (parked) — so the bus gives it an [`Ack`] to call.

use std::sync::Arc;

use crate::store::{AttemptRecord, NewDelivery, QueuedDelivery};

/// The bus's side of a memory job. Implemented by the Kafka intake; the delivery core knows
/// nothing else of Kafka.
pub trait Ack: Send + Sync {
    /// False once the message's partition was taken from this instance: the job is dropped
    /// before its next attempt, and the new owner delivers it from the committed offset.
    fn current(&self) -> bool;
    /// This delivery of the message is finished (answered, dead-lettered, or durably stored).
    fn done(&self);
    /// The message's bytes as they were read (the dead-letter topic gets them unchanged).
    fn original(&self) -> Option<Arc<Vec<u8>>> {
        None
    }
}

pub enum Origin {
    /// A queue row (`QueuedDelivery::seq`).
    Stored,
    /// Kept in memory, acknowledged through `ack`; `log` holds its attempts so far.
    Memory { ack: Arc<dyn Ack>, log: Vec<AttemptRecord> },
}

pub struct Job {
    pub q: QueuedDelivery,
    pub origin: Origin,
}

impl Job {
    pub fn stored(q: QueuedDelivery) -> Job {
        Job {
            q,
            origin: Origin::Stored,
        }
    }

    /// A delivery that lives in memory until it finishes or is parked.
    pub fn memory(d: NewDelivery, ack: Arc<dyn Ack>) -> Job {
        Job {
            q: QueuedDelivery {
                seq: 0,
                id: d.id,
                event_id: d.event_id,
                event: d.event,
                run_id: d.run_id,
                kind: d.kind.to_string(),
                webhook_id: d.webhook_id,
                target_url: d.target_url,
                target_key: d.target_key,
                order_key: d.order_key,
                body: d.body,
                attempts: d.attempts,
                first_attempt_at: d.first_attempt_at,
                created_at: d.created_at,
                source: d.source,
            },
            origin: Origin::Memory { ack, log: d.log },
        }
    }

    pub fn is_memory(&self) -> bool {
        matches!(self.origin, Origin::Memory { .. })
    }

    pub fn kind(&self) -> &'static str {
        crate::store::kind_str(&self.q.kind)
    }

    /// The row to write for this job (parked or logged), with its attempts so far. Takes the
    /// job: its fields (the body among them) move into the row instead of being copied, once
    /// per finished Kafka delivery.
    pub fn into_row(self, next_attempt_at: Option<i64>) -> NewDelivery {
        let log = match self.origin {
            Origin::Memory { log, .. } => log,
            Origin::Stored => Vec::new(),
        };
        NewDelivery {
            next_attempt_at,
            log,
            ..crate::store::requeue(self.q)
        }
    }

    pub fn ack(&self) -> Option<Arc<dyn Ack>> {
        match &self.origin {
            Origin::Memory { ack, .. } => Some(ack.clone()),
            Origin::Stored => None,
        }
    }
}
