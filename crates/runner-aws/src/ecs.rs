//! Self-update through ECS: the deployer.
//!
//! [`EcsDeployer`] finds the runner's own service from the task metadata
//! endpoint (`ECS_CONTAINER_METADATA_URI_V4`: cluster, task ARN, container
//! name) and `DescribeTasks` (the task's group is `service:<name>`), registers
//! a revision of the service's task definition that differs only in this
//! container's image, and points the service at it. It sets nothing else on
//! the service, so the stack's deployment settings (circuit breaker with
//! rollback, overlap) apply to the rollout. The attempt record is
//! `dynamo::DynamoAttempts`; policy lives in `runner_core::update`.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ecs::types::DeploymentRolloutState;
use http_body_util::BodyExt as _;
use runner_core::update::{Deployer, Deployment, Rollout, Service, UpdateError};
use tokio::sync::OnceCell;

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
const METADATA_MAX_BYTES: usize = 1 << 20;

/// What this task learned about itself once; a task never moves.
#[derive(Debug, Clone)]
struct Own {
    cluster: String,
    container: String,
    service: String,
    task_definition: String,
}

/// The runner's own ECS service.
#[derive(Debug)]
pub struct EcsDeployer {
    client: aws_sdk_ecs::Client,
    metadata_uri: String,
    own: OnceCell<Own>,
}

fn unavailable(
    what: &'static str,
    err: impl std::error::Error + Send + Sync + 'static,
) -> UpdateError {
    UpdateError::Unavailable {
        what,
        source: Box::new(err),
    }
}

/// Classifies an ECS error once: refusals are final, the rest may pass.
fn classify<
    E: aws_sdk_ecs::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
>(
    what: &'static str,
    err: aws_sdk_ecs::error::SdkError<E, aws_sdk_ecs::config::http::HttpResponse>,
) -> UpdateError {
    let code = err
        .as_service_error()
        .and_then(|e| e.code())
        .map(str::to_owned);
    let message = err
        .as_service_error()
        .and_then(|e| e.message())
        .unwrap_or_default()
        .to_owned();
    match code.as_deref() {
        Some(
            c @ ("AccessDeniedException"
            | "ClientException"
            | "InvalidParameterException"
            | "ClusterNotFoundException"
            | "ServiceNotFoundException"
            | "ServiceNotActiveException"
            | "UnsupportedFeatureException"),
        ) => UpdateError::Rejected(format!("ecs:{what}: {c}: {message}")),
        _ => unavailable(what, crate::error::AwsError::new(err)),
    }
}

/// Why the task metadata endpoint could not be read.
#[derive(Debug, thiserror::Error)]
#[error("task metadata endpoint {uri}: {problem}")]
pub struct MetadataError {
    uri: String,
    problem: String,
}

/// GETs `uri` (plain HTTP, as ECS serves it) and parses the JSON answer.
async fn get_json(uri: &str) -> Result<serde_json::Value, MetadataError> {
    let fail = |problem: String| MetadataError {
        uri: uri.to_owned(),
        problem,
    };
    let parsed: hyper::Uri = uri.parse().map_err(|e| fail(format!("not a URL: {e}")))?;
    if parsed.scheme_str() != Some("http") {
        return Err(fail("only http:// is served by ECS".to_owned()));
    }
    let host = parsed
        .host()
        .ok_or_else(|| fail("no host".to_owned()))?
        .to_owned();
    let port = parsed.port_u16().unwrap_or(80);
    let path = parsed
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let request = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| fail(format!("HTTP handshake: {e}")))?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, host.as_str())
            .body(http_body_util::Empty::new())
            .map_err(|e| fail(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail(format!("request: {e}")))?;
        if !response.status().is_success() {
            return Err(fail(format!("answered {}", response.status())));
        }
        let body = http_body_util::Limited::new(response.into_body(), METADATA_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| fail(format!("reading the answer: {e}")))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))
    };
    tokio::time::timeout(METADATA_TIMEOUT, request)
        .await
        .map_err(|_| fail("no answer within 5 s".to_owned()))?
}

