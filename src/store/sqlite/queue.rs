//! [`Queue`] on SQLite: the `deliveries` table as a queue of chains (see `crate::store`).

use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use rusqlite::Connection;
use sqlx::Row;

use super::runs::decide_runs;
use super::{json_list, placeholders, Binder, Cols, Lease, SqliteStore, IN_CHUNK, QUEUED};
use crate::store::{
    chain_states, first_try_success, ready_now, requeue, sourced_ids, with_logged_attempts, without_recorded,
    AttemptRecord, Claim, Completed, Completion, Counting, Logged, NewDeadLetter, NewDelivery, Next, Queue,
    QueuedDelivery,
};

/// A queued delivery's columns in `deliveries`. Its body is in `delivery_bodies` (written once,
/// see migrations/sqlite/0009): a `SELECT` and an `UPDATE … RETURNING` read it with [`BODY`].
pub(super) const QUEUED_COLUMNS: &str = "seq, id, event_id, event, run_id, kind, webhook_id, target_url, target_key, \
     order_key, attempts, first_attempt_at, created_at, source";

/// A `deliveries` row's body, as a column of a `SELECT … FROM deliveries` or of the `RETURNING`
/// of an `UPDATE deliveries`: one lookup by primary key for each row returned, never a plan
/// that reads the bodies table (which a join leaves to the planner's estimates). In `RETURNING`
/// it saves the statement that read the bodies after (a `RETURNING` cannot join, but may hold a
/// subquery): on the one write connection every statement is a round trip to its thread.
pub(super) const BODY: &str = "(SELECT b.body FROM delivery_bodies b WHERE b.seq = deliveries.seq) AS body";

/// A queued delivery from a row that starts with [`QUEUED_COLUMNS`] and `body` ([`BODY`]), in
/// that order (any other column a statement reads comes after them); an error, not a panic, when
/// the row has no body. Read by position: by name, each of the 15 columns was a search of the
/// statement's column names (rusqlite compares them one by one), 12 % of the store's work in
/// `cargo bench --bench store_floor` under callgrind.
pub(super) fn queued_from_row(r: &impl Cols) -> anyhow::Result<QueuedDelivery> {
    let seq: i64 = r.at(0)?;
    let body: Option<String> = r.at(14)?;
    let body = body.ok_or_else(|| anyhow::anyhow!("delivery {seq} has no body in the store"))?;
    Ok(QueuedDelivery {
        seq,
        id: r.at(1)?,
        event_id: r.at(2)?,
        event: r.at(3)?,
        run_id: r.at(4)?,
        kind: r.at(5)?,
        webhook_id: r.at(6)?,
        target_url: r.at(7)?,
        target_key: r.at(8)?,
        order_key: r.at(9)?,
        attempts: r.at(10)?,
        first_attempt_at: r.at(11)?,
        created_at: r.at(12)?,
        source: r.at(13)?,
        body,
    })
}

/// The queued deliveries a statement returns (rows of [`QUEUED_COLUMNS`] and [`BODY`]).
fn queued_rows(mut rows: rusqlite::Rows<'_>) -> anyhow::Result<Vec<QueuedDelivery>> {
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(queued_from_row(r)?);
    }
    Ok(out)
}

pub(super) fn insert_dead_letter(c: &Connection, dl: &NewDeadLetter, now: i64) -> anyhow::Result<()> {
    c.prepare_cached(
        "INSERT INTO dead_letters (id, delivery_id, event_id, event, webhook_id, kind, reason, attempts, last_status, \
         last_error, raw, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(rusqlite::params![
        uuid::Uuid::now_v7().to_string(),
        dl.delivery_id,
        dl.event_id,
        dl.event,
        dl.webhook_id,
        dl.kind,
        dl.reason,
        dl.attempts,
        dl.last_status,
        dl.last_error,
        dl.raw,
        now
    ])?;
    Ok(())
}

/// The chains among `keys` that still have queued deliveries (a new row of a busy chain waits
/// behind them; a row with no chain never waits).
pub(super) fn busy_chains(c: &Connection, keys: &[&str]) -> anyhow::Result<HashSet<String>> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let mut st = c.prepare_cached(&format!(
        "SELECT k.value FROM json_each(?) AS k WHERE EXISTS (SELECT 1 FROM deliveries x \
         WHERE x.order_key = k.value AND {QUEUED})"
    ))?;
    let keys = st.query_map([json_list(keys)?], |r| r.get::<_, String>(0))?;
    Ok(keys.collect::<rusqlite::Result<_>>()?)
}

