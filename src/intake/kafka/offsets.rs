//! Which offsets of each partition are read but unfinished, and so which offset may be
//! committed: never past an event that is not yet delivered, dead-lettered or stored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use super::{Tp, RESUME_REWIND, RESUME_REWIND_BYTES};
use crate::metrics::Metrics;

/// What to do with a message just read.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Take,
    /// Take it; its partition's buffer is now full: pause the partition.
    TakeAndPause,
    Skip,
}

/// Per-partition bookkeeping: which offsets are read but unfinished.
#[derive(Default)]
struct PartitionState {
    /// Offset → its message's payload bytes.
    pending: BTreeMap<i64, usize>,
    /// The payload bytes of `pending`.
    bytes: usize,
    /// The last messages taken, (offset, bytes), oldest first: at most `RESUME_REWIND` of them
    /// and no more than needed to cover `RESUME_REWIND_BYTES`. Where a resume reads from.
    recent: VecDeque<(i64, usize)>,
    recent_bytes: usize,
    /// One past the highest offset read.
    next: i64,
    /// The offset last stored for commit.
    stored: i64,
    paused: bool,
    /// Bumped on every assign and revoke: jobs of an older generation are stale.
    generation: u64,
    assigned: bool,
}

/// Shared between the consumer loop, the chain workers and the rebalance callbacks.
pub struct Tracker {
    parts: Mutex<HashMap<Tp, PartitionState>>,
    /// A partition pauses at this many unfinished events…
    max_buffered: usize,
    /// …or at this many bytes of them, whichever comes first: 2,000 events of 16 KiB are
    /// 32 MiB a partition, which a count alone lets through.
    max_bytes: usize,
    metrics: Metrics,
}

impl Tracker {
    pub fn new(max_buffered: usize, max_bytes: usize, metrics: Metrics) -> Tracker {
        Tracker {
            parts: Mutex::new(HashMap::new()),
            max_buffered,
            max_bytes,
            metrics,
        }
    }
}

impl Tracker {
    pub fn generation(&self, tp: &Tp) -> u64 {
        self.parts
            .lock()
            .expect("lock")
            .get(tp)
            .map(|p| p.generation)
            .unwrap_or(0)
    }

    pub fn is_current(&self, tp: &Tp, generation: u64) -> bool {
        self.parts
            .lock()
            .expect("lock")
            .get(tp)
            .is_some_and(|p| p.assigned && p.generation == generation)
    }

    /// A message of `bytes` was read: take it (and pause its partition when its buffer is now
    /// full, in events or in bytes), or skip it (read while its partition is paused, or already
    /// read: it is fetched again from `next` when the partition resumes). A message larger than
    /// the byte bound is still taken, alone.
    pub fn begin(&self, tp: &Tp, offset: i64, bytes: usize) -> Read {
        let mut parts = self.parts.lock().expect("lock");
        let p = parts.entry(tp.clone()).or_default();
        if p.paused || (p.next > 0 && offset < p.next) {
            return Read::Skip;
        }
        if p.pending.is_empty() && p.next == 0 {
            p.stored = offset;
            tracing::info!(topic = %tp.0, partition = tp.1, offset, "first message after assignment");
        } else if offset > p.next {
            // Compacted topics and transaction markers leave gaps; anything else is worth a look.
            tracing::warn!(topic = %tp.0, partition = tp.1, expected = p.next, got = offset, "offset gap");
        }
        // Never already pending: an offset below `next` was skipped above.
        p.pending.insert(offset, bytes);
        p.bytes += bytes;
        p.next = p.next.max(offset + 1);
        p.recent.push_back((offset, bytes));
        p.recent_bytes += bytes;
        while let Some(&(_, first)) = p.recent.front() {
            if p.recent.len() as i64 > RESUME_REWIND || p.recent_bytes - first >= RESUME_REWIND_BYTES {
                p.recent.pop_front();
                p.recent_bytes -= first;
            } else {
                break;
            }
        }
        if p.pending.len() >= self.max_buffered || p.bytes >= self.max_bytes {
            p.paused = true;
            self.metrics.kafka_paused_partitions.inc();
            return Read::TakeAndPause;
        }
        Read::Take
    }

