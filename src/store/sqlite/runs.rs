//! [`RunStore`] on SQLite: `sync_jobs`, `sync_job_runs` (with the lifecycle's batch state),
//! `eloqua_syncs` and `commands`.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{json_list, Cols, SqliteStore};
use crate::runs::model::{ErrorHandling, ResourceSpec, Run, Stats, Status, SyncJob};
use crate::store::{
    CensusSyncRow, CommandRow, Decide, EloquaSync, Page, RunBatch, RunFilter, RunStore, RunsLocked, SyncUnit,
};

fn json_col(r: &impl Cols, col: &str) -> anyhow::Result<Value> {
    Ok(r.col::<Option<String>>(col)?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null))
}

fn job_from_row(r: &SqliteRow) -> anyhow::Result<SyncJob> {
    let resources: Vec<ResourceSpec> = serde_json::from_str(&r.get::<String, _>("resources"))?;
    Ok(SyncJob {
        id: r.get("id"),
        integration_name: r.get("integration_name"),
        args_schema: match json_col(r, "args_schema")? {
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

fn run_from_row(r: &impl Cols) -> anyhow::Result<Run> {
    let stats: Stats = r
        .col::<Option<String>>("resource_stats")?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    Ok(Run {
        id: r.col("id")?,
        sync_job_id: r.col("sync_job_id")?,
        integrated_account_id: r.col("integrated_account_id")?,
        webhook_id: r.col("webhook_id")?,
        daemon_group_key: r.col("daemon_group_key")?,
        daemon_id: r.col("daemon_id")?,
        callback_url: r.col("callback_url")?,
        args: json_col(r, "args")?,
        resources: json_col(r, "resources")?,
        sync_job: json_col(r, "sync_job")?,
        error_handling: ErrorHandling::parse(&r.col::<String>("error_handling")?),
        ignore_previous_run: r.col::<i64>("ignore_previous_run")? != 0,
        status: Status::parse(&r.col::<String>("status")?).unwrap_or(Status::Created),
        resource_stats: stats,
        illegal_transitions: r.col("illegal_transitions")?,
        stop_reason: r.col("stop_reason")?,
        created_at: r.col("created_at")?,
        updated_at: r.col("updated_at")?,
        started_at: r.col("started_at")?,
        finished_at: r.col("finished_at")?,
        sync_unit_id: r.col("sync_unit_id")?,
        seq: r.col("seq")?,
    })
}

fn census_from_row(r: &SqliteRow) -> CensusSyncRow {
    CensusSyncRow {
        id: r.get("id"),
        sync_job_id: r.get("sync_job_id"),
        webhook_id: r.get("webhook_id"),
        paused: r.get::<i64, _>("paused") != 0,
        config: r.get("config"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

fn eloqua_from_row(r: &SqliteRow) -> EloquaSync {
    EloquaSync {
        n: r.get("seq"),
        synced_instance_uri: r.get("synced_instance_uri"),
        callback_url: r.get("callback_url"),
        status: r.get("status"),
        created_by: r.get("created_by"),
        created_at: r.get("created_at"),
        run_id: r.get("run_id"),
        callback_queued_at: r.get("callback_queued_at"),
    }
}

fn unit_from_row(r: &SqliteRow) -> SyncUnit {
    SyncUnit {
        id: r.get("id"),
        external_sync_unit: r.get("external_sync_unit"),
        keyring: r.get("keyring"),
        name: r.get("name"),
        is_archived: r.get::<i64, _>("is_archived") != 0,
        object_version: r.get("object_version"),
        created_by: r.get("created_by"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        seq: r.get("seq"),
    }
}

fn batch_from_row(r: &impl Cols) -> anyhow::Result<RunBatch> {
    Ok(RunBatch {
        errors: serde_json::from_str(&r.col::<String>("batch_errors")?).unwrap_or_default(),
        bytes: r.col("batch_bytes")?,
        since: r.col("batch_since")?,
        seq: r.col("batch_seq")?,
    })
}

/// Write back what the lifecycle changes on a run (its identity and settings never change).
/// Inside a turn on the write connection (which holds the write lock): load these runs, let
/// `decide` change them, save the ones it marked changed (a turn that saved none does not wait
/// for a commit: see `group`). Shared by [`RunStore::with_runs`] and the outcome writer's
/// transactions (run counts).
pub(super) fn decide_runs(
    c: &rusqlite::Connection,
    ids: &[&str],
    decide: impl FnOnce(&mut RunsLocked),
) -> anyhow::Result<()> {
    let loaded = if ids.is_empty() {
        Vec::new()
    } else {
        let mut st = c.prepare_cached("SELECT * FROM sync_job_runs WHERE id IN (SELECT value FROM json_each(?))")?;
        let mut rows = st.query([json_list(ids)?])?;
        let mut loaded = Vec::new();
        while let Some(r) = rows.next()? {
            loaded.push((run_from_row(r)?, batch_from_row(r)?));
        }
        loaded
    };
    let mut locked = RunsLocked::new(loaded);
    decide(&mut locked);
    for r in locked.changed() {
        save_run(c, &r.run, &r.batch)?;
    }
    Ok(())
}

fn save_run(c: &rusqlite::Connection, run: &Run, b: &RunBatch) -> anyhow::Result<()> {
    c.prepare_cached(
        "UPDATE sync_job_runs SET status = ?, resource_stats = ?, illegal_transitions = ?, stop_reason = ?, \
         batch_errors = ?, batch_count = ?, batch_bytes = ?, batch_since = ?, batch_seq = ?, updated_at = ?, \
         started_at = ?, finished_at = ? WHERE id = ?",
    )?
    .execute(rusqlite::params![
        run.status.as_str(),
        serde_json::to_string(&run.resource_stats)?,
        run.illegal_transitions,
        run.stop_reason,
        serde_json::to_string(&b.errors)?,
        b.errors.len() as i64,
        b.bytes,
        b.since,
        b.seq,
        run.updated_at,
        run.started_at,
        run.finished_at,
        run.id
    ])?;
    Ok(())
}

impl SqliteStore {
    /// Which of these runs exist (one read, no write lock).
    async fn known_runs(&self, ids: &[&str]) -> anyhow::Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(
            sqlx::query_scalar("SELECT id FROM sync_job_runs WHERE id IN (SELECT value FROM json_each(?))")
                .bind(json_list(ids)?)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

#[async_trait]
impl RunStore for SqliteStore {
    // ---- jobs -----------------------------------------------------------------------------------

    async fn insert_job(&self, j: &SyncJob) -> anyhow::Result<SyncJob> {
        let seq = self.execute(sqlx::query(
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
        )
        .await?
        .last_insert_rowid();
        Ok(SyncJob { seq, ..j.clone() })
    }

    async fn update_job(&self, j: &SyncJob) -> anyhow::Result<()> {
        self.execute(sqlx::query(
            "UPDATE sync_jobs SET integration_name = ?, args_schema = ?, resources = ?, environment_id = ?, updated_at = ? \
             WHERE id = ?",
        )
        .bind(&j.integration_name)
        .bind(j.args_schema.as_ref().map(|v| v.to_string()))
        .bind(serde_json::to_string(&j.resources)?)
        .bind(&j.environment_id)
        .bind(j.updated_at)
        .bind(&j.id)
        )
        .await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> anyhow::Result<Option<SyncJob>> {
        sqlx::query("SELECT * FROM sync_jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
    }

    async fn list_jobs(&self, integration_name: Option<&str>, after: i64, limit: i64) -> anyhow::Result<Page<SyncJob>> {
        let rows = match integration_name {
            Some(n) => {
                sqlx::query("SELECT * FROM sync_jobs WHERE seq > ? AND integration_name = ? ORDER BY seq LIMIT ?")
                    .bind(after)
                    .bind(n)
                    .bind(limit + 1)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM sync_jobs WHERE seq > ? ORDER BY seq LIMIT ?")
                    .bind(after)
                    .bind(limit + 1)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push((r.get::<i64, _>("seq"), job_from_row(r)?));
        }
        Ok(Page::from_rows(out, limit))
    }

    async fn delete_job(&self, id: &str) -> anyhow::Result<Result<bool, i64>> {
        let mut tx = self.writer.begin().await?;
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

    // ---- runs -----------------------------------------------------------------------------------

    async fn insert_run(&self, r: &Run) -> anyhow::Result<Run> {
        let seq = self.execute(sqlx::query(
            "INSERT INTO sync_job_runs (id, sync_job_id, integrated_account_id, webhook_id, daemon_group_key, daemon_id, \
             callback_url, args, resources, sync_job, error_handling, ignore_previous_run, status, resource_stats, \
             created_at, updated_at, sync_unit_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(&r.sync_unit_id)
        )
        .await?
        .last_insert_rowid();
        Ok(Run { seq, ..r.clone() })
    }

    async fn get_run(&self, id: &str) -> anyhow::Result<Option<Run>> {
        Ok(sqlx::query("SELECT * FROM sync_job_runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()?)
    }

    async fn list_runs(&self, f: &RunFilter, after: i64, limit: i64) -> anyhow::Result<Page<Run>> {
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
        let rows = q.bind(limit + 1).fetch_all(&self.pool).await?;
        Ok(Page::from_rows(
            rows.iter()
                .map(|r| Ok((r.get::<i64, _>("seq"), run_from_row(r)?)))
                .collect::<anyhow::Result<_>>()?,
            limit,
        ))
    }

    async fn previous_run_date(&self, job: &str, account: &str) -> anyhow::Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT finished_at FROM sync_job_runs WHERE sync_job_id = ? AND integrated_account_id = ? \
             AND status = 'completed' AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1",
        )
        .bind(job)
        .bind(account)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    async fn delete_run(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .execute(sqlx::query("DELETE FROM sync_job_runs WHERE id = ?").bind(id))
            .await?
            .rows_affected()
            > 0)
    }

    // ---- the run lifecycle ----------------------------------------------------------------------

    async fn with_runs(&self, ids: &[&str], decide: Decide<'_>) -> anyhow::Result<()> {
        // Most events of a batch may belong to runs made elsewhere: finding that out costs one
        // read, and the write lock is taken only when some run is ours.
        let known = self.known_runs(ids).await?;
        if known.is_empty() {
            decide(&mut RunsLocked::default());
            return Ok(());
        }
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        self.writer
            .write(|c| decide_runs(c, &known, |locked| decide(locked)))
            .await
    }

    async fn runs_with_due_batches(&self, since_before: i64, limit: i64) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM sync_job_runs WHERE batch_since IS NOT NULL AND batch_since <= ? ORDER BY batch_since LIMIT ?",
        )
        .bind(since_before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- Eloqua-style syncs ---------------------------------------------------------------------

    async fn insert_eloqua_sync(
        &self,
        uri: &str,
        callback_url: Option<&str>,
        run_id: Option<&str>,
        created_by: &str,
        now: i64,
    ) -> anyhow::Result<EloquaSync> {
        let n = self.execute(sqlx::query(
            "INSERT INTO eloqua_syncs (synced_instance_uri, callback_url, status, created_by, created_at, run_id) \
             VALUES (?, ?, 'pending', ?, ?, ?)",
        )
        .bind(uri)
        .bind(callback_url)
        .bind(created_by)
        .bind(now)
        .bind(run_id)
        )
        .await?
        .last_insert_rowid();
        Ok(EloquaSync {
            n,
            synced_instance_uri: uri.to_string(),
            callback_url: callback_url.map(str::to_string),
            status: "pending".into(),
            created_by: created_by.to_string(),
            created_at: now,
            run_id: run_id.map(str::to_string),
            callback_queued_at: None,
        })
    }

    async fn get_eloqua_sync(&self, n: i64) -> anyhow::Result<Option<EloquaSync>> {
        Ok(sqlx::query("SELECT * FROM eloqua_syncs WHERE seq = ?")
            .bind(n)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(eloqua_from_row))
    }

    async fn list_eloqua_syncs(&self, offset: i64, limit: i64) -> anyhow::Result<(Vec<EloquaSync>, i64)> {
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM eloqua_syncs")
            .fetch_one(&self.pool)
            .await?;
        let rows = sqlx::query("SELECT * FROM eloqua_syncs ORDER BY seq LIMIT ? OFFSET ?")
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        Ok((rows.iter().map(eloqua_from_row).collect(), total))
    }

    async fn eloqua_sync_for_run(&self, run_id: &str) -> anyhow::Result<Option<EloquaSync>> {
        Ok(sqlx::query("SELECT * FROM eloqua_syncs WHERE run_id = ?")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(eloqua_from_row))
    }

    async fn mark_eloqua_callback(&self, n: i64, at: Option<i64>) -> anyhow::Result<bool> {
        let q = match at {
            Some(t) => sqlx::query(
                "UPDATE eloqua_syncs SET callback_queued_at = ? WHERE seq = ? AND callback_queued_at IS NULL",
            )
            .bind(t),
            None => sqlx::query("UPDATE eloqua_syncs SET callback_queued_at = NULL WHERE seq = ?"),
        };
        Ok(self.execute(q.bind(n)).await?.rows_affected() > 0)
    }

    // ---- sync units -----------------------------------------------------------------------------

    async fn insert_sync_units(&self, units: &[SyncUnit]) -> anyhow::Result<Vec<SyncUnit>> {
        let mut tx = self.writer.begin().await?;
        let mut out = Vec::with_capacity(units.len());
        for u in units {
            let seq = sqlx::query(
                "INSERT INTO sync_units (id, external_sync_unit, keyring, name, is_archived, object_version, \
                 created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&u.id)
            .bind(&u.external_sync_unit)
            .bind(&u.keyring)
            .bind(&u.name)
            .bind(u.is_archived as i64)
            .bind(u.object_version)
            .bind(&u.created_by)
            .bind(u.created_at)
            .bind(u.updated_at)
            .execute(&mut *tx)
            .await?
            .last_insert_rowid();
            out.push(SyncUnit { seq, ..u.clone() });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn get_sync_unit(&self, id: &str) -> anyhow::Result<Option<SyncUnit>> {
        Ok(sqlx::query("SELECT * FROM sync_units WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(unit_from_row))
    }

    async fn list_sync_units(&self, after: i64, limit: i64) -> anyhow::Result<Page<SyncUnit>> {
        let rows = sqlx::query("SELECT * FROM sync_units WHERE seq > ? ORDER BY seq LIMIT ?")
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(Page::from_rows(
            rows.iter()
                .map(|r| (r.get::<i64, _>("seq"), unit_from_row(r)))
                .collect(),
            limit,
        ))
    }

    async fn update_sync_unit(&self, u: &SyncUnit) -> anyhow::Result<()> {
        self.execute(
            sqlx::query(
                "UPDATE sync_units SET name = ?, is_archived = ?, object_version = ?, updated_at = ? WHERE id = ?",
            )
            .bind(&u.name)
            .bind(u.is_archived as i64)
            .bind(u.object_version)
            .bind(u.updated_at)
            .bind(&u.id),
        )
        .await?;
        Ok(())
    }

    async fn latest_unit_run(&self, unit_id: &str) -> anyhow::Result<Option<(Run, i64)>> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sync_job_runs WHERE sync_unit_id = ?")
            .bind(unit_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(
            sqlx::query("SELECT * FROM sync_job_runs WHERE sync_unit_id = ? ORDER BY seq DESC LIMIT 1")
                .bind(unit_id)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| anyhow::Ok((run_from_row(&r)?, count)))
                .transpose()?,
        )
    }

    // ---- commands -------------------------------------------------------------------------------

    // ---- Census-style syncs ---------------------------------------------------------------------

    async fn insert_census_sync(&self, s: &CensusSyncRow) -> anyhow::Result<CensusSyncRow> {
        let mut tx = self.writer.begin().await?;
        let id: i64 = sqlx::query_scalar("INSERT INTO census_syncs (sync_job_id, webhook_id, paused, config, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id")
        .bind(&s.sync_job_id)
        .bind(&s.webhook_id)
        .bind(i64::from(s.paused))
        .bind(&s.config)
        .bind(s.created_at)
        .bind(s.updated_at)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CensusSyncRow { id, ..s.clone() })
    }

    async fn get_census_sync(&self, id: i64) -> anyhow::Result<Option<CensusSyncRow>> {
        Ok(sqlx::query("SELECT * FROM census_syncs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(census_from_row))
    }

    async fn list_census_syncs(&self, offset: i64, limit: i64) -> anyhow::Result<(Vec<CensusSyncRow>, i64)> {
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM census_syncs")
            .fetch_one(&self.pool)
            .await?;
        let rows = sqlx::query("SELECT * FROM census_syncs ORDER BY id LIMIT ? OFFSET ?")
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        Ok((rows.iter().map(census_from_row).collect(), total))
    }

    async fn all_census_syncs(&self) -> anyhow::Result<Vec<CensusSyncRow>> {
        let rows = sqlx::query("SELECT * FROM census_syncs ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(census_from_row).collect())
    }

    async fn update_census_sync(&self, s: &CensusSyncRow) -> anyhow::Result<bool> {
        Ok(self.execute(sqlx::query("UPDATE census_syncs SET sync_job_id = ?, webhook_id = ?, paused = ?, config = ?, updated_at = ? WHERE id = ?")
            .bind(&s.sync_job_id)
            .bind(&s.webhook_id)
            .bind(i64::from(s.paused))
            .bind(&s.config)
            .bind(s.updated_at)
            .bind(s.id)
            )
            .await?
            .rows_affected()
            > 0)
    }

    async fn delete_census_sync(&self, id: i64) -> anyhow::Result<bool> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM census_alert_state WHERE sync_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("DELETE FROM census_syncs WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn census_alert_step(
        &self,
        sync_id: i64,
        alert: &str,
        run_id: &str,
        firing: bool,
    ) -> anyhow::Result<Option<bool>> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("INSERT INTO census_alert_state (sync_id, alert) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(sync_id)
            .bind(alert)
            .execute(&mut *tx)
            .await?;
        let (last, was): (String, i64) =
            sqlx::query_as("SELECT last_run, firing FROM census_alert_state WHERE sync_id = ? AND alert = ?")
                .bind(sync_id)
                .bind(alert)
                .fetch_one(&mut *tx)
                .await?;
        if last == run_id {
            tx.commit().await?;
            return Ok(None);
        }
        sqlx::query("UPDATE census_alert_state SET last_run = ?, firing = ? WHERE sync_id = ? AND alert = ?")
            .bind(run_id)
            .bind(i64::from(firing))
            .bind(sync_id)
            .bind(alert)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(was != 0))
    }

    async fn insert_command(&self, key: &str, command: &str, now: i64) -> anyhow::Result<()> {
        self.execute(
            sqlx::query("INSERT INTO commands (key, command, created_at) VALUES (?, ?, ?)")
                .bind(key)
                .bind(command)
                .bind(now),
        )
        .await?;
        Ok(())
    }

    async fn list_commands(&self, after: i64, limit: i64) -> anyhow::Result<Page<CommandRow>> {
        let rows = sqlx::query("SELECT seq, key, command, created_at FROM commands WHERE seq > ? ORDER BY seq LIMIT ?")
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(Page::from_rows(
            rows.iter()
                .map(|r| {
                    let row = CommandRow {
                        seq: r.get("seq"),
                        key: r.get("key"),
                        command: r.get("command"),
                        created_at: r.get("created_at"),
                    };
                    (row.seq, row)
                })
                .collect(),
            limit,
        ))
    }
}
