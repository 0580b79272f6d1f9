//! The durable store, behind a storage interface. All SQL lives below this folder.
//!
//! The interface is cut by concern, one trait each, so a second database (PostgreSQL,
//! `postgres`) is a second implementation of the same traits rather than a rewrite of their callers:
//!
//! - [`Queue`]: the embedded delivery queue — enqueue, take what is due, record outcomes,
//!   promote the next row of a chain, dead-letter, drop, stats, retention;
//! - [`DeliveryLog`]: reading deliveries, attempts and dead letters, and replaying dead letters;
//! - [`Registry`]: webhooks and generated settings (kv);
//! - [`RunStore`]: sync jobs, runs (and the lifecycle's load-for-update / save), Eloqua-style
//!   syncs, run commands;
//! - [`Backend`]: the connection itself (health, shutdown).
//!
//! Callers hold a [`Store`]: a cheap handle whose methods keep the names they had when the
//! store was one SQLite struct, and take plain closures where the traits need `dyn` ones.
//!
//! Queue model (every implementation keeps it): every (event, target) pair is a delivery row.
//! Rows that share an `order_key` (target + run, "a chain") are delivered strictly in `seq`
//! order: only the oldest unfinished row of a chain is `ready` (eligible once its
//! `next_attempt_at` is due); the rows behind it are `waiting` and are promoted, one at a time,
//! in the same transaction that finishes their predecessor. The dispatcher therefore only ever
//! scans ready rows by due time, however long a run's backlog grows behind a failing receiver.

#[cfg(test)]
pub(crate) mod conformance;
pub mod postgres;
mod rows;
pub mod secrets;
pub mod sqlite;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;

use crate::config::{StoreKind, StoreSettings};
use crate::runs::model::{Run, SyncJob};
use crate::signing::Secret;
use secrets::Sealer;

pub use rows::*;

/// Whether a store call failed because the store could not be reached or could not take the
/// work just now — a connection ended or refused (PostgreSQL restarting, failing over, out of
/// connection slots), no pooled connection free in time, SQLite's database busy or its disk
/// full — rather than because of what was asked. The API answers those with
/// `503 service_unavailable` and a `Retry-After`, so that a client sends the request again:
/// its transaction did not commit (unless the connection ended between the commit and its
/// answer, CONTRACT §3's "at least once").
pub fn unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
            return match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(d) => d.code().is_some_and(|c| unavailable_code(&c)),
                _ => false,
            };
        }
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = cause.downcast_ref::<rusqlite::Error>() {
            return matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked | rusqlite::ErrorCode::DiskFull
            );
        }
        false
    })
}

/// A database error code that says "not now" rather than "not this": PostgreSQL's connection
/// exceptions (class 08), too many connections (53300), the server shutting down, crashed or
/// starting (57P01 – 57P03); SQLite's busy (5), locked (6) and full (13), extended codes too.
fn unavailable_code(code: &str) -> bool {
    if code.starts_with("08") || matches!(code, "53300" | "57P01" | "57P02" | "57P03") {
        return true;
    }
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 13))
}

/// Called with the rows that became ready inside a queue transaction, just before it commits.
pub type Claim<'a> = &'a mut (dyn FnMut(&[QueuedDelivery]) + Send);

/// Called once with the runs loaded for update inside a `RunStore::with_runs` transaction.
pub type Decide<'a> = &'a mut (dyn FnMut(&mut RunsLocked) + Send);

/// Run counts made in the transaction that records outcomes, so that a crash keeps both or
/// neither: the runs to lock and load (their decisions stay serialised with
/// [`RunStore::with_runs`]), and what to do with them, given the delivery ids whose outcome the
/// transaction did not apply: a completion whose lease was lost (another instance's to count),
/// a memory delivery already recorded (its message was read again after a crash).
pub struct Counting<'a> {
    pub run_ids: Vec<&'a str>,
    pub count: &'a mut (dyn FnMut(&HashSet<String>, &mut RunsLocked) + Send),
}

/// Whether a delivery that made `attempts` attempts, and was `delivered`, is a first-try
/// success. Its attempt stays on its delivery's row (`first_attempt_at`, `last_status`,
/// `last_error`, `last_duration_ms`, `last_excerpt`) rather than in the attempt log: one row
/// written per delivered event, not two (issue 14). The one rule every writer (stored
/// completions, logged Kafka deliveries) and reader ([`row_attempt`]) of both stores follows.
pub(crate) fn first_try_success(attempts: i64, delivered: bool) -> bool {
    attempts == 1 && delivered
}

/// The logged (Kafka) deliveries whose attempts go to the attempt log: all but those that
/// succeeded at their first attempt (see [`first_try_success`]).
pub(crate) fn with_logged_attempts<'a>(logged: &'a [&'a Logged]) -> impl Iterator<Item = &'a NewDelivery> {
    logged
        .iter()
        .filter(|l| !first_try_success(l.delivery.log.len() as i64, l.state == "delivered"))
        .map(|l| &l.delivery)
}

/// A delivery row's columns that hold its only attempt (see [`row_attempt`]): state, attempts,
/// first_attempt_at, last_status, last_error, last_duration_ms, last_excerpt.
pub(crate) type RowAttemptColumns = (
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

/// The attempt a delivery keeps on its row (see [`first_try_success`]): when the attempt log has
/// none for it and it was delivered at its first attempt.
pub(crate) fn row_attempt(row: RowAttemptColumns) -> Option<AttemptRow> {
    let (state, attempts, started_at, status, error, duration_ms, excerpt) = row;
    if !first_try_success(attempts, state == "delivered") {
        return None;
    }
    Some(AttemptRow {
        n: 1,
        started_at: started_at?,
        duration_ms: duration_ms?,
        status,
        error,
        response_excerpt: excerpt,
    })
}

/// Ids of the deliveries made from a bus message: only those can be in the store already (a
/// message read again after a crash makes the same ids).
pub(crate) fn sourced_ids(deliveries: &[NewDelivery]) -> Vec<&str> {
    deliveries
        .iter()
        .filter(|d| d.source.is_some())
        .map(|d| d.id.as_str())
        .collect()
}

/// `deliveries` without those whose id is in `recorded` (borrowed when there are none).
pub(crate) fn without_recorded<'a>(
    deliveries: &'a [NewDelivery],
    recorded: &HashSet<String>,
) -> std::borrow::Cow<'a, [NewDelivery]> {
    if recorded.is_empty() {
        return std::borrow::Cow::Borrowed(deliveries);
    }
    std::borrow::Cow::Owned(
        deliveries
            .iter()
            .filter(|d| !recorded.contains(&d.id))
            .cloned()
            .collect(),
    )
}

