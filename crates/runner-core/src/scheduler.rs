//! The keyed work queue.
//!
//! Invariants: a key is queued at most once (dedup); a key never runs twice
//! at once (a key enqueued while running runs again right after); at most
//! `concurrency` keys run at a time; a failing key backs off exponentially
//! with jitter, and its backoff resets on success (a failure that retrying
//! soon cannot help waits a fixed delay instead, see [`Next`]). On shutdown
//! no new work starts and in-flight work gets a grace period to finish.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::backoff::Backoff;
use crate::model::Action;

/// How the queue behaves.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most keys running at once.
    pub concurrency: usize,
    /// Per-key backoff after failures.
    pub backoff: Backoff,
}

/// Adds keys to the queue. Cheap to clone.
#[derive(Debug)]
pub struct Queue<K> {
    tx: mpsc::UnboundedSender<(K, Option<Duration>)>,
}

impl<K> Clone for Queue<K> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<K: Send + 'static> Queue<K> {
    /// Runs `key` as soon as a slot is free (once, however often it is added).
    pub fn enqueue(&self, key: K) {
        // A closed queue means shutdown; there is nothing left to do.
        let _ = self.tx.send((key, None));
    }

    /// Runs `key` after `delay`, unless it is due earlier anyway.
    pub fn enqueue_after(&self, key: K, delay: Duration) {
        let _ = self.tx.send((key, Some(delay)));
    }
}

/// What the queue does with a key once its work ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// It succeeded: its backoff resets, and the action says when it runs again.
    Done(Action),
    /// It failed and may succeed soon: it runs again after its backoff,
    /// which grows with every failure in a row.
    Backoff,
    /// It failed, and retrying soon cannot help: it runs again after this
    /// delay; its backoff is left as it was.
    RetryAfter(Duration),
}

/// How one unit of work ended.
pub trait Outcome {
    /// What the queue does with the key next.
    fn next(&self) -> Next;
}

impl Outcome for Next {
    fn next(&self) -> Next {
        *self
    }
}

/// Any error backs off.
impl<E> Outcome for Result<Action, E> {
    fn next(&self) -> Next {
        match self {
            Ok(action) => Next::Done(*action),
            Err(_) => Next::Backoff,
        }
    }
}

/// What happened when the queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Work that finished within the grace period.
    pub finished: usize,
    /// Work that was cut off when the grace period ran out.
    pub aborted: usize,
}

/// Observes the queue, for metrics.
pub trait QueueObserver: Send + Sync {
    /// Keys waiting (ready or delayed) and keys running.
    fn depth(&self, waiting: usize, running: usize);
}

impl QueueObserver for () {
    fn depth(&self, _: usize, _: usize) {}
}

/// Runs queued keys through a worker function.
pub struct Scheduler<K> {
    rx: mpsc::UnboundedReceiver<(K, Option<Duration>)>,
    config: SchedulerConfig,
}

impl<K> std::fmt::Debug for Scheduler<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct State<K> {
    ready: VecDeque<K>,
    queued: HashSet<K>,
    running: HashSet<K>,
    rerun: HashSet<K>,
    timers: DelayQueue<K>,
    timer_keys: HashMap<K, (delay_queue::Key, tokio::time::Instant)>,
    failures: HashMap<K, u32>,
}

