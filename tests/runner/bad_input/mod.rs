//! Bad input: a corpus of malformed specs, calls, events and protocol
//! messages. Each gets a clear error (the exact gRPC code and a message that
//! names the field or host at fault, never a secret) or a failed status
//! naming the problem, and the runner keeps serving everything else.
//!
//! Every case is a test of its own, so one failure hides no other. The cases
//! of a family share one world (control plane, runner, proxy), started once
//! by the first of them on a runtime that outlives every test ([`Shared`]);
//! a case that breaks the runner's connection gets a world of its own.
//!
//! The runner reaches the reference control plane through
//! [`testkit::tamper::Tamper`], which damages what the runner receives in
//! ways the reference control plane never would: specs with an unknown phase
//! or without content, environments with malformed ids, one id listed twice,
//! events with invalid ids, invalid UTF-8, deeply nested fields, a malformed
//! integration list.
//!
//! What cannot get a status says so in the runner's log instead: an
//! environment whose id is not a UUID (no status can name it), one without a
//! spec (the runner keeps the spec it last saw), an event with an invalid id
//! (events are only hints; the next list heals). A message that does not
//! decode at all (invalid UTF-8 in a string, nesting past prost's recursion
//! limit) fails as a whole: a watch stream reconnects and relists, a list is
//! retried, and nothing is torn down meanwhile.

mod calls;
mod decoding;
mod integrations;
mod specs;
mod stream;

use std::sync::OnceLock;
use std::time::Duration;

use crypto_box::aead::OsRng;
use crypto_box::aead::rand_core::RngCore as _;
use runner_proto::pb::{self, runner_request::Kind};
use tonic::Code;

use crate::http_get;

/// A world shared by the cases of one family: set up once, by whichever
/// case comes first, on a runtime of its own that lives as long as the test
/// binary, so each case can be a `#[test]` that runs on it.
pub(crate) struct Shared<W: 'static> {
    runtime: tokio::runtime::Runtime,
    world: W,
}

impl<W: Send + Sync + 'static> Shared<W> {
    /// The family's world in `cell`, set up by `setup` if it is not yet.
    pub(crate) fn get<F>(cell: &'static OnceLock<Self>, setup: impl FnOnce() -> F) -> &'static Self
    where
        F: Future<Output = W>,
    {
        cell.get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the shared world");
            let world = runtime.block_on(setup());
            Self { runtime, world }
        })
    }

    /// Runs one case against the world.
    pub(crate) fn run<T>(&'static self, case: impl AsyncFnOnce(&'static W) -> T) -> T {
        self.runtime.block_on(case(&self.world))
    }
}

/// What a case must produce.
#[derive(Debug)]
pub(crate) struct Expect {
    /// The gRPC code; `Code::Ok` for a validate_environment_class result
    /// whose problems must name the fault.
    code: Code,
    /// A part of the message that names the problem.
    needle: String,
    /// Values that must appear neither in the message nor in the logs.
    secrets: Vec<String>,
}

pub(crate) fn expect(code: Code, needle: impl Into<String>) -> Expect {
    Expect {
        code,
        needle: needle.into(),
        secrets: Vec::new(),
    }
}

impl Expect {
    pub(crate) fn hiding(mut self, secret: impl Into<String>) -> Self {
        self.secrets.push(secret.into());
        self
    }

    pub(crate) fn check(&self, name: &str, code: Code, message: &str) {
        assert_eq!(code, self.code, "{name}: {message}");
        assert!(
            message.contains(&self.needle),
            "{name}: {message:?} does not name {:?}",
            self.needle
        );
        for secret in &self.secrets {
            assert!(
                !message.contains(secret.as_str()),
                "{name}: {message:?} holds a secret"
            );
            assert!(
                !log_lines().contains(secret.as_str()),
                "{name}: a secret appears in the logs"
            );
        }
    }
}

pub(crate) fn runner_request(request_id: &str, kind: Kind) -> pb::RunnerRequest {
    pb::RunnerRequest {
        request_id: request_id.to_owned(),
        kind: Some(kind),
    }
}

pub(crate) fn changed(environment_id: &str) -> Kind {
    Kind::EnvironmentChanged(pb::EnvironmentChanged {
        environment_id: environment_id.to_owned(),
    })
}

pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Every log line of this test binary so far (see `logs::capture`).
pub(crate) fn log_lines() -> String {
    String::from_utf8_lossy(&crate::logs::capture().0.lock().expect("lock")).into_owned()
}

/// How many log lines hold every one of `parts`; scans in place, since the
/// capture holds the whole binary's logs.
pub(crate) fn log_lines_with(parts: &[&str]) -> usize {
    let captured = crate::logs::capture().0.lock().expect("lock");
    String::from_utf8_lossy(&captured)
        .lines()
        .filter(|line| parts.iter().all(|p| line.contains(p)))
        .count()
}

/// Waits until `times` log lines hold every one of `parts`.
pub(crate) async fn logged_times(what: &str, times: usize, parts: &[&str]) {
    for _ in 0..800 {
        if log_lines_with(parts) >= times {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {times} log lines say {what}: {parts:?}");
}

/// Waits until a log line holds every one of `parts`.
pub(crate) async fn logged(what: &str, parts: &[&str]) {
    logged_times(what, 1, parts).await;
}

/// The runner's count of watch-stream reconnects, from its metrics.
pub(crate) async fn reconnects(health: std::net::SocketAddr) -> u64 {
    let (_, metrics) = http_get(health, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("runner_control_plane_reconnects_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the reconnect counter")
}

/// Waits until the reconnect counter passes `before`; returns it.
pub(crate) async fn wait_reconnected(runner: &crate::Runner, before: u64) -> u64 {
    for _ in 0..800 {
        let now = reconnects(runner.health).await;
        if now > before {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the runner did not reconnect");
}
