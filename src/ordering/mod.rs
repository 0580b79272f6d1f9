//! Where a run's order is kept: one chain per (target, run), and only a chain's head is ever
//! attempted. Every way in (Kafka, `POST /events`, events the relay makes, replays) consults
//! the same chains.
//!
//! A chain's deliveries live in one of two places:
//! - **the store** (embedded bus; Kafka deliveries that were parked; events the relay makes;
//!   replays): the store keeps them in order itself — only the oldest unfinished row of a chain
//!   is `ready`, the next is promoted in the transaction that finishes it;
//! - **memory** (Kafka deliveries not finished yet, acknowledged by their offset): a queue
//!   here, whose head is being attempted.
//!
//! The rules that make the two one order:
//! 1. A memory delivery whose chain has rows in the store is stored behind them (parked).
//! 2. Rows written to the store while their chain has memory deliveries are *held*: written as
//!    waiting, and promoted only when the memory part has drained (`Promote`).
//! 3. When a memory head must leave memory (parked after its in-memory attempts), the whole
//!    memory part of its chain goes to the store with it, in order, ahead of any held rows.
//!
//! A chain is known to have stored rows from the moment a write of its rows is announced
//! (`submit` answering `Park`, `park_head`, `hold`) until the store reports its last row
//! finished (`drained`, `refresh_stored`) *and* no announced write is still uncommitted. The
//! writer commits a batch's completions before its parked rows, and a park may be announced
//! while the chain's last stored row is being finished: forgetting the chain then would let its
//! next memory delivery overtake the rows about to be written.
//!
//! The lock is a plain mutex held for map operations only, never across an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

/// What to do with a delivery handed to its chain.
#[derive(Debug)]
pub enum Placement<J> {
    /// It is its chain's head now: attempt it.
    Dispatch(J),
    /// It waits in memory behind its chain's head.
    Queued,
    /// Its chain has rows in the store: store it behind them.
    Park(J),
}

/// A write of rows announced by [`Chains::hold`]: every chain written to, and those whose rows
/// are held (rule 2). Handed back to [`Chains::written`] once the write is over.
#[derive(Debug, Default)]
pub struct Holding {
    keys: Vec<String>,
    pub held: HashSet<String>,
}

/// What follows when a memory head finished (answered 2xx or dead-lettered).
#[derive(Debug)]
pub enum AfterHead<J> {
    /// The chain's next memory delivery: attempt it.
    Dispatch(J),
    /// The memory part drained and rows were held behind it: promote the chain in the store.
    Promote(String),
    Nothing,
}

#[derive(Debug)]
struct Chain<J> {
    /// Memory deliveries behind the head, oldest first.
    queue: VecDeque<J>,
    /// A memory head is being attempted (dispatched, in flight, or waiting for its retry).
    head: bool,
    /// The store has rows of this chain, as of when we last wrote one or learnt of one.
    stored: Option<Instant>,
    /// Rows in the store wait for the memory part (rule 2).
    held: bool,
    /// Writes of held rows that have not committed yet: until they have, draining the memory
    /// part cannot promote them (they are not there to promote).
    holding: usize,
    /// Writes of this chain's rows (parked, held or not) announced and not committed yet:
    /// while any is pending the store does not show every row of the chain, so `stored` is
    /// kept whatever the store says. (Every announcement sets `stored`, and it is cleared only
    /// at 0: `writing > 0` implies `stored`, so a chain with a write pending is never idle.)
    writing: usize,
}

impl<J> Default for Chain<J> {
    fn default() -> Self {
        Chain {
            queue: VecDeque::new(),
            head: false,
            stored: None,
            held: false,
            holding: 0,
            writing: 0,
        }
    }
}

impl<J> Chain<J> {
    fn idle(&self) -> bool {
        !self.head && self.queue.is_empty() && self.stored.is_none() && !self.held && self.holding == 0
    }

    /// The store's word that the chain has no rows can be taken: no write of its rows is
    /// pending, none is held.
    fn may_forget_stored(&self) -> bool {
        !self.held && self.holding == 0 && self.writing == 0
    }

    /// Rule 2's end: nothing in memory any more, held rows all written: they may go.
    fn release_held(&mut self, key: &str) -> Option<String> {
        if self.held && !self.head && self.queue.is_empty() && self.holding == 0 {
            self.held = false;
            Some(key.to_string())
        } else {
            None
        }
    }
}

pub struct Chains<J> {
    inner: Mutex<HashMap<String, Chain<J>>>,
}

impl<J> Default for Chains<J> {
    fn default() -> Self {
        Chains {
            inner: Mutex::new(HashMap::new()),
        }
    }
}

