//! The delivery core: one dispatcher for both buses. It takes jobs (one event × one target, see
//! `job`) from the store's queue and from the Kafka intake alike, starts them under a global and
//! a per-target cap on requests in progress, and hands each to the one attempt path
//! (`attempt`), whose outcome is recorded by the one outcome path (`outcome`).
//!
//! Concurrency shape:
//! - one dispatcher task takes jobs from an in-memory ready queue (`hot`: rows just committed
//!   ready, Kafka deliveries that became their chain's head, retries falling due in memory) and,
//!   when something may be waiting only in the store, from a query of due `ready` rows; targets
//!   at their cap are skipped (and excluded from the query), so a hanging receiver cannot
//!   starve the others;
//! - one task per attempt; its outcome goes to its chain's writer task (one of two, see
//!   `outcome::Writers`), which commits outcomes in batches (group commit). A stored row is
//!   released from the in-flight set only after its outcome is committed, so it is never picked
//!   twice, and a crash at any point leaves it `ready` to be attempted again (at least once,
//!   same `webhook-id`).
//! - the order of a run's events is kept by `ordering::Chains` (memory) and by the store's
//!   ready/waiting rows (stored): only a chain's head is ever handed to the dispatcher.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::client::DeliveryClient;
use super::dead_letter::DeadLetterSink;
use super::job::{Ack, Job};
use super::outcome::{Write, Writers};
use super::ready::Ready;
use super::retry::RetryPolicy;
use super::targets::Targets;
use crate::config::{LogMode, Settings};
use crate::domain::{now_ms, Envelope};
use crate::metrics::Metrics;
use crate::ordering::{Chains, Placement};
use crate::runs::commands::CommandSink;
use crate::runs::Runs;
use crate::signing::Secret;
use crate::store::{NewDeadLetter, NewDelivery, QueuedDelivery, Store, Webhook};

