//! [`Queue`] on PostgreSQL: the `deliveries` table as a queue of chains (see `crate::store`).

use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use super::runs::decide_runs;
use super::{pg, placeholders, Lease, PgStore, INSERT_CHUNK, IN_CHUNK};
use crate::store::{
    chain_states, first_try_success, ready_now, requeue, sourced_ids, with_logged_attempts, without_recorded,
    AttemptRecord, Claim, Completed, Completion, Counting, Logged, NewDeadLetter, NewDelivery, Next, Queue,
    QueuedDelivery,
};

/// `INSERT INTO attempts ... VALUES ...` followed by this replaces an attempt recorded before
/// (SQLite's `INSERT OR REPLACE`).
const ATTEMPT_UPSERT: &str = " ON CONFLICT (delivery_id, n) DO UPDATE SET started_at = EXCLUDED.started_at, \
     duration_ms = EXCLUDED.duration_ms, status = EXCLUDED.status, error = EXCLUDED.error, \
     response_excerpt = EXCLUDED.response_excerpt";

/// A queued delivery's columns in `deliveries`. Its body is in `delivery_bodies` (written once,
/// see migrations/postgres/0008): a `SELECT` reads it with [`BODY`], an
/// `UPDATE … RETURNING` is a `WITH` whose outer `SELECT` looks it up the same way.
pub(super) const QUEUED_COLUMNS: &str = "seq, id, event_id, event, run_id, kind, webhook_id, target_url, target_key, \
     order_key, attempts, first_attempt_at, created_at, source";

/// A `deliveries` row's body, as a column of a `SELECT … FROM deliveries`: one lookup by
/// primary key for each row the query returns, never a plan that reads the bodies table (which
/// a join leaves to the planner's estimates).
pub(super) const BODY: &str = "(SELECT b.body FROM delivery_bodies b WHERE b.seq = deliveries.seq) AS body";

/// A queued delivery from a row of [`QUEUED_COLUMNS`] and `body`.
pub(super) fn queued_from_row(r: &PgRow) -> QueuedDelivery {
    QueuedDelivery {
        seq: r.get("seq"),
        id: r.get("id"),
        event_id: r.get("event_id"),
        event: r.get("event"),
        run_id: r.get("run_id"),
        kind: r.get("kind"),
        webhook_id: r.get("webhook_id"),
        target_url: r.get("target_url"),
        target_key: r.get("target_key"),
        order_key: r.get("order_key"),
        body: r.get("body"),
        attempts: r.get("attempts"),
        first_attempt_at: r.get("first_attempt_at"),
        created_at: r.get("created_at"),
        source: r.get("source"),
    }
}

pub(super) async fn insert_dead_letter(
    tx: &mut Transaction<'_, Postgres>,
    dl: &NewDeadLetter,
    now: i64,
) -> anyhow::Result<()> {
    sqlx::query(&pg(
        "INSERT INTO dead_letters (id, delivery_id, event_id, event, webhook_id, kind, reason, attempts, last_status, \
         last_error, raw, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    ))
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(&dl.delivery_id)
    .bind(&dl.event_id)
    .bind(&dl.event)
    .bind(&dl.webhook_id)
    .bind(dl.kind)
    .bind(dl.reason)
    .bind(dl.attempts)
    .bind(dl.last_status)
    .bind(&dl.last_error)
    .bind(&dl.raw)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The newest queued delivery (its seq) of each chain among `keys` that has one, the rows `own`
/// left out: a new row of such a chain waits behind it (a row with no chain never waits). One
/// backward index probe per key: it stops at the chain's newest live entry, where the dead
/// entries a chain's finished rows leave behind (see `promote_next`) are at its oldest end.
async fn newest_queued(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&str],
    own: &[i64],
) -> anyhow::Result<HashMap<String, i64>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT k, n FROM (SELECT k, (SELECT x.seq FROM deliveries x WHERE x.order_key = k \
         AND x.state IN ('ready', 'waiting', 'paused') AND x.seq <> ALL($2) ORDER BY x.seq DESC LIMIT 1) AS n \
         FROM unnest($1::text[]) AS k) AS t WHERE n IS NOT NULL",
    )
    .bind(keys)
    .bind(own)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The chains among `keys` that are a paused Census-style sync's (`s:<sync id>:<run>`): their new
/// rows are written `paused` (CONTRACT §3, Census syncs: paused).
pub(super) async fn paused_chains(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&str],
) -> anyhow::Result<HashSet<String>> {
    let ids: Vec<i64> = keys
        .iter()
        .filter_map(|k| crate::syncs::sync_of_order_key(k))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let mut paused = HashSet::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = format!(
            "SELECT id FROM census_syncs WHERE paused = 1 AND id IN ({})",
            placeholders(chunk.len())
        );
        let sql = pg(sql.as_str());
        let mut q = sqlx::query_scalar::<_, i64>(sql.as_str());
        for id in chunk {
            q = q.bind(*id);
        }
        paused.extend(q.fetch_all(&mut **tx).await?);
    }
    Ok(keys
        .iter()
        .filter(|k| crate::syncs::sync_of_order_key(k).is_some_and(|i| paused.contains(&i)))
        .map(|k| k.to_string())
        .collect())
}

