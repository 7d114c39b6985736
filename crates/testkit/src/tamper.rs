//! A byte-level gRPC proxy between a runner and the control plane that
//! damages what the runner receives, in ways the reference control plane
//! never would.
//!
//! [`Tamper`] serves `runner.v1.RunnerService` and
//! `runner.v1.IdentityService` on a loopback port and forwards every call to
//! the upstream as raw bytes (the [`Raw`] codec), keeping the caller's
//! `authorization`. On the way back it can:
//! - damage one environment's description in `ListEnvironments` and
//!   `GetEnvironment` answers ([`Damage`]);
//! - list an environment twice, first as an older copy that asks for
//!   deletion ([`Tamper::duplicate`]);
//! - append raw `RunnerEnvironment` bytes to every list page
//!   ([`Tamper::append_to_lists`]);
//! - push raw `RunnerRequest` bytes into every open `WatchRequests` stream
//!   ([`Tamper::inject`]);
//! - rewrite the answer of any unary method with a function
//!   ([`Tamper::rewrite`]), e.g. an undecodable `ListScmIntegrations`.
//!
//! [`with_invalid_utf8`] and [`with_nested_groups`] build messages that do
//! not decode. The proxy stops serving when the [`Tamper`] is dropped.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _};
use runner_proto::pb::{self, EnvironmentPhase};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;
use tonic::transport::Channel;

/// `RunnerService/WatchRequests`.
pub const WATCH: &str = "/runner.v1.RunnerService/WatchRequests";
/// `RunnerService/ListEnvironments`.
pub const LIST_ENVIRONMENTS: &str = "/runner.v1.RunnerService/ListEnvironments";
/// `RunnerService/GetEnvironment`.
pub const GET_ENVIRONMENT: &str = "/runner.v1.RunnerService/GetEnvironment";
/// `RunnerService/ListScmIntegrations`.
pub const LIST_SCM_INTEGRATIONS: &str = "/runner.v1.RunnerService/ListScmIntegrations";

/// Passes gRPC messages through as bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// `spec.desired_phase` set to this raw value.
    DesiredPhase(i32),
    /// `spec.content` left out.
    NoContent,
    /// `metadata` left out.
    NoMetadata,
    /// `spec` left out.
    NoSpec,
    /// `spec.content.repository_url` replaced (with what the reference
    /// control plane refuses even unchecked, say control characters).
    RepositoryUrl(&'static str),
}

impl Damage {
    fn apply(self, env: &mut pb::RunnerEnvironment) {
        match self {
            Self::NoMetadata => env.metadata = None,
            Self::NoSpec => env.spec = None,
            Self::DesiredPhase(value) => {
                if let Some(spec) = env.spec.as_mut() {
                    spec.desired_phase = value;
                }
            }
            Self::NoContent => {
                if let Some(spec) = env.spec.as_mut() {
                    spec.content = None;
                }
            }
            Self::RepositoryUrl(url) => {
                if let Some(content) = env.spec.as_mut().and_then(|s| s.content.as_mut()) {
                    content.repository_url = url.into();
                }
            }
        }
    }
}

/// Rewrites the bytes of one unary answer; an error is answered instead.
type Rewrite = Arc<dyn Fn(Vec<u8>) -> Result<Vec<u8>, tonic::Status> + Send + Sync>;

struct State {
    /// Raw `RunnerRequest`s pushed into every open watch stream.
    inject: broadcast::Sender<Vec<u8>>,
    damaged: Mutex<HashMap<String, Damage>>,
    /// Listed twice: first as an older copy that asks for deletion.
    duplicated: Mutex<HashSet<String>>,
    /// Raw `RunnerEnvironment`s appended to every list page.
    extra: Mutex<Vec<Vec<u8>>>,
    /// Pages served with `extra`.
    pages_with_extra: AtomicUsize,
    rewrites: Mutex<HashMap<String, Rewrite>>,
    /// Answers rewritten, by method path.
    rewritten: Mutex<HashMap<String, usize>>,
}

/// What the served proxy and its handle share.
#[derive(Clone)]
struct Shared {
    upstream: Channel,
    state: Arc<State>,
}

