//! Group commit: every write of this process goes through one lock, and the writes that come
//! while a commit is on its way to the disk share the next one.
//!
//! SQLite has one writer at a time. With a transaction per caller on connections of a pool, the
//! intake's inserts and the delivery writer's completions took turns through SQLite's busy
//! handler, which *sleeps* (1, 2, 5, 10 … ms) until the lock is free: the process waited with
//! idle cores, and every small transaction paid its own commit (a WAL write of every page it
//! touched, and an fsync with `store.synchronous = full`).
//!
//! Here a caller takes the write lock (a FIFO lock, so nobody waits by sleeping) and runs its
//! statements ([`Writer::write`]) inside a savepoint of the transaction that is open on the
//! group connection (or in a transaction opened for it when none is), then gives the lock back.
//! A committer task commits the open transaction as soon as it gets the lock; callers that
//! queued for the lock while it waited or committed join the next transaction. A caller's
//! `write` returns only when the transaction holding its writes is committed (durable as
//! `store.synchronous` says), so what the code above the store sees is unchanged: a write is
//! committed when its call returns, or failed.
//!
//! The group connection is driven synchronously (rusqlite), on the caller's thread, while the
//! caller holds the lock: a caller's statements go straight to SQLite. Through an async driver
//! each statement was a round trip to the connection's worker thread and back to a task of the
//! runtime: two thread wake-ups per statement, half of the runtime's context switches in the
//! Kafka benchmark, and most of a lone caller's turn (docs/BENCHMARKS.md, seventh session).
//! A turn is short (one batched statement per step), so the runtime thread it blocks is blocked
//! for about as long as it waited for the worker thread before.
//!
//! Writes off the hot paths (webhooks, jobs, runs created through the API, purges, lease
//! renewals) are sqlx code; they run through [`Writer::begin`] on a second connection, each in a
//! transaction of its own, under the same lock: the group transaction is committed first, so
//! the two connections never hold SQLite's write lock at once.
//!
//! Failure stays per caller where SQLite allows it: a caller whose statements fail is rolled
//! back to its savepoint (or its transaction, when it opened it), leaving the others' writes in
//! place. That is also what makes a caller's statements atomic, so the batched ones are written
//! `OR FAIL` (`store::sqlite::queue`): a statement that changes many rows and may abort would
//! otherwise open a statement journal, which copies every page it changes first (see [`turn`]).
//! A failed `COMMIT`, or SQLite rolling the whole transaction back on its own (I/O error, disk
//! full), fails every caller of that transaction.
//!
//! Reads do not come here: they use the pool's other connections and see committed data (WAL).

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Weak};

use anyhow::anyhow;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::ConnectOptions;
use tokio::sync::{watch, Mutex, Notify, OwnedMutexGuard};

/// Failed transactions remembered for callers still to look (each caller looks right after its
/// transaction ends, so a handful is plenty).
const FAILURES_KEPT: usize = 64;

/// The write side of a SQLite store: the group connection and the connection of the sqlx
/// writes, behind one lock.
pub(super) struct Writer {
    shared: Arc<Shared>,
    /// Wakes the committer; outside `Shared` so the committer can wait without keeping the
    /// writer alive.
    wake: Arc<Notify>,
}

struct Shared {
    conn: Arc<Mutex<Conn>>,
    ended: watch::Sender<Ended>,
}

struct Conn {
    /// The group connection. None (with `c`) once the store is closed.
    g: Option<rusqlite::Connection>,
    /// The connection of the sqlx writes ([`Writer::begin`]).
    c: Option<SqliteConnection>,
    /// A group transaction is open on `g`.
    open: bool,
    /// The number of the open group transaction (or of the next one).
    generation: u64,
    /// A transaction of `c` was left open by a caller that neither committed nor failed
    /// (dropped midway: a cancelled request).
    dangling: bool,
}

/// Transactions ended so far, and which of them failed.
#[derive(Default)]
struct Ended {
    /// Every transaction numbered below this one has ended.
    below: u64,
    failed: VecDeque<(u64, Arc<str>)>,
}

