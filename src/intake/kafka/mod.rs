//! Kafka as the bus: where an event enters in scale-out mode (the only module that knows
//! rdkafka). It reads, decodes and plans messages, hands their deliveries to the delivery core
//! as memory jobs acknowledged by offset, and commits offsets only over finished messages.
//!
//! - A poison message (not UTF-8 or JSON, missing or ill-typed fields, over the size limit) and
//!   an event refused by routing (unknown webhook or run, finished run…) is dead-lettered —
//!   stored, and published to the dead-letter topic with `x-dlq-*` headers — and counts as
//!   finished once stored.
//! - Every delivery of a message becomes a job of the delivery core (the same dispatcher,
//!   attempt and outcome path as the embedded bus). Its [`OffsetAck`] finishes the message once
//!   every delivery is answered, dead-lettered or parked in the store.
//! - A partition's offset is stored (and auto-committed by librdkafka) only up to the lowest
//!   unfinished offset (`offsets::Tracker`).
//! - Buffered (unfinished) messages per partition are bounded: at the bound the partition is
//!   paused (the consumer keeps polling, so it never leaves its group) and resumed, rewound,
//!   at half.
//! - On revoke, jobs of the revoked partitions are dropped before their next attempt and never
//!   parked (the new owner redelivers them from the committed offset, same `webhook-id`; a row
//!   parked after it learnt the stored chains could be overtaken by its deliveries).

mod context;
mod offsets;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::FutureExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use self::context::{tpl_of, RelayContext};
use self::offsets::{Read, Tracker};
use crate::config::Settings;
use crate::delivery::dead_letter::{dead_letter, parse_source, source_of, Cause, DeadLetterSink, SinkFuture};
use crate::delivery::engine::Engine;
use crate::delivery::job::{Ack, Job};
use crate::domain::{now_ms, Envelope};
use crate::metrics::Metrics;
use crate::runs::commands::async_trait_free::CommandSinkFuture;
use crate::runs::commands::CommandSink;
use crate::store::NewDeadLetter;

type Tp = (String, i32);

/// Offsets re-read before the first one not taken when a partition is assigned or resumes
/// (see `context` and `Tracker::finish`); at least a producer's record batch.
const RESUME_REWIND: i64 = 1000;
/// …but no more offsets than hold this many bytes of messages taken (a record batch is at most
/// about 1 MiB: Kafka's default `message.max.bytes`).
const RESUME_REWIND_BYTES: usize = 1024 * 1024;

/// Messages read at once before the run lifecycle is consulted for all of them.
const READ_BATCH: usize = 256;

/// A message as read, before it is decoded.
struct Incoming {
    raw: Arc<Vec<u8>>,
    tp: Tp,
    offset: i64,
    generation: u64,
}

/// The acknowledgement of one message, shared by its deliveries: the message is finished
/// when every one of them is.
pub struct OffsetAck {
    bus: Weak<KafkaBus>,
    raw: Arc<Vec<u8>>,
    tp: Tp,
    offset: i64,
    generation: u64,
    remaining: AtomicUsize,
}

impl Ack for OffsetAck {
    fn current(&self) -> bool {
        self.bus
            .upgrade()
            .is_some_and(|b| b.tracker.is_current(&self.tp, self.generation))
    }

    fn done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(bus) = self.bus.upgrade() {
                bus.finish(&self.tp, self.offset, self.generation);
            }
        }
    }

    fn original(&self) -> Option<Arc<Vec<u8>>> {
        Some(self.raw.clone())
    }
}

pub struct KafkaBus {
    consumer: Arc<StreamConsumer<RelayContext>>,
    producer: FutureProducer,
    tracker: Arc<Tracker>,
    topics: Vec<String>,
    events_topic: String,
    commands_topic: String,
    dlq_topic: String,
    produce_timeout: Duration,
    max_event_bytes: usize,
    metrics: Metrics,
    /// Partitions were just assigned (set by the rebalance callback, see `run`).
    assigned: Arc<std::sync::atomic::AtomicBool>,
    /// Itself, for the acknowledgements it hands out.
    me: Weak<KafkaBus>,
}

