//! New rows written together. Concurrent [`Engine::store_rows`] calls — two `POST /events`
//! answered at once, events the relay makes while others are being queued — are combined into
//! one store transaction: whoever finds no write under way writes its rows at once; whoever
//! finds one adds its rows to the next write and waits for it, and the first of those waiters to
//! get the turn writes them all. A transaction's fixed costs (its round trips, the chains'
//! locks, the reads of the chains' heads, the commit's flush) are then paid once for all of
//! them. On PostgreSQL two `POST`s of the same runs ran one after the other anyway, each waiting
//! on the other's chain locks; on SQLite they shared a group commit but not their statements.
//!
//! A combined write that fails is not retried combined: each caller then writes its own rows
//! alone and gets its own answer (a store outage still answers 503 to each, and one caller's
//! rows that the store refuses do not take the others' with them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;

use super::engine::Engine;
use crate::store::{NewDeadLetter, NewDelivery};

/// At most this many rows are combined into one write (a caller's own rows are never split:
/// more than this are written alone).
const MAX_COMBINED: usize = 4_000;

#[derive(Default)]
pub(crate) struct Combiner {
    /// Held by the caller writing (its rows and the waiting ones).
    turn: tokio::sync::Mutex<()>,
    waiting: Mutex<Vec<Request>>,
    next_id: AtomicU64,
}

struct Request {
    id: u64,
    rows: Vec<NewDelivery>,
    dead: Vec<NewDeadLetter>,
    /// `true` once committed; `false` when the combined write failed (the caller writes alone).
    done: oneshot::Sender<bool>,
}

impl Combiner {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Request>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the waiting requests, oldest first, while their rows fit in `room`. A request
    /// whose caller went away (cancelled before it was answered) is dropped: it was never
    /// acknowledged, and its rows are not written.
    fn take(&self, mut room: usize) -> Vec<Request> {
        let mut waiting = self.waiting();
        waiting.retain(|r| !r.done.is_closed());
        let n = waiting
            .iter()
            .take_while(|r| {
                let fits = r.rows.len() <= room;
                room = room.saturating_sub(r.rows.len());
                fits
            })
            .count();
        waiting.drain(..n).collect()
    }

    /// Take back a request of one's own that no write has taken.
    fn withdraw(&self, id: u64) {
        self.waiting().retain(|r| r.id != id);
    }
}

impl Engine {
    /// Write new rows (and dead letters) to the store, combined with those of concurrent
    /// callers (see the module's text); returns once they are committed.
    pub(crate) async fn store_rows(
        &self,
        rows: &[NewDelivery],
        dead: &[NewDeadLetter],
        now: i64,
    ) -> anyhow::Result<()> {
        let c = &self.combiner;
        let turn = match c.turn.try_lock() {
            Ok(turn) => turn,
            Err(_) if rows.len() > MAX_COMBINED => return self.write_alone(rows, dead, now).await,
            Err(_) => {
                // A write is under way: wait to be taken into the next one.
                let id = c.next_id.fetch_add(1, Ordering::Relaxed);
                let (done, mut answer) = oneshot::channel();
                c.waiting().push(Request {
                    id,
                    rows: rows.to_vec(),
                    dead: dead.to_vec(),
                    done,
                });
                let turn = c.turn.lock().await;
                // A write that took our request answered it before it gave the turn up.
                match answer.try_recv() {
                    Ok(true) => return Ok(()),
                    // It failed (or its writer went away before answering): alone, now.
                    Ok(false) | Err(TryRecvError::Closed) => {
                        drop(turn);
                        return self.write_alone(rows, dead, now).await;
                    }
                    // Not taken: ours is the turn, and we write for ourselves as for anyone.
                    Err(TryRecvError::Empty) => {
                        c.withdraw(id);
                        turn
                    }
                }
            }
        };
        let others = c.take(MAX_COMBINED.saturating_sub(rows.len()));
        if others.is_empty() {
            let written = self.write_rows(rows, dead, now).await;
            drop(turn);
            self.after_rows(&written?, dead).await;
            return Ok(());
        }
        let combined = self.write_combined(rows, dead, others, now).await;
        // The turn is the store write's only: what follows it (promotions that retry while the
        // store is down, dead letters published) runs after it is given up.
        drop(turn);
        match combined {
            Ok((promote, dead)) => {
                self.after_rows(&promote, &dead).await;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "a combined write of new rows failed; each caller writes alone");
                self.write_alone(rows, dead, now).await
            }
        }
    }

    async fn write_alone(&self, rows: &[NewDelivery], dead: &[NewDeadLetter], now: i64) -> anyhow::Result<()> {
        let promote = self.write_rows(rows, dead, now).await?;
        self.after_rows(&promote, dead).await;
        Ok(())
    }

    /// One write of the caller's rows and the waiting requests', then each request answered.
    /// Returns the chains to promote and every dead letter written, for `after_rows`.
    async fn write_combined(
        &self,
        rows: &[NewDelivery],
        dead: &[NewDeadLetter],
        others: Vec<Request>,
        now: i64,
    ) -> anyhow::Result<(Vec<String>, Vec<NewDeadLetter>)> {
        let mut all_rows = rows.to_vec();
        let mut all_dead = dead.to_vec();
        let mut answers = Vec::with_capacity(others.len());
        self.metrics.writes_joined.inc_by(others.len() as u64);
        for r in others {
            all_rows.extend(r.rows);
            all_dead.extend(r.dead);
            answers.push(r.done);
        }
        let res = self.write_rows(&all_rows, &all_dead, now).await;
        for a in answers {
            let _ = a.send(res.is_ok());
        }
        Ok((res?, all_dead))
    }
}
