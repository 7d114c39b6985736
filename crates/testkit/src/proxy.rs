//! A fault-injecting HTTP proxy in front of emulated AWS.
//!
//! It forwards every request to the upstream and, by rules, answers some
//! instead: throttling errors, 500/503, `InsufficientInstanceCapacity` for
//! launches into chosen subnets, a delay, or a dropped connection. It counts
//! every request by operation with its time, so tests can check call rates,
//! and records every exchange when it is complete ([`Call`]: arrival, end,
//! outcome, and a label a caller-given function derives from the request),
//! which the benchmarks time. The operation is the EC2 query `Action` or the
//! JSON protocols' `X-Amz-Target`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What to do instead of forwarding.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The service's throttling error (EC2 `RequestLimitExceeded`, DynamoDB
    /// `ThrottlingException`).
    Throttle,
    /// A bare HTTP status (500, 503).
    Status(u16),
    /// `InsufficientInstanceCapacity` for RunInstances into this subnet.
    NoCapacityInSubnet(String),
    /// RunInstances into `subnet` refused with EC2 error `code` (HTTP 400),
    /// e.g. `Unsupported` for an instance type the zone does not offer.
    RefuseInSubnet {
        /// The subnet.
        subnet: String,
        /// The EC2 error code.
        code: String,
    },
    /// Forward after this delay.
    Delay(Duration),
    /// Close the connection without an answer.
    Reset,
    /// A client error the service refuses the call with (HTTP 400), e.g.
    /// `AccessDeniedException`: a definite refusal, not to be retried.
    Refuse(String),
    /// Forward the first `pass` matching requests (counted over the proxy's
    /// life), then delay each later one by `delay`: a call that hangs at a
    /// chosen point, for crashing the caller there.
    DelayAfter {
        /// Requests forwarded untouched.
        pass: usize,
        /// The delay of every later one.
        delay: Duration,
    },
}

/// A fault applied to a share of the matching requests, spread evenly and
/// without chance: at rate `r`, the k-th request a rule considers is faulted
/// when `⌊k·r⌋` grows (rate 0.25: the 4th, 8th, 12th, ...), so a run
/// replays given the same order of requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Operations it applies to (`RunInstances`, `DynamoDB_20120810.PutItem`);
    /// empty means all.
    pub operations: Vec<String>,
    /// Share of matching requests, 0.0 to 1.0.
    pub rate: f64,
    /// What happens to them.
    pub fault: Fault,
}

/// A RunInstances request as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Its `SubnetId`.
    pub subnet: String,
    /// Its `ClientToken`.
    pub client_token: String,
    /// Whether the proxy answered it with a fault.
    pub faulted: bool,
}

/// One exchange through the proxy, recorded once its answer is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// `RunInstances`, `DynamoDB_20120810.TransactWriteItems`, ...
    pub operation: String,
    /// What the proxy's labeller said of the request (see
    /// [`FaultProxy::start_labelled`]).
    pub label: Option<String>,
    /// Whether the request asks for a later page (it carries a `NextToken`
    /// query parameter).
    pub next_page: bool,
    /// The request arrived.
    pub start: Instant,
    /// The answer was complete (or the exchange failed).
    pub end: Instant,
    /// The proxy answered with a fault instead of the upstream's answer.
    pub faulted: bool,
    /// The answer was a 2xx.
    pub ok: bool,
    /// Instance records in a DescribeInstances answer (its `<instanceId>`
    /// elements); 0 for other operations.
    pub instances: usize,
    /// The instance ids a RunInstances answer names; empty for other
    /// operations.
    pub launched: Vec<String>,
}

/// What a labeller sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestSummary<'a> {
    /// The operation, as [`Call::operation`].
    pub operation: &'a str,
    /// The query parameters of a query-protocol request (EC2); empty for the
    /// JSON protocols.
    pub params: &'a HashMap<String, String>,
    /// The request body.
    pub body: &'a [u8],
}