/// The chains among `keys` that are a paused Census-style sync's (`s:<sync id>:<run>`): their new
/// rows are written `paused` (CONTRACT §3, Census syncs: paused).
pub(super) fn paused_chains(c: &Connection, keys: &[&str]) -> anyhow::Result<HashSet<String>> {
    let ids: Vec<i64> = keys
        .iter()
        .filter_map(|k| crate::syncs::sync_of_order_key(k))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let mut st =
        c.prepare_cached("SELECT id FROM census_syncs WHERE paused = 1 AND id IN (SELECT value FROM json_each(?))")?;
    let paused: HashSet<i64> = st
        .query_map([json_list(&ids)?], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(keys
        .iter()
        .filter(|k| crate::syncs::sync_of_order_key(k).is_some_and(|i| paused.contains(&i)))
        .map(|k| k.to_string())
        .collect())
}

/// Make the oldest queued row of each chain in `keys` ready (when it is still waiting: its
/// predecessor finished). Returns the rows promoted.
///
/// Each chain's oldest row is found by a probe of the chain index that stops at its first entry
/// (`ORDER BY seq LIMIT 1` per key). `MIN(seq) … GROUP BY order_key` read every queued entry of
/// every chain instead: 76 µs a promoted row in the embedded benchmark, with 100 events queued
/// a run.
fn promote_next(c: &Connection, keys: &[&str], now: i64, lease: &Lease) -> anyhow::Result<Vec<QueuedDelivery>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Read, then written by seq: an `UPDATE … RETURNING` ran its returned columns (and the body's
    // lookup) as a trigger program a row, its rows stored and read back through an ephemeral
    // table, and could not update in one pass.
    let promoted = queued_rows(
        c.prepare_cached(&format!(
            "SELECT {QUEUED_COLUMNS}, {BODY} FROM deliveries WHERE state = 'waiting' AND seq IN \
             (SELECT (SELECT x.seq FROM deliveries x WHERE x.order_key = k.value \
              AND {QUEUED} ORDER BY x.seq LIMIT 1) FROM json_each(?) AS k)"
        ))?
        .query([json_list(keys)?])?,
    )?;
    if promoted.is_empty() {
        return Ok(promoted);
    }
    let seqs: Vec<i64> = promoted.iter().map(|q| q.seq).collect();
    c.prepare_cached(
        "UPDATE OR FAIL deliveries SET state = 'ready', next_attempt_at = ?, lease_owner = ?, lease_until = ? \
         WHERE seq IN (SELECT value FROM json_each(?))",
    )?
    .execute(rusqlite::params![now, lease.owner, now + lease.ms, json_list(&seqs)?])?;
    Ok(promoted)
}

/// Insert deliveries (see [`insert_new_deliveries`]), leaving out those made from a Kafka
/// message whose id the store already has: the message was read again after a crash and the
/// delivery was queued (or finished) the first time.
pub(super) fn insert_deliveries(
    c: &Connection,
    deliveries: &[NewDelivery],
    now: i64,
    held: &HashSet<String>,
    lease: &Lease,
) -> anyhow::Result<Vec<QueuedDelivery>> {
    let recorded = recorded_ids(c, &sourced_ids(deliveries))?;
    insert_new_deliveries(c, &without_recorded(deliveries, &recorded), now, held, lease)
}

/// Insert deliveries in the order given. The first row of a chain that has nothing queued is
/// ready; every later one waits; a row whose chain is in `held` waits even when it is the first
/// (its chain's head is kept in memory). Returns the rows that are ready now.
fn insert_new_deliveries(
    c: &Connection,
    deliveries: &[NewDelivery],
    now: i64,
    held: &HashSet<String>,
    lease: &Lease,
) -> anyhow::Result<Vec<QueuedDelivery>> {
    let keys: Vec<&str> = deliveries
        .iter()
        .filter_map(|d| d.order_key.as_deref())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut busy = busy_chains(c, &keys)?;
    busy.extend(held.iter().cloned());
    let states = chain_states(deliveries, busy, &paused_chains(c, &keys)?);
    let rows: Vec<InsertRow> = deliveries
        .iter()
        .zip(&states)
        .map(|(d, state)| {
            // A ready row is this instance's (handed to its claim, or parked by it).
            let ready = *state == "ready";
            InsertRow::new(d, state, d.attempts, d.next_attempt_at.unwrap_or(now), None)
                .leased(ready.then_some((lease.owner.as_str(), now + lease.ms)))
        })
        .collect();
    let seqs = insert_rows(c, &rows)?;
    Ok(ready_now(deliveries, &states, &seqs, now))
}

/// A `deliveries` row as [`insert_rows`] writes it.
struct InsertRow<'a> {
    id: &'a str,
    event_id: &'a str,
    event: &'a str,
    run_id: Option<&'a str>,
    kind: &'a str,
    webhook_id: Option<&'a str>,
    target_url: Option<&'a str>,
    target_key: &'a str,
    order_key: Option<&'a str>,
    body: &'a str,
    state: &'a str,
    attempts: i64,
    next_attempt_at: i64,
    first_attempt_at: Option<i64>,
    created_at: i64,
    source: Option<&'a str>,
    /// The last attempt's (a delivery attempted in memory before it was written).
    last_status: Option<i64>,
    last_error: Option<&'a str>,
    last_duration_ms: Option<i64>,
    last_excerpt: Option<&'a str>,
    lease_owner: Option<&'a str>,
    lease_until: Option<i64>,
    finished_at: Option<i64>,
}