/// How often an instance looks whether the webhooks changed in the store (another instance
/// sharing it wrote them): one single-row read; a reload only when they did.
const REGISTRY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Webhooks by id, kept in step with the store by the API (this instance's writes) and by a
/// check of the store's webhook version every [`REGISTRY_CHECK_EVERY`] (other instances').
#[derive(Default)]
pub struct WebhookCache {
    map: RwLock<HashMap<String, Cached>>,
    /// Stamps this instance's own writes (`put`), so a reload that read the store before such
    /// a write never puts the older row back (compared by stamp, not by `updated_at`: hosts'
    /// clocks differ).
    writes: std::sync::atomic::AtomicU64,
}

/// A cached webhook, its target URL parsed once (not on every attempt), and the stamp of the
/// write that put it (0: loaded from the store).
struct Cached {
    w: Arc<Webhook>,
    url: Option<url::Url>,
    stamp: u64,
}

impl Cached {
    fn new(w: Webhook, stamp: u64) -> Cached {
        Cached {
            url: url::Url::parse(&w.target_url).ok(),
            w: Arc::new(w),
            stamp,
        }
    }
}

impl WebhookCache {
    pub fn get(&self, id: &str) -> Option<Arc<Webhook>> {
        self.map.read().expect("lock").get(id).map(|c| c.w.clone())
    }
    /// A webhook and its parsed target URL (None: the stored URL does not parse).
    pub fn get_with_url(&self, id: &str) -> Option<(Arc<Webhook>, Option<url::Url>)> {
        self.map
            .read()
            .expect("lock")
            .get(id)
            .map(|c| (c.w.clone(), c.url.clone()))
    }
    /// This instance wrote `w` to the store.
    pub fn put(&self, w: Webhook) {
        let stamp = self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.map
            .write()
            .expect("lock")
            .insert(w.id.clone(), Cached::new(w, stamp));
    }
    pub fn remove(&self, id: &str) {
        self.map.write().expect("lock").remove(id);
    }
    pub fn all(&self) -> Vec<Arc<Webhook>> {
        self.map.read().expect("lock").values().map(|c| c.w.clone()).collect()
    }
    /// The stamp of the last own write; a reload takes it before reading the store.
    fn stamp(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Put a row read from the store, unless this instance wrote the webhook after `since`.
    fn put_loaded(&self, w: Webhook, since: u64) {
        let mut m = self.map.write().expect("lock");
        if m.get(&w.id).is_none_or(|c| c.stamp <= since) {
            m.insert(w.id.clone(), Cached::new(w, 0));
        }
    }
    /// Forget a webhook the store no longer has, unless this instance wrote it after `since`.
    /// Returns whether it was removed.
    fn remove_loaded(&self, id: &str, since: u64) -> bool {
        let mut m = self.map.write().expect("lock");
        m.get(id).is_some_and(|c| c.stamp <= since) && m.remove(id).is_some()
    }
}

/// What happened to one event at ingest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Routed {
    pub id: String,
    /// `queued`, `dead_lettered`, `filtered`, `dropped` (refused by its run's lifecycle; `reason`
    /// says why) or `batched` (a record error taken into its run's batch).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub deliveries: usize,
}

pub struct Engine {
    pub store: Store,
    pub metrics: Metrics,
    pub webhooks: WebhookCache,
    /// Census-style syncs, by id and by source job (routing reads them on every record).
    pub syncs: crate::syncs::SyncCache,
    /// The run lifecycle (one instance for the engine, the API and the Kafka intake).
    pub runs: Arc<Runs>,
    /// The order of every run's deliveries kept in memory (see `ordering`).
    pub chains: Chains<Job>,
    /// Where stop commands go when a run is stopped by a delivery outcome (set at startup).
    pub(crate) commands: OnceLock<Arc<dyn CommandSink>>,
    /// Where dead letters are published besides the store (Kafka's dead-letter topic).
    pub(super) dead_sink: OnceLock<Arc<dyn DeadLetterSink>>,
    pub(crate) batch_tick: Duration,
    pub(super) client: DeliveryClient,
    pub(super) policy: RetryPolicy,
    pub(super) callback_secret: Secret,
    max_in_flight: usize,
    per_target_cap: usize,
    /// Bound of the in-memory ready queue (stored rows).
    hot_cap: usize,
    poll_interval: Duration,
    rotation_grace_ms: i64,
    retention: Duration,
    /// `delivery.dead_letter_retention_hours` (None: kept for ever).
    failure_retention: Option<Duration>,
    /// How often the leases of the rows in flight are renewed (a third of `store.lease_ms`, so
    /// two renewals may fail before a lease runs out).
    lease_every: Duration,
    pub(super) log_mode: LogMode,
    /// A memory job gets this many attempts in memory before it is parked in the store…
    pub(super) inline_attempts: u32,
    /// …and waits in memory for a retry no longer than this.
    pub(super) inline_max_delay: Duration,
    pub(super) in_flight: Mutex<InFlight>,
    /// Per target: adaptive limit, circuit breaker, Retry-After pause (see `targets`).
    pub targets: Targets,
    /// `webhooks.disable_after_seconds` in ms (0: never).
    pub(crate) disable_after_ms: i64,
    pub(super) wake: Notify,
    /// The outcome writers' queues (see `outcome::Writers`).
    pub(super) writes: Writers,
    writes_rx: Mutex<Option<Vec<mpsc::UnboundedReceiver<Write>>>>,
    /// Held for reading by an outcome writer from its batch's first store write until its rows
    /// are released, and for writing by a lease renewal: a renewal never sees a row another
    /// writer has just finished and not yet released (it would take it for a lost lease).
    pub(super) batches: tokio::sync::RwLock<()>,
    /// Held for reading by whoever queues events (the intake of either bus, events the relay
    /// makes) from before their runs' lifecycle decides on them until they are queued (stored,
    /// or in memory), and for writing by a run's stop while it drops the run's queued events.
    /// Without it an event decided while its run was active but queued after the stop's drop
    /// was delivered after the stop; with it, it is either queued before the drop (and
    /// dropped) or decided after the stop (and dead-lettered `run_finished`).
    pub(crate) run_gate: tokio::sync::RwLock<()>,
    /// Concurrent writes of new rows, combined (see `combine`).
    pub(super) combiner: super::combine::Combiner,
}

#[derive(Default)]
pub(super) struct InFlight {
    /// Stored rows dispatched and not yet released (their outcome is committed first).
    pub rows: HashSet<i64>,
    /// Memory jobs whose attempt is under way.
    pub memory: usize,
    /// Jobs ready to start: stored rows just committed ready (new chains on ingest, rows
    /// promoted when their predecessor finished) and memory jobs that became their chain's
    /// head, handed over in memory so the dispatcher does not have to find them with a query.
    pub hot: Ready,
    /// Stored rows in `hot`, or claimed for it by a transaction not yet committed. Never
    /// picked by a dispatcher query. Bounded by `hot_cap`; rows beyond it stay for the query.
    pub claimed: HashSet<i64>,
    /// A ready row was not taken into `hot` (it was full): the next dispatch queries.
    pub overflow: bool,
    /// When the dispatcher must query again even while `hot` has work (retries falling due,
    /// work another path queued only in the store).
    pub scan_at: Option<Instant>,
    /// Requests in progress, over all targets and per target (the caps).
    pub active: usize,
    pub per_target: HashMap<String, usize>,
    /// Bumped each time rows are released after their outcome was committed.
    pub epoch: u64,
    /// Rows released at a given epoch. A dispatcher query that started before that epoch may
    /// have read such a row in its pre-commit state (still `ready`), so its result is not
    /// trusted for these rows; a query that starts later sees the committed state.
    pub released: HashMap<i64, u64>,
    /// Rows in flight whose lease a renewal found lost: another instance may hold them now, so
    /// their outcome here is not recorded.
    pub lost: HashSet<i64>,
}

impl InFlight {
    /// Forget a row after its outcome is committed. Returns whether it was in flight.
    pub fn release(&mut self, seq: i64) -> bool {
        let was = self.rows.remove(&seq);
        self.released.insert(seq, self.epoch);
        was
    }

    /// An attempt's request finished: its slot under the caps is free. Returns the target's
    /// requests in progress before it.
    pub fn request_done(&mut self, target_key: &str) -> usize {
        self.active = self.active.saturating_sub(1);
        let mut before = 0;
        if let Some(n) = self.per_target.get_mut(target_key) {
            before = *n;
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_target.remove(target_key);
            }
        }
        before
    }
}

