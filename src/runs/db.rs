//! SQL for sync jobs and runs (SQLite, the store's pool; own tables, see `super::migrate`).

use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

use super::model::{ErrorHandling, ResourceSpec, Run, Stats, Status, SyncJob};
use crate::store::Page;

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sync_jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  integration_name TEXT NOT NULL,
  args_schema TEXT,
  resources TEXT NOT NULL,
  environment_id TEXT,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sync_jobs_integration ON sync_jobs(integration_name, seq);
CREATE TABLE IF NOT EXISTS sync_job_runs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  sync_job_id TEXT NOT NULL,
  integrated_account_id TEXT NOT NULL,
  webhook_id TEXT,
  daemon_group_key TEXT,
  daemon_id TEXT,
  callback_url TEXT,
  args TEXT NOT NULL,
  resources TEXT NOT NULL,
  sync_job TEXT NOT NULL,
  error_handling TEXT NOT NULL,
  ignore_previous_run INTEGER NOT NULL,
  status TEXT NOT NULL,
  resource_stats TEXT NOT NULL DEFAULT '{}',
  illegal_transitions INTEGER NOT NULL DEFAULT 0,
  stop_reason TEXT,
  batch_errors TEXT NOT NULL DEFAULT '[]',
  batch_count INTEGER NOT NULL DEFAULT 0,
  batch_bytes INTEGER NOT NULL DEFAULT 0,
  batch_since INTEGER,
  batch_seq INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  started_at INTEGER,
  finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS sync_job_runs_job ON sync_job_runs(sync_job_id, integrated_account_id, status);
CREATE INDEX IF NOT EXISTS sync_job_runs_batches ON sync_job_runs(batch_since) WHERE batch_since IS NOT NULL;
CREATE TABLE IF NOT EXISTS eloqua_syncs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  synced_instance_uri TEXT NOT NULL,
  callback_url TEXT,
  status TEXT NOT NULL,
  created_by TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
"#;

fn page<T>(mut rows: Vec<(i64, T)>, limit: i64) -> Page<T> {
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|(seq, _)| seq.to_string())
    } else {
        None
    };
    Page {
        results: rows.into_iter().map(|(_, t)| t).collect(),
        next_cursor,
    }
}