impl<'a> InsertRow<'a> {
    fn new(d: &'a NewDelivery, state: &'a str, attempts: i64, next_attempt_at: i64, finished_at: Option<i64>) -> Self {
        let last = d.log.last();
        InsertRow {
            id: &d.id,
            event_id: &d.event_id,
            event: &d.event,
            run_id: d.run_id.as_deref(),
            kind: d.kind,
            webhook_id: d.webhook_id.as_deref(),
            target_url: d.target_url.as_deref(),
            target_key: &d.target_key,
            order_key: d.order_key.as_deref(),
            body: &d.body,
            state,
            attempts,
            next_attempt_at,
            first_attempt_at: d.first_attempt_at,
            created_at: d.created_at,
            source: d.source.as_deref(),
            last_status: last.and_then(|a| a.status),
            last_error: last.and_then(|a| a.error.as_deref()),
            last_duration_ms: last.map(|a| a.duration_ms),
            last_excerpt: last.and_then(|a| a.excerpt.as_deref()),
            lease_owner: None,
            lease_until: None,
            finished_at,
        }
    }

    fn leased(mut self, lease: Option<(&'a str, i64)>) -> Self {
        self.lease_owner = lease.map(|l| l.0);
        self.lease_until = lease.map(|l| l.1);
        self
    }
}

/// Rows an insert statement takes.
const INSERT_ROWS: usize = 256;

/// What [`write_rows`] does with a row whose id the store already has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Existing {
    /// Fail the statement (and the caller's turn): the rows are new by construction.
    Fail,
    /// Leave it as it is and write the others: a Kafka message read again after a crash makes
    /// the same delivery ids, recorded the first time (see [`Queue::record`]).
    Skip,
}