/// A running tampering proxy; see the module comment. Stops when dropped.
pub struct Tamper {
    url: String,
    shared: Shared,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tamper")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for Tamper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tamper {
    /// Serves on a free loopback port, forwarding to `upstream_url` (an
    /// `http://` URL of the control plane).
    pub async fn start(upstream_url: &str) -> std::io::Result<Self> {
        let upstream = tonic::transport::Endpoint::from_shared(upstream_url.to_owned())
            .map_err(std::io::Error::other)?
            .connect_lazy();
        let shared = Shared {
            upstream,
            state: Arc::new(State {
                inject: broadcast::channel(64).0,
                damaged: Mutex::default(),
                duplicated: Mutex::default(),
                extra: Mutex::default(),
                pages_with_extra: AtomicUsize::new(0),
                rewrites: Mutex::default(),
                rewritten: Mutex::default(),
            }),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let router = tonic::transport::Server::builder()
            .add_service(Proxy::<false>(shared.clone()))
            .add_service(Proxy::<true>(shared.clone()));
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("the tampering proxy serves until dropped");
        });
        Ok(Self { url, shared, task })
    }

    /// Where the runner should connect instead of the control plane.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn state(&self) -> &State {
        &self.shared.state
    }

    /// Pushes a raw `RunnerRequest` into every watch stream open now (a
    /// stream opened later does not get it).
    pub fn inject(&self, request: Vec<u8>) {
        let _ = self.state().inject.send(request);
    }

    /// Damages environment `id` in every answer that describes it.
    pub fn damage(&self, id: &str, damage: Damage) {
        self.state()
            .damaged
            .lock()
            .expect("lock")
            .insert(id.to_owned(), damage);
    }

    /// Lists environment `id` twice in every page: first an older copy
    /// (spec version one lower) that asks for deletion, then the real one.
    pub fn duplicate(&self, id: &str) {
        self.state()
            .duplicated
            .lock()
            .expect("lock")
            .insert(id.to_owned());
    }

    /// Appends these raw `RunnerEnvironment`s to every list page, after
    /// those appended before.
    pub fn append_to_lists(&self, environments: impl IntoIterator<Item = Vec<u8>>) {
        self.state()
            .extra
            .lock()
            .expect("lock")
            .extend(environments);
    }

    /// Stops appending to list pages.
    pub fn clear_appended(&self) {
        self.state().extra.lock().expect("lock").clear();
    }

    /// How many list pages were served with appended environments.
    pub fn pages_with_appended(&self) -> usize {
        self.state().pages_with_extra.load(Ordering::SeqCst)
    }

    /// Answers unary `method` (a path such as [`LIST_SCM_INTEGRATIONS`])
    /// with `rewrite` applied to the upstream's answer, until
    /// [`Tamper::stop_rewriting`].
    pub fn rewrite(
        &self,
        method: &str,
        rewrite: impl Fn(Vec<u8>) -> Result<Vec<u8>, tonic::Status> + Send + Sync + 'static,
    ) {
        self.state()
            .rewrites
            .lock()
            .expect("lock")
            .insert(method.to_owned(), Arc::new(rewrite));
    }

    /// Answers `method` as the upstream does again.
    pub fn stop_rewriting(&self, method: &str) {
        self.state().rewrites.lock().expect("lock").remove(method);
    }

    /// How many answers of `method` were rewritten so far.
    pub fn rewritten(&self, method: &str) -> usize {
        self.state()
            .rewritten
            .lock()
            .expect("lock")
            .get(method)
            .copied()
            .unwrap_or(0)
    }
}

impl Shared {
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
        let body = self.damage_environments(&path, body)?;
        let rewrite = self
            .state
            .rewrites
            .lock()
            .expect("lock")
            .get(&path)
            .cloned();
        let body = match rewrite {
            Some(rewrite) => {
                *self
                    .state
                    .rewritten
                    .lock()
                    .expect("lock")
                    .entry(path)
                    .or_insert(0) += 1;
                rewrite(body)?
            }
            None => body,
        };
        Ok(tonic::Response::new(body))
    }

    fn damage_environments(&self, path: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
        let decode_error = |e: prost::DecodeError| tonic::Status::internal(e.to_string());
        match path {
            LIST_ENVIRONMENTS => {
                let mut page =
                    pb::ListEnvironmentsResponse::decode(body.as_slice()).map_err(decode_error)?;
                let duplicated = self.state.duplicated.lock().expect("lock").clone();
                let mut environments = Vec::new();
                for mut env in std::mem::take(&mut page.environments) {
                    if duplicated.contains(&env.id) {
                        let mut older = env.clone();
                        if let Some(spec) = older.spec.as_mut() {
                            spec.spec_version = spec.spec_version.saturating_sub(1);
                            spec.desired_phase = EnvironmentPhase::Deleted as i32;
                        }
                        environments.push(older);
                    }
                    self.damage_environment(&mut env);
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
            GET_ENVIRONMENT => {
                let mut response =
                    pb::GetEnvironmentResponse::decode(body.as_slice()).map_err(decode_error)?;
                if let Some(env) = response.environment.as_mut() {
                    self.damage_environment(env);
                }
                Ok(response.encode_to_vec())
            }
            _ => Ok(body),
        }
    }

    fn damage_environment(&self, env: &mut pb::RunnerEnvironment) {
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
#[derive(Clone)]
struct Proxy<const RUNNER: bool>(Shared);

impl NamedService for Proxy<true> {
    const NAME: &'static str = "runner.v1.RunnerService";
}

impl NamedService for Proxy<false> {
    const NAME: &'static str = "runner.v1.IdentityService";
}

struct Unary(Shared, String);

impl tonic::server::UnaryService<Vec<u8>> for Unary {
    type Response = Vec<u8>;
    type Future = BoxFuture<tonic::Response<Vec<u8>>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
        Box::pin(self.0.clone().unary(self.1.clone(), request))
    }
}

struct Watch(Shared);

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
        let shared = self.0.clone();
        let path = request.uri().path().to_owned();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Raw);
            Ok(if path == WATCH {
                grpc.server_streaming(Watch(shared), request).await
            } else {
                grpc.unary(Unary(shared, path), request).await
            })
        })
    }
}

/// `message` encoded, with the bytes of `placeholder` (which must appear
/// once, inside a string field) replaced by as many invalid UTF-8 bytes.
pub fn with_invalid_utf8(message: &impl prost::Message, placeholder: &str) -> Vec<u8> {
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
/// nested in one another (past prost's recursion limit from 100 on).
pub fn with_nested_groups(message: &impl prost::Message, depth: usize) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    for _ in 0..depth {
        prost::encoding::encode_key(999, prost::encoding::WireType::StartGroup, &mut bytes);
    }
    for _ in 0..depth {
        prost::encoding::encode_key(999, prost::encoding::WireType::EndGroup, &mut bytes);
    }
    bytes
}
