//! The runners' open `WatchRequests` streams and the calls waiting for answers.
//!
//! Events go to every open stream of a runner (replicas overlap during a
//! deployment); a call goes to exactly one stream, the newest, and waits for
//! its `SendResponse`. A stream that cannot keep up is closed rather than
//! buffered without bound: the runner reconnects and lists everything, which
//! loses nothing because the protocol is level-triggered.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use runner_proto::pb::{self, runner_request, runner_result, send_response_request};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

/// How many requests may wait in one stream before it is closed as too slow.
const STREAM_BUFFER: usize = 256;

/// The answer to a call: a result or the runner's error.
pub type Outcome = send_response_request::Outcome;

/// Routes events and calls to runners' streams.
#[derive(Debug, Default, Clone)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_stream: u64,
    streams: HashMap<Uuid, Vec<StreamSlot>>,
    pending: HashMap<String, Pending>,
}

#[derive(Debug)]
struct StreamSlot {
    id: u64,
    tx: mpsc::Sender<Result<pb::RunnerRequest, Status>>,
}

#[derive(Debug)]
struct Pending {
    runner_id: Uuid,
    call: CallKind,
    tx: oneshot::Sender<Outcome>,
}

/// The kinds of call a runner answers, to check that a result fits its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    Ping,
    CheckAuthenticationForHost,
    ParseContext,
    ValidateEnvironmentClass,
    ExchangeOauthCode,
    StoreHostToken,
}

impl CallKind {
    fn of_request(kind: &runner_request::Kind) -> Option<Self> {
        use runner_request::Kind as K;
        Some(match kind {
            K::Ping(_) => Self::Ping,
            K::CheckAuthenticationForHost(_) => Self::CheckAuthenticationForHost,
            K::ParseContext(_) => Self::ParseContext,
            K::ValidateEnvironmentClass(_) => Self::ValidateEnvironmentClass,
            K::ExchangeOauthCode(_) => Self::ExchangeOauthCode,
            K::StoreHostToken(_) => Self::StoreHostToken,
            K::EnvironmentChanged(_) | K::ScmIntegrationChanged(_) | K::HostTokenDeleted(_) => {
                return None;
            }
        })
    }

    fn of_result(kind: &runner_result::Kind) -> Self {
        use runner_result::Kind as K;
        match kind {
            K::Ping(_) => Self::Ping,
            K::CheckAuthenticationForHost(_) => Self::CheckAuthenticationForHost,
            K::ParseContext(_) => Self::ParseContext,
            K::ValidateEnvironmentClass(_) => Self::ValidateEnvironmentClass,
            K::ExchangeOauthCode(_) => Self::ExchangeOauthCode,
            K::StoreHostToken(_) => Self::StoreHostToken,
        }
    }
}

