//! Batching of calls by id: requests arriving within a short window share
//! one call, as EC2's batchers do. The observer's lookups by id and the EC2
//! adapter's start, stop and terminate calls both go through [`Batcher`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// When a batch goes out, and how large its calls are.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// A batch goes out when no id joined it for this long...
    pub idle: Duration,
    /// ...or when its first id has waited this long.
    pub max_wait: Duration,
    /// Ids per call (the flush splits a larger batch).
    pub max_ids: usize,
}

/// One open batch: its ids (in order, once each) and where its outcome is
/// announced.
struct Open<O> {
    ids: Vec<String>,
    seen: HashSet<String>,
    opened: Instant,
    last_added: Instant,
    done: watch::Sender<Option<O>>,
}

/// Open batches, one per group (an operation), each flushed once by a task
/// of its own when its window closes; every caller of a batch gets a clone
/// of its outcome.
pub struct Batcher<G, O> {
    batching: Batching,
    open: Mutex<HashMap<G, Open<O>>>,
}

impl<G, O> std::fmt::Debug for Batcher<G, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("batching", &self.batching)
            .finish_non_exhaustive()
    }
}

impl<G, O> Batcher<G, O>
where
    G: Clone + Eq + Hash + Send + Sync + 'static,
    O: Clone + Send + Sync + 'static,
{
    /// No batch open yet.
    pub fn new(batching: Batching) -> Arc<Self> {
        Arc::new(Self {
            batching,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// How batches are formed.
    pub fn batching(&self) -> Batching {
        self.batching
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<G, Open<O>>> {
        self.open.lock().expect("batch lock is never poisoned")
    }

    /// Adds `ids` to the open batch of `group` (opening one whose ids go to
    /// `flush` when its window closes) and waits for the batch's outcome;
    /// `None` if its flush never answered.
    pub async fn submit<F, Fut>(
        self: &Arc<Self>,
        group: G,
        ids: impl IntoIterator<Item = String>,
        flush: F,
    ) -> Option<O>
    where
        F: FnOnce(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = O> + Send + 'static,
    {
        let mut done = {
            let mut open = self.open();
            let now = Instant::now();
            if let Some(batch) = open.get_mut(&group) {
                for id in ids {
                    if batch.seen.insert(id.clone()) {
                        batch.ids.push(id);
                    }
                }
                batch.last_added = now;
                batch.done.subscribe()
            } else {
                let (tx, rx) = watch::channel(None);
                let mut batch = Open {
                    ids: Vec::new(),
                    seen: HashSet::new(),
                    opened: now,
                    last_added: now,
                    done: tx,
                };
                for id in ids {
                    if batch.seen.insert(id.clone()) {
                        batch.ids.push(id);
                    }
                }
                open.insert(group.clone(), batch);
                // Its own task: a caller that gives up does not strand the others.
                tokio::spawn(Arc::clone(self).collect_and_flush(group, flush));
                rx
            }
        };
        done.wait_for(Option::is_some).await.ok()?.clone()
    }

    async fn collect_and_flush<F, Fut>(self: Arc<Self>, group: G, flush: F)
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = O>,
    {
        let batch = loop {
            let due = {
                let open = self.open();
                let Some(batch) = open.get(&group) else {
                    return;
                };
                (batch.last_added + self.batching.idle).min(batch.opened + self.batching.max_wait)
            };
            tokio::time::sleep_until(due).await;
            let mut open = self.open();
            let now = Instant::now();
            let ready = open.get(&group).is_some_and(|b| {
                now >= b.last_added + self.batching.idle
                    || now >= b.opened + self.batching.max_wait
                    || b.ids.len() >= self.batching.max_ids
            });
            if ready && let Some(batch) = open.remove(&group) {
                break batch;
            }
        };
        let outcome = flush(batch.ids).await;
        batch.done.send_replace(Some(outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCHING: Batching = Batching {
        idle: Duration::from_millis(100),
        max_wait: Duration::from_secs(1),
        max_ids: 200,
    };

    #[tokio::test(start_paused = true)]
    async fn ids_within_the_window_share_one_flush_and_each_group_its_own() {
        let batcher: Arc<Batcher<&'static str, Vec<String>>> = Batcher::new(BATCHING);
        let flushes = Arc::new(Mutex::new(Vec::new()));
        let submit = |group: &'static str, id: &str, delay: u64| {
            let (batcher, flushes, id) = (batcher.clone(), flushes.clone(), id.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                batcher
                    .submit(group, [id], move |ids| async move {
                        flushes.lock().expect("lock").push((group, ids.clone()));
                        ids
                    })
                    .await
            })
        };
        let calls = [
            submit("stop", "i-1", 0),
            submit("stop", "i-2", 50),
            submit("stop", "i-1", 60),
            submit("start", "i-3", 60),
            // After 100 ms without a new id: the next batch.
            submit("stop", "i-4", 400),
        ];
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.expect("task").expect("answered"));
        }
        let batch = vec!["i-1".to_owned(), "i-2".to_owned()];
        assert_eq!(outcomes[0], batch, "every caller gets the batch's outcome");
        assert_eq!(outcomes[2], batch, "an id twice is sent once");
        assert_eq!(outcomes[3], ["i-3"]);
        assert_eq!(outcomes[4], ["i-4"]);
        assert_eq!(flushes.lock().expect("lock").len(), 3, "three calls");
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_trickle_is_flushed_at_the_longest_wait() {
        let batcher: Arc<Batcher<(), usize>> = Batcher::new(BATCHING);
        let started = Instant::now();
        let mut calls = Vec::new();
        // An id every 30 ms: never idle for 100 ms.
        for k in 0..40u64 {
            let batcher = batcher.clone();
            calls.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30 * k)).await;
                batcher
                    .submit((), [format!("i-{k}")], |ids| async move { ids.len() })
                    .await
                    .map(|n| (n, started.elapsed()))
            }));
        }
        let (first_size, first_at) = calls.remove(0).await.expect("task").expect("answered");
        assert_eq!(first_at, Duration::from_secs(1), "flushed at max_wait");
        assert_eq!(first_size, 34, "the ids of its first second");
    }
}
