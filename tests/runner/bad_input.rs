//! Bad input: a corpus of malformed specs, calls, events and protocol
//! messages. Each gets a clear error (the exact gRPC code and a message that
//! names the field or host at fault, never a secret) or a failed status
//! naming the problem, and the runner keeps serving everything else.
//!
//! The runner reaches the reference control plane through [`Tamper`], a
//! byte-level gRPC proxy that damages what the runner receives in ways the
//! reference control plane never would: specs with an unknown phase or
//! without content, environments with malformed ids, one id listed twice,
//! events with invalid ids, invalid UTF-8 and deeply nested fields.
//!
//! What cannot get a status says so in the runner's log instead: an
//! environment whose id is not a UUID (no status can name it), one without a
//! spec (the runner keeps the spec it last saw), an event with an invalid id
//! (events are only hints; the next list heals). A message that does not
//! decode at all (invalid UTF-8 in a string, nesting past prost's recursion
//! limit) fails as a whole: a watch stream reconnects and relists, a list is
//! retried, and nothing is torn down meanwhile.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crypto_box::aead::OsRng;
use crypto_box::aead::rand_core::RngCore as _;
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _};
use runner_core::scm::{AuthSource, ScmKind};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase, runner_request::Kind, runner_result};
use testkit::scm::FakeScm;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;
use tonic::transport::Channel;

use crate::calls::call;
use crate::scm::{Integration, add_pat, create_integration, public_key, world_with};
use crate::{World, http_get, id, settled};

// ---------------------------------------------------------------- the proxy

const WATCH: &str = "/runner.v1.RunnerService/WatchRequests";
const LIST: &str = "/runner.v1.RunnerService/ListEnvironments";
const GET: &str = "/runner.v1.RunnerService/GetEnvironment";

/// Passes gRPC messages through as bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// How an environment's description is damaged on its way to the runner.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// `spec.desired_phase` set to this raw value.
    DesiredPhase(i32),
    /// `spec.content` left out.
    NoContent,
    /// `metadata` left out.
    NoMetadata,
    /// `spec` left out.
    NoSpec,
    /// `spec.content.repository_url` replaced (with what the reference
    /// control plane refuses even unchecked: control characters).
    RepositoryUrl(&'static str),
}

impl Damage {
    fn apply(self, env: &mut pb::RunnerEnvironment) {
        let spec = env.spec.as_mut().expect("the control plane sends a spec");
        match self {
            Self::DesiredPhase(value) => spec.desired_phase = value,
            Self::NoContent => spec.content = None,
            Self::NoMetadata => env.metadata = None,
            Self::NoSpec => env.spec = None,
            Self::RepositoryUrl(url) => {
                if let Some(content) = spec.content.as_mut() {
                    content.repository_url = url.into();
                }
            }
        }
    }
}

#[derive(Debug)]
struct TamperState {
    /// Raw `RunnerRequest`s pushed into every open watch stream.
    inject: broadcast::Sender<Vec<u8>>,
    damaged: Mutex<HashMap<String, Damage>>,
    /// Listed twice: first as an older copy that asks for deletion.
    duplicated: Mutex<HashSet<String>>,
    /// Raw `RunnerEnvironment`s appended to every list page.
    extra: Mutex<Vec<Vec<u8>>>,
    /// Pages served with `extra`.
    pages_with_extra: AtomicUsize,
}

/// The byte-level proxy; see the module comment.
#[derive(Debug, Clone)]
struct Tamper {
    upstream: Channel,
    state: Arc<TamperState>,
}

impl Tamper {
    /// Serves on a free loopback port, forwarding to `upstream_url`.
    async fn start(upstream_url: &str) -> (Self, String) {
        let upstream = tonic::transport::Endpoint::from_shared(upstream_url.to_owned())
            .expect("url")
            .connect_lazy();
        let tamper = Self {
            upstream,
            state: Arc::new(TamperState {
                inject: broadcast::channel(64).0,
                damaged: Mutex::default(),
                duplicated: Mutex::default(),
                extra: Mutex::default(),
                pages_with_extra: AtomicUsize::new(0),
            }),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let router = tonic::transport::Server::builder()
            .add_service(Proxy::<false>(tamper.clone()))
            .add_service(Proxy::<true>(tamper.clone()));
        tokio::spawn(async move {
            router
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("the proxy serves");
        });
        (tamper, url)
    }

    fn inject(&self, request: Vec<u8>) {
        let _ = self.state.inject.send(request);
    }

    fn damage(&self, id: &str, damage: Damage) {
        self.state
            .damaged
            .lock()
            .expect("lock")
            .insert(id.to_owned(), damage);
    }

    fn outgoing(request: tonic::Request<Vec<u8>>) -> tonic::Request<Vec<u8>> {
        let auth = request.metadata().get("authorization").cloned();
        let mut out = tonic::Request::new(request.into_inner());
        if let Some(auth) = auth {
            out.metadata_mut().insert("authorization", auth);
        }
        out
    }

    async fn client(&self) -> Result<tonic::client::Grpc<Channel>, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.upstream.clone());
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("upstream not ready: {e}")))?;
        Ok(grpc)
    }

    async fn unary(
        self,
        path: String,
        request: tonic::Request<Vec<u8>>,
    ) -> Result<tonic::Response<Vec<u8>>, tonic::Status> {
        let upstream_path = http::uri::PathAndQuery::try_from(path.as_str())
            .map_err(|_| tonic::Status::unimplemented("bad path"))?;
        let body = self
            .client()
            .await?
            .unary(Self::outgoing(request), upstream_path, Raw)
            .await?
            .into_inner();
        Ok(tonic::Response::new(self.rewrite(&path, body)?))
    }

    fn rewrite(&self, path: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
        let decode_error = |e: prost::DecodeError| tonic::Status::internal(e.to_string());
        match path {
            LIST => {
                let mut page =
                    pb::ListEnvironmentsResponse::decode(body.as_slice()).map_err(decode_error)?;
                let duplicated = self.state.duplicated.lock().expect("lock").clone();
                let mut environments = Vec::new();
                for mut env in std::mem::take(&mut page.environments) {
                    if duplicated.contains(&env.id) {
                        let mut older = env.clone();
                        let spec = older.spec.as_mut().expect("spec");
                        spec.spec_version -= 1;
                        spec.desired_phase = Phase::Deleted as i32;
                        environments.push(older);
                    }
                    self.damage_env(&mut env);
                    environments.push(env);
                }
                page.environments = environments;
                let mut bytes = page.encode_to_vec();
                let extra = self.state.extra.lock().expect("lock").clone();
                if !extra.is_empty() {
                    self.state.pages_with_extra.fetch_add(1, Ordering::SeqCst);
                }
                for raw in extra {
                    // Field 1 (environments), length-delimited.
                    prost::encoding::encode_key(
                        1,
                        prost::encoding::WireType::LengthDelimited,
                        &mut bytes,
                    );
                    prost::encoding::encode_varint(raw.len() as u64, &mut bytes);
                    bytes.extend_from_slice(&raw);
                }
                Ok(bytes)
            }
            GET => {
                let mut response =
                    pb::GetEnvironmentResponse::decode(body.as_slice()).map_err(decode_error)?;
                if let Some(env) = response.environment.as_mut() {
                    self.damage_env(env);
                }
                Ok(response.encode_to_vec())
            }
            _ => Ok(body),
        }
    }

    fn damage_env(&self, env: &mut pb::RunnerEnvironment) {
        let damage = self
            .state
            .damaged
            .lock()
            .expect("lock")
            .get(&env.id)
            .copied();
        if let Some(damage) = damage {
            damage.apply(env);
        }
    }

    async fn watch(
        self,
        request: tonic::Request<Vec<u8>>,
    ) -> Result<tonic::Response<ReceiverStream<Result<Vec<u8>, tonic::Status>>>, tonic::Status>
    {
        let mut injected = self.state.inject.subscribe();
        let mut upstream = self
            .client()
            .await?
            .server_streaming(
                Self::outgoing(request),
                http::uri::PathAndQuery::from_static(WATCH),
                Raw,
            )
            .await?
            .into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    message = upstream.message() => match message {
                        Ok(Some(bytes)) => Ok(bytes),
                        Ok(None) => return,
                        Err(status) => Err(status),
                    },
                    injected = injected.recv() => match injected {
                        Ok(bytes) => Ok(bytes),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// The proxy as one gRPC service: the runner service, or the identity one.
#[derive(Debug, Clone)]
struct Proxy<const RUNNER: bool>(Tamper);

impl NamedService for Proxy<true> {
    const NAME: &'static str = "runner.v1.RunnerService";
}

impl NamedService for Proxy<false> {
    const NAME: &'static str = "runner.v1.IdentityService";
}

struct Unary(Tamper, String);

impl tonic::server::UnaryService<Vec<u8>> for Unary {
    type Response = Vec<u8>;
    type Future = BoxFuture<tonic::Response<Vec<u8>>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
        Box::pin(self.0.clone().unary(self.1.clone(), request))
    }
}

struct Watch(Tamper);

impl tonic::server::ServerStreamingService<Vec<u8>> for Watch {
    type Response = Vec<u8>;
    type ResponseStream = ReceiverStream<Result<Vec<u8>, tonic::Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
        Box::pin(self.0.clone().watch(request))
    }
}

