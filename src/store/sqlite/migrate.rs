//! Versioned schema migrations (`migrations/sqlite/`, compiled in), applied at open.
//!
//! A database records the versions applied to it in `schema_version`. Each missing version is
//! applied in the same transaction as its `schema_version` row, so a crash leaves a database at
//! one version or the next, never between. Opening a database a newer build has migrated fails
//! rather than run against tables this build does not know.

use anyhow::Context;
use sqlx::SqlitePool;

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
    /// A query answering non-zero when the change is already in place: SQLite has no
    /// `ADD COLUMN IF NOT EXISTS`, and builds from before versioned schemas made some changes
    /// without recording them.
    present: Option<&'static str>,
}

/// In version order; a shipped file is never edited (see `migrations/README.md`).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../../migrations/sqlite/0001_initial.sql"),
        present: None,
    },
    Migration {
        version: 2,
        name: "delivery_source",
        sql: include_str!("../../../migrations/sqlite/0002_delivery_source.sql"),
        present: Some("SELECT COUNT(*) FROM pragma_table_info('deliveries') WHERE name = 'source'"),
    },
    Migration {
        version: 3,
        name: "sync_fronts",
        sql: include_str!("../../../migrations/sqlite/0003_sync_fronts.sql"),
        present: None,
    },
    Migration {
        version: 4,
        name: "census_syncs",
        sql: include_str!("../../../migrations/sqlite/0004_census_syncs.sql"),
        present: None,
    },
    Migration {
        version: 5,
        name: "retention",
        sql: include_str!("../../../migrations/sqlite/0005_retention.sql"),
        present: None,
    },
    Migration {
        version: 6,
        name: "webhook_overrides",
        sql: include_str!("../../../migrations/sqlite/0006_webhook_overrides.sql"),
        present: None,
    },
    Migration {
        version: 7,
        name: "leases",
        sql: include_str!("../../../migrations/sqlite/0007_leases.sql"),
        present: None,
    },
    Migration {
        version: 8,
        name: "first_attempt",
        sql: include_str!("../../../migrations/sqlite/0008_first_attempt.sql"),
        present: None,
    },
    Migration {
        version: 9,
        name: "delivery_bodies",
        sql: include_str!("../../../migrations/sqlite/0009_delivery_bodies.sql"),
        present: None,
    },
    Migration {
        version: 10,
        name: "queued_predicate",
        sql: include_str!("../../../migrations/sqlite/0010_queued_predicate.sql"),
        present: None,
    },
    Migration {
        version: 11,
        name: "queued_unfinished",
        sql: include_str!("../../../migrations/sqlite/0011_queued_unfinished.sql"),
        present: None,
    },
];

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (\
     version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)";

async fn current(conn: &mut sqlx::SqliteConnection) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            .fetch_one(conn)
            .await?,
    )
}