impl Engine {
    pub fn new(settings: &Settings, store: Store, metrics: Metrics, callback_secret: Secret) -> Arc<Engine> {
        let d = &settings.delivery;
        let client = DeliveryClient::new(
            super::client::AddressPolicy::new(d.allowed_cidrs.clone()),
            Duration::from_millis(d.connect_timeout_ms),
            Duration::from_millis(d.request_timeout_ms),
            d.response_excerpt_bytes,
        );
        let (writes, writes_rx) = Writers::new();
        let limits = settings.runs.batch_limits();
        let runs = Arc::new(Runs::new(store.clone(), limits));
        Arc::new(Engine {
            store,
            metrics: metrics.clone(),
            webhooks: WebhookCache::default(),
            syncs: crate::syncs::SyncCache::default(),
            runs,
            chains: Chains::default(),
            commands: OnceLock::new(),
            dead_sink: OnceLock::new(),
            batch_tick: Duration::from_millis((limits.max_age_ms / 2).clamp(50, 5000) as u64),
            client,
            policy: RetryPolicy::from(&d.retry),
            callback_secret,
            max_in_flight: d.max_in_flight,
            per_target_cap: d.max_in_flight_per_webhook,
            hot_cap: (d.max_in_flight * 4).max(256),
            poll_interval: Duration::from_millis(d.poll_interval_ms.max(10)),
            rotation_grace_ms: (settings.webhooks.secret_rotation_grace_seconds * 1000) as i64,
            retention: Duration::from_secs(d.retention_hours * 3600),
            failure_retention: (d.dead_letter_retention_hours > 0)
                .then(|| Duration::from_secs(d.dead_letter_retention_hours.saturating_mul(3600))),
            lease_every: Duration::from_millis((settings.store.lease_ms / 3).clamp(100, 60_000)),
            log_mode: d.log,
            inline_attempts: settings.bus.kafka.inline_attempts.max(1),
            inline_max_delay: Duration::from_millis(settings.bus.kafka.inline_max_delay_ms),
            in_flight: Mutex::new(InFlight::default()),
            targets: Targets::new(d.adaptive.clone(), d.breaker.clone(), metrics.clone()),
            disable_after_ms: (settings.webhooks.disable_after_seconds.min(i64::MAX as u64 / 1000) * 1000) as i64,
            wake: Notify::new(),
            writes,
            writes_rx: Mutex::new(Some(writes_rx)),
            batches: tokio::sync::RwLock::new(()),
            run_gate: tokio::sync::RwLock::new(()),
            combiner: Default::default(),
        })
    }

    /// The command sink stop commands are published to (runs stopped by a 400 to `started`).
    pub fn set_commands(&self, commands: Arc<dyn CommandSink>) {
        let _ = self.commands.set(commands);
    }

    /// Where dead letters are published besides the store.
    pub fn set_dead_letter_sink(&self, sink: Arc<dyn DeadLetterSink>) {
        let _ = self.dead_sink.set(sink);
    }

    pub fn client(&self) -> &DeliveryClient {
        &self.client
    }

