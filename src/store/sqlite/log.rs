//! [`DeliveryLog`] on SQLite: reading `deliveries`, `attempts` and `dead_letters`; replay.

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::queue::busy_chains;
use super::{placeholders, SqliteStore};
use crate::store::{AttemptRow, DeadLetterFilter, DeadLetterRow, DeliveryFilter, DeliveryLog, DeliveryRow, Page};

fn delivery_from_row(r: &SqliteRow) -> DeliveryRow {
    DeliveryRow {
        seq: r.get("seq"),
        id: r.get("id"),
        event_id: r.get("event_id"),
        event: r.get("event"),
        run_id: r.get("run_id"),
        kind: r.get("kind"),
        webhook_id: r.get("webhook_id"),
        state: r.get("state"),
        attempts: r.get("attempts"),
        next_attempt_at: r.get("next_attempt_at"),
        last_status: r.get("last_status"),
        last_error: r.get("last_error"),
        created_at: r.get("created_at"),
        finished_at: r.get("finished_at"),
        body: r.get("body"),
    }
}

fn dead_letter_from_row(r: &SqliteRow) -> DeadLetterRow {
    DeadLetterRow {
        seq: r.get("seq"),
        id: r.get("id"),
        delivery_id: r.get("delivery_id"),
        event_id: r.get("event_id"),
        event: r.get("event"),
        webhook_id: r.get("webhook_id"),
        kind: r.get("kind"),
        reason: r.get("reason"),
        attempts: r.get("attempts"),
        last_status: r.get("last_status"),
        last_error: r.get("last_error"),
        raw: r.get("raw"),
        created_at: r.get("created_at"),
        replayed_at: r.get("replayed_at"),
    }
}

/// ` AND col = ?` for each filter that is set, and the values to bind, in order.
fn equal_to(sql: &mut String, filters: &[(&str, &Option<String>)]) -> Vec<String> {
    let mut binds = Vec::new();
    for (col, v) in filters {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {col} = ?"));
            binds.push(v.clone());
        }
    }
    binds
}

fn dead_letter_filters(f: &DeadLetterFilter) -> [(&'static str, &Option<String>); 3] {
    [
        ("webhook_id", &f.webhook_id),
        ("reason", &f.reason),
        ("event_id", &f.event_id),
    ]
}

#[async_trait]
impl DeliveryLog for SqliteStore {
    async fn list_deliveries(
        &self,
        filter: &DeliveryFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<DeliveryRow>> {
        let mut sql = String::from("SELECT * FROM deliveries WHERE seq > ?");
        let binds = equal_to(
            &mut sql,
            &[
                ("event_id", &filter.event_id),
                ("webhook_id", &filter.webhook_id),
                ("run_id", &filter.sync_job_run_id),
                ("state", &filter.status),
            ],
        );
        sql.push_str(" ORDER BY seq LIMIT ?");
        let mut q = sqlx::query(&sql).bind(after);
        for b in &binds {
            q = q.bind(b);
        }
        let rows = q.bind(limit + 1).fetch_all(&self.pool).await?;
        Ok(Page::from_rows(
            rows.iter().map(|r| (r.get("seq"), delivery_from_row(r))).collect(),
            limit,
        ))
    }

    async fn get_delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryRow>> {
        Ok(sqlx::query("SELECT * FROM deliveries WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(delivery_from_row))
    }

    async fn list_attempts(&self, delivery_id: &str) -> anyhow::Result<Vec<AttemptRow>> {
        let rows = sqlx::query("SELECT * FROM attempts WHERE delivery_id = ? ORDER BY n")
            .bind(delivery_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|a| AttemptRow {
                n: a.get("n"),
                started_at: a.get("started_at"),
                duration_ms: a.get("duration_ms"),
                status: a.get("status"),
                error: a.get("error"),
                response_excerpt: a.get("response_excerpt"),
            })
            .collect())
    }

    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Page<DeadLetterRow>> {
        let mut sql = String::from("SELECT * FROM dead_letters WHERE seq > ?");
        if !filter.include_replayed {
            sql.push_str(" AND replayed_at IS NULL");
        }
        let binds = equal_to(&mut sql, &dead_letter_filters(filter));
        sql.push_str(" ORDER BY seq LIMIT ?");
        let mut q = sqlx::query(&sql).bind(after);
        for b in &binds {
            q = q.bind(b);
        }
        let rows = q.bind(limit + 1).fetch_all(&self.pool).await?;
        Ok(Page::from_rows(
            rows.iter().map(|r| (r.get("seq"), dead_letter_from_row(r))).collect(),
            limit,
        ))
    }

    async fn replay_dead_letters(
        &self,
        ids: Option<&[String]>,
        filter: &DeadLetterFilter,
        max: i64,
        now: i64,
    ) -> anyhow::Result<(u64, Vec<String>)> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut sql = String::from("SELECT * FROM dead_letters WHERE replayed_at IS NULL");
        let mut binds: Vec<String> = Vec::new();
        if let Some(ids) = ids {
            sql.push_str(&format!(" AND id IN ({})", placeholders(ids.len().max(1))));
            binds.extend(ids.iter().cloned());
            if ids.is_empty() {
                // `IN ()` is not SQL: one value no id equals.
                binds.push(String::new());
            }
        }
        binds.extend(equal_to(&mut sql, &dead_letter_filters(filter)));
        sql.push_str(" ORDER BY seq LIMIT ?");
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b);
        }
        let rows = q.bind(max).fetch_all(&mut *tx).await?;
        let mut requeued = 0;
        let mut raws = Vec::new();
        for r in &rows {
            let dl_id: String = r.get("id");
            let delivery_id: Option<String> = r.get("delivery_id");
            match delivery_id {
                Some(did) => {
                    let Some(d) = sqlx::query("SELECT * FROM deliveries WHERE id = ?")
                        .bind(&did)
                        .fetch_optional(&mut *tx)
                        .await?
                    else {
                        raws.push(r.get::<String, _>("raw"));
                        continue;
                    };
                    let order_key: Option<String> = d.get("order_key");
                    let busy = match order_key.as_deref() {
                        Some(k) => !busy_chains(&mut tx, &[k]).await?.is_empty(),
                        None => false,
                    };
                    sqlx::query(
                        "INSERT INTO deliveries (id, event_id, event, run_id, kind, webhook_id, target_url, target_key, \
                         order_key, body, state, attempts, next_attempt_at, created_at) \
                         SELECT ?, event_id, event, run_id, kind, webhook_id, target_url, target_key, order_key, body, ?, 0, ?, ? \
                         FROM deliveries WHERE id = ?",
                    )
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(if busy { "waiting" } else { "ready" })
                    .bind(now)
                    .bind(now)
                    .bind(&did)
                    .execute(&mut *tx)
                    .await?;
                    requeued += 1;
                }
                None => raws.push(r.get::<String, _>("raw")),
            }
            sqlx::query("UPDATE dead_letters SET replayed_at = ? WHERE id = ?")
                .bind(now)
                .bind(&dl_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((requeued, raws))
    }
}