fn field(value: &serde_json::Value, name: &str) -> Option<String> {
    value
        .get(name)
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl EcsDeployer {
    /// The deployer of the task whose metadata is at `metadata_uri`.
    pub fn new(client: aws_sdk_ecs::Client, metadata_uri: &str) -> Self {
        Self {
            client,
            metadata_uri: metadata_uri.trim_end_matches('/').to_owned(),
            own: OnceCell::new(),
        }
    }

    async fn own(&self) -> Result<&Own, UpdateError> {
        self.own.get_or_try_init(|| self.discover()).await
    }

    async fn discover(&self) -> Result<Own, UpdateError> {
        let metadata = |e: MetadataError| unavailable("read the task metadata", e);
        let container = get_json(&self.metadata_uri).await.map_err(metadata)?;
        let task = get_json(&format!("{}/task", self.metadata_uri))
            .await
            .map_err(metadata)?;
        let missing =
            |what: &str| UpdateError::Rejected(format!("the task metadata has no {what}"));
        let container = field(&container, "Name").ok_or_else(|| missing("container Name"))?;
        let cluster = field(&task, "Cluster").ok_or_else(|| missing("Cluster"))?;
        let task_arn = field(&task, "TaskARN").ok_or_else(|| missing("TaskARN"))?;

        let described = self
            .client
            .describe_tasks()
            .cluster(&cluster)
            .tasks(&task_arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTasks", e))?;
        let Some(found) = described.tasks().first() else {
            let reason = described
                .failures()
                .first()
                .and_then(|f| f.reason())
                .unwrap_or("not found");
            return Err(UpdateError::Rejected(format!(
                "ecs:DescribeTasks does not know task {task_arn} in cluster {cluster}: {reason}"
            )));
        };
        let group = found.group().unwrap_or_default();
        let Some(service) = group.strip_prefix("service:") else {
            return Err(UpdateError::NotAService(format!(
                "task {task_arn} is not part of an ECS service (its group is {group:?})"
            )));
        };
        let task_definition = found
            .task_definition_arn()
            .ok_or_else(|| missing("task definition"))?
            .to_owned();
        Ok(Own {
            cluster,
            container,
            service: service.to_owned(),
            task_definition,
        })
    }

    async fn task_definition(
        &self,
        arn: &str,
    ) -> Result<aws_sdk_ecs::types::TaskDefinition, UpdateError> {
        self.client
            .describe_task_definition()
            .task_definition(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTaskDefinition", e))?
            .task_definition
            .ok_or_else(|| UpdateError::Rejected(format!("task definition {arn} not described")))
    }
}

fn rollout(state: Option<&DeploymentRolloutState>) -> Option<Rollout> {
    match state? {
        DeploymentRolloutState::Completed => Some(Rollout::Completed),
        DeploymentRolloutState::Failed => Some(Rollout::Failed),
        DeploymentRolloutState::InProgress => Some(Rollout::InProgress),
        _ => None,
    }
}

#[async_trait]
impl Deployer for EcsDeployer {
    async fn service(&self) -> Result<Service, UpdateError> {
        let own = self.own().await?;
        let described = self
            .client
            .describe_services()
            .cluster(&own.cluster)
            .services(&own.service)
            .send()
            .await
            .map_err(|e| classify("DescribeServices", e))?;
        let found = described
            .services()
            .first()
            .filter(|s| s.status() == Some("ACTIVE"))
            .ok_or_else(|| {
                UpdateError::Rejected(format!(
                    "service {} in cluster {} is not active",
                    own.service, own.cluster
                ))
            })?;
        let task_definition = found
            .task_definition()
            .ok_or_else(|| {
                UpdateError::Rejected(format!("service {} has no task definition", own.service))
            })?
            .to_owned();
        let deployments = found
            .deployments()
            .iter()
            .map(|d| Deployment {
                task_definition: d.task_definition.clone().unwrap_or_default(),
                rollout: rollout(d.rollout_state.as_ref()),
            })
            .collect();
        let definition = self.task_definition(&task_definition).await?;
        let image = definition
            .container_definitions()
            .iter()
            .find(|c| c.name() == Some(own.container.as_str()))
            .and_then(|c| c.image())
            .ok_or_else(|| {
                UpdateError::Rejected(format!(
                    "task definition {task_definition} has no container {} with an image",
                    own.container
                ))
            })?
            .to_owned();
        Ok(Service {
            cluster: own.cluster.clone(),
            name: own.service.clone(),
            task_definition,
            own_task_definition: own.task_definition.clone(),
            container: own.container.clone(),
            image,
            deployments,
        })
    }

    async fn register(&self, service: &Service, image: &str) -> Result<String, UpdateError> {
        let current = self.task_definition(&service.task_definition).await?;
        let mut containers = current.container_definitions.unwrap_or_default();
        let ours = containers
            .iter_mut()
            .find(|c| c.name.as_deref() == Some(service.container.as_str()))
            .ok_or_else(|| {
                UpdateError::Rejected(format!(
                    "task definition {} has no container {}",
                    service.task_definition, service.container
                ))
            })?;
        ours.image = Some(image.to_owned());
        let registered = self
            .client
            .register_task_definition()
            .set_family(current.family)
            .set_task_role_arn(current.task_role_arn)
            .set_execution_role_arn(current.execution_role_arn)
            .set_network_mode(current.network_mode)
            .set_container_definitions(Some(containers))
            .set_volumes(current.volumes)
            .set_placement_constraints(current.placement_constraints)
            .set_requires_compatibilities(current.requires_compatibilities)
            .set_cpu(current.cpu)
            .set_memory(current.memory)
            .set_pid_mode(current.pid_mode)
            .set_ipc_mode(current.ipc_mode)
            .set_proxy_configuration(current.proxy_configuration)
            .set_ephemeral_storage(current.ephemeral_storage)
            .set_runtime_platform(current.runtime_platform)
            .set_enable_fault_injection(current.enable_fault_injection)
            .send()
            .await
            .map_err(|e| classify("RegisterTaskDefinition", e))?;
        registered
            .task_definition()
            .and_then(|t| t.task_definition_arn())
            .map(str::to_owned)
            .ok_or_else(|| {
                UpdateError::Rejected("RegisterTaskDefinition returned no ARN".to_owned())
            })
    }

    async fn deploy(&self, service: &Service, task_definition: &str) -> Result<(), UpdateError> {
        self.client
            .update_service()
            .cluster(&service.cluster)
            .service(&service.name)
            .task_definition(task_definition)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("UpdateService", e))
    }
}