    pub fn rotation_grace_ms(&self) -> i64 {
        self.rotation_grace_ms
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Attempts under way: stored rows not yet released and memory jobs being attempted.
    pub fn in_flight(&self) -> usize {
        let f = self.in_flight.lock().expect("lock");
        f.rows.len() + f.memory
    }

    /// Take freshly committed ready rows into the in-memory ready queue, up to its bound
    /// (called just before their transaction commits). Returns the rows taken.
    pub(super) fn claim(&self, rows: &[QueuedDelivery]) -> Vec<i64> {
        let mut f = self.in_flight.lock().expect("lock");
        let mut taken = Vec::new();
        for r in rows {
            if f.rows.contains(&r.seq) || f.claimed.contains(&r.seq) {
                continue;
            }
            if f.claimed.len() >= self.hot_cap {
                f.overflow = true;
                continue;
            }
            f.claimed.insert(r.seq);
            taken.push(r.seq);
        }
        taken
    }

    /// After the commit: queue the claimed rows for dispatch.
    pub(super) fn push_hot(&self, rows: Vec<QueuedDelivery>, taken: &[i64]) {
        if taken.is_empty() {
            return;
        }
        let taken: HashSet<i64> = taken.iter().copied().collect();
        let mut f = self.in_flight.lock().expect("lock");
        f.hot
            .extend(rows.into_iter().filter(|r| taken.contains(&r.seq)).map(Job::stored));
        drop(f);
        self.wake.notify_one();
    }

    /// The commit failed: forget the claims.
    pub(super) fn unclaim(&self, taken: &[i64]) {
        let mut f = self.in_flight.lock().expect("lock");
        for s in taken {
            f.claimed.remove(s);
        }
    }

    /// Hand memory jobs to the dispatcher (chain heads, retries falling due).
    pub(super) fn push_memory(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut f = self.in_flight.lock().expect("lock");
        f.hot.extend(jobs);
        drop(f);
        self.wake.notify_one();
    }

    /// Work may be waiting in the store only (new or replayed rows, parked events): the
    /// dispatcher queries on its next round.
    pub fn notify(&self) {
        self.in_flight.lock().expect("lock").overflow = true;
        self.wake.notify_one();
    }

    pub async fn load_webhooks(&self) -> anyhow::Result<()> {
        self.reload_webhooks().await?;
        self.load_syncs().await?;
        // Chains with rows in the store: new memory deliveries of them queue behind.
        self.chains.note_stored(self.store.active_order_keys().await?);
        Ok(())
    }

    // ---- the two ways in --------------------------------------------------------------------

    /// Stored path: plan and durably queue events; returns once they are committed.
    pub async fn ingest(&self, events: &[Envelope], source: &str) -> anyhow::Result<Vec<Routed>> {
        let routed = self.queue(events).await?;
        self.metrics
            .events_ingested
            .with_label_values(&[source])
            .inc_by(events.len() as u64);
        Ok(routed)
    }

    /// `ingest` without counting the events as ingested (events the relay makes itself).
    pub(crate) async fn queue(&self, events: &[Envelope]) -> anyhow::Result<Vec<Routed>> {
        let now = now_ms();
        let mut out = Vec::with_capacity(events.len());
        let mut dead = Vec::new();
        let mut routed = Vec::with_capacity(events.len());
        let refs: Vec<&Envelope> = events.iter().collect();
        let gate = self.run_gate.read().await;
        for (o, d, r) in self.plan_many(&refs, now).await? {
            out.extend(o);
            dead.extend(d);
            routed.push(r);
        }
        self.store_rows(&out, &dead, now).await?;
        drop(gate);
        for r in &routed {
            if r.status == "filtered" {
                self.metrics.events_filtered.inc();
            }
        }
        let finishing = crate::runs::service::finishing_runs(events);
        if !finishing.is_empty() {
            self.eloqua_callbacks(&finishing).await;
        }
        let alerting = crate::syncs::alerts::alert_runs(events);
        if !alerting.is_empty() {
            self.sync_alerts(&alerting).await;
        }
        Ok(routed)
    }

    /// Write new rows (and dead letters) to the store, in their chains' order: a chain whose
    /// head is kept in memory has its new rows held behind it (see `ordering`). Ready rows are
    /// handed to the dispatcher in memory. Returns the chains whose held rows are to be made
    /// eligible now (see `after_rows`). Callers go through `store_rows` (`combine`), which
    /// writes concurrent callers' rows together.
    pub(super) async fn write_rows(
        &self,
        rows: &[NewDelivery],
        dead: &[NewDeadLetter],
        now: i64,
    ) -> anyhow::Result<Vec<String>> {
        let keys: Vec<String> = rows
            .iter()
            .filter_map(|d| d.order_key.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let writing = self.chains.hold(&keys);
        let mut taken = Vec::new();
        let res = self
            .store
            .enqueue_claiming(rows, dead, now, &writing.held, |r| taken = self.claim(r))
            .await;
        let promote = self.chains.written(&writing);
        let ready = match res {
            Ok(r) => r,
            Err(e) => {
                self.unclaim(&taken);
                return Err(e);
            }
        };
        self.push_hot(ready, &taken);
        if !rows.is_empty() {
            // Rows beyond the in-memory bound, or waiting, are found by the query or promoted.
            self.wake.notify_one();
        }
        Ok(promote)
    }

    /// What follows a write of new rows, outside of it: the held rows of chains whose memory
    /// part drained meanwhile made eligible, the dead letters counted and published.
    pub(super) async fn after_rows(&self, promote: &[String], dead: &[NewDeadLetter]) {
        if !promote.is_empty() {
            self.promote(promote).await;
        }
        self.dead_lettered(dead, &[]).await;
    }

    /// Make held rows of these chains eligible (their memory part drained).
    pub(crate) async fn promote(&self, keys: &[String]) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut taken = Vec::new();
            match self.store.promote(keys, now_ms(), |r| taken = self.claim(r)).await {
                Ok(rows) => return self.push_hot(rows, &taken),
                Err(e) => {
                    self.unclaim(&taken);
                    tracing::error!(error = %format!("{e:#}"), "promoting held deliveries failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Memory path (Kafka): hand deliveries that live in memory to their chains. A delivery
    /// whose chain has rows in the store, or whose target failed recently, is parked in the
    /// store instead; each is acknowledged once it is finished or stored.
    pub fn submit(self: &Arc<Self>, jobs: Vec<Job>) {
        let mut start = Vec::new();
        let mut park = Vec::new();
        let mut park_heads = Vec::new();
        for job in jobs {
            let Some(key) = job.q.order_key.clone() else {
                start.push(job);
                continue;
            };
            match self.chains.submit(&key, job) {
                Placement::Dispatch(job) if self.target_unhealthy(&job.q.target_key) => {
                    // The receiver failed recently: don't hold the partition, let the store's
                    // retry schedule probe it.
                    park_heads.push(job);
                }
                Placement::Dispatch(job) => start.push(job),
                Placement::Queued => {}
                Placement::Park(job) => park.push(job),
            }
        }
        if !start.is_empty() {
            self.push_memory(start);
        }
        for job in park {
            self.park(job, None);
        }
        for job in park_heads {
            self.park_head(job, None);
        }
    }

    // ---- dispatch ---------------------------------------------------------------------------

    /// Run the dispatcher and the outcome writer until `stop` is cancelled, then wait up to
    /// `deadline` for attempts under way to be recorded. Unfinished rows stay queued;
    /// unfinished memory jobs are redelivered from their uncommitted offsets.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, deadline: Duration) {
        let rxs = self.writes_rx.lock().expect("lock").take().expect("engine runs once");
        let writers: Vec<_> = rxs
            .into_iter()
            .map(|rx| tokio::spawn(self.clone().write_outcomes(rx)))
            .collect();
        let housekeeping = tokio::spawn(self.clone().housekeeping(stop.clone(), self.retention));
        let flusher = tokio::spawn(self.clone().flush_batches(stop.clone()));
        let renewer = tokio::spawn(self.clone().renew_leases(stop.clone()));
        let registry = tokio::spawn(self.clone().watch_webhooks(stop.clone()));
        self.clone().dispatch(stop).await;
        let until = Instant::now() + deadline;
        while self.in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Outcomes handed to the writer are committed before we return.
        let _ = tokio::time::timeout(until.saturating_duration_since(Instant::now()), self.barrier()).await;
        let left = self.in_flight();
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "shutdown deadline passed; unfinished deliveries stay queued"
            );
        }
        for w in writers {
            w.abort();
        }
        housekeeping.abort();
        flusher.abort();
        renewer.abort();
        registry.abort();
    }

    async fn dispatch(self: Arc<Self>, stop: CancellationToken) {
        let mut last_scan: Option<Instant> = None;
        // When a blocked target (open breaker, Retry-After pause) may take requests again:
        // its rows are only in the store then, so the dispatcher queries.
        let mut unblock_at: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let now_i = Instant::now();
            let (blocked, next_unblock) = self.targets.blocked(now_i);
            let unblocked = unblock_at.is_some_and(|t| t <= now_i);
            unblock_at = next_unblock;
            // Memory jobs of targets whose breaker is open, or that are paused for longer than
            // a memory job may wait, leave memory for the store (their partition's offset moves
            // on); stored rows of blocked targets leave the in-memory queue and are found by a
            // query once the target takes requests again.
            let mut park = Vec::new();
            // 1. Jobs handed over in memory, oldest first, skipping targets at their cap.
            let mut hot_jobs = Vec::new();
            let (free, skip, known, epoch, scan) = {
                let mut f = self.in_flight.lock().expect("lock");
                // The global cap counts attempts whose outcome is not recorded yet, not only
                // requests in progress: an answered row stays in `rows` until the writer has
                // committed its outcome. So a crash re-attempts at most `max_in_flight` rows
                // (the duplicates a kill -9 can cause), however far the writer lags behind.
                let unrecorded = f.active.max(f.rows.len() + f.memory);
                let mut free = self.max_in_flight.saturating_sub(unrecorded);
                if !blocked.is_empty() && !f.hot.is_empty() {
                    let InFlight { hot, claimed, .. } = &mut *f;
                    for key in &blocked {
                        // Paused briefly (a Retry-After within `inline_max_delay`): its memory
                        // jobs wait in memory. Open, held or paused for longer: they go to the
                        // store, so their partitions' offsets move on.
                        let shed = self.targets.sheds_memory(key, now_i, self.inline_max_delay);
                        for job in hot.remove_in(key, |j| !j.is_memory() || shed) {
                            if job.is_memory() {
                                park.push(job);
                            } else {
                                claimed.remove(&job.q.seq);
                                self.metrics.held_attempts.inc();
                            }
                        }
                    }
                }
                if free > 0 && !f.hot.is_empty() {
                    let f = &mut *f;
                    // `take` asks once per target, so no cache of allowances is needed here.
                    let jobs = f.hot.take(free, &mut f.per_target, |key| {
                        self.targets.allowance(key, self.cap_for(key), now_i)
                    });
                    for job in &jobs {
                        if job.is_memory() {
                            f.memory += 1;
                        } else {
                            f.claimed.remove(&job.q.seq);
                            f.rows.insert(job.q.seq);
                        }
                    }
                    f.active += jobs.len();
                    free -= jobs.len();
                    hot_jobs = jobs;
                }
                // 2. The store, when something may be there that is not in memory.
                let scan = free > 0
                    && (f.overflow
                        || unblocked
                        || f.scan_at.is_some_and(|t| t <= now_i)
                        || last_scan.is_none_or(|t: Instant| now_i.duration_since(t) >= self.poll_interval));
                // Releases before now are visible to the query we are about to run.
                f.released.clear();
                f.epoch += 1;
                let mut skip: Vec<String> = f
                    .per_target
                    .iter()
                    .filter(|(k, n)| **n >= self.targets.allowance(k, self.cap_for(k), now_i))
                    .map(|(k, _)| k.clone())
                    .collect();
                skip.extend(blocked.iter().filter(|k| !f.per_target.contains_key(*k)).cloned());
                (free, skip, f.rows.len() + f.claimed.len(), f.epoch, scan)
            };
            for job in park {
                self.metrics.held_attempts.inc();
                self.park_head(job, None);
            }
            let mut started = hot_jobs.len();
            for job in hot_jobs {
                self.start(job);
            }
            let mut exhausted = true;
            if scan {
                last_scan = Some(now_i);
                let now = now_ms();
                let limit = (free + known) as i64;
                let mut took = 0usize;
                match self.store.due(now, limit, &skip).await {
                    Ok(rows) => {
                        exhausted = (rows.len() as i64) < limit;
                        let mut jobs = Vec::new();
                        let mut f = self.in_flight.lock().expect("lock");
                        let mut allowance: HashMap<String, usize> = HashMap::new();
                        for row in rows {
                            if took >= free {
                                exhausted = false;
                                break;
                            }
                            if f.rows.contains(&row.seq)
                                || f.claimed.contains(&row.seq)
                                || f.released.get(&row.seq).is_some_and(|e| *e >= epoch)
                            {
                                continue;
                            }
                            let cap = *allowance.entry(row.target_key.clone()).or_insert_with(|| {
                                self.targets
                                    .allowance(&row.target_key, self.cap_for(&row.target_key), now_i)
                            });
                            let n = f.per_target.entry(row.target_key.clone()).or_insert(0);
                            if *n >= cap {
                                if *n == 0 {
                                    f.per_target.remove(&row.target_key);
                                }
                                continue;
                            }
                            *n += 1;
                            f.active += 1;
                            f.rows.insert(row.seq);
                            took += 1;
                            jobs.push(Job::stored(row));
                        }
                        if exhausted {
                            f.overflow = false;
                        }
                        drop(f);
                        for job in jobs {
                            self.start(job);
                        }
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "dispatcher query failed"),
                }
                // The next retry falling due, for the timer.
                let next = self.store.next_due_after(now).await.ok().flatten();
                let mut f = self.in_flight.lock().expect("lock");
                f.scan_at = next.map(|at| now_i + Duration::from_millis((at - now).max(0) as u64));
                started += took;
            }
            if started > 0 {
                continue;
            }
            // Nothing more to start now: sleep until woken (new work, a finished attempt), the
            // next retry is due, a blocked target may go again, or the poll interval passes.
            let mut sleep = self.poll_interval;
            if let Some(at) = self.in_flight.lock().expect("lock").scan_at {
                sleep = sleep.min(at.saturating_duration_since(Instant::now()));
            }
            if let Some(at) = unblock_at {
                sleep = sleep.min(at.saturating_duration_since(Instant::now()));
            }
            let _ = exhausted;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn start(self: &Arc<Self>, job: Job) {
        self.metrics.in_flight.inc();
        tokio::spawn(self.clone().attempt(job));
    }

    /// An attempt's request finished (or never started): its slot under the caps is free.
    /// Returns the target's requests in progress before it.
    pub(super) fn request_done(&self, target_key: &str) -> usize {
        self.metrics.in_flight.dec();
        let before = self.in_flight.lock().expect("lock").request_done(target_key);
        self.wake.notify_one();
        before
    }

    /// A memory job's attempt is over (it was retried, parked, finished or dropped).
    pub(super) fn memory_done(&self) {
        let mut f = self.in_flight.lock().expect("lock");
        f.memory = f.memory.saturating_sub(1);
    }

    /// A target's breaker state, adaptive limit and failure clock (`GET /webhook/{id}`).
    pub fn target_state(&self, target_key: &str) -> (&'static str, usize, Option<i64>) {
        self.targets.state(target_key, self.cap_for(target_key))
    }

    /// The in-flight cap of a target: its webhook's override, else
    /// `delivery.max_in_flight_per_webhook`.
    pub(super) fn cap_for(&self, target_key: &str) -> usize {
        target_key
            .strip_prefix("w:")
            .and_then(|id| self.webhooks.get(id))
            .and_then(|w| w.overrides.as_ref().and_then(|o| o.max_in_flight))
            .unwrap_or(self.per_target_cap)
    }

    /// The configured caps: (`delivery.max_in_flight`, `delivery.max_in_flight_per_webhook`).
    pub fn caps(&self) -> (usize, usize) {
        (self.max_in_flight, self.per_target_cap)
    }

    /// The retry policy with a webhook's overrides applied (None: the configured one).
    pub fn policy_with(&self, o: Option<&crate::store::WebhookOverrides>) -> RetryPolicy {
        let mut p = self.policy.clone();
        if let Some(r) = o.and_then(|o| o.retry.as_ref()) {
            if let Some(v) = r.initial_interval_ms {
                p.initial = Duration::from_millis(v);
            }
            if let Some(v) = r.multiplier {
                p.multiplier = v;
            }
            if let Some(v) = r.max_interval_ms {
                p.max_interval = Duration::from_millis(v);
            }
            if let Some(v) = r.max_attempts {
                p.max_attempts = v;
            }
            if let Some(v) = r.max_elapsed_ms {
                p.max_elapsed = Duration::from_millis(v);
            }
        }
        p
    }

    /// Has the target failed recently, is its breaker open, or is it paused for longer than a
    /// memory job may wait? New memory work for it is parked in the store instead of holding a
    /// partition while it retries or waits.
    pub fn target_unhealthy(&self, target_key: &str) -> bool {
        self.targets.unhealthy(target_key, self.inline_max_delay)
    }

    /// Keep the leases of this instance's claimed rows alive: every `lease_every`, the first
    /// writer renews them in one statement, between two of its rounds and while no other writer
    /// is in one (`batches`), so a renewal never races a completion of the same rows: it sees
    /// every outcome committed and released before it, and none after.
    async fn renew_leases(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.lease_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Until the writer is gone: attempts still finishing after `stop` keep their rows.
                _ = stop.cancelled(), if self.in_flight() == 0 => return,
                _ = tick.tick() => {}
            }
            if self.writes.send(super::outcome::Write::Renew).is_err() {
                return;
            }
        }
    }

    /// Renew the leases of the rows claimed here (in flight, or waiting in `hot`). Rows whose
    /// lease was lost are another instance's now: those not yet started are dropped from `hot`;
    /// those under way are marked, and their outcome is discarded (counted once, here).
    pub(super) async fn renew_now(&self) {
        // No writer is between a commit and the release of its rows (see `batches`).
        let _batches = self.batches.write().await;
        // Rows in flight and stored rows waiting in `hot`. Not rows claimed by a transaction
        // still open (in `claimed`, not yet in `hot`): the store cannot show them yet, and their
        // lease was just taken.
        let seqs: Vec<i64> = {
            let f = self.in_flight.lock().expect("lock");
            let hot = f.hot.stored_seqs();
            f.rows.iter().copied().chain(hot).collect()
        };
        if seqs.is_empty() {
            return;
        }
        let held: HashSet<i64> = match self.store.renew(&seqs, now_ms()).await {
            Ok(h) => h.into_iter().collect(),
            Err(e) => {
                // Not renewed this round; the lease outlives two more tries.
                tracing::warn!(error = %format!("{e:#}"), "renewing leases failed");
                return;
            }
        };
        let mut f = self.in_flight.lock().expect("lock");
        let mut lost = 0u64;
        for s in seqs.iter().filter(|s| !held.contains(s)) {
            if f.rows.contains(s) {
                if f.lost.insert(*s) {
                    lost += 1;
                }
            } else if f.claimed.remove(s) {
                f.hot.remove_stored(*s);
                lost += 1;
            }
        }
        drop(f);
        if lost > 0 {
            tracing::warn!(
                lost,
                "leases of claimed deliveries were lost (another instance may hold them now)"
            );
            self.metrics.leases_lost.inc_by(lost);
        }
    }

    /// Reload the webhooks when another instance changed them: the store's webhook version is
    /// read every [`REGISTRY_CHECK_EVERY`] (one row), and everything is reloaded when it moved.
    /// So a webhook created, updated, rotated, disabled or deleted anywhere is used here within
    /// about a second.
    async fn watch_webhooks(self: Arc<Self>, stop: CancellationToken) {
        let mut seen: Option<i64> = None;
        let mut tick = tokio::time::interval(REGISTRY_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // The version before the load: a change committed while loading moves it again,
            // and the next round loads once more.
            let version = match self.store.webhooks_version().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "webhook version check failed");
                    continue;
                }
            };
            if seen == Some(version) {
                continue;
            }
            match self.reload_webhooks().await {
                Ok(()) => seen = Some(version),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "webhook refresh failed"),
            }
        }
    }

    /// Make sure webhooks these ids name are in the cache if the store has them: one created
    /// on another instance less than a check interval ago is not yet, and an event for it (or a
    /// row another instance queued for it) must not be refused as `unknown_webhook` meanwhile.
    /// One read per unknown id.
    pub(crate) async fn know_webhooks<'a>(&self, ids: impl Iterator<Item = &'a str>) {
        let missing: std::collections::BTreeSet<&str> = ids.filter(|id| self.webhooks.get(id).is_none()).collect();
        for id in missing {
            let since = self.webhooks.stamp();
            match self.store.get_webhook(id).await {
                Ok(Some(w)) => self.webhooks.put_loaded(w, since),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "reading a webhook failed"),
            }
        }
    }

    /// Replace the cached webhooks by the store's.
    async fn reload_webhooks(&self) -> anyhow::Result<()> {
        let since = self.webhooks.stamp();
        let all = self.store.all_webhooks().await?;
        let ids: HashSet<String> = all.iter().map(|w| w.id.clone()).collect();
        for w in all {
            self.webhooks.put_loaded(w, since);
        }
        for w in self.webhooks.all() {
            if !ids.contains(&w.id) && self.webhooks.remove_loaded(&w.id, since) {
                self.targets.forget(&format!("w:{}", w.id));
            }
        }
        // The targets follow: a disabled webhook's events are held, one enabled (on any
        // instance) is released, a deleted one is forgotten.
        for w in self.webhooks.all() {
            let key = format!("w:{}", w.id);
            if !w.is_active {
                self.targets.hold(&key, true);
            } else if self.targets.is_held(&key) {
                self.targets.hold(&key, false);
                self.notify();
            }
        }
        Ok(())
    }

    /// Queue depth and oldest-undelivered gauges, chain refresh and retention.
    async fn housekeeping(self: Arc<Self>, stop: CancellationToken, retention: Duration) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut last_purge = Instant::now();
        let mut last_chains = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Other instances may have changed syncs; paused rows of syncs no longer paused
            // (unpaused or deleted while a row was being written paused) are released.
            if let Err(e) = self.refresh_syncs().await {
                tracing::warn!(error = %format!("{e:#}"), "sync refresh failed");
            }
            self.targets.forget_idle();
            self.metrics.breakers_open.set(self.targets.open_count() as i64);
            match self.store.queue_stats().await {
                Ok((depth, oldest)) => {
                    self.metrics.queue_depth.set(depth);
                    let age = oldest.map(|o| (now_ms() - o).max(0) as f64 / 1000.0).unwrap_or(0.0);
                    self.metrics.oldest_undelivered_age.set(age);
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "queue stats failed"),
            }
            // Chains whose stored rows were finished by a path that does not report it (a
            // dropped run, a webhook deleted under its rows) are forgotten here.
            if last_chains.elapsed() > Duration::from_secs(10) {
                last_chains = Instant::now();
                let since = Instant::now();
                match self.store.active_order_keys().await {
                    Ok(keys) => self.chains.refresh_stored(&keys.into_iter().collect(), since),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "chain refresh failed"),
                }
            }
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = Instant::now();
                // Delivered rows stay for the retention period when the log keeps them all;
                // with `failures`, first-try successes go at once; with `none`, all of them.
                let now = now_ms();
                let kept = now - retention.as_millis() as i64;
                let (before, first_try_before) = match self.log_mode {
                    LogMode::All => (kept, kept),
                    LogMode::Failures => (kept, now),
                    LogMode::None => (now, now),
                };
                if let Err(e) = self.store.purge_delivered(before, first_try_before).await {
                    tracing::warn!(error = %format!("{e:#}"), "retention purge failed");
                }
                if let Some(keep) = self.failure_retention {
                    let dead_letters_before = now.saturating_sub(keep.as_millis().min(i64::MAX as u128) as i64);
                    // A dead row outlives its dead letter by an hour: replay of a dead letter
                    // that is still there always finds its row (they are made together).
                    let rows_before = dead_letters_before.saturating_sub(3_600_000);
                    if let Err(e) = self.store.purge_failed(rows_before, dead_letters_before).await {
                        tracing::warn!(error = %format!("{e:#}"), "retention purge of failures failed");
                    }
                }
            }
        }
    }
}

