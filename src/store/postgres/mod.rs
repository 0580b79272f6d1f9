//! The PostgreSQL store: every trait of `crate::store`, one file per concern, mirroring the
//! SQLite store (`super::sqlite`) statement for statement. The only place that knows `PgPool` or
//! `PgRow`.
//!
//! Statements are written with `?` placeholders, like SQLite's, and numbered (`$1`, `$2` ...) by
//! [`pg`] before they are prepared; every integer column is `BIGINT` (Rust `i64`), so rows map the
//! same way on both backends.
//!
//! Several instances may share one database: the schema is migrated under an advisory lock, the
//! run lifecycle loads its runs `FOR UPDATE`, and a chain's promotion happens in the transaction
//! that finishes its head, and the rows an instance takes are leased to it in the store
//! (`lease_owner`, `lease_until`; [`Lease`]), renewed while the attempt runs and checked by
//! `complete`: see `docs/OPERATIONS.md`.

mod log;
mod migrate;
mod queue;
mod registry;
mod runs;

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::config::StoreSettings;

pub struct PgStore {
    pool: PgPool,
    lease: Lease,
}

pub(super) use super::Lease;

/// Rows per multi-row `VALUES` statement (at 7 columns a row, far below PostgreSQL's limit of
/// 65535 parameters a statement). The deliveries' own rows go as arrays, whatever their number.
const INSERT_CHUNK: usize = 500;

/// How long a pooled connection may sit idle before it is pinged again when handed out.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Values per `IN (...)` list.
const IN_CHUNK: usize = 1000;

/// `?, ?, ?` for an `IN (...)` list of `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

/// A statement written with `?` placeholders, numbered for PostgreSQL (`$1`, `$2` ...). No
/// statement of this store has a `?` inside a string literal.
fn pg(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

impl PgStore {
    /// Connect to `store.url` and bring the schema up to date (under an advisory lock, so
    /// instances starting together do not race). Errors never include the URL (it may carry a
    /// password).
    pub async fn open(settings: &StoreSettings) -> anyhow::Result<PgStore> {
        anyhow::ensure!(
            !settings.url.is_empty(),
            "store.url is required when store.kind = \"postgres\""
        );
        let opts: PgConnectOptions = settings
            .url
            .parse()
            .map_err(|_| anyhow::anyhow!("store.url is not a valid PostgreSQL URL"))?;
        let opts = opts.application_name("syncrelay");
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            // A connection handed out is pinged first only when it has been idle for a while
            // (a server restart or a dropped link while it sat in the pool shows there, and
            // the pool opens another). sqlx's default pings before every use: a round trip
            // more for each transaction, which in the outcome writers' and the intake's
            // back-to-back transactions was a tenth of their time — 6,482 / 6,948 / 6,915
            // events/s against 7,003 / 7,342 / 7,369 without it (docs/BENCHMARKS.md,
            // eighteenth session). sqlx pings each connection as it is returned, too, so one
            // handed out unchecked answered less than `PING_IDLE_AFTER` ago.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(opts)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to PostgreSQL (store.url): {}", redact(&e)))?;
        migrate::run(&pool).await.context("migrating the PostgreSQL schema")?;
        Ok(PgStore {
            pool,
            lease: Lease::new(settings),
        })
    }
}

/// A connection error without anything that could come from the URL: sqlx's configuration
/// errors may quote it, so those are reduced to their kind.
fn redact(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(_) => "invalid configuration".into(),
        sqlx::Error::Database(d) => d.message().to_string(),
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Tls(_) => "TLS error".into(),
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".into(),
        other => format!("{}", other).chars().take(200).collect(),
    }
}

#[async_trait]
impl super::Backend for PgStore {
    async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
pub(crate) mod test_server;

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::pg;
    use crate::config::{StoreKind, StoreSettings, Synchronous};
    use crate::store::{conformance, Store};

    fn settings(url: &str) -> StoreSettings {
        StoreSettings {
            kind: StoreKind::Postgres,
            path: Default::default(),
            url: url.to_string(),
            max_connections: 4,
            synchronous: Synchronous::Normal,
            lease_ms: 60_000,
            encryption_key: String::new(),
            previous_encryption_keys: Vec::new(),
        }
    }

    async fn fresh() -> (Store, ()) {
        let url = super::test_server::database();
        (Store::open(&settings(&url)).await.unwrap(), ())
    }