/// Write rows in the order given (so a chain's `seq`s follow its order); returns each row's
/// `seq` by its id. See [`write_rows`].
fn insert_rows(c: &Connection, rows: &[InsertRow<'_>]) -> anyhow::Result<HashMap<String, i64>> {
    let seqs = write_rows(c, rows, Existing::Fail)?;
    Ok(rows
        .iter()
        .zip(seqs)
        .filter_map(|(r, seq)| Some((r.id.to_string(), seq?)))
        .collect())
}

/// Write rows in the order given; answers, for each row, the `seq` it was written at, or None
/// when its id was in the store already (`Existing::Skip`; with `Existing::Fail` that fails).
/// One id twice among rows written now fails either way.
/// Up to [`INSERT_ROWS`] a statement, its `VALUES` list padded with rows of NULLs (left out by
/// the `WHERE`) to a power of two: the statement's text is then one of nine, so each connection
/// prepares them once and keeps them (see [`json_list`]; event bodies are bound as they are
/// rather than inside a JSON list, which SQLite would parse once per column).
///
/// `OR FAIL`, here and in [`promote_next`]: the caller's savepoint or transaction makes its
/// writes atomic (`group::turn`), and without it a statement of many rows that may abort opens a
/// statement journal of its own, a copy of every page it changes. `OR IGNORE` (Skip) never
/// aborts: the unique index of delivery ids, which each insert probes anyway, tells which rows
/// were there, where a lookup of every batch's ids before writing it was 2.2 % of the Kafka
/// relay's samples (docs/BENCHMARKS.md, fourteenth session).
fn write_rows(c: &Connection, rows: &[InsertRow<'_>], existing: Existing) -> anyhow::Result<Vec<Option<i64>>> {
    let mut out = Vec::with_capacity(rows.len());
    for piece in rows.chunks(INSERT_ROWS) {
        let n = piece.len().next_power_of_two();
        let verb = match existing {
            Existing::Fail => "INSERT OR FAIL",
            Existing::Skip => "INSERT OR IGNORE",
        };
        let mut st = c.prepare_cached(&format!(
            "{verb} INTO deliveries (id, event_id, event, run_id, kind, webhook_id, target_url, target_key, order_key, \
             state, attempts, next_attempt_at, first_attempt_at, created_at, source, last_status, last_error, \
             last_duration_ms, last_excerpt, lease_owner, lease_until, finished_at) \
             SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL",
            vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; n].join(", ")
        ))?;
        let mut b = Binder::new(&mut st);
        for r in piece {
            b.bind(r.id)?;
            b.bind(r.event_id)?;
            b.bind(r.event)?;
            b.bind(r.run_id)?;
            b.bind(r.kind)?;
            b.bind(r.webhook_id)?;
            b.bind(r.target_url)?;
            b.bind(r.target_key)?;
            b.bind(r.order_key)?;
            b.bind(r.state)?;
            b.bind(r.attempts)?;
            b.bind(r.next_attempt_at)?;
            b.bind(r.first_attempt_at)?;
            b.bind(r.created_at)?;
            b.bind(r.source)?;
            b.bind(r.last_status)?;
            b.bind(r.last_error)?;
            b.bind(r.last_duration_ms)?;
            b.bind(r.last_excerpt)?;
            b.bind(r.lease_owner)?;
            b.bind(r.lease_until)?;
            b.bind(r.finished_at)?;
        }
        b.nulls((n - piece.len()) * 22)?;
        // The seqs the rows drew, without a `RETURNING` (which runs a trigger program a row and
        // stores its rows in an ephemeral table): AUTOINCREMENT gives each new row one more than
        // the largest seq the table ever had, so the rows of one statement take the seqs after
        // the last one recorded, in their order. Checked: when every row was written, the last
        // one's seq must be exactly as many past it as rows were written; else they are looked
        // up by id, and a row is this statement's when its seq is past the last one before it.
        let last_before: i64 = c
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'deliveries'")?
            .query_row([], |r| r.get(0))?;
        let written = st.raw_execute()?;
        anyhow::ensure!(
            existing == Existing::Skip || written == piece.len(),
            "{written} of {} deliveries were written",
            piece.len()
        );
        let at = out.len();
        if written == piece.len() && c.last_insert_rowid() == last_before + piece.len() as i64 {
            out.extend((last_before + 1..).take(piece.len()).map(Some));
        } else {
            let ids: Vec<&str> = piece.iter().map(|r| r.id).collect();
            let mut st =
                c.prepare_cached("SELECT id, seq FROM deliveries WHERE id IN (SELECT value FROM json_each(?))")?;
            let found: HashMap<String, i64> = st
                .query_map([json_list(&ids)?], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut taken = HashSet::new();
            for r in piece {
                let seq = match found.get(r.id) {
                    // A second row of an id written now: one delivery twice in a batch is an
                    // error, as when `Existing::Fail` fails the statement.
                    Some(_) if taken.contains(r.id) => anyhow::bail!("delivery {} is twice in one batch", r.id),
                    // Written now.
                    Some(seq) if *seq > last_before => {
                        taken.insert(r.id);
                        Some(*seq)
                    }
                    // There before.
                    Some(_) => None,
                    // `OR IGNORE` also leaves out a row that breaks another constraint; none
                    // can here (every NOT NULL column is bound from a non-optional field), and
                    // such a row must not pass for one recorded before.
                    None => anyhow::bail!("delivery {} was neither written nor found in the store", r.id),
                };
                out.push(seq);
            }
            let mine = out[at..].iter().flatten().count();
            anyhow::ensure!(
                mine == written,
                "{written} deliveries were written, {mine} found as written"
            );
        }
        // The bodies, once: the same padding, by the seqs just given.
        let new: Vec<(i64, &str)> = piece
            .iter()
            .zip(&out[at..])
            .filter_map(|(r, seq)| Some(((*seq)?, r.body)))
            .collect();
        if new.is_empty() {
            continue;
        }
        let n = new.len().next_power_of_two();
        let mut st = c.prepare_cached(&format!(
            "INSERT OR FAIL INTO delivery_bodies (seq, body) SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL",
            vec!["(?, ?)"; n].join(", ")
        ))?;
        let mut b = Binder::new(&mut st);
        for (seq, body) in &new {
            b.bind(*seq)?;
            b.bind(*body)?;
        }
        b.nulls((n - new.len()) * 2)?;
        st.raw_execute()?;
    }
    Ok(out)
}

/// The attempt log of deliveries that were attempted in memory before their row was written.
fn insert_attempt_logs<'a>(c: &Connection, rows: impl Iterator<Item = &'a NewDelivery>) -> anyhow::Result<()> {
    let items: Vec<(&str, i64, &AttemptRecord)> = rows
        .flat_map(|d| {
            d.log
                .iter()
                .enumerate()
                .map(move |(i, a)| (d.id.as_str(), i as i64 + 1, a))
        })
        .collect();
    insert_attempts(c, &items)
}

/// Attempts (delivery id, attempt number, what happened), in one statement.
fn insert_attempts(c: &Connection, items: &[(&str, i64, &AttemptRecord)]) -> anyhow::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = items
        .iter()
        .map(|(id, n, a)| (id, n, a.started_at, a.duration_ms, a.status, &a.error, &a.excerpt))
        .collect();
    c.prepare_cached(
        "INSERT OR REPLACE INTO attempts (delivery_id, n, started_at, duration_ms, status, error, response_excerpt) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6 FROM json_each(?)",
    )?
    .execute([json_list(&rows)?])?;
    Ok(())
}

/// Which of these delivery ids the store already has (one statement: the ids go as one JSON
/// array parameter).
fn recorded_ids(c: &Connection, ids: &[&str]) -> anyhow::Result<HashSet<String>> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let mut st = c.prepare_cached("SELECT id FROM deliveries WHERE id IN (SELECT value FROM json_each(?))")?;
    let ids = st.query_map([json_list(ids)?], |r| r.get::<_, String>(0))?;
    Ok(ids.collect::<rusqlite::Result<_>>()?)
}