impl<const RUNNER: bool, B> Service<http::Request<B>> for Proxy<RUNNER>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let tamper = self.0.clone();
        let path = request.uri().path().to_owned();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Raw);
            Ok(if path == WATCH {
                grpc.server_streaming(Watch(tamper), request).await
            } else {
                grpc.unary(Unary(tamper, path), request).await
            })
        })
    }
}

// ---------------------------------------------------------------- raw bytes

/// `message` encoded, with the bytes of `placeholder` (which must appear
/// once, inside a string field) replaced by as many invalid UTF-8 bytes.
fn with_invalid_utf8(message: &impl prost::Message, placeholder: &str) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    let at = bytes
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_bytes())
        .expect("the placeholder is encoded as is");
    for (i, byte) in bytes[at..at + placeholder.len()].iter_mut().enumerate() {
        *byte = if i % 2 == 0 { 0xff } else { 0xfe };
    }
    bytes
}

/// `message` encoded, followed by an unknown field 999 of `depth` groups
/// nested in one another.
fn with_nested_groups(message: &impl prost::Message, depth: usize) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    for _ in 0..depth {
        prost::encoding::encode_key(999, prost::encoding::WireType::StartGroup, &mut bytes);
    }
    for _ in 0..depth {
        prost::encoding::encode_key(999, prost::encoding::WireType::EndGroup, &mut bytes);
    }
    bytes
}

fn runner_request(request_id: &str, kind: Kind) -> pb::RunnerRequest {
    pb::RunnerRequest {
        request_id: request_id.to_owned(),
        kind: Some(kind),
    }
}

fn changed(environment_id: &str) -> Kind {
    Kind::EnvironmentChanged(pb::EnvironmentChanged {
        environment_id: environment_id.to_owned(),
    })
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Calls `/admin.v1.AdminService/CallRunner` with a body of raw bytes.
async fn raw_call_runner(world: &World, body: Vec<u8>) -> tonic::Status {
    let channel = world
        .cp
        .as_ref()
        .expect("running")
        .channel()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    match grpc
        .unary(
            tonic::Request::new(body),
            http::uri::PathAndQuery::from_static("/admin.v1.AdminService/CallRunner"),
            Raw,
        )
        .await
    {
        Ok(_) => panic!("the control plane accepted a body it cannot decode"),
        Err(status) => status,
    }
}

// ---------------------------------------------------------------- the corpus

/// What a case must produce.
#[derive(Debug)]
struct Expect {
    /// The gRPC code; `Code::Ok` for a validate_environment_class result
    /// whose problems must name the fault.
    code: Code,
    /// A part of the message that names the problem.
    needle: String,
    /// Values the message must not contain.
    secrets: Vec<String>,
}

fn expect(code: Code, needle: impl Into<String>) -> Expect {
    Expect {
        code,
        needle: needle.into(),
        secrets: Vec::new(),
    }
}

impl Expect {
    fn hiding(mut self, secret: impl Into<String>) -> Self {
        self.secrets.push(secret.into());
        self
    }

    fn check(&self, name: &str, code: Code, message: &str) {
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
        }
    }
}

/// Runs one call case through the admin CallRunner API.
async fn check_call(world: &World, name: &str, kind: Kind, expected: &Expect) {
    match call(world, kind).await {
        admin::call_runner_response::Outcome::Error(e) => {
            expected.check(name, Code::from(e.code), &e.message);
        }
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::ValidateEnvironmentClass(v)),
        }) => expected.check(name, Code::Ok, &v.problems.join("; ")),
        other => panic!("{name}: unexpected {other:?}"),
    }
}