pub(super) async fn run(pool: &SqlitePool) -> anyhow::Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql(VERSION_TABLE).execute(&mut *conn).await?;
    // Read first without the write lock: at an up-to-date database (every start but the first
    // after an upgrade) opening takes no lock another process would wait for.
    let at = current(&mut conn).await?;
    anyhow::ensure!(
        at <= latest,
        "the database is at schema version {at}, newer than this build knows ({latest}): run a newer syncrelay"
    );
    if at == latest {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
    // Another process may have migrated while we waited for the lock.
    let at = current(&mut tx).await?;
    for m in MIGRATIONS.iter().filter(|m| m.version > at) {
        let present = match m.present {
            Some(q) => sqlx::query_scalar::<_, i64>(q).fetch_one(&mut *tx).await? != 0,
            None => false,
        };
        if !present {
            sqlx::raw_sql(m.sql)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("schema version {} ({})", m.version, m.name))?;
        }
        sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)")
            .bind(m.version)
            .bind(m.name)
            .bind(crate::domain::now_ms())
            .execute(&mut *tx)
            .await?;
        tracing::info!(version = m.version, name = m.name, "store schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    async fn pool(dir: &tempfile::TempDir) -> SqlitePool {
        let opts = SqliteConnectOptions::new()
            .filename(dir.path().join("m.db"))
            .create_if_missing(true);
        SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn applies_once_and_adopts_a_database_made_before_versions() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        // A database made by the unversioned build: its tables, with data, and no schema_version.
        sqlx::raw_sql(MIGRATIONS[0].sql).execute(&pool).await.unwrap();
        sqlx::query("INSERT INTO kv (key, value) VALUES ('k', 'v')")
            .execute(&pool)
            .await
            .unwrap();
        run(&pool).await.unwrap();
        run(&pool).await.unwrap();
        let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
        assert!(has_source(&pool).await);
        let v: String = sqlx::query_scalar("SELECT value FROM kv WHERE key = 'k'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(v, "v");
    }

    /// Bring a new database to schema `version` as the builds of that version left it.
    async fn at_version(pool: &SqlitePool, version: usize) {
        sqlx::raw_sql(VERSION_TABLE).execute(pool).await.unwrap();
        for (i, m) in MIGRATIONS.iter().take(version).enumerate() {
            sqlx::raw_sql(m.sql).execute(pool).await.unwrap();
            sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, 0)")
                .bind(i as i64 + 1)
                .bind(m.name)
                .execute(pool)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn bodies_move_to_their_own_table_and_go_with_their_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        // A store at version 8, bodies inline, with one queued and one delivered row.
        at_version(&pool, 8).await;
        for (id, state, body) in [("d1", "ready", r#"{"n":1}"#), ("d2", "delivered", r#"{"n":2}"#)] {
            sqlx::query(
                "INSERT INTO deliveries (id, event_id, event, kind, target_key, body, state, next_attempt_at, created_at) \
                 VALUES (?, 'e', 'record', 'webhook', 't', ?, ?, 0, 0)",
            )
            .bind(id)
            .bind(body)
            .bind(state)
            .execute(&pool)
            .await
            .unwrap();
        }
        run(&pool).await.unwrap();
        let bodies: Vec<(String, String)> =
            sqlx::query_as("SELECT id, body FROM deliveries JOIN delivery_bodies USING (seq) ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            bodies,
            vec![("d1".into(), r#"{"n":1}"#.into()), ("d2".into(), r#"{"n":2}"#.into())]
        );
        // Deleting a delivery (retention, a chain rewritten) deletes its body.
        sqlx::query("DELETE FROM deliveries WHERE id = 'd2'")
            .execute(&pool)
            .await
            .unwrap();
        let left: Vec<String> = sqlx::query_scalar("SELECT body FROM delivery_bodies")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(left, vec![r#"{"n":1}"#.to_string()]);
    }

    #[tokio::test]
    async fn the_chain_index_holds_the_rows_queued_by_their_state() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        // A store at version 10, its chain index by state, with rows whose finish time agrees
        // with their state and two that a hand edit could have left disagreeing.
        at_version(&pool, 10).await;
        let rows = [
            ("waiting", "waiting", None),
            ("paused", "paused", None),
            ("delivered-unfinished", "delivered", None),
            ("ready-finished", "ready", Some(5)),
            ("dead", "dead", Some(6)),
        ];
        for (id, state, finished_at) in rows {
            sqlx::query(
                "INSERT INTO deliveries (id, event_id, event, kind, target_key, order_key, state, next_attempt_at, \
                 created_at, finished_at) VALUES (?, 'e', 'record', 'webhook', 't', 'k', ?, 7, 0, ?)",
            )
            .bind(id)
            .bind(state)
            .bind(finished_at)
            .execute(&pool)
            .await
            .unwrap();
        }
        run(&pool).await.unwrap();
        // Read through the index itself: it holds the rows queued by their state, as before.
        let queued: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM deliveries INDEXED BY deliveries_key WHERE order_key = 'k' AND finished_at IS NULL ORDER BY seq",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(queued, ["waiting", "paused", "ready-finished"]);
        let finished: Vec<(String, Option<i64>)> =
            sqlx::query_as("SELECT id, finished_at FROM deliveries WHERE finished_at IS NOT NULL ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            finished,
            [("delivered-unfinished".into(), Some(7)), ("dead".into(), Some(6))]
        );
    }

    async fn has_source(pool: &SqlitePool) -> bool {
        sqlx::query_scalar::<_, i64>(MIGRATIONS[1].present.unwrap())
            .fetch_one(pool)
            .await
            .unwrap()
            != 0
    }

    #[tokio::test]
    async fn adopts_a_database_that_has_an_unrecorded_change() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        // Made by an unversioned build that already added `deliveries.source`.
        sqlx::raw_sql(MIGRATIONS[0].sql).execute(&pool).await.unwrap();
        sqlx::raw_sql(MIGRATIONS[1].sql).execute(&pool).await.unwrap();
        run(&pool).await.unwrap();
        assert!(has_source(&pool).await);
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_version")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn refuses_a_database_from_a_newer_build() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        run(&pool).await.unwrap();
        sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES (999, 'future', 0)")
            .execute(&pool)
            .await
            .unwrap();
        let e = run(&pool).await.unwrap_err();
        assert!(format!("{e:#}").contains("schema version 999"), "{e:#}");
    }
}