/// A queued row as a new delivery again (to be written anew), keeping its identity.
pub(crate) fn requeue(q: QueuedDelivery) -> NewDelivery {
    NewDelivery {
        id: q.id,
        event_id: q.event_id,
        event: q.event,
        run_id: q.run_id,
        kind: kind_str(&q.kind),
        webhook_id: q.webhook_id,
        target_url: q.target_url,
        target_key: q.target_key,
        order_key: q.order_key,
        body: q.body,
        created_at: q.created_at,
        attempts: q.attempts,
        first_attempt_at: q.first_attempt_at,
        next_attempt_at: None,
        source: q.source,
        log: Vec::new(),
    }
}

/// What replaying a dead letter makes of its delivery's row: a new delivery of the same
/// (event, target) pair with the same body, so the same `webhook-id`; attempted from scratch.
pub(crate) fn replayed(q: QueuedDelivery, now: i64) -> NewDelivery {
    NewDelivery {
        id: uuid::Uuid::now_v7().to_string(),
        created_at: now,
        attempts: 0,
        first_attempt_at: None,
        ..requeue(q)
    }
}

/// The state each of these new rows is written in, in the order given: the first row of a
/// chain that has nothing queued (not in `busy`) is ready, every later one waits; a paused
/// sync's rows (`paused`) are held whatever their place in the chain, and the rows behind them
/// wait. A row with no chain is ready. `busy` may hold chains whose head is kept in memory
/// (their rows all wait).
pub(crate) fn chain_states(
    deliveries: &[NewDelivery],
    mut busy: HashSet<String>,
    paused: &HashSet<String>,
) -> Vec<&'static str> {
    deliveries
        .iter()
        .map(|d| match d.order_key.as_deref() {
            Some(k) if paused.contains(k) => {
                busy.insert(k.to_string());
                "paused"
            }
            Some(k) if !busy.insert(k.to_string()) => "waiting",
            _ => "ready",
        })
        .collect()
}

/// The rows just written in `states` (by [`chain_states`]) that are ready and due now, as the
/// queue hands them out, by the seqs their insert returned (by delivery id).
pub(crate) fn ready_now(
    deliveries: &[NewDelivery],
    states: &[&str],
    seqs: &HashMap<String, i64>,
    now: i64,
) -> Vec<QueuedDelivery> {
    deliveries
        .iter()
        .zip(states)
        .filter(|(d, st)| **st == "ready" && d.next_attempt_at.unwrap_or(now) <= now)
        .filter_map(|(d, _)| {
            Some(QueuedDelivery {
                seq: *seqs.get(&d.id)?,
                id: d.id.clone(),
                event_id: d.event_id.clone(),
                event: d.event.clone(),
                run_id: d.run_id.clone(),
                kind: d.kind.to_string(),
                webhook_id: d.webhook_id.clone(),
                target_url: d.target_url.clone(),
                target_key: d.target_key.clone(),
                order_key: d.order_key.clone(),
                body: d.body.clone(),
                attempts: d.attempts,
                first_attempt_at: d.first_attempt_at,
                created_at: d.created_at,
                source: d.source.clone(),
            })
        })
        .collect()
}