    /// A message is finished. Returns the offset to store when the contiguous finished prefix
    /// advanced, and the offset to resume reading from when the partition may resume.
    pub fn finish(&self, tp: &Tp, offset: i64, generation: u64) -> (Option<i64>, Option<i64>) {
        let mut parts = self.parts.lock().expect("lock");
        let Some(p) = parts.get_mut(tp) else {
            return (None, None);
        };
        if p.generation != generation {
            return (None, None);
        }
        if let Some(bytes) = p.pending.remove(&offset) {
            p.bytes -= bytes;
        }
        let watermark = p.pending.first_key_value().map(|(o, _)| *o).unwrap_or(p.next);
        let store = (watermark > p.stored).then(|| {
            if watermark / 250 != p.stored / 250 {
                tracing::debug!(topic = %tp.0, partition = tp.1, watermark, "offset stored");
            }
            p.stored = watermark;
            watermark
        });
        let resume = p.paused && p.pending.len() <= self.max_buffered / 2 && p.bytes <= self.max_bytes / 2;
        if resume {
            p.paused = false;
            self.metrics.kafka_paused_partitions.dec();
        }
        // Resume a little before the first offset not taken; what was taken already is
        // skipped as it comes again. Kafka answers a fetch inside a record batch with that
        // batch, but some brokers (tansu 0.6) answer with the next one, which would skip the
        // rest of the batch. So the rewind must span a record batch: `RESUME_REWIND` offsets,
        // or fewer when the messages taken over them hold `RESUME_REWIND_BYTES` (a batch is at
        // most about that big; 1,000 offsets of 16 KiB events re-read 16 MiB on every resume,
        // which the byte bound made frequent). Only then: when they hold less (a partition
        // just assigned, resuming after its first few hundred), the batch of the first one may
        // begin before it, and only the offset rewind is sure to reach it.
        let from = match p.recent.front() {
            Some((o, _)) if p.recent_bytes >= RESUME_REWIND_BYTES => *o,
            _ => p.next.saturating_sub(RESUME_REWIND),
        }
        .max(0);
        // Not limited to the stored offset: that may lie inside a record batch too.
        (store, resume.then_some(from))
    }