fn class(display_name: &str, instance_type: &str, disk_gib: u32) -> Kind {
    Kind::ValidateEnvironmentClass(pb::ValidateEnvironmentClass {
        environment_class: Some(pb::EnvironmentClass {
            id: uuid::Uuid::new_v4().to_string(),
            display_name: display_name.into(),
            instance_type: instance_type.into(),
            disk_gib,
            enabled: true,
        }),
    })
}

fn parse(principal: &str, url: &str) -> Kind {
    Kind::ParseContext(pb::ParseContext {
        principal: principal.into(),
        url: url.into(),
    })
}

fn store(host: &str, sealed_token: Vec<u8>) -> Kind {
    Kind::StoreHostToken(pb::StoreHostToken {
        principal: "alice".into(),
        host: host.into(),
        sealed_token,
    })
}

fn exchange(host: &str, code: &str) -> Kind {
    Kind::ExchangeOauthCode(pb::ExchangeOauthCode {
        principal: "alice".into(),
        host: host.into(),
        code: code.into(),
        redirect_uri: "https://cp.example.com/oauth/callback".into(),
        code_verifier: String::new(),
    })
}

/// An environment created for a case, and the failure its status must name.
struct EnvCase {
    name: &'static str,
    id: String,
    failure: String,
    /// Whether the runner refuses the spec itself (`runner_ack.code =
    /// INVALID_SPEC`), rather than failing to place a valid one.
    invalid_spec: bool,
}

/// Every log line of this test binary so far (see `logs::capture`).
fn log_lines() -> String {
    String::from_utf8_lossy(&crate::logs::capture().0.lock().expect("lock")).into_owned()
}

/// Whether one log line holds every one of `parts`; scans in place, since
/// the capture holds the whole binary's logs.
fn any_log_line(parts: &[&str]) -> bool {
    let captured = crate::logs::capture().0.lock().expect("lock");
    String::from_utf8_lossy(&captured)
        .lines()
        .any(|line| parts.iter().all(|p| line.contains(p)))
}