fn client_config(settings: &Settings) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in &settings.bus.kafka.librdkafka {
        cfg.set(k, v.to_string());
    }
    cfg
}

impl KafkaBus {
    pub fn new(settings: &Settings, metrics: Metrics) -> anyhow::Result<Arc<KafkaBus>> {
        let k = &settings.bus.kafka;
        let tracker = Arc::new(Tracker::new(
            k.max_buffered_per_partition,
            k.max_buffered_bytes_per_partition,
            metrics.clone(),
        ));
        let assigned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut ccfg = client_config(settings);
        ccfg.set("group.id", &k.group_id);
        // Our defaults, unless the operator set them.
        for (key, value) in [
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "100"),
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            ("enable.partition.eof", "false"),
            // How long the broker may hold a fetch when it has nothing new. Kafka answers as
            // soon as data arrives; brokers that wait the full time (tansu) add it to every
            // event's latency, so keep it short.
            ("fetch.wait.max.ms", "100"),
        ] {
            if !k.librdkafka.contains_key(key) {
                ccfg.set(key, value);
            }
        }
        // Not negotiable: an offset is stored only once its event is finished.
        ccfg.set("enable.auto.offset.store", "false");
        let consumer: StreamConsumer<RelayContext> = ccfg
            .create_with_context(RelayContext {
                tracker: tracker.clone(),
                metrics: metrics.clone(),
                assigned: assigned.clone(),
            })
            .context("creating the Kafka consumer (check bus.kafka.librdkafka)")?;
        let topics: Vec<&str> = k.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).context("subscribing to bus.kafka.topics")?;

        let mut pcfg = ClientConfig::new();
        for (key, v) in &k.librdkafka {
            // Consumer-only properties would only produce warnings on the producer.
            if is_consumer_only(key) {
                continue;
            }
            pcfg.set(key, v.to_string());
        }
        if !k.librdkafka.contains_key("message.timeout.ms") {
            pcfg.set("message.timeout.ms", k.produce_timeout_ms.to_string());
        }
        if !k.librdkafka.contains_key("linger.ms") {
            pcfg.set("linger.ms", "2");
        }
        let producer: FutureProducer = pcfg.create().context("creating the Kafka producer")?;
        Ok(Arc::new_cyclic(|me| KafkaBus {
            consumer: Arc::new(consumer),
            producer,
            tracker,
            topics: k.topics.clone(),
            events_topic: k.topics[0].clone(),
            commands_topic: k.commands_topic.clone(),
            dlq_topic: k.dlq_topic.clone(),
            produce_timeout: Duration::from_millis(k.produce_timeout_ms),
            max_event_bytes: settings.events.max_event_bytes,
            metrics,
            assigned,
            me: me.clone(),
        }))
    }

    /// Produce one event to the events topic, keyed by its run (so a run stays on one
    /// partition), and wait for the broker's acknowledgement.
    pub async fn produce_event(&self, e: &Envelope) -> anyhow::Result<()> {
        let key = e.sync_job_run_id.clone().unwrap_or_else(|| e.id.clone());
        let payload = e.to_json_text();
        self.producer
            .send(
                FutureRecord::to(&self.events_topic).key(&key).payload(&payload),
                self.produce_timeout,
            )
            .await
            .map_err(|(err, _)| anyhow::anyhow!("producing to {}: {err}", self.events_topic))?;
        Ok(())
    }

    /// A real round trip to the brokers (readiness).
    pub async fn ping(&self) -> anyhow::Result<()> {
        let consumer = self.consumer.clone();
        let topic = self.topics[0].clone();
        tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(3))
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("kafka metadata: {e}"))
        })
        .await?
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish_dlq(
        &self,
        raw: &[u8],
        key: Option<&[u8]>,
        reason: &str,
        attempts: i64,
        last_status: Option<i64>,
        topic: &str,
        partition: &str,
        offset: &str,
    ) -> anyhow::Result<()> {
        let attempts = attempts.to_string();
        let status = last_status.map(|s| s.to_string()).unwrap_or_default();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "x-dlq-reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "x-dlq-attempts",
                value: Some(&attempts),
            })
            .insert(Header {
                key: "x-dlq-last-status",
                value: Some(&status),
            })
            .insert(Header {
                key: "x-dlq-source-topic",
                value: Some(topic),
            })
            .insert(Header {
                key: "x-dlq-source-partition",
                value: Some(partition),
            })
            .insert(Header {
                key: "x-dlq-source-offset",
                value: Some(offset),
            });
        let mut rec = FutureRecord::to(&self.dlq_topic).payload(raw).headers(headers);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        self.producer
            .send(rec, self.produce_timeout)
            .await
            .map_err(|(err, _)| anyhow::anyhow!("producing to {}: {err}", self.dlq_topic))?;
        Ok(())
    }

    /// Consume until `stop`, then leave unfinished work to the next owner.
    pub async fn run(self: Arc<Self>, engine: Arc<Engine>, stop: CancellationToken) {
        // Store every partition's finished prefix again each second: a store can be lost to a
        // seek on resume or fail while a partition is in transition, and with no later event
        // finishing it would never be committed.
        let restore = {
            let me = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    for (tp, offset) in me.tracker.watermarks() {
                        me.store_offset(&tp, offset);
                    }
                }
            })
        };
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            // Take what librdkafka already holds too (up to a batch), so the run lifecycle is
            // consulted once per batch rather than once per message.
            let mut msgs = vec![first];
            while msgs.len() < READ_BATCH {
                match self.consumer.recv().now_or_never() {
                    Some(m) => msgs.push(m),
                    None => break,
                }
            }
            let mut items = Vec::with_capacity(msgs.len());
            for msg in msgs {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka consume error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let tp: Tp = (msg.topic().to_string(), msg.partition());
                let offset = msg.offset();
                let generation = self.tracker.generation(&tp);
                let bytes = msg.payload().map_or(0, <[u8]>::len);
                match self.tracker.begin(&tp, offset, bytes) {
                    Read::Skip => continue,
                    Read::Take => {}
                    Read::TakeAndPause => {
                        // Backpressure: stop fetching this partition until half its buffer
                        // (in events and in bytes) is finished; messages of it already on their
                        // way are skipped and fetched again from where it stopped (see `finish`). The loop keeps
                        // polling, so the consumer stays in its group however long it lasts.
                        tracing::debug!(partition = tp.1, offset, "partition buffer full; pausing it");
                        if let Err(e) = self.consumer.pause(&tpl_of(&tp, None)) {
                            tracing::warn!(error = %e, partition = tp.1, "pausing a partition failed");
                        }
                    }
                }
                items.push(Incoming {
                    raw: Arc::new(msg.payload().unwrap_or_default().to_vec()),
                    tp,
                    offset,
                    generation,
                });
            }
            if self.assigned.swap(false, std::sync::atomic::Ordering::SeqCst) {
                // Partitions were just assigned, perhaps taken over from another instance that
                // parked some of their chains in the shared store (and acknowledged them): this
                // instance's chains do not know those rows yet, and a memory delivery of such a
                // chain must queue behind them, not overtake them. Learn them before taking any
                // message of the new partitions (the callback ran inside `recv`, before they
                // were returned).
                loop {
                    match engine.store.active_order_keys().await {
                        Ok(keys) => {
                            engine.chains.note_stored(keys);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "reading stored chains after an assignment failed; retrying");
                            if stop.is_cancelled() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
            self.clone().accept(&engine, items).await;
        }
        restore.abort();
        tracing::info!("kafka consumer stopped taking messages");
    }

    /// After the delivery core stopped: commit the finished prefix synchronously and leave.
    /// Whatever is unfinished is redelivered by the partitions' next owner.
    pub async fn commit_final(&self) {
        for (tp, offset) in self.tracker.watermarks() {
            self.store_offset(&tp, offset);
        }
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit");
            }
        })
        .await;
    }

    fn ack(&self, m: &Incoming, n: usize) -> Arc<OffsetAck> {
        Arc::new(OffsetAck {
            bus: self.me.clone(),
            raw: m.raw.clone(),
            tp: m.tp.clone(),
            offset: m.offset,
            generation: m.generation,
            remaining: AtomicUsize::new(n),
        })
    }

    async fn accept(self: Arc<Self>, engine: &Arc<Engine>, items: Vec<Incoming>) {
        let now = now_ms();
        let mut good: Vec<(Incoming, Envelope)> = Vec::with_capacity(items.len());
        for m in items {
            match decode(&m.raw, self.max_event_bytes, now) {
                Ok(e) => {
                    self.metrics.kafka_messages.with_label_values(&["accepted"]).inc();
                    self.metrics.events_ingested.with_label_values(&["kafka"]).inc();
                    good.push((m, e));
                }
                Err((reason, detail)) => {
                    tracing::debug!(reason, detail, partition = m.tp.1, offset = m.offset, "poison message");
                    self.metrics.kafka_messages.with_label_values(&["poison"]).inc();
                    let dl = dead_letter(
                        reason,
                        Cause::Poison {
                            event_id: format!("kafka:{}:{}:{}", m.tp.0, m.tp.1, m.offset),
                            detail: &detail,
                            raw: &m.raw,
                        },
                    );
                    let ack: Arc<dyn Ack> = self.ack(&m, 1);
                    engine.dead_letter(
                        vec![dl],
                        Some(source_of(&m.tp.0, m.tp.1, m.offset)),
                        Some(m.raw.clone()),
                        Some(ack),
                    );
                }
            }
        }
        if good.is_empty() {
            return;
        }
        // The run lifecycle decides first (it may refuse an event, or queue events before or
        // after it on the same chains). A store error is retried; the messages stay unfinished.
        // A run's stop waits until the events decided here are queued (`Engine::run_gate`).
        let gate = engine.run_gate.read().await;
        let mut backoff = Duration::from_millis(50);
        let plans = loop {
            let events: Vec<&Envelope> = good.iter().map(|(_, e)| e).collect();
            match engine.plan_many(&events, now).await {
                Ok(p) => break p,
                Err(err) => {
                    if good.iter().all(|(m, _)| !self.tracker.is_current(&m.tp, m.generation)) {
                        return;
                    }
                    tracing::error!(error = %format!("{err:#}"), "planning events failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let finishing = crate::runs::service::finishing_runs(good.iter().map(|(_, e)| e));
        let alerting = crate::syncs::alerts::alert_runs(good.iter().map(|(_, e)| e));
        let mut jobs = Vec::new();
        let mut held = Vec::new();
        for ((m, _), (deliveries, dead, routed)) in good.into_iter().zip(plans) {
            if routed.status == "filtered" {
                self.metrics.events_filtered.inc();
            }
            // The message is finished when its deliveries are, and its dead letters stored.
            let parts = deliveries.len() + usize::from(!dead.is_empty());
            if parts == 0 {
                self.finish(&m.tp, m.offset, m.generation);
                continue;
            }
            let ack = self.ack(&m, parts);
            let source = source_of(&m.tp.0, m.tp.1, m.offset);
            if !dead.is_empty() {
                engine.dead_letter(dead, Some(source.clone()), Some(m.raw.clone()), Some(ack.clone()));
            }
            for mut d in deliveries {
                d.id = message_delivery_id(&source, &d);
                d.source = Some(source.clone());
                if engine.held_by_pause(&d) {
                    held.push((d, ack.clone() as Arc<dyn Ack>));
                } else {
                    jobs.push(Job::memory(d, ack.clone()));
                }
            }
        }
        engine.submit(jobs);
        // A paused sync's deliveries are held in the store, never attempted from memory.
        engine.store_held(held).await;
        drop(gate);
        if !alerting.is_empty() {
            let engine = engine.clone();
            tokio::spawn(async move { engine.sync_alerts(&alerting).await });
        }
        if !finishing.is_empty() {
            // Eloqua syncs whose run just finished: their callbacks (stored path, off this loop).
            let engine = engine.clone();
            tokio::spawn(async move { engine.eloqua_callbacks(&finishing).await });
        }
    }

    fn finish(&self, tp: &Tp, offset: i64, generation: u64) {
        let (store, resume) = self.tracker.finish(tp, offset, generation);
        if let Some(next) = store {
            self.store_offset(tp, next);
        }
        if let Some(from) = resume {
            // Fetch again from the first offset not read (what arrived while paused was
            // skipped), then resume.
            let tpl = tpl_of(tp, Some(from));
            if let Err(e) = self.consumer.seek_partitions(tpl.clone(), Duration::ZERO) {
                tracing::warn!(error = %e, partition = tp.1, "seeking a resumed partition failed");
            }
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::warn!(error = %e, partition = tp.1, "resuming a partition failed");
            }
            tracing::debug!(partition = tp.1, from, "partition resumed");
        }
    }

    fn store_offset(&self, tp: &Tp, next: i64) {
        if let Err(e) = self.consumer.store_offsets(&tpl_of(tp, Some(next))) {
            tracing::debug!(error = %e, partition = tp.1, "storing offset failed (partition no longer assigned?)");
        }
    }
}

impl DeadLetterSink for KafkaBus {
    fn publish<'a>(
        &'a self,
        dead: &'a NewDeadLetter,
        source: Option<&'a str>,
        original: Option<&'a [u8]>,
    ) -> SinkFuture<'a> {
        Box::pin(async move {
            let (topic, partition, offset) = source.and_then(parse_source).unwrap_or(("", "", ""));
            self.publish_dlq(
                original.unwrap_or(dead.raw.as_bytes()),
                None,
                dead.reason,
                dead.attempts,
                dead.last_status,
                topic,
                partition,
                offset,
            )
            .await
        })
    }
}

