//! Versioned schema migrations (`migrations/postgres/`, compiled in), applied at open.
//!
//! Like SQLite's (`super::super::sqlite::migrate`): `schema_version` records the versions
//! applied, each one in the same transaction as its row. Instances that start together take
//! `pg_advisory_lock` first, so one migrates and the others then find the schema up to date.

use anyhow::Context;
use sqlx::PgPool;

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// In version order; a shipped file is never edited (see `migrations/README.md`).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "sync_fronts",
        sql: include_str!("../../../migrations/postgres/0002_sync_fronts.sql"),
    },
    Migration {
        version: 3,
        name: "census_syncs",
        sql: include_str!("../../../migrations/postgres/0003_census_syncs.sql"),
    },
    Migration {
        version: 4,
        name: "retention",
        sql: include_str!("../../../migrations/postgres/0004_retention.sql"),
    },
    Migration {
        version: 5,
        name: "webhook_overrides",
        sql: include_str!("../../../migrations/postgres/0005_webhook_overrides.sql"),
    },
    Migration {
        version: 6,
        name: "registry_version",
        sql: include_str!("../../../migrations/postgres/0006_registry_version.sql"),
    },
    Migration {
        version: 7,
        name: "first_attempt",
        sql: include_str!("../../../migrations/postgres/0007_first_attempt.sql"),
    },
    Migration {
        version: 8,
        name: "delivery_bodies",
        sql: include_str!("../../../migrations/postgres/0008_delivery_bodies.sql"),
    },
    Migration {
        version: 9,
        name: "no_run_index",
        sql: include_str!("../../../migrations/postgres/0009_no_run_index.sql"),
    },
];

/// The schema version this build migrates to.
#[cfg(test)]
pub(super) fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The advisory lock key of syncrelay's migrations (any constant shared by every instance).
const LOCK_KEY: i64 = 0x5359_4e43_5245_4c41; // "SYNCRELA"

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (\
     version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)";

pub(super) async fn run(pool: &PgPool) -> anyhow::Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    let out = migrate(&mut conn, latest).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await;
    out?;
    unlock?;
    Ok(())
}

async fn migrate(conn: &mut sqlx::PgConnection, latest: i64) -> anyhow::Result<()> {
    sqlx::raw_sql(VERSION_TABLE).execute(&mut *conn).await?;
    let at: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *conn)
        .await?;
    anyhow::ensure!(
        at <= latest,
        "the database is at schema version {at}, newer than this build knows ({latest}): run a newer syncrelay"
    );
    for m in MIGRATIONS.iter().filter(|m| m.version > at) {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(m.sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("schema version {} ({})", m.version, m.name))?;
        sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(m.version)
            .bind(m.name)
            .bind(crate::domain::now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, name = m.name, "store schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_move_to_their_own_table_and_go_with_their_deliveries() {
        let url = super::super::test_server::database();
        let pool = PgPool::connect(&url).await.unwrap();
        // A store at version 7, bodies inline, with one queued and one delivered row.
        sqlx::raw_sql(VERSION_TABLE).execute(&pool).await.unwrap();
        for m in MIGRATIONS.iter().filter(|m| m.version <= 7) {
            sqlx::raw_sql(m.sql).execute(&pool).await.unwrap();
            sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, 0)")
                .bind(m.version)
                .bind(m.name)
                .execute(&pool)
                .await
                .unwrap();
        }
        for (id, state, body) in [("d1", "ready", r#"{"n":1}"#), ("d2", "delivered", r#"{"n":2}"#)] {
            sqlx::query(
                "INSERT INTO deliveries (id, event_id, event, kind, target_key, body, state, next_attempt_at, created_at) \
                 VALUES ($1, 'e', 'record', 'webhook', 't', $2, $3, 0, 0)",
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
}