fn json_col(r: &SqliteRow, col: &str) -> Value {
    r.get::<Option<String>, _>(col)
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

fn job_from_row(r: &SqliteRow) -> anyhow::Result<SyncJob> {
    let resources: Vec<ResourceSpec> = serde_json::from_str(&r.get::<String, _>("resources"))?;
    Ok(SyncJob {
        id: r.get("id"),
        integration_name: r.get("integration_name"),
        args_schema: match json_col(r, "args_schema") {
            Value::Null => None,
            v => Some(v),
        },
        resources,
        environment_id: r.get("environment_id"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        seq: r.get("seq"),
    })
}

pub(crate) fn run_from_row(r: &SqliteRow) -> Run {
    let stats: Stats = r
        .get::<Option<String>, _>("resource_stats")
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    Run {
        id: r.get("id"),
        sync_job_id: r.get("sync_job_id"),
        integrated_account_id: r.get("integrated_account_id"),
        webhook_id: r.get("webhook_id"),
        daemon_group_key: r.get("daemon_group_key"),
        daemon_id: r.get("daemon_id"),
        callback_url: r.get("callback_url"),
        args: json_col(r, "args"),
        resources: json_col(r, "resources"),
        sync_job: json_col(r, "sync_job"),
        error_handling: ErrorHandling::parse(&r.get::<String, _>("error_handling")),
        ignore_previous_run: r.get::<i64, _>("ignore_previous_run") != 0,
        status: Status::parse(&r.get::<String, _>("status")).unwrap_or(Status::Created),
        resource_stats: stats,
        illegal_transitions: r.get("illegal_transitions"),
        stop_reason: r.get("stop_reason"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        seq: r.get("seq"),
    }
}

// ---- jobs --------------------------------------------------------------------------------------

pub async fn insert_job(pool: &SqlitePool, j: &SyncJob) -> anyhow::Result<SyncJob> {
    let seq = sqlx::query(
        "INSERT INTO sync_jobs (id, integration_name, args_schema, resources, environment_id, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&j.id)
    .bind(&j.integration_name)
    .bind(j.args_schema.as_ref().map(|v| v.to_string()))
    .bind(serde_json::to_string(&j.resources)?)
    .bind(&j.environment_id)
    .bind(j.created_at)
    .bind(j.updated_at)
    .execute(pool)
    .await?
    .last_insert_rowid();
    Ok(SyncJob { seq, ..j.clone() })
}

pub async fn update_job(pool: &SqlitePool, j: &SyncJob) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE sync_jobs SET integration_name = ?, args_schema = ?, resources = ?, environment_id = ?, updated_at = ? \
         WHERE id = ?",
    )
    .bind(&j.integration_name)
    .bind(j.args_schema.as_ref().map(|v| v.to_string()))
    .bind(serde_json::to_string(&j.resources)?)
    .bind(&j.environment_id)
    .bind(j.updated_at)
    .bind(&j.id)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn get_job(pool: &SqlitePool, id: &str) -> anyhow::Result<Option<SyncJob>> {
    sqlx::query("SELECT * FROM sync_jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(job_from_row)
        .transpose()
}

pub async fn list_jobs(
    pool: &SqlitePool,
    integration_name: Option<&str>,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<SyncJob>> {
    let rows = match integration_name {
        Some(n) => {
            sqlx::query("SELECT * FROM sync_jobs WHERE seq > ? AND integration_name = ? ORDER BY seq LIMIT ?")
                .bind(after)
                .bind(n)
                .bind(limit + 1)
                .fetch_all(pool)
                .await?
        }
        None => {
            sqlx::query("SELECT * FROM sync_jobs WHERE seq > ? ORDER BY seq LIMIT ?")
                .bind(after)
                .bind(limit + 1)
                .fetch_all(pool)
                .await?
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push((r.get::<i64, _>("seq"), job_from_row(r)?));
    }
    Ok(page(out, limit))
}

/// Delete a job unless it has active runs. `Ok(Err(n))`: n active runs refused the delete.
pub async fn delete_job(pool: &SqlitePool, id: &str) -> anyhow::Result<Result<bool, i64>> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let active: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sync_job_runs WHERE sync_job_id = ? AND status IN ('created', 'running', 'rate_limited')",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if active > 0 {
        return Ok(Err(active));
    }
    let n = sqlx::query("DELETE FROM sync_jobs WHERE id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(Ok(n > 0))
}

// ---- runs --------------------------------------------------------------------------------------

pub async fn insert_run(pool: &SqlitePool, r: &Run) -> anyhow::Result<Run> {
    let seq = sqlx::query(
        "INSERT INTO sync_job_runs (id, sync_job_id, integrated_account_id, webhook_id, daemon_group_key, daemon_id, \
         callback_url, args, resources, sync_job, error_handling, ignore_previous_run, status, resource_stats, \
         created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&r.id)
    .bind(&r.sync_job_id)
    .bind(&r.integrated_account_id)
    .bind(&r.webhook_id)
    .bind(&r.daemon_group_key)
    .bind(&r.daemon_id)
    .bind(&r.callback_url)
    .bind(r.args.to_string())
    .bind(r.resources.to_string())
    .bind(r.sync_job.to_string())
    .bind(r.error_handling.as_str())
    .bind(r.ignore_previous_run as i64)
    .bind(r.status.as_str())
    .bind(serde_json::to_string(&r.resource_stats)?)
    .bind(r.created_at)
    .bind(r.updated_at)
    .execute(pool)
    .await?
    .last_insert_rowid();
    Ok(Run { seq, ..r.clone() })
}

pub async fn get_run(pool: &SqlitePool, id: &str) -> anyhow::Result<Option<Run>> {
    Ok(sqlx::query("SELECT * FROM sync_job_runs WHERE id = ?")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(run_from_row))
}

#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct RunFilter {
    pub sync_job_id: Option<String>,
    pub status: Option<String>,
    pub integrated_account_id: Option<String>,
    pub webhook_id: Option<String>,
}

pub async fn list_runs(pool: &SqlitePool, f: &RunFilter, after: i64, limit: i64) -> anyhow::Result<Page<Run>> {
    let mut sql = String::from("SELECT * FROM sync_job_runs WHERE seq > ?");
    let mut binds = Vec::new();
    for (col, v) in [
        ("sync_job_id", &f.sync_job_id),
        ("status", &f.status),
        ("integrated_account_id", &f.integrated_account_id),
        ("webhook_id", &f.webhook_id),
    ] {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {col} = ?"));
            binds.push(v.clone());
        }
    }
    sql.push_str(" ORDER BY seq LIMIT ?");
    let mut q = sqlx::query(&sql).bind(after);
    for b in &binds {
        q = q.bind(b);
    }
    let rows = q.bind(limit + 1).fetch_all(pool).await?;
    Ok(page(
        rows.iter().map(|r| (r.get::<i64, _>("seq"), run_from_row(r))).collect(),
        limit,
    ))
}

/// Finish time of the last completed run of this job and account.
pub async fn previous_run_date(pool: &SqlitePool, job: &str, account: &str) -> anyhow::Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT finished_at FROM sync_job_runs WHERE sync_job_id = ? AND integrated_account_id = ? \
         AND status = 'completed' AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1",
    )
    .bind(job)
    .bind(account)
    .fetch_optional(pool)
    .await?
    .flatten())
}

pub async fn delete_run(pool: &SqlitePool, id: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query("DELETE FROM sync_job_runs WHERE id = ?")
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected()
        > 0)
}

// ---- Eloqua-style syncs ------------------------------------------------------------------------

pub struct EloquaSync {
    pub n: i64,
    pub synced_instance_uri: String,
    pub callback_url: Option<String>,
    pub status: String,
    pub created_by: String,
    pub created_at: i64,
}

pub async fn insert_eloqua_sync(
    pool: &SqlitePool,
    uri: &str,
    callback_url: Option<&str>,
    created_by: &str,
    now: i64,
) -> anyhow::Result<EloquaSync> {
    let n = sqlx::query(
        "INSERT INTO eloqua_syncs (synced_instance_uri, callback_url, status, created_by, created_at) VALUES (?, ?, 'pending', ?, ?)",
    )
    .bind(uri)
    .bind(callback_url)
    .bind(created_by)
    .bind(now)
    .execute(pool)
    .await?
    .last_insert_rowid();
    Ok(EloquaSync {
        n,
        synced_instance_uri: uri.to_string(),
        callback_url: callback_url.map(str::to_string),
        status: "pending".into(),
        created_by: created_by.to_string(),
        created_at: now,
    })
}

pub async fn get_eloqua_sync(pool: &SqlitePool, n: i64) -> anyhow::Result<Option<EloquaSync>> {
    Ok(sqlx::query("SELECT * FROM eloqua_syncs WHERE seq = ?")
        .bind(n)
        .fetch_optional(pool)
        .await?
        .map(|r| EloquaSync {
            n: r.get("seq"),
            synced_instance_uri: r.get("synced_instance_uri"),
            callback_url: r.get("callback_url"),
            status: r.get("status"),
            created_by: r.get("created_by"),
            created_at: r.get("created_at"),
        }))
}
