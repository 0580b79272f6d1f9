//! The delivery engine: routes events to targets, dispatches due deliveries under a global and a
//! per-target in-flight cap, performs signed attempts and records their outcomes.
//!
//! Concurrency shape:
//! - one dispatcher task picks due `ready` rows (see `store` for the ready/waiting model that
//!   keeps each run in order) and spawns one task per attempt, never more than
//!   `delivery.max_in_flight` at once nor more than `delivery.max_in_flight_per_webhook` for
//!   one target — targets at their cap are excluded from the query itself, so a hanging webhook
//!   cannot fill the dispatcher's view and starve the others;
//! - attempt tasks send their outcome to one writer task that commits outcomes in batches
//!   (group commit) and only then releases the row from the in-flight set. A row is therefore
//!   never picked twice, and a crash at any point leaves it `ready` to be attempted again
//!   (at-least-once, same `webhook-id`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::client::{Attempt, DeliveryClient};
use super::retry::{classify, result_label, RetryPolicy, Verdict};
use crate::bus::CommandSink;
use crate::config::Settings;
use crate::domain::{now_ms, subscribed, Envelope};
use crate::metrics::Metrics;
use crate::runs::lifecycle::relay_event_prefix;
use crate::runs::{Action, Runs};
use crate::signing::{signature_headers, Secret};
use crate::store::{AttemptRecord, Completion, NewDeadLetter, NewDelivery, Next, QueuedDelivery, Store, Webhook};

/// Webhooks by id, kept in step with the store by the API (single process) and reloaded at start.
/// After this long an unhealthy target gets live attempts again (a probe).
const UNHEALTHY_PROBE_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct WebhookCache {
    map: RwLock<HashMap<String, Arc<Webhook>>>,
}

impl WebhookCache {
    pub fn get(&self, id: &str) -> Option<Arc<Webhook>> {
        self.map.read().expect("lock").get(id).cloned()
    }
    pub fn put(&self, w: Webhook) {
        self.map.write().expect("lock").insert(w.id.clone(), Arc::new(w));
    }
    pub fn remove(&self, id: &str) {
        self.map.write().expect("lock").remove(id);
    }
    pub fn all(&self) -> Vec<Arc<Webhook>> {
        self.map.read().expect("lock").values().cloned().collect()
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
    /// The run lifecycle (one instance for the engine, the API and the Kafka consumer).
    pub runs: Arc<Runs>,
    /// Where stop commands go when a run is stopped by a delivery outcome (set at startup).
    commands: OnceLock<Arc<dyn CommandSink>>,
    batch_tick: Duration,
    client: DeliveryClient,
    policy: RetryPolicy,
    callback_secret: Secret,
    max_in_flight: usize,
    per_target_cap: usize,
    /// Bound of the in-memory ready queue (rows).
    hot_cap: usize,
    poll_interval: Duration,
    rotation_grace_ms: i64,
    retention: Duration,
    in_flight: Mutex<InFlight>,
    unhealthy: Mutex<HashMap<String, Instant>>,
    wake: Notify,
    done_tx: mpsc::UnboundedSender<Completion>,
    done_rx: Mutex<Option<mpsc::UnboundedReceiver<Completion>>>,
}

#[derive(Default)]
struct InFlight {
    rows: HashSet<i64>,
    /// Ready rows just committed (new chains on ingest, rows promoted when their predecessor
    /// finished), handed over in memory so the dispatcher does not have to find them with a
    /// query. Bounded by `hot_cap`; rows beyond it stay for the query (`overflow`).
    hot: VecDeque<QueuedDelivery>,
    /// Rows in `hot`, or claimed for it by a transaction not yet committed. Never picked by a
    /// dispatcher query.
    claimed: HashSet<i64>,
    /// A ready row was not taken into `hot` (it was full): the next dispatch queries.
    overflow: bool,
    /// When the dispatcher must query again even while `hot` has work (retries falling due,
    /// work another path queued only in the store).
    scan_at: Option<Instant>,
    /// Attempts whose request is in progress, over all targets and per target (the caps). A
    /// row stays in `rows` after its request finished until its outcome is committed.
    active: usize,
    per_target: HashMap<String, usize>,
    /// Bumped each time rows are released after their outcome was committed.
    epoch: u64,
    /// Rows released at a given epoch. A dispatcher query that started before that epoch may
    /// have read such a row in its pre-commit state (still `ready`), so its result is not
    /// trusted for these rows; a query that starts later sees the committed state.
    released: HashMap<i64, u64>,
}

impl InFlight {
    /// Forget a row after its outcome is committed. Returns whether it was in flight.
    fn release(&mut self, seq: i64) -> bool {
        let was = self.rows.remove(&seq);
        self.released.insert(seq, self.epoch);
        was
    }

