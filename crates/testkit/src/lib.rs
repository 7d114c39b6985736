//! Test peers and fixtures shared by the test suites.
//!
//! [`ControlPlane`] starts the reference control plane in-process on a
//! loopback port, over real gRPC, and stops it when dropped. [`fakes`] holds
//! in-memory implementations of the core traits; [`proxy`] is a
//! fault-injecting HTTP proxy in front of emulated AWS; [`scm`] fakes the
//! source-control providers over HTTPS; [`tamper`] is a gRPC proxy that
//! damages what a runner receives from the control plane.

pub mod fakes;
pub mod proxy;
pub mod scm;
pub mod tamper;

use std::net::SocketAddr;
use std::sync::Arc;

use control_plane::ServerConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// A reference control plane running on 127.0.0.1.
#[derive(Debug)]
pub struct ControlPlane {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its records, which outlive a restart.
    pub plane: Arc<control_plane::ControlPlane>,
    config: ServerConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts one serving `plane` with `config` on a free loopback port.
    pub async fn start(
        config: ServerConfig,
        plane: Arc<control_plane::ControlPlane>,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(listener, config, plane))
    }

    fn serve(
        listener: tokio::net::TcpListener,
        config: ServerConfig,
        plane: Arc<control_plane::ControlPlane>,
    ) -> Self {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let config = config.clone();
            let plane = plane.clone();
            async move {
                let shutdown = async {
                    let _ = stopped.await;
                };
                if let Err(err) = control_plane::serve(listener, config, plane, shutdown).await {
                    panic!("reference control plane failed: {err:?}");
                }
            }
        });
        Self {
            addr,
            plane,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving, ending every connection and stream, and serves the same
    /// records again on the same port: a restart as runners see it.
    pub async fn restart(self) -> std::io::Result<Self> {
        let addr = self.addr;
        let config = self.config.clone();
        let plane = self.plane.clone();
        self.stop().await;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(Self::serve(listener, config, plane))
    }

    /// Its URL for plaintext clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A plaintext channel to it.
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(self.url())?.connect().await
    }

    /// Stops it and waits until its port is closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    /// An interceptor for `token`.
    pub fn new(token: &str) -> Self {
        Self(
            format!("Bearer {token}")
                .parse()
                .expect("tokens in tests are ASCII"),
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A `RunnerService` client that authenticates with a bearer token.
pub type RunnerClient = runner_proto::pb::runner_service_client::RunnerServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// A runner client on `channel` with `token`.
pub fn runner_client(channel: Channel, token: &str) -> RunnerClient {
    runner_proto::pb::runner_service_client::RunnerServiceClient::with_interceptor(
        channel,
        Bearer::new(token),
    )
}