impl Writer {
    /// Take the group connection `g` and open the sqlx writes' connection (with the pool's
    /// options: WAL, `synchronous`, busy timeout); start the committer.
    pub(super) async fn open(opts: &SqliteConnectOptions, g: rusqlite::Connection) -> anyhow::Result<Writer> {
        let c = opts.connect().await?;
        g.set_prepared_statement_cache_capacity(STATEMENTS_KEPT);
        let shared = Arc::new(Shared {
            conn: Arc::new(Mutex::new(Conn {
                g: Some(g),
                c: Some(c),
                open: false,
                generation: 0,
                dangling: false,
            })),
            ended: watch::Sender::new(Ended::default()),
        });
        let wake = Arc::new(Notify::new());
        tokio::spawn(committer(Arc::downgrade(&shared), wake.clone()));
        Ok(Writer { shared, wake })
    }

    /// Run `f`'s statements on the group connection, in a savepoint of the open transaction
    /// (or a transaction of its own), and wait until that transaction is committed. Waits for
    /// the lock behind the callers before it, never by sleeping. An error (of `f`, or of the
    /// commit) means none of `f`'s writes are kept.
    pub(super) async fn write<R>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut g = self.shared.conn.clone().lock_owned().await;
        settle(&mut g).await;
        let out = match turn(&mut g, f) {
            Ok((out, false)) => {
                // Nothing written (a decision that changed nothing): nothing to wait for. The
                // committer still ends the transaction, which may have been opened for it.
                drop(g);
                self.wake.notify_one();
                return Ok(out);
            }
            Ok((out, true)) => out,
            Err(Turn::Failed(e)) => {
                // The transaction may have been opened for this caller: the committer ends it,
                // so it does not hold SQLite's write lock until the next writer comes.
                drop(g);
                self.wake.notify_one();
                return Err(e);
            }
            Err(Turn::Broken(e)) => {
                // The transaction may be gone with it: end it (failing nobody else's writes but
                // those SQLite already dropped) rather than leave it open.
                fail_open(&mut g, &self.shared, &e.to_string());
                return Err(e);
            }
        };
        let mine = g.generation;
        drop(g);
        self.wake.notify_one();
        let mut ended = self.shared.ended.subscribe();
        let ended = ended
            .wait_for(|e| e.below > mine)
            .await
            .map_err(|_| anyhow!("the store was closed before the write was committed"))?;
        match ended.failed.iter().find(|(n, _)| *n == mine) {
            Some((_, why)) => Err(anyhow!("committing the store's transaction failed: {why}")),
            None => Ok(out),
        }
    }

    /// Take the lock for a transaction of sqlx statements of its own (on the second
    /// connection; the group transaction is committed first). `commit` ends it.
    pub(super) async fn begin(&self) -> anyhow::Result<WriteTx> {
        let mut g = self.shared.conn.clone().lock_owned().await;
        settle(&mut g).await;
        commit_open(&mut g, &self.shared);
        let Some(c) = g.c.as_mut() else {
            return Err(anyhow!("the store is closed"));
        };
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *c).await?;
        Ok(WriteTx {
            guard: Some(g),
            wake: self.wake.clone(),
        })
    }

    /// Commit what is open and close both connections; later writes fail.
    pub(super) async fn close(&self) {
        let mut g = self.shared.conn.lock().await;
        settle(&mut g).await;
        commit_open(&mut g, &self.shared);
        // The group connection last: the last connection to a WAL database checkpoints it and
        // removes the WAL file.
        if let Some(c) = g.c.take() {
            let _ = sqlx::Connection::close(c).await;
        }
        if let Some(conn) = g.g.take() {
            let _ = conn.close();
        }
        self.wake.notify_one();
    }
}

/// How a caller's turn on the group connection went wrong.
enum Turn {
    /// Its writes are undone; the group transaction is intact.
    Failed(anyhow::Error),
    /// The group transaction may be gone with them.
    Broken(anyhow::Error),
}