/// Derives a label for a request, e.g. the environment it is about.
type Labeller = Arc<dyn Fn(&RequestSummary<'_>) -> Option<String> + Send + Sync>;

#[derive(Debug, Default)]
struct Shared {
    rules: Vec<Rule>,
    /// Per rule: requests it considered.
    considered: Vec<u64>,
    seen: Vec<(String, Instant, bool)>,
    launches: Vec<Launch>,
    calls: Vec<Call>,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn operation(headers: &hyper::HeaderMap, body: &[u8]) -> String {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        return target.to_owned();
    }
    form(body)
        .remove("Action")
        .unwrap_or_else(|| "unknown".to_owned())
}

fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn throttle(op: &str) -> Response<Full<Bytes>> {
    if op.contains('.') {
        let body = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate of requests exceeds the allowed throughput (injected)"}"#;
        Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .header("content-type", "application/x-amz-json-1.0")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    } else {
        ec2_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "RequestLimitExceeded",
            "Request limit exceeded (injected).",
        )
    }
}

fn ec2_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>injected</RequestID></Response>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 in front of `upstream` (an http:// URL).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        Self::start_with(upstream, None).await
    }

    /// Like [`FaultProxy::start`], and labels each recorded [`Call`] with
    /// what `label` says of its request.
    pub async fn start_labelled(
        upstream: &str,
        label: impl Fn(&RequestSummary<'_>) -> Option<String> + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        Self::start_with(upstream, Some(Arc::new(label))).await
    }

    async fn start_with(upstream: &str, labeller: Option<Labeller>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let upstream: hyper::Uri = upstream.parse().map_err(std::io::Error::other)?;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    // Small requests and answers go out at once: the
                    // recorded times are the exchange's, not Nagle's.
                    let _ = stream.set_nodelay(true);
                    let (shared, client, upstream, labeller) = (
                        shared.clone(),
                        client.clone(),
                        upstream.clone(),
                        labeller.clone(),
                    );
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |request: Request<Incoming>| {
                                let (shared, client, upstream, labeller) = (
                                    shared.clone(),
                                    client.clone(),
                                    upstream.clone(),
                                    labeller.clone(),
                                );
                                async move {
                                    handle(request, &shared, &client, &upstream, labeller.as_ref())
                                        .await
                                }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the rules.
    pub fn set_rules(&self, rules: Vec<Rule>) {
        let mut shared = self.shared.lock().expect("lock");
        shared.rules = rules;
        shared.considered.clear();
    }

    /// Requests seen for `operation` (forwarded or faulted) with their times.
    pub fn seen(&self, operation: &str) -> Vec<Instant> {
        self.shared
            .lock()
            .expect("lock")
            .seen
            .iter()
            .filter(|(op, _, _)| op == operation)
            .map(|(_, at, _)| *at)
            .collect()
    }

    /// Requests for `operation` that reached the upstream, with their times.
    pub fn forwarded(&self, operation: &str) -> Vec<Instant> {
        self.shared
            .lock()
            .expect("lock")
            .seen
            .iter()
            .filter(|(op, _, faulted)| op == operation && !faulted)
            .map(|(_, at, _)| *at)
            .collect()
    }

    /// Every RunInstances request, in order of arrival.
    pub fn launches(&self) -> Vec<Launch> {
        self.shared.lock().expect("lock").launches.clone()
    }

    /// Every exchange completed so far, in order of arrival.
    pub fn calls(&self) -> Vec<Call> {
        let mut calls = self.shared.lock().expect("lock").calls.clone();
        calls.sort_by_key(|c| c.start);
        calls
    }

    /// How many requests were answered with a fault.
    pub fn faulted(&self) -> usize {
        self.shared
            .lock()
            .expect("lock")
            .seen
            .iter()
            .filter(|(_, _, f)| *f)
            .count()
    }
}

async fn handle(
    request: Request<Incoming>,
    shared: &Mutex<Shared>,
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &hyper::Uri,
    labeller: Option<&Labeller>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let start = Instant::now();
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let op = operation(&parts.headers, &body);
    let params = if parts.headers.contains_key("x-amz-target") {
        HashMap::new()
    } else {
        form(&body)
    };
    let label = labeller.and_then(|label| {
        label(&RequestSummary {
            operation: &op,
            params: &params,
            body: &body,
        })
    });
    let fault = decide(shared, &op, &body);
    let faulted = !matches!(
        fault,
        None | Some(Fault::Delay(_) | Fault::DelayAfter { .. })
    );
    let response = respond(fault, &op, parts, body, client, upstream).await;
    let mut instances = 0;
    let mut launched = Vec::new();
    let response = match response {
        Ok(answer) if op == "DescribeInstances" || op == "RunInstances" => {
            let (parts, body) = answer.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            let text = String::from_utf8_lossy(&body);
            let ids = text
                .split("<instanceId>")
                .skip(1)
                .filter_map(|rest| rest.split("</instanceId>").next());
            if op == "RunInstances" {
                launched = ids.map(str::to_owned).collect();
            } else {
                instances = ids.count();
            }
            Ok(Response::from_parts(parts, Full::new(body)))
        }
        other => other,
    };
    shared.lock().expect("lock").calls.push(Call {
        operation: op,
        label,
        next_page: params.contains_key("NextToken"),
        start,
        end: Instant::now(),
        faulted,
        ok: response.as_ref().is_ok_and(|r| r.status().is_success()),
        instances,
        launched,
    });
    response
}

/// Which fault, if any, answers this request; records its arrival.
fn decide(shared: &Mutex<Shared>, op: &str, body: &[u8]) -> Option<Fault> {
    let mut guard = shared.lock().expect("lock");
    let shared = &mut *guard;
    shared.considered.resize(shared.rules.len(), 0);
    let mut fault = None;
    for (r, considered) in shared.rules.iter().zip(shared.considered.iter_mut()) {
        if !(r.operations.is_empty() || r.operations.iter().any(|o| o == op)) {
            continue;
        }
        let mut every_nth = || {
            *considered += 1;
            let rate = r.rate.clamp(0.0, 1.0);
            let k = *considered as f64;
            (k * rate).floor() > ((k - 1.0) * rate).floor()
        };
        let hit = match &r.fault {
            Fault::DelayAfter { pass, .. } => {
                let before = shared
                    .seen
                    .iter()
                    .filter(|(o, _, _)| r.operations.is_empty() || r.operations.contains(o))
                    .count();
                before >= *pass
            }
            Fault::NoCapacityInSubnet(subnet) | Fault::RefuseInSubnet { subnet, .. } => {
                form(body).get("SubnetId") == Some(subnet) && every_nth()
            }
            _ => every_nth(),
        };
        if hit {
            fault = Some(r.fault.clone());
            break;
        }
    }
    let faulted = !matches!(
        fault,
        None | Some(Fault::Delay(_) | Fault::DelayAfter { .. })
    );
    shared.seen.push((op.to_owned(), Instant::now(), faulted));
    if op == "RunInstances" {
        let mut params = form(body);
        shared.launches.push(Launch {
            subnet: params.remove("SubnetId").unwrap_or_default(),
            client_token: params.remove("ClientToken").unwrap_or_default(),
            faulted,
        });
    }
    fault
}

/// The fault's answer, or the upstream's (after the fault's delay, if any).
async fn respond(
    fault: Option<Fault>,
    op: &str,
    mut parts: hyper::http::request::Parts,
    body: Bytes,
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &hyper::Uri,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    match fault {
        Some(Fault::Throttle) => return Ok(throttle(op)),
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(if op.contains('.') {
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .expect("a valid response")
            } else {
                ec2_error(
                    status,
                    "InternalError",
                    "An internal error has occurred (injected).",
                )
            });
        }
        Some(Fault::Refuse(code)) => {
            return Ok(if op.contains('.') {
                let body = serde_json::json!({
                    "__type": code,
                    "message": "refused (injected)",
                })
                .to_string();
                Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .header("content-type", "application/x-amz-json-1.1")
                    .body(Full::new(Bytes::from(body)))
                    .expect("a valid response")
            } else {
                ec2_error(StatusCode::BAD_REQUEST, &code, "refused (injected)")
            });
        }
        Some(Fault::NoCapacityInSubnet(_)) => {
            return Ok(ec2_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InsufficientInstanceCapacity",
                "We currently do not have sufficient capacity in the Availability Zone you requested (injected).",
            ));
        }
        Some(Fault::RefuseInSubnet { code, .. }) => {
            return Ok(ec2_error(
                StatusCode::BAD_REQUEST,
                &code,
                "refused in this subnet (injected)",
            ));
        }
        Some(Fault::Reset) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset",
            ));
        }
        Some(Fault::Delay(delay) | Fault::DelayAfter { delay, .. }) => {
            tokio::time::sleep(delay).await;
        }
        None => {}
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = format!("{}{}", upstream.to_string().trim_end_matches('/'), path)
        .parse()
        .map_err(std::io::Error::other)?;
    parts.headers.remove(hyper::header::HOST);
    let response = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