/// Take the waiting rows of a chain out of the queue (to be written again behind rows that
/// must go first), oldest first. Their attempt logs, keyed by delivery id, stay.
fn take_waiting(c: &Connection, key: &str) -> anyhow::Result<Vec<NewDelivery>> {
    // Read with their bodies first: the delete takes the bodies with the rows.
    let mut out = queued_rows(
        c.prepare_cached(&format!(
            "SELECT {QUEUED_COLUMNS}, {BODY} FROM deliveries WHERE order_key = ? AND {QUEUED} AND state = 'waiting'"
        ))?
        .query([key])?,
    )?;
    c.prepare_cached(&format!(
        "DELETE FROM deliveries WHERE order_key = ? AND {QUEUED} AND state = 'waiting'"
    ))?
    .execute([key])?;
    out.sort_by_key(|q| q.seq);
    Ok(out.into_iter().map(requeue).collect())
}

/// Write each completion's outcome on its row, only while this handle holds the row's lease and
/// it is still ready; returns the seqs written. One statement a row, by its seq: a row at a time
/// is updated in one pass with nothing around it, where one statement for the batch
/// (`UPDATE … FROM (VALUES …) … RETURNING`, its list padded to a power of two) stored the list,
/// the joined rows and the returned seqs in three ephemeral tables and ran a trigger program a
/// row for its `RETURNING` (callgrind over `cargo bench --bench store_floor`).
fn complete_rows(c: &Connection, batch: &[Completion], now: i64, owner: &str) -> anyhow::Result<HashSet<i64>> {
    let mut held = HashSet::with_capacity(batch.len());
    let mut st = c.prepare_cached(
        "UPDATE deliveries SET state = ?2, attempts = ?3, next_attempt_at = ?4, first_attempt_at = ?5, \
         last_status = ?6, last_error = ?7, finished_at = ?8, last_duration_ms = ?9, last_excerpt = ?10, \
         lease_owner = NULL, lease_until = NULL WHERE seq = ?1 AND state = 'ready' AND lease_owner = ?11",
    )?;
    for x in batch {
        let (state, next_at, finished) = x.row_state(now);
        let n = st.execute(rusqlite::params![
            x.seq,
            state,
            x.attempt_no,
            next_at,
            x.first_attempt_at,
            x.attempt.status,
            x.attempt.error.as_deref(),
            finished,
            x.attempt.duration_ms,
            x.attempt.excerpt.as_deref(),
            owner
        ])?;
        if n == 1 {
            held.insert(x.seq);
        }
    }
    // The few completions that sent another body than the queued one (see `Completion::body`).
    for x in batch.iter().filter(|x| held.contains(&x.seq)) {
        if let Some(body) = &x.body {
            c.prepare_cached("UPDATE delivery_bodies SET body = ? WHERE seq = ?")?
                .execute(rusqlite::params![body, x.seq])?;
        }
    }
    Ok(held)
}

#[async_trait]
impl Queue for SqliteStore {
    async fn enqueue_claiming(
        &self,
        deliveries: &[NewDelivery],
        dead: &[NewDeadLetter],
        now: i64,
        held: &HashSet<String>,
        claim: Claim<'_>,
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        self.writer
            .write(|c| {
                let ready = insert_deliveries(c, deliveries, now, held, &self.lease)?;
                for dl in dead {
                    insert_dead_letter(c, dl, now)?;
                }
                claim(&ready);
                Ok(ready)
            })
            .await
    }

    async fn promote(&self, keys: &[String], now: i64, claim: Claim<'_>) -> anyhow::Result<Vec<QueuedDelivery>> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.writer
            .write(|c| {
                let promoted = promote_next(c, &keys, now, &self.lease)?;
                claim(&promoted);
                Ok(promoted)
            })
            .await
    }

