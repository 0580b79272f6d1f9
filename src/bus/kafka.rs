//! Kafka as the bus (the only module that knows rdkafka).
//!
//! Consumption is at least once, ordered per run, parallel across runs and partitions:
//!
//! - Each consumed message is decoded and routed; a poison message (not UTF-8 or JSON, missing or
//!   ill-typed fields, over the size limit, unknown webhook or run) goes to the dead-letter topic
//!   with `x-dlq-*` headers on first sight and counts as finished.
//! - Every delivery of a message becomes a job on the queue of its *chain* (target + run id);
//!   one task per non-empty chain works its queue in order, so a run's events reach a webhook
//!   one at a time while other chains — other runs of the same partition included — proceed.
//! - A partition's offset is stored (and auto-committed by librdkafka) only up to the lowest
//!   unfinished offset: never past an event that is not yet delivered, dead-lettered or parked.
//! - A failing delivery gets `bus.kafka.inline_attempts` attempts in memory; then it is *parked*:
//!   written to the store's retry queue with its schedule, and so are the later events of its
//!   chain (the store keeps chains in order). Parking finishes the message, so the committed
//!   offset moves on and a receiver down for an hour costs stored rows, not consumer lag. The
//!   store's dispatcher (the same engine as the embedded bus) delivers parked events when due.
//! - Buffered (unfinished) messages per partition are bounded; at the bound the consumer reads
//!   nothing more until half of that partition's buffered messages have finished.
//! - On revoke, jobs of the revoked partitions are dropped before their next attempt (the new
//!   owner redelivers them from the committed offset, same `webhook-id`); librdkafka commits the
//!   stored (finished) prefix as part of the rebalance.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::FutureExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::async_trait_free::CommandSinkFuture;
use super::CommandSink;
use crate::config::Settings;
use crate::delivery::engine::Engine;
use crate::delivery::retry::{classify, result_label, Verdict};
use crate::domain::{now_ms, Envelope};
use crate::group_commit::GroupCommit;
use crate::metrics::Metrics;
use crate::store::{AttemptRecord, NewDeadLetter, NewDelivery};

type Tp = (String, i32);

/// What to do with a message just read.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Take,
    /// Take it; its partition's buffer is now full: pause the partition.
    TakeAndPause,
    Skip,
}

/// Per-partition bookkeeping: which offsets are read but unfinished.
#[derive(Default)]
struct PartitionState {
    pending: BTreeSet<i64>,
    /// One past the highest offset read.
    next: i64,
    /// The offset last stored for commit.
    stored: i64,
    paused: bool,
    /// Bumped on every assign and revoke: jobs of an older generation are stale.
    generation: u64,
    assigned: bool,
}

/// Shared between the consumer loop, the chain workers and the rebalance callbacks.
pub struct Tracker {
    parts: Mutex<HashMap<Tp, PartitionState>>,
    max_buffered: usize,
    metrics: Metrics,
}

impl Tracker {
    fn generation(&self, tp: &Tp) -> u64 {
        self.parts
            .lock()
            .expect("lock")
            .get(tp)
            .map(|p| p.generation)
            .unwrap_or(0)
    }

    fn is_current(&self, tp: &Tp, generation: u64) -> bool {
        self.parts
            .lock()
            .expect("lock")
            .get(tp)
            .is_some_and(|p| p.assigned && p.generation == generation)
    }

    /// A message was read: take it (and pause its partition when its buffer is now full), or
    /// skip it (read while its partition is paused, or already read: it is fetched again
    /// from `next` when the partition resumes).
    fn begin(&self, tp: &Tp, offset: i64) -> Read {
        let mut parts = self.parts.lock().expect("lock");
        let p = parts.entry(tp.clone()).or_default();
        if p.paused || (p.next > 0 && offset < p.next) {
            return Read::Skip;
        }
        if p.pending.is_empty() && p.next == 0 {
            p.stored = offset;
            tracing::info!(topic = %tp.0, partition = tp.1, offset, "first message after assignment");
        } else if offset > p.next {
            // Compacted topics and transaction markers leave gaps; anything else is worth a look.
            tracing::warn!(topic = %tp.0, partition = tp.1, expected = p.next, got = offset, "offset gap");
        }
        p.pending.insert(offset);
        p.next = p.next.max(offset + 1);
        if p.pending.len() >= self.max_buffered {
            p.paused = true;
            self.metrics.kafka_paused_partitions.inc();
            return Read::TakeAndPause;
        }
        Read::Take
    }