/// One caller's statements in a savepoint of the open group transaction, or, when no
/// transaction is open, in a transaction opened for it (then without a savepoint: a failure rolls
/// the whole transaction back, and it holds nothing else). Synchronous from the savepoint's (or
/// transaction's) start to its end: a caller cancelled while it waits for the lock or for the
/// commit leaves nothing half-written behind.
///
/// Why not always a savepoint: SQLite copies every page a savepoint's statements change, as it
/// was, into the statement journal first (so `ROLLBACK TO` can restore it), whether or not an
/// earlier caller changed it. Most transactions here hold one caller (a commit starts as soon as
/// the lock is free), and for it those copies were 6 % of the store's work in
/// `cargo bench --bench store_floor` under callgrind: two pages an event, for nothing.
///
/// Answers whether the caller wrote anything.
fn turn<R>(g: &mut Conn, f: impl FnOnce(&rusqlite::Connection) -> anyhow::Result<R>) -> Result<(R, bool), Turn> {
    let conn =
        g.g.as_ref()
            .ok_or_else(|| Turn::Failed(anyhow!("the store is closed")))?;
    let alone = !g.open;
    if alone {
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| Turn::Failed(e.into()))?;
        g.open = true;
    } else {
        conn.execute_batch("SAVEPOINT caller")
            .map_err(|e| Turn::Broken(e.into()))?;
    }
    let before = conn.total_changes();
    match f(conn) {
        Ok(out) => {
            let wrote = conn.total_changes() != before;
            if !alone {
                conn.execute_batch("RELEASE caller")
                    .map_err(|e| Turn::Broken(e.into()))?;
            }
            Ok((out, wrote))
        }
        Err(e) if alone => {
            // The transaction is this caller's alone: rolled back whole (SQLite may have done
            // so already, after an I/O error, say: the ROLLBACK then fails harmlessly). Nobody
            // waits for its number, which the next transaction takes.
            let _ = conn.execute_batch("ROLLBACK");
            if !conn.is_autocommit() {
                return Err(Turn::Broken(e));
            }
            g.open = false;
            Err(Turn::Failed(e))
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO caller; RELEASE caller")
                .map_err(|e| Turn::Broken(e.into()))?;
            Err(Turn::Failed(e))
        }
    }
}

/// Prepared statements the group connection keeps: each batched statement has up to nine
/// texts (its `VALUES` list padded to a power of two), and there are a few dozen statements.
const STATEMENTS_KEPT: usize = 256;

impl Drop for Writer {
    fn drop(&mut self) {
        // Lets the committer see the writer is gone and end.
        self.wake.notify_one();
    }
}

/// A transaction of sqlx statements on the second connection: its statements run on
/// `&mut *tx`; `commit` commits it. Dropped without `commit`, it is rolled back (by whoever
/// takes the lock next).
pub(super) struct WriteTx {
    guard: Option<OwnedMutexGuard<Conn>>,
    wake: Arc<Notify>,
}

impl WriteTx {
    /// Commit this transaction (durable as `store.synchronous` says). An error means its
    /// writes are not kept.
    pub(super) async fn commit(mut self) -> anyhow::Result<()> {
        let mut g = self.guard.take().expect("a transaction is committed once");
        let c = g.c.as_mut().expect("open while held");
        if let Err(e) = sqlx::query("COMMIT").execute(&mut *c).await {
            // Fails harmlessly when SQLite already rolled it back.
            let _ = sqlx::query("ROLLBACK").execute(&mut *c).await;
            return Err(e.into());
        }
        Ok(())
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.guard.as_ref().and_then(|g| g.c.as_ref()).expect("open while held")
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.guard.as_mut().and_then(|g| g.c.as_mut()).expect("open while held")
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            // Not committed (an error, or the caller was cancelled mid-way): rolled back before
            // anything else runs, and the committer is woken so the transaction does not stay
            // open holding SQLite's write lock.
            g.dangling = true;
            self.wake.notify_one();
        }
    }
}

/// Roll back what a sqlx caller left behind (see [`WriteTx`]'s `Drop`).
async fn settle(g: &mut Conn) {
    if !g.dangling {
        return;
    }
    g.dangling = false;
    let Some(c) = g.c.as_mut() else { return };
    if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *c).await {
        tracing::error!(error = %e, "rolling back an abandoned store transaction failed");
    }
}

/// Commit the open group transaction, if any, and tell its callers.
fn commit_open(g: &mut Conn, shared: &Shared) {
    if !g.open {
        return;
    }
    let Some(conn) = g.g.as_ref() else { return };
    match conn.execute_batch("COMMIT") {
        Ok(()) => end(g, shared, None),
        Err(e) => fail_open(g, shared, &e.to_string()),
    }
}

/// Roll the open group transaction back (if SQLite has not already) and fail its callers.
fn fail_open(g: &mut Conn, shared: &Shared, why: &str) {
    tracing::error!(error = %why, "a store transaction failed; its writes are rolled back");
    if let Some(conn) = g.g.as_ref() {
        // Fails harmlessly when SQLite already rolled it back.
        let _ = conn.execute_batch("ROLLBACK");
    }
    end(g, shared, Some(why));
}