/// The chains of these deliveries, each once, in order (what a replay asks [`Hold`] about).
pub(crate) fn chains_of(deliveries: &[NewDelivery]) -> Vec<String> {
    deliveries
        .iter()
        .filter_map(|d| d.order_key.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Called once inside a replay transaction with the chains of the re-queued rows; answers
/// those whose head is kept in memory (their rows must wait behind it).
pub type Hold<'a> = &'a mut (dyn FnMut(&[String]) -> HashSet<String> + Send);

/// The embedded delivery queue (see the module docs for the chain model).
///
/// Claiming: the rows handed to a [`Claim`] callback or returned by [`Queue::due`] are the
/// caller's to attempt until it reports them through [`Queue::complete`]. Both implementations
/// record that claim in the store as a lease (`lease_owner` = this handle's instance id, new at
/// every open; `lease_until`), taken in the statement that makes or finds the row ready (`FOR
/// UPDATE SKIP LOCKED` on PostgreSQL), kept alive by [`Queue::renew`] while the attempt runs,
/// released by `complete`. A row whose lease expired (its instance died or stalled) is claimable
/// again by anyone, and the instance that lost it can no longer complete it: `complete` and
/// `dead_letter_queued` change a row only while this instance holds its lease, so an attempt
/// is recorded once even when two instances made it. SQLite's lease owner names its process:
/// opening it releases the leases of processes that are gone (a restart after kill -9 goes on
/// at once).
#[async_trait]
pub trait Queue: Send + Sync {
    /// Durably queue deliveries (in the order given) and record dead letters, in one
    /// transaction; the rows that are ready now are handed to `claim` just before the commit (so
    /// no dispatcher query can see them unclaimed) and returned. When this returns Ok the events
    /// are committed. A row of a chain in `held` waits even when it would be its chain's first
    /// (the chain's head is kept in memory).
    async fn enqueue_claiming(
        &self,
        deliveries: &[NewDelivery],
        dead: &[NewDeadLetter],
        now: i64,
        held: &HashSet<String>,
        claim: Claim<'_>,
    ) -> anyhow::Result<Vec<QueuedDelivery>>;

    /// Make the first row of each chain in `keys` ready when nothing of the chain is ready
    /// (rows that were held behind deliveries kept in memory, which have now finished). The rows
    /// promoted are handed to `claim` just before the commit and returned.
    async fn promote(&self, keys: &[String], now: i64, claim: Claim<'_>) -> anyhow::Result<Vec<QueuedDelivery>>;

    /// Write what deliveries kept in memory (Kafka) became, in one transaction:
    /// - `logged`: finished ones (delivered or dead) as finished rows with their attempts, for
    ///   the delivery log and for replay of exactly that (event, target) pair;
    /// - `parked`: ones that move to the retry queue, each group in its chain's order; a group
    ///   marked `true` (ahead) goes before the rows of its chain that were held behind it;
    /// - `dead`: dead letters (their `delivery_id` names a row of `logged`);
    /// - `counting`: run counts of these outcomes, made in the same transaction.
    ///
    /// A delivery whose id is already in the store was recorded before (a Kafka message read
    /// again after a crash makes the same ids): it is left as it is, with its attempts and dead
    /// letter, and reported to `counting` as not applied.
    async fn record(
        &self,
        logged: &[Logged],
        parked: &[(Vec<NewDelivery>, bool)],
        dead: &[NewDeadLetter],
        now: i64,
        counting: Option<Counting<'_>>,
    ) -> anyhow::Result<()>;

    /// Ready deliveries due by `now`, oldest due first, skipping the targets in `skip_targets`
    /// (at their in-flight cap).
    async fn due(&self, now: i64, limit: i64, skip_targets: &[String]) -> anyhow::Result<Vec<QueuedDelivery>>;

    /// Does this chain still have queued deliveries?
    async fn has_active(&self, order_key: &str) -> anyhow::Result<bool>;

    /// Every chain with queued deliveries.
    async fn active_order_keys(&self) -> anyhow::Result<Vec<String>>;

    /// When the next ready delivery due after `now` becomes due, if any.
    async fn next_due_after(&self, now: i64) -> anyhow::Result<Option<i64>>;

    /// Record a batch of finished attempts in one transaction, promoting the next row of every
    /// chain whose head finished; the promoted rows are handed to `claim` just before the commit
    /// and returned. A completion of a row whose lease this instance no longer holds (it
    /// expired and the row was claimed elsewhere, or it is no longer ready) changes nothing —
    /// no attempt, no dead letter, no promotion — and is answered in [`Completed::lost`].
    /// `counting`: run counts of the outcomes, made in the same transaction.
    async fn complete(
        &self,
        batch: &[Completion],
        now: i64,
        claim: Claim<'_>,
        counting: Option<Counting<'_>>,
    ) -> anyhow::Result<Completed>;

    /// Extend the leases of these rows (in flight or about to be) to `now + lease`, in one
    /// statement; answers the rows whose lease this instance still held (the others are lost).
    async fn renew(&self, seqs: &[i64], now: i64) -> anyhow::Result<Vec<i64>>;

    /// Dead-letter a queued delivery without an attempt (e.g. its webhook was deleted), and
    /// promote the next row of its chain. `false`: this instance no longer held its lease, and
    /// nothing changed.
    async fn dead_letter_queued(&self, q: &QueuedDelivery, dl: &NewDeadLetter, now: i64) -> anyhow::Result<bool>;

    /// Drop a run's queued deliveries except the rows in `keep` (in flight): never attempted
    /// again. Returns (kind, event, body) of each dropped row.
    async fn drop_queued_for_run(
        &self,
        run_id: &str,
        keep: &[i64],
        now: i64,
    ) -> anyhow::Result<Vec<(String, String, String)>>;

    /// (queued deliveries, ingest time of the oldest)
    async fn queue_stats(&self) -> anyhow::Result<(i64, Option<i64>)>;

    /// Census-style syncs (CONTRACT §3): make the waiting rows of this sync's chains `paused`
    /// (it was just paused; a row ready or in flight finishes as it is, and the chain stops
    /// behind it). Does nothing unless the stored sync is paused. Returns how many.
    async fn pause_queued(&self, sync_id: i64) -> anyhow::Result<u64>;

    /// Release this sync's paused rows unless the stored sync is paused (it was unpaused or
    /// deleted): they wait again in their chains' order, and each chain's first row is made
    /// ready when nothing of the chain is. The rows made ready are handed to `claim` just before
    /// the commit and returned.
    async fn release_paused(&self, sync_id: i64, now: i64, claim: Claim<'_>) -> anyhow::Result<Vec<QueuedDelivery>>;

    /// Rows held `paused`, per sync id.
    async fn paused_counts(&self) -> anyhow::Result<Vec<(i64, i64)>>;

    /// Forget delivered rows (and their attempts) finished before `before`, and those delivered
    /// on their first attempt finished before `first_try_before` (`delivery.log = failures`);
    /// returns how many (a bounded number per call, so the write lock is held briefly).
    async fn purge_delivered(&self, before: i64, first_try_before: i64) -> anyhow::Result<u64>;

    /// Forget dead and dropped rows (and their attempts) finished before `rows_before`, and dead
    /// letters (open or replayed) made before `dead_letters_before`; returns how many of both
    /// (a bounded number per call). Rows still queued or delivered are never touched.
    async fn purge_failed(&self, rows_before: i64, dead_letters_before: i64) -> anyhow::Result<u64>;
}

/// Reading the delivery log and dead letters; replaying dead letters.
#[async_trait]
pub trait DeliveryLog: Send + Sync {
    /// Deliveries after cursor position `after`, oldest first.
    async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<DeliveryRow>>;

    async fn get_delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryRow>>;

    /// A delivery's attempts, first first.
    async fn list_attempts(&self, delivery_id: &str) -> anyhow::Result<Vec<AttemptRow>>;

    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<DeadLetterRow>>;

    /// Take up to `max` open dead letters (by `ids` if given, and the filter) out for replay, in
    /// one transaction: rows backed by a delivery are re-queued (a new delivery of the same event
    /// to the same target, at the end of its chain, same `webhook-id`); the raw events of the
    /// others are returned for the caller to route again. `hold` gets the chains of the
    /// re-queued rows (see [`Hold`]). Returns (re-queued rows ready now, how many were
    /// re-queued, the chains held, raw events).
    async fn replay_dead_letters(
        &self,
        ids: Option<&[String]>,
        filter: &DeadLetterFilter,
        max: i64,
        now: i64,
        hold: Hold<'_>,
    ) -> anyhow::Result<(Vec<QueuedDelivery>, u64, Vec<String>, Vec<String>)>;
}

/// Webhooks, and settings the relay generates once. Secrets arrive here as stored text (sealed
/// by `secrets` in the [`Store`] handle when a key is configured) and are kept as given.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Insert and return it as stored (with its `seq`).
    async fn insert_webhook(&self, w: &StoredWebhook) -> anyhow::Result<StoredWebhook>;
    async fn update_webhook(&self, w: &StoredWebhook) -> anyhow::Result<()>;
    async fn get_webhook(&self, id: &str) -> anyhow::Result<Option<StoredWebhook>>;
    async fn list_webhooks(&self, after: i64, limit: i64) -> anyhow::Result<Page<StoredWebhook>>;
    async fn all_webhooks(&self) -> anyhow::Result<Vec<StoredWebhook>>;
    async fn delete_webhook(&self, id: &str) -> anyhow::Result<bool>;
    /// A number that changes with every write to the webhooks (a counter the database bumps
    /// itself): instances sharing the store reload their webhooks when it moved.
    async fn webhooks_version(&self) -> anyhow::Result<i64>;

    /// The value stored under `key`, storing `value` first when there is none (the first of
    /// concurrent callers wins).
    async fn kv_get_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String>;

    /// Replace a webhook's stored secret and previous secret `from` -> `to` (re-sealing), only
    /// if they are still `from` (another instance or the API may have changed them since they
    /// were read); answers whether it did.
    async fn reseal_webhook(
        &self,
        id: &str,
        from: (&str, Option<&str>),
        to: (&str, Option<&str>),
    ) -> anyhow::Result<bool>;

    /// Replace the value under `key` with `to` only if it is still `from`; answers whether it did.
    async fn kv_replace(&self, key: &str, from: &str, to: &str) -> anyhow::Result<bool>;
}

/// Sync jobs, runs, Eloqua-style syncs and run commands.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Insert and return it as stored (with its `seq`).
    async fn insert_job(&self, j: &SyncJob) -> anyhow::Result<SyncJob>;
    async fn update_job(&self, j: &SyncJob) -> anyhow::Result<()>;
    async fn get_job(&self, id: &str) -> anyhow::Result<Option<SyncJob>>;
    async fn list_jobs(&self, integration_name: Option<&str>, after: i64, limit: i64) -> anyhow::Result<Page<SyncJob>>;
    /// Delete a job unless it has active runs. `Ok(Err(n))`: n active runs refused the delete.
    async fn delete_job(&self, id: &str) -> anyhow::Result<Result<bool, i64>>;

    /// Insert and return it as stored (with its `seq`).
    async fn insert_run(&self, r: &Run) -> anyhow::Result<Run>;
    async fn get_run(&self, id: &str) -> anyhow::Result<Option<Run>>;
    async fn list_runs(&self, f: &RunFilter, after: i64, limit: i64) -> anyhow::Result<Page<Run>>;
    /// Finish time of the last completed run of this job and account.
    async fn previous_run_date(&self, job: &str, account: &str) -> anyhow::Result<Option<i64>>;
    async fn delete_run(&self, id: &str) -> anyhow::Result<bool>;

    /// The run lifecycle's unit of work: in ONE transaction, load the runs among `ids` that
    /// exist (with their batches) for update, call `decide` exactly once with them, write back
    /// those it marked changed, commit. Decisions on one run are thereby serialised across tasks
    /// and processes. `decide` runs inside the transaction: it must not block.
    ///
    /// When none of `ids` exists, `decide` is called with nothing and no write lock is taken
    /// (most events of a batch may belong to runs made elsewhere).
    async fn with_runs(&self, ids: &[&str], decide: Decide<'_>) -> anyhow::Result<()>;

    /// Ids of runs whose gathered batch is at least as old as `since_before` (oldest first).
    async fn runs_with_due_batches(&self, since_before: i64, limit: i64) -> anyhow::Result<Vec<String>>;

    async fn insert_eloqua_sync(
        &self,
        uri: &str,
        callback_url: Option<&str>,
        run_id: Option<&str>,
        created_by: &str,
        now: i64,
    ) -> anyhow::Result<EloquaSync>;
    async fn get_eloqua_sync(&self, n: i64) -> anyhow::Result<Option<EloquaSync>>;
    /// Syncs by number, skipping `offset`, and how many there are in all.
    async fn list_eloqua_syncs(&self, offset: i64, limit: i64) -> anyhow::Result<(Vec<EloquaSync>, i64)>;
    /// The sync that started this run, if any.
    async fn eloqua_sync_for_run(&self, run_id: &str) -> anyhow::Result<Option<EloquaSync>>;
    /// Mark the sync's callback queued (`Some(now)`) unless it already is; answers whether this
    /// call marked it. `None` clears the mark (queueing failed).
    async fn mark_eloqua_callback(&self, n: i64, at: Option<i64>) -> anyhow::Result<bool>;

    /// Census-style syncs (CONTRACT §3). Insert and return it with its id.
    async fn insert_census_sync(&self, s: &CensusSyncRow) -> anyhow::Result<CensusSyncRow>;
    async fn get_census_sync(&self, id: i64) -> anyhow::Result<Option<CensusSyncRow>>;
    /// Syncs by id, skipping `offset`, and how many there are in all.
    async fn list_census_syncs(&self, offset: i64, limit: i64) -> anyhow::Result<(Vec<CensusSyncRow>, i64)>;
    async fn all_census_syncs(&self) -> anyhow::Result<Vec<CensusSyncRow>>;
    /// Write a sync's settings, source, destination and paused flag; false when it is gone.
    async fn update_census_sync(&self, s: &CensusSyncRow) -> anyhow::Result<bool>;
    /// Delete a sync and its alert state.
    async fn delete_census_sync(&self, id: i64) -> anyhow::Result<bool>;
    /// One alert of a sync, evaluated for a run: record whether it fires now. `None` when this
    /// run was already evaluated for it (by another path or instance: nothing to send), else
    /// whether it was firing before. One transaction, so a run is evaluated once.
    async fn census_alert_step(
        &self,
        sync_id: i64,
        alert: &str,
        run_id: &str,
        firing: bool,
    ) -> anyhow::Result<Option<bool>>;

    /// Insert sync units all together (one transaction: all or none).
    async fn insert_sync_units(&self, units: &[SyncUnit]) -> anyhow::Result<Vec<SyncUnit>>;
    async fn get_sync_unit(&self, id: &str) -> anyhow::Result<Option<SyncUnit>>;
    async fn list_sync_units(&self, after: i64, limit: i64) -> anyhow::Result<Page<SyncUnit>>;
    async fn update_sync_unit(&self, u: &SyncUnit) -> anyhow::Result<()>;
    /// The unit's latest run and how many runs name it.
    async fn latest_unit_run(&self, unit_id: &str) -> anyhow::Result<Option<(Run, i64)>>;

    /// Keep a run command (JSON text) for executors to poll.
    async fn insert_command(&self, key: &str, command: &str, now: i64) -> anyhow::Result<()>;
    /// Commands after cursor position `after`, oldest first.
    async fn list_commands(&self, after: i64, limit: i64) -> anyhow::Result<Page<CommandRow>>;
}

/// The connection itself.
#[async_trait]
pub trait Backend: Send + Sync {
    /// A real round trip to the database.
    async fn ping(&self) -> anyhow::Result<()>;
    /// Close every connection (at shutdown, after the last write).
    async fn close(&self);
}

/// This handle's claims of queued deliveries: rows it takes (due, made ready by its own
/// transaction) carry `lease_owner = owner` and `lease_until = now + ms`; no other instance
/// takes them until that passes, unless renewed. `owner` is new at every open, so a restarted
/// instance of a shared store waits for the leases of its previous life like any other instance.
#[derive(Clone)]
pub(crate) struct Lease {
    pub(crate) owner: String,
    pub(crate) ms: i64,
}

impl Lease {
    pub(crate) fn new(settings: &StoreSettings) -> Lease {
        Lease {
            owner: uuid::Uuid::now_v7().to_string(),
            ms: settings.lease_ms.min(i64::MAX as u64) as i64,
        }
    }
}

/// What [`Queue::complete`] did.
#[derive(Debug, Default)]
pub struct Completed {
    /// Rows made ready behind finished heads (handed to the claim).
    pub promoted: Vec<QueuedDelivery>,
    /// Rows of the batch whose lease was lost: nothing of their completion was written.
    pub lost: Vec<i64>,
}

/// The handle the rest of the relay holds: one implementation behind every trait. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    queue: Arc<dyn Queue>,
    log: Arc<dyn DeliveryLog>,
    registry: Arc<dyn Registry>,
    runs: Arc<dyn RunStore>,
    backend: Arc<dyn Backend>,
    /// Seals secrets on the way in, opens them on the way out (the one place, for every backend).
    sealer: Arc<Sealer>,
}

impl Store {
    /// Open the store `settings` name, bringing its schema up to date.
    /// Secrets are sealed with `store.encryption_key`; those stored otherwise (plaintext from
    /// before, an older key) are re-sealed now.
    pub async fn open(settings: &StoreSettings) -> anyhow::Result<Store> {
        let sealer = Sealer::from_settings(settings)?;
        if !sealer.encrypts() {
            tracing::warn!(
                "store.encryption_key is not set: webhook and callback secrets are stored unencrypted \
                 (see docs/OPERATIONS.md, \"Encryption at rest\")"
            );
        }
        let store = match settings.kind {
            StoreKind::Sqlite => Store::new(sqlite::SqliteStore::open(settings).await?),
            StoreKind::Postgres => Store::new(postgres::PgStore::open(settings).await?),
        }
        .with_sealer(sealer);
        store.reseal_webhooks().await.context("re-encrypting stored secrets")?;
        Ok(store)
    }

    /// One implementation of every trait, as a handle.
    pub fn new<B: Queue + DeliveryLog + Registry + RunStore + Backend + 'static>(backend: B) -> Store {
        let b = Arc::new(backend);
        Store {
            queue: b.clone(),
            log: b.clone(),
            registry: b.clone(),
            runs: b.clone(),
            backend: b,
            sealer: Arc::new(Sealer::default()),
        }
    }

    /// This handle sealing secrets with `sealer`'s keys.
    pub fn with_sealer(mut self, sealer: Sealer) -> Store {
        self.sealer = Arc::new(sealer);
        self
    }

    // ---- secrets at rest (see `secrets`) --------------------------------------------------------

    fn secret_place(id: &str, which: &str) -> String {
        format!("webhook:{id}:{which}")
    }

    fn seal_webhook(&self, w: &Webhook) -> StoredWebhook {
        let seal = |which: &str, s: &Secret| self.sealer.seal(&Store::secret_place(&w.id, which), s.expose());
        StoredWebhook {
            secret: seal("secret", &w.secret),
            previous_secret: w
                .previous_secret
                .as_ref()
                .map(|(s, e)| (seal("previous_secret", s), *e)),
            id: w.id.clone(),
            target_url: w.target_url.clone(),
            event_types: w.event_types.clone(),
            is_active: w.is_active,
            description: w.description.clone(),
            overrides: w.overrides.clone(),
            created_at: w.created_at,
            updated_at: w.updated_at,
            seq: w.seq,
        }
    }

    fn open_webhook(&self, w: StoredWebhook) -> anyhow::Result<Webhook> {
        let open = |which: &str, s: &str| -> anyhow::Result<Secret> {
            let plain = self.sealer.open(&Store::secret_place(&w.id, which), s)?;
            Secret::parse(&plain).with_context(|| format!("stored {which} of webhook {}", w.id))
        };
        Ok(Webhook {
            secret: open("secret", &w.secret)?,
            previous_secret: match &w.previous_secret {
                Some((s, e)) => Some((open("previous_secret", s)?, *e)),
                None => None,
            },
            id: w.id,
            target_url: w.target_url,
            event_types: w.event_types,
            is_active: w.is_active,
            description: w.description,
            overrides: w.overrides,
            created_at: w.created_at,
            updated_at: w.updated_at,
            seq: w.seq,
        })
    }

    /// Re-seal every webhook secret not stored in the current form (plaintext from before
    /// encryption, or sealed with a previous key). Compare-and-set per row, so a secret the API
    /// rotates meanwhile (or another instance re-seals first) is left as it is.
    async fn reseal_webhooks(&self) -> anyhow::Result<()> {
        let mut n = 0;
        for w in self.registry.all_webhooks().await? {
            let current = |s: &str| self.sealer.is_current(s);
            if current(&w.secret) && w.previous_secret.as_ref().is_none_or(|(p, _)| current(p)) {
                continue;
            }
            let to = self.seal_webhook(&self.open_webhook(w.clone())?);
            let from_prev = w.previous_secret.as_ref().map(|(p, _)| p.as_str());
            let to_prev = to.previous_secret.as_ref().map(|(p, _)| p.as_str());
            if self
                .registry
                .reseal_webhook(&w.id, (&w.secret, from_prev), (&to.secret, to_prev))
                .await?
            {
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(
                webhooks = n,
                "re-encrypted stored webhook secrets with store.encryption_key"
            );
        }
        Ok(())
    }

    /// A secret kept under `key` (e.g. the generated callback secret): the stored one, else
    /// `generated`, stored now. Stored sealed, re-sealed when it is not in the current form.
    pub async fn secret_get_or_insert(&self, key: &str, generated: &Secret) -> anyhow::Result<Secret> {
        let place = format!("kv:{key}");
        let stored = self
            .registry
            .kv_get_or_insert(key, &self.sealer.seal(&place, generated.expose()))
            .await?;
        let plain = self.sealer.open(&place, &stored)?;
        let secret = Secret::parse(&plain).with_context(|| format!("stored {key}"))?;
        if !self.sealer.is_current(&stored) {
            self.registry
                .kv_replace(key, &stored, &self.sealer.seal(&place, &plain))
                .await?;
        }
        Ok(secret)
    }

    pub fn queue(&self) -> &dyn Queue {
        &*self.queue
    }

    pub fn log(&self) -> &dyn DeliveryLog {
        &*self.log
    }

    pub fn registry(&self) -> &dyn Registry {
        &*self.registry
    }

    pub fn runs(&self) -> &dyn RunStore {
        &*self.runs
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        self.backend.ping().await
    }

    pub async fn close(&self) {
        self.backend.close().await
    }

    // ---- queue ----------------------------------------------------------------------------------

    /// [`Queue::enqueue_claiming`] with no chain held and no claim.
    pub async fn enqueue(&self, deliveries: &[NewDelivery], dead: &[NewDeadLetter], now: i64) -> anyhow::Result<()> {
        self.queue
            .enqueue_claiming(deliveries, dead, now, &HashSet::new(), &mut |_| {})
            .await
            .map(|_| ())
    }

    /// See [`Queue::enqueue_claiming`].
    pub async fn enqueue_claiming(
        &self,
        deliveries: &[NewDelivery],
        dead: &[NewDeadLetter],
        now: i64,
        held: &HashSet<String>,
        claim: impl FnOnce(&[QueuedDelivery]) + Send,
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut claim = Some(claim);
        self.queue
            .enqueue_claiming(deliveries, dead, now, held, &mut |rows| {
                if let Some(c) = claim.take() {
                    c(rows)
                }
            })
            .await
    }

    /// See [`Queue::promote`].
    pub async fn promote(
        &self,
        keys: &[String],
        now: i64,
        claim: impl FnOnce(&[QueuedDelivery]) + Send,
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut claim = Some(claim);
        self.queue
            .promote(keys, now, &mut |rows| {
                if let Some(c) = claim.take() {
                    c(rows)
                }
            })
            .await
    }

    /// See [`Queue::release_paused`].
    pub async fn release_paused(
        &self,
        sync_id: i64,
        now: i64,
        claim: impl FnOnce(&[QueuedDelivery]) + Send,
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut claim = Some(claim);
        self.queue
            .release_paused(sync_id, now, &mut |rows| {
                if let Some(c) = claim.take() {
                    c(rows)
                }
            })
            .await
    }

    pub async fn record(
        &self,
        logged: &[Logged],
        parked: &[(Vec<NewDelivery>, bool)],
        dead: &[NewDeadLetter],
        now: i64,
        counting: Option<Counting<'_>>,
    ) -> anyhow::Result<()> {
        self.queue.record(logged, parked, dead, now, counting).await
    }

    pub async fn due(&self, now: i64, limit: i64, skip_targets: &[String]) -> anyhow::Result<Vec<QueuedDelivery>> {
        self.queue.due(now, limit, skip_targets).await
    }

    pub async fn has_active(&self, order_key: &str) -> anyhow::Result<bool> {
        self.queue.has_active(order_key).await
    }

    /// See [`Queue::active_order_keys`] (loaded at start by the Kafka consumer, whose new events
    /// of such a chain must queue behind them).
    pub async fn active_order_keys(&self) -> anyhow::Result<Vec<String>> {
        self.queue.active_order_keys().await
    }

    pub async fn next_due_after(&self, now: i64) -> anyhow::Result<Option<i64>> {
        self.queue.next_due_after(now).await
    }

    /// See [`Queue::complete`].
    pub async fn complete(
        &self,
        batch: &[Completion],
        now: i64,
        claim: impl FnOnce(&[QueuedDelivery]) + Send,
    ) -> anyhow::Result<Completed> {
        self.complete_counting(batch, now, claim, None).await
    }

    /// See [`Queue::complete`], with run counts made in the same transaction.
    pub async fn complete_counting(
        &self,
        batch: &[Completion],
        now: i64,
        claim: impl FnOnce(&[QueuedDelivery]) + Send,
        counting: Option<Counting<'_>>,
    ) -> anyhow::Result<Completed> {
        let mut claim = Some(claim);
        self.queue
            .complete(
                batch,
                now,
                &mut |rows| {
                    if let Some(c) = claim.take() {
                        c(rows)
                    }
                },
                counting,
            )
            .await
    }

    pub async fn dead_letter_queued(&self, q: &QueuedDelivery, dl: &NewDeadLetter, now: i64) -> anyhow::Result<bool> {
        self.queue.dead_letter_queued(q, dl, now).await
    }

    /// See [`Queue::renew`].
    pub async fn renew(&self, seqs: &[i64], now: i64) -> anyhow::Result<Vec<i64>> {
        self.queue.renew(seqs, now).await
    }

    pub async fn drop_queued_for_run(
        &self,
        run_id: &str,
        keep: &[i64],
        now: i64,
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        self.queue.drop_queued_for_run(run_id, keep, now).await
    }

    pub async fn queue_stats(&self) -> anyhow::Result<(i64, Option<i64>)> {
        self.queue.queue_stats().await
    }

    pub async fn purge_delivered(&self, before: i64, first_try_before: i64) -> anyhow::Result<u64> {
        self.queue.purge_delivered(before, first_try_before).await
    }

    pub async fn purge_failed(&self, rows_before: i64, dead_letters_before: i64) -> anyhow::Result<u64> {
        self.queue.purge_failed(rows_before, dead_letters_before).await
    }

    // ---- delivery log ---------------------------------------------------------------------------

    pub async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<DeliveryRow>> {
        self.log.list_deliveries(filter, after, limit).await
    }

    pub async fn get_delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryRow>> {
        self.log.get_delivery(id).await
    }

    pub async fn list_attempts(&self, delivery_id: &str) -> anyhow::Result<Vec<AttemptRow>> {
        self.log.list_attempts(delivery_id).await
    }

    pub async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<DeadLetterRow>> {
        self.log.list_dead_letters(filter, after, limit).await
    }

    /// See [`DeliveryLog::replay_dead_letters`].
    pub async fn replay_dead_letters(
        &self,
        ids: Option<&[String]>,
        filter: &DeadLetterFilter,
        max: i64,
        now: i64,
        hold: impl FnOnce(&[String]) -> HashSet<String> + Send,
    ) -> anyhow::Result<(Vec<QueuedDelivery>, u64, Vec<String>, Vec<String>)> {
        let mut hold = Some(hold);
        self.log
            .replay_dead_letters(ids, filter, max, now, &mut |keys| {
                hold.take().map(|h| h(keys)).unwrap_or_default()
            })
            .await
    }

    // ---- registry -------------------------------------------------------------------------------

    pub async fn insert_webhook(&self, w: &Webhook) -> anyhow::Result<Webhook> {
        let stored = self.registry.insert_webhook(&self.seal_webhook(w)).await?;
        self.open_webhook(stored)
    }

    pub async fn update_webhook(&self, w: &Webhook) -> anyhow::Result<()> {
        self.registry.update_webhook(&self.seal_webhook(w)).await
    }

    pub async fn get_webhook(&self, id: &str) -> anyhow::Result<Option<Webhook>> {
        self.registry
            .get_webhook(id)
            .await?
            .map(|w| self.open_webhook(w))
            .transpose()
    }

    pub async fn list_webhooks(&self, after: i64, limit: i64) -> anyhow::Result<Page<Webhook>> {
        let page = self.registry.list_webhooks(after, limit).await?;
        Ok(Page {
            results: page
                .results
                .into_iter()
                .map(|w| self.open_webhook(w))
                .collect::<anyhow::Result<_>>()?,
            next_cursor: page.next_cursor,
        })
    }

    pub async fn all_webhooks(&self) -> anyhow::Result<Vec<Webhook>> {
        self.registry
            .all_webhooks()
            .await?
            .into_iter()
            .map(|w| self.open_webhook(w))
            .collect()
    }

    pub async fn delete_webhook(&self, id: &str) -> anyhow::Result<bool> {
        self.registry.delete_webhook(id).await
    }

    pub async fn webhooks_version(&self) -> anyhow::Result<i64> {
        self.registry.webhooks_version().await
    }

    pub async fn kv_get_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String> {
        self.registry.kv_get_or_insert(key, value).await
    }

    // ---- runs -----------------------------------------------------------------------------------

    pub async fn insert_job(&self, j: &SyncJob) -> anyhow::Result<SyncJob> {
        self.runs.insert_job(j).await
    }

    pub async fn update_job(&self, j: &SyncJob) -> anyhow::Result<()> {
        self.runs.update_job(j).await
    }

    pub async fn get_job(&self, id: &str) -> anyhow::Result<Option<SyncJob>> {
        self.runs.get_job(id).await
    }

    pub async fn list_jobs(
        &self,
        integration_name: Option<&str>,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<SyncJob>> {
        self.runs.list_jobs(integration_name, after, limit).await
    }

    pub async fn delete_job(&self, id: &str) -> anyhow::Result<Result<bool, i64>> {
        self.runs.delete_job(id).await
    }

    pub async fn insert_run(&self, r: &Run) -> anyhow::Result<Run> {
        self.runs.insert_run(r).await
    }

    pub async fn get_run(&self, id: &str) -> anyhow::Result<Option<Run>> {
        self.runs.get_run(id).await
    }

    pub async fn list_runs(&self, f: &RunFilter, after: i64, limit: i64) -> anyhow::Result<Page<Run>> {
        self.runs.list_runs(f, after, limit).await
    }

    pub async fn previous_run_date(&self, job: &str, account: &str) -> anyhow::Result<Option<i64>> {
        self.runs.previous_run_date(job, account).await
    }

    pub async fn delete_run(&self, id: &str) -> anyhow::Result<bool> {
        self.runs.delete_run(id).await
    }

    /// [`RunStore::with_runs`] with a plain closure, returning what it returns.
    pub async fn with_runs<T: Send>(
        &self,
        ids: &[&str],
        decide: impl FnOnce(&mut RunsLocked) -> T + Send,
    ) -> anyhow::Result<T> {
        let mut decide = Some(decide);
        let mut out = None;
        self.runs
            .with_runs(ids, &mut |locked| {
                if let Some(f) = decide.take() {
                    out = Some(f(locked));
                }
            })
            .await?;
        out.context("the store did not call the run lifecycle back")
    }

    pub async fn runs_with_due_batches(&self, since_before: i64, limit: i64) -> anyhow::Result<Vec<String>> {
        self.runs.runs_with_due_batches(since_before, limit).await
    }

    pub async fn insert_eloqua_sync(
        &self,
        uri: &str,
        callback_url: Option<&str>,
        run_id: Option<&str>,
        created_by: &str,
        now: i64,
    ) -> anyhow::Result<EloquaSync> {
        self.runs
            .insert_eloqua_sync(uri, callback_url, run_id, created_by, now)
            .await
    }

    pub async fn get_eloqua_sync(&self, n: i64) -> anyhow::Result<Option<EloquaSync>> {
        self.runs.get_eloqua_sync(n).await
    }

    pub async fn insert_command(&self, key: &str, command: &serde_json::Value) -> anyhow::Result<()> {
        self.runs
            .insert_command(key, &command.to_string(), crate::domain::now_ms())
            .await
    }

    pub async fn list_commands(&self, after: i64, limit: i64) -> anyhow::Result<Page<CommandRow>> {
        self.runs.list_commands(after, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::unavailable;

    fn sqlite(code: i32) -> anyhow::Error {
        anyhow::Error::from(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None))
    }

    #[test]
    fn a_store_that_cannot_take_the_work_now_is_unavailable_and_a_bad_request_of_it_is_not() {
        assert!(unavailable(&anyhow::Error::from(sqlx::Error::PoolTimedOut)));
        assert!(unavailable(&anyhow::Error::from(sqlx::Error::Io(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset)
        ))));
        // Through the context the store's callers add.
        assert!(unavailable(
            &anyhow::Error::from(sqlx::Error::PoolClosed).context("queueing")
        ));
        assert!(unavailable(&sqlite(rusqlite::ffi::SQLITE_BUSY)));
        assert!(unavailable(&sqlite(rusqlite::ffi::SQLITE_FULL)));
        assert!(!unavailable(&anyhow::Error::from(sqlx::Error::RowNotFound)));
        assert!(!unavailable(&sqlite(rusqlite::ffi::SQLITE_CONSTRAINT)));
        assert!(!unavailable(&anyhow::anyhow!("a sync renders as an object")));
        assert!(super::unavailable_code("57P01") && super::unavailable_code("08006") && super::unavailable_code("517"));
        assert!(!super::unavailable_code("23505") && !super::unavailable_code("19"));
    }
}
