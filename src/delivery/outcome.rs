//! Outcomes, the same path for every job: the attempt log, run outcome counts, dead letters
//! (stored, and published to the bus's dead-letter topic), promotion of a chain's next event,
//! and the acknowledgement (a stored row's outcome committed, or a Kafka offset released).
//!
//! Everything that touches the store goes through the writer task of its chain (two of them,
//! see [`Writers`]), each committing in batches (group commit), so recording never bounds
//! throughput:
//! - a stored job's outcome is committed before the row is released (never attempted twice);
//! - a memory job answered 2xx is acknowledged at once — its log row is written later in a
//!   batch, so a first-try Kafka success costs no synchronous store write;
//! - a memory job dead-lettered or parked is acknowledged only after its row is committed, so
//!   an offset is never committed past an event that exists nowhere.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::attempt::is_terminal;
use super::attempt::Decided;
use super::engine::Engine;
use super::job::{Ack, Job, Origin};
use crate::config::LogMode;
use crate::domain::now_ms;
use crate::ordering::AfterHead;
use crate::runs::lifecycle::{count_into, counted_outcome, counted_runs};
use crate::store::{Completion, Counting, Logged, NewDeadLetter, NewDelivery, Next, RunsLocked};

/// A run's record answered or dead-lettered (counted on its run).
pub(super) struct RunOutcome {
    /// The delivery's id: a message read again after a crash makes the same one, and is not
    /// counted again when that delivery was already recorded.
    delivery_id: String,
    run_id: String,
    resource: String,
    delivered: bool,
}

/// A dead letter to publish once committed: (dead letter, bus source, original message).
type Publish = (NewDeadLetter, Option<String>, Option<Arc<Vec<u8>>>);

/// What the writer commits.
pub(super) enum Write {
    /// A stored row's attempt (`source`: for the dead-letter topic).
    Complete(Completion, Option<String>),
    /// A memory job finished: its log row, its dead letter, its run outcome; `ack` is called
    /// once they are committed (None: already acknowledged).
    Finished {
        logged: Option<Logged>,
        dead: Option<NewDeadLetter>,
        source: Option<String>,
        original: Option<Arc<Vec<u8>>>,
        outcome: Option<RunOutcome>,
        ack: Option<Arc<dyn Ack>>,
    },
    /// Memory jobs moving to the store, in their chain's order, acknowledged once written.
    Park {
        rows: Vec<NewDelivery>,
        ahead: bool,
        acks: Vec<Arc<dyn Ack>>,
    },
    /// Dead letters of events refused before any delivery (bus intake: unroutable, poison).
    Dead {
        dead: Vec<NewDeadLetter>,
        source: Option<String>,
        original: Option<Arc<Vec<u8>>>,
        ack: Option<Arc<dyn Ack>>,
    },
    /// Answered once everything sent before it is committed.
    Barrier(oneshot::Sender<()>),
    /// Renew the leases of the rows claimed here (see `Engine::renew_now`).
    Renew,
}

impl Write {
    /// The chain this write belongs to, if any: its writer is that chain's.
    fn chain(&self) -> Option<&str> {
        match self {
            Write::Complete(c, _) => c.order_key.as_deref(),
            Write::Finished { logged, .. } => logged.as_ref()?.delivery.order_key.as_deref(),
            Write::Park { rows, .. } => rows.first()?.order_key.as_deref(),
            Write::Dead { .. } | Write::Barrier(_) | Write::Renew => None,
        }
    }
}

/// How many outcome writers commit at once.
///
/// A writer's round is a transaction whose time on PostgreSQL is mostly waiting: round trips,
/// the commit's flush, the chain locks of the intake's transactions. With one writer the
/// delivery side was bound by that latency, not by either process's CPU (1.45 of 2 cores busy in
/// the benchmark); two writers, each with its own chains, keep two transactions going:
/// PostgreSQL's benchmark delivered 14 – 22 % more events a second, SQLite's (whose writes share
/// one group commit anyway) the same as with one; three or four made the intake's transactions
/// wait longer for the chains' locks (docs/BENCHMARKS.md, seventeenth session).
const OUTCOME_WRITERS: usize = 2;

/// The outcome writers' queues. A write goes to the writer of its chain (the order key's hash),
/// so each chain's outcomes are committed by one writer, in the order they were made, and two
/// writers' transactions never lock the same chain (neither waits for the other there). Writes
/// of no chain (unordered deliveries, dead letters of refused events, renewals) go to the
/// first.
pub(super) struct Writers(Vec<mpsc::UnboundedSender<Write>>);

