//! librdkafka callbacks: rebalances (the offset tracker follows assignments; a newly assigned
//! partition starts a little before its committed offset) and statistics (lag metrics).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::offsets::Tracker;
use super::{Tp, RESUME_REWIND};
use crate::metrics::Metrics;

/// Rebalance and statistics callbacks.
pub struct RelayContext {
    pub tracker: Arc<Tracker>,
    pub metrics: Metrics,
    /// Set when partitions are assigned: the consumer loop learns, before it takes any message
    /// of them, which chains have rows in the (shared) store.
    pub assigned: Arc<std::sync::atomic::AtomicBool>,
}

/// A one-partition list, at `offset` when given.
pub fn tpl_of(tp: &Tp, offset: Option<i64>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    match offset {
        Some(o) => {
            let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(o));
        }
        None => {
            tpl.add_partition(&tp.0, tp.1);
        }
    }
    tpl
}

pub fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for RelayContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (part, p) in &t.partitions {
                if *part < 0 || !p.desired {
                    continue;
                }
                let part = part.to_string();
                if p.consumer_lag >= 0 {
                    self.metrics
                        .kafka_consumer_lag
                        .with_label_values(&[topic, &part])
                        .set(p.consumer_lag);
                }
                if p.committed_offset >= 0 {
                    self.metrics
                        .kafka_committed_offset
                        .with_label_values(&[topic, &part])
                        .set(p.committed_offset);
                }
            }
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
            Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            Notice | Info => tracing::info!(target: "librdkafka", fac, "{log_message}"),
            Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }
}

impl ConsumerContext for RelayContext {
    fn pre_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let tps = tps_of(tpl);
                tracing::info!(partitions = ?tps, "partitions revoked: unfinished work is left to the next owner");
                self.metrics.kafka_rebalances.with_label_values(&["revoke"]).inc();
                self.tracker.revoke(&tps);
                self.metrics.kafka_assigned_partitions.sub(tps.len() as i64);
                for (topic, part) in &tps {
                    let part = part.to_string();
                    let _ = self.metrics.kafka_consumer_lag.remove_label_values(&[topic, &part]);
                    let _ = self.metrics.kafka_committed_offset.remove_label_values(&[topic, &part]);
                }
            }
            Rebalance::Assign(tpl) => {
                // Start each partition a little before its committed offset, and skip what
                // comes before it (finished already). Kafka answers a fetch that starts inside
                // a record batch with that batch; some brokers (tansu 0.6) answer with the
                // next one, which would lose the rest of the batch after a crash.
                let committed = c.committed_offsets((*tpl).clone(), Duration::from_secs(5));
                let mut tps = Vec::new();
                for mut e in tpl.elements() {
                    let tp: Tp = (e.topic().to_string(), e.partition());
                    let at = match &committed {
                        Ok(list) => list.find_partition(&tp.0, tp.1).and_then(|x| match x.offset() {
                            Offset::Offset(o) if o >= 0 => Some(o),
                            _ => None,
                        }),
                        Err(err) => {
                            tracing::warn!(error = %err, "reading committed offsets failed; starting where the group left off");
                            None
                        }
                    };
                    if let Some(o) = at {
                        let from = o.saturating_sub(RESUME_REWIND).max(0);
                        tracing::info!(topic = %tp.0, partition = tp.1, committed = o, from, "assigned: reading from before the committed offset");
                        let _ = e.set_offset(Offset::Offset(from));
                    }
                    tps.push((tp, at));
                }
                self.tracker.assign(&tps);
                self.assigned.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let tps = tps_of(tpl);
            tracing::info!(partitions = ?tps, "partitions assigned");
            // A partition paused for backpressure before it was revoked starts unpaused.
            if let Err(e) = c.resume(tpl) {
                tracing::debug!(error = %e, "resuming newly assigned partitions");
            }
            self.metrics.kafka_rebalances.with_label_values(&["assign"]).inc();
            self.metrics.kafka_assigned_partitions.add(tps.len() as i64);
        }
    }
}
