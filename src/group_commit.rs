//! Group commit: concurrent callers that each want a small write share one transaction.
//!
//! Each caller adds its item to the pending list and queues for the leader lock; whoever holds
//! the lock takes every item pending at that moment and commits them together, then
//! acknowledges each. A caller returns once its own item is committed (or its batch failed),
//! so per-caller ordering guarantees are kept while throughput grows with concurrency.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

type Ack = oneshot::Sender<Option<String>>;

pub struct GroupCommit<T> {
    pending: Mutex<Vec<(T, Ack)>>,
    leader: tokio::sync::Mutex<()>,
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        GroupCommit {
            pending: Mutex::new(Vec::new()),
            leader: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T> GroupCommit<T> {
    /// Commit `item`, together with whatever other callers submit meanwhile, through
    /// `commit` (called with the whole batch, in submission order).
    pub async fn submit<F, Fut>(&self, item: T, commit: F) -> anyhow::Result<()>
    where
        F: FnOnce(Vec<T>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("lock").push((item, tx));
        {
            let _leader = self.leader.lock().await;
            let batch = std::mem::take(&mut *self.pending.lock().expect("lock"));
            if !batch.is_empty() {
                let (items, acks): (Vec<T>, Vec<Ack>) = batch.into_iter().unzip();
                let failed = commit(items).await.err().map(|e| format!("{e:#}"));
                for ack in acks {
                    let _ = ack.send(failed.clone());
                }
            }
        }
        match rx.await {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(anyhow::anyhow!(e)),
            Err(_) => Err(anyhow::anyhow!("batch dropped before it was committed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_items_share_commits_and_every_caller_sees_its_item_committed() {
        let group = Arc::new(GroupCommit::<usize>::default());
        let committed = Arc::new(Mutex::new(Vec::new()));
        let commits = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200 {
            let (g, c, n) = (group.clone(), committed.clone(), commits.clone());
            tasks.push(tokio::spawn(async move {
                let c2 = c.clone();
                g.submit(i, |items| async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    c2.lock().unwrap().extend(items);
                    Ok(())
                })
                .await
                .unwrap();
                // Returned only after its own item was committed.
                assert!(c.lock().unwrap().contains(&i));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut all = committed.lock().unwrap().clone();
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
        assert!(commits.load(Ordering::SeqCst) < 200, "items were not grouped");
    }

    #[tokio::test]
    async fn a_failed_commit_is_reported_to_its_callers() {
        let group = GroupCommit::<u8>::default();
        let err = group
            .submit(1, |_| async { Err(anyhow::anyhow!("disk full")) })
            .await
            .unwrap_err();
        assert!(format!("{err}").contains("disk full"));
    }
}