impl Writers {
    pub(super) fn new() -> (Writers, Vec<mpsc::UnboundedReceiver<Write>>) {
        let (txs, rxs) = (0..OUTCOME_WRITERS).map(|_| mpsc::unbounded_channel()).unzip();
        (Writers(txs), rxs)
    }

    /// Queue `w` for its chain's writer. Fails once the writers are gone (shutting down).
    pub(super) fn send(&self, w: Write) -> Result<(), WritersGone> {
        let i = match w.chain() {
            Some(key) => {
                use std::hash::{Hash, Hasher};
                // Fixed keys: a chain has the same writer for the life of the process.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut h);
                (h.finish() % self.0.len() as u64) as usize
            }
            None => 0,
        };
        self.0[i].send(w).map_err(|_| WritersGone)
    }

    /// A barrier queued to every writer still running: each answers once what was queued to
    /// it before is committed.
    fn barriers(&self) -> Vec<oneshot::Receiver<()>> {
        self.0
            .iter()
            .filter_map(|q| {
                let (tx, rx) = oneshot::channel();
                q.send(Write::Barrier(tx)).ok().map(|_| rx)
            })
            .collect()
    }
}

/// The outcome writers have stopped: nothing more is recorded by this process.
#[derive(Debug)]
pub(super) struct WritersGone;

impl Engine {
    /// Wait until every outcome handed to the writers so far is committed.
    pub async fn barrier(&self) {
        for rx in self.writes.barriers() {
            let _ = rx.await;
        }
    }

    /// Record dead letters of events refused at intake (stored, published), acknowledging
    /// `ack` once they are stored.
    pub fn dead_letter(
        &self,
        dead: Vec<NewDeadLetter>,
        source: Option<String>,
        original: Option<Arc<Vec<u8>>>,
        ack: Option<Arc<dyn Ack>>,
    ) {
        for d in &dead {
            self.metrics.dead_letters.with_label_values(&[d.reason]).inc();
        }
        if self
            .writes
            .send(Write::Dead {
                dead,
                source,
                original,
                ack,
            })
            .is_err()
        {
            tracing::warn!("shutting down: dead letters not recorded (their messages are read again)");
        }
    }

    /// What a decided attempt does to its job.
    pub(super) async fn finish(self: &Arc<Self>, job: Job, d: Decided) {
        let kind = job.kind();
        match &d.next {
            Next::Delivered => {
                self.metrics.deliveries.with_label_values(&["delivered", kind]).inc();
                self.metrics.attempts_per_delivery.observe((job.q.attempts + 1) as f64);
                self.metrics
                    .end_to_end_latency
                    .observe((now_ms() - job.q.created_at).max(0) as f64 / 1000.0);
            }
            Next::Retry { .. } => self.metrics.retries.with_label_values(&[kind]).inc(),
            Next::Dead(dl) => {
                self.metrics
                    .deliveries
                    .with_label_values(&["dead_lettered", kind])
                    .inc();
                self.metrics.dead_letters.with_label_values(&[dl.reason]).inc();
            }
        }
        match job.origin {
            Origin::Stored => self.finish_stored(job.q, d).await,
            Origin::Memory { ack, log } => {
                let q = job.q;
                self.finish_memory(q, ack, log, d)
            }
        }
    }

