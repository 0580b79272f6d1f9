//! The SQLite store (WAL): every trait of `crate::store`, one file per concern. The only place
//! that knows SQL, `SqlitePool` or `SqliteRow`.
//!
//! Every write goes through one connection of its own with group commit (`group`); the pool's
//! connections only read (opened read-only). Its transactions start with `BEGIN IMMEDIATE`: the
//! write lock is taken up front, so it never reads and then fails to upgrade against another
//! process on the same file (SQLite's `SQLITE_BUSY` on upgrade is not retried by the busy
//! timeout).

mod group;
mod log;
mod migrate;
mod queue;
mod registry;
mod runs;
#[allow(unsafe_code)]
mod wal_writes;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::SqlitePool;

use crate::config::{StoreSettings, Synchronous};

pub struct SqliteStore {
    /// Reads (WAL: they see committed data and never wait for the writer).
    pool: SqlitePool,
    /// Every write: one connection, group commit (see `group`).
    writer: group::Writer,
    lease: Lease,
}

use super::Lease;

/// Values per `IN (...)` list.
const IN_CHUNK: usize = 500;

/// Values for one `json_each(?)` parameter: the statements on the hot paths take their lists of
/// keys and rows as one JSON array instead of a placeholder each, so their text is the same
/// whatever the number of values and each connection prepares it once (sqlx caches prepared
/// statements by their text; a text per list length was re-prepared nearly every time:
/// `sqlite3Prepare` was 4 % of relay CPU in the embedded benchmark's profile).
fn json_list<T: serde::Serialize + ?Sized>(values: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string(values)?)
}

/// A row of either connection, read by column name or position: one mapping from a row to a
/// value serves the pool's reads (sqlx) and the group connection's statements (rusqlite).
pub(super) trait Cols {
    fn col<T>(&self, name: &str) -> anyhow::Result<T>
    where
        T: rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>;

    /// The column at `i` (from 0): for rows read often, where a search by name costs.
    fn at<T>(&self, i: usize) -> anyhow::Result<T>
    where
        T: rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>;
}

impl Cols for sqlx::sqlite::SqliteRow {
    fn col<T>(&self, name: &str) -> anyhow::Result<T>
    where
        T: rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
    {
        Ok(sqlx::Row::try_get(self, name)?)
    }

    fn at<T>(&self, i: usize) -> anyhow::Result<T>
    where
        T: rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
    {
        Ok(sqlx::Row::try_get(self, i)?)
    }
}

impl Cols for rusqlite::Row<'_> {
    fn col<T>(&self, name: &str) -> anyhow::Result<T>
    where
        T: rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
    {
        Ok(self.get(name)?)
    }

    fn at<T>(&self, i: usize) -> anyhow::Result<T>
    where
        T: rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
    {
        Ok(self.get(i)?)
    }
}

/// A `deliveries` row still queued (ready, waiting for its chain, or held by a paused sync): the
/// chain index's predicate (migrations/sqlite/0011). A row is queued exactly while it has no
/// finish time; said with `finished_at` rather than the queued states, so an UPDATE that moves a
/// row between queued states (a promotion, a pause) leaves its chain entry alone. A query reaches
/// the index only with this term in its WHERE (SQLite matches a partial index by the form of its
/// terms: a lone `state = 'waiting'` does not imply it). Unqualified: in a subquery it names the
/// innermost `deliveries`.
pub(super) const QUEUED: &str = "finished_at IS NULL";

/// Binds values to a statement's parameters, in order.
pub(super) struct Binder<'a, 'c> {
    st: &'a mut rusqlite::Statement<'c>,
    i: usize,
}

impl<'a, 'c> Binder<'a, 'c> {
    pub(super) fn new(st: &'a mut rusqlite::Statement<'c>) -> Self {
        Binder { st, i: 1 }
    }

    pub(super) fn bind<T: rusqlite::ToSql>(&mut self, v: T) -> rusqlite::Result<()> {
        self.st.raw_bind_parameter(self.i, v)?;
        self.i += 1;
        Ok(())
    }

    /// `n` NULLs: the padding of a `VALUES` list (see `queue::insert_rows`).
    pub(super) fn nulls(&mut self, n: usize) -> rusqlite::Result<()> {
        for _ in 0..n {
            self.bind(rusqlite::types::Null)?;
        }
        Ok(())
    }
}

/// `?, ?, ?` for an `IN (...)` list of `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