    /// A message is finished. Returns the offset to store when the contiguous finished prefix
    /// advanced, and the offset to resume reading from when the partition may resume.
    fn finish(&self, tp: &Tp, offset: i64, generation: u64) -> (Option<i64>, Option<i64>) {
        let mut parts = self.parts.lock().expect("lock");
        let Some(p) = parts.get_mut(tp) else {
            return (None, None);
        };
        if p.generation != generation {
            return (None, None);
        }
        p.pending.remove(&offset);
        let watermark = p.pending.first().copied().unwrap_or(p.next);
        let store = (watermark > p.stored).then(|| {
            if watermark / 250 != p.stored / 250 {
                tracing::debug!(topic = %tp.0, partition = tp.1, watermark, "offset stored");
            }
            p.stored = watermark;
            watermark
        });
        let resume = p.paused && p.pending.len() <= self.max_buffered / 2;
        if resume {
            p.paused = false;
            self.metrics.kafka_paused_partitions.dec();
        }
        // Resume a little before the first offset not taken; what was taken already is
        // skipped as it comes again. Kafka answers a fetch inside a record batch with that
        // batch, but some brokers (tansu 0.6) answer with the next one, which would skip the
        // rest of the batch.
        (
            store,
            resume.then_some(p.next.saturating_sub(RESUME_REWIND).max(p.stored)),
        )
    }

    /// The offset stored for commit of every assigned partition that has read something.
    fn watermarks(&self) -> Vec<(Tp, i64)> {
        self.parts
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, p)| p.assigned && p.next > 0)
            .map(|(tp, p)| (tp.clone(), p.stored))
            .collect()
    }

    fn assign(&self, tps: &[Tp]) {
        let mut parts = self.parts.lock().expect("lock");
        for tp in tps {
            let p = parts.entry(tp.clone()).or_default();
            if p.paused {
                self.metrics.kafka_paused_partitions.dec();
            }
            let generation = p.generation + 1;
            *p = PartitionState {
                generation,
                assigned: true,
                ..Default::default()
            };
        }
    }

    fn revoke(&self, tps: &[Tp]) {
        let mut parts = self.parts.lock().expect("lock");
        for tp in tps {
            if let Some(p) = parts.get_mut(tp) {
                if p.paused {
                    self.metrics.kafka_paused_partitions.dec();
                }
                p.generation += 1;
                p.assigned = false;
                p.paused = false;
                p.pending.clear();
            }
        }
    }
}

/// Rebalance and statistics callbacks.
pub struct RelayContext {
    tracker: Arc<Tracker>,
    metrics: Metrics,
}

/// A one-partition list, at `offset` when given.
fn tpl_of(tp: &Tp, offset: Option<i64>) -> TopicPartitionList {
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

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
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
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
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
            self.tracker.assign(&tps);
            self.metrics.kafka_assigned_partitions.add(tps.len() as i64);
        }
    }
}

/// Offsets re-read before the first one not taken when a paused partition resumes (see
/// `Tracker::finish`); at least a producer's record batch.
const RESUME_REWIND: i64 = 1000;

/// How long a chain known to be parked is trusted without asking the store.
const PARKED_RECHECK: Duration = Duration::from_secs(1);

/// Messages read at once before the run lifecycle is consulted for all of them.
const READ_BATCH: usize = 256;

/// A message as read, before it is decoded.
struct Incoming {
    raw: Arc<Vec<u8>>,
    key: Option<Vec<u8>>,
    tp: Tp,
    offset: i64,
    generation: u64,
}

