//! Health: what `/readyz` reports, what the runner tells the control plane
//! when a dependency fails (and the facts it shows operators, such as the
//! self-update state), and the HTTP port that serves `/healthz`, `/readyz`
//! and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use runner_core::leader::Leadership;
use runner_core::traits::{Compute, StateStore};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;
use crate::telemetry::events::ReadinessProbed;

/// The runner's readiness and degradation.
#[derive(Debug)]
pub struct Health {
    leadership: Option<Arc<Leadership>>,
    session: AtomicBool,
    store: AtomicBool,
    stopping: AtomicBool,
    problems: std::sync::Mutex<std::collections::BTreeMap<&'static str, String>>,
    degraded: watch::Sender<String>,
    details: watch::Sender<std::collections::BTreeMap<String, String>>,
}

/// The longest value of a system detail the control plane accepts, in bytes.
pub const MAX_DETAIL_BYTES: usize = 256;

impl Default for Health {
    fn default() -> Self {
        Self {
            leadership: None,
            session: AtomicBool::new(false),
            store: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            problems: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            degraded: watch::channel(String::new()).0,
            details: watch::channel(std::collections::BTreeMap::new()).0,
        }
    }
}

impl Health {
    /// Readiness that also waits until `leadership` is decided (this
    /// replica leads, or the store said another one does).
    #[must_use]
    pub fn with_leadership(mut self, leadership: Arc<Leadership>) -> Self {
        self.leadership = Some(leadership);
        self
    }

    /// The control-plane session works (or not).
    pub fn set_session(&self, up: bool) {
        self.session.store(up, Ordering::SeqCst);
    }

    /// Whether the control-plane session works.
    pub fn session_up(&self) -> bool {
        self.session.load(Ordering::SeqCst)
    }

    /// Whether `part` has a problem now.
    pub fn has_problem(&self, part: &str) -> bool {
        self.problems
            .lock()
            .expect("problems lock is never poisoned")
            .contains_key(part)
    }

    /// The process is stopping (a critical task ended, or shutdown): never
    /// ready again.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Why the runner is not ready; empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if self.stopping.load(Ordering::SeqCst) {
            reasons.push("stopping");
        }
        // Not the first full sync: readiness does not grow with the fleet.
        if self.leadership.as_ref().is_some_and(|l| !l.is_decided()) {
            reasons.push("leadership not decided");
        }
        if !self.session.load(Ordering::SeqCst) {
            reasons.push("control-plane session down");
        }
        if !self.store.load(Ordering::SeqCst) {
            reasons.push("state store failing");
        }
        reasons
    }

    /// The degraded message (empty when healthy), watched by the session.
    pub fn degraded(&self) -> watch::Receiver<String> {
        self.degraded.subscribe()
    }

    /// Sets (or clears, with `None`) the problem of one part; the degraded
    /// message lists every current problem.
    pub fn set_problem(&self, part: &'static str, problem: Option<String>) {
        let message = {
            let mut problems = self
                .problems
                .lock()
                .expect("problems lock is never poisoned");
            match problem {
                Some(p) => problems.insert(part, p),
                None => problems.remove(part),
            };
            problems
                .iter()
                .map(|(part, p)| format!("{part}: {p}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        self.degraded.send_if_modified(|current| {
            if *current == message {
                return false;
            }
            if message.is_empty() {
                tracing::info!("dependencies healthy again");
            } else {
                tracing::warn!(degraded = %message, "dependencies failing");
            }
            current.clone_from(&message);
            true
        });
    }

    /// Facts for operators (`system_details` of the runner's status).
    pub fn details(&self) -> watch::Receiver<std::collections::BTreeMap<String, String>> {
        self.details.subscribe()
    }

    /// Sets one fact (on one line, cut to [`MAX_DETAIL_BYTES`]); an empty
    /// value removes it.
    pub fn set_detail(&self, key: &'static str, value: &str) {
        let value = one_line(value);
        let mut end = value.len().min(MAX_DETAIL_BYTES);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        let value = &value[..end];
        self.details.send_if_modified(|details| {
            if value.is_empty() {
                return details.remove(key).is_some();
            }
            if details.get(key).map(String::as_str) == Some(value) {
                return false;
            }
            details.insert(key.to_owned(), value.to_owned());
            true
        });
    }

    /// Checks the dependencies once and updates readiness and the degraded
    /// message.
    pub async fn check(&self, store: &dyn StateStore, compute: &dyn Compute) {
        let store_result = store.check().await;
        self.store.store(store_result.is_ok(), Ordering::SeqCst);
        self.set_problem("state store", store_result.err().map(|e| chain(&e)));
        let compute_result = compute.check().await;
        self.set_problem("compute", compute_result.err().map(|e| chain(&e)));
    }

    /// Checks every `interval` until `shutdown`.
    pub async fn monitor(
        self: Arc<Self>,
        store: Arc<dyn StateStore>,
        compute: Arc<dyn Compute>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            self.check(store.as_ref(), compute.as_ref()).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// `text` without control characters (each becomes a space): the control
/// plane refuses a status whose texts hold any.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An error and its sources, one line (shared with the adapters).
pub use runner_core::error::chain;

#[derive(Clone)]
struct HttpState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    let reasons = state.health.not_ready();
    ReadinessProbed {
        ready: reasons.is_empty(),
    }
    .emit(&state.metrics);
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join(", ")),
        )
    }
}

async fn metrics_text(
    State(state): State<HttpState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Serves the health port on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(HttpState { health, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the health port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// `runnerd health`: true when `url` answers 200 within `timeout`.
pub async fn probe(url: &str, timeout: Duration) -> Result<bool, String> {
    let uri: axum::http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are probed".into());
    }
    let host = uri.host().ok_or("the URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let request = async move {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(io)
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(connection);
        let request = axum::http::Request::get(path)
            .header("host", host.as_str())
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok::<_, String>(response.status() == StatusCode::OK)
    };
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_one_line_cut_to_the_limit_and_removed_when_empty() {
        let health = Health::default();
        let details = health.details();
        health.set_detail("update_message", &format!("a\nb{}", "é".repeat(200)));
        let value = details
            .borrow()
            .get("update_message")
            .cloned()
            .expect("set");
        assert!(value.starts_with("a b"), "{value:?}");
        assert!(value.len() <= MAX_DETAIL_BYTES && value.len() >= MAX_DETAIL_BYTES - 1);
        health.set_detail("update_message", "");
        assert!(details.borrow().get("update_message").is_none());
    }
}
