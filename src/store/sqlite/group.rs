//! Group commit: every write of this process goes through one connection, and the writes that
//! come while a commit is on its way to the disk share the next one.
//!
//! SQLite has one writer at a time. With a transaction per caller on connections of a pool, the
//! intake's inserts and the delivery writer's completions took turns through SQLite's busy
//! handler, which *sleeps* (1, 2, 5, 10 … ms) until the lock is free: the process waited with
//! idle cores, and every small transaction paid its own commit (a WAL write of every page it
//! touched, and an fsync with `store.synchronous = full`).
//!
//! Here a caller takes the one write connection (a FIFO lock, so nobody waits by sleeping),
//! runs its statements inside a savepoint of the transaction that is open on it (opening one
//! when none is), and gives the connection back. A committer task commits the open transaction
//! as soon as it gets the connection; callers that queued for the connection while it waited
//! or committed join the next transaction. A caller's `commit` returns only when the
//! transaction holding its writes is committed (durable as `store.synchronous` says), so what
//! the code above the store sees is unchanged: a write is committed when its call returns, or
//! failed.
//!
//! Failure stays per caller where SQLite allows it: a caller whose statements fail (or who is
//! dropped before `commit`, e.g. a cancelled request) is rolled back to its savepoint, leaving
//! the others' writes in place. A failed `COMMIT`, or SQLite rolling the whole transaction back
//! on its own (I/O error, disk full), fails every caller of that transaction.
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

