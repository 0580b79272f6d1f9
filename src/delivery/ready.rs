//! Jobs ready to start, queued per target (webhook / callback host).
//!
//! Why per target: the dispatcher runs after every finished request, and one busy target at its
//! cap can have thousands of ready jobs (a Kafka partition's worth, or a promoted backlog). With
//! one shared queue every pass walked and moved all of them to find the few it may start — work
//! that grew with the backlog on every completion. Here a pass costs one look per target: a
//! target at its cap is skipped whole, and jobs never move until they start.
//!
//! Order: within a target, jobs start in the order they were handed over (a run's chain has at
//! most one job here at a time anyway — `ordering` decides who is a head). Across targets the
//! passes go round-robin, so one target with a deep backlog cannot take every free slot pass
//! after pass.

use std::collections::{HashMap, VecDeque};

use super::job::Job;

#[derive(Default)]
pub(super) struct Ready {
    by_target: HashMap<String, VecDeque<Job>>,
    /// Targets with queued jobs; the next pass starts at the front.
    order: VecDeque<String>,
    len: usize,
}

impl Ready {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, job: Job) {
        self.len += 1;
        if let Some(q) = self.by_target.get_mut(&job.q.target_key) {
            q.push_back(job);
            return;
        }
        let key = job.q.target_key.clone();
        self.order.push_back(key.clone());
        self.by_target.insert(key, VecDeque::from([job]));
    }

    pub fn extend(&mut self, jobs: impl IntoIterator<Item = Job>) {
        for j in jobs {
            self.push(j);
        }
    }

    /// Take up to `free` jobs, counting each against its target in `per_target` and never taking
    /// one whose target already has `cap(target)` in flight (its allowance: the adaptive limit,
    /// 0 while blocked). Visits each target at most once.
    pub fn take(
        &mut self,
        mut free: usize,
        per_target: &mut HashMap<String, usize>,
        mut cap: impl FnMut(&str) -> usize,
    ) -> Vec<Job> {
        let mut out = Vec::new();
        let mut visits = self.order.len();
        while free > 0 && visits > 0 {
            visits -= 1;
            let Some(key) = self.order.pop_front() else { break };
            let n = per_target.get(&key).copied().unwrap_or(0);
            let room = cap(&key).saturating_sub(n).min(free);
            let q = self.by_target.get_mut(&key).expect("ordered target has a queue");
            let k = room.min(q.len());
            out.extend(q.drain(..k));
            free -= k;
            self.len -= k;
            if k > 0 {
                *per_target.entry(key.clone()).or_insert(0) += k;
            }
            if q.is_empty() {
                self.by_target.remove(&key);
            } else {
                self.order.push_back(key);
            }
        }
        out
    }

    /// The stored rows waiting here (their leases are renewed with those in flight).
    pub fn stored_seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.by_target
            .values()
            .flatten()
            .filter(|j| !j.is_memory())
            .map(|j| j.q.seq)
    }

    /// Drop the stored row `seq` (its lease was lost: another instance has it now).
    pub fn remove_stored(&mut self, seq: i64) {
        let Some(key) = self
            .by_target
            .iter()
            .find(|(_, q)| q.iter().any(|j| !j.is_memory() && j.q.seq == seq))
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        self.remove_in(&key, |j| !j.is_memory() && j.q.seq == seq);
    }

    /// Remove and return the jobs of one target that `pick` selects, keeping the rest in order
    /// (a blocked target's stored rows go back to the store's care).
    pub fn remove_in(&mut self, key: &str, mut pick: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let Some(q) = self.by_target.get_mut(key) else {
            return Vec::new();
        };
        let (taken, kept): (VecDeque<Job>, VecDeque<Job>) = q.drain(..).partition(|j| pick(j));
        *q = kept;
        self.len -= taken.len();
        if q.is_empty() {
            self.by_target.remove(key);
            self.order.retain(|k| k != key);
        }
        taken.into()
    }

    /// Remove and return every job `pick` selects (a stopped run's), keeping the rest in order.
    pub fn remove_where(&mut self, mut pick: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut out = Vec::new();
        for q in self.by_target.values_mut() {
            let (taken, kept): (VecDeque<Job>, VecDeque<Job>) = q.drain(..).partition(|j| pick(j));
            out.extend(taken);
            *q = kept;
        }
        self.len -= out.len();
        self.by_target.retain(|_, q| !q.is_empty());
        let by_target = &self.by_target;
        self.order.retain(|k| by_target.contains_key(k));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::QueuedDelivery;

    fn job(seq: i64, target: &str) -> Job {
        Job::stored(QueuedDelivery {
            seq,
            id: format!("d{seq}"),
            event_id: format!("e{seq}"),
            event: "sync_job_run:record".into(),
            run_id: None,
            kind: "webhook".into(),
            webhook_id: None,
            target_url: None,
            target_key: target.into(),
            order_key: None,
            body: String::new(),
            attempts: 0,
            first_attempt_at: None,
            created_at: 0,
            source: None,
        })
    }

    fn seqs(jobs: &[Job]) -> Vec<i64> {
        jobs.iter().map(|j| j.q.seq).collect()
    }

    #[test]
    fn a_target_at_its_cap_is_skipped_and_others_go_in_order() {
        let mut r = Ready::default();
        for s in 0..5 {
            r.push(job(s, "a"));
        }
        r.push(job(10, "b"));
        r.push(job(11, "b"));
        let mut per = HashMap::from([("a".to_string(), 2)]);
        let got = r.take(10, &mut per, |_| 2);
        assert_eq!(seqs(&got), vec![10, 11]);
        assert_eq!(per["b"], 2);
        assert_eq!(r.len(), 5);
        // a's slots free up: its jobs start oldest first, up to the cap.
        per.insert("a".into(), 0);
        let got = r.take(10, &mut per, |_| 2);
        assert_eq!(seqs(&got), vec![0, 1]);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn free_slots_bound_a_pass_and_targets_take_turns() {
        let mut r = Ready::default();
        for s in 0..4 {
            r.push(job(s, "a"));
            r.push(job(100 + s, "b"));
        }
        let mut per = HashMap::new();
        let first = r.take(3, &mut per, |_| 100);
        assert_eq!(first.len(), 3);
        // The next pass starts with the target the last one did not finish.
        let second = r.take(1, &mut per, |_| 100);
        assert_ne!(second[0].q.target_key, first[0].q.target_key);
        let rest = r.take(100, &mut per, |_| 100);
        assert_eq!(first.len() + second.len() + rest.len(), 8);
        assert!(r.is_empty());
        assert_eq!(per["a"] + per["b"], 8);
    }

    #[test]
    fn removal_keeps_the_rest_in_order() {
        let mut r = Ready::default();
        for s in 0..6 {
            r.push(job(s, if s % 2 == 0 { "a" } else { "b" }));
        }
        let gone = r.remove_where(|j| j.q.seq % 3 == 0);
        let mut gone = seqs(&gone);
        gone.sort();
        assert_eq!(gone, vec![0, 3]);
        assert_eq!(r.len(), 4);
        let mut per = HashMap::new();
        let left = r.take(10, &mut per, |_| 10);
        // Within a target the rest keep their order.
        let a: Vec<i64> = left.iter().filter(|j| j.q.target_key == "a").map(|j| j.q.seq).collect();
        let b: Vec<i64> = left.iter().filter(|j| j.q.target_key == "b").map(|j| j.q.seq).collect();
        assert_eq!(a, vec![2, 4]);
        assert_eq!(b, vec![1, 5]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_blocked_target_gives_up_what_is_picked_and_a_zero_allowance_takes_nothing() {
        let mut r = Ready::default();
        for s in 0..4 {
            r.push(job(s, "a"));
        }
        r.push(job(9, "b"));
        let mut per = HashMap::new();
        // a is blocked (allowance 0): nothing of it starts, b does.
        let got = r.take(10, &mut per, |k| if k == "a" { 0 } else { 5 });
        assert_eq!(seqs(&got), vec![9]);
        assert!(!per.contains_key("a"));
        let gone = r.remove_in("a", |j| j.q.seq % 2 == 1);
        assert_eq!(seqs(&gone), vec![1, 3]);
        assert_eq!(r.len(), 2);
        let all = r.remove_in("a", |_| true);
        assert_eq!(seqs(&all), vec![0, 2]);
        assert!(r.is_empty());
        assert!(r.remove_in("a", |_| true).is_empty());
    }
}