    conformance::suite!(fresh);

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(pg("a = ? AND b IN (?, ?)"), "a = $1 AND b IN ($2, $3)");
    }

    #[tokio::test]
    async fn instances_opening_together_migrate_once_and_keep_the_data() {
        let url = super::test_server::database();
        let s = settings(&url);
        let opens: Vec<_> = (0..4).map(|_| Store::open(&s)).collect();
        let stores: Vec<Store> = futures_util::future::try_join_all(opens).await.unwrap();
        assert_eq!(stores[0].kv_get_or_insert("k", "first").await.unwrap(), "first");
        assert_eq!(stores[3].kv_get_or_insert("k", "second").await.unwrap(), "first");
        for st in &stores {
            st.close().await;
        }
        let store = Store::open(&s).await.unwrap();
        assert_eq!(store.kv_get_or_insert("k", "third").await.unwrap(), "first");
        store.ping().await.unwrap();
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(
            versions,
            (1..=super::migrate::latest()).collect::<Vec<i64>>(),
            "each migration applied once"
        );
    }

    #[tokio::test]
    async fn errors_never_show_the_url() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("postgres://relay:s3cr3t-pw@127.0.0.1:{port}/db");
        let e = Store::open(&settings(&url)).await.err().expect("nothing listens there");
        let text = format!("{e:#} {e:?}");
        assert!(!text.contains("s3cr3t-pw"), "{text}");
        assert!(text.contains("store.url"), "{text}");
        let e = Store::open(&settings("")).await.err().unwrap();
        assert!(format!("{e:#}").contains("store.url"));
    }

    /// Two "instances" deciding for the same run at once never lose an update: `with_runs`
    /// holds the run's row lock for the whole decision.
    #[tokio::test]
    async fn with_runs_is_serialised_across_instances() {
        let url = super::test_server::database();
        let a = Store::open(&settings(&url)).await.unwrap();
        let b = Store::open(&settings(&url)).await.unwrap();
        let now = crate::domain::now_ms();
        a.insert_run(&conformance_run("r", now)).await.unwrap();
        let bump = |s: Store| async move {
            for _ in 0..25 {
                s.with_runs(&["r"], |runs| {
                    let r = runs.get_mut("r").unwrap();
                    r.run.illegal_transitions += 1;
                    r.changed = true;
                })
                .await
                .unwrap();
            }
        };
        tokio::join!(bump(a.clone()), bump(b.clone()));
        assert_eq!(a.get_run("r").await.unwrap().unwrap().illegal_transitions, 50);
    }

    /// A row one instance claimed is not taken by another until the lease expires; then any
    /// instance takes it (and holds it in turn); the next row of a chain finished by an instance
    /// is promoted already leased to it.
    #[tokio::test]
    async fn claims_are_leased_to_their_instance_until_they_expire() {
        use crate::store::Next;

        let url = super::test_server::database();
        let a = Store::open(&settings(&url)).await.unwrap();
        let b = Store::open(&settings(&url)).await.unwrap();
        let lease = 60_000;
        let now = crate::domain::now_ms();
        let rows = [
            conformance::delivery("x1", Some("t|x"), Some("x"), now),
            conformance::delivery("x2", Some("t|x"), Some("x"), now),
            conformance::delivery("y1", Some("t|y"), Some("y"), now),
        ];
        let claimed = a
            .enqueue_claiming(&rows, &[], now, &HashSet::new(), |_| {})
            .await
            .unwrap();
        assert_eq!(conformance::ids(&claimed), ["x1", "y1"]);
        assert!(b.due(now, 10, &[]).await.unwrap().is_empty(), "leased to a");
        assert_eq!(conformance::ids(&a.due(now, 10, &[]).await.unwrap()), ["x1", "y1"]);

        // a "dies": once its leases expire, b takes both heads, and a no longer can.
        let later = now + lease + 1;
        let taken = b.due(later, 10, &[]).await.unwrap();
        assert_eq!(conformance::ids(&taken), ["x1", "y1"]);
        assert!(a.due(later, 10, &[]).await.unwrap().is_empty(), "leased to b");

        // b finishes x1: x2 is promoted leased to b; a retry releases y1's lease.
        let x1 = taken.iter().find(|q| q.id == "x1").unwrap();
        let y1 = taken.iter().find(|q| q.id == "y1").unwrap();
        let done = b
            .complete(
                &[
                    conformance::completion(x1, Next::Delivered, later),
                    conformance::completion(y1, Next::Retry { at_ms: later + 10 }, later),
                ],
                later,
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(conformance::ids(&done.promoted), ["x2"]);
        assert_eq!(conformance::ids(&a.due(later + 10, 10, &[]).await.unwrap()), ["y1"]);
        assert!(b.due(later + 10, 10, &[]).await.unwrap().iter().all(|q| q.id != "y1"));
        assert_eq!(conformance::ids(&b.due(later + 10, 10, &[]).await.unwrap()), ["x2"]);
    }

    /// Instances polling together never take the same row (an instance's own leased rows are
    /// answered to it again, as its in-memory claims are).
    #[tokio::test]
    async fn instances_polling_together_take_disjoint_rows() {
        let url = super::test_server::database();
        let a = Store::open(&settings(&url)).await.unwrap();
        let b = Store::open(&settings(&url)).await.unwrap();
        let now = crate::domain::now_ms();
        let rows: Vec<_> = (0..200)
            .map(|i| conformance::delivery(&format!("d{i}"), Some(&format!("t|{i}")), None, now))
            .collect();
        // Queued by a third instance, whose leases have expired by `later`.
        let c = Store::open(&settings(&url)).await.unwrap();
        c.enqueue(&rows, &[], now).await.unwrap();
        c.close().await;
        let later = now + 60_001;
        let (ta, tb) = tokio::join!(a.due(later, 100, &[]), b.due(later, 100, &[]));
        let (ta, tb) = (ta.unwrap(), tb.unwrap());
        let ia: HashSet<_> = ta.iter().map(|q| q.id.clone()).collect();
        let ib: HashSet<_> = tb.iter().map(|q| q.id.clone()).collect();
        assert!(ia.is_disjoint(&ib), "{:?}", ia.intersection(&ib).collect::<Vec<_>>());
        assert_eq!(ia.len() + ib.len(), 200);
    }

    fn conformance_run(id: &str, now: i64) -> crate::runs::model::Run {
        conformance::run(id, now)
    }
}