    async fn record(
        &self,
        logged: &[Logged],
        parked: &[(Vec<NewDelivery>, bool)],
        dead: &[NewDeadLetter],
        now: i64,
        counting: Option<Counting<'_>>,
    ) -> anyhow::Result<()> {
        self.writer
            .write(|c| {
                // Deliveries recorded before (their Kafka message was read again after a crash:
                // the same message makes the same delivery ids) stay as they are, with their
                // attempts and dead letters, counted once.
                // The logged rows are written leaving out those the store has (see `write_rows`);
                // the parked ones (rare) are looked up.
                let rows: Vec<InsertRow> = logged
                    .iter()
                    .map(|l| InsertRow::new(&l.delivery, l.state, l.delivery.log.len() as i64, now, Some(now)))
                    .collect();
                let seqs = write_rows(c, &rows, Existing::Skip)?;
                let (fresh, old): (Vec<_>, Vec<_>) = logged.iter().zip(&seqs).partition(|(_, seq)| seq.is_some());
                let logged: Vec<&Logged> = fresh.into_iter().map(|(l, _)| l).collect();
                let parked_ids: Vec<&str> = parked
                    .iter()
                    .flat_map(|(rows, _)| rows.iter().map(|d| d.id.as_str()))
                    .collect();
                let mut recorded = recorded_ids(c, &parked_ids)?;
                recorded.extend(old.into_iter().map(|(l, _)| l.delivery.id.clone()));
                // A first-try success keeps its attempt on its row (written above).
                insert_attempt_logs(c, with_logged_attempts(&logged))?;
                for (rows, ahead) in parked {
                    let rows = without_recorded(rows, &recorded);
                    if rows.is_empty() {
                        continue;
                    }
                    let key = rows.first().and_then(|d| d.order_key.clone());
                    // Rows held behind the in-memory part of this chain: taken out and written
                    // again after the parked ones, so the chain keeps the order its events came in.
                    let held = match (&key, ahead) {
                        (Some(k), true) => take_waiting(c, k)?,
                        _ => Vec::new(),
                    };
                    // Checked against the store above; the held rows were just taken out of it.
                    insert_new_deliveries(c, &rows, now, &HashSet::new(), &self.lease)?;
                    if !held.is_empty() {
                        let keep: HashSet<String> = key.into_iter().collect();
                        insert_new_deliveries(c, &held, now, &keep, &self.lease)?;
                    }
                    insert_attempt_logs(c, rows.iter())?;
                }
                for dl in dead {
                    if dl.delivery_id.as_ref().is_some_and(|id| recorded.contains(id)) {
                        continue;
                    }
                    insert_dead_letter(c, dl, now)?;
                }
                if let Some(cn) = counting {
                    decide_runs(c, &cn.run_ids, |locked| (cn.count)(&recorded, locked))?;
                }
                Ok(())
            })
            .await
    }

    async fn due(&self, now: i64, limit: i64, skip_targets: &[String]) -> anyhow::Result<Vec<QueuedDelivery>> {
        // Ready rows that are due and not leased to another handle (or whose lease expired),
        // leased to this one. Read first on a read connection: the dispatcher asks every
        // `delivery.poll_interval_ms`, and what it finds is mostly nothing or rows this handle
        // holds already (chain heads it claimed, which it skips as known). Those are taken as
        // they are while their lease has more than half its term left (renewals come every
        // third of it). Only the others are claimed, through the write connection, with the
        // conditions checked again there (a row may have been finished or claimed since):
        // a claim there waits for the writer's queue and a commit, and meanwhile the dispatcher
        // starts nothing.
        let due =
            "state = 'ready' AND next_attempt_at <= ? AND (lease_owner IS NULL OR lease_owner = ? OR lease_until <= ?)";
        let mut sql = format!(
            "SELECT {QUEUED_COLUMNS}, {BODY}, next_attempt_at, COALESCE(lease_owner = ? AND lease_until > ?, 0) AS held \
             FROM deliveries WHERE {due}"
        );
        if !skip_targets.is_empty() {
            sql.push_str(&format!(
                " AND target_key NOT IN ({})",
                placeholders(skip_targets.len())
            ));
        }
        sql.push_str(" ORDER BY next_attempt_at, seq LIMIT ?");
        let mut q = sqlx::query(&sql)
            .bind(&self.lease.owner)
            .bind(now + self.lease.ms / 2)
            .bind(now)
            .bind(&self.lease.owner)
            .bind(now);
        for t in skip_targets {
            q = q.bind(t);
        }
        let found = q.bind(limit).fetch_all(&self.pool).await?;
        let mut out: Vec<(i64, QueuedDelivery)> = Vec::with_capacity(found.len());
        let mut claim = Vec::new();
        for r in &found {
            if r.get::<i64, _>("held") != 0 {
                out.push((r.get("next_attempt_at"), queued_from_row(r)?));
            } else {
                claim.push(r.get::<i64, _>("seq"));
            }
        }
        if !claim.is_empty() {
            let claimed = self
                .writer
                .write(|c| {
                    let mut st = c.prepare_cached(&format!(
                        "UPDATE deliveries SET lease_owner = ?, lease_until = ? \
                         WHERE seq IN (SELECT value FROM json_each(?)) AND {due} \
                         RETURNING {QUEUED_COLUMNS}, {BODY}, next_attempt_at"
                    ))?;
                    let mut rows = st.query(rusqlite::params![
                        self.lease.owner,
                        now + self.lease.ms,
                        json_list(&claim)?,
                        now,
                        self.lease.owner,
                        now
                    ])?;
                    let mut claimed = Vec::new();
                    while let Some(r) = rows.next()? {
                        claimed.push((r.col("next_attempt_at")?, queued_from_row(r)?));
                    }
                    Ok(claimed)
                })
                .await?;
            out.extend(claimed);
        }
        // Rows held and rows claimed (RETURNING keeps no order): oldest due first, as asked.
        out.sort_by_key(|(at, q)| (*at, q.seq));
        Ok(out.into_iter().map(|(_, q)| q).collect())
    }

