//! Start, stop and terminate requests batched into one call per batch of ids.
//!
//! Requests for one operation arriving within a short window (50 ms without
//! a new one, 250 ms at most) go out as one call of up to 100 ids, taking
//! one token from the mutation bucket. A definite refusal of a batch (an id
//! EC2 does not know, or one in the wrong state, fails the whole call) is
//! split in halves until each id has its own answer, so one bad id never
//! blocks the others; a transient failure or a lapsed lease answers the
//! whole batch.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use governor::DefaultDirectRateLimiter;
use runner_core::batch::{Batcher, Batching};
use runner_core::leader::Leadership;
use runner_core::traits::ComputeError;

use super::{Gate, classify, gated, transient};

/// A batched operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Op {
    Start,
    Stop,
    Terminate,
}

/// One id's answer, shared by the waiters of a batch.
#[derive(Debug, Clone)]
enum Answer {
    Done,
    Fenced,
    Unavailable(String),
    Rejected(String),
}

impl Answer {
    fn of(err: &ComputeError) -> Self {
        match err {
            ComputeError::Fenced => Self::Fenced,
            ComputeError::Rejected(message) => Self::Rejected(message.clone()),
            other => Self::Unavailable(runner_core::error::chain(other)),
        }
    }

    fn into_result(self) -> Result<(), ComputeError> {
        match self {
            Self::Done => Ok(()),
            Self::Fenced => Err(ComputeError::Fenced),
            Self::Rejected(message) => Err(ComputeError::Rejected(message)),
            Self::Unavailable(message) => Err(ComputeError::Unavailable(message.into())),
        }
    }
}

type Answers = Arc<HashMap<String, Answer>>;

/// The batches being collected, one per operation.
pub(super) struct Mutations {
    client: Client,
    bucket: Arc<DefaultDirectRateLimiter>,
    leadership: Arc<Leadership>,
    batches: Arc<Batcher<Op, Answers>>,
}

impl std::fmt::Debug for Mutations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mutations")
            .field("batches", &self.batches)
            .finish_non_exhaustive()
    }
}

/// How mutations are batched.
pub(super) const BATCHING: Batching = Batching {
    idle: std::time::Duration::from_millis(50),
    max_wait: std::time::Duration::from_millis(250),
    max_ids: 100,
};

impl Mutations {
    /// Batches over `client` (without SDK retries), each call through `bucket`.
    pub(super) fn new(
        client: Client,
        bucket: Arc<DefaultDirectRateLimiter>,
        leadership: Arc<Leadership>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            bucket,
            leadership,
            batches: Batcher::new(BATCHING),
        })
    }

    /// Applies `op` to `instance_id` in the next batch and waits for its answer.
    pub(super) async fn submit(
        self: &Arc<Self>,
        op: Op,
        instance_id: &str,
    ) -> Result<(), ComputeError> {
        if !self.leadership.is_leader() {
            return Err(ComputeError::Fenced);
        }
        let this = Arc::clone(self);
        let flush = move |ids| async move { Arc::new(this.send(op, ids).await) };
        let answers = self
            .batches
            .submit(op, [instance_id.to_owned()], flush)
            .await
            .ok_or_else(|| ComputeError::Unavailable("the batch ended unanswered".into()))?;
        answers
            .get(instance_id)
            .cloned()
            .unwrap_or_else(|| Answer::Unavailable("the batch gave no answer".into()))
            .into_result()
    }

    async fn send(&self, op: Op, ids: Vec<String>) -> HashMap<String, Answer> {
        let mut answers = HashMap::new();
        let mut batches: Vec<Vec<String>> = ids
            .chunks(self.batches.batching().max_ids.max(1))
            .map(<[String]>::to_vec)
            .collect();
        while let Some(batch) = batches.pop() {
            let ids = Some(batch.clone());
            let result = match op {
                Op::Start => {
                    let request = self.client.start_instances().set_instance_ids(ids);
                    self.call(|| request.clone().send()).await
                }
                Op::Stop => {
                    let request = self.client.stop_instances().set_instance_ids(ids);
                    self.call(|| request.clone().send()).await
                }
                Op::Terminate => {
                    let request = self.client.terminate_instances().set_instance_ids(ids);
                    self.call(|| request.clone().send()).await
                }
            };
            match result {
                Ok(()) => answers.extend(batch.into_iter().map(|id| (id, Answer::Done))),
                // A definite refusal names no id reliably: halve until alone.
                Err((_, true)) if batch.len() > 1 => {
                    let (a, b) = batch.split_at(batch.len() / 2);
                    batches.push(a.to_vec());
                    batches.push(b.to_vec());
                }
                Err((err, _)) => {
                    let answer = Answer::of(&err);
                    answers.extend(batch.into_iter().map(|id| (id, answer.clone())));
                }
            }
        }
        answers
    }

    /// One gated call; on failure, the error and whether it was definite.
    async fn call<T, E, Fut>(&self, send: impl FnMut() -> Fut) -> Result<(), (ComputeError, bool)>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        Fut: std::future::Future<
                Output = Result<
                    T,
                    aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
                >,
            >,
    {
        match gated(&self.bucket, &self.leadership, send).await {
            Ok(_) => Ok(()),
            Err(Gate::NotLeading) => Err((ComputeError::Fenced, false)),
            Err(Gate::Sdk(err)) => {
                let definite = !transient(&err);
                Err((classify(*err), definite))
            }
        }
    }
}