    async fn finish_stored(self: &Arc<Self>, q: crate::store::QueuedDelivery, d: Decided) {
        let now = now_ms();
        let Some(record) = d.record else {
            // Not attempted (its webhook is gone or disabled): dead-lettered as it is, and
            // counted on its run only once that is committed (by the lease's holder).
            let Next::Dead(dl) = d.next else { return };
            match self.store.dead_letter_queued(&q, &dl, now).await {
                Ok(true) => {
                    self.publish_dead(dl, q.source.clone(), None);
                    let counted = counted_outcome(&q.kind, q.run_id.as_deref(), &q.event, d.resource.as_deref(), false);
                    if let Some(item) = counted {
                        if let Err(e) = self.runs.on_outcomes(&[item]).await {
                            tracing::error!(error = %format!("{e:#}"), "counting a run outcome failed");
                        }
                    }
                }
                Ok(false) => self.metrics.leases_lost.inc(),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "could not dead-letter delivery"),
            }
            self.release(q.seq);
            // The next row of its chain was promoted in the store only.
            self.notify();
            return;
        };
        let c = Completion {
            seq: q.seq,
            delivery_id: q.id.clone(),
            order_key: q.order_key.clone(),
            attempt_no: q.attempts + 1,
            first_attempt_at: q.first_attempt_at.unwrap_or(record.started_at),
            attempt: record,
            next: d.next,
            kind: crate::store::kind_str(&q.kind),
            target_key: q.target_key.clone(),
            created_at: q.created_at,
            body: d.body,
            run_id: q.run_id.clone(),
            event: q.event.clone(),
            resource: d.resource,
        };
        if self.writes.send(Write::Complete(c, q.source)).is_err() {
            // Shutting down: the row stays ready and is attempted again after restart.
            self.release(q.seq);
        }
    }

    fn finish_memory(
        self: &Arc<Self>,
        mut q: crate::store::QueuedDelivery,
        ack: Arc<dyn Ack>,
        mut log: Vec<crate::store::AttemptRecord>,
        d: Decided,
    ) {
        self.memory_done();
        let Decided {
            record,
            next,
            body,
            resource,
        } = d;
        if let Some(r) = record {
            q.first_attempt_at.get_or_insert(r.started_at);
            q.attempts += 1;
            log.push(r);
        }
        if let Some(b) = body {
            q.body = b;
        }
        let outcome = |delivered: bool| {
            let (run, resource, delivered) =
                counted_outcome(&q.kind, q.run_id.as_deref(), &q.event, resource.as_deref(), delivered)?;
            Some(RunOutcome {
                delivery_id: q.id.clone(),
                run_id: run.to_string(),
                resource: resource.to_string(),
                delivered,
            })
        };
        let key = q.order_key.clone();
        match next {
            Next::Delivered => {
                let keep = match self.log_mode {
                    LogMode::All => true,
                    LogMode::Failures => log.len() > 1,
                    LogMode::None => false,
                };
                let outcome = outcome(true);
                let job = Job {
                    q,
                    origin: Origin::Memory { ack: ack.clone(), log },
                };
                let logged = keep.then(|| Logged {
                    delivery: job.into_row(None),
                    state: "delivered",
                });
                // Answered: the offset moves on once the log row and the run count are
                // committed (a crash before leaves the message to be read again, and the
                // delivery's id, the same then, keeps it from being counted twice).
                let recorded = (logged.is_some() || outcome.is_some())
                    && self
                        .writes
                        .send(Write::Finished {
                            logged,
                            dead: None,
                            source: None,
                            original: None,
                            outcome,
                            ack: Some(ack.clone()),
                        })
                        .is_ok();
                if !recorded {
                    ack.done();
                }
                self.after_head(key.as_deref());
            }
            Next::Dead(dl) => {
                let outcome = outcome(false);
                let source = q.source.clone();
                let job = Job {
                    q,
                    origin: Origin::Memory { ack: ack.clone(), log },
                };
                let logged = Logged {
                    delivery: job.into_row(None),
                    state: "dead",
                };
                if self
                    .writes
                    .send(Write::Finished {
                        logged: Some(logged),
                        dead: Some(dl),
                        source,
                        original: ack.original(),
                        outcome,
                        ack: Some(ack),
                    })
                    .is_err()
                {
                    tracing::warn!("shutting down: a dead letter is left to be read again");
                }
                self.after_head(key.as_deref());
            }
            Next::Retry { at_ms } => {
                let delay = Duration::from_millis((at_ms - now_ms()).max(0) as u64);
                let job = Job {
                    q,
                    origin: Origin::Memory { ack, log },
                };
                if (job.q.attempts as u32) < self.inline_attempts && delay <= self.inline_max_delay {
                    // Retry in memory: the job stays its chain's head; no request slot is held
                    // while it waits.
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        me.push_memory([job]);
                    });
                } else {
                    self.park_head(job, Some(at_ms));
                }
            }
        }
    }

    /// A memory head finished: its chain's next memory job goes, or held rows are promoted.
    fn after_head(self: &Arc<Self>, key: Option<&str>) {
        let Some(key) = key else { return };
        match self.chains.head_done(key) {
            AfterHead::Dispatch(next) if self.target_unhealthy(&next.q.target_key) => self.park_head(next, None),
            AfterHead::Dispatch(next) => self.push_memory([next]),
            AfterHead::Promote(k) => {
                let me = self.clone();
                tokio::spawn(async move { me.promote(&[k]).await });
            }
            AfterHead::Nothing => {}
        }
    }

    /// A memory head leaves memory for the store's retry queue, with the rest of its chain's
    /// memory jobs behind it (see `ordering`).
    pub(super) fn park_head(self: &Arc<Self>, job: Job, next_at: Option<i64>) {
        if let Origin::Memory { ack, .. } = &job.origin {
            if !ack.current() {
                // Its partition was taken from us: the new owner reads it again (its offset
                // was never finished here). Parking it now would put a row in the shared store
                // after the new owner learnt which chains have stored rows, and its own
                // delivery of the chain's later events would overtake it.
                self.after_head(job.q.order_key.as_deref());
                return;
            }
        }
        let (rest, ahead) = match &job.q.order_key {
            Some(k) => self.chains.park_head(k),
            None => (Vec::new(), false),
        };
        let mut acks: Vec<Arc<dyn Ack>> = job.ack().into_iter().collect();
        let mut rows = vec![job.into_row(next_at)];
        for j in rest {
            acks.extend(j.ack());
            rows.push(j.into_row(None));
        }
        self.send_park(rows, ahead, acks);
    }

    /// Hand parked rows of one chain to the writer, which tells the chain once they are
    /// committed (`Chains::parked`): until then the chain is not forgotten as drained.
    fn send_park(&self, rows: Vec<NewDelivery>, ahead: bool, acks: Vec<Arc<dyn Ack>>) {
        let key = rows.first().and_then(|r| r.order_key.clone());
        if self.writes.send(Write::Park { rows, ahead, acks }).is_err() {
            tracing::warn!("shutting down: parked deliveries are left to be read again");
            if let Some(k) = key {
                self.chains.parked(&k);
            }
        }
    }

    /// A memory job whose chain lives in the store: it goes behind the chain's rows.
    pub(super) fn park(&self, job: Job, next_at: Option<i64>) {
        let acks: Vec<Arc<dyn Ack>> = job.ack().into_iter().collect();
        let rows = vec![job.into_row(next_at)];
        self.send_park(rows, false, acks);
    }

    /// A memory job of a partition no longer ours: dropped, unacknowledged; its chain goes on
    /// (its later jobs are of the same partition and are dropped the same way).
    pub(super) fn drop_revoked(self: &Arc<Self>, job: Job) {
        self.memory_done();
        self.after_head(job.q.order_key.as_deref());
    }

    pub(super) fn release(&self, seq: i64) {
        let mut f = self.in_flight.lock().expect("lock");
        f.release(seq);
        drop(f);
        self.wake.notify_one();
    }

    /// Publish committed dead letters to the bus's dead-letter topic, if it has one.
    pub(super) fn publish_dead(&self, dl: NewDeadLetter, source: Option<String>, original: Option<Arc<Vec<u8>>>) {
        let Some(sink) = self.dead_sink.get().cloned() else {
            return;
        };
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            for _ in 0..8 {
                match sink
                    .publish(&dl, source.as_deref(), original.as_deref().map(Vec::as_slice))
                    .await
                {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "dead-letter topic publish failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            tracing::error!(event_id = %dl.event_id, "dead letter not published to the dead-letter topic (it is stored)");
        });
    }

    /// Dead letters committed by the stored path: publish them.
    pub(super) async fn dead_lettered(&self, dead: &[NewDeadLetter], _sources: &[Option<String>]) {
        for d in dead {
            self.metrics.dead_letters.with_label_values(&[d.reason]).inc();
            self.publish_dead(d.clone(), None, None);
        }
    }

    /// Commit outcomes in batches; only after the commit are rows released and memory jobs
    /// that needed a durable record acknowledged.
    pub(super) async fn write_outcomes(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Write>) {
        let mut batch = Vec::with_capacity(512);
        loop {
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            while batch.len() < 512 {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            let mut completes = Vec::new();
            let mut sources = Vec::new();
            let mut logged = Vec::new();
            let mut parked = Vec::new();
            let mut dead = Vec::new();
            let mut publish = Vec::new();
            let mut acks: Vec<Arc<dyn Ack>> = Vec::new();
            let mut outcomes = Vec::new();
            let mut barriers = Vec::new();
            let mut renew = false;
            let mut parked_n = 0u64;
            for w in batch.drain(..) {
                match w {
                    Write::Complete(c, source) => {
                        completes.push(c);
                        sources.push(source);
                    }
                    Write::Finished {
                        logged: l,
                        dead: d,
                        source,
                        original,
                        outcome,
                        ack,
                    } => {
                        logged.extend(l);
                        if let Some(d) = d {
                            publish.push((d.clone(), source, original));
                            dead.push(d);
                        }
                        outcomes.extend(outcome);
                        acks.extend(ack);
                    }
                    Write::Park { rows, ahead, acks: a } => {
                        parked_n += rows.len() as u64;
                        parked.push((rows, ahead));
                        acks.extend(a);
                    }
                    Write::Dead {
                        dead: d,
                        source,
                        original,
                        ack,
                    } => {
                        for x in &d {
                            publish.push((x.clone(), source.clone(), original.clone()));
                        }
                        dead.extend(d);
                        acks.extend(ack);
                    }
                    Write::Barrier(tx) => barriers.push(tx),
                    Write::Renew => renew = true,
                }
            }
            // From here until this batch's rows are released, no lease renewal runs (see
            // `Engine::batches`); the other writers' batches go on meanwhile.
            let batch_guard = self.batches.read().await;
            // Outcomes of rows whose lease a renewal found lost are not recorded: the row may be
            // another instance's now (it records it). They were counted when found.
            let mut discarded = Vec::new();
            {
                let mut f = self.in_flight.lock().expect("lock");
                if !f.lost.is_empty() {
                    let (keep, gone): (Vec<_>, Vec<_>) = completes
                        .drain(..)
                        .zip(sources.drain(..))
                        .partition(|(c, _)| !f.lost.contains(&c.seq));
                    for (c, _) in gone {
                        f.lost.remove(&c.seq);
                        discarded.push(c.seq);
                    }
                    (completes, sources) = keep.into_iter().unzip();
                }
            }
            // Stored rows first: only the completions this instance still held the lease of are
            // written (and counted on their runs, and their dead letters published).
            let (completes, promoted) = if completes.is_empty() {
                (Vec::new(), None)
            } else {
                self.commit_completions(completes, &sources, &mut publish).await
            };
            // Memory jobs' outcomes are counted on their runs in the transaction that logs them
            // (stored rows' in the one that completes them, in `commit_completions`).
            let memory_counts: Vec<(&str, &str, &str, bool)> = outcomes
                .iter()
                .map(|o| {
                    (
                        o.delivery_id.as_str(),
                        o.run_id.as_str(),
                        o.resource.as_str(),
                        o.delivered,
                    )
                })
                .collect();
            if !logged.is_empty() || !parked.is_empty() || !dead.is_empty() || !memory_counts.is_empty() {
                // A failed commit is retried: a record is never dropped.
                let mut backoff = Duration::from_millis(50);
                loop {
                    let mut count = |recorded: &HashSet<String>, runs: &mut RunsLocked| {
                        count_into(runs, not_in(&memory_counts, recorded))
                    };
                    let counting = (!memory_counts.is_empty()).then(|| Counting {
                        run_ids: counted_runs(memory_counts.iter().map(|(_, run, ..)| *run)),
                        count: &mut count,
                    });
                    match self.store.record(&logged, &parked, &dead, now_ms(), counting).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "recording outcomes failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
            // Rows held back until every count of this batch is committed (see
            // `commit_completions`).
            if let Some((rows, taken)) = promoted {
                self.push_hot(rows, &taken);
            }
            // The parked rows are in the store now: their chains may be forgotten once the store
            // reports them finished (not before: see `ordering`).
            for (rows, _) in &parked {
                if let Some(k) = rows.first().and_then(|r| r.order_key.as_deref()) {
                    self.chains.parked(k);
                }
            }
            if parked_n > 0 {
                self.metrics.parked.inc_by(parked_n);
                // Parked rows may be due now (their chain drained meanwhile).
                self.notify();
            }
            for a in acks {
                a.done();
            }
            for (dl, source, original) in publish {
                self.publish_dead(dl, source, original);
            }
            let now = now_ms();
            let now_i = Instant::now();
            {
                let mut f = self.in_flight.lock().expect("lock");
                for c in &completes {
                    if let Next::Retry { at_ms } = &c.next {
                        let at = now_i + Duration::from_millis((at_ms - now).max(0) as u64);
                        f.scan_at = Some(f.scan_at.map_or(at, |t| t.min(at)));
                    }
                    f.release(c.seq);
                }
                for s in discarded {
                    f.release(s);
                }
            }
            self.wake.notify_one();
            drop(batch_guard);
            if renew {
                self.renew_now().await;
            }
            for b in barriers {
                let _ = b.send(());
            }
        }
    }

    /// Commit stored rows' outcomes, promoting the next row of every chain whose head finished.
    /// Returns the completions written (those whose lease this instance still held; the others
    /// are released and counted as lost leases) and the rows promoted, claimed but not yet
    /// handed to the dispatcher. Dead letters of the written ones are added to `publish`.
    async fn commit_completions(
        &self,
        completes: Vec<Completion>,
        sources: &[Option<String>],
        publish: &mut Vec<Publish>,
    ) -> (Vec<Completion>, Option<(Vec<crate::store::QueuedDelivery>, Vec<i64>)>) {
        let mut backoff = Duration::from_millis(50);
        // Outcomes are counted on their runs in the transaction that completes them (a crash
        // keeps both or neither), only for the completions it applied (a lost lease's outcome
        // is the new holder's to count).
        let counts: Vec<(&str, &str, &str, bool)> = completes
            .iter()
            .filter_map(|c| {
                let delivered = match &c.next {
                    Next::Delivered => true,
                    Next::Dead(_) => false,
                    Next::Retry { .. } => return None,
                };
                let (run, resource, delivered) =
                    counted_outcome(c.kind, c.run_id.as_deref(), &c.event, c.resource.as_deref(), delivered)?;
                Some((c.delivery_id.as_str(), run, resource, delivered))
            })
            .collect();
        loop {
            // Which rows were promoted is known before the commit: they are handed to the
            // dispatcher right away, so their requests overlap the commit (a chain's next event
            // does not wait for the disk). A run's last event is held back until the commit (and
            // the writer's other transaction) are done: its body carries the run's final counts.
            // Should the commit fail, they stay claimed and the retry keeps them; after a crash
            // both are attempted again, in order.
            let mut held_back = None;
            let mut count = |lost: &HashSet<String>, runs: &mut RunsLocked| count_into(runs, not_in(&counts, lost));
            let counting = (!counts.is_empty()).then(|| Counting {
                run_ids: counted_runs(counts.iter().map(|(_, run, ..)| *run)),
                count: &mut count,
            });
            let res = self
                .store
                .complete_counting(
                    &completes,
                    now_ms(),
                    |rows| {
                        let taken = self.claim(rows);
                        if rows.iter().any(|r| is_terminal(&r.event)) {
                            held_back = Some((rows.to_vec(), taken));
                        } else {
                            self.push_hot(rows.to_vec(), &taken);
                        }
                    },
                    counting,
                )
                .await;
            match res {
                Ok(done) => {
                    let lost: HashSet<i64> = done.lost.iter().copied().collect();
                    if !lost.is_empty() {
                        tracing::warn!(
                            lost = lost.len(),
                            "outcomes of deliveries whose lease was lost were not recorded"
                        );
                        self.metrics.leases_lost.inc_by(lost.len() as u64);
                        let mut f = self.in_flight.lock().expect("lock");
                        for s in &lost {
                            f.release(*s);
                        }
                    }
                    // A finished head that promoted nothing was its chain's last stored row.
                    let promoted: HashSet<&str> = done.promoted.iter().filter_map(|r| r.order_key.as_deref()).collect();
                    let drained: Vec<&str> = completes
                        .iter()
                        .filter(|c| !lost.contains(&c.seq))
                        .filter(|c| !matches!(c.next, Next::Retry { .. }))
                        .filter_map(|c| c.order_key.as_deref())
                        .filter(|k| !promoted.contains(k))
                        .collect();
                    self.chains.drained(&drained);
                    let mut kept = Vec::with_capacity(completes.len());
                    for (c, source) in completes.into_iter().zip(sources) {
                        if lost.contains(&c.seq) {
                            continue;
                        }
                        if let Next::Dead(dl) = &c.next {
                            publish.push((dl.clone(), source.clone(), None));
                        }
                        kept.push(c);
                    }
                    return (kept, held_back);
                }
                Err(e) => {
                    if let Some((_, taken)) = held_back {
                        self.unclaim(&taken);
                    }
                    tracing::error!(error = %format!("{e:#}"), "recording outcomes failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Outcomes (delivery id, run, resource, delivered) whose delivery is not in `skip`, as
/// `count_into` takes them.
fn not_in<'a>(
    outcomes: &'a [(&'a str, &'a str, &'a str, bool)],
    skip: &'a HashSet<String>,
) -> impl Iterator<Item = (&'a str, &'a str, bool)> + 'a {
    outcomes
        .iter()
        .filter(|(id, ..)| !skip.contains(*id))
        .map(|(_, run, resource, delivered)| (*run, *resource, *delivered))
}