/// Serialise writers of these chains until the transaction ends (a transaction-scoped advisory
/// lock per chain, taken in sorted order). Under READ COMMITTED, without it, a transaction
/// queueing a row behind a chain's head (it saw the head, so the row waits) and one finishing
/// that head (its promotion did not yet see the new row) can both commit, leaving the row
/// waiting behind nothing: the chain stalls. With it, whichever comes second sees the other's
/// rows. SQLite needs nothing: `BEGIN IMMEDIATE` serialises every writer.
pub(super) async fn lock_chains(tx: &mut Transaction<'_, Postgres>, keys: &[&str]) -> anyhow::Result<()> {
    lock_keys(tx, keys, 7).await
}

/// Serialise the transactions that queue new rows on these chains (`insert_deliveries`: the
/// intake, replays) from before they draw their rows' seqs until they end, so that such rows'
/// seqs are in the order their transactions commit, without making a chain's completions wait
/// for them (those take only `lock_chains`, which the writes take after their rows are written:
/// see `insert_new_deliveries`). Taken before any other lock of the transaction's, and never
/// after `lock_chains`: no transaction waits for one while it holds the other's.
async fn lock_intake(tx: &mut Transaction<'_, Postgres>, keys: &[&str]) -> anyhow::Result<()> {
    lock_keys(tx, keys, 8).await
}

/// A transaction-scoped advisory lock per key in this key space, taken in sorted order.
async fn lock_keys(tx: &mut Transaction<'_, Postgres>, keys: &[&str], space: i64) -> anyhow::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<&str> = keys.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    // unnest yields the array in order, so the locks are taken in sorted order (no deadlock
    // between two writers of overlapping chains).
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(k, $2)) FROM unnest($1::text[]) AS k")
        .bind(&sorted)
        .bind(space)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Write the bodies of deliveries just inserted, by the seqs their insert returned (`seqs`, by
/// delivery id), in one statement.
async fn insert_bodies<'a>(
    tx: &mut Transaction<'_, Postgres>,
    deliveries: impl Iterator<Item = &'a NewDelivery>,
    seqs: &HashMap<String, i64>,
) -> anyhow::Result<()> {
    let (mut rows, mut texts): (Vec<i64>, Vec<&str>) = (Vec::new(), Vec::new());
    for d in deliveries {
        let seq = seqs
            .get(&d.id)
            .ok_or_else(|| anyhow::anyhow!("delivery {} was not written", d.id))?;
        rows.push(*seq);
        texts.push(&d.body);
    }
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query("INSERT INTO delivery_bodies (seq, body) SELECT * FROM unnest($1::bigint[], $2::text[])")
        .bind(&rows)
        .bind(&texts)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Make the oldest queued row of each chain in `keys` ready (when it is still waiting: its
/// predecessor finished). Returns the rows promoted. The caller holds the chains' locks
/// (`lock_chains`; `complete` took them before its first statement).
///
/// Each chain's oldest row is found by an index scan that stops at the first live entry
/// (`ORDER BY seq LIMIT 1` per key), not by `MIN(seq) … GROUP BY` over all the keys: that was
/// planned as a bitmap heap scan, which visits the dead versions of every row the chain has
/// finished (each completion leaves one in the index) on every promotion and, unlike a plain
/// index scan, never marks them dead in the index, so a chain's promotions cost more the longer
/// it ran (the most expensive statement per row on PostgreSQL: 0.16 ms).
async fn promote_next(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&str],
    now: i64,
    lease: &Lease,
) -> anyhow::Result<Vec<QueuedDelivery>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // The heads go to the update as one array (`seq = ANY(ARRAY(…))`, computed once before the
    // update reads a row), so each row is found by its primary key and each chain probed once.
    // As `seq IN (SELECT …)` the plan depended on the table's statistics at the time: a nested
    // loop that probed each chain three times (hash aggregate, memoize key, index condition), or,
    // in 24 of 133 promotions of the PostgreSQL benchmark (`auto_explain`), a hash semi-join
    // over a bitmap scan of every queued row. The state test is written so that no partial
    // index's predicate follows from it (see `complete`).
    let sql = format!(
        "WITH promoted AS (UPDATE deliveries SET state = 'ready', next_attempt_at = $1, lease_owner = $2, \
         lease_until = $3 WHERE seq = ANY(ARRAY(SELECT (SELECT x.seq FROM deliveries x \
         WHERE x.order_key = k AND x.state IN ('ready', 'waiting', 'paused') ORDER BY x.seq LIMIT 1) \
         FROM unnest($4::text[]) AS k)) AND (state = 'waiting') IS TRUE RETURNING {QUEUED_COLUMNS}) \
         SELECT promoted.*, (SELECT b.body FROM delivery_bodies b WHERE b.seq = promoted.seq) AS body FROM promoted"
    );
    let rows = sqlx::query(&sql)
        .bind(now)
        .bind(&lease.owner)
        .bind(now + lease.ms)
        .bind(keys)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.iter().map(queued_from_row).collect())
}

