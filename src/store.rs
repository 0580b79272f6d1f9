//! The durable store and embedded queue (SQLite, WAL). The only module that knows SQL.
//!
//! Queue model: every (event, target) pair is a row of `deliveries`. Rows that share an
//! `order_key` (target + run) are delivered strictly in `seq` order: only the oldest unfinished
//! row of a key is `ready` (eligible once `next_attempt_at` is due); the rows behind it are
//! `waiting` and are promoted, one at a time, in the same transaction that finishes their
//! predecessor. The dispatcher therefore only ever scans ready rows by due time, however long a
//! run's backlog grows behind a failing receiver.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::config::{StoreSettings, Synchronous};
use crate::signing::Secret;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS webhooks (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  target_url TEXT NOT NULL,
  event_types TEXT NOT NULL,
  is_active INTEGER NOT NULL,
  description TEXT,
  secret TEXT NOT NULL,
  previous_secret TEXT,
  previous_secret_expires_at INTEGER,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  event_id TEXT NOT NULL,
  event TEXT NOT NULL,
  run_id TEXT,
  kind TEXT NOT NULL,
  webhook_id TEXT,
  target_url TEXT,
  target_key TEXT NOT NULL,
  order_key TEXT,
  body TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
  first_attempt_at INTEGER,
  last_status INTEGER,
  last_error TEXT,
  created_at INTEGER NOT NULL,
  finished_at INTEGER,
  source TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_attempt_at, seq) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries(order_key, seq) WHERE state IN ('ready', 'waiting');
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_id);
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries(finished_at) WHERE state = 'delivered';
CREATE TABLE IF NOT EXISTS attempts (
  delivery_id TEXT NOT NULL,
  n INTEGER NOT NULL,
  started_at INTEGER NOT NULL,
  duration_ms INTEGER NOT NULL,
  status INTEGER,
  error TEXT,
  response_excerpt TEXT,
  PRIMARY KEY (delivery_id, n)
);
CREATE TABLE IF NOT EXISTS dead_letters (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  delivery_id TEXT,
  event_id TEXT NOT NULL,
  event TEXT NOT NULL,
  webhook_id TEXT,
  kind TEXT NOT NULL,
  reason TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  last_status INTEGER,
  last_error TEXT,
  raw TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  replayed_at INTEGER
);
CREATE INDEX IF NOT EXISTS dead_letters_open ON dead_letters(seq) WHERE replayed_at IS NULL;
CREATE TABLE IF NOT EXISTS commands (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL,
  command TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
"#;

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

#[derive(Clone)]
pub struct Webhook {
    pub id: String,
    pub target_url: String,
    pub event_types: Vec<String>,
    pub is_active: bool,
    pub description: Option<String>,
    pub secret: Secret,
    pub previous_secret: Option<(Secret, i64)>,
    pub created_at: i64,
    pub updated_at: i64,
    pub seq: i64,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("is_active", &self.is_active)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub event_id: String,
    pub event: String,
    pub run_id: Option<String>,
    pub kind: &'static str,
    pub webhook_id: Option<String>,
    pub target_url: Option<String>,
    pub target_key: String,
    pub order_key: Option<String>,
    pub body: String,
    pub created_at: i64,
    /// Attempts already made before it was queued (Kafka mode parks after in-memory attempts).
    pub attempts: i64,
    pub first_attempt_at: Option<i64>,
    /// Not before this time (ms); None = now.
    pub next_attempt_at: Option<i64>,
    /// Where the event came from, when a bus message (`topic/partition/offset`): the
    /// dead-letter topic's `x-dlq-source-*` headers.
    pub source: Option<String>,
    /// Attempts already made (in memory) before the row was written: kept in the attempt log.
    pub log: Vec<AttemptRecord>,
}

/// A delivery finished in memory (Kafka), written to the log as a finished row.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Its attempts are in `delivery.log`.
    pub delivery: NewDelivery,
    /// `delivered` or `dead`.
    pub state: &'static str,
}

#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub delivery_id: Option<String>,
    pub event_id: String,
    pub event: String,
    pub webhook_id: Option<String>,
    pub kind: &'static str,
    pub reason: &'static str,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub raw: String,
}