    /// An attempt's request finished: its slot under the caps is free.
    fn request_done(&mut self, target_key: &str) {
        self.active = self.active.saturating_sub(1);
        if let Some(n) = self.per_target.get_mut(target_key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_target.remove(target_key);
            }
        }
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
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let limits = settings.runs.batch_limits();
        let runs = Arc::new(Runs::new(store.clone(), limits));
        Arc::new(Engine {
            store,
            metrics,
            webhooks: WebhookCache::default(),
            runs,
            commands: OnceLock::new(),
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
            in_flight: Mutex::new(InFlight::default()),
            unhealthy: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            done_tx,
            done_rx: Mutex::new(Some(done_rx)),
        })
    }

    /// The command sink stop commands are published to (runs stopped by a 400 to `started`).
    pub fn set_commands(&self, commands: Arc<dyn CommandSink>) {
        let _ = self.commands.set(commands);
    }

    pub fn client(&self) -> &DeliveryClient {
        &self.client
    }

    pub fn rotation_grace_ms(&self) -> i64 {
        self.rotation_grace_ms
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().expect("lock").rows.len()
    }

    /// Wake the dispatcher: new work was queued.
    /// Take freshly committed ready rows into the in-memory ready queue, up to its bound
    /// (called just before their transaction commits). Returns the rows taken.
    fn claim(&self, rows: &[QueuedDelivery]) -> Vec<i64> {
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
    fn push_hot(&self, f: &mut InFlight, rows: Vec<QueuedDelivery>, taken: &[i64]) {
        let taken: HashSet<i64> = taken.iter().copied().collect();
        f.hot.extend(rows.into_iter().filter(|r| taken.contains(&r.seq)));
    }

    /// Take a stopped run's rows out of the in-memory ready queue (they are dropped).
    fn forget_hot_run(f: &mut InFlight, run_id: &str) {
        let InFlight { hot, claimed, .. } = f;
        hot.retain(|r| {
            let keep = r.run_id.as_deref() != Some(run_id);
            if !keep {
                claimed.remove(&r.seq);
            }
            keep
        });
    }

    /// The commit failed: forget the claims.
    fn unclaim(&self, taken: &[i64]) {
        let mut f = self.in_flight.lock().expect("lock");
        for s in taken {
            f.claimed.remove(s);
        }
    }

    /// Work may be waiting in the store only (new or replayed rows, parked events): the
    /// dispatcher queries on its next round.
    pub fn notify(&self) {
        self.in_flight.lock().expect("lock").overflow = true;
        self.wake.notify_one();
    }

    fn wake_hot(&self) {
        self.wake.notify_one();
    }

    pub async fn load_webhooks(&self) -> anyhow::Result<()> {
        for w in self.store.all_webhooks().await? {
            self.webhooks.put(w);
        }
        Ok(())
    }

    // ---- routing ----------------------------------------------------------------------------

    /// Decide the deliveries (and dead letters) of one event.
    pub fn route(&self, e: &Envelope, now: i64, out: &mut Vec<NewDelivery>, dead: &mut Vec<NewDeadLetter>) -> Routed {
        let before = out.len();
        let mut unroutable = |reason: &'static str, webhook_id: Option<String>| {
            dead.push(event_dead_letter(e, webhook_id, reason));
            reason
        };
        let mut reason = None;
        let mut filtered = false;
        match &e.webhook_id {
            // Runs are not known to this relay yet: an event must name its webhook.
            None => reason = Some(unroutable("unknown_run", None)),
            Some(wid) => match self.webhooks.get(wid) {
                None => reason = Some(unroutable("unknown_webhook", Some(wid.clone()))),
                Some(w) if !w.is_active => reason = Some(unroutable("webhook_disabled", Some(wid.clone()))),
                Some(w) if !subscribed(&w.event_types, &e.event) => filtered = true,
                Some(w) => out.push(NewDelivery {
                    id: uuid::Uuid::now_v7().to_string(),
                    event_id: e.id.clone(),
                    event: e.event.clone(),
                    run_id: e.sync_job_run_id.clone(),
                    kind: "webhook",
                    webhook_id: Some(w.id.clone()),
                    target_url: None,
                    target_key: format!("w:{}", w.id),
                    order_key: e.sync_job_run_id.as_ref().map(|r| format!("w:{}:{r}", w.id)),
                    body: e.body(Some(&w.id)),
                    created_at: now,
                    attempts: 0,
                    first_attempt_at: None,
                    next_attempt_at: None,
                }),
            },
        }
        if let Some(cb) = &e.callback_url {
            let target_key = format!(
                "c:{}:{}",
                cb.host_str().unwrap_or(""),
                cb.port_or_known_default().unwrap_or(0)
            );
            out.push(NewDelivery {
                id: uuid::Uuid::now_v7().to_string(),
                event_id: e.id.clone(),
                event: e.event.clone(),
                run_id: e.sync_job_run_id.clone(),
                kind: "callback",
                webhook_id: e.webhook_id.clone(),
                target_url: Some(cb.to_string()),
                order_key: e.sync_job_run_id.as_ref().map(|r| format!("c:{cb}:{r}")),
                target_key,
                body: e.body(e.webhook_id.as_deref()),
                created_at: now,
                attempts: 0,
                first_attempt_at: None,
                next_attempt_at: None,
            });
        }
        let deliveries = out.len() - before;
        Routed {
            id: e.id.clone(),
            status: if deliveries > 0 {
                "queued"
            } else if reason.is_some() {
                "dead_lettered"
            } else if filtered {
                "filtered"
            } else {
                "queued"
            },
            reason,
            deliveries,
        }
    }

