//! The gRPC server: both APIs on one port, TLS unless plaintext is asked for
//! on loopback, a cap on message size, and the optional admin token.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runner_proto::admin::v1::admin_service_server::AdminServiceServer;
use runner_proto::pb::identity_service_server::IdentityServiceServer;
use runner_proto::pb::runner_service_server::RunnerServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::ControlPlane;
use crate::admin_api::AdminApi;
use crate::runner_api::RunnerApi;
use crate::state::RunnerRecord;

/// Largest request or response accepted by default, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// What shapes the control plane's answers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The URL runners dial, put into quick-create links.
    pub public_url: String,
    /// Where the CloudFormation template is hosted, for quick-create links.
    pub template_url: String,
    /// Silence after which a runner is shown as INACTIVE.
    pub inactive_after: Duration,
    /// How long a new exchange token stays valid.
    pub exchange_token_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            public_url: "http://127.0.0.1:7443".to_owned(),
            template_url: DEFAULT_TEMPLATE_URL.to_owned(),
            inactive_after: Duration::from_secs(90),
            exchange_token_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The default template location in quick-create links.
pub const DEFAULT_TEMPLATE_URL: &str =
    "https://aws-runner-templates.s3.amazonaws.com/latest/runner.yaml";

impl Settings {
    /// The CloudFormation console link that creates the runner's stack with
    /// its id, exchange token and control-plane URL filled in.
    pub fn quick_create_url(&self, runner: &RunnerRecord, exchange_token: &str) -> String {
        let fragment = form_urlencoded::Serializer::new(String::new())
            .append_pair("templateURL", &self.template_url)
            .append_pair("stackName", &format!("aws-runner-{}", runner.name))
            .append_pair("param_RunnerId", &runner.id.to_string())
            .append_pair("param_ExchangeToken", exchange_token)
            .append_pair("param_ControlPlaneUrl", &self.public_url)
            .finish();
        format!(
            "https://{region}.console.aws.amazon.com/cloudformation/home?region={region}#/stacks/quickcreate?{fragment}",
            region = runner.region
        )
    }
}

/// A PEM certificate chain and its private key.
#[derive(Clone)]
pub struct TlsPem {
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// The private key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsPem { .. }")
    }
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The TLS identity; `None` serves plaintext, which is refused unless
    /// the listener is on loopback.
    pub tls: Option<TlsPem>,
    /// Largest message accepted, in bytes.
    pub max_message_bytes: usize,
    /// When set, admin calls must carry `authorization: Bearer <token>`.
    pub admin_token: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            tls: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            admin_token: None,
        }
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Plaintext was asked for on an address other people can reach.
    #[error(
        "plaintext is only allowed on a loopback address, not {0}; give a TLS certificate and key"
    )]
    PlaintextNotLoopback(SocketAddr),
    /// The listener has no address.
    #[error("read the listener's address")]
    LocalAddr(#[source] std::io::Error),
    /// The TLS identity or the transport failed.
    #[error("serve gRPC")]
    Transport(#[source] tonic::transport::Error),
}

/// Serves both APIs for `plane` on `listener` until `shutdown` completes.
///
/// On shutdown, open watch streams are ended first so that the server's
/// graceful drain does not wait on them; the records in `plane` survive, so
/// serving it again on a new listener acts as a restart.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    plane: Arc<ControlPlane>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    if config.tls.is_none() && !addr.ip().is_loopback() {
        return Err(ServeError::PlaintextNotLoopback(addr));
    }
    let hub = plane.hub.clone();
    let shutdown = async move {
        shutdown.await;
        hub.close_every();
    };
    let limit = config.max_message_bytes;

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key)))
            .map_err(ServeError::Transport)?;
    }

    let runner = RunnerApi(plane.clone());
    let admin_token = config.admin_token;
    let admin = InterceptedService::new(
        AdminServiceServer::new(AdminApi(plane))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
        move |request: Request<()>| check_admin_token(admin_token.as_deref(), request),
    );
    tracing::info!(%addr, tls = config.tls.is_some(), "control plane listening");
    builder
        .add_service(
            IdentityServiceServer::new(runner.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(
            RunnerServiceServer::new(runner)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(admin)
        // The builder's nodelay applies only to sockets tonic binds: set it
        // on these (without it a reply's frames waited for the peer's
        // delayed ACK, 40 ms).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(ServeError::Transport)
}

fn check_admin_token(expected: Option<&str>, request: Request<()>) -> Result<Request<()>, Status> {
    let Some(expected) = expected else {
        return Ok(request);
    };
    let given = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(request),
        _ => Err(Status::unauthenticated(
            "admin calls need authorization: Bearer <admin token>",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