impl<K: Clone + Eq + Hash> State<K> {
    fn push_now(&mut self, key: K) {
        if self.running.contains(&key) {
            self.rerun.insert(key);
            return;
        }
        if let Some((timer, _)) = self.timer_keys.remove(&key) {
            self.timers.remove(&timer);
        }
        if self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    fn push_after(&mut self, key: K, delay: Duration) {
        if self.queued.contains(&key) {
            return;
        }
        let deadline = tokio::time::Instant::now() + delay;
        if let Some((timer, existing)) = self.timer_keys.get(&key) {
            if *existing <= deadline {
                return;
            }
            self.timers.remove(timer);
        }
        let timer = self.timers.insert_at(key.clone(), deadline);
        self.timer_keys.insert(key, (timer, deadline));
    }

    fn waiting(&self) -> usize {
        self.ready.len() + self.timer_keys.len()
    }
}

impl<K: Clone + Eq + Hash + Send + Sync + std::fmt::Debug + 'static> Scheduler<K> {
    /// A queue and the scheduler that drains it.
    pub fn new(config: SchedulerConfig) -> (Queue<K>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Queue { tx }, Self { rx, config })
    }

    /// Runs `work` for queued keys until `shutdown`, then waits up to `grace`
    /// for running work and aborts the rest. It may be run again afterwards
    /// (a new leadership term); keys queued meanwhile are kept.
    pub async fn run<F, Fut, O>(
        &mut self,
        work: F,
        observer: &dyn QueueObserver,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Drained
    where
        F: Fn(K) -> Fut,
        Fut: Future<Output = O> + Send + 'static,
        O: Outcome + Send + 'static,
    {
        let mut state: State<K> = State {
            ready: VecDeque::new(),
            queued: HashSet::new(),
            running: HashSet::new(),
            rerun: HashSet::new(),
            timers: DelayQueue::new(),
            timer_keys: HashMap::new(),
            failures: HashMap::new(),
        };
        let mut tasks: JoinSet<O> = JoinSet::new();
        let mut task_keys: HashMap<tokio::task::Id, K> = HashMap::new();
        let concurrency = self.config.concurrency.max(1);

        loop {
            while tasks.len() < concurrency {
                let Some(key) = state.ready.pop_front() else {
                    break;
                };
                state.queued.remove(&key);
                state.running.insert(key.clone());
                let handle = tasks.spawn(work(key.clone()));
                task_keys.insert(handle.id(), key);
            }
            observer.depth(state.waiting(), state.running.len());

            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    // A panicked task backs off like a failure.
                    let (id, next) = match joined {
                        Ok((id, outcome)) => (id, outcome.next()),
                        Err(err) => (err.id(), Next::Backoff),
                    };
                    let Some(key) = task_keys.remove(&id) else { continue };
                    state.running.remove(&key);
                    match next {
                        Next::Done(action) => {
                            state.failures.remove(&key);
                            if let Action::Requeue(delay) = action {
                                state.push_after(key.clone(), delay);
                            }
                        }
                        Next::Backoff => {
                            let failures = state.failures.entry(key.clone()).or_insert(0);
                            *failures = failures.saturating_add(1);
                            let delay = self.config.backoff.equal_jitter(*failures);
                            state.push_after(key.clone(), delay);
                        }
                        Next::RetryAfter(delay) => state.push_after(key.clone(), delay),
                    }
                    if state.rerun.remove(&key) {
                        state.push_now(key);
                    }
                }
                Some(command) = self.rx.recv() => match command {
                    (key, None) => state.push_now(key),
                    (key, Some(delay)) => {
                        if state.running.contains(&key) {
                            // Decided when it finishes.
                        } else {
                            state.push_after(key, delay);
                        }
                    }
                },
                Some(expired) = state.timers.next(), if !state.timers.is_empty() => {
                    let key = expired.into_inner();
                    state.timer_keys.remove(&key);
                    state.push_now(key);
                }
            }
        }

        let running = tasks.len();
        let mut finished = 0;
        let drained = tokio::time::timeout(grace, async {
            while tasks.join_next().await.is_some() {
                finished += 1;
            }
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
        }
        observer.depth(0, 0);
        Drained {
            finished,
            aborted: running - finished,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn config(concurrency: usize) -> SchedulerConfig {
        SchedulerConfig {
            concurrency,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
        }
    }

    #[derive(Default)]
    struct Log {
        events: Mutex<Vec<(u32, &'static str, tokio::time::Instant)>>,
        running: Mutex<HashSet<u32>>,
        max_running: Mutex<usize>,
        /// Runs that started while the same key was running: counted here,
        /// since a panic inside the work is only a failed run to the scheduler.
        overlaps: Mutex<Vec<u32>>,
    }

    #[tokio::test(start_paused = true)]
    async fn dedups_never_runs_a_key_twice_at_once_and_caps_concurrency() {
        let (queue, mut scheduler) = Scheduler::<u32>::new(config(2));
        let log = Arc::new(Log::default());
        let shutdown = CancellationToken::new();
        for key in [1, 1, 2, 3, 1, 2] {
            queue.enqueue(key);
        }
        let work = {
            let log = log.clone();
            let queue = queue.clone();
            move |key: u32| {
                let log = log.clone();
                let queue = queue.clone();
                async move {
                    {
                        let mut running = log.running.lock().unwrap();
                        if !running.insert(key) {
                            log.overlaps.lock().unwrap().push(key);
                        }
                        let mut max = log.max_running.lock().unwrap();
                        *max = (*max).max(running.len());
                    }
                    log.events
                        .lock()
                        .unwrap()
                        .push((key, "start", tokio::time::Instant::now()));
                    // An event for a running key must rerun it afterwards, once.
                    queue.enqueue(key);
                    queue.enqueue(key);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    log.running.lock().unwrap().remove(&key);
                    Ok::<_, ()>(Action::AwaitChange)
                }
            }
        };
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                scheduler
                    .run(work, &(), shutdown, Duration::from_secs(5))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(20)).await;
        shutdown.cancel();
        task.await.unwrap();
        let events = log.events.lock().unwrap();
        let starts = |k| events.iter().filter(|(key, _, _)| *key == k).count();
        // Each key: its first run, then exactly one rerun for the events sent
        // while it ran; the reruns enqueue again, so it keeps going, but
        // never concurrently with itself.
        assert!(starts(1) >= 2 && starts(2) >= 2 && starts(3) >= 2);
        assert_eq!(*log.max_running.lock().unwrap(), 2);
        assert_eq!(
            *log.overlaps.lock().unwrap(),
            Vec::<u32>::new(),
            "keys that ran twice at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_and_success_resets() {
        let (queue, mut scheduler) = Scheduler::<u32>::new(config(4));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        queue.enqueue(7);
        let work = {
            let runs = runs.clone();
            move |_key: u32| {
                let runs = runs.clone();
                async move {
                    let mut runs = runs.lock().unwrap();
                    runs.push(tokio::time::Instant::now());
                    // Fail four times, then succeed and ask for a resync in 100 s.
                    if runs.len() <= 4 {
                        Err("boom")
                    } else {
                        Ok(Action::Requeue(Duration::from_secs(100)))
                    }
                }
            }
        };
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                scheduler
                    .run(work, &(), shutdown, Duration::from_secs(1))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(250)).await;
        shutdown.cancel();
        task.await.unwrap();
        let runs = runs.lock().unwrap();
        let gaps: Vec<Duration> = runs.windows(2).map(|w| w[1] - w[0]).collect();
        // Backoff ceilings 1, 2, 4, 8 s with equal jitter: each gap in [c/2, c].
        for (gap, ceiling) in gaps.iter().zip([1u64, 2, 4, 8]) {
            let c = Duration::from_secs(ceiling);
            assert!(
                *gap >= c / 2 && *gap <= c,
                "gap {gap:?} outside [{:?}, {c:?}]",
                c / 2
            );
        }
        // After success: requeue after 100 s, and the backoff was reset.
        assert_eq!(gaps[4], Duration::from_secs(100));
        assert_eq!(gaps[5], Duration::from_secs(100));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_drains_in_flight_work_within_the_grace_period() {
        let (queue, mut scheduler) = Scheduler::<u32>::new(config(2));
        let shutdown = CancellationToken::new();
        for key in 0..5 {
            queue.enqueue(key);
        }
        let work = |key: u32| async move {
            // Key 0 finishes in 2 s, key 1 would take an hour.
            let secs = if key == 0 { 2 } else { 3600 };
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Ok::<_, ()>(Action::AwaitChange)
        };
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                scheduler
                    .run(work, &(), shutdown, Duration::from_secs(10))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        let drained = task.await.unwrap();
        // Two were running; keys 2..5 never started.
        assert_eq!(
            drained,
            Drained {
                finished: 1,
                aborted: 1
            }
        );
        queue.enqueue(9);
    }
}