/// A job whose acknowledgement is a no-op (tests, relay-made memory jobs).
pub struct NoAck;

impl Ack for NoAck {
    fn current(&self) -> bool {
        true
    }
    fn done(&self) {}
}

impl Engine {
    /// A run was stopped: take its jobs out of the in-memory ready queue and its memory jobs
    /// out of their chains (they are dropped, and acknowledged: a stopped run's events are
    /// never delivered). Returns the stored rows still in flight (they finish as they are)
    /// and the dropped memory jobs' (kind, event, body).
    #[allow(clippy::type_complexity)]
    pub(crate) fn forget_run(&self, run_id: &str) -> (Vec<i64>, Vec<(String, String, String)>, Vec<String>) {
        let is_run = |j: &Job| j.q.run_id.as_deref() == Some(run_id);
        let mut dropped = self.chains.remove_queued(is_run);
        let mut heads = Vec::new();
        let keep = {
            let mut f = self.in_flight.lock().expect("lock");
            let InFlight { hot, claimed, .. } = &mut *f;
            for j in hot.remove_where(is_run) {
                if j.is_memory() {
                    heads.push(j.q.order_key.clone());
                    dropped.push(j);
                } else {
                    claimed.remove(&j.q.seq);
                }
            }
            f.rows.iter().copied().collect()
        };
        let mut promote = Vec::new();
        for key in heads.into_iter().flatten() {
            // Their chains' later jobs are the same run's, removed above.
            if let crate::ordering::AfterHead::Promote(k) = self.chains.head_done(&key) {
                promote.push(k);
            }
        }
        let out = dropped
            .into_iter()
            .map(|j| {
                if let Some(a) = j.ack() {
                    a.done();
                }
                (j.q.kind, j.q.event, j.q.body)
            })
            .collect();
        (keep, out, promote)
    }
}