/// The one write connection of a SQLite store.
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
    /// None once the store is closed.
    c: Option<SqliteConnection>,
    /// A transaction is open on `c`.
    open: bool,
    /// The number of the open transaction (or of the next one).
    generation: u64,
    /// A caller left without releasing or rolling back its savepoint.
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
    /// Open the write connection (with the pool's options: WAL, `synchronous`, busy timeout) and
    /// start its committer.
    pub(super) async fn open(opts: &SqliteConnectOptions) -> anyhow::Result<Writer> {
        let c = opts.connect().await?;
        let shared = Arc::new(Shared {
            conn: Arc::new(Mutex::new(Conn {
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

    /// Take the write connection for one caller's statements (in a savepoint of the open
    /// transaction). Waits behind the callers before it, never by sleeping.
    pub(super) async fn begin(&self) -> anyhow::Result<WriteTx> {
        let mut g = self.shared.conn.clone().lock_owned().await;
        settle(&mut g, &self.shared).await;
        if g.c.is_none() {
            return Err(anyhow!("the store is closed"));
        }
        if !g.open {
            sqlx::query("BEGIN IMMEDIATE")
                .execute(g.c.as_mut().expect("checked above"))
                .await?;
            g.open = true;
        }
        let c = g.c.as_mut().expect("checked above");
        if let Err(e) = sqlx::query("SAVEPOINT caller").execute(&mut *c).await {
            // The transaction may be gone with it: end it (failing nobody else's writes but
            // those SQLite already dropped) rather than leave it open.
            fail_open(&mut g, &self.shared, &e.to_string()).await;
            return Err(e.into());
        }
        Ok(WriteTx {
            guard: Some(g),
            shared: self.shared.clone(),
            wake: self.wake.clone(),
        })
    }

    /// Commit what is open and close the connection; later writes fail.
    pub(super) async fn close(&self) {
        let mut g = self.shared.conn.lock().await;
        settle(&mut g, &self.shared).await;
        commit_open(&mut g, &self.shared).await;
        if let Some(c) = g.c.take() {
            let _ = sqlx::Connection::close(c).await;
        }
        self.wake.notify_one();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Lets the committer see the writer is gone and end.
        self.wake.notify_one();
    }
}

/// One caller's turn on the write connection: its statements run on `&mut *tx`; `commit` makes
/// them part of the transaction and waits for that transaction's commit. Dropped without
/// `commit`, its statements are rolled back (by whoever takes the connection next).
pub(super) struct WriteTx {
    guard: Option<OwnedMutexGuard<Conn>>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
}

impl WriteTx {
    /// Keep this caller's writes and wait until they are committed. An error means they are
    /// not (rolled back, or the transaction holding them failed).
    pub(super) async fn commit(mut self) -> anyhow::Result<()> {
        let mut g = self.guard.take().expect("a turn is committed once");
        let released = sqlx::query("RELEASE caller")
            .execute(g.c.as_mut().expect("open while held"))
            .await;
        if let Err(e) = released {
            // Only when SQLite dropped the transaction on its own: nothing of it is left.
            fail_open(&mut g, &self.shared, &e.to_string()).await;
            return Err(e.into());
        }
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
            None => Ok(()),
        }
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
            // Not committed (an error, or the caller was cancelled mid-way): its savepoint is
            // rolled back before anything else runs on the connection, and the committer is
            // woken so the transaction does not stay open holding SQLite's write lock.
            g.dangling = true;
            self.wake.notify_one();
        }
    }
}

/// Roll back what a caller left behind (see [`WriteTx`]'s `Drop`).
async fn settle(g: &mut Conn, shared: &Shared) {
    if !g.dangling {
        return;
    }
    g.dangling = false;
    let Some(c) = g.c.as_mut() else { return };
    let undone = match sqlx::query("ROLLBACK TO caller").execute(&mut *c).await {
        Ok(_) => sqlx::query("RELEASE caller").execute(&mut *c).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = undone {
        fail_open(g, shared, &e.to_string()).await;
    }
}

/// Commit the open transaction, if any, and tell its callers.
async fn commit_open(g: &mut Conn, shared: &Shared) {
    if !g.open {
        return;
    }
    let Some(c) = g.c.as_mut() else { return };
    match sqlx::query("COMMIT").execute(&mut *c).await {
        Ok(_) => end(g, shared, None),
        Err(e) => fail_open(g, shared, &e.to_string()).await,
    }
}

/// Roll the open transaction back (if SQLite has not already) and fail its callers.
async fn fail_open(g: &mut Conn, shared: &Shared, why: &str) {
    tracing::error!(error = %why, "a store transaction failed; its writes are rolled back");
    if let Some(c) = g.c.as_mut() {
        // Fails harmlessly when SQLite already rolled it back.
        let _ = sqlx::query("ROLLBACK").execute(&mut *c).await;
    }
    end(g, shared, Some(why));
}

fn end(g: &mut Conn, shared: &Shared, failed: Option<&str>) {
    let n = g.generation;
    g.open = false;
    g.dangling = false;
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

/// Commits whatever transaction is open each time it is woken. It queues for the connection
/// like any caller: the callers already queued add their writes first, so one commit (one
/// fsync) carries all of them.
async fn committer(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(shared) = shared.upgrade() else { return };
        let mut g = shared.conn.lock().await;
        settle(&mut g, &shared).await;
        commit_open(&mut g, &shared).await;
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
        (Writer::open(&opts).await.unwrap(), opts, dir)
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

    async fn insert(w: &Writer, v: &str) -> anyhow::Result<()> {
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
        // Holds the connection so the next two share a transaction.
        let first = w.begin().await.unwrap();
        let failing = {
            let w = w.clone();
            tokio::spawn(async move {
                let mut tx = w.begin().await?;
                sqlx::query("INSERT INTO t (v) VALUES ('partial')")
                    .execute(&mut *tx)
                    .await?;
                // A unique violation: the caller gives up with an error.
                sqlx::query("INSERT INTO t (v) VALUES ('before')")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
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
        let mut other = opts.connect().await.unwrap();
        sqlx::query("INSERT INTO t (v) VALUES ('other')")
            .execute(&mut other)
            .await
            .unwrap();
        other.close().await.unwrap();
        insert(&w, "next").await.unwrap();
        assert_eq!(committed(&opts).await, vec!["next", "other"]);
    }

    #[tokio::test]
    async fn a_closed_writer_commits_what_it_has_and_refuses_more() {
        let (w, opts, _dir) = fresh().await;
        insert(&w, "kept").await.unwrap();
        w.close().await;
        assert!(insert(&w, "late").await.is_err());
        assert_eq!(committed(&opts).await, vec!["kept"]);
    }
}