impl Hub {
    /// Opens a stream for `runner_id`; it unregisters itself when dropped.
    pub fn open(&self, runner_id: Uuid) -> WatchStream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut inner = self.lock();
        inner.next_stream += 1;
        let id = inner.next_stream;
        inner
            .streams
            .entry(runner_id)
            .or_default()
            .push(StreamSlot { id, tx });
        WatchStream {
            rx: ReceiverStream::new(rx),
            hub: self.clone(),
            runner_id,
            id,
        }
    }

    /// How many streams `runner_id` holds open.
    pub fn open_streams(&self, runner_id: Uuid) -> usize {
        self.lock().streams.get(&runner_id).map_or(0, Vec::len)
    }

    /// Sends an event to every open stream of `runner_id`.
    pub fn notify(&self, runner_id: Uuid, kind: runner_request::Kind) {
        let request = pb::RunnerRequest {
            request_id: Uuid::new_v4().to_string(),
            kind: Some(kind),
        };
        let mut inner = self.lock();
        if let Some(slots) = inner.streams.get_mut(&runner_id) {
            // A full or closed stream is dropped: its runner relists on reconnect.
            slots.retain(|slot| slot.tx.try_send(Ok(request.clone())).is_ok());
        }
    }

    /// Sends a call to the newest stream of `runner_id` and waits up to
    /// `timeout` for its answer.
    pub async fn call(
        &self,
        runner_id: Uuid,
        kind: runner_request::Kind,
        timeout: Duration,
    ) -> Result<(String, Outcome), Status> {
        let call = CallKind::of_request(&kind).ok_or_else(|| {
            Status::invalid_argument("request.kind: events cannot be sent as calls")
        })?;
        let request_id = Uuid::new_v4().to_string();
        let request = pb::RunnerRequest {
            request_id: request_id.clone(),
            kind: Some(kind),
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.lock();
            let slot = inner
                .streams
                .get(&runner_id)
                .and_then(|slots| slots.last())
                .ok_or_else(|| {
                    Status::unavailable("the runner has no open WatchRequests stream")
                })?;
            slot.tx.try_send(Ok(request)).map_err(|_| {
                Status::unavailable("the runner's stream is not accepting requests")
            })?;
            inner.pending.insert(
                request_id.clone(),
                Pending {
                    runner_id,
                    call,
                    tx,
                },
            );
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => Ok((request_id, outcome)),
            Ok(Err(_)) => Err(Status::unavailable("the call was dropped")),
            Err(_) => {
                self.lock().pending.remove(&request_id);
                Err(Status::deadline_exceeded(format!(
                    "the runner did not answer within {}",
                    humantime::format_duration(timeout)
                )))
            }
        }
    }

    /// Delivers `runner_id`'s answer to the call `request_id`.
    pub fn respond(
        &self,
        runner_id: Uuid,
        request_id: &str,
        outcome: Outcome,
    ) -> Result<(), Status> {
        let mut inner = self.lock();
        let Some(pending) = inner.pending.get(request_id) else {
            return Err(Status::not_found(
                "request_id: no call is waiting for this answer (unknown, answered or timed out)",
            ));
        };
        if pending.runner_id != runner_id {
            return Err(Status::not_found(
                "request_id: no call is waiting for this answer (unknown, answered or timed out)",
            ));
        }
        if let Outcome::Result(result) = &outcome {
            let Some(kind) = &result.kind else {
                return Err(Status::invalid_argument("result.kind: must be set"));
            };
            if CallKind::of_result(kind) != pending.call {
                return Err(Status::invalid_argument(format!(
                    "result.kind: a {:?} result does not answer a {:?} call",
                    CallKind::of_result(kind),
                    pending.call
                )));
            }
        }
        let pending = inner
            .pending
            .remove(request_id)
            .expect("the entry was found above under the same lock");
        // The caller may have given up in the meantime; nothing to do then.
        let _ = pending.tx.send(outcome);
        Ok(())
    }

    /// Ends every open stream of `runner_id` with UNAVAILABLE, as a network
    /// cut would; returns how many there were.
    pub fn close_all(&self, runner_id: Uuid) -> usize {
        let slots = self.lock().streams.remove(&runner_id).unwrap_or_default();
        for slot in &slots {
            let _ = slot.tx.try_send(Err(Status::unavailable(
                "stream closed by the control plane",
            )));
        }
        slots.len()
    }

    /// Ends every open stream of every runner, for shutdown.
    pub fn close_every(&self) {
        let runners: Vec<Uuid> = self.lock().streams.keys().copied().collect();
        for runner_id in runners {
            self.close_all(runner_id);
        }
    }

    fn close(&self, runner_id: Uuid, id: u64) {
        let mut inner = self.lock();
        if let Some(slots) = inner.streams.get_mut(&runner_id) {
            slots.retain(|slot| slot.id != id);
            if slots.is_empty() {
                inner.streams.remove(&runner_id);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("hub lock is never poisoned")
    }
}

/// One runner's open `WatchRequests` stream.
#[derive(Debug)]
pub struct WatchStream {
    rx: ReceiverStream<Result<pb::RunnerRequest, Status>>,
    hub: Hub,
    runner_id: Uuid,
    id: u64,
}

impl Stream for WatchStream {
    type Item = Result<pb::RunnerRequest, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.hub.close(self.runner_id, self.id);
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    fn changed(n: usize) -> runner_request::Kind {
        runner_request::Kind::EnvironmentChanged(pb::EnvironmentChanged {
            environment_id: format!("env-{n}"),
        })
    }

    #[tokio::test]
    async fn a_stream_that_falls_a_buffer_behind_is_closed_and_the_others_get_every_event() {
        let hub = Hub::default();
        let runner = Uuid::new_v4();
        let mut slow = hub.open(runner);
        let mut fast = hub.open(runner);
        for n in 0..=STREAM_BUFFER {
            hub.notify(runner, changed(n));
            let event = fast.next().await.expect("open").expect("an event");
            assert_eq!(event.kind, Some(changed(n)));
        }
        assert_eq!(hub.open_streams(runner), 1, "the slow stream was dropped");
        // It ends after what it had buffered: the runner reconnects and relists.
        let mut buffered = 0;
        while let Some(event) = slow.next().await {
            assert_eq!(event.expect("an event").kind, Some(changed(buffered)));
            buffered += 1;
        }
        assert_eq!(buffered, STREAM_BUFFER);
    }
}