impl Engine {
    /// Re-drive dead letters: each one backed by a delivery is queued again for exactly its
    /// (event, target) pair, at the end of its chain, same `webhook-id`. Returns how many were
    /// re-queued and the raw events of the unroutable ones (the caller routes them again).
    pub async fn replay_dead_letters(
        &self,
        ids: Option<&[String]>,
        filter: &crate::store::DeadLetterFilter,
        limit: i64,
        now: i64,
    ) -> anyhow::Result<(u64, Vec<String>)> {
        let mut writing = crate::ordering::Holding::default();
        let res = self
            .store
            .replay_dead_letters(ids, filter, limit, now, |keys| {
                writing = self.chains.hold(keys);
                writing.held.clone()
            })
            .await;
        let promote = self.chains.written(&writing);
        let (_, requeued, _, raws) = res?;
        if !promote.is_empty() {
            self.promote(&promote).await;
        }
        self.notify();
        Ok((requeued, raws))
    }
}

impl Engine {
    /// Load every Census-style sync into the cache routing reads.
    pub async fn load_syncs(&self) -> anyhow::Result<()> {
        let mut all = Vec::new();
        for r in self.store.runs().all_census_syncs().await? {
            all.push(crate::syncs::Sync::from_row(&r)?);
        }
        self.syncs.replace(all);
        Ok(())
    }