/// Waits until a log line holds every one of `parts`.
async fn logged(what: &str, parts: &[&str]) {
    for _ in 0..200 {
        if any_log_line(parts) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no log line says {what}: {parts:?}");
}

/// The runner's count of watch-stream reconnects, from its metrics.
async fn reconnects(health: std::net::SocketAddr) -> u64 {
    let (_, metrics) = http_get(health, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("runner_control_plane_reconnects_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the reconnect counter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_a_clear_error_and_the_runner_keeps_serving() {
    crate::logs::capture();
    let mut cases = 0usize;
    let fake = FakeScm::start().await;
    let mut world = world_with(&fake).await;
    let (tamper, proxy_url) = Tamper::start(&world.url).await;
    world.url = proxy_url;
    let mut admin = world.admin.clone();

    // ------------------------------------------------ environment specs
    let new_class = |name: &str, instance_type: &str| admin::CreateEnvironmentClassRequest {
        runner_id: world.runner_id.clone(),
        display_name: name.into(),
        instance_type: instance_type.into(),
        disk_gib: 30,
    };
    let retired = admin
        .create_environment_class(new_class("Retired", "m5.large"))
        .await
        .expect("class")
        .into_inner()
        .id;
    admin
        .set_environment_class_enabled(admin::SetEnvironmentClassEnabledRequest {
            environment_class_id: retired.clone(),
            enabled: false,
        })
        .await
        .expect("disable");
    // Offered by no zone of the runner's subnets: the zone mismatch.
    let far = admin
        .create_environment_class(new_class("Far", "unoffered.large"))
        .await
        .expect("class")
        .into_inner()
        .id;
    let unknown_class = uuid::Uuid::new_v4().to_string();

    let mut env_cases: Vec<EnvCase> = Vec::new();
    type Edit = Box<dyn Fn(&mut admin::CreateEnvironmentRequest)>;
    let url = |u: &'static str| -> Edit {
        Box::new(move |r| r.content.as_mut().expect("content").repository_url = u.into())
    };
    let branch = |b: String| -> Edit {
        Box::new(move |r| {
            r.content.as_mut().expect("content").revision =
                Some(pb::environment_content::Revision::Branch(b.clone()));
        })
    };
    let commit = |c: String| -> Edit {
        Box::new(move |r| {
            r.content.as_mut().expect("content").revision =
                Some(pb::environment_content::Revision::Commit(c.clone()));
        })
    };
    let class_id = |c: String| -> Edit { Box::new(move |r| r.environment_class_id = c.clone()) };
    let scheme = |s: &str| format!("spec.content.repository_url: scheme \"{s}\" is not supported");
    let table: Vec<(&'static str, Edit, String, bool)> = vec![
        (
            "unknown class",
            class_id(unknown_class.clone()),
            format!("environment class {unknown_class} does not exist"),
            true,
        ),
        (
            "class id not a UUID",
            class_id("small".into()),
            "spec.environment_class_id: is not a UUID".into(),
            true,
        ),
        (
            "empty class id",
            class_id(String::new()),
            "spec.environment_class_id: must not be empty".into(),
            true,
        ),
        (
            "disabled class",
            class_id(retired.clone()),
            format!("environment class {retired} (Retired) is disabled"),
            true,
        ),
        (
            "instance type no zone offers",
            class_id(far.clone()),
            "instance type unoffered.large is not offered in any of the runner's availability zones (eu-west-1a, eu-west-1b, eu-west-1c)".into(),
            false,
        ),
        ("ftp URL", url("ftp://example.com/repo"), scheme("ftp"), true),
        ("http URL", url("http://github.com/acme/api"), scheme("http"), true),
        (
            "URL with credentials",
            url("https://x-access-token:ghp_CredInUrl1@github.com/acme/api"),
            "spec.content.repository_url: must not contain credentials".into(),
            true,
        ),
        (
            "URL with a query",
            url("https://github.com/acme/api?access_token=qs_Secret42"),
            "spec.content.repository_url: must not have a query or fragment".into(),
            true,
        ),
        (
            "URL with a fragment",
            url("https://github.com/acme/api#readme"),
            "spec.content.repository_url: must not have a query or fragment".into(),
            true,
        ),
        (
            "URL without a path",
            url("https://github.com/"),
            "spec.content.repository_url: has no repository path".into(),
            true,
        ),
        (
            "scp-like URL",
            url("git@github.com:acme/api.git"),
            "spec.content.repository_url: is not a valid URL".into(),
            true,
        ),
        (
            "empty URL",
            url(""),
            "spec.content.repository_url: must not be empty".into(),
            true,
        ),
        (
            "URL with an invalid host",
            url("https://-bad-.example/acme/api"),
            "spec.content.repository_url: \"-bad-.example\" is not a lowercase host name".into(),
            true,
        ),
        (
            "branch with ..",
            branch("a..b".into()),
            "spec.content.branch: \"a..b\" is not a valid git branch name".into(),
            true,
        ),
        (
            "branch with a control character",
            branch("main\u{7}".into()),
            "spec.content.branch: must not contain control characters".into(),
            true,
        ),
        (
            "branch with a space",
            branch("my branch".into()),
            "spec.content.branch: \"my branch\" is not a valid git branch name".into(),
            true,
        ),
        (
            "empty branch",
            branch(String::new()),
            "spec.content.branch: must not be empty".into(),
            true,
        ),
        (
            "branch like an option",
            branch("--upload-pack=x".into()),
            "spec.content.branch: \"--upload-pack=x\" is not a valid git branch name".into(),
            true,
        ),
        (
            "300-byte branch",
            branch("b".repeat(300)),
            "spec.content.branch: is 300 bytes long, the limit is 255".into(),
            true,
        ),
        (
            "short commit",
            commit("abc123".into()),
            "spec.content.commit: is not a full commit id".into(),
            true,
        ),
        (
            "commit not hexadecimal",
            commit("g".repeat(40)),
            "spec.content.commit: is not a full commit id".into(),
            true,
        ),
    ];
    for (name, edit, failure, invalid_spec) in table {
        let mut request = world.create_request(&world.class_id);
        request.unchecked = true;
        edit(&mut request);
        env_cases.push(EnvCase {
            name,
            id: world.create(request).await,
            failure,
            invalid_spec,
        });
    }
    // Damaged on the wire, where the reference control plane cannot.
    for (name, damage, failure) in [
        (
            "unknown desired phase",
            Damage::DesiredPhase(99),
            "spec.desired_phase: must be RUNNING, STOPPED or DELETED",
        ),
        (
            "desired phase that is not a desired phase",
            Damage::DesiredPhase(Phase::Creating as i32),
            "spec.desired_phase: must be RUNNING, STOPPED or DELETED",
        ),
        (
            "no content",
            Damage::NoContent,
            "spec.content.repository_url: must not be empty",
        ),
        (
            "no metadata",
            Damage::NoMetadata,
            "metadata.creator: must not be empty",
        ),
        (
            "URL with a tab",
            Damage::RepositoryUrl("https://github.com/acme/api\t.git"),
            "spec.content.repository_url: must not contain control characters",
        ),
        (
            "URL with a newline",
            Damage::RepositoryUrl("https://github.com/acme/api\nHost: evil.example"),
            "spec.content.repository_url: must not contain control characters",
        ),
    ] {
        let id = world.create_env().await;
        tamper.damage(&id, damage);
        env_cases.push(EnvCase {
            name,
            id,
            failure: failure.into(),
            invalid_spec: true,
        });
    }
    let no_spec = world.create_env().await;
    tamper.damage(&no_spec, Damage::NoSpec);
    // Malformed ids in a list: no status can name them.
    let bad_ids = [
        "not-a-uuid".to_owned(),
        String::new(),
        "8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a6".to_owned(),
        "x".repeat(10_000),
    ];
    *tamper.state.extra.lock().expect("lock") = bad_ids
        .iter()
        .map(|id| {
            pb::RunnerEnvironment {
                id: id.clone(),
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    // The same id twice in a page, the older copy (deletion) first.
    let mut good = vec![world.create_env().await, world.create_env().await];
    tamper
        .state
        .duplicated
        .lock()
        .expect("lock")
        .insert(good[0].clone());

    let runner = world.start_runner().await;

    // ------------------------------------------------ validate_environment_class
    let class_cases: Vec<(&str, Kind, Expect)> = vec![
        (
            "zero disk",
            class("Zero", "m7i.large", 0),
            expect(Code::Ok, "disk_gib: 0 GiB is outside 8 to 16384 GiB"),
        ),
        (
            "negative disk (-1 on the wire)",
            class("Negative", "m7i.large", u32::MAX),
            expect(
                Code::Ok,
                "disk_gib: 4294967295 GiB is outside 8 to 16384 GiB",
            ),
        ),
        (
            "huge disk",
            class("Huge", "m7i.large", 16_385),
            expect(Code::Ok, "disk_gib: 16385 GiB is outside 8 to 16384 GiB"),
        ),
        (
            "instance type in capitals",
            class("Caps", "M7I.LARGE", 50),
            expect(
                Code::Ok,
                "instance_type: \"M7I.LARGE\" is not an EC2 instance type",
            ),
        ),
        (
            "empty instance type",
            class("Empty", "", 50),
            expect(Code::Ok, "instance_type: must not be empty"),
        ),
        (
            "instance type no zone offers",
            class("Far", "unoffered.large", 50),
            expect(
                Code::Ok,
                "instance_type: unoffered.large is not offered in any of the runner's availability zones (eu-west-1a, eu-west-1b, eu-west-1c)",
            ),
        ),
        (
            "display name with a control character",
            class("Small\u{0}", "m7i.large", 50),
            expect(
                Code::Ok,
                "display_name: must not contain control characters",
            ),
        ),
        (
            "200-byte display name",
            class(&"d".repeat(200), "m7i.large", 50),
            expect(
                Code::Ok,
                "display_name: is 200 bytes long, the limit is 128",
            ),
        ),
        (
            "no class",
            Kind::ValidateEnvironmentClass(pb::ValidateEnvironmentClass {
                environment_class: None,
            }),
            expect(Code::InvalidArgument, "environment_class: must be set"),
        ),
    ];

    // ------------------------------------------------ parse_context
    let deep_gitlab = format!("https://gitlab.com/{}api", "g/".repeat(1000));
    let deep_github = format!("https://github.com/acme/api/{}", "x/".repeat(1000));
    let deep_branch = format!(
        "https://github.com/acme/api/tree/{}",
        "b/".repeat(1000).trim_end_matches('/')
    );
    let long_url = format!("https://github.com/acme/{}", "a".repeat(3000));
    let big_principal = "p".repeat(900 * 1024);
    let parse_cases: Vec<(&str, Kind, Expect)> = vec![
        (
            "host without an integration",
            parse("alice", "https://git.unknown.example/acme/api"),
            expect(
                Code::InvalidArgument,
                "url: unknown SCM host git.unknown.example",
            ),
        ),
        (
            "unknown GitHub form",
            parse(
                "alice",
                "https://github.com/acme/api/wiki/Home?token=ghq_Query77",
            ),
            expect(
                Code::InvalidArgument,
                "url: unknown GitHub URL form \"/acme/api/wiki/Home\"",
            )
            .hiding("ghq_Query77"),
        ),
        (
            "percent-encoding that is not UTF-8",
            parse("alice", "https://github.com/acme/%FF%FE"),
            expect(
                Code::InvalidArgument,
                "is not valid UTF-8 once percent-decoded",
            ),
        ),
        (
            "encoded slash in a name",
            parse("alice", "https://github.com/ac%2Fme/api"),
            expect(Code::InvalidArgument, "has an encoded slash in \"ac/me\""),
        ),
        (
            "1000-segment GitHub path",
            parse("alice", &deep_github),
            expect(Code::InvalidArgument, "url: unknown GitHub URL form"),
        ),
        (
            "GitLab group 1000 levels deep",
            parse("alice", &deep_gitlab),
            expect(
                Code::InvalidArgument,
                "nests 1000 groups; GitLab allows a group and at most 20 subgroups",
            ),
        ),
        (
            "branch of 1000 segments",
            parse("alice", &deep_branch),
            expect(
                Code::InvalidArgument,
                "names a branch git cannot check out: branch: is 1999 bytes long, the limit is 255",
            ),
        ),
        (
            "branch git cannot check out",
            parse("alice", "https://github.com/acme/api/tree/a..b"),
            expect(
                Code::InvalidArgument,
                "names a branch git cannot check out: branch: \"a..b\" is not a valid git branch name",
            ),
        ),
        (
            "commit that is not hexadecimal",
            parse("alice", "https://github.com/acme/api/commit/xyz"),
            expect(Code::InvalidArgument, "\"xyz\" is not a full commit id"),
        ),
        (
            "pull request number that overflows",
            parse(
                "alice",
                "https://github.com/acme/api/pull/99999999999999999999999",
            ),
            expect(Code::InvalidArgument, "is not a valid pull request number"),
        ),
        (
            "Azure DevOps version naming neither branch nor commit",
            parse(
                "alice",
                "https://dev.azure.com/acme/web/_git/ui?version=GXmain",
            ),
            expect(
                Code::InvalidArgument,
                "names neither a branch (GB…) nor a commit (GC…)",
            ),
        ),
        (
            "URL with credentials",
            parse("alice", "https://bob:ghp_UrlSecret9@github.com/acme/api"),
            expect(
                Code::InvalidArgument,
                "url: the URL must not contain credentials",
            )
            .hiding("ghp_UrlSecret9"),
        ),
        (
            "not a URL",
            parse("alice", "acme/api"),
            expect(Code::InvalidArgument, "url: not a valid URL"),
        ),
        (
            "empty URL",
            parse("alice", ""),
            expect(Code::InvalidArgument, "url: must not be empty"),
        ),
        (
            "3000-byte URL",
            parse("alice", &long_url),
            expect(
                Code::InvalidArgument,
                "url: is 3024 bytes long, the limit is 2048",
            ),
        ),
        (
            "empty principal",
            parse("", "https://github.com/acme/api"),
            expect(Code::InvalidArgument, "principal: must not be empty"),
        ),
        (
            "principal with a control character",
            parse("al\u{1b}ice", "https://github.com/acme/api"),
            expect(
                Code::InvalidArgument,
                "principal: must not contain control characters",
            ),
        ),
        (
            "900 KiB principal (through the stream, under the 1 MiB limit)",
            parse(&big_principal, "https://github.com/acme/api"),
            expect(
                Code::InvalidArgument,
                "principal: is 921600 bytes long, the limit is 256",
            ),
        ),
    ];

    for (name, kind, expected) in class_cases.iter().chain(&parse_cases) {
        check_call(&world, name, kind.clone(), expected).await;
        cases += 1;
    }

    // ------------------------------------------------ sealed boxes and OAuth
    let key = public_key(&world).await;
    let host = "git.example.com";
    let seal_for = |principal: &str, host: &str, plain: &[u8]| {
        control_plane::cli::seal(
            &key,
            control_plane::cli::pat_binding(principal, host),
            plain,
        )
        .expect("seal")
    };
    let seal = |plain: &[u8]| seal_for("alice", host, plain);
    let seal_raw = |plain: &[u8]| control_plane::cli::seal_raw(&key, plain).expect("seal");
    admin
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: world.runner_id.clone(),
            kind: pb::ScmKind::Gitlab as i32,
            host: host.into(),
            oauth: Some(pb::OAuthApp {
                client_id: "cid".into(),
                // Not sealed to the runner's key.
                sealed_client_secret: random_bytes(80),
            }),
            pat_enabled: true,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await
        .expect("integration");
    admin
        .create_scm_integration(admin::CreateScmIntegrationRequest {
            runner_id: world.runner_id.clone(),
            kind: pb::ScmKind::Gitlab as i32,
            host: "closed.example.com".into(),
            oauth: None,
            pat_enabled: false,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        })
        .await
        .expect("integration");
    // The runner learns of integrations on its own; wait until it has.
    let mut synced = false;
    for _ in 0..400 {
        match call(&world, store(host, Vec::new())).await {
            admin::call_runner_response::Outcome::Error(e)
                if e.message.contains("no SCM integration") =>
            {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            _ => {
                synced = true;
                break;
            }
        }
    }
    assert!(synced, "the runner never listed the integrations");
    let sealed = seal(b"glpat-Truncated1");
    let mut flipped = seal(b"glpat-Flipped22");
    flipped[50] ^= 0x10;
    let other_key = crypto_box::SecretKey::generate(&mut OsRng);
    let to_other = control_plane::cli::seal(
        other_key.public_key().as_bytes(),
        control_plane::cli::pat_binding("alice", host),
        b"glpat-Other333",
    )
    .expect("seal");
    let unbound = "sealed_token: is not a sealed secret of format version 1";
    let no_open = "sealed_token: does not open with this runner's key";
    let token_cases: Vec<(&str, Kind, Expect)> =
        vec![
        (
            "random bytes",
            store(host, random_bytes(100)),
            expect(Code::InvalidArgument, no_open),
        ),
        (
            "empty box",
            store(host, Vec::new()),
            expect(Code::InvalidArgument, no_open),
        ),
        (
            "box shorter than its key and tag",
            store(host, random_bytes(47)),
            expect(Code::InvalidArgument, no_open),
        ),
        (
            "truncated box",
            store(host, sealed[..sealed.len() - 3].to_vec()),
            expect(Code::InvalidArgument, no_open).hiding("glpat-Truncated1"),
        ),
        (
            "tampered box",
            store(host, flipped),
            expect(Code::InvalidArgument, no_open).hiding("glpat-Flipped22"),
        ),
        (
            "box sealed to another key",
            store(host, to_other),
            expect(Code::InvalidArgument, no_open).hiding("glpat-Other333"),
        ),
        (
            "plaintext that is not UTF-8",
            store(host, seal_raw(&[0x67, 0x6c, 0xff, 0xfe, 0x41])),
            expect(Code::InvalidArgument, unbound),
        ),
        (
            "a bare token, bound to nothing",
            store(host, seal_raw(b"glpat-Bare4444")),
            expect(Code::InvalidArgument, unbound).hiding("glpat-Bare4444"),
        ),
        (
            "another user's box replayed as alice's",
            store(host, seal_for("bob", host, b"glpat-BobsOwn5")),
            expect(
                Code::InvalidArgument,
                "sealed_token: was sealed for another principal, not \"alice\"",
            )
            .hiding("glpat-BobsOwn5"),
        ),
        (
            "a box for another host",
            store(host, seal_for("alice", "github.com", b"glpat-OtherHost")),
            expect(
                Code::InvalidArgument,
                "sealed_token: was sealed for another host, not git.example.com",
            )
            .hiding("glpat-OtherHost"),
        ),
        (
            "an OAuth client secret replayed as a PAT",
            store(
                host,
                control_plane::cli::seal(
                    &key,
                    control_plane::cli::client_secret_binding(host),
                    b"client-Secret66",
                )
                .expect("seal"),
            ),
            expect(
                Code::InvalidArgument,
                "sealed_token: was sealed as \"oauth-client-secret\", not as \"pat\"",
            )
            .hiding("client-Secret66"),
        ),
        (
            "plaintext with whitespace inside",
            store(host, seal(b"glpat-Two Words")),
            expect(
                Code::InvalidArgument,
                "sealed_token: the secret contains whitespace or control characters",
            )
            .hiding("glpat-Two"),
        ),
        (
            "blank plaintext",
            store(host, seal(b" \t\r\n ")),
            expect(Code::InvalidArgument, "sealed_token: the secret is empty"),
        ),
        (
            "5000-byte plaintext",
            store(host, seal("t".repeat(5000).as_bytes())),
            expect(
                Code::InvalidArgument,
                "sealed_token: the secret is longer than 4096 bytes",
            ),
        ),
        (
            "host without an integration",
            store("nowhere.example.com", seal_for("alice", "nowhere.example.com", b"glpat-Nowhere4")),
            expect(
                Code::FailedPrecondition,
                "this runner has no SCM integration for nowhere.example.com",
            ),
        ),
        (
            "host that is not a host name",
            store("Git Example", seal_for("alice", "Git Example", b"glpat-BadHost5")),
            expect(Code::InvalidArgument, "host: \"Git Example\" is not a lowercase host name"),
        ),
        (
            "PATs disabled",
            store("closed.example.com", seal_for("alice", "closed.example.com", b"glpat-Closed66")),
            expect(
                Code::FailedPrecondition,
                "personal access tokens are disabled for closed.example.com",
            )
            .hiding("glpat-Closed66"),
        ),
        (
            "OAuth code for a host without an integration",
            exchange("nowhere.example.com", "code-Nowhere7"),
            expect(
                Code::FailedPrecondition,
                "this runner has no SCM integration for nowhere.example.com",
            )
            .hiding("code-Nowhere7"),
        ),
        (
            "empty OAuth code",
            exchange(host, ""),
            expect(Code::InvalidArgument, "code: must not be empty"),
        ),
        (
            "OAuth on a host without OAuth",
            exchange("closed.example.com", "code-Closed88"),
            expect(
                Code::FailedPrecondition,
                "OAuth is not enabled for closed.example.com",
            )
            .hiding("code-Closed88"),
        ),
        (
            "OAuth client secret that does not open",
            exchange(host, "code-Sealed999"),
            expect(
                Code::FailedPrecondition,
                "the OAuth client secret of git.example.com cannot be used (oauth.sealed_client_secret: does not open with this runner's key",
            )
            .hiding("code-Sealed999"),
        ),
    ];
    for (name, kind, expected) in &token_cases {
        check_call(&world, name, kind.clone(), expected).await;
        cases += 1;
    }
    assert!(world.tokens.keys().is_empty(), "no token was stored");

    // A pull request whose branch, from the provider, git cannot check out.
    let provider = fake.host();
    fake.add_token(ScmKind::GitHub, AuthSource::Pat, "ghp_alicePR0", "alice");
    fake.add_pull_request("acme", "api", 5, "bad..branch");
    create_integration(
        &world,
        Integration {
            kind: pb::ScmKind::Github,
            host: &provider,
            pat: true,
            oauth: None,
            api_base_url: String::new(),
            oauth_base_url: String::new(),
        },
    )
    .await;
    add_pat(&world, "alice", &provider, "ghp_alicePR0")
        .await
        .expect("PAT stored");
    check_call(
        &world,
        "pull request branch git cannot check out",
        parse("alice", &format!("https://{provider}/acme/api/pull/5")),
        &expect(
            Code::FailedPrecondition,
            format!(
                "{provider} named a pull request branch git cannot check out: \"bad..branch\" is not a valid git branch name"
            ),
        )
        .hiding("ghp_alicePR0"),
    )
    .await;
    cases += 1;

    // ------------------------------------------------ the control plane's boundary
    let boundary = |name: &str, result: Result<(), tonic::Status>, expected: Expect| {
        let status = result.expect_err(name);
        expected.check(name, status.code(), status.message());
    };
    let mut request = world.create_request(&world.class_id);
    request.unchecked = true;
    request.content.as_mut().expect("content").repository_url = long_url.clone();
    boundary(
        "3000-byte repository URL, even unchecked",
        admin.create_environment(request).await.map(drop),
        expect(
            Code::InvalidArgument,
            "content.repository_url: is 3024 bytes long, the limit is 2048",
        ),
    );
    let mut request = world.create_request(&world.class_id);
    request.unchecked = true;
    request.creator = "alice\u{7f}".into();
    boundary(
        "creator with a control character, even unchecked",
        admin.create_environment(request).await.map(drop),
        expect(
            Code::InvalidArgument,
            "creator: must not contain control characters",
        ),
    );
    for (name, disk, needle) in [
        (
            "class with a zero disk",
            0,
            "disk_gib: 0 GiB is outside 8 to 16384 GiB",
        ),
        (
            "class with a huge disk",
            1_000_000,
            "disk_gib: 1000000 GiB is outside 8 to 16384 GiB",
        ),
    ] {
        let mut request = new_class("Bad", "m7i.large");
        request.disk_gib = disk;
        boundary(
            name,
            admin.create_environment_class(request).await.map(drop),
            expect(Code::InvalidArgument, needle),
        );
    }
    boundary(
        "second integration for the same host",
        admin
            .create_scm_integration(admin::CreateScmIntegrationRequest {
                runner_id: world.runner_id.clone(),
                kind: pb::ScmKind::Gitlab as i32,
                host: host.into(),
                oauth: None,
                pat_enabled: true,
                api_base_url: String::new(),
                oauth_base_url: String::new(),
            })
            .await
            .map(drop),
        expect(
            Code::AlreadyExists,
            "host: the runner already has an integration for git.example.com",
        ),
    );
    boundary(
        "1.5 MiB call, over the 1 MiB message limit",
        admin
            .call_runner(admin::CallRunnerRequest {
                runner_id: world.runner_id.clone(),
                request: Some(runner_request(
                    "",
                    parse(&"p".repeat(1536 * 1024), "https://github.com/a/b"),
                )),
                timeout_ms: 5000,
            })
            .await
            .map(drop),
        expect(Code::OutOfRange, "message length too large"),
    );
    let call_runner = |kind: Kind| admin::CallRunnerRequest {
        runner_id: world.runner_id.clone(),
        request: Some(runner_request("", kind)),
        timeout_ms: 5000,
    };
    let not_utf8 = raw_call_runner(
        &world,
        with_invalid_utf8(
            &call_runner(parse("@@BADUTF8@@", "https://github.com/a/b")),
            "@@BADUTF8@@",
        ),
    )
    .await;
    expect(Code::Internal, "ParseContext.principal: ").check(
        "principal that is not UTF-8",
        not_utf8.code(),
        not_utf8.message(),
    );
    let deep = raw_call_runner(
        &world,
        with_nested_groups(&call_runner(Kind::Ping(pb::Ping {})), 10_000),
    )
    .await;
    expect(Code::Internal, "recursion limit reached").check(
        "call nested 10 000 groups deep",
        deep.code(),
        deep.message(),
    );
    cases += 8;

    // ------------------------------------------------ the runner's own decoding
    let env_bytes = with_invalid_utf8(
        &pb::RunnerEnvironment {
            id: "@@BADUTF8@@".into(),
            ..Default::default()
        },
        "@@BADUTF8@@",
    );
    let err = pb::RunnerEnvironment::decode(env_bytes.as_slice()).expect_err("invalid UTF-8");
    assert!(
        err.to_string()
            .contains("RunnerEnvironment.id: invalid string value"),
        "{err}"
    );
    let deep_request = with_nested_groups(&runner_request("r", Kind::Ping(pb::Ping {})), 10_000);
    let err = pb::RunnerRequest::decode(deep_request.as_slice()).expect_err("too deep");
    assert!(err.to_string().contains("recursion limit reached"), "{err}");
    for (name, env, needle) in [
        (
            "environment id not a UUID",
            pb::RunnerEnvironment {
                id: "not-a-uuid".into(),
                ..Default::default()
            },
            "environment_id: is not a UUID".to_owned(),
        ),
        (
            "environment without a spec",
            pb::RunnerEnvironment {
                id: no_spec.clone(),
                ..Default::default()
            },
            format!("environment {no_spec}: spec: must be set"),
        ),
    ] {
        let err = runnerd::grpc::environment_from_proto(env).expect_err(name);
        assert_eq!(err, needle, "{name}");
    }
    cases += 4;

    // ------------------------------------------------ events and stream messages
    let tag = uuid::Uuid::new_v4().to_string();
    for (env_id, problem) in [
        ("not-a-uuid", "environment_id: is not a UUID"),
        ("", "environment_id: must not be empty"),
        (&"x".repeat(100_000)[..], "environment_id: is not a UUID"),
    ] {
        let request_id = format!("{tag}-{}", env_id.len());
        tamper.inject(runner_request(&request_id, changed(env_id)).encode_to_vec());
        logged(
            "an event with a malformed id was ignored",
            &[
                "ignoring a malformed environment_changed",
                &request_id,
                problem,
            ],
        )
        .await;
        cases += 1;
    }
    // An environment the control plane does not know: it says NOT_FOUND.
    let stranger = uuid::Uuid::new_v4().to_string();
    tamper.inject(
        runner_request(&uuid::Uuid::new_v4().to_string(), changed(&stranger)).encode_to_vec(),
    );
    logged(
        "an unknown environment was looked up and forgotten",
        &[
            "the control plane no longer knows the environment",
            &stranger,
        ],
    )
    .await;
    // A request of a kind this runner does not know (a newer control plane).
    let unknown_kind = uuid::Uuid::new_v4().to_string();
    let mut bytes = pb::RunnerRequest {
        request_id: unknown_kind.clone(),
        kind: None,
    }
    .encode_to_vec();
    prost::encoding::string::encode(99, &"a future call".to_owned(), &mut bytes);
    tamper.inject(bytes);
    logged(
        "a call of an unknown kind was answered (UNIMPLEMENTED) and the control plane knew no such call",
        &["could not answer a call", &unknown_kind, "NotFound"],
    )
    .await;
    cases += 2;

    // Messages that do not decode end the stream: the runner reconnects and
    // relists, losing nothing.
    let before = reconnects(runner.health).await;
    tamper.inject(with_invalid_utf8(
        &runner_request("r", changed("@@BADUTF8@@")),
        "@@BADUTF8@@",
    ));
    logged(
        "the stream with invalid UTF-8 failed",
        &[
            "watch stream failed",
            "EnvironmentChanged.environment_id: ",
            "data is not UTF-8 encoded",
        ],
    )
    .await;
    let after_utf8 = wait_reconnected(&runner, before).await;
    tamper.inject(with_nested_groups(
        &runner_request("r", Kind::Ping(pb::Ping {})),
        10_000,
    ));
    logged(
        "the stream with deep nesting failed",
        &["watch stream failed", "recursion limit reached"],
    )
    .await;
    wait_reconnected(&runner, after_utf8).await;
    cases += 2;

    // ------------------------------------------------ the statuses
    let expected_failed = env_cases.len();
    let envs = world
        .wait_for(
            "every bad spec failed and the good ones run",
            Duration::from_secs(30),
            |envs| {
                let failed = env_cases
                    .iter()
                    .filter(|case| {
                        envs.iter().any(|e| {
                            id(e) == case.id
                                && e.status
                                    .as_ref()
                                    .is_some_and(|s| !s.failure_message.is_empty())
                        })
                    })
                    .count();
                let running = envs
                    .iter()
                    .filter(|e| good.contains(&id(e)) && settled(e, Phase::Running))
                    .count();
                failed == expected_failed && running == good.len()
            },
        )
        .await;
    for case in &env_cases {
        let env = envs.iter().find(|e| id(e) == case.id).expect("listed");
        let status = env.status.as_ref().expect("status");
        assert!(
            status.failure_message.starts_with(&case.failure),
            "{}: {:?} does not name the problem ({:?})",
            case.name,
            status.failure_message,
            case.failure
        );
        let ack = status.runner_ack.as_ref().expect("ack");
        let code = if case.invalid_spec {
            pb::RunnerAckCode::InvalidSpec
        } else {
            pb::RunnerAckCode::Ok
        };
        assert_eq!(ack.code, code as i32, "{}", case.name);
        assert!(status.machine.is_none(), "{}: nothing launched", case.name);
        for secret in ["ghp_CredInUrl1", "qs_Secret42"] {
            assert!(!status.failure_message.contains(secret), "{}", case.name);
            assert!(!ack.message.contains(secret), "{}", case.name);
        }
        cases += 1;
    }
    let no_spec_env = envs.iter().find(|e| id(e) == no_spec).expect("listed");
    assert!(
        no_spec_env.status.is_none(),
        "an environment without a spec gets no status: {no_spec_env:?}"
    );
    logged(
        "the environment without a spec was skipped",
        &[
            "skipping a malformed environment",
            &format!("environment {no_spec}: spec: must be set"),
        ],
    )
    .await;
    logged(
        "an environment with a malformed id was skipped",
        &[
            "skipping a malformed environment",
            "environment_id: is not a UUID",
        ],
    )
    .await;
    logged(
        "an environment with an empty id was skipped",
        &[
            "skipping a malformed environment",
            "environment_id: must not be empty",
        ],
    )
    .await;
    assert!(tamper.state.pages_with_extra.load(Ordering::SeqCst) > 0);
    cases += 3;
    // The duplicate: its older copy asked for deletion; the newer spec won.
    let duplicated = envs.iter().find(|e| id(e) == good[0]).expect("listed");
    assert!(settled(duplicated, Phase::Running), "{duplicated:?}");
    cases += 1;

    // A list page that does not decode fails the whole sync, which is
    // retried; nothing is torn down meanwhile.
    let corrupt = with_invalid_utf8(
        &pb::RunnerEnvironment {
            id: "@@BADUTF8@@".into(),
            ..Default::default()
        },
        "@@BADUTF8@@",
    );
    tamper.state.extra.lock().expect("lock").push(corrupt);
    let served = tamper.state.pages_with_extra.load(Ordering::SeqCst);
    let before = reconnects(runner.health).await;
    admin
        .close_runner_streams(admin::CloseRunnerStreamsRequest {
            runner_id: world.runner_id.clone(),
        })
        .await
        .expect("close streams");
    wait_reconnected(&runner, before).await;
    logged(
        "the list that does not decode failed the sync",
        &[
            "full sync failed; retrying",
            "RunnerEnvironment.id: ",
            "data is not UTF-8 encoded",
        ],
    )
    .await;
    assert!(tamper.state.pages_with_extra.load(Ordering::SeqCst) > served);
    tamper.state.extra.lock().expect("lock").clear();
    cases += 1;

    // ------------------------------------------------ the runner keeps serving
    good.push(world.create_env().await);
    world
        .wait_for(
            "the good environments RUNNING",
            Duration::from_secs(30),
            |envs| {
                good.iter().all(|g| {
                    envs.iter()
                        .any(|e| &id(e) == g && settled(e, Phase::Running))
                })
            },
        )
        .await;
    match call(&world, Kind::Ping(pb::Ping {})).await {
        admin::call_runner_response::Outcome::Result(pb::RunnerResult {
            kind: Some(runner_result::Kind::Ping(p)),
        }) => assert_eq!(p.version, env!("CARGO_PKG_VERSION")),
        other => panic!("ping: unexpected {other:?}"),
    }
    let (code, _) = http_get(runner.health, "/readyz").await;
    assert_eq!(code, 200, "still ready");
    assert_eq!(
        world.compute.calls("launch"),
        good.len() as u64,
        "one launch per good environment, none for bad input"
    );
    assert_eq!(world.compute.calls("terminate"), 0, "nothing torn down");
    let logs = log_lines();
    for secret in [
        "ghp_CredInUrl1",
        "qs_Secret42",
        "ghq_Query77",
        "ghp_UrlSecret9",
        "glpat-Truncated1",
        "glpat-Flipped22",
        "glpat-Other333",
        "glpat-Two",
        "glpat-Nowhere4",
        "glpat-BadHost5",
        "glpat-Closed66",
        "code-Nowhere7",
        "code-Closed88",
        "code-Sealed999",
        "ghp_alicePR0",
    ] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    runner.stop().await.expect("clean stop");

    // ------------------------------------------------ a region the runner was not created for
    let mut other = World::new().await;
    let created = other
        .admin
        .create_runner(admin::CreateRunnerRequest {
            name: "elsewhere".into(),
            region: "us-east-1".into(),
        })
        .await
        .expect("runner")
        .into_inner();
    other.runner_id = created.runner.expect("runner").id;
    other.secrets = Arc::new(testkit::fakes::MemorySecrets::with_exchange_token(
        &created.exchange_token,
    ));
    let err = other
        .start_runner()
        .await
        .stop()
        .await
        .expect_err("the signup is refused");
    let chain = anyhow_chain(&err);
    assert!(
        chain.contains("region: the runner was created for us-east-1, not eu-west-1"),
        "{chain}"
    );
    cases += 1;

    assert!(cases >= 40, "the corpus holds {cases} cases");
    eprintln!("bad input corpus: {cases} cases");
}

/// Waits until the reconnect counter passes `before`; returns it.
async fn wait_reconnected(runner: &crate::Runner, before: u64) -> u64 {
    for _ in 0..400 {
        let now = reconnects(runner.health).await;
        if now > before {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the runner did not reconnect");
}

/// An error and its sources, joined.
fn anyhow_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