/// Insert deliveries (see [`insert_new_deliveries`]), leaving out those made from a Kafka
/// message whose id the store already has: the message was read again after a crash and the
/// delivery was queued (or finished) the first time.
pub(super) async fn insert_deliveries(
    tx: &mut Transaction<'_, Postgres>,
    deliveries: &[NewDelivery],
    now: i64,
    held: &HashSet<String>,
    lease: &Lease,
) -> anyhow::Result<Vec<QueuedDelivery>> {
    let keys: Vec<&str> = deliveries.iter().filter_map(|d| d.order_key.as_deref()).collect();
    lock_intake(tx, &keys).await?;
    let recorded = recorded_ids(tx, &sourced_ids(deliveries)).await?;
    insert_new_deliveries(tx, &without_recorded(deliveries, &recorded), now, held, lease).await
}

/// Insert deliveries in the order given. The first row of a chain that has nothing queued is
/// ready; every later one waits; a row whose chain is in `held` waits even when it is the first
/// (its chain's head is kept in memory). Returns the rows that are ready now.
///
/// The rows are written before their chains are locked, in the states the store's committed
/// rows suggest then; under the locks (`lock_chains`) the states are decided again. The rows'
/// write is most of the transaction's time (20 – 60 ms for 500 events): with the locks taken
/// first, a completion of any of those chains waited that long, and while the embedded
/// benchmark's events were `POST`ed, completions ran at 2,800 rows a second against 10,100
/// after (docs/BENCHMARKS.md, eighth session). Under the locks:
/// - a row whose state a transaction that finished or queued on its chain meanwhile changed
///   (the head it was to wait behind finished; a new head came first) is corrected;
/// - a chain's seqs must follow the order its rows were queued in (its next row is its oldest
///   queued one by seq, and two writes' rows must not interleave). Writes through
///   `insert_deliveries` hold their chains' intake locks (`lock_intake`) from before they draw
///   seqs, so they never overtake one another; a write that queues rows under the chains' locks
///   alone (`record`'s parked rows) may draw its seqs after ours and commit first. When one did
///   (a queued row of one of our chains, not ours, has a newer seq than our oldest there), our
///   rows are written again, now under the locks.
async fn insert_new_deliveries(
    tx: &mut Transaction<'_, Postgres>,
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
    let decide = |newest: &HashMap<String, i64>, paused: &HashSet<String>| {
        let busy = newest.keys().chain(held.iter()).cloned().collect();
        chain_states(deliveries, busy, paused)
    };
    let guessed = decide(&newest_queued(tx, &keys, &[]).await?, &paused_chains(tx, &keys).await?);
    let mut seqs = write_rows(tx, deliveries, &guessed, now, lease).await?;
    lock_chains(tx, &keys).await?;
    let own: Vec<i64> = seqs.values().copied().collect();
    let newest = newest_queued(tx, &keys, &own).await?;
    let states = decide(&newest, &paused_chains(tx, &keys).await?);
    // Our oldest seq in each chain.
    let mut oldest: HashMap<&str, i64> = HashMap::new();
    for d in deliveries {
        if let (Some(k), Some(seq)) = (d.order_key.as_deref(), seqs.get(&d.id)) {
            let o = oldest.entry(k).or_insert(*seq);
            *o = (*o).min(*seq);
        }
    }
    let overtaken = newest
        .iter()
        .any(|(k, n)| oldest.get(k.as_str()).is_some_and(|o| n > o));
    if overtaken {
        // Their bodies go with them (the `deliveries_bodies_gone` trigger).
        sqlx::query("DELETE FROM deliveries WHERE seq = ANY($1)")
            .bind(&own)
            .execute(&mut **tx)
            .await?;
        seqs = write_rows(tx, deliveries, &states, now, lease).await?;
    } else {
        let changed: Vec<(i64, &str)> = deliveries
            .iter()
            .zip(guessed.iter().zip(&states))
            .filter(|(_, (g, s))| g != s)
            .filter_map(|(d, (_, s))| Some((*seqs.get(&d.id)?, *s)))
            .collect();
        if !changed.is_empty() {
            let (rows, new): (Vec<i64>, Vec<&str>) = changed.into_iter().unzip();
            sqlx::query(
                "UPDATE deliveries SET state = v.state, \
                 lease_owner = CASE WHEN v.state = 'ready' THEN $3 END, \
                 lease_until = CASE WHEN v.state = 'ready' THEN $4::bigint END \
                 FROM unnest($1::bigint[], $2::text[]) AS v (seq, state) WHERE deliveries.seq = v.seq",
            )
            .bind(&rows)
            .bind(&new)
            .bind(&lease.owner)
            .bind(now + lease.ms)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(ready_now(deliveries, &states, &seqs, now))
}

/// Write these deliveries' rows in the states given, and their bodies. Returns their seqs by
/// delivery id.
async fn write_rows(
    tx: &mut Transaction<'_, Postgres>,
    deliveries: &[NewDelivery],
    states: &[&'static str],
    now: i64,
    lease: &Lease,
) -> anyhow::Result<HashMap<String, i64>> {
    let rows: Vec<RowWrite> = deliveries
        .iter()
        .zip(states)
        .map(|(d, state)| RowWrite {
            d,
            state,
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at.unwrap_or(now),
            finished_at: None,
            // A ready row is this instance's (handed to its claim, or parked by it).
            lease: (*state == "ready").then_some((lease.owner.as_str(), now + lease.ms)),
        })
        .collect();
    insert_rows(tx, &rows).await
}

/// How one delivery's row is written: the delivery, and the queue columns its state sets.
struct RowWrite<'a> {
    d: &'a NewDelivery,
    state: &'static str,
    attempts: i64,
    next_attempt_at: i64,
    /// Set for a finished row, which keeps its last attempt's duration and response excerpt on
    /// the row too (`store::first_try_success`); a queued row keeps only its last attempt's
    /// status and error there, its full log being in `attempts` (`insert_attempt_logs`).
    finished_at: Option<i64>,
    /// (owner, until)
    lease: Option<(&'a str, i64)>,
}

/// Insert delivery rows and their bodies, in the order given (a chain's order: `unnest` yields
/// the arrays in order, so the rows draw their seqs in it). Returns their seqs by delivery id.
///
/// The rows go as arrays, one parameter a column (see `complete`): one statement text whatever
/// the batch's size, prepared once per connection, and 22 parameters to bind and send instead
/// of 19 or 20 a row. As a `VALUES` list the intake's write took 27 ms a `POST` of 500 events in
/// the PostgreSQL benchmark, 18 ms this way (docs/BENCHMARKS.md, seventeenth session), and the
/// Kafka log's rounds, whose size varies, each had a statement text of its own to prepare.
async fn insert_rows(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[RowWrite<'_>],
) -> anyhow::Result<HashMap<String, i64>> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let text = |f: fn(&NewDelivery) -> Option<&str>| rows.iter().map(|r| f(r.d)).collect::<Vec<_>>();
    let lasts: Vec<Option<&AttemptRecord>> = rows.iter().map(|r| r.d.log.last()).collect();
    let measured: Vec<Option<&AttemptRecord>> = rows
        .iter()
        .zip(&lasts)
        .map(|(r, last)| last.filter(|_| r.finished_at.is_some()))
        .collect();
    let seqs = sqlx::query(
        "INSERT INTO deliveries (id, event_id, event, run_id, kind, webhook_id, target_url, target_key, \
         order_key, state, attempts, next_attempt_at, first_attempt_at, created_at, source, last_status, \
         last_error, last_duration_ms, last_excerpt, finished_at, lease_owner, lease_until) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[], $12::bigint[], $13::bigint[], \
         $14::bigint[], $15::text[], $16::bigint[], $17::text[], $18::bigint[], $19::text[], $20::bigint[], \
         $21::text[], $22::bigint[]) RETURNING seq, id",
    )
    .bind(text(|d| Some(d.id.as_str())))
    .bind(text(|d| Some(d.event_id.as_str())))
    .bind(text(|d| Some(d.event.as_str())))
    .bind(text(|d| d.run_id.as_deref()))
    .bind(text(|d| Some(d.kind)))
    .bind(text(|d| d.webhook_id.as_deref()))
    .bind(text(|d| d.target_url.as_deref()))
    .bind(text(|d| Some(d.target_key.as_str())))
    .bind(text(|d| d.order_key.as_deref()))
    .bind(rows.iter().map(|r| r.state).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.attempts).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.next_attempt_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.d.first_attempt_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.d.created_at).collect::<Vec<_>>())
    .bind(text(|d| d.source.as_deref()))
    .bind(lasts.iter().map(|a| a.and_then(|a| a.status)).collect::<Vec<_>>())
    .bind(
        lasts
            .iter()
            .map(|a| a.and_then(|a| a.error.as_deref()))
            .collect::<Vec<_>>(),
    )
    .bind(measured.iter().map(|a| a.map(|a| a.duration_ms)).collect::<Vec<_>>())
    .bind(
        measured
            .iter()
            .map(|a| a.and_then(|a| a.excerpt.as_deref()))
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.lease.map(|l| l.0)).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.lease.map(|l| l.1)).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?
    .iter()
    .map(|r| (r.get("id"), r.get("seq")))
    .collect();
    insert_bodies(tx, rows.iter().map(|r| r.d), &seqs).await?;
    Ok(seqs)
}