fn end(g: &mut Conn, shared: &Shared, failed: Option<&str>) {
    let n = g.generation;
    g.open = false;
    g.generation += 1;
    shared.ended.send_modify(|e| {
        e.below = n + 1;
        if let Some(why) = failed {
            e.failed.push_back((n, Arc::from(why)));
            if e.failed.len() > FAILURES_KEPT {
                e.failed.pop_front();
            }
        }
    });
}

/// Commits whatever group transaction is open each time it is woken. It queues for the lock
/// like any caller: the callers already queued add their writes first, so one commit (one
/// fsync) carries all of them.
///
/// The `COMMIT` runs on a thread of the blocking pool, not on the runtime's: it waits for the
/// WAL's sync (and, every thousand pages, a checkpoint's writes and sync), and a runtime worker
/// blocked there is one of the machine's two taken from the deliveries meanwhile.
async fn committer(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(shared) = shared.upgrade() else { return };
        let mut g = shared.conn.clone().lock_owned().await;
        settle(&mut g).await;
        if !g.open {
            continue;
        }
        // The lock goes with the commit and is given back when it is done.
        let done = tokio::task::spawn_blocking(move || commit_open(&mut g, &shared)).await;
        if let Err(e) = done {
            // Only a panic in SQLite's commit gets here; its callers were not told.
            tracing::error!(error = %e, "the store's commit did not finish");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Duration;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use sqlx::{ConnectOptions, Connection};

    use super::*;

    async fn fresh() -> (Writer, SqliteConnectOptions, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(dir.path().join("w.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(2));
        let mut c = opts.connect().await.unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        let g = rusqlite::Connection::open(dir.path().join("w.db")).unwrap();
        g.busy_timeout(Duration::from_secs(2)).unwrap();
        (Writer::open(&opts, g).await.unwrap(), opts, dir)
    }

    /// What another connection (a reader of the pool, another process) sees.
    async fn committed(opts: &SqliteConnectOptions) -> Vec<String> {
        let mut c = opts.connect().await.unwrap();
        let v = sqlx::query_scalar("SELECT v FROM t ORDER BY v")
            .fetch_all(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        v
    }

    /// A write by another connection (another process sharing the file): it fails once its
    /// busy timeout (2 s) passes while this writer holds SQLite's write lock.
    async fn insert_from_another_process(opts: &SqliteConnectOptions, v: &str) {
        let mut other = opts.connect().await.unwrap();
        sqlx::query("INSERT INTO t (v) VALUES (?)")
            .bind(v)
            .execute(&mut other)
            .await
            .unwrap();
        other.close().await.unwrap();
    }

    /// A write on the group connection.
    async fn insert(w: &Writer, v: &str) -> anyhow::Result<()> {
        w.write(|c| {
            c.execute("INSERT INTO t (v) VALUES (?)", [v])?;
            Ok(())
        })
        .await
    }

    /// A sqlx write in a transaction of its own.
    async fn insert_alone(w: &Writer, v: &str) -> anyhow::Result<()> {
        let mut tx = w.begin().await?;
        sqlx::query("INSERT INTO t (v) VALUES (?)")
            .bind(v)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    #[tokio::test]
    async fn concurrent_writes_share_commits_and_each_is_committed_when_its_call_returns() {
        let (w, opts, _dir) = fresh().await;
        let w = Arc::new(w);
        let callers: Vec<_> = (0..50)
            .map(|i| {
                let w = w.clone();
                tokio::spawn(async move { insert(&w, &format!("v{i:02}")).await })
            })
            .collect();
        for c in callers {
            c.await.unwrap().unwrap();
        }
        assert_eq!(committed(&opts).await.len(), 50, "every write returned committed");
        let transactions = w.shared.ended.borrow().below;
        assert!(
            transactions < 25,
            "50 callers queued at once share commits: {transactions} transactions"
        );
    }

    #[tokio::test]
    async fn a_failing_caller_is_rolled_back_alone() {
        let (w, opts, _dir) = fresh().await;
        let w = Arc::new(w);
        insert(&w, "before").await.unwrap();
        // Holds the lock so the next two share a transaction.
        let first = w.begin().await.unwrap();
        let failing = {
            let w = w.clone();
            tokio::spawn(async move {
                w.write(|c| {
                    c.execute("INSERT INTO t (v) VALUES ('partial')", [])?;
                    // A unique violation: the caller gives up with an error.
                    c.execute("INSERT INTO t (v) VALUES ('before')", [])?;
                    Ok(())
                })
                .await
            })
        };
        let fine = {
            let w = w.clone();
            tokio::spawn(async move { insert(&w, "after").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.commit().await.unwrap();
        assert!(failing.await.unwrap().is_err());
        fine.await.unwrap().unwrap();
        assert_eq!(committed(&opts).await, vec!["after", "before"]);
        let transactions = w.shared.ended.borrow().below;
        assert_eq!(
            transactions, 2,
            "the failing and the fine caller shared one transaction"
        );
    }

    #[tokio::test]
    async fn a_caller_alone_in_its_transaction_is_rolled_back_whole() {
        let (w, opts, _dir) = fresh().await;
        insert(&w, "before").await.unwrap();
        // Nothing holds the lock: the caller opens the transaction and runs without a savepoint.
        // Its `OR FAIL` statement keeps the row it wrote before the failing one; the caller's
        // failure must still take back everything it wrote.
        let failed = w
            .write(|c| {
                c.execute("INSERT INTO t (v) VALUES ('partial')", [])?;
                c.execute(
                    "INSERT OR FAIL INTO t (v) SELECT column1 FROM (VALUES ('half'), ('before'))",
                    [],
                )?;
                Ok(())
            })
            .await;
        assert!(failed.is_err(), "a unique violation fails the caller");
        insert(&w, "after").await.unwrap();
        assert_eq!(committed(&opts).await, vec!["after", "before"]);
        assert_eq!(
            w.shared.ended.borrow().below,
            2,
            "the failed transaction was rolled back, not committed: the next one took its number"
        );
    }

    #[tokio::test]
    async fn sqlx_writes_take_turns_with_group_writes_in_the_order_they_came() {
        let (w, opts, _dir) = fresh().await;
        let w = Arc::new(w);
        // Holds the lock: the three below queue in this order.
        let first = w.begin().await.unwrap();
        let mut callers = Vec::new();
        for (i, v) in ["a", "b", "c"].into_iter().enumerate() {
            let w = w.clone();
            callers.push(tokio::spawn(async move {
                if i == 1 {
                    insert_alone(&w, v).await
                } else {
                    insert(&w, v).await
                }
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.commit().await.unwrap();
        for c in callers {
            c.await.unwrap().unwrap();
        }
        assert_eq!(committed(&opts).await, vec!["a", "b", "c"]);
        // "a"'s group transaction was committed before "b"'s own began; "c" had one of its own.
        let order: Vec<String> = sqlx::query_scalar("SELECT v FROM t ORDER BY id")
            .fetch_all(&mut opts.connect().await.unwrap())
            .await
            .unwrap();
        assert_eq!(order, vec!["a", "b", "c"], "written in the order the callers came");
        assert_eq!(w.shared.ended.borrow().below, 2, "two group transactions: a's and c's");
    }

    #[tokio::test]
    async fn a_caller_dropped_midway_leaves_nothing_and_releases_the_lock() {
        let (w, opts, _dir) = fresh().await;
        {
            let mut tx = w.begin().await.unwrap();
            sqlx::query("INSERT INTO t (v) VALUES ('abandoned')")
                .execute(&mut *tx)
                .await
                .unwrap();
            // Dropped here, as a cancelled request would be.
        }
        // Another process can write (the transaction did not stay open holding the lock; its
        // busy timeout is 2 s).
        insert_from_another_process(&opts, "other").await;
        insert(&w, "next").await.unwrap();
        insert_alone(&w, "then").await.unwrap();
        assert_eq!(committed(&opts).await, vec!["next", "other", "then"]);
    }

    #[tokio::test]
    async fn a_failed_turn_does_not_leave_the_write_lock_held() {
        let (w, opts, _dir) = fresh().await;
        // The first turn opens the transaction and fails (NOT NULL).
        let failed = w
            .write(|c| {
                c.execute("INSERT INTO t (v) VALUES (NULL)", [])?;
                Ok(())
            })
            .await;
        assert!(failed.is_err());
        // Another process can write (its busy timeout is 2 s).
        insert_from_another_process(&opts, "other").await;
        assert_eq!(committed(&opts).await, vec!["other"]);
    }

    #[tokio::test]
    async fn a_closed_writer_commits_what_it_has_and_refuses_more() {
        let (w, opts, _dir) = fresh().await;
        insert(&w, "kept").await.unwrap();
        w.close().await;
        assert!(insert(&w, "late").await.is_err());
        assert!(insert_alone(&w, "later").await.is_err());
        assert_eq!(committed(&opts).await, vec!["kept"]);
    }
}