/// A queued delivery, as the dispatcher sees it.
#[derive(Debug, Clone)]
pub struct QueuedDelivery {
    pub seq: i64,
    pub id: String,
    pub event_id: String,
    pub event: String,
    pub run_id: Option<String>,
    pub kind: String,
    pub webhook_id: Option<String>,
    pub target_url: Option<String>,
    pub target_key: String,
    pub order_key: Option<String>,
    pub body: String,
    pub attempts: i64,
    pub first_attempt_at: Option<i64>,
    pub created_at: i64,
    pub source: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: i64,
    pub duration_ms: i64,
    pub status: Option<i64>,
    pub error: Option<String>,
    pub excerpt: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Next {
    Delivered,
    Retry { at_ms: i64 },
    Dead(NewDeadLetter),
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub seq: i64,
    pub delivery_id: String,
    pub order_key: Option<String>,
    pub attempt_no: i64,
    pub first_attempt_at: i64,
    pub attempt: AttemptRecord,
    pub next: Next,
    /// For the engine's bookkeeping and metrics; not stored.
    pub kind: &'static str,
    pub target_key: String,
    pub created_at: i64,
    /// The body actually sent when it differs from the queued one (a run's `completed` /
    /// `failed` gets its final counts at attempt time); stored so the log shows what was signed.
    pub body: Option<String>,
    /// For the run lifecycle's outcome counting; not stored.
    pub run_id: Option<String>,
    pub event: String,
    pub resource: Option<String>,
}

pub struct Page<T> {
    pub results: Vec<T>,
    pub next_cursor: Option<String>,
}

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

pub fn parse_cursor(c: Option<&str>) -> Result<i64, crate::error::ApiError> {
    match c {
        None | Some("") => Ok(0),
        Some(c) => c
            .parse::<i64>()
            .map_err(|_| crate::error::ApiError::field("cursor", "is not a cursor this API returned")),
    }
}

impl Store {
    pub async fn open(settings: &StoreSettings) -> anyhow::Result<Store> {
        if let Some(dir) = settings.path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating data folder {}", dir.display()))?;
            }
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(&settings.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match settings.synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10))
            // Statement journals of multi-row statements stay in memory.
            .pragma("temp_store", "memory")
            .foreign_keys(false);
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            .connect_with(opts)
            .await
            .with_context(|| format!("opening store {}", settings.path.display()))?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.context("creating schema")?;
        // Databases made before the `source` column existed.
        let has_source: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info('deliveries') WHERE name = 'source'")
                .fetch_one(&pool)
                .await?;
        if has_source == 0 {
            sqlx::query("ALTER TABLE deliveries ADD COLUMN source TEXT")
                .execute(&pool)
                .await?;
        }
        Ok(Store { pool })
    }

    /// The pool, for modules that keep their own tables in the same database (`runs`).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn insert_command(&self, key: &str, command: &Value) -> anyhow::Result<()> {
        sqlx::query("INSERT INTO commands (key, command, created_at) VALUES (?, ?, ?)")
            .bind(key)
            .bind(command.to_string())
            .bind(crate::domain::now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Commands after `after` (a cursor), oldest first: `(seq, key, command)`.
    pub async fn list_commands(&self, after: i64, limit: i64) -> anyhow::Result<Page<Value>> {
        let rows = sqlx::query("SELECT seq, key, command, created_at FROM commands WHERE seq > ? ORDER BY seq LIMIT ?")
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(page(
            rows.iter()
                .map(|r| {
                    let cmd: String = r.get("command");
                    (
                        r.get::<i64, _>("seq"),
                        serde_json::json!({
                            "key": r.get::<String, _>("key"),
                            "command": serde_json::from_str::<Value>(&cmd).unwrap_or(Value::Null),
                            "created_at": crate::domain::rfc3339_ms(r.get("created_at")),
                        }),
                    )
                })
                .collect(),
            limit,
        ))
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- key/value --------------------------------------------------------------------------

    pub async fn kv_get_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String> {
        sqlx::query("INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query_scalar("SELECT value FROM kv WHERE key = ?")
            .bind(key)
            .fetch_one(&self.pool)
            .await?)
    }

    // ---- webhooks ---------------------------------------------------------------------------

    fn webhook_from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Webhook> {
        let secret = Secret::parse(r.get::<String, _>("secret").as_str()).context("stored secret")?;
        let prev: Option<String> = r.get("previous_secret");
        let prev_exp: Option<i64> = r.get("previous_secret_expires_at");
        let previous_secret = match (prev, prev_exp) {
            (Some(p), Some(e)) => Some((Secret::parse(&p).context("stored previous secret")?, e)),
            _ => None,
        };
        Ok(Webhook {
            seq: r.get("seq"),
            id: r.get("id"),
            target_url: r.get("target_url"),
            event_types: serde_json::from_str(r.get::<String, _>("event_types").as_str())?,
            is_active: r.get::<i64, _>("is_active") != 0,
            description: r.get("description"),
            secret,
            previous_secret,
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
        })
    }

    pub async fn insert_webhook(&self, w: &Webhook) -> anyhow::Result<Webhook> {
        sqlx::query(
            "INSERT INTO webhooks (id, target_url, event_types, is_active, description, secret, previous_secret, \
             previous_secret_expires_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
        )
        .bind(&w.id)
        .bind(&w.target_url)
        .bind(serde_json::to_string(&w.event_types)?)
        .bind(w.is_active as i64)
        .bind(&w.description)
        .bind(w.secret.expose())
        .bind(w.created_at)
        .bind(w.updated_at)
        .execute(&self.pool)
        .await?;
        self.get_webhook(&w.id).await?.context("webhook just inserted")
    }

    pub async fn update_webhook(&self, w: &Webhook) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE webhooks SET target_url = ?, event_types = ?, is_active = ?, description = ?, secret = ?, \
             previous_secret = ?, previous_secret_expires_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&w.target_url)
        .bind(serde_json::to_string(&w.event_types)?)
        .bind(w.is_active as i64)
        .bind(&w.description)
        .bind(w.secret.expose())
        .bind(w.previous_secret.as_ref().map(|(s, _)| s.expose().to_string()))
        .bind(w.previous_secret.as_ref().map(|(_, e)| *e))
        .bind(w.updated_at)
        .bind(&w.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_webhook(&self, id: &str) -> anyhow::Result<Option<Webhook>> {
        let row = sqlx::query("SELECT * FROM webhooks WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::webhook_from_row).transpose()
    }

    pub async fn list_webhooks(&self, after: i64, limit: i64) -> anyhow::Result<Page<Webhook>> {
        let rows = sqlx::query("SELECT * FROM webhooks WHERE seq > ? ORDER BY seq LIMIT ?")
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(|r| Self::webhook_from_row(r).map(|w| (w.seq, w)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(page(items, limit))
    }

    pub async fn all_webhooks(&self) -> anyhow::Result<Vec<Webhook>> {
        let rows = sqlx::query("SELECT * FROM webhooks").fetch_all(&self.pool).await?;
        rows.iter().map(Self::webhook_from_row).collect()
    }

    pub async fn delete_webhook(&self, id: &str) -> anyhow::Result<bool> {
        let r = sqlx::query("DELETE FROM webhooks WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- queue ------------------------------------------------------------------------------

    /// Durably queue deliveries and record dead letters, in one transaction: when this returns
    /// Ok the events are committed.
    pub async fn enqueue(&self, deliveries: &[NewDelivery], dead: &[NewDeadLetter], now: i64) -> anyhow::Result<()> {
        self.enqueue_claiming(deliveries, dead, now, &Default::default(), |_| {})
            .await
            .map(|_| ())
    }

    /// [`Store::enqueue`], handing the rows that are ready now to `claim` just before the
    /// commit (the engine takes them into its in-memory ready queue; no dispatcher query can
    /// see them before they are claimed) and returning them.
    pub async fn enqueue_claiming(
        &self,
        deliveries: &[NewDelivery],
        dead: &[NewDeadLetter],
        now: i64,
        held: &std::collections::HashSet<String>,
        claim: impl FnOnce(&[QueuedDelivery]),
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let ready = insert_deliveries(&mut tx, deliveries, now, held).await?;
        for dl in dead {
            insert_dead_letter(&mut tx, dl, now).await?;
        }
        claim(&ready);
        tx.commit().await?;
        Ok(ready)
    }

    /// Make the first row of each chain in `keys` ready when nothing of the chain is ready
    /// (rows that were held behind deliveries kept in memory, which have now finished). The
    /// rows promoted are handed to `claim` just before the commit and returned.
    pub async fn promote(
        &self,
        keys: &[String],
        now: i64,
        claim: impl FnOnce(&[QueuedDelivery]),
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let promoted = promote_next(&mut tx, &keys, now).await?;
        claim(&promoted);
        tx.commit().await?;
        Ok(promoted)
    }

    /// Write what deliveries kept in memory (Kafka) became, in one transaction:
    /// - `logged`: finished ones (delivered or dead) as finished rows with their attempts, for
    ///   the delivery log and for replay of exactly that (event, target) pair;
    /// - `parked`: ones that move to the store's retry queue, each group in its chain's order;
    ///   a group marked `ahead` goes before the rows of its chain that were held behind it;
    /// - `dead`: dead letters (their `delivery_id` names a row of `logged`).
    pub async fn record(
        &self,
        logged: &[Logged],
        parked: &[(Vec<NewDelivery>, bool)],
        dead: &[NewDeadLetter],
        now: i64,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in logged.chunks(INSERT_CHUNK) {
            let mut sql = String::from(
                "INSERT INTO deliveries (id, event_id, event, run_id, kind, webhook_id, target_url, target_key, \
                 order_key, body, state, attempts, next_attempt_at, first_attempt_at, last_status, last_error, \
                 created_at, finished_at, source) VALUES ",
            );
            sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
            let mut q = sqlx::query(&sql);
            for l in chunk {
                let d = &l.delivery;
                let last = d.log.last();
                q = q
                    .bind(&d.id)
                    .bind(&d.event_id)
                    .bind(&d.event)
                    .bind(&d.run_id)
                    .bind(d.kind)
                    .bind(&d.webhook_id)
                    .bind(&d.target_url)
                    .bind(&d.target_key)
                    .bind(&d.order_key)
                    .bind(&d.body)
                    .bind(l.state)
                    .bind(d.log.len() as i64)
                    .bind(now)
                    .bind(d.first_attempt_at)
                    .bind(last.and_then(|a| a.status))
                    .bind(last.and_then(|a| a.error.clone()))
                    .bind(d.created_at)
                    .bind(now)
                    .bind(&d.source);
            }
            q.execute(&mut *tx).await?;
        }
        insert_attempt_logs(&mut tx, logged.iter().map(|l| &l.delivery)).await?;
        for (rows, ahead) in parked {
            let key = rows.first().and_then(|d| d.order_key.clone());
            // Rows held behind the in-memory part of this chain: taken out and written again
            // after the parked ones, so the chain keeps the order its events came in.
            let held = match (&key, ahead) {
                (Some(k), true) => take_waiting(&mut tx, k).await?,
                _ => Vec::new(),
            };
            insert_deliveries(&mut tx, rows, now, &Default::default()).await?;
            if !held.is_empty() {
                let keep: std::collections::HashSet<String> = key.into_iter().collect();
                insert_deliveries(&mut tx, &held, now, &keep).await?;
            }
            insert_attempt_logs(&mut tx, rows.iter()).await?;
        }
        for dl in dead {
            insert_dead_letter(&mut tx, dl, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ready deliveries due by `now`, oldest due first, skipping targets at their in-flight cap.
    pub async fn due(&self, now: i64, limit: i64, skip_targets: &[String]) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut sql = format!("SELECT {QUEUED_COLUMNS} FROM deliveries WHERE state = 'ready' AND next_attempt_at <= ?");
        if !skip_targets.is_empty() {
            sql.push_str(" AND target_key NOT IN (");
            sql.push_str(&vec!["?"; skip_targets.len()].join(","));
            sql.push(')');
        }
        sql.push_str(" ORDER BY next_attempt_at, seq LIMIT ?");
        let mut q = sqlx::query(&sql).bind(now);
        for t in skip_targets {
            q = q.bind(t);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(queued_from_row).collect())
    }

    /// Does this run/target chain still have queued deliveries?
    pub async fn has_active(&self, order_key: &str) -> anyhow::Result<bool> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT EXISTS(SELECT 1 FROM deliveries WHERE order_key = ? AND state IN ('ready', 'waiting'))",
        )
        .bind(order_key)
        .fetch_one(&self.pool)
        .await?
            != 0)
    }

    /// Every chain with queued deliveries (loaded at start by the Kafka consumer, whose new
    /// events of such a chain must queue behind them).
    pub async fn active_order_keys(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT order_key FROM deliveries WHERE state IN ('ready', 'waiting') AND order_key IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// When the next ready delivery due after `now` becomes due, if any.
    pub async fn next_due_after(&self, now: i64) -> anyhow::Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'ready' AND next_attempt_at > ?",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Record a batch of finished attempts in one transaction (group commit), promoting the
    /// next row of every chain whose head finished. The promoted rows (ready now) are handed
    /// to `claim` just before the commit and returned.
    pub async fn complete(
        &self,
        batch: &[Completion],
        now: i64,
        claim: impl FnOnce(&[QueuedDelivery]),
    ) -> anyhow::Result<Vec<QueuedDelivery>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in batch.chunks(INSERT_CHUNK) {
            let mut sql = String::from(
                "INSERT OR REPLACE INTO attempts (delivery_id, n, started_at, duration_ms, status, error, response_excerpt) VALUES ",
            );
            sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
            let mut q = sqlx::query(&sql);
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

            let mut sql = String::from(
                "UPDATE deliveries SET state = v.column2, attempts = v.column3, next_attempt_at = v.column4, \
                 first_attempt_at = v.column5, last_status = v.column6, last_error = v.column7, finished_at = v.column8, \
                 body = COALESCE(v.column9, deliveries.body) FROM (VALUES ",
            );
            sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
            sql.push_str(") AS v WHERE deliveries.seq = v.column1");
            let mut q = sqlx::query(&sql);
            for c in chunk {
                let (state, next_at, finished) = match &c.next {
                    Next::Delivered => ("delivered", now, Some(now)),
                    Next::Retry { at_ms } => ("ready", *at_ms, None),
                    Next::Dead(_) => ("dead", now, Some(now)),
                };
                q = q
                    .bind(c.seq)
                    .bind(state)
                    .bind(c.attempt_no)
                    .bind(next_at)
                    .bind(c.first_attempt_at)
                    .bind(c.attempt.status)
                    .bind(&c.attempt.error)
                    .bind(finished)
                    .bind(&c.body);
            }
            q.execute(&mut *tx).await?;
        }
        for c in batch {
            if let Next::Dead(dl) = &c.next {
                insert_dead_letter(&mut tx, dl, now).await?;
            }
        }
        let finished: Vec<&str> = batch
            .iter()
            .filter(|c| !matches!(c.next, Next::Retry { .. }))
            .filter_map(|c| c.order_key.as_deref())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let promoted = promote_next(&mut tx, &finished, now).await?;
        claim(&promoted);
        tx.commit().await?;
        Ok(promoted)
    }

    /// Dead-letter a queued delivery without an attempt (e.g. its webhook was deleted).
    pub async fn dead_letter_queued(&self, q: &QueuedDelivery, dl: &NewDeadLetter, now: i64) -> anyhow::Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE deliveries SET state = 'dead', finished_at = ?, last_error = ? WHERE seq = ?")
            .bind(now)
            .bind(dl.reason)
            .bind(q.seq)
            .execute(&mut *tx)
            .await?;
        insert_dead_letter(&mut tx, dl, now).await?;
        if let Some(k) = &q.order_key {
            promote_next(&mut tx, &[k.as_str()], now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Drop the queued (not yet attempted to the end) deliveries of a run, except the rows in
    /// `keep` (in flight): state `dropped`, never attempted again. Returns (kind, event, body)
    /// of each.
    pub async fn drop_queued_for_run(
        &self,
        run_id: &str,
        keep: &[i64],
        now: i64,
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(
            "SELECT seq, kind, event, body FROM deliveries WHERE run_id = ? AND state IN ('ready', 'waiting') ORDER BY seq",
        )
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

    /// (queued deliveries, ingest time of the oldest)
    pub async fn queue_stats(&self) -> anyhow::Result<(i64, Option<i64>)> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM deliveries WHERE state IN ('ready', 'waiting')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((r.get("n"), r.get("oldest")))
    }

    /// Forget delivered rows finished before `before` (and their attempts).
    pub async fn purge_delivered(&self, before: i64) -> anyhow::Result<u64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "DELETE FROM attempts WHERE delivery_id IN \
             (SELECT id FROM deliveries WHERE state = 'delivered' AND finished_at < ? LIMIT 10000)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        let r = sqlx::query(
            "DELETE FROM deliveries WHERE seq IN \
             (SELECT seq FROM deliveries WHERE state = 'delivered' AND finished_at < ? LIMIT 10000)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    // ---- delivery log -----------------------------------------------------------------------

    pub async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<Value>> {
        let mut sql = String::from("SELECT * FROM deliveries WHERE seq > ?");
        let mut binds: Vec<String> = Vec::new();
        for (col, v) in [
            ("event_id", &filter.event_id),
            ("webhook_id", &filter.webhook_id),
            ("run_id", &filter.sync_job_run_id),
            ("state", &filter.status),
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
        Ok(page(
            rows.iter().map(|r| (r.get("seq"), delivery_json(r))).collect(),
            limit,
        ))
    }

    pub async fn get_delivery(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let Some(row) = sqlx::query("SELECT * FROM deliveries WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut d = delivery_json(&row);
        let attempts = sqlx::query("SELECT * FROM attempts WHERE delivery_id = ? ORDER BY n")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        d["attempts"] = Value::Array(
            attempts
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "attempt": a.get::<i64, _>("n"),
                        "started_at": crate::domain::rfc3339_ms(a.get("started_at")),
                        "duration_ms": a.get::<i64, _>("duration_ms"),
                        "status": a.get::<Option<i64>, _>("status"),
                        "error": a.get::<Option<String>, _>("error"),
                        "response_excerpt": a.get::<Option<String>, _>("response_excerpt"),
                    })
                })
                .collect(),
        );
        d["body"] = serde_json::from_str(row.get::<String, _>("body").as_str()).unwrap_or(Value::Null);
        Ok(Some(d))
    }

    // ---- dead letters -----------------------------------------------------------------------

    pub async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<Value>> {
        let mut sql = String::from("SELECT * FROM dead_letters WHERE seq > ?");
        if !filter.include_replayed {
            sql.push_str(" AND replayed_at IS NULL");
        }
        let mut binds = Vec::new();
        for (col, v) in [
            ("webhook_id", &filter.webhook_id),
            ("reason", &filter.reason),
            ("event_id", &filter.event_id),
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
        Ok(page(
            rows.iter().map(|r| (r.get("seq"), dead_letter_json(r))).collect(),
            limit,
        ))
    }

    /// Take dead letters out for replay: rows backed by a delivery are re-queued (a new delivery
    /// of the same event to the same target, at the end of its run's queue, same `webhook-id`);
    /// the raw events of unroutable ones are returned for the caller to route again. `hold`
    /// gets the chains of the re-queued rows and names those whose head is kept in memory
    /// (their rows must wait behind it). Returns (re-queued rows ready now, their chains, raws).
    pub async fn replay_dead_letters(
        &self,
        ids: Option<&[String]>,
        filter: &DeadLetterFilter,
        max: i64,
        now: i64,
        hold: impl FnOnce(&[String]) -> std::collections::HashSet<String>,
    ) -> anyhow::Result<(Vec<QueuedDelivery>, u64, Vec<String>, Vec<String>)> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut rows = Vec::new();
        // Ids in chunks: a statement has a bounded number of variables.
        let id_chunks: Vec<Option<&[String]>> = match ids {
            Some(ids) => ids.chunks(500).map(Some).collect(),
            None => vec![None],
        };
        for chunk in id_chunks {
            let room = max - rows.len() as i64;
            if room <= 0 {
                break;
            }
            let mut sql = String::from("SELECT * FROM dead_letters WHERE replayed_at IS NULL");
            let mut binds: Vec<String> = Vec::new();
            if let Some(ids) = chunk {
                sql.push_str(" AND id IN (");
                sql.push_str(&vec!["?"; ids.len()].join(","));
                sql.push(')');
                binds.extend(ids.iter().cloned());
            }
            for (col, v) in [
                ("webhook_id", &filter.webhook_id),
                ("reason", &filter.reason),
                ("event_id", &filter.event_id),
            ] {
                if let Some(v) = v {
                    sql.push_str(&format!(" AND {col} = ?"));
                    binds.push(v.clone());
                }
            }
            sql.push_str(" ORDER BY seq LIMIT ?");
            let mut q = sqlx::query(&sql);
            for b in &binds {
                q = q.bind(b);
            }
            rows.extend(q.bind(room).fetch_all(&mut *tx).await?);
        }
        rows.sort_by_key(|r| r.get::<i64, _>("seq"));
        let mut again = Vec::new();
        let mut raws = Vec::new();
        for r in &rows {
            let dl_id: String = r.get("id");
            let delivery_id: Option<String> = r.get("delivery_id");
            let found = match delivery_id {
                Some(did) => sqlx::query(&format!("SELECT {QUEUED_COLUMNS} FROM deliveries WHERE id = ?"))
                    .bind(&did)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|d| queued_from_row(&d)),
                None => None,
            };
            match found {
                Some(q) => again.push(NewDelivery {
                    id: uuid::Uuid::now_v7().to_string(),
                    event_id: q.event_id,
                    event: q.event,
                    run_id: q.run_id,
                    kind: if q.kind == "callback" { "callback" } else { "webhook" },
                    webhook_id: q.webhook_id,
                    target_url: q.target_url,
                    target_key: q.target_key,
                    order_key: q.order_key,
                    body: q.body,
                    created_at: now,
                    attempts: 0,
                    first_attempt_at: None,
                    next_attempt_at: None,
                    source: q.source,
                    log: Vec::new(),
                }),
                None => raws.push(r.get::<String, _>("raw")),
            }
            sqlx::query("UPDATE dead_letters SET replayed_at = ? WHERE id = ?")
                .bind(now)
                .bind(&dl_id)
                .execute(&mut *tx)
                .await?;
        }
        let keys: Vec<String> = again
            .iter()
            .filter_map(|d| d.order_key.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let held = hold(&keys);
        let ready = insert_deliveries(&mut tx, &again, now, &held).await?;
        tx.commit().await?;
        Ok((ready, again.len() as u64, held.into_iter().collect(), raws))
    }
}

#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct DeliveryFilter {
    pub event_id: Option<String>,
    pub webhook_id: Option<String>,
    pub sync_job_run_id: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct DeadLetterFilter {
    pub webhook_id: Option<String>,
    pub reason: Option<String>,
    pub event_id: Option<String>,
    #[serde(default)]
    pub include_replayed: bool,
}

async fn insert_dead_letter(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    dl: &NewDeadLetter,
    now: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letters (id, delivery_id, event_id, event, webhook_id, kind, reason, attempts, last_status, \
         last_error, raw, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
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

/// The chains among `keys` that still have queued deliveries (a new row of a busy chain waits
/// behind them; a row with no chain never waits).
async fn busy_chains(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    keys: &[&str],
) -> anyhow::Result<std::collections::HashSet<String>> {
    let mut busy = std::collections::HashSet::new();
    for chunk in keys.chunks(500) {
        let sql = format!(
            "SELECT DISTINCT order_key FROM deliveries WHERE order_key IN ({}) AND state IN ('ready', 'waiting')",
            vec!["?"; chunk.len()].join(",")
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for k in chunk {
            q = q.bind(*k);
        }
        busy.extend(q.fetch_all(&mut **tx).await?);
    }
    Ok(busy)
}

const QUEUED_COLUMNS: &str = "seq, id, event_id, event, run_id, kind, webhook_id, target_url, target_key, \
     order_key, body, attempts, first_attempt_at, created_at, source";

/// Rows per multi-row statement (15 columns a row stays far below SQLite's variable limit).
const INSERT_CHUNK: usize = 200;

fn queued_from_row(r: &sqlx::sqlite::SqliteRow) -> QueuedDelivery {
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

/// Make the oldest queued row of each chain in `keys` ready (when it is still waiting: its
/// predecessor finished). Returns the rows promoted.
async fn promote_next(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    keys: &[&str],
    now: i64,
) -> anyhow::Result<Vec<QueuedDelivery>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(500) {
        let sql = format!(
            "UPDATE deliveries SET state = 'ready', next_attempt_at = ? WHERE state = 'waiting' AND seq IN \
             (SELECT MIN(seq) FROM deliveries WHERE order_key IN ({}) AND state IN ('ready', 'waiting') GROUP BY order_key) \
             RETURNING {QUEUED_COLUMNS}",
            vec!["?"; chunk.len()].join(",")
        );
        let mut q = sqlx::query(&sql).bind(now);
        for k in chunk {
            q = q.bind(*k);
        }
        out.extend(q.fetch_all(&mut **tx).await?.iter().map(queued_from_row));
    }
    Ok(out)
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map(|m| Value::String(crate::domain::rfc3339_ms(m)))
        .unwrap_or(Value::Null)
}

fn delivery_json(r: &sqlx::sqlite::SqliteRow) -> Value {
    let state: String = r.get("state");
    serde_json::json!({
        "id": r.get::<String, _>("id"),
        "event_id": r.get::<String, _>("event_id"),
        "event": r.get::<String, _>("event"),
        "sync_job_run_id": r.get::<Option<String>, _>("run_id"),
        "kind": r.get::<String, _>("kind"),
        "webhook_id": r.get::<Option<String>, _>("webhook_id"),
        "status": if state == "waiting" { "queued".to_string() } else if state == "ready" { "pending".to_string() } else { state },
        "attempts_made": r.get::<i64, _>("attempts"),
        "next_attempt_at": if r.get::<Option<i64>, _>("finished_at").is_some() { Value::Null } else { opt_time(Some(r.get("next_attempt_at"))) },
        "last_status": r.get::<Option<i64>, _>("last_status"),
        "last_error": r.get::<Option<String>, _>("last_error"),
        "created_at": crate::domain::rfc3339_ms(r.get("created_at")),
        "finished_at": opt_time(r.get("finished_at")),
    })
}

fn dead_letter_json(r: &sqlx::sqlite::SqliteRow) -> Value {
    serde_json::json!({
        "id": r.get::<String, _>("id"),
        "delivery_id": r.get::<Option<String>, _>("delivery_id"),
        "event_id": r.get::<String, _>("event_id"),
        "event": r.get::<String, _>("event"),
        "webhook_id": r.get::<Option<String>, _>("webhook_id"),
        "kind": r.get::<String, _>("kind"),
        "reason": r.get::<String, _>("reason"),
        "attempts": r.get::<i64, _>("attempts"),
        "last_status": r.get::<Option<i64>, _>("last_status"),
        "last_error": r.get::<Option<String>, _>("last_error"),
        "event_body": serde_json::from_str::<Value>(r.get::<String, _>("raw").as_str()).unwrap_or(Value::Null),
        "created_at": crate::domain::rfc3339_ms(r.get("created_at")),
        "replayed_at": opt_time(r.get("replayed_at")),
    })
}

/// Insert deliveries in the order given. The first row of a chain that has nothing queued is
/// ready; every later one waits; a row whose chain is in `held` waits even when it is the first
/// (its chain's head is kept in memory). Returns the rows that are ready now.
async fn insert_deliveries(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    deliveries: &[NewDelivery],
    now: i64,
    held: &std::collections::HashSet<String>,
) -> anyhow::Result<Vec<QueuedDelivery>> {
    let keys: Vec<&str> = deliveries
        .iter()
        .filter_map(|d| d.order_key.as_deref())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut busy = busy_chains(tx, &keys).await?;
    busy.extend(held.iter().cloned());
    let states: Vec<&'static str> = deliveries
        .iter()
        .map(|d| match d.order_key.as_deref() {
            Some(k) if !busy.insert(k.to_string()) => "waiting",
            _ => "ready",
        })
        .collect();
    let mut seqs: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for (chunk, st) in deliveries.chunks(INSERT_CHUNK).zip(states.chunks(INSERT_CHUNK)) {
        let mut sql = String::from(
            "INSERT INTO deliveries (id, event_id, event, run_id, kind, webhook_id, target_url, target_key, \
             order_key, body, state, attempts, next_attempt_at, first_attempt_at, created_at, source, \
             last_status, last_error) VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
        sql.push_str(" RETURNING seq, id");
        let mut q = sqlx::query(&sql);
        for (d, state) in chunk.iter().zip(st) {
            let last = d.log.last();
            q = q
                .bind(&d.id)
                .bind(&d.event_id)
                .bind(&d.event)
                .bind(&d.run_id)
                .bind(d.kind)
                .bind(&d.webhook_id)
                .bind(&d.target_url)
                .bind(&d.target_key)
                .bind(&d.order_key)
                .bind(&d.body)
                .bind(*state)
                .bind(d.attempts)
                .bind(d.next_attempt_at.unwrap_or(now))
                .bind(d.first_attempt_at)
                .bind(d.created_at)
                .bind(&d.source)
                .bind(last.and_then(|a| a.status))
                .bind(last.and_then(|a| a.error.clone()));
        }
        for r in q.fetch_all(&mut **tx).await? {
            seqs.insert(r.get("id"), r.get("seq"));
        }
    }
    Ok(deliveries
        .iter()
        .zip(&states)
        .filter(|(d, st)| **st == "ready" && d.next_attempt_at.unwrap_or(now) <= now)
        .filter_map(|(d, _)| {
            Some(QueuedDelivery {
                seq: *seqs.get(&d.id)?,
                id: d.id.clone(),
                event_id: d.event_id.clone(),
                event: d.event.clone(),
                run_id: d.run_id.clone(),
                kind: d.kind.to_string(),
                webhook_id: d.webhook_id.clone(),
                target_url: d.target_url.clone(),
                target_key: d.target_key.clone(),
                order_key: d.order_key.clone(),
                body: d.body.clone(),
                attempts: d.attempts,
                first_attempt_at: d.first_attempt_at,
                created_at: d.created_at,
                source: d.source.clone(),
            })
        })
        .collect())
}

/// The attempt log of deliveries that were attempted in memory before their row was written.
async fn insert_attempt_logs<'a>(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
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
            "INSERT OR REPLACE INTO attempts (delivery_id, n, started_at, duration_ms, status, error, response_excerpt) VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
        let mut q = sqlx::query(&sql);
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

/// Take the waiting rows of a chain out of the queue (to be written again behind rows that
/// must go first), oldest first. Their attempt logs, keyed by delivery id, stay.
async fn take_waiting(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, key: &str) -> anyhow::Result<Vec<NewDelivery>> {
    let rows = sqlx::query(&format!(
        "DELETE FROM deliveries WHERE order_key = ? AND state = 'waiting' RETURNING {QUEUED_COLUMNS}"
    ))
    .bind(key)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: Vec<QueuedDelivery> = rows.iter().map(queued_from_row).collect();
    out.sort_by_key(|q| q.seq);
    Ok(out
        .into_iter()
        .map(|q| NewDelivery {
            id: q.id,
            event_id: q.event_id,
            event: q.event,
            run_id: q.run_id,
            kind: if q.kind == "callback" { "callback" } else { "webhook" },
            webhook_id: q.webhook_id,
            target_url: q.target_url,
            target_key: q.target_key,
            order_key: q.order_key,
            body: q.body,
            created_at: q.created_at,
            attempts: q.attempts,
            first_attempt_at: q.first_attempt_at,
            next_attempt_at: None,
            source: q.source,
            log: Vec::new(),
        })
        .collect())
}