impl CommandSink for KafkaBus {
    fn publish(&self, key: &str, command: serde_json::Value) -> CommandSinkFuture<'_> {
        let key = key.to_string();
        Box::pin(async move {
            let payload = command.to_string();
            self.producer
                .send(
                    FutureRecord::to(&self.commands_topic).key(&key).payload(&payload),
                    self.produce_timeout,
                )
                .await
                .map_err(|(err, _)| anyhow::anyhow!("producing to {}: {err}", self.commands_topic))?;
            Ok(())
        })
    }
}

fn is_consumer_only(key: &str) -> bool {
    key.starts_with("enable.auto.")
        || key.starts_with("auto.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("max.poll.")
        || key.starts_with("fetch.")
        || key.starts_with("partition.assignment")
        || key.starts_with("group.")
        || key.starts_with("isolation.")
        || key == "enable.partition.eof"
        // Only the consumer's statistics feed the lag metrics.
        || key == "statistics.interval.ms"
        || key == "check.crcs"
        || key == "queued.min.messages"
        || key == "queued.max.messages.kbytes"
}

/// Decode a message value into an event, or the dead-letter reason and a detail.
fn decode(raw: &[u8], max_bytes: usize, now: i64) -> Result<Envelope, (&'static str, String)> {
    if raw.len() > max_bytes {
        return Err(("event_too_large", format!("{} bytes > {max_bytes}", raw.len())));
    }
    let text = std::str::from_utf8(raw).map_err(|e| ("malformed", format!("not UTF-8: {e}")))?;
    Envelope::parse_text(text, now, false).map_err(|e| ("malformed", e.to_string()))
}

/// The id of a delivery made from a Kafka message: the same each time the message is read (it
/// is read again after a crash that came before its offset was committed), so the store knows a
/// delivery it already recorded and a run does not count it twice. A name-based UUID (version 8:
/// SHA-256 of the message's place, the event and the target).
fn message_delivery_id(source: &str, d: &crate::store::NewDelivery) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [
        source,
        d.event_id.as_str(),
        d.kind,
        d.webhook_id.as_deref().unwrap_or(""),
        d.target_url.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize()[..16]);
    uuid::Builder::from_custom_bytes(b).into_uuid().to_string()
}