    /// The offset stored for commit of every assigned partition that has read something.
    pub fn watermarks(&self) -> Vec<(Tp, i64)> {
        self.parts
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, p)| p.assigned && p.next > 0)
            .map(|(tp, p)| (tp.clone(), p.stored))
            .collect()
    }

    /// Partitions were assigned. `committed`: each one's committed offset, when it has one —
    /// reading starts a little before it (see `context`), and what comes before it is finished
    /// and skipped.
    pub fn assign(&self, tps: &[(Tp, Option<i64>)]) {
        let mut parts = self.parts.lock().expect("lock");
        for (tp, committed) in tps {
            let p = parts.entry(tp.clone()).or_default();
            if p.paused {
                self.metrics.kafka_paused_partitions.dec();
            }
            let generation = p.generation + 1;
            // (A fresh state: `recent` is empty, so a resume before anything is taken rewinds
            // by `RESUME_REWIND` offsets.)
            *p = PartitionState {
                generation,
                assigned: true,
                next: committed.unwrap_or(0),
                stored: committed.unwrap_or(0),
                ..Default::default()
            };
        }
    }

    pub fn revoke(&self, tps: &[Tp]) {
        let mut parts = self.parts.lock().expect("lock");
        for tp in tps {
            if let Some(p) = parts.get_mut(tp) {
                if p.paused {
                    self.metrics.kafka_paused_partitions.dec();
                }
                p.generation += 1;
                p.assigned = false;
                p.paused = false;
                p.pending.clear();
                p.bytes = 0;
                p.recent.clear();
                p.recent_bytes = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::kafka::decode;

    fn tracker(max: usize) -> Tracker {
        Tracker::new(max, usize::MAX, Metrics::new())
    }

    #[test]
    fn offsets_are_stored_only_for_the_contiguous_finished_prefix() {
        let t = tracker(100);
        let tp: Tp = ("t".into(), 0);
        t.assign(&[(tp.clone(), None)]);
        let g = t.generation(&tp);
        for o in 10..15 {
            t.begin(&tp, o, 1);
        }
        // 11 and 12 finish first: nothing can be stored while 10 is unfinished.
        assert_eq!(t.finish(&tp, 11, g).0, None);
        assert_eq!(t.finish(&tp, 12, g).0, None);
        // 10 finishes: the prefix 10..=12 is done, the next offset to read is 13.
        assert_eq!(t.finish(&tp, 10, g).0, Some(13));
        assert_eq!(t.finish(&tp, 14, g).0, None);
        assert_eq!(t.finish(&tp, 13, g).0, Some(15));
    }

    #[test]
    fn a_partition_pauses_at_the_bound_skips_what_arrives_paused_and_resumes_where_it_stopped() {
        let t = tracker(4);
        let tp: Tp = ("t".into(), 1);
        t.assign(&[(tp.clone(), None)]);
        let g = t.generation(&tp);
        assert_eq!(t.begin(&tp, 0, 1), Read::Take);
        assert_eq!(t.begin(&tp, 1, 1), Read::Take);
        assert_eq!(t.begin(&tp, 2, 1), Read::Take);
        assert_eq!(t.begin(&tp, 3, 1), Read::TakeAndPause, "pauses at 4 buffered");
        // Already fetched before the pause took effect: skipped, read again after resuming.
        assert_eq!(t.begin(&tp, 4, 1), Read::Skip);
        assert_eq!(t.begin(&tp, 5, 1), Read::Skip);
        assert_eq!(t.finish(&tp, 0, g).1, None);
        assert_eq!(
            t.finish(&tp, 1, g).1,
            Some(0),
            "resumes at 2 buffered, rewound by up to RESUME_REWIND (a fetch may start inside a batch)"
        );
        assert_eq!(t.begin(&tp, 2, 1), Read::Skip, "taken before the pause");
        assert_eq!(t.begin(&tp, 3, 1), Read::Skip);
        assert_eq!(t.begin(&tp, 4, 1), Read::Take);
        // A stale copy of an offset already read is never taken twice.
        assert_eq!(t.begin(&tp, 2, 1), Read::Skip);
    }

    #[test]
    fn a_partition_also_pauses_at_its_byte_bound_and_resumes_below_half_of_it() {
        // 100 events or 64 KiB: 16 KiB events fill the bytes first.
        let t = Tracker::new(100, 64 * 1024, Metrics::new());
        let tp: Tp = ("t".into(), 3);
        t.assign(&[(tp.clone(), None)]);
        let g = t.generation(&tp);
        for o in 0..3 {
            assert_eq!(t.begin(&tp, o, 16 * 1024), Read::Take);
        }
        assert_eq!(t.begin(&tp, 3, 16 * 1024), Read::TakeAndPause, "pauses at 64 KiB");
        assert_eq!(t.begin(&tp, 4, 16 * 1024), Read::Skip);
        assert_eq!(t.finish(&tp, 0, g).1, None, "48 KiB left: above half");
        assert!(t.finish(&tp, 1, g).1.is_some(), "32 KiB left: resumes");
        // A message larger than the whole bound is taken alone, not refused for ever.
        assert_eq!(t.finish(&tp, 2, g).1, None);
        assert_eq!(t.finish(&tp, 3, g).1, None);
        assert_eq!(t.begin(&tp, 4, 1024 * 1024), Read::TakeAndPause);
        assert!(t.finish(&tp, 4, g).1.is_some());
    }

    #[test]
    fn a_resume_rewinds_over_a_record_batch_not_a_thousand_large_messages() {
        let t = Tracker::new(100, 1 << 30, Metrics::new());
        let tp: Tp = ("t".into(), 4);
        t.assign(&[(tp.clone(), Some(10_000))]);
        let g = t.generation(&tp);
        // 16 KiB messages: the rewind covers RESUME_REWIND_BYTES of them (64), not 1,000.
        for o in 10_000..10_100 {
            t.begin(&tp, o, 16 * 1024);
        }
        let mut resumed = None;
        for o in 10_000..10_050 {
            resumed = resumed.or(t.finish(&tp, o, g).1);
        }
        let per_batch = (RESUME_REWIND_BYTES / (16 * 1024)) as i64;
        assert_eq!(resumed, Some(10_100 - per_batch));
        // 100-byte messages: capped at RESUME_REWIND offsets.
        let t = Tracker::new(1_200, 1 << 30, Metrics::new());
        t.assign(&[(tp.clone(), Some(0))]);
        let g = t.generation(&tp);
        for o in 0..1_200 {
            t.begin(&tp, o, 100);
        }
        let mut resumed = None;
        for o in 0..600 {
            resumed = resumed.or(t.finish(&tp, o, g).1);
        }
        assert_eq!(resumed, Some(1_200 - RESUME_REWIND));
        // Just assigned at 5,000, paused after 200 small ones: the messages taken hold less
        // than a batch, whose start may lie before 5,000, so the offset rewind applies.
        let t = Tracker::new(200, 1 << 30, Metrics::new());
        t.assign(&[(tp.clone(), Some(5_000))]);
        let g = t.generation(&tp);
        for o in 5_000..5_200 {
            t.begin(&tp, o, 100);
        }
        let mut resumed = None;
        for o in 5_000..5_100 {
            resumed = resumed.or(t.finish(&tp, o, g).1);
        }
        assert_eq!(resumed, Some(5_200 - RESUME_REWIND));
    }

    #[test]
    fn revoked_work_is_stale_and_cannot_store_offsets() {
        let t = tracker(10);
        let tp: Tp = ("t".into(), 2);
        t.assign(&[(tp.clone(), None)]);
        let g = t.generation(&tp);
        t.begin(&tp, 5, 1);
        t.revoke(std::slice::from_ref(&tp));
        assert!(!t.is_current(&tp, g));
        assert_eq!(t.finish(&tp, 5, g), (None, None));
        t.assign(&[(tp.clone(), None)]);
        assert!(!t.is_current(&tp, g), "a new assignment is a new generation");
    }

    #[test]
    fn a_newly_assigned_partition_skips_what_was_finished_before_its_committed_offset() {
        let t = tracker(100);
        let tp: Tp = ("t".into(), 3);
        // Committed at 50; reading starts rewound (tansu may answer a fetch inside a record
        // batch with the next batch), so offsets before 50 come again and are skipped.
        t.assign(&[(tp.clone(), Some(50))]);
        let g = t.generation(&tp);
        assert_eq!(t.begin(&tp, 45, 1), Read::Skip);
        assert_eq!(t.begin(&tp, 49, 1), Read::Skip);
        assert_eq!(t.begin(&tp, 50, 1), Read::Take);
        assert_eq!(t.begin(&tp, 51, 1), Read::Take);
        assert_eq!(t.finish(&tp, 51, g).0, None, "50 is unfinished");
        assert_eq!(t.finish(&tp, 50, g).0, Some(52));
    }

    #[test]
    fn poison_is_classified() {
        assert_eq!(decode(b"\xff\xfe", 100, 0).unwrap_err().0, "malformed");
        assert_eq!(decode(b"{not json", 100, 0).unwrap_err().0, "malformed");
        assert_eq!(decode(br#"{"id":"a"}"#, 100, 0).unwrap_err().0, "malformed");
        assert_eq!(decode(&[b' '; 200], 100, 0).unwrap_err().0, "event_too_large");
    }
}
