//! [`DeliveryLog`] on SQLite: reading `deliveries`, `attempts` and `dead_letters`; replay.

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::queue::{insert_deliveries, queued_from_row, BODY, QUEUED_COLUMNS};
use super::{placeholders, Binder, SqliteStore, IN_CHUNK};
use crate::store::{
    chains_of, replayed, row_attempt, AttemptRow, DeadLetterFilter, DeadLetterRow, DeliveryFilter, DeliveryLog,
    DeliveryRow, Hold, Page, QueuedDelivery,
};

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
        let mut sql = format!("SELECT deliveries.*, {BODY} FROM deliveries WHERE seq > ?");
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
        Ok(
            sqlx::query(&format!("SELECT deliveries.*, {BODY} FROM deliveries WHERE id = ?"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .as_ref()
                .map(delivery_from_row),
        )
    }

    async fn list_attempts(&self, delivery_id: &str) -> anyhow::Result<Vec<AttemptRow>> {
        let rows = sqlx::query("SELECT * FROM attempts WHERE delivery_id = ? ORDER BY n")
            .bind(delivery_id)
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            // A first-try success keeps its attempt on its row.
            let row = sqlx::query_as(
                "SELECT state, attempts, first_attempt_at, last_status, last_error, last_duration_ms, last_excerpt \
                 FROM deliveries WHERE id = ?",
            )
            .bind(delivery_id)
            .fetch_optional(&self.pool)
            .await?;
            return Ok(row.and_then(row_attempt).into_iter().collect());
        }
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
        hold: Hold<'_>,
    ) -> anyhow::Result<(Vec<QueuedDelivery>, u64, Vec<String>, Vec<String>)> {
        self.writer
            .write(|c| {
                // (dead letter id, delivery id, raw), oldest first.
                let mut rows: Vec<(i64, String, Option<String>, String)> = Vec::new();
                // Ids in chunks: a statement has a bounded number of variables.
                let id_chunks: Vec<Option<&[String]>> = match ids {
                    Some(ids) => ids.chunks(IN_CHUNK).map(Some).collect(),
                    None => vec![None],
                };
                for chunk in id_chunks {
                    let room = max - rows.len() as i64;
                    if room <= 0 {
                        break;
                    }
                    let mut sql =
                        String::from("SELECT seq, id, delivery_id, raw FROM dead_letters WHERE replayed_at IS NULL");
                    let mut binds: Vec<String> = Vec::new();
                    if let Some(ids) = chunk {
                        sql.push_str(&format!(" AND id IN ({})", placeholders(ids.len())));
                        binds.extend(ids.iter().cloned());
                    }
                    binds.extend(equal_to(&mut sql, &dead_letter_filters(filter)));
                    sql.push_str(" ORDER BY seq LIMIT ?");
                    let mut st = c.prepare(&sql)?;
                    let mut b = Binder::new(&mut st);
                    for v in &binds {
                        b.bind(v.as_str())?;
                    }
                    b.bind(room)?;
                    let mut found = st.raw_query();
                    while let Some(r) = found.next()? {
                        rows.push((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?));
                    }
                }
                rows.sort_by_key(|r| r.0);
                let mut again = Vec::new();
                let mut raws = Vec::new();
                for (_, dl_id, delivery_id, raw) in rows {
                    let found = match delivery_id {
                        Some(did) => {
                            let mut st = c.prepare_cached(&format!(
                                "SELECT {QUEUED_COLUMNS}, {BODY} FROM deliveries WHERE id = ?"
                            ))?;
                            let mut q = st.query([did])?;
                            match q.next()? {
                                Some(d) => Some(queued_from_row(d)?),
                                None => None,
                            }
                        }
                        None => None,
                    };
                    match found {
                        Some(q) => again.push(replayed(q, now)),
                        None => raws.push(raw),
                    }
                    c.prepare_cached("UPDATE dead_letters SET replayed_at = ? WHERE id = ?")?
                        .execute(rusqlite::params![now, dl_id])?;
                }
                let held = hold(&chains_of(&again));
                let ready = insert_deliveries(c, &again, now, &held, &self.lease)?;
                Ok((ready, again.len() as u64, held.into_iter().collect(), raws))
            })
            .await
    }
}