    /// Decide what each event becomes (deliveries, dead letters, how it was routed), in order,
    /// with one run-lifecycle transaction for all of them. Nothing is queued.
    #[allow(clippy::type_complexity)]
    pub async fn plan_many(
        &self,
        events: &[&Envelope],
        now: i64,
    ) -> anyhow::Result<Vec<(Vec<NewDelivery>, Vec<NewDeadLetter>, Routed)>> {
        let decisions = self.runs.on_ingest_many(events).await?;
        Ok(events
            .iter()
            .zip(decisions)
            .map(|(e, d)| {
                let (mut out, mut dead) = (Vec::new(), Vec::new());
                let routed = self.plan_decided(e, d, now, &mut out, &mut dead);
                (out, dead, routed)
            })
            .collect())
    }

    /// Route one event after its run's lifecycle decided on it (`None`: not a run the relay
    /// knows).
    fn plan_decided(
        &self,
        e: &Envelope,
        decision: Option<crate::runs::Decision>,
        now: i64,
        out: &mut Vec<NewDelivery>,
        dead: &mut Vec<NewDeadLetter>,
    ) -> Routed {
        let Some(d) = decision else {
            // Not a run the relay knows: deliver as the event says.
            return self.route(e, now, out, dead);
        };
        let relay_made = e
            .sync_job_run_id
            .as_deref()
            .is_some_and(|r| e.id.starts_with(&relay_event_prefix(r)));
        for b in &d.before {
            self.route(b, now, out, dead);
        }
        let routed = match d.action {
            Action::Deliver => {
                if !relay_made {
                    if let Some(status) = final_status(&e.event) {
                        self.metrics.runs_finished.with_label_values(&[status]).inc();
                    }
                }
                let main = Envelope {
                    webhook_id: d.webhook_id.clone(),
                    callback_url: d.callback_url.clone(),
                    ..e.clone()
                };
                self.route(&main, now, out, dead)
            }
            Action::Drop { reason } => {
                self.metrics.run_events_dropped.with_label_values(&[reason]).inc();
                Routed {
                    id: e.id.clone(),
                    status: "dropped",
                    reason: Some(reason),
                    deliveries: 0,
                }
            }
            Action::DeadLetter { reason } => {
                dead.push(event_dead_letter(e, d.webhook_id.clone(), reason));
                Routed {
                    id: e.id.clone(),
                    status: "dead_lettered",
                    reason: Some(reason),
                    deliveries: 0,
                }
            }
            Action::Absorb => Routed {
                id: e.id.clone(),
                status: "batched",
                reason: None,
                deliveries: 0,
            },
        };
        for a in &d.after {
            if a.event == "sync_job_run:failed" {
                self.metrics.runs_finished.with_label_values(&["failed"]).inc();
            }
            self.route(a, now, out, dead);
        }
        routed
    }

    /// Plan and durably queue events; returns once they are committed.
    pub async fn ingest(&self, events: &[Envelope], source: &str) -> anyhow::Result<Vec<Routed>> {
        let routed = self.queue(events).await?;
        self.metrics
            .events_ingested
            .with_label_values(&[source])
            .inc_by(events.len() as u64);
        Ok(routed)
    }

    /// `ingest` without counting the events as ingested (events the relay makes itself).
    async fn queue(&self, events: &[Envelope]) -> anyhow::Result<Vec<Routed>> {
        let now = now_ms();
        let mut out = Vec::with_capacity(events.len());
        let mut dead = Vec::new();
        let mut routed = Vec::with_capacity(events.len());
        let refs: Vec<&Envelope> = events.iter().collect();
        for (o, d, r) in self.plan_many(&refs, now).await? {
            out.extend(o);
            dead.extend(d);
            routed.push(r);
        }
        let mut taken = Vec::new();
        let res = self
            .store
            .enqueue_claiming(&out, &dead, now, |rows| taken = self.claim(rows))
            .await;
        let ready = match res {
            Ok(r) => r,
            Err(e) => {
                self.unclaim(&taken);
                return Err(e);
            }
        };
        if !taken.is_empty() {
            let mut f = self.in_flight.lock().expect("lock");
            self.push_hot(&mut f, ready, &taken);
        }
        for d in &dead {
            self.metrics.dead_letters.with_label_values(&[d.reason]).inc();
        }
        for r in &routed {
            if r.status == "filtered" {
                self.metrics.events_filtered.inc();
            }
        }
        if !out.is_empty() {
            // Ready rows are in memory (or, when it was full, flagged for the next query);
            // waiting rows are promoted by the writer when their predecessor finishes.
            self.wake_hot();
        }
        Ok(routed)
    }