impl SqliteStore {
    /// Open (creating the file and its folder when missing) and bring the schema up to date.
    pub async fn open(settings: &StoreSettings) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = settings.path.parent() {
            if !dir.as_os_str().is_empty() {
                private_dir(dir).with_context(|| format!("creating data folder {}", dir.display()))?;
            }
        }
        private_files(&settings.path).with_context(|| format!("creating store {}", settings.path.display()))?;
        let opts = connection_pragmas(settings).into_iter().fold(
            SqliteConnectOptions::from_str("sqlite://")?
                .filename(&settings.path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(BUSY_TIMEOUT),
            |opts, (name, value)| opts.pragma(name, value),
        );
        // Schema and start-up repairs on a connection of their own, before the write connection
        // exists.
        let setup = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .with_context(|| format!("opening store {}", settings.path.display()))?;
        migrate::run(&setup).await.context("migrating the schema")?;
        // SQLite gives the -wal and -shm files the database file's mode; made before this
        // version they may be looser.
        private_files(&settings.path).with_context(|| format!("securing store {}", settings.path.display()))?;
        // Processes on one host may share the file, so the owner names its process. The leases
        // of processes that are gone (killed with rows in flight) are released now, so a restart
        // attempts those rows again at once rather than after `store.lease_ms`; so are those of
        // an earlier handle of this very process (one store per process: an earlier life).
        let mut lease = Lease::new(settings);
        let pid = std::process::id();
        lease.owner = format!("{pid}:{}", lease.owner);
        let owners: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT lease_owner FROM deliveries WHERE lease_owner IS NOT NULL")
                .fetch_all(&setup)
                .await?;
        for owner in owners {
            let gone = match owner.split_once(':').and_then(|(p, _)| p.parse::<u32>().ok()) {
                Some(p) => p == pid || !std::path::Path::new(&format!("/proc/{p}")).exists(),
                None => true,
            };
            if gone {
                sqlx::query("UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?")
                    .bind(&owner)
                    .execute(&setup)
                    .await
                    .context("releasing leases of a process that is gone")?;
            }
        }
        setup.close().await;
        let writer = group::Writer::open(&opts, open_group_connection(settings)?)
            .await
            .context("opening the store's write connection")?;
        // The pool only reads: its connections are opened read-only, so a write that does not
        // go through `writer` fails at once (in the tests) instead of waiting for SQLite's lock
        // behind the write connection's open transaction.
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            // A connection to a local file cannot go stale; sqlx's default ping before every
            // acquire was a round trip to the connection's worker thread per statement batch
            // (~4 % of relay CPU in the embedded benchmark's profile).
            .test_before_acquire(false)
            .connect_with(opts.clone().read_only(true))
            .await
            .with_context(|| format!("opening store {}", settings.path.display()))?;
        Ok(SqliteStore { pool, writer, lease })
    }

    /// One statement that writes, as a caller of its own on the write connection (see `group`).
    async fn execute<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> anyhow::Result<sqlx::sqlite::SqliteQueryResult> {
        let mut tx = self.writer.begin().await?;
        let r = q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(r)
    }
}

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The pragmas every connection of the store is opened with (besides WAL and the busy
/// timeout), the pool's (sqlx) and the group connection (rusqlite) alike.
fn connection_pragmas(settings: &StoreSettings) -> [(&'static str, &'static str); 4] {
    [
        (
            "synchronous",
            match settings.synchronous {
                Synchronous::Full => "full",
                Synchronous::Normal => "normal",
            },
        ),
        // Statement journals of multi-row statements stay in memory.
        ("temp_store", "memory"),
        // What a row loses on update or delete (a secret re-encrypted at start, a purged
        // body) is zeroed where that costs no extra I/O, instead of lingering in the file.
        ("secure_delete", "fast"),
        ("foreign_keys", "off"),
    ]
}

/// The group connection of the write side (see `group`), opened as every connection of the
/// store is (`SqliteStore::open`).
fn open_group_connection(settings: &StoreSettings) -> anyhow::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // Its WAL writes are gathered and made a few a commit (`wal_writes`), safe only when every
    // commit syncs the WAL before SQLite tells other connections of its frames: `full`.
    let c = match settings.synchronous {
        Synchronous::Full => {
            wal_writes::register()?;
            rusqlite::Connection::open_with_flags_and_vfs(&settings.path, flags, wal_writes::NAME)
        }
        Synchronous::Normal => rusqlite::Connection::open_with_flags(&settings.path, flags),
    }
    .with_context(|| format!("opening store {}", settings.path.display()))?;
    c.busy_timeout(BUSY_TIMEOUT)?;
    c.pragma_update(None, "journal_mode", "wal")?;
    for (name, value) in connection_pragmas(settings) {
        c.pragma_update(None, name, value)?;
    }
    Ok(c)
}

/// The data folder, made owner-only (0700) where it is created (a folder that already exists is
/// left as it is: it may be shared, e.g. the working directory).
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// The database file (created empty when missing) and its -wal / -shm files, owner read/write
/// only (0600): they hold every event body and, without `store.encryption_key`, the secrets.
fn private_files(db: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if db.as_os_str() == ":memory:" {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(db)?;
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r?,
            }
        }
    }
    #[cfg(not(unix))]
    let _ = db;
    Ok(())
}