    async fn has_active(&self, order_key: &str) -> anyhow::Result<bool> {
        Ok(sqlx::query_scalar::<_, i64>(&format!(
            "SELECT EXISTS(SELECT 1 FROM deliveries WHERE order_key = ? AND {QUEUED})"
        ))
        .bind(order_key)
        .fetch_one(&self.pool)
        .await?
            != 0)
    }

    async fn active_order_keys(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT DISTINCT order_key FROM deliveries WHERE {QUEUED} AND order_key IS NOT NULL"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn next_due_after(&self, now: i64) -> anyhow::Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'ready' AND next_attempt_at > ?",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn complete(
        &self,
        batch: &[Completion],
        now: i64,
        claim: Claim<'_>,
        counting: Option<Counting<'_>>,
    ) -> anyhow::Result<Completed> {
        let (held, promoted) = self
            .writer
            .write(|c| {
                // First the rows, each only while this handle holds its lease and it is still
                // ready; everything else of a completion follows only for the rows this answers.
                let held = complete_rows(c, batch, now, &self.lease.owner)?;
                let applied: Vec<&Completion> = batch.iter().filter(|x| held.contains(&x.seq)).collect();
                // A first-try success keeps its attempt on its row (written above).
                let attempts: Vec<(&str, i64, &AttemptRecord)> = applied
                    .iter()
                    .filter(|x| !first_try_success(x.attempt_no, matches!(x.next, Next::Delivered)))
                    .map(|x| (x.delivery_id.as_str(), x.attempt_no, &x.attempt))
                    .collect();
                insert_attempts(c, &attempts)?;
                for x in &applied {
                    if let Next::Dead(dl) = &x.next {
                        insert_dead_letter(c, dl, now)?;
                    }
                }
                let finished: Vec<&str> = applied
                    .iter()
                    .filter(|x| !matches!(x.next, Next::Retry { .. }))
                    .filter_map(|x| x.order_key.as_deref())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let promoted = promote_next(c, &finished, now, &self.lease)?;
                if let Some(cn) = counting {
                    decide_runs(c, &cn.run_ids, |locked| {
                        let lost: HashSet<String> = batch
                            .iter()
                            .filter(|x| !held.contains(&x.seq))
                            .map(|x| x.delivery_id.clone())
                            .collect();
                        (cn.count)(&lost, locked)
                    })?;
                }
                claim(&promoted);
                Ok((held, promoted))
            })
            .await?;
        Ok(Completed {
            promoted,
            lost: batch.iter().map(|x| x.seq).filter(|s| !held.contains(s)).collect(),
        })
    }

    async fn renew(&self, seqs: &[i64], now: i64) -> anyhow::Result<Vec<i64>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        // One statement, however many rows: the seqs go as one JSON array parameter.
        let list = serde_json::to_string(seqs)?;
        self.writer
            .write(|c| {
                let mut st = c.prepare_cached(
                    "UPDATE deliveries SET lease_until = ? WHERE seq IN (SELECT value FROM json_each(?)) \
                     AND lease_owner = ? AND state = 'ready' RETURNING seq",
                )?;
                let renewed = st.query_map(rusqlite::params![now + self.lease.ms, list, self.lease.owner], |r| {
                    r.get::<_, i64>(0)
                })?;
                Ok(renewed.collect::<rusqlite::Result<_>>()?)
            })
            .await
    }

    async fn dead_letter_queued(&self, q: &QueuedDelivery, dl: &NewDeadLetter, now: i64) -> anyhow::Result<bool> {
        self.writer
            .write(|c| {
                let n = c
                    .prepare_cached(
                        "UPDATE deliveries SET state = 'dead', finished_at = ?, last_error = ?, lease_owner = NULL, \
                         lease_until = NULL WHERE seq = ? AND state = 'ready' AND lease_owner = ?",
                    )?
                    .execute(rusqlite::params![now, dl.reason, q.seq, self.lease.owner])?;
                if n == 0 {
                    return Ok(false);
                }
                insert_dead_letter(c, dl, now)?;
                if let Some(k) = &q.order_key {
                    promote_next(c, &[k.as_str()], now, &self.lease)?;
                }
                Ok(true)
            })
            .await
    }

