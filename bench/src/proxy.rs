//! A recording HTTP proxy in front of moto.
//!
//! Like `testkit::proxy::FaultProxy` it names each request by its EC2 query
//! `Action` or its `X-Amz-Target`, but it injects nothing and records more:
//! the environment a request is about (from the runner's tags, filters,
//! DynamoDB keys or secret names), when the request arrived, and when its
//! response was complete. The benchmarks need the latter two, which the
//! test proxy does not keep.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use runner_aws::ec2::TAG_ENVIRONMENT;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// One proxied request.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// `RunInstances`, `DynamoDB_20120810.TransactWriteItems`, ...
    pub(crate) op: String,
    /// The environment it is about, when the request names one.
    pub(crate) env: Option<Uuid>,
    /// Whether it is the first page of a describe of all the runner's instances.
    pub(crate) full_describe: bool,
    /// The request arrived.
    pub(crate) start: Instant,
    /// The response was complete.
    pub(crate) end: Instant,
    /// The upstream answered 2xx.
    pub(crate) ok: bool,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub(crate) struct Recorder {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    task: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    /// Starts one on 127.0.0.1 in front of `upstream` (an http:// URL).
    pub(crate) async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let upstream: hyper::Uri = upstream.parse()?;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let task = tokio::spawn({
            let calls = calls.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (calls, client, upstream) =
                        (calls.clone(), client.clone(), upstream.clone());
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |request: Request<Incoming>| {
                                let (calls, client, upstream) =
                                    (calls.clone(), client.clone(), upstream.clone());
                                async move { forward(request, &calls, &client, &upstream).await }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Ok(Self { addr, calls, task })
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every call recorded so far, in arrival order.
    pub(crate) fn calls(&self) -> Vec<Call> {
        let mut calls = self.lock().clone();
        calls.sort_by_key(|c| c.start);
        calls
    }

    /// Successful calls of `op` so far.
    pub(crate) fn count_ok(&self, op: &str) -> usize {
        self.lock().iter().filter(|c| c.ok && c.op == op).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn operation(headers: &hyper::HeaderMap, form: &HashMap<String, String>) -> String {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        return target.to_owned();
    }
    form.get("Action")
        .cloned()
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The environment a request is about: a tag or filter on the runner's
/// environment tag (EC2), an `ENV#<id>` key (DynamoDB) or an
/// `environments/<id>` secret name (Secrets Manager).
fn environment(form: &HashMap<String, String>, body: &[u8]) -> Option<Uuid> {
    let filter = format!("tag:{TAG_ENVIRONMENT}");
    for (key, value) in form {
        let value_key = if value == TAG_ENVIRONMENT && key.ends_with(".Key") {
            format!("{}.Value", key.trim_end_matches(".Key"))
        } else if *value == filter && key.ends_with(".Name") {
            format!("{}.Value.1", key.trim_end_matches(".Name"))
        } else {
            continue;
        };
        if let Some(id) = form.get(&value_key).and_then(|v| v.parse().ok()) {
            return Some(id);
        }
    }
    let text = std::str::from_utf8(body).ok()?;
    ["ENV#", "environments/"].iter().find_map(|marker| {
        let at = text.find(marker)? + marker.len();
        text.get(at..at + 36)?.parse().ok()
    })
}

async fn forward(
    request: Request<Incoming>,
    calls: &Mutex<Vec<Call>>,
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &hyper::Uri,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let start = Instant::now();
    let (mut parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let form: HashMap<String, String> = if parts.headers.contains_key("x-amz-target") {
        HashMap::new()
    } else {
        form_urlencoded::parse(&body).into_owned().collect()
    };
    let op = operation(&parts.headers, &form);
    let env = environment(&form, &body);
    let full_describe =
        op == "DescribeInstances" && env.is_none() && !form.contains_key("NextToken");
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = format!("{}{}", upstream.to_string().trim_end_matches('/'), path)
        .parse()
        .map_err(std::io::Error::other)?;
    parts.headers.remove(hyper::header::HOST);
    let result = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await;
    let response = match result {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            body.collect()
                .await
                .map(|b| Response::from_parts(parts, Full::new(b.to_bytes())))
                .map_err(std::io::Error::other)
        }
        Err(err) => Err(std::io::Error::other(err)),
    };
    let ok = response.as_ref().is_ok_and(|r| r.status().is_success());
    calls
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Call {
            op,
            env,
            full_describe,
            start,
            end: Instant::now(),
            ok,
        });
    response
}