#[async_trait]
impl super::Backend for SqliteStore {
    async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        // The write connection closes last: the last connection to a WAL database checkpoints
        // it and removes the WAL file, and a read-only one cannot. Left behind, the WAL would
        // keep old page versions (a secret before it was sealed, a purged body).
        self.pool.close().await;
        self.writer.close().await;
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{StoreKind, StoreSettings, Synchronous};
    use crate::store::{conformance, Store};

    fn settings(dir: &tempfile::TempDir) -> StoreSettings {
        StoreSettings {
            kind: StoreKind::Sqlite,
            path: dir.path().join("nested/store.db"),
            url: String::new(),
            max_connections: 2,
            synchronous: Synchronous::Normal,
            lease_ms: 60_000,
            encryption_key: String::new(),
            previous_encryption_keys: Vec::new(),
        }
    }

    async fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&settings(dir)).await.unwrap()
    }

    #[tokio::test]
    async fn writes_go_through_the_write_connection_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::SqliteStore::open(&settings(&dir)).await.unwrap();
        let through_pool = sqlx::query("INSERT INTO kv (key, value) VALUES ('k', 'v')")
            .execute(&s.pool)
            .await;
        assert!(through_pool.is_err(), "the read pool refuses writes");
        s.execute(sqlx::query("INSERT INTO kv (key, value) VALUES ('k', 'v')"))
            .await
            .unwrap();
        let v: String = sqlx::query_scalar("SELECT value FROM kv WHERE key = 'k'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(v, "v", "the pool reads what the writer committed");
    }

    #[tokio::test]
    async fn queued_rows_carry_their_seqs_even_when_the_sequence_lags_behind_the_table() {
        use crate::store::Queue;
        let dir = tempfile::tempdir().unwrap();
        let s = super::SqliteStore::open(&settings(&dir)).await.unwrap();
        let now = 1_000;
        let rows = |keys: &[&str]| -> Vec<_> {
            keys.iter()
                .map(|k| conformance::delivery(&format!("d-{k}"), Some(k), None, now))
                .collect()
        };
        let mut claimed = s
            .enqueue_claiming(&rows(&["a", "b"]), &[], now, &Default::default(), &mut |_| {})
            .await
            .unwrap();
        // A sequence behind the table (an older `sqlite_sequence` restored, say): the next rows
        // draw seqs after the table's largest, not after the sequence, and the intake must not
        // assume the latter.
        s.execute(sqlx::query(
            "UPDATE sqlite_sequence SET seq = 0 WHERE name = 'deliveries'",
        ))
        .await
        .unwrap();
        claimed.extend(
            s.enqueue_claiming(&rows(&["c", "d"]), &[], now, &Default::default(), &mut |_| {})
                .await
                .unwrap(),
        );
        assert_eq!(claimed.len(), 4, "each row heads its own chain");
        for q in &claimed {
            let seq: i64 = sqlx::query_scalar("SELECT seq FROM deliveries WHERE id = ?")
                .bind(&q.id)
                .fetch_one(&s.pool)
                .await
                .unwrap();
            assert_eq!(q.seq, seq, "{} was handed out with the seq the store gave it", q.id);
        }
    }

    async fn fresh() -> (Store, Checked) {
        let dir = tempfile::tempdir().unwrap();
        (open(&dir).await, Checked(dir))
    }

    /// A conformance test's store folder. When the test has passed, it checks what the chain
    /// index (`QUEUED`) relies on in every row the test left: a row is queued (`ready`,
    /// `waiting`, `paused`) exactly while it has no finish time. A write path that finished a
    /// row without one (or queued a row again and kept it) would leave its chain blocked or
    /// its row out of its chain; the test that exercised that path fails here.
    struct Checked(tempfile::TempDir);

    impl Drop for Checked {
        fn drop(&mut self) {
            if std::thread::panicking() {
                return;
            }
            let c = rusqlite::Connection::open_with_flags(
                self.0.path().join("nested/store.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut st = c
                .prepare(
                    "SELECT id, state, finished_at FROM deliveries \
                     WHERE (finished_at IS NULL) <> (state IN ('ready', 'waiting', 'paused'))",
                )
                .unwrap();
            let wrong: Vec<(String, String, Option<i64>)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                wrong.is_empty(),
                "rows whose finish time disagrees with their state: {wrong:?}"
            );
        }
    }

    conformance::suite!(fresh);

    #[tokio::test]
    async fn reopening_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        assert_eq!(store.kv_get_or_insert("k", "first").await.unwrap(), "first");
        store.close().await;
        let store = open(&dir).await;
        assert_eq!(store.kv_get_or_insert("k", "second").await.unwrap(), "first");
        store.ping().await.unwrap();
    }
}