    /// Housekeeping: reload syncs, release the held rows of syncs no longer paused, and update
    /// the held-deliveries gauge.
    async fn refresh_syncs(&self) -> anyhow::Result<()> {
        self.load_syncs().await?;
        let mut held = 0;
        for (id, n) in self.store.queue().paused_counts().await? {
            if self.syncs.get(id).is_some_and(|s| s.paused) {
                held += n;
            } else {
                self.release_sync(id).await?;
            }
        }
        self.metrics.sync_deliveries_held.set(held);
        Ok(())
    }

    /// Release a sync's held rows (it was unpaused or deleted; the store checks): each chain
    /// goes on from its oldest row.
    pub async fn release_sync(&self, sync_id: i64) -> anyhow::Result<()> {
        let mut taken = Vec::new();
        match self
            .store
            .release_paused(sync_id, now_ms(), |r| taken = self.claim(r))
            .await
        {
            Ok(rows) => {
                // Memory deliveries of these chains (Kafka) must queue behind the released rows.
                self.chains.note_stored(rows.iter().filter_map(|r| r.order_key.clone()));
                self.push_hot(rows, &taken);
                self.notify();
                Ok(())
            }
            Err(e) => {
                self.unclaim(&taken);
                Err(e)
            }
        }
    }
}

impl Engine {
    /// Kafka: deliveries of paused syncs are written to the store at once (which holds them)
    /// instead of living in memory; each is acknowledged once its row is committed. Awaited in
    /// the intake so the rows of later messages are written after these.
    pub async fn store_held(&self, rows: Vec<(NewDelivery, Arc<dyn super::job::Ack>)>) {
        if rows.is_empty() {
            return;
        }
        let ds: Vec<NewDelivery> = rows.iter().map(|(d, _)| d.clone()).collect();
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store_rows(&ds, &[], now_ms()).await {
                Ok(()) => break,
                Err(e) => {
                    if rows.iter().all(|(_, a)| !a.current()) {
                        // The partitions were taken from us: the new owner reads them again.
                        return;
                    }
                    tracing::error!(error = %format!("{e:#}"), "storing held sync deliveries failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        for (_, a) in rows {
            a.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(url: &str) -> Webhook {
        Webhook {
            id: "w1".into(),
            target_url: url.into(),
            event_types: vec![],
            is_active: true,
            description: None,
            secret: Secret::generate(),
            previous_secret: None,
            created_at: 0,
            updated_at: 0,
            seq: 1,
            overrides: None,
        }
    }

    /// Attempts take the URL the cache parsed when the webhook was put: a changed target is
    /// used from the put on, a reload read before this instance's own write does not bring the
    /// old URL back, and a URL that does not parse is reported as such (not as an unknown
    /// webhook).
    #[test]
    fn the_cached_url_follows_the_webhook() {
        let cache = WebhookCache::default();
        assert!(cache.get_with_url("w1").is_none());
        cache.put(webhook("https://a.example/hook"));
        let since = cache.stamp();
        cache.put(webhook("https://b.example/new?x=1"));
        let (w, url) = cache.get_with_url("w1").unwrap();
        assert_eq!(w.target_url, "https://b.example/new?x=1");
        assert_eq!(url.unwrap().as_str(), "https://b.example/new?x=1");
        // A reload that read the store before the second put.
        cache.put_loaded(webhook("https://a.example/hook"), since);
        assert_eq!(
            cache.get_with_url("w1").unwrap().1.unwrap().host_str(),
            Some("b.example")
        );
        // A reload after it: the store's row (another instance changed it) is taken.
        cache.put_loaded(webhook("https://c.example/"), cache.stamp());
        assert_eq!(
            cache.get_with_url("w1").unwrap().1.unwrap().host_str(),
            Some("c.example")
        );
        cache.put(webhook("not a url"));
        let (w, url) = cache.get_with_url("w1").unwrap();
        assert_eq!(w.target_url, "not a url");
        assert!(url.is_none());
    }
}