impl<J> Chains<J> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Chain<J>>> {
        self.inner.lock().expect("chains lock")
    }

    /// A memory delivery of chain `key` arrived (rule 1). A `Park` answer announces a write:
    /// `parked(key)` follows once it is committed (or abandoned).
    pub fn submit(&self, key: &str, job: J) -> Placement<J> {
        let mut chains = self.lock();
        let c = chains.entry(key.to_string()).or_default();
        if c.stored.is_some() {
            c.writing += 1;
            return Placement::Park(job);
        }
        if c.head {
            c.queue.push_back(job);
            return Placement::Queued;
        }
        c.head = true;
        Placement::Dispatch(job)
    }

    /// Rows of these chains are about to be written to the store (rule 2). Returns the write,
    /// with the chains whose rows must be held. Every call is followed by `written` with what
    /// it returned, whether the write committed or not.
    pub fn hold(&self, keys: &[String]) -> Holding {
        let now = Instant::now();
        let mut chains = self.lock();
        let mut held = HashSet::new();
        for k in keys {
            let c = chains.entry(k.clone()).or_default();
            c.stored = Some(now);
            c.writing += 1;
            if c.head || !c.queue.is_empty() {
                c.held = true;
                c.holding += 1;
                held.insert(k.clone());
            }
        }
        Holding {
            keys: keys.to_vec(),
            held,
        }
    }

    /// The write announced by `hold` finished. Returns the chains to promote.
    pub fn written(&self, w: &Holding) -> Vec<String> {
        let mut chains = self.lock();
        let mut promote = Vec::new();
        for k in &w.keys {
            if let Some(c) = chains.get_mut(k) {
                c.writing = c.writing.saturating_sub(1);
                if w.held.contains(k) {
                    c.holding = c.holding.saturating_sub(1);
                    promote.extend(c.release_held(k));
                }
            }
        }
        promote
    }

    /// A write of parked rows of `key` (announced by `submit` answering `Park`, or by
    /// `park_head`) was committed, or abandoned.
    pub fn parked(&self, key: &str) {
        if let Some(c) = self.lock().get_mut(key) {
            c.writing = c.writing.saturating_sub(1);
        }
    }

    /// The memory head of `key` finished (answered 2xx or dead-lettered).
    pub fn head_done(&self, key: &str) -> AfterHead<J> {
        let mut chains = self.lock();
        let Some(c) = chains.get_mut(key) else {
            return AfterHead::Nothing;
        };
        if let Some(next) = c.queue.pop_front() {
            return AfterHead::Dispatch(next);
        }
        c.head = false;
        let out = match c.release_held(key) {
            Some(k) => AfterHead::Promote(k),
            None => AfterHead::Nothing,
        };
        if c.idle() {
            chains.remove(key);
        }
        out
    }

    /// The memory head of `key` leaves memory for the store (rule 3). Returns the deliveries
    /// queued behind it (to be stored right after it, in order) and whether rows of the chain
    /// are held in the store (the parked ones go ahead of them). Announces a write: `parked(key)`
    /// follows.
    pub fn park_head(&self, key: &str) -> (Vec<J>, bool) {
        let mut chains = self.lock();
        let c = chains.entry(key.to_string()).or_default();
        let rest: Vec<J> = c.queue.drain(..).collect();
        c.head = false;
        c.stored = Some(Instant::now());
        c.writing += 1;
        let ahead = std::mem::take(&mut c.held);
        (rest, ahead)
    }

    /// The store says these chains have rows (loaded at start).
    pub fn note_stored(&self, keys: impl IntoIterator<Item = String>) {
        let now = Instant::now();
        let mut chains = self.lock();
        for k in keys {
            chains.entry(k).or_default().stored = Some(now);
        }
    }

    /// The store finished the last row of these chains (a finished head promoted nothing).
    pub fn drained(&self, keys: &[&str]) {
        let mut chains = self.lock();
        for k in keys {
            if let Some(c) = chains.get_mut(*k) {
                if c.may_forget_stored() {
                    c.stored = None;
                }
                if c.idle() {
                    chains.remove(*k);
                }
            }
        }
    }

    /// Forget that chains have stored rows when the store no longer lists them (`active`, read
    /// from the store after `since`): a flag set after the read started is kept.
    pub fn refresh_stored(&self, active: &HashSet<String>, since: Instant) {
        let mut chains = self.lock();
        chains.retain(|k, c| {
            if c.stored.is_some_and(|t| t < since) && !active.contains(k) && c.may_forget_stored() {
                c.stored = None;
            }
            !c.idle()
        });
    }

    /// Take the memory deliveries queued behind heads that `pick` selects (a stopped run's).
    pub fn remove_queued(&self, mut pick: impl FnMut(&J) -> bool) -> Vec<J> {
        let mut chains = self.lock();
        let mut out = Vec::new();
        for c in chains.values_mut() {
            let (take, keep): (VecDeque<J>, VecDeque<J>) = c.queue.drain(..).partition(|j| pick(j));
            c.queue = keep;
            out.extend(take);
        }
        out
    }

    /// Memory deliveries queued behind heads, over all chains.
    pub fn queued(&self) -> usize {
        self.lock().values().map(|c| c.queue.len()).sum()
    }

    /// Chains with a memory head.
    pub fn heads(&self) -> usize {
        self.lock().values().filter(|c| c.head).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatched(p: Placement<u32>) -> u32 {
        match p {
            Placement::Dispatch(j) => j,
            other => panic!("expected dispatch, got {other:?}"),
        }
    }

    #[test]
    fn only_the_head_of_a_chain_is_dispatched_and_the_next_follows_it() {
        let c = Chains::default();
        assert_eq!(dispatched(c.submit("k", 1)), 1);
        assert!(matches!(c.submit("k", 2), Placement::Queued));
        assert!(matches!(c.submit("k", 3), Placement::Queued));
        assert_eq!(dispatched(c.submit("other", 9)), 9, "other chains are independent");
        assert!(matches!(c.head_done("k"), AfterHead::Dispatch(2)));
        assert!(matches!(c.head_done("k"), AfterHead::Dispatch(3)));
        assert!(matches!(c.head_done("k"), AfterHead::Nothing));
        assert_eq!(dispatched(c.submit("k", 4)), 4, "an idle chain starts again");
    }

    #[test]
    fn a_memory_delivery_behind_stored_rows_is_parked_until_the_store_drains() {
        let c = Chains::default();
        let held = c.hold(&["k".to_string()]);
        assert!(held.held.is_empty(), "nothing in memory: the store orders it alone");
        assert!(c.written(&held).is_empty());
        assert!(matches!(c.submit("k", 1), Placement::Park(1)));
        c.parked("k");
        c.drained(&["k"]);
        assert_eq!(dispatched(c.submit("k", 2)), 2);
    }

    #[test]
    fn rows_stored_while_memory_deliveries_run_are_held_then_promoted_after_them() {
        let c = Chains::default();
        dispatched(c.submit("k", 1));
        assert!(matches!(c.submit("k", 2), Placement::Queued));
        let held = c.hold(&["k".to_string()]);
        assert!(held.held.contains("k"));
        assert!(c.written(&held).is_empty(), "memory part still running");
        assert!(
            matches!(c.submit("k", 3), Placement::Park(3)),
            "later ones go behind the held rows"
        );
        assert!(matches!(c.head_done("k"), AfterHead::Dispatch(2)));
        assert!(matches!(c.head_done("k"), AfterHead::Promote(ref k) if k == "k"));
    }

    #[test]
    fn held_rows_not_yet_written_are_promoted_by_their_write_not_by_the_drain() {
        let c = Chains::default();
        dispatched(c.submit("k", 1));
        let held = c.hold(&["k".to_string()]);
        assert!(
            matches!(c.head_done("k"), AfterHead::Nothing),
            "the held rows are not written yet"
        );
        assert_eq!(c.written(&held), vec!["k".to_string()]);
    }

    #[test]
    fn a_parked_head_takes_its_queue_along_ahead_of_held_rows() {
        let c = Chains::default();
        dispatched(c.submit("k", 1));
        c.submit("k", 2);
        c.submit("k", 3);
        let held = c.hold(&["k".to_string()]);
        c.written(&held);
        let (rest, ahead) = c.park_head("k");
        assert_eq!(rest, vec![2, 3]);
        assert!(ahead);
        assert!(matches!(c.submit("k", 4), Placement::Park(4)));
    }

    #[test]
    fn a_chain_is_not_forgotten_while_a_write_of_its_rows_is_pending() {
        let c = Chains::default();
        // 62 failed and was parked; its write committed.
        dispatched(c.submit("k", 62));
        assert_eq!(c.park_head("k"), (vec![], false));
        c.parked("k");
        // 63 arrives and is parked behind it; before its write commits, the store finishes 62
        // (the writer commits a batch's completions before its parked rows).
        assert!(matches!(c.submit("k", 63), Placement::Park(63)));
        c.drained(&["k"]);
        assert!(
            matches!(c.submit("k", 64), Placement::Park(64)),
            "64 must not overtake 63, which is about to be written"
        );
        // Nor does the periodic refresh forget it, whatever the store listed.
        c.refresh_stored(&HashSet::new(), Instant::now());
        assert!(matches!(c.submit("k", 65), Placement::Park(65)));
        // Written, then finished: the chain is memory's again.
        for _ in 0..3 {
            c.parked("k");
        }
        c.drained(&["k"]);
        assert_eq!(dispatched(c.submit("k", 66)), 66);
    }

    #[test]
    fn rows_the_relay_writes_keep_their_chain_stored_until_committed() {
        let c: Chains<u32> = Chains::default();
        let w = c.hold(&["k".to_string()]);
        assert!(w.held.is_empty(), "no memory part: nothing held");
        // A row of the chain finishes meanwhile and promotes nothing.
        c.drained(&["k"]);
        assert!(matches!(c.submit("k", 1), Placement::Park(1)), "the new row goes first");
        assert!(c.written(&w).is_empty());
        c.parked("k");
        c.drained(&["k"]);
        assert_eq!(dispatched(c.submit("k", 2)), 2);
    }

    #[test]
    fn refresh_keeps_flags_set_after_the_store_was_read() {
        let c: Chains<u32> = Chains::default();
        let before = Instant::now();
        c.note_stored(["old".to_string()]);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let since = Instant::now();
        c.note_stored(["new".to_string()]);
        c.refresh_stored(&HashSet::new(), since);
        assert!(matches!(c.submit("old", 1), Placement::Dispatch(1)));
        assert!(matches!(c.submit("new", 2), Placement::Park(2)));
        let _ = before;
    }
}
