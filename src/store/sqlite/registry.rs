//! [`Registry`] on SQLite: `webhooks` and `kv`.

use anyhow::Context;
use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::SqliteStore;
use crate::store::{Page, Registry, StoredWebhook};

fn webhook_from_row(r: &SqliteRow) -> anyhow::Result<StoredWebhook> {
    // Secrets as stored (sealed when a key is configured): the Store handle opens them.
    let secret: String = r.get("secret");
    let prev: Option<String> = r.get("previous_secret");
    let prev_exp: Option<i64> = r.get("previous_secret_expires_at");
    let previous_secret = match (prev, prev_exp) {
        (Some(p), Some(e)) => Some((p, e)),
        _ => None,
    };
    Ok(StoredWebhook {
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
        overrides: match r.get::<Option<String>, _>("overrides") {
            Some(j) => Some(serde_json::from_str(&j).context("stored webhook overrides")?),
            None => None,
        },
    })
}

#[async_trait]
impl Registry for SqliteStore {
    async fn insert_webhook(&self, w: &StoredWebhook) -> anyhow::Result<StoredWebhook> {
        self.execute(sqlx::query(
            "INSERT INTO webhooks (id, target_url, event_types, is_active, description, secret, previous_secret, \
             previous_secret_expires_at, created_at, updated_at, overrides) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?)",
        )
        .bind(&w.id)
        .bind(&w.target_url)
        .bind(serde_json::to_string(&w.event_types)?)
        .bind(w.is_active as i64)
        .bind(&w.description)
        .bind(&w.secret)
        .bind(w.created_at)
        .bind(w.updated_at)
        .bind(w.overrides.as_ref().map(serde_json::to_string).transpose()?)
        )
        .await?;
        self.get_webhook(&w.id).await?.context("webhook just inserted")
    }

    async fn update_webhook(&self, w: &StoredWebhook) -> anyhow::Result<()> {
        self.execute(
            sqlx::query(
                "UPDATE webhooks SET target_url = ?, event_types = ?, is_active = ?, description = ?, secret = ?, \
             previous_secret = ?, previous_secret_expires_at = ?, updated_at = ?, overrides = ? WHERE id = ?",
            )
            .bind(&w.target_url)
            .bind(serde_json::to_string(&w.event_types)?)
            .bind(w.is_active as i64)
            .bind(&w.description)
            .bind(&w.secret)
            .bind(w.previous_secret.as_ref().map(|(s, _)| s.as_str()))
            .bind(w.previous_secret.as_ref().map(|(_, e)| *e))
            .bind(w.updated_at)
            .bind(w.overrides.as_ref().map(serde_json::to_string).transpose()?)
            .bind(&w.id),
        )
        .await?;
        Ok(())
    }

    async fn get_webhook(&self, id: &str) -> anyhow::Result<Option<StoredWebhook>> {
        let row = sqlx::query("SELECT * FROM webhooks WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    async fn list_webhooks(&self, after: i64, limit: i64) -> anyhow::Result<Page<StoredWebhook>> {
        let rows = sqlx::query("SELECT * FROM webhooks WHERE seq > ? ORDER BY seq LIMIT ?")
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(|r| webhook_from_row(r).map(|w| (w.seq, w)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Page::from_rows(items, limit))
    }

    async fn all_webhooks(&self) -> anyhow::Result<Vec<StoredWebhook>> {
        let rows = sqlx::query("SELECT * FROM webhooks").fetch_all(&self.pool).await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn webhooks_version(&self) -> anyhow::Result<i64> {
        let v: Option<String> = sqlx::query_scalar("SELECT value FROM kv WHERE key = 'webhooks_version'")
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    async fn delete_webhook(&self, id: &str) -> anyhow::Result<bool> {
        let r = self
            .execute(sqlx::query("DELETE FROM webhooks WHERE id = ?").bind(id))
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn kv_get_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String> {
        self.execute(
            sqlx::query("INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)")
                .bind(key)
                .bind(value),
        )
        .await?;
        Ok(sqlx::query_scalar("SELECT value FROM kv WHERE key = ?")
            .bind(key)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn reseal_webhook(
        &self,
        id: &str,
        from: (&str, Option<&str>),
        to: (&str, Option<&str>),
    ) -> anyhow::Result<bool> {
        let r = self.execute(sqlx::query(
            "UPDATE webhooks SET secret = ?, previous_secret = ? WHERE id = ? AND secret = ? AND previous_secret IS ?",
        )
        .bind(to.0)
        .bind(to.1)
        .bind(id)
        .bind(from.0)
        .bind(from.1)
        )
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn kv_replace(&self, key: &str, from: &str, to: &str) -> anyhow::Result<bool> {
        let r = self
            .execute(
                sqlx::query("UPDATE kv SET value = ? WHERE key = ? AND value = ?")
                    .bind(to)
                    .bind(key)
                    .bind(from),
            )
            .await?;
        Ok(r.rows_affected() > 0)
    }
}