/// One delivery of one consumed message.
struct Job {
    delivery: NewDelivery,
    tp: Tp,
    offset: i64,
    generation: u64,
    /// Deliveries of the same message still unfinished; the message finishes at zero.
    remaining: Arc<AtomicUsize>,
    raw: Arc<Vec<u8>>,
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
    inline_attempts: u32,
    inline_max_delay: Duration,
    max_event_bytes: usize,
    /// Chains with a worker: their queued jobs.
    chains: Mutex<HashMap<String, VecDeque<Job>>>,
    /// Chains with deliveries parked in the store (their new events queue behind them), with
    /// when the store last confirmed it.
    parked: Mutex<HashMap<String, std::time::Instant>>,
    /// Parking from many chains at once shares one store transaction.
    parking: GroupCommit<NewDelivery>,
    global: Arc<Semaphore>,
    per_target: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_target_cap: usize,
    metrics: Metrics,
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
        let tracker = Arc::new(Tracker {
            parts: Mutex::new(HashMap::new()),
            max_buffered: k.max_buffered_per_partition,
            metrics: metrics.clone(),
        });
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
        let d = &settings.delivery;
        Ok(Arc::new(KafkaBus {
            consumer: Arc::new(consumer),
            producer,
            tracker,
            topics: k.topics.clone(),
            events_topic: k.topics[0].clone(),
            commands_topic: k.commands_topic.clone(),
            dlq_topic: k.dlq_topic.clone(),
            produce_timeout: Duration::from_millis(k.produce_timeout_ms),
            inline_attempts: k.inline_attempts,
            inline_max_delay: Duration::from_millis(k.inline_max_delay_ms),
            max_event_bytes: settings.events.max_event_bytes,
            chains: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            parking: GroupCommit::default(),
            global: Arc::new(Semaphore::new(d.max_in_flight)),
            per_target: Mutex::new(HashMap::new()),
            per_target_cap: d.max_in_flight_per_webhook,
            metrics,
        }))
    }

    /// Produce one event to the events topic, keyed by its run (so a run stays on one
    /// partition), and wait for the broker's acknowledgement.
    pub async fn produce_event(&self, e: &Envelope) -> anyhow::Result<()> {
        let key = e.sync_job_run_id.clone().unwrap_or_else(|| e.id.clone());
        let payload = e.to_json().to_string();
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
        tp: &Tp,
        offset: i64,
    ) -> anyhow::Result<()> {
        let attempts = attempts.to_string();
        let status = last_status.map(|s| s.to_string()).unwrap_or_default();
        let partition = tp.1.to_string();
        let offset = offset.to_string();
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
                value: Some(&tp.0),
            })
            .insert(Header {
                key: "x-dlq-source-partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "x-dlq-source-offset",
                value: Some(&offset),
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
        match engine.store.active_order_keys().await {
            Ok(keys) => {
                let now = std::time::Instant::now();
                self.parked
                    .lock()
                    .expect("lock")
                    .extend(keys.into_iter().map(|k| (k, now)))
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "loading parked chains failed"),
        }
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
                match self.tracker.begin(&tp, offset) {
                    Read::Skip => continue,
                    Read::Take => {}
                    Read::TakeAndPause => {
                        // Backpressure: stop fetching this partition until half its buffer
                        // is finished; messages of it already on their way are skipped and
                        // fetched again from where it stopped (see `finish`). The loop keeps
                        // polling, so the consumer stays in its group however long it lasts.
                        tracing::debug!(partition = tp.1, offset, "partition buffer full; pausing it");
                        if let Err(e) = self.consumer.pause(&tpl_of(&tp, None)) {
                            tracing::warn!(error = %e, partition = tp.1, "pausing a partition failed");
                        }
                    }
                }
                items.push(Incoming {
                    raw: Arc::new(msg.payload().unwrap_or_default().to_vec()),
                    key: msg.key().map(|k| k.to_vec()),
                    tp,
                    offset,
                    generation,
                });
            }
            self.clone().accept(&engine, items).await;
        }
        restore.abort();
        tracing::info!("kafka consumer stopped taking messages");
    }

    /// After `run` returned: let in-flight chains finish within `deadline`, then commit the
    /// finished prefix synchronously. Whatever is unfinished is redelivered after restart.
    pub async fn drain(&self, deadline: Duration) {
        let until = std::time::Instant::now() + deadline;
        while !self.chains.lock().expect("lock").is_empty() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.chains.lock().expect("lock").len();
        if left > 0 {
            tracing::warn!(
                chains = left,
                "shutdown deadline passed; unfinished events will be redelivered"
            );
        }
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit");
            }
        })
        .await;
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
                    self.metrics.dead_letters.with_label_values(&[reason]).inc();
                    self.poison(
                        engine,
                        &m.raw,
                        m.key.as_deref(),
                        reason,
                        &detail,
                        &m.tp,
                        m.offset,
                        m.generation,
                    )
                    .await;
                }
            }
        }
        if good.is_empty() {
            return;
        }
        // The run lifecycle decides first (it may refuse an event, or queue events before or
        // after it on the same chains). A store error is retried; the messages stay unfinished.
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
        for ((m, e), (deliveries, dead, routed)) in good.into_iter().zip(plans) {
            if !dead.is_empty() {
                // The store's dead letters, so they can be inspected and replayed through the API.
                for d in &dead {
                    self.metrics.dead_letters.with_label_values(&[d.reason]).inc();
                }
                if let Err(err) = engine.store.enqueue(&[], &dead, now).await {
                    tracing::error!(error = %format!("{err:#}"), "recording a dead letter failed");
                }
            }
            if let Some(reason) = dead.iter().find(|d| d.event_id == e.id).map(|d| d.reason) {
                // Unroutable or refused: dead-letter topic on first sight.
                if let Err(err) = self
                    .publish_dlq(&m.raw, m.key.as_deref(), reason, 0, None, &m.tp, m.offset)
                    .await
                {
                    tracing::error!(error = %format!("{err:#}"), "dead-letter topic publish failed");
                }
            }
            if routed.status == "filtered" {
                self.metrics.events_filtered.inc();
            }
            if deliveries.is_empty() {
                self.finish(&m.tp, m.offset, m.generation);
                continue;
            }
            let remaining = Arc::new(AtomicUsize::new(deliveries.len()));
            for d in deliveries {
                let job = Job {
                    delivery: d,
                    tp: m.tp.clone(),
                    offset: m.offset,
                    generation: m.generation,
                    remaining: remaining.clone(),
                    raw: m.raw.clone(),
                };
                self.clone().enqueue(engine.clone(), job);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn poison(
        &self,
        engine: &Arc<Engine>,
        raw: &[u8],
        key: Option<&[u8]>,
        reason: &'static str,
        detail: &str,
        tp: &Tp,
        offset: i64,
        generation: u64,
    ) {
        // Keep a copy in the store too (as text when it is UTF-8), for GET /dead-letters.
        let dl = NewDeadLetter {
            delivery_id: None,
            event_id: format!("kafka:{}:{}:{}", tp.0, tp.1, offset),
            event: "unknown:unknown".into(),
            webhook_id: None,
            kind: "webhook",
            reason,
            attempts: 0,
            last_status: None,
            last_error: Some(detail.chars().take(500).collect()),
            raw: serde_json::Value::String(String::from_utf8_lossy(&raw[..raw.len().min(64 * 1024)]).into_owned())
                .to_string(),
        };
        if let Err(err) = engine.store.enqueue(&[], &[dl], now_ms()).await {
            tracing::error!(error = %format!("{err:#}"), "recording a poison message failed");
        }
        // The partition moves on only once the dead-letter topic has it.
        let mut backoff = Duration::from_millis(100);
        while let Err(err) = self.publish_dlq(raw, key, reason, 0, None, tp, offset).await {
            if !self.tracker.is_current(tp, generation) {
                return;
            }
            tracing::error!(error = %format!("{err:#}"), "dead-letter topic publish failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.finish(tp, offset, generation);
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

    fn job_done(&self, job: &Job) {
        if job.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(&job.tp, job.offset, job.generation);
        }
    }

    /// Queue a job on its chain; start the chain's worker when it has none.
    fn enqueue(self: Arc<Self>, engine: Arc<Engine>, job: Job) {
        let chain = job
            .delivery
            .order_key
            .clone()
            .unwrap_or_else(|| job.delivery.id.clone());
        let start = {
            let mut chains = self.chains.lock().expect("lock");
            match chains.get_mut(&chain) {
                Some(q) => {
                    q.push_back(job);
                    None
                }
                None => {
                    chains.insert(chain.clone(), VecDeque::new());
                    Some(job)
                }
            }
        };
        if let Some(first) = start {
            tokio::spawn(self.work_chain(engine, chain, first));
        }
    }

    async fn work_chain(self: Arc<Self>, engine: Arc<Engine>, chain: String, first: Job) {
        let mut next = Some(first);
        while let Some(job) = next {
            self.process(&engine, job).await;
            let mut chains = self.chains.lock().expect("lock");
            next = chains.get_mut(&chain).and_then(VecDeque::pop_front);
            if next.is_none() {
                chains.remove(&chain);
            }
        }
    }

    fn target_permit(&self, target_key: &str) -> Arc<Semaphore> {
        self.per_target
            .lock()
            .expect("lock")
            .entry(target_key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_target_cap)))
            .clone()
    }

    async fn process(&self, engine: &Arc<Engine>, job: Job) {
        if !self.tracker.is_current(&job.tp, job.generation) {
            // Revoked: the next owner delivers it from the committed offset.
            return;
        }
        let d = &job.delivery;
        // Behind a parked event of its chain? Then it queues behind it in the store.
        if let Some(k) = &d.order_key {
            let confirmed = self.parked.lock().expect("lock").get(k).copied();
            if let Some(at) = confirmed {
                // Recently confirmed: park without asking the store again (queueing behind a
                // chain that has just drained costs a little latency, never order).
                if at.elapsed() < PARKED_RECHECK {
                    return self.park(engine, job, 0, None, None).await;
                }
                match engine.store.has_active(k).await {
                    Ok(true) => return self.park(engine, job, 0, None, None).await,
                    Ok(false) => {
                        self.parked.lock().expect("lock").remove(k);
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "store check failed; parking");
                        return self.park(engine, job, 0, None, None).await;
                    }
                }
            }
        }
        if engine.target_unhealthy(&d.target_key) {
            // The receiver failed recently: don't hold the partition, let the store's retry
            // schedule probe it.
            return self.park(engine, job, 0, None, None).await;
        }
        let target = self.target_permit(&d.target_key);
        let Ok(_tp) = target.acquire_owned().await else { return };
        let Ok(_gp) = self.global.clone().acquire_owned().await else {
            return;
        };
        let mut attempts: i64 = 0;
        let mut first_at = None;
        loop {
            if !self.tracker.is_current(&job.tp, job.generation) {
                return;
            }
            let now = now_ms();
            let (url, secrets) = match engine.target(d.kind, d.webhook_id.as_deref(), d.target_url.as_deref(), now) {
                Ok(t) => t,
                Err(reason) => {
                    return self
                        .dead(engine, job, reason, attempts, None, Some(reason.into()))
                        .await
                }
            };
            first_at.get_or_insert(now);
            attempts += 1;
            self.metrics.in_flight.inc();
            // A run's completed/failed carries the run's final counts, computed now.
            let body = engine
                .attempt_body(&d.event, d.run_id.as_deref(), &d.body)
                .await
                .unwrap_or_else(|| d.body.clone());
            let a = engine.send(&url, &secrets, &d.event_id, attempts, body).await;
            self.metrics.in_flight.dec();
            let kind = d.kind;
            self.metrics
                .attempts
                .with_label_values(&[result_label(&a.result), kind])
                .inc();
            self.metrics
                .attempt_duration
                .with_label_values(&[kind])
                .observe(a.duration.as_secs_f64());
            let status = a.status.map(i64::from);
            if let Some(run) = d.run_id.as_deref() {
                if Engine::stops_run(d.kind, &d.event, a.status) && engine.stop_run(run, "started answered 400").await {
                    return self.dead(engine, job, "run_stopped", attempts, status, a.error).await;
                }
            }
            let verdict = classify(&a.result);
            engine.note_health(&d.target_key, verdict == Verdict::Delivered);
            match verdict {
                Verdict::Delivered => {
                    engine
                        .run_outcome(d.kind, &d.event, d.run_id.as_deref(), &d.body, true)
                        .await;
                    self.metrics.deliveries.with_label_values(&["delivered", kind]).inc();
                    self.metrics.attempts_per_delivery.observe(attempts as f64);
                    self.metrics
                        .end_to_end_latency
                        .observe((now_ms() - d.created_at).max(0) as f64 / 1000.0);
                    self.job_done(&job);
                    return;
                }
                Verdict::DeadLetter { reason } => {
                    return self.dead(engine, job, reason, attempts, status, a.error).await;
                }
                Verdict::DisableWebhook => {
                    if let Some(id) = &d.webhook_id {
                        if d.kind == "webhook" {
                            engine.disable_webhook(id).await;
                        }
                    }
                    return self
                        .dead(engine, job, "webhook_disabled", attempts, status, a.error)
                        .await;
                }
                Verdict::Retry { not_before } => {
                    let elapsed = Duration::from_millis((now_ms() - first_at.unwrap_or(now)).max(0) as u64);
                    let Some(delay) = engine.policy().next_delay(attempts as u32, elapsed, not_before) else {
                        return self
                            .dead(engine, job, "attempts_exhausted", attempts, status, a.error)
                            .await;
                    };
                    self.metrics.retries.with_label_values(&[kind]).inc();
                    if attempts >= self.inline_attempts as i64 || delay > self.inline_max_delay {
                        let record = AttemptRecord {
                            started_at: now,
                            duration_ms: a.duration.as_millis() as i64,
                            status,
                            error: a.error.clone(),
                            excerpt: a.excerpt.clone(),
                        };
                        let at = now_ms() + delay.as_millis() as i64;
                        return self
                            .park(engine, job, attempts, first_at.map(|f| (f, at)), Some(record))
                            .await;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Move a job to the store's retry queue; the message is then finished.
    async fn park(
        &self,
        engine: &Arc<Engine>,
        mut job: Job,
        attempts: i64,
        schedule: Option<(i64, i64)>,
        _last: Option<AttemptRecord>,
    ) {
        job.delivery.attempts = attempts;
        if let Some((first, at)) = schedule {
            job.delivery.first_attempt_at = Some(first);
            job.delivery.next_attempt_at = Some(at);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let res = self
                .parking
                .submit(job.delivery.clone(), |rows| async move {
                    engine.store.enqueue(&rows, &[], now_ms()).await
                })
                .await;
            match res {
                Ok(()) => break,
                Err(e) => {
                    if !self.tracker.is_current(&job.tp, job.generation) {
                        return;
                    }
                    tracing::error!(error = %format!("{e:#}"), "parking failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Some(k) = &job.delivery.order_key {
            self.parked
                .lock()
                .expect("lock")
                .insert(k.clone(), std::time::Instant::now());
        }
        self.metrics.parked.inc();
        engine.notify();
        self.job_done(&job);
    }

    async fn dead(
        &self,
        engine: &Arc<Engine>,
        job: Job,
        reason: &'static str,
        attempts: i64,
        last_status: Option<i64>,
        last_error: Option<String>,
    ) {
        let d = &job.delivery;
        self.metrics
            .deliveries
            .with_label_values(&["dead_lettered", d.kind])
            .inc();
        self.metrics.dead_letters.with_label_values(&[reason]).inc();
        let dl = NewDeadLetter {
            delivery_id: None,
            event_id: d.event_id.clone(),
            event: d.event.clone(),
            webhook_id: d.webhook_id.clone(),
            kind: d.kind,
            reason,
            attempts,
            last_status,
            last_error,
            raw: String::from_utf8_lossy(&job.raw).into_owned(),
        };
        if let Err(e) = engine.store.enqueue(&[], &[dl], now_ms()).await {
            tracing::error!(error = %format!("{e:#}"), "recording a dead letter failed");
        }
        if let Err(e) = self
            .publish_dlq(&job.raw, None, reason, attempts, last_status, &job.tp, job.offset)
            .await
        {
            tracing::error!(error = %format!("{e:#}"), "dead-letter topic publish failed");
        }
        engine
            .run_outcome(d.kind, &d.event, d.run_id.as_deref(), &d.body, false)
            .await;
        self.job_done(&job);
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
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ("malformed", format!("not JSON: {e}")))?;
    Envelope::parse(v, now, false).map_err(|e| ("malformed", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(max: usize) -> Tracker {
        Tracker {
            parts: Mutex::new(HashMap::new()),
            max_buffered: max,
            metrics: Metrics::new(),
        }
    }

    #[test]
    fn offsets_are_stored_only_for_the_contiguous_finished_prefix() {
        let t = tracker(100);
        let tp: Tp = ("t".into(), 0);
        t.assign(std::slice::from_ref(&tp));
        let g = t.generation(&tp);
        for o in 10..15 {
            t.begin(&tp, o);
        }
        // 11 and 12 finish first: nothing can be stored while 10 is unfinished.
        assert_eq!(t.finish(&tp, 11, g).0, None);
        assert_eq!(t.finish(&tp, 12, g).0, None);
        // 10 finishes: the prefix 10..=12 is done, the next offset to read is 13.
        assert_eq!(t.finish(&tp, 10, g).0, Some(13));
        assert_eq!(t.finish(&tp, 14, g).0, None);
        assert_eq!(t.finish(&tp, 13, g).0, Some(15));
    }

    #[test]
    fn a_partition_pauses_at_the_bound_skips_what_arrives_paused_and_resumes_where_it_stopped() {
        let t = tracker(4);
        let tp: Tp = ("t".into(), 1);
        t.assign(std::slice::from_ref(&tp));
        let g = t.generation(&tp);
        assert_eq!(t.begin(&tp, 0), Read::Take);
        assert_eq!(t.begin(&tp, 1), Read::Take);
        assert_eq!(t.begin(&tp, 2), Read::Take);
        assert_eq!(t.begin(&tp, 3), Read::TakeAndPause, "pauses at 4 buffered");
        // Already fetched before the pause took effect: skipped, read again after resuming.
        assert_eq!(t.begin(&tp, 4), Read::Skip);
        assert_eq!(t.begin(&tp, 5), Read::Skip);
        assert_eq!(t.finish(&tp, 0, g).1, None);
        assert_eq!(
            t.finish(&tp, 1, g).1,
            Some(2),
            "resumes at 2 buffered, rewound (at most to the first unfinished offset)"
        );
        assert_eq!(t.begin(&tp, 2), Read::Skip, "taken before the pause");
        assert_eq!(t.begin(&tp, 3), Read::Skip);
        assert_eq!(t.begin(&tp, 4), Read::Take);
        // A stale copy of an offset already read is never taken twice.
        assert_eq!(t.begin(&tp, 2), Read::Skip);
    }

    #[test]
    fn revoked_work_is_stale_and_cannot_store_offsets() {
        let t = tracker(10);
        let tp: Tp = ("t".into(), 2);
        t.assign(std::slice::from_ref(&tp));
        let g = t.generation(&tp);
        t.begin(&tp, 5);
        t.revoke(std::slice::from_ref(&tp));
        assert!(!t.is_current(&tp, g));
        assert_eq!(t.finish(&tp, 5, g), (None, None));
        t.assign(std::slice::from_ref(&tp));
        assert!(!t.is_current(&tp, g), "a new assignment is a new generation");
    }

    #[test]
    fn poison_is_classified() {
        assert_eq!(decode(b"\xff\xfe", 100, 0).unwrap_err().0, "malformed");
        assert_eq!(decode(b"{not json", 100, 0).unwrap_err().0, "malformed");
        assert_eq!(decode(br#"{"id":"a"}"#, 100, 0).unwrap_err().0, "malformed");
        assert_eq!(decode(&[b' '; 200], 100, 0).unwrap_err().0, "event_too_large");
    }
}
