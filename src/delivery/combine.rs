//! New rows written together. Concurrent [`Engine::store_rows`] calls — `POST /events` answered
//! at once, events the relay makes while others are being queued — are combined into fewer
//! store transactions: up to `WRITES_AT_ONCE` writes run at a time, each started by a caller at
//! once; a caller that finds that many under way adds its rows to the waiting ones and waits,
//! and the first waiter to get a turn writes all that waited in one transaction, answering each.
//! A transaction's fixed costs (its round trips, the chains' locks, the reads of the chains'
//! heads, the commit's flush) are then paid once for all of them: on PostgreSQL `POST`s of the
//! same runs serialise on their chains' intake locks anyway; on SQLite they share a group
//! commit but not their statements. Two at a time, not one: a second write's statements overlap
//! the first's commit (its flush), as they did before writes were combined.
//!
//! A combined write that fails is not retried combined: each caller then writes its own rows
//! alone and gets its own answer (a store outage still answers 503 to each, and one caller's
//! rows that the store refuses do not take the others' with them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::{oneshot, Semaphore};

use super::engine::Engine;
use crate::store::{NewDeadLetter, NewDelivery};

/// At most this many rows are combined into one write (a caller's own rows are never split:
/// more than this are written alone).
const MAX_COMBINED: usize = 4_000;

/// Writes of new rows under way at once (see the module's text).
const WRITES_AT_ONCE: usize = 2;

pub(crate) struct Combiner {
    /// A permit for each write under way.
    turns: Semaphore,
    /// Requests no write has taken yet, oldest first.
    waiting: Mutex<Vec<Request>>,
    next_id: AtomicU64,
}

impl Default for Combiner {
    fn default() -> Combiner {
        Combiner {
            turns: Semaphore::new(WRITES_AT_ONCE),
            waiting: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        }
    }
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

    /// Take back a request of one's own if no write has taken it; whether it was still there.
    fn withdraw(&self, id: u64) -> bool {
        let mut waiting = self.waiting();
        let before = waiting.len();
        waiting.retain(|r| r.id != id);
        waiting.len() < before
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
        let turn = match c.turns.try_acquire() {
            Ok(turn) => turn,
            Err(_) if rows.len() > MAX_COMBINED => return self.write_alone(rows, dead, now).await,
            Err(_) => {
                // As many writes as may run at once are under way: wait to be taken into the
                // next one.
                let id = c.next_id.fetch_add(1, Ordering::Relaxed);
                let (done, answer) = oneshot::channel();
                c.waiting().push(Request {
                    id,
                    rows: rows.to_vec(),
                    dead: dead.to_vec(),
                    done,
                });
                let turn = c.turns.acquire().await.expect("the semaphore is never closed");
                if !c.withdraw(id) {
                    // A write took ours: its answer.
                    drop(turn);
                    return match answer.await {
                        Ok(true) => Ok(()),
                        // It failed (or its writer went away before answering): alone, now.
                        Ok(false) | Err(_) => self.write_alone(rows, dead, now).await,
                    };
                }
                // Still waiting: ours is a turn, and we write for ourselves as for anyone.
                turn
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