    // ---- runs -------------------------------------------------------------------------------

    /// The body to send for this attempt: a run's `completed` / `failed` gets the run's final
    /// counts (`Runs::terminal_payload`) merged into its payload now, when every earlier event
    /// of the run to this webhook was answered or dead-lettered (the chain's order). `None`:
    /// send the queued body as it is.
    pub async fn attempt_body(&self, event: &str, run_id: Option<&str>, body: &str) -> Option<String> {
        if !matches!(event, "sync_job_run:completed" | "sync_job_run:failed") {
            return None;
        }
        let counts = match self.runs.terminal_payload(run_id?).await {
            Ok(Value::Object(c)) if !c.is_empty() => c,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "run counts unavailable; sending the queued body");
                return None;
            }
        };
        let mut v: Map<String, Value> = serde_json::from_str(body).ok()?;
        let Some(Value::Object(payload)) = v.get_mut("payload") else {
            return None;
        };
        for (k, x) in counts {
            payload.insert(k, x);
        }
        let new = serde_json::to_string(&Value::Object(v)).ok()?;
        (new != body).then_some(new)
    }

    /// Count a finished delivery on its run: call once per delivery to a registered webhook
    /// (not callback copies) when it was answered 2xx (`delivered`) or dead-lettered.
    pub async fn run_outcome(&self, kind: &str, event: &str, run_id: Option<&str>, body: &str, delivered: bool) {
        if kind != "webhook" {
            return;
        }
        let resource = record_resource(event, body);
        self.count_outcome(run_id, event, resource.as_deref(), delivered).await;
    }

    async fn count_outcome(&self, run_id: Option<&str>, event: &str, resource: Option<&str>, delivered: bool) {
        let Some(run_id) = run_id else { return };
        if event != "sync_job_run:record" {
            return;
        }
        if let Err(e) = self.runs.on_outcome(run_id, event, resource, delivered).await {
            tracing::error!(error = %format!("{e:#}"), run_id, "counting a run outcome failed");
        }
    }

    /// Does this answer stop its run? A 400 to `sync_job_run:started` from the run's webhook.
    pub fn stops_run(kind: &str, event: &str, status: Option<u16>) -> bool {
        kind == "webhook" && event == "sync_job_run:started" && status == Some(400)
    }

    /// Stop an active run because its webhook refused it: status `stopped`, the run's queued
    /// deliveries are dropped (counted), a stop command is published for executors, and a
    /// gathered batch of errors is queued. Returns false when the run is unknown or no longer
    /// active (nothing changed).
    pub async fn stop_run(&self, run_id: &str, why: &str) -> bool {
        let flushed = match self.runs.stop(run_id, why).await {
            Ok(Some(f)) => f,
            Ok(None) => return false,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), run_id, "stopping a run failed");
                return false;
            }
        };
        tracing::info!(run_id, reason = why, "run stopped");
        self.metrics.runs_finished.with_label_values(&["stopped"]).inc();
        let keep: Vec<i64> = {
            let mut f = self.in_flight.lock().expect("lock");
            Self::forget_hot_run(&mut f, run_id);
            f.rows.iter().copied().collect()
        };
        let res = self.store.drop_queued_for_run(run_id, &keep, now_ms()).await;
        // Rows of the run promoted while the drop waited for the write lock.
        Self::forget_hot_run(&mut self.in_flight.lock().expect("lock"), run_id);
        match res {
            Ok(dropped) => {
                let webhook: Vec<_> = dropped.iter().filter(|(k, _, _)| k == "webhook").collect();
                self.metrics
                    .run_events_dropped
                    .with_label_values(&["run_stopped"])
                    .inc_by(webhook.len() as u64);
                let resources: Vec<String> = webhook
                    .iter()
                    .filter(|(_, ev, _)| matches!(ev.as_str(), "sync_job_run:record" | "sync_job_run:record_error"))
                    .map(|(_, _, body)| payload_resource(body).unwrap_or_else(|| "unknown".into()))
                    .collect();
                if let Err(e) = self.runs.note_dropped(run_id, &resources).await {
                    tracing::error!(error = %format!("{e:#}"), run_id, "counting dropped events failed");
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), run_id, "dropping a stopped run's deliveries failed"),
        }
        match self.commands.get() {
            Some(c) => {
                let cmd = json!({"type": "stop", "run_id": run_id, "reason": why});
                if let Err(e) = c.publish(run_id, cmd).await {
                    tracing::error!(error = %format!("{e:#}"), run_id, "publishing a stop command failed");
                }
            }
            None => tracing::warn!(run_id, "no command sink: stop command not published"),
        }
        if !flushed.is_empty() {
            if let Err(e) = self.queue(&flushed).await {
                tracing::error!(error = %format!("{e:#}"), run_id, "queueing a stopped run's batch failed");
            }
        }
        true
    }

    /// Batch mode: every so often, queue the batches of record errors that are due by age.
    async fn flush_batches(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.batch_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.runs.flush_due_batches().await {
                Ok(due) if !due.is_empty() => {
                    if let Err(e) = self.queue(&due).await {
                        tracing::error!(error = %format!("{e:#}"), batches = due.len(), "queueing due error batches failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "flushing due error batches failed"),
            }
        }
    }

    /// Queue an operational event (e.g. `webhook:disabled`) to every active webhook that
    /// subscribes to it.
    pub async fn broadcast(&self, event: &str, payload: serde_json::Value, except: Option<&str>) -> anyhow::Result<()> {
        let serde_json::Value::Object(payload) = payload else {
            anyhow::bail!("payload must be an object")
        };
        let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let now = now_ms();
        let envelopes: Vec<Envelope> = self
            .webhooks
            .all()
            .iter()
            .filter(|w| w.is_active && Some(w.id.as_str()) != except && subscribed(&w.event_types, event))
            .map(|w| Envelope {
                id: id.clone(),
                event: event.to_string(),
                sync_job_run_id: None,
                webhook_id: Some(w.id.clone()),
                callback_url: None,
                environment_id: None,
                created_at_ms: now,
                payload: payload.clone(),
            })
            .collect();
        if !envelopes.is_empty() {
            self.ingest(&envelopes, "api").await?;
        }
        Ok(())
    }

    // ---- dispatch ---------------------------------------------------------------------------

    /// Run the dispatcher and the outcome writer until `stop` is cancelled, then wait up to
    /// `deadline` for in-flight attempts to be recorded. Unfinished rows stay queued.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, deadline: Duration) {
        let rx = self.done_rx.lock().expect("lock").take().expect("engine runs once");
        let writer = tokio::spawn(self.clone().write_outcomes(rx));
        let housekeeping = tokio::spawn(self.clone().housekeeping(stop.clone(), self.retention));
        let flusher = tokio::spawn(self.clone().flush_batches(stop.clone()));
        self.clone().dispatch(stop).await;
        let until = Instant::now() + deadline;
        while self.in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.in_flight();
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "shutdown deadline passed; unfinished deliveries stay queued"
            );
        }
        writer.abort();
        housekeeping.abort();
        flusher.abort();
    }

    async fn dispatch(self: Arc<Self>, stop: CancellationToken) {
        let mut last_scan: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let now_i = Instant::now();
            // 1. Rows handed over in memory, oldest first, skipping targets at their cap.
            let mut hot_rows = Vec::new();
            let (free, skip, known, epoch, scan) = {
                let mut f = self.in_flight.lock().expect("lock");
                let mut free = self.max_in_flight.saturating_sub(f.active);
                if free > 0 && !f.hot.is_empty() {
                    let mut keep = VecDeque::new();
                    while let Some(row) = f.hot.pop_front() {
                        if free == 0 {
                            keep.push_back(row);
                            keep.append(&mut f.hot);
                            break;
                        }
                        let n = f.per_target.entry(row.target_key.clone()).or_insert(0);
                        if *n >= self.per_target_cap {
                            keep.push_back(row);
                            continue;
                        }
                        *n += 1;
                        f.active += 1;
                        f.claimed.remove(&row.seq);
                        f.rows.insert(row.seq);
                        free -= 1;
                        hot_rows.push(row);
                    }
                    f.hot = keep;
                }
                // 2. The store, when something may be there that is not in memory.
                let scan = free > 0
                    && (f.overflow
                        || f.scan_at.is_some_and(|t| t <= now_i)
                        || last_scan.is_none_or(|t: Instant| now_i.duration_since(t) >= self.poll_interval));
                // Releases before now are visible to the query we are about to run.
                f.released.clear();
                f.epoch += 1;
                let skip: Vec<String> = f
                    .per_target
                    .iter()
                    .filter(|(_, n)| **n >= self.per_target_cap)
                    .map(|(k, _)| k.clone())
                    .collect();
                (free, skip, f.rows.len() + f.claimed.len(), f.epoch, scan)
            };
            let mut started = hot_rows.len();
            for row in hot_rows {
                self.metrics.in_flight.inc();
                tokio::spawn(self.clone().attempt(row));
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
                        let mut f = self.in_flight.lock().expect("lock");
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
                            let n = f.per_target.entry(row.target_key.clone()).or_insert(0);
                            if *n >= self.per_target_cap {
                                continue;
                            }
                            *n += 1;
                            f.active += 1;
                            f.rows.insert(row.seq);
                            took += 1;
                            self.metrics.in_flight.inc();
                            tokio::spawn(self.clone().attempt(row));
                        }
                        if exhausted {
                            f.overflow = false;
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
            if started > 0 && !exhausted {
                continue;
            }
            // Nothing more to start now: sleep until woken (new work, a finished attempt), the
            // next retry is due, or the poll interval passes.
            let mut sleep = self.poll_interval;
            if let Some(at) = self.in_flight.lock().expect("lock").scan_at {
                sleep = sleep.min(at.saturating_duration_since(Instant::now()));
            }
            if started > 0 {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// The URL and secrets for a delivery, or why it cannot be attempted.
    pub fn target(
        &self,
        kind: &str,
        webhook_id: Option<&str>,
        target_url: Option<&str>,
        now: i64,
    ) -> Result<(Url, Vec<Secret>), &'static str> {
        if kind == "callback" {
            let url = target_url.and_then(|u| Url::parse(u).ok()).ok_or("malformed")?;
            return Ok((url, vec![self.callback_secret.clone()]));
        }
        let id = webhook_id.ok_or("unknown_webhook")?;
        let w = self.webhooks.get(id).ok_or("unknown_webhook")?;
        if !w.is_active {
            return Err("webhook_disabled");
        }
        let url = Url::parse(&w.target_url).map_err(|_| "malformed")?;
        let mut secrets = vec![w.secret.clone()];
        if let Some((prev, until)) = &w.previous_secret {
            if *until > now {
                secrets.push(prev.clone());
            }
        }
        Ok((url, secrets))
    }

    /// Has the target failed recently? New work for an unhealthy target is parked in the store
    /// (Kafka mode) instead of holding a partition while it retries.
    pub fn target_unhealthy(&self, target_key: &str) -> bool {
        let h = self.unhealthy.lock().expect("lock");
        h.get(target_key)
            .is_some_and(|since| since.elapsed() < UNHEALTHY_PROBE_AFTER)
    }

    /// Record an attempt's effect on its target's health.
    pub fn note_health(&self, target_key: &str, ok: bool) {
        let mut h = self.unhealthy.lock().expect("lock");
        if ok {
            h.remove(target_key);
        } else {
            h.insert(target_key.to_string(), Instant::now());
        }
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// One signed POST (used by deliveries and by `POST /webhook/{id}/test`).
    pub async fn send(&self, url: &Url, secrets: &[Secret], event_id: &str, attempt_no: i64, body: String) -> Attempt {
        let ts = now_ms() / 1000;
        let refs: Vec<&Secret> = secrets.iter().collect();
        let (sig, truto) = signature_headers(&refs, event_id, ts, body.as_bytes());
        let headers = [
            ("webhook-id", event_id.to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
            ("x-truto-signature", truto),
            ("webhook-attempt", attempt_no.to_string()),
        ];
        self.client.post(url, &headers, body).await
    }

    async fn attempt(self: Arc<Self>, q: QueuedDelivery) {
        let now = now_ms();
        let attempt_no = q.attempts + 1;
        let kind: &'static str = if q.kind == "callback" { "callback" } else { "webhook" };
        let final_body = self.attempt_body(&q.event, q.run_id.as_deref(), &q.body).await;
        let body = final_body.clone().unwrap_or_else(|| q.body.clone());
        let resource = if kind == "webhook" && q.run_id.is_some() {
            record_resource(&q.event, &q.body)
        } else {
            None
        };
        let dead = |reason: &'static str, status: Option<i64>, error: Option<String>, attempts: i64| NewDeadLetter {
            delivery_id: Some(q.id.clone()),
            event_id: q.event_id.clone(),
            event: q.event.clone(),
            webhook_id: q.webhook_id.clone(),
            kind,
            reason,
            attempts,
            last_status: status,
            last_error: error,
            raw: body.clone(),
        };
        let (url, secrets) = match self.target(&q.kind, q.webhook_id.as_deref(), q.target_url.as_deref(), now) {
            Ok(t) => t,
            Err(reason) => {
                self.request_done(&q.target_key);
                let dl = dead(reason, None, Some(reason.to_string()), q.attempts);
                if kind == "webhook" {
                    self.count_outcome(q.run_id.as_deref(), &q.event, resource.as_deref(), false)
                        .await;
                }
                let res = self.store.dead_letter_queued(&q, &dl, now).await;
                if let Err(e) = res {
                    tracing::error!(error = %format!("{e:#}"), "could not dead-letter delivery");
                } else {
                    self.metrics.dead_letters.with_label_values(&[reason]).inc();
                    self.metrics
                        .deliveries
                        .with_label_values(&["dead_lettered", kind])
                        .inc();
                }
                self.release(&q);
                // The next row of its chain was promoted in the store only.
                self.notify();
                return;
            }
        };
        let a = self.send(&url, &secrets, &q.event_id, attempt_no, body.clone()).await;
        self.request_done(&q.target_key);
        let finished = now_ms();
        self.metrics
            .attempts
            .with_label_values(&[result_label(&a.result), kind])
            .inc();
        self.metrics
            .attempt_duration
            .with_label_values(&[kind])
            .observe(a.duration.as_secs_f64());
        let first = q.first_attempt_at.unwrap_or(now);
        let status = a.status.map(|s| s as i64);
        self.note_health(&q.target_key, matches!(classify(&a.result), Verdict::Delivered));
        // A 400 to `started`: the receiver refuses the run. Stop it; this event is finished.
        let refused = Self::stops_run(kind, &q.event, a.status)
            && match &q.run_id {
                Some(run) => self.stop_run(run, "started answered 400").await,
                None => false,
            };
        let next = match classify(&a.result) {
            _ if refused => Next::Dead(dead("run_stopped", status, a.error.clone(), attempt_no)),
            Verdict::Delivered => Next::Delivered,
            Verdict::Retry { not_before } => {
                let elapsed = Duration::from_millis((finished - first).max(0) as u64);
                match self.policy.next_delay(attempt_no as u32, elapsed, not_before) {
                    Some(d) => Next::Retry {
                        at_ms: finished + d.as_millis() as i64,
                    },
                    None => Next::Dead(dead("attempts_exhausted", status, a.error.clone(), attempt_no)),
                }
            }
            Verdict::DeadLetter { reason } => Next::Dead(dead(reason, status, a.error.clone(), attempt_no)),
            Verdict::DisableWebhook => {
                if let Some(id) = &q.webhook_id {
                    if q.kind == "webhook" {
                        self.disable_webhook(id).await;
                    }
                }
                Next::Dead(dead("webhook_disabled", status, a.error.clone(), attempt_no))
            }
        };
        tracing::debug!(
            delivery_id = %q.id, event_id = %q.event_id, attempt = attempt_no,
            status = ?a.status, result = result_label(&a.result), "attempt finished"
        );
        let c = Completion {
            seq: q.seq,
            delivery_id: q.id.clone(),
            order_key: q.order_key.clone(),
            attempt_no,
            first_attempt_at: first,
            attempt: AttemptRecord {
                started_at: now,
                duration_ms: a.duration.as_millis() as i64,
                status,
                error: a.error,
                excerpt: a.excerpt,
            },
            next,
            kind,
            target_key: q.target_key.clone(),
            created_at: q.created_at,
            body: final_body,
            run_id: q.run_id.clone(),
            event: q.event.clone(),
            resource,
        };
        if self.done_tx.send(c).is_err() {
            // Shutting down: the row stays ready and is attempted again after restart.
            self.release(&q);
        }
    }

    fn request_done(&self, target_key: &str) {
        self.in_flight.lock().expect("lock").request_done(target_key);
        self.wake.notify_one();
    }

    fn release(&self, q: &QueuedDelivery) {
        let mut f = self.in_flight.lock().expect("lock");
        if f.release(q.seq) {
            self.metrics.in_flight.dec();
        }
        drop(f);
        self.wake.notify_one();
    }

    pub async fn disable_webhook(&self, id: &str) {
        let Some(w) = self.webhooks.get(id) else {
            return;
        };
        if !w.is_active {
            return;
        }
        let mut w = (*w).clone();
        w.is_active = false;
        w.updated_at = now_ms();
        if let Err(e) = self.store.update_webhook(&w).await {
            tracing::error!(error = %format!("{e:#}"), "could not disable webhook");
            return;
        }
        tracing::warn!(webhook_id = %id, "receiver answered 410 Gone: webhook disabled");
        self.webhooks.put(w);
        self.metrics.webhooks_disabled.inc();
        let payload = json!({"webhook_id": id, "reason": "receiver answered 410 Gone", "disabled_at": crate::domain::rfc3339_ms(now_ms())});
        if let Err(e) = self.broadcast("webhook:disabled", payload, Some(id)).await {
            tracing::error!(error = %format!("{e:#}"), "could not queue webhook:disabled");
        }
    }

    /// Commit outcomes in batches; only after the commit are rows released from in-flight.
    async fn write_outcomes(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Completion>) {
        let mut batch = Vec::with_capacity(512);
        loop {
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            while batch.len() < 512 {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            // Count outcomes on their runs before the commit promotes the next event of the
            // chain, so a run's `completed` (attempted after that) sees final counts.
            let outcomes: Vec<(&str, &str, Option<&str>, bool)> = batch
                .iter()
                .filter(|c| c.kind == "webhook")
                .filter_map(|c| {
                    let delivered = match &c.next {
                        Next::Delivered => true,
                        Next::Dead(_) => false,
                        Next::Retry { .. } => return None,
                    };
                    Some((c.run_id.as_deref()?, c.event.as_str(), c.resource.as_deref(), delivered))
                })
                .collect();
            if let Err(e) = self.runs.on_outcomes(&outcomes).await {
                tracing::error!(error = %format!("{e:#}"), "counting run outcomes failed");
            }
            // A failed commit is retried: an outcome is never dropped (the row would otherwise
            // be attempted again, which is allowed, but we prefer not to).
            let mut backoff = Duration::from_millis(50);
            // The rows promoted behind finished ones are handed to the dispatcher before the
            // commit, so their requests overlap it (a chain's next event does not wait for
            // the disk). Should the commit fail, they stay claimed and the retry keeps them;
            // after a crash both are attempted again, in order.
            loop {
                let res = self
                    .store
                    .complete(&batch, now_ms(), |rows| {
                        let taken = self.claim(rows);
                        let mut f = self.in_flight.lock().expect("lock");
                        self.push_hot(&mut f, rows.to_vec(), &taken);
                        drop(f);
                        self.wake.notify_one();
                    })
                    .await;
                match res {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "recording outcomes failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let now = now_ms();
            let now_i = Instant::now();
            let mut f = self.in_flight.lock().expect("lock");
            for c in batch.drain(..) {
                if let Next::Retry { at_ms } = &c.next {
                    let at = now_i + Duration::from_millis((at_ms - now).max(0) as u64);
                    f.scan_at = Some(f.scan_at.map_or(at, |t| t.min(at)));
                }
                match &c.next {
                    Next::Delivered => {
                        self.metrics.deliveries.with_label_values(&["delivered", c.kind]).inc();
                        self.metrics.attempts_per_delivery.observe(c.attempt_no as f64);
                        self.metrics
                            .end_to_end_latency
                            .observe((now - c.created_at).max(0) as f64 / 1000.0);
                    }
                    Next::Retry { .. } => self.metrics.retries.with_label_values(&[c.kind]).inc(),
                    Next::Dead(dl) => {
                        self.metrics
                            .deliveries
                            .with_label_values(&["dead_lettered", c.kind])
                            .inc();
                        self.metrics.dead_letters.with_label_values(&[dl.reason]).inc();
                    }
                }
                if f.release(c.seq) {
                    self.metrics.in_flight.dec();
                }
            }
            drop(f);
            self.wake.notify_one();
        }
    }

    /// Queue depth and oldest-undelivered gauges, and retention of delivered rows.
    async fn housekeeping(self: Arc<Self>, stop: CancellationToken, retention: Duration) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut last_purge = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Other instances sharing the store may have changed webhooks.
            let started = now_ms();
            match self.store.all_webhooks().await {
                Ok(all) => {
                    let ids: std::collections::HashSet<String> = all.iter().map(|w| w.id.clone()).collect();
                    for w in all {
                        // Never overwrite a newer version this instance already has.
                        if self.webhooks.get(&w.id).is_none_or(|c| c.updated_at <= w.updated_at) {
                            self.webhooks.put(w);
                        }
                    }
                    for w in self.webhooks.all() {
                        // Created after the query started: not deleted, just not seen yet.
                        if !ids.contains(&w.id) && w.created_at < started {
                            self.webhooks.remove(&w.id);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "webhook refresh failed"),
            }
            match self.store.queue_stats().await {
                Ok((depth, oldest)) => {
                    self.metrics.queue_depth.set(depth);
                    let age = oldest.map(|o| (now_ms() - o).max(0) as f64 / 1000.0).unwrap_or(0.0);
                    self.metrics.oldest_undelivered_age.set(age);
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "queue stats failed"),
            }
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = Instant::now();
                let before = now_ms() - retention.as_millis() as i64;
                if let Err(e) = self.store.purge_delivered(before).await {
                    tracing::warn!(error = %format!("{e:#}"), "retention purge failed");
                }
            }
        }
    }
}

/// `completed`, `failed` or `stopped` for a run's terminal events.
/// The dead letter of an event that is refused before any delivery is queued for it.
fn event_dead_letter(e: &Envelope, webhook_id: Option<String>, reason: &'static str) -> NewDeadLetter {
    NewDeadLetter {
        delivery_id: None,
        event_id: e.id.clone(),
        event: e.event.clone(),
        webhook_id,
        kind: "webhook",
        reason,
        attempts: 0,
        last_status: None,
        last_error: None,
        raw: e.to_json().to_string(),
    }
}

fn final_status(event: &str) -> Option<&'static str> {
    match event {
        "sync_job_run:completed" => Some("completed"),
        "sync_job_run:failed" => Some("failed"),
        "sync_job_run:stopped" => Some("stopped"),
        _ => None,
    }
}

/// `payload.resource` of a `sync_job_run:record` delivery body (what run outcomes count by).
fn record_resource(event: &str, body: &str) -> Option<String> {
    if event != "sync_job_run:record" {
        return None;
    }
    payload_resource(body)
}

fn payload_resource(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v.get("payload")?.get("resource")?.as_str().map(str::to_string)
}