/// The attempt log of deliveries that were attempted in memory before their row was written.
async fn insert_attempt_logs<'a>(
    tx: &mut Transaction<'_, Postgres>,
    rows: impl Iterator<Item = &'a NewDelivery>,
) -> anyhow::Result<()> {
    let items: Vec<(&str, i64, &AttemptRecord)> = rows
        .flat_map(|d| {
            d.log
                .iter()
                .enumerate()
                .map(move |(i, a)| (d.id.as_str(), i as i64 + 1, a))
        })
        .collect();
    for chunk in items.chunks(INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO attempts (delivery_id, n, started_at, duration_ms, status, error, response_excerpt) VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
        sql.push_str(ATTEMPT_UPSERT);
        let sql = pg(sql.as_str());
        let mut q = sqlx::query(sql.as_str());
        for (id, n, a) in chunk {
            q = q
                .bind(*id)
                .bind(*n)
                .bind(a.started_at)
                .bind(a.duration_ms)
                .bind(a.status)
                .bind(&a.error)
                .bind(&a.excerpt);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Which of these delivery ids the store already has (one statement: the ids go as one array
/// parameter).
async fn recorded_ids(tx: &mut Transaction<'_, Postgres>, ids: &[&str]) -> anyhow::Result<HashSet<String>> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(sqlx::query_scalar("SELECT id FROM deliveries WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect())
}

/// Take the waiting rows of a chain out of the queue (to be written again behind rows that
/// must go first), oldest first. Their attempt logs, keyed by delivery id, stay.
async fn take_waiting(tx: &mut Transaction<'_, Postgres>, key: &str) -> anyhow::Result<Vec<NewDelivery>> {
    // Read with their bodies first: the delete takes the bodies with the rows.
    let rows = sqlx::query(&pg(&format!(
        "SELECT {QUEUED_COLUMNS}, {BODY} FROM deliveries \
         WHERE order_key = ? AND state = 'waiting'"
    )))
    .bind(key)
    .fetch_all(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM deliveries WHERE order_key = $1 AND state = 'waiting'")
        .bind(key)
        .execute(&mut **tx)
        .await?;
    let mut out: Vec<QueuedDelivery> = rows.iter().map(queued_from_row).collect();
    out.sort_by_key(|q| q.seq);
    Ok(out.into_iter().map(requeue).collect())
}

#[async_trait]
impl Queue for PgStore {
    async fn enqueue_claiming(
        &self,
        deliveries: &[NewDelivery],
        dead: &[NewDeadLetter],
        now: i64,
        held: &HashSet<String>,
        claim: Claim<'_>,
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut tx = self.pool.begin().await?;
        let ready = insert_deliveries(&mut tx, deliveries, now, held, &self.lease).await?;
        for dl in dead {
            insert_dead_letter(&mut tx, dl, now).await?;
        }
        claim(&ready);
        tx.commit().await?;
        Ok(ready)
    }

    async fn promote(&self, keys: &[String], now: i64, claim: Claim<'_>) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut tx = self.pool.begin().await?;
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        lock_chains(&mut tx, &keys).await?;
        let promoted = promote_next(&mut tx, &keys, now, &self.lease).await?;
        claim(&promoted);
        tx.commit().await?;
        Ok(promoted)
    }

    async fn record(
        &self,
        logged: &[Logged],
        parked: &[(Vec<NewDelivery>, bool)],
        dead: &[NewDeadLetter],
        now: i64,
        counting: Option<Counting<'_>>,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        // Deliveries recorded before (their Kafka message was read again after a crash: the
        // same message makes the same delivery ids) stay as they are, with their attempts and
        // dead letters, counted once.
        let ids: Vec<&str> = logged
            .iter()
            .map(|l| l.delivery.id.as_str())
            .chain(parked.iter().flat_map(|(rows, _)| rows.iter().map(|d| d.id.as_str())))
            .collect();
        let recorded = recorded_ids(&mut tx, &ids).await?;
        let logged: Vec<&Logged> = logged.iter().filter(|l| !recorded.contains(&l.delivery.id)).collect();
        let rows: Vec<RowWrite> = logged
            .iter()
            .map(|l| RowWrite {
                d: &l.delivery,
                state: l.state,
                attempts: l.delivery.log.len() as i64,
                next_attempt_at: now,
                finished_at: Some(now),
                lease: None,
            })
            .collect();
        insert_rows(&mut tx, &rows).await?;
        // A first-try success keeps its attempt on its row (written above).
        insert_attempt_logs(&mut tx, with_logged_attempts(&logged)).await?;
        // Every chain parked to, at once and in order (each group locks its own again: a no-op).
        let keys: Vec<&str> = parked
            .iter()
            .flat_map(|(rows, _)| rows.iter().filter_map(|d| d.order_key.as_deref()))
            .collect();
        lock_chains(&mut tx, &keys).await?;
        for (rows, ahead) in parked {
            let rows = without_recorded(rows, &recorded);
            if rows.is_empty() {
                continue;
            }
            let key = rows.first().and_then(|d| d.order_key.clone());
            // Rows held behind the in-memory part of this chain: taken out and written again
            // after the parked ones, so the chain keeps the order its events came in.
            let held = match (&key, ahead) {
                (Some(k), true) => take_waiting(&mut tx, k).await?,
                _ => Vec::new(),
            };
            // Checked against the store above; the held rows were just taken out of it.
            insert_new_deliveries(&mut tx, &rows, now, &HashSet::new(), &self.lease).await?;
            if !held.is_empty() {
                let keep: HashSet<String> = key.into_iter().collect();
                insert_new_deliveries(&mut tx, &held, now, &keep, &self.lease).await?;
            }
            insert_attempt_logs(&mut tx, rows.iter()).await?;
        }
        for dl in dead {
            if dl.delivery_id.as_ref().is_some_and(|id| recorded.contains(id)) {
                continue;
            }
            insert_dead_letter(&mut tx, dl, now).await?;
        }
        // Run rows are locked after the chains (lock order: chains, then runs by id).
        if let Some(c) = counting {
            decide_runs(&mut tx, &c.run_ids, |locked| (c.count)(&recorded, locked)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due(&self, now: i64, limit: i64, skip_targets: &[String]) -> anyhow::Result<Vec<QueuedDelivery>> {
        // Claimed in one statement: ready rows that are due and not leased to another instance
        // (or whose lease expired), locked with SKIP LOCKED so instances polling together take
        // different rows, then leased to this instance.
        let mut sql = String::from(
            "WITH claimed AS (UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE seq IN (SELECT seq FROM deliveries \
             WHERE state = 'ready' AND next_attempt_at <= ? \
             AND (lease_owner IS NULL OR lease_owner = ? OR lease_until <= ?)",
        );
        if !skip_targets.is_empty() {
            sql.push_str(&format!(
                " AND target_key NOT IN ({})",
                placeholders(skip_targets.len())
            ));
        }
        sql.push_str(&format!(
            " ORDER BY next_attempt_at, seq LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING next_attempt_at, {QUEUED_COLUMNS}) \
             SELECT claimed.*, (SELECT b.body FROM delivery_bodies b WHERE b.seq = claimed.seq) AS body FROM claimed"
        ));
        let sql = pg(&sql);
        let mut q = sqlx::query(sql.as_str())
            .bind(&self.lease.owner)
            .bind(now + self.lease.ms)
            .bind(now)
            .bind(&self.lease.owner)
            .bind(now);
        for t in skip_targets {
            q = q.bind(t);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        // RETURNING keeps no order: oldest due first, as asked.
        let mut out: Vec<(i64, QueuedDelivery)> = rows
            .iter()
            .map(|r| (r.get::<i64, _>("next_attempt_at"), queued_from_row(r)))
            .collect();
        out.sort_by_key(|(at, q)| (*at, q.seq));
        Ok(out.into_iter().map(|(_, q)| q).collect())
    }

    async fn has_active(&self, order_key: &str) -> anyhow::Result<bool> {
        Ok(sqlx::query_scalar::<_, bool>(&pg(
            "SELECT EXISTS(SELECT 1 FROM deliveries WHERE order_key = ? AND state IN ('ready', 'waiting', 'paused'))",
        ))
        .bind(order_key)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn active_order_keys(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(&pg(
            "SELECT DISTINCT order_key FROM deliveries WHERE state IN ('ready', 'waiting', 'paused') AND order_key IS NOT NULL",
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn next_due_after(&self, now: i64) -> anyhow::Result<Option<i64>> {
        Ok(sqlx::query_scalar(&pg(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'ready' AND next_attempt_at > ?",
        ))
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
        let mut tx = self.pool.begin().await?;
        // The chains first (see `lock_chains`), all at once, before any row lock.
        let keys: Vec<&str> = batch.iter().filter_map(|c| c.order_key.as_deref()).collect();
        lock_chains(&mut tx, &keys).await?;
        // First the rows, each only while this instance holds its lease and it is still ready
        // (the row lock this takes also waits out another instance's claim of it in flight);
        // everything else of a completion follows only for the rows this answers.
        let mut held = HashSet::new();
        for chunk in batch.chunks(INSERT_CHUNK) {
            // The rows as arrays, one parameter a column: the statement's text is the same
            // whatever the batch's size, so each connection prepares it once. As a `VALUES`
            // list it was a new text for every size a batch happened to have, and the
            // connections' statement caches (100 each) kept preparing and planning them again:
            // 7,265 – 7,446 events/s on the PostgreSQL benchmark against 8,071 – 8,537 now
            // (docs/BENCHMARKS.md, eighth session).
            //
            // The state test is written so that no partial index's predicate follows from it:
            // the plan is then the list, each row found by its primary key. With
            // `state = 'ready'` the generic plan a prepared statement gets after five runs
            // (made while the table was small) could read a partial index whole instead,
            // `deliveries_run` (dropped since) or `deliveries_due`, with the dead entry every
            // finished row leaves there until vacuum, and join the list to that: 0.30 ms a row against 0.02
            // (`EXPLAIN ANALYZE` of both plans; the statement took 2.5 x as long over the
            // embedded benchmark once the rows were small, with bodies apart).
            let states: Vec<(&str, i64, Option<i64>)> = chunk.iter().map(|c| c.row_state(now)).collect();
            let rows = sqlx::query_scalar::<_, i64>(
                "UPDATE deliveries SET state = v.state, attempts = v.attempts, next_attempt_at = v.next_at, \
                 first_attempt_at = v.first_at, last_status = v.status, last_error = v.error, finished_at = v.finished, \
                 last_duration_ms = v.duration, last_excerpt = v.excerpt, \
                 lease_owner = NULL, lease_until = NULL FROM unnest($1::bigint[], $2::text[], $3::bigint[], \
                 $4::bigint[], $5::bigint[], $6::bigint[], $7::text[], $8::bigint[], $9::bigint[], $10::text[]) \
                 AS v (seq, state, attempts, next_at, first_at, status, error, finished, duration, excerpt) \
                 WHERE deliveries.seq = v.seq AND (deliveries.state = 'ready') IS TRUE \
                 AND deliveries.lease_owner = $11 RETURNING deliveries.seq",
            )
            .bind(chunk.iter().map(|c| c.seq).collect::<Vec<_>>())
            .bind(states.iter().map(|s| s.0).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.attempt_no).collect::<Vec<_>>())
            .bind(states.iter().map(|s| s.1).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.first_attempt_at).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.attempt.status).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.attempt.error.as_deref()).collect::<Vec<_>>())
            .bind(states.iter().map(|s| s.2).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.attempt.duration_ms).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.attempt.excerpt.as_deref()).collect::<Vec<_>>())
            .bind(&self.lease.owner)
            .fetch_all(&mut *tx)
            .await?;
            held.extend(rows);
        }
        let applied: Vec<&Completion> = batch.iter().filter(|c| held.contains(&c.seq)).collect();
        // The few completions that sent another body than the queued one (see `Completion::body`).
        for c in &applied {
            if let Some(body) = &c.body {
                sqlx::query("UPDATE delivery_bodies SET body = $1 WHERE seq = $2")
                    .bind(body)
                    .bind(c.seq)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // A first-try success keeps its attempt on its row (written above).
        let logged_attempts: Vec<&Completion> = applied
            .iter()
            .copied()
            .filter(|c| !first_try_success(c.attempt_no, matches!(c.next, Next::Delivered)))
            .collect();
        for chunk in logged_attempts.chunks(INSERT_CHUNK) {
            let mut sql = String::from(
                "INSERT INTO attempts (delivery_id, n, started_at, duration_ms, status, error, response_excerpt) VALUES ",
            );
            sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
            sql.push_str(ATTEMPT_UPSERT);
            let sql = pg(sql.as_str());
            let mut q = sqlx::query(sql.as_str());
            for c in chunk {
                q = q
                    .bind(&c.delivery_id)
                    .bind(c.attempt_no)
                    .bind(c.attempt.started_at)
                    .bind(c.attempt.duration_ms)
                    .bind(c.attempt.status)
                    .bind(&c.attempt.error)
                    .bind(&c.attempt.excerpt);
            }
            q.execute(&mut *tx).await?;
        }
        for c in &applied {
            if let Next::Dead(dl) = &c.next {
                insert_dead_letter(&mut tx, dl, now).await?;
            }
        }
        let finished: Vec<&str> = applied
            .iter()
            .filter(|c| !matches!(c.next, Next::Retry { .. }))
            .filter_map(|c| c.order_key.as_deref())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let promoted = promote_next(&mut tx, &finished, now, &self.lease).await?;
        // Run rows are locked after the chains (lock order: chains, then runs by id).
        if let Some(c) = counting {
            decide_runs(&mut tx, &c.run_ids, |locked| {
                let lost: HashSet<String> = batch
                    .iter()
                    .filter(|c| !held.contains(&c.seq))
                    .map(|c| c.delivery_id.clone())
                    .collect();
                (c.count)(&lost, locked)
            })
            .await?;
        }
        claim(&promoted);
        tx.commit().await?;
        Ok(Completed {
            promoted,
            lost: batch.iter().map(|c| c.seq).filter(|s| !held.contains(s)).collect(),
        })
    }

    async fn renew(&self, seqs: &[i64], now: i64) -> anyhow::Result<Vec<i64>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        // One statement, however many rows: the seqs go as one array parameter.
        Ok(sqlx::query_scalar(
            "UPDATE deliveries SET lease_until = $1 WHERE seq = ANY($2) AND lease_owner = $3 AND state = 'ready' \
             RETURNING seq",
        )
        .bind(now + self.lease.ms)
        .bind(seqs)
        .bind(&self.lease.owner)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn dead_letter_queued(&self, q: &QueuedDelivery, dl: &NewDeadLetter, now: i64) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await?;
        // The chain before the row, in the order `complete` takes them.
        lock_chains(&mut tx, &q.order_key.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        let n = sqlx::query(&pg(
            "UPDATE deliveries SET state = 'dead', finished_at = ?, last_error = ?, lease_owner = NULL, \
             lease_until = NULL WHERE seq = ? AND state = 'ready' AND lease_owner = ?",
        ))
        .bind(now)
        .bind(dl.reason)
        .bind(q.seq)
        .bind(&self.lease.owner)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        insert_dead_letter(&mut tx, dl, now).await?;
        if let Some(k) = &q.order_key {
            promote_next(&mut tx, &[k.as_str()], now, &self.lease).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn drop_queued_for_run(
        &self,
        run_id: &str,
        keep: &[i64],
        now: i64,
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        let mut tx = self.pool.begin().await?;
        // Through the chain index (its predicate is the `IN` term): the queued rows, the run's
        // among them. A run's rows have no index of their own (migrations/postgres/0009): it
        // was written twice for every row and read only here.
        let rows = sqlx::query(&pg(&format!(
            "SELECT seq, kind, event, {BODY} FROM deliveries \
                 WHERE run_id = ? AND state IN ('ready', 'waiting', 'paused') ORDER BY seq"
        )))
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let seq: i64 = r.get("seq");
            if keep.contains(&seq) {
                continue;
            }
            sqlx::query(&pg(
                "UPDATE deliveries SET state = 'dropped', finished_at = ?, last_error = 'run_stopped' WHERE seq = ?",
            ))
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
        // The `IN` term is the chain index's condition, so the scan is of queued rows only.
        let prefix = crate::syncs::order_key_prefix(sync_id);
        Ok(sqlx::query(&pg("UPDATE deliveries SET state = 'paused' WHERE state IN ('ready', 'waiting', 'paused') AND state = 'waiting' AND substr(order_key, 1, length(?)) = ? AND EXISTS (SELECT 1 FROM census_syncs WHERE id = ? AND paused = 1)"))
        .bind(&prefix)
        .bind(&prefix)
        .bind(sync_id)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn release_paused(&self, sync_id: i64, now: i64, claim: Claim<'_>) -> anyhow::Result<Vec<QueuedDelivery>> {
        let prefix = crate::syncs::order_key_prefix(sync_id);
        let mut tx = self.pool.begin().await?;
        let keys: Vec<Option<String>> = sqlx::query_scalar(&pg("UPDATE deliveries SET state = 'waiting' WHERE state = 'paused' AND substr(order_key, 1, length(?)) = ? AND NOT EXISTS (SELECT 1 FROM census_syncs WHERE id = ? AND paused = 1) RETURNING order_key"))
        .bind(&prefix)
        .bind(&prefix)
        .bind(sync_id)
        .fetch_all(&mut *tx)
        .await?;
        let keys: BTreeSet<String> = keys.into_iter().flatten().collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        lock_chains(&mut tx, &refs).await?;
        // The oldest row of each chain goes first: it was held in the chain's order.
        let promoted = promote_next(&mut tx, &refs, now, &self.lease).await?;
        claim(&promoted);
        tx.commit().await?;
        Ok(promoted)
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
        let r = sqlx::query(&pg(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM deliveries WHERE state IN ('ready', 'waiting', 'paused')",
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok((r.get("n"), r.get("oldest")))
    }

    async fn purge_delivered(&self, before: i64, first_try_before: i64) -> anyhow::Result<u64> {
        // One statement: the rows (a bounded number) and their attempts, chosen once.
        let n: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM deliveries WHERE seq IN (SELECT seq FROM deliveries \
             WHERE state = 'delivered' AND (finished_at < $1 OR (attempts <= 1 AND finished_at < $2)) \
             LIMIT 10000) RETURNING id), \
             attempts_gone AS (DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM gone)) \
             SELECT COUNT(*) FROM gone",
        )
        .bind(before)
        .bind(first_try_before)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    async fn purge_failed(&self, rows_before: i64, dead_letters_before: i64) -> anyhow::Result<u64> {
        // One statement: the dead letters, the rows (bounded numbers) and the rows' attempts.
        let n: i64 = sqlx::query_scalar(
            "WITH dl_gone AS (DELETE FROM dead_letters WHERE seq IN (SELECT seq FROM dead_letters \
             WHERE created_at < $2 LIMIT 10000) RETURNING 1), \
             gone AS (DELETE FROM deliveries WHERE seq IN (SELECT seq FROM deliveries \
             WHERE state IN ('dead', 'dropped') AND finished_at < $1 LIMIT 10000) RETURNING id), \
             attempts_gone AS (DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM gone)) \
             SELECT (SELECT COUNT(*) FROM gone) + (SELECT COUNT(*) FROM dl_gone)",
        )
        .bind(rows_before)
        .bind(dead_letters_before)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }
}
