//! The gRPC side: the channel to the control plane (TLS verified against the
//! system roots plus an optional CA bundle), bearer authentication, the
//! translation between `runner.v1` messages and the core model, and the core
//! `ControlPlane` trait over `RunnerService`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use runner_core::model::{
    DesiredPhase, Environment, EnvironmentClass, EnvironmentId, Instance, InstanceState, Phase,
    Revision, Spec, Status,
};
use runner_core::traits::{ControlPlane, ControlPlaneError};
use runner_proto::pb::{self, environment_content, runner_service_client::RunnerServiceClient};
use secrecy::{ExposeSecret as _, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status as GrpcStatus};

use crate::config::ControlPlaneConfig;

/// Why the channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("configure the control-plane channel")]
pub struct ChannelError(#[source] tonic::transport::Error);

/// A lazily connecting channel to the control plane.
pub fn channel(config: &ControlPlaneConfig) -> Result<Channel, ChannelError> {
    let mut endpoint = Endpoint::from_shared(config.url.clone())
        .map_err(ChannelError)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if config.url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(pem) = &config.ca_bundle {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(ChannelError)?;
    }
    Ok(endpoint.connect_lazy())
}

/// The access token, set once credentials are known; added to every call.
#[derive(Clone, Default)]
pub struct Auth(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

impl Auth {
    /// Uses `token` from now on.
    pub fn set(&self, token: &SecretString) -> Result<(), String> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.expose_secret())
            .parse()
            .map_err(|_| {
            "the access token has characters not allowed in a header".to_owned()
        })?;
        value.set_sensitive(true);
        *self.0.write().expect("auth lock is never poisoned") = Some(value);
        Ok(())
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, GrpcStatus> {
        if let Some(value) = self.0.read().expect("auth lock is never poisoned").as_ref() {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An authenticated `RunnerService` client.
pub type RunnerClient = RunnerServiceClient<InterceptedService<Channel, Auth>>;

/// Classifies a gRPC error once: a request the control plane refused as it
/// is will not succeed by retrying; everything else may.
pub fn classify(status: &GrpcStatus) -> ControlPlaneError {
    let message = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange => ControlPlaneError::Rejected(message),
        _ => ControlPlaneError::Unavailable(message),
    }
}

/// Reads an environment from the wire; the error names what is malformed.
pub fn environment_from_proto(env: pb::RunnerEnvironment) -> Result<Environment, String> {
    let id: EnvironmentId = env
        .id
        .parse()
        .map_err(|e: runner_core::validate::FieldError| e.to_string())?;
    let spec = env
        .spec
        .ok_or_else(|| format!("environment {id}: spec: must be set"))?;
    let desired = match pb::EnvironmentPhase::try_from(spec.desired_phase) {
        Ok(pb::EnvironmentPhase::Running) => Some(DesiredPhase::Running),
        Ok(pb::EnvironmentPhase::Stopped) => Some(DesiredPhase::Stopped),
        Ok(pb::EnvironmentPhase::Deleted) => Some(DesiredPhase::Deleted),
        _ => None,
    };
    let content = spec.content.unwrap_or_default();
    let revision = match content.revision {
        None => Revision::Default,
        Some(environment_content::Revision::Branch(b)) => Revision::Branch(b),
        Some(environment_content::Revision::Commit(c)) => Revision::Commit(c),
    };
    Ok(Environment {
        id,
        accepted_status_version: env.accepted_status_version,
        spec: Spec {
            spec_version: spec.spec_version,
            desired,
            class_id: spec.environment_class_id,
            repository_url: content.repository_url,
            revision,
            creator: env.metadata.map(|m| m.creator).unwrap_or_default(),
        },
    })
}

/// Reads an environment class from the wire.
pub fn class_from_proto(class: pb::EnvironmentClass) -> EnvironmentClass {
    EnvironmentClass {
        id: class.id,
        display_name: class.display_name,
        instance_type: class.instance_type,
        disk_gib: class.disk_gib,
        enabled: class.enabled,
    }
}

fn phase_to_proto(phase: Phase) -> pb::EnvironmentPhase {
    match phase {
        Phase::Creating => pb::EnvironmentPhase::Creating,
        Phase::Starting => pb::EnvironmentPhase::Starting,
        Phase::Running => pb::EnvironmentPhase::Running,
        Phase::Stopping => pb::EnvironmentPhase::Stopping,
        Phase::Stopped => pb::EnvironmentPhase::Stopped,
        Phase::Deleting => pb::EnvironmentPhase::Deleting,
        Phase::Deleted => pb::EnvironmentPhase::Deleted,
    }
}

fn machine_to_proto(instance: &Instance) -> pb::Machine {
    let phase = match instance.state {
        InstanceState::Pending => pb::MachinePhase::Pending,
        InstanceState::Running => pb::MachinePhase::Running,
        InstanceState::Stopping => pb::MachinePhase::Stopping,
        InstanceState::Stopped => pb::MachinePhase::Stopped,
        InstanceState::ShuttingDown => pb::MachinePhase::ShuttingDown,
        InstanceState::Terminated => pb::MachinePhase::Terminated,
    };
    pb::Machine {
        instance_id: instance.id.clone(),
        availability_zone: instance.availability_zone.clone(),
        subnet_id: instance.subnet_id.clone(),
        private_ip: instance.private_ip.clone().unwrap_or_default(),
        phase: phase as i32,
    }
}

/// Writes a status to the wire.
pub fn status_to_proto(version: u64, status: &Status) -> pb::EnvironmentStatus {
    let (code, message) = if status.spec_valid {
        (pb::RunnerAckCode::Ok, String::new())
    } else {
        (
            pb::RunnerAckCode::InvalidSpec,
            status.failure_message.chars().take(1024).collect(),
        )
    };
    pb::EnvironmentStatus {
        status_version: version,
        runner_ack: Some(pb::RunnerAck {
            spec_version: status.spec_version,
            code: code as i32,
            message,
        }),
        phase: phase_to_proto(status.phase) as i32,
        machine: status.machine.as_ref().map(machine_to_proto),
        failure_message: status.failure_message.chars().take(4096).collect(),
        warning_message: status.warning_message.chars().take(4096).collect(),
    }
}

/// The core `ControlPlane` over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcControlPlane {
    client: RunnerClient,
    timeout: Duration,
}

impl GrpcControlPlane {
    /// A control plane reached through `client`, each call bounded by `timeout`.
    pub fn new(client: RunnerClient, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }
}

impl GrpcControlPlane {
    /// Every SCM integration of this runner (all pages, or an error).
    pub async fn list_integrations(&self) -> Result<Vec<pb::ScmIntegration>, ControlPlaneError> {
        all_pages(|page| {
            let mut client = self.client.clone();
            let request = self.request(pb::ListScmIntegrationsRequest { page: Some(page) });
            async move {
                let response = client.list_scm_integrations(request).await?.into_inner();
                Ok((response.integrations, response.page))
            }
        })
        .await
    }

    /// Every (principal, host) whose token the runner may keep.
    pub async fn list_host_tokens(
        &self,
    ) -> Result<std::collections::BTreeSet<(String, String)>, ControlPlaneError> {
        let refs = all_pages(|page| {
            let mut client = self.client.clone();
            let request = self.request(pb::ListHostTokensRequest { page: Some(page) });
            async move {
                let response = client.list_host_tokens(request).await?.into_inner();
                Ok((response.host_tokens, response.page))
            }
        })
        .await?;
        Ok(refs.into_iter().map(|r| (r.principal, r.host)).collect())
    }
}

const PAGE_SIZE: u32 = 500;

/// Every item of a paged list: all pages, or the first error.
async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, ControlPlaneError>
where
    F: FnMut(pb::PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<pb::PageResponse>), GrpcStatus>>,
{
    let mut page_token = String::new();
    let mut out = Vec::new();
    loop {
        let (items, page) = fetch(pb::PageRequest {
            page_size: PAGE_SIZE,
            page_token,
        })
        .await
        .map_err(|s| classify(&s))?;
        out.extend(items);
        page_token = page.map(|p| p.next_page_token).unwrap_or_default();
        if page_token.is_empty() {
            return Ok(out);
        }
    }
}

#[async_trait]
impl ControlPlane for GrpcControlPlane {
    async fn list_environments(&self) -> Result<Vec<Environment>, ControlPlaneError> {
        let environments = all_pages(|page| {
            let mut client = self.client.clone();
            let request = self.request(pb::ListEnvironmentsRequest { page: Some(page) });
            async move {
                let response = client.list_environments(request).await?.into_inner();
                Ok((response.environments, response.page))
            }
        })
        .await?;
        Ok(environments
            .into_iter()
            .filter_map(|env| {
                environment_from_proto(env)
                    .map_err(|problem| tracing::warn!(problem = %problem, "skipping a malformed environment"))
                    .ok()
            })
            .collect())
    }

    async fn get_environment(
        &self,
        id: EnvironmentId,
    ) -> Result<Option<Environment>, ControlPlaneError> {
        let result = self
            .client
            .clone()
            .get_environment(self.request(pb::GetEnvironmentRequest {
                environment_id: id.to_string(),
            }))
            .await;
        match result {
            Ok(response) => {
                let env = response.into_inner().environment.ok_or_else(|| {
                    ControlPlaneError::Unavailable("GetEnvironment returned no environment".into())
                })?;
                environment_from_proto(env)
                    .map(Some)
                    .map_err(ControlPlaneError::Rejected)
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(classify(&status)),
        }
    }

    async fn list_classes(&self) -> Result<Vec<EnvironmentClass>, ControlPlaneError> {
        let classes = all_pages(|page| {
            let mut client = self.client.clone();
            let request = self.request(pb::ListEnvironmentClassesRequest { page: Some(page) });
            async move {
                let response = client.list_environment_classes(request).await?.into_inner();
                Ok((response.environment_classes, response.page))
            }
        })
        .await?;
        Ok(classes.into_iter().map(class_from_proto).collect())
    }

    async fn update_status(
        &self,
        id: EnvironmentId,
        status_version: u64,
        status: &Status,
    ) -> Result<(), ControlPlaneError> {
        self.client
            .clone()
            .update_environment_status(self.request(pb::UpdateEnvironmentStatusRequest {
                environment_id: id.to_string(),
                status: Some(status_to_proto(status_version, status)),
            }))
            .await
            .map(drop)
            .map_err(|s| classify(&s))
    }
}