    async fn drop_queued_for_run(
        &self,
        run_id: &str,
        keep: &[i64],
        now: i64,
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT seq, kind, event, {BODY} FROM deliveries \
             WHERE run_id = ? AND {QUEUED} ORDER BY seq"
        ))
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let seq: i64 = r.get("seq");
            if keep.contains(&seq) {
                continue;
            }
            sqlx::query(
                "UPDATE deliveries SET state = 'dropped', finished_at = ?, last_error = 'run_stopped' WHERE seq = ?",
            )
            .bind(now)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            out.push((r.get("kind"), r.get("event"), r.get("body")));
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn pause_queued(&self, sync_id: i64) -> anyhow::Result<u64> {
        // `QUEUED` lets the scan use the chain index: queued rows only.
        let prefix = crate::syncs::order_key_prefix(sync_id);
        Ok(self.execute(sqlx::query(&format!("UPDATE deliveries SET state = 'paused' WHERE {QUEUED} AND state = 'waiting' AND substr(order_key, 1, length(?)) = ? AND EXISTS (SELECT 1 FROM census_syncs WHERE id = ? AND paused = 1)"))
        .bind(&prefix)
        .bind(&prefix)
        .bind(sync_id)
        )
        .await?
        .rows_affected())
    }

    async fn release_paused(&self, sync_id: i64, now: i64, claim: Claim<'_>) -> anyhow::Result<Vec<QueuedDelivery>> {
        let prefix = crate::syncs::order_key_prefix(sync_id);
        self.writer
            .write(|c| {
                let keys: BTreeSet<String> = c
                    .prepare_cached(
                        "UPDATE deliveries SET state = 'waiting' WHERE state = 'paused' \
                         AND substr(order_key, 1, length(?1)) = ?1 \
                         AND NOT EXISTS (SELECT 1 FROM census_syncs WHERE id = ?2 AND paused = 1) RETURNING order_key",
                    )?
                    .query_map(rusqlite::params![prefix, sync_id], |r| r.get::<_, Option<String>>(0))?
                    .filter_map(Result::transpose)
                    .collect::<rusqlite::Result<_>>()?;
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                // The oldest row of each chain goes first: it was held in the chain's order.
                let promoted = promote_next(c, &refs, now, &self.lease)?;
                claim(&promoted);
                Ok(promoted)
            })
            .await
    }

    async fn paused_counts(&self) -> anyhow::Result<Vec<(i64, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT order_key, COUNT(*) FROM deliveries WHERE state = 'paused' AND order_key IS NOT NULL GROUP BY order_key",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut per: std::collections::BTreeMap<i64, i64> = Default::default();
        for (k, n) in rows {
            if let Some(id) = crate::syncs::sync_of_order_key(&k) {
                *per.entry(id).or_default() += n;
            }
        }
        Ok(per.into_iter().collect())
    }

    async fn queue_stats(&self) -> anyhow::Result<(i64, Option<i64>)> {
        let r = sqlx::query(&format!(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM deliveries WHERE {QUEUED}"
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok((r.get("n"), r.get("oldest")))
    }

    async fn purge_delivered(&self, before: i64, first_try_before: i64) -> anyhow::Result<u64> {
        let mut tx = self.writer.begin().await?;
        // One selection for both statements, so the attempts purged are those of the rows purged.
        let seqs: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, id FROM deliveries WHERE state = 'delivered' \
             AND (finished_at < ?1 OR (attempts <= 1 AND finished_at < ?2)) LIMIT 10000",
        )
        .bind(before)
        .bind(first_try_before)
        .fetch_all(&mut *tx)
        .await?;
        let mut purged = 0;
        for chunk in seqs.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!("DELETE FROM attempts WHERE delivery_id IN ({marks})");
            let mut del = sqlx::query(&sql);
            for (_, id) in chunk {
                del = del.bind(id);
            }
            del.execute(&mut *tx).await?;
            let sql = format!("DELETE FROM deliveries WHERE seq IN ({marks})");
            let mut del = sqlx::query(&sql);
            for (seq, _) in chunk {
                del = del.bind(seq);
            }
            purged += del.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(purged)
    }

    async fn purge_failed(&self, rows_before: i64, dead_letters_before: i64) -> anyhow::Result<u64> {
        let mut tx = self.writer.begin().await?;
        let dead_letters = sqlx::query(
            "DELETE FROM dead_letters WHERE seq IN \
             (SELECT seq FROM dead_letters WHERE created_at < ? LIMIT 10000)",
        )
        .bind(dead_letters_before)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // One selection for both statements, so the attempts purged are those of the rows purged.
        let seqs: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, id FROM deliveries WHERE state IN ('dead', 'dropped') AND finished_at < ? LIMIT 10000",
        )
        .bind(rows_before)
        .fetch_all(&mut *tx)
        .await?;
        let mut rows = 0;
        for chunk in seqs.chunks(IN_CHUNK) {
            let marks = placeholders(chunk.len());
            let sql = format!("DELETE FROM attempts WHERE delivery_id IN ({marks})");
            let mut del = sqlx::query(&sql);
            for (_, id) in chunk {
                del = del.bind(id);
            }
            del.execute(&mut *tx).await?;
            let sql = format!("DELETE FROM deliveries WHERE seq IN ({marks})");
            let mut del = sqlx::query(&sql);
            for (seq, _) in chunk {
                del = del.bind(seq);
            }
            rows += del.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(dead_letters + rows)
    }
}
