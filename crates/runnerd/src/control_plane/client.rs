//! The control-plane client: every RPC the runner makes (the token exchange,
//! signup, heartbeat and runner status, the watch stream and its answers,
//! environments, classes and statuses, SCM integrations, host tokens and
//! releases), each but the stream bounded by the configured timeout, each
//! failure classified once ([`Error::classify`]). It is the core's
//! [`ControlPlane`] and [`Releases`].

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use runner_core::model::{Environment, EnvironmentClass, EnvironmentId, Status};
use runner_core::traits::{ControlPlane, ControlPlaneError};
use runner_core::update::{Release, Releases, UpdateError};
use runner_proto::pb::{
    self, identity_service_client::IdentityServiceClient,
    runner_service_client::RunnerServiceClient, send_response_request,
};
use secrecy::{ExposeSecret as _, SecretString};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request};

use super::channel::{Auth, BadToken, ChannelError, channel};
use super::error::{Error, Operation};
use super::wire::{class_from_proto, environment_from_proto, status_to_proto};
use crate::config::ControlPlaneConfig;

/// Items asked for per page of a list.
const PAGE_SIZE: u32 = 500;

/// The runner's client of the control plane; cheap to clone (one channel).
#[derive(Clone)]
pub struct Client {
    runner: RunnerServiceClient<InterceptedService<Channel, Auth>>,
    identity: IdentityServiceClient<Channel>,
    auth: Auth,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the control plane `config` names; it connects on first
    /// use and sends no bearer token until [`Client::authenticate`].
    pub fn new(config: &ControlPlaneConfig) -> Result<Self, ChannelError> {
        let channel = channel(config)?;
        let auth = Auth::default();
        Ok(Self {
            runner: RunnerServiceClient::with_interceptor(channel.clone(), auth.clone()),
            identity: IdentityServiceClient::new(channel),
            auth,
            timeout: config.timeout,
        })
    }

    /// Sends `token` as the bearer of every call from now on.
    pub fn authenticate(&self, token: &SecretString) -> Result<(), BadToken> {
        self.auth.set(token)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// `ExchangeToken`: trades the single-use exchange token, for the key
    /// pair whose public half is `public_key`.
    pub async fn exchange_token(
        &self,
        exchange_token: &SecretString,
        public_key: Vec<u8>,
    ) -> Result<pb::ExchangeTokenResponse, Error> {
        let request = self.request(pb::ExchangeTokenRequest {
            exchange_token: exchange_token.expose_secret().to_owned(),
            public_key,
        });
        self.identity
            .clone()
            .exchange_token(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::classify(Operation::ExchangeToken, status))
    }

    /// `Signup`.
    pub async fn signup(&self, request: pb::SignupRequest) -> Result<(), Error> {
        self.runner
            .clone()
            .signup(self.request(request))
            .await
            .map(drop)
            .map_err(|status| Error::classify(Operation::Signup, status))
    }

    /// `MarkActive`: the heartbeat.
    pub async fn mark_active(&self) -> Result<(), Error> {
        self.runner
            .clone()
            .mark_active(self.request(pb::MarkActiveRequest {}))
            .await
            .map(drop)
            .map_err(|status| Error::classify(Operation::MarkActive, status))
    }

    /// `UpdateRunnerStatus`.
    pub async fn update_runner_status(
        &self,
        request: pb::UpdateRunnerStatusRequest,
    ) -> Result<(), Error> {
        self.runner
            .clone()
            .update_runner_status(self.request(request))
            .await
            .map(drop)
            .map_err(|status| Error::classify(Operation::UpdateRunnerStatus, status))
    }

    /// `WatchRequests`: opens the stream (no timeout: it lives until either
    /// side ends it).
    pub async fn watch_requests(&self) -> Result<tonic::Streaming<pb::RunnerRequest>, Error> {
        self.runner
            .clone()
            .watch_requests(pb::WatchRequestsRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::classify(Operation::WatchRequests, status))
    }

    /// `SendResponse`: answers the call `request_id` of the stream.
    pub async fn send_response(
        &self,
        request_id: String,
        outcome: send_response_request::Outcome,
    ) -> Result<(), Error> {
        let request = self.request(pb::SendResponseRequest {
            request_id,
            outcome: Some(outcome),
        });
        self.runner
            .clone()
            .send_response(request)
            .await
            .map(drop)
            .map_err(|status| Error::classify(Operation::SendResponse, status))
    }

    /// `ListScmIntegrations`: every SCM integration of this runner (all
    /// pages, or an error).
    pub async fn list_integrations(&self) -> Result<Vec<pb::ScmIntegration>, Error> {
        all_pages(Operation::ListScmIntegrations, |page| {
            let mut client = self.runner.clone();
            let request = self.request(pb::ListScmIntegrationsRequest { page: Some(page) });
            async move {
                let response = client.list_scm_integrations(request).await?.into_inner();
                Ok((response.integrations, response.page))
            }
        })
        .await
    }

    /// `ListHostTokens`: every (principal, host) whose token the runner may
    /// keep.
    pub async fn list_host_tokens(&self) -> Result<BTreeSet<(String, String)>, Error> {
        let refs = all_pages(Operation::ListHostTokens, |page| {
            let mut client = self.runner.clone();
            let request = self.request(pb::ListHostTokensRequest { page: Some(page) });
            async move {
                let response = client.list_host_tokens(request).await?.into_inner();
                Ok((response.host_tokens, response.page))
            }
        })
        .await?;
        Ok(refs.into_iter().map(|r| (r.principal, r.host)).collect())
    }

    /// `GetLatestVersion`: the newest release for a runner running
    /// `running`; `None` when nothing was released.
    pub async fn latest_version(&self, running: &str) -> Result<Option<Release>, Error> {
        let request = self.request(pb::GetLatestVersionRequest {
            current_version: running.to_owned(),
        });
        let response = self
            .runner
            .clone()
            .get_latest_version(request)
            .await
            .map_err(|status| Error::classify(Operation::GetLatestVersion, status))?
            .into_inner();
        Ok((!response.version.is_empty()).then_some(Release {
            version: response.version,
            image: response.image,
            auto_update: response.auto_update,
        }))
    }
}

/// Every item of a paged list: all pages, or the first error.
async fn all_pages<T, F, Fut>(operation: Operation, mut fetch: F) -> Result<Vec<T>, Error>
where
    F: FnMut(pb::PageRequest) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<pb::PageResponse>), tonic::Status>>,
{
    let mut page_token = String::new();
    let mut out = Vec::new();
    loop {
        let (items, page) = fetch(pb::PageRequest {
            page_size: PAGE_SIZE,
            page_token,
        })
        .await
        .map_err(|status| Error::classify(operation, status))?;
        out.extend(items);
        page_token = page.map(|p| p.next_page_token).unwrap_or_default();
        if page_token.is_empty() {
            return Ok(out);
        }
    }
}

#[async_trait]
impl ControlPlane for Client {
    async fn list_environments(&self) -> Result<Vec<Environment>, ControlPlaneError> {
        let environments = all_pages(Operation::ListEnvironments, |page| {
            let mut client = self.runner.clone();
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
            .runner
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
                    .map_err(|problem| ControlPlaneError::Rejected(problem.into()))
            }
            // The control plane does not know it (any more).
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(Error::classify(Operation::GetEnvironment, status).into()),
        }
    }

    async fn list_classes(&self) -> Result<Vec<EnvironmentClass>, ControlPlaneError> {
        let classes = all_pages(Operation::ListEnvironmentClasses, |page| {
            let mut client = self.runner.clone();
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
        self.runner
            .clone()
            .update_environment_status(self.request(pb::UpdateEnvironmentStatusRequest {
                environment_id: id.to_string(),
                status: Some(status_to_proto(status_version, status)),
            }))
            .await
            .map(drop)
            .map_err(|status| Error::classify(Operation::UpdateEnvironmentStatus, status).into())
    }
}

#[async_trait]
impl Releases for Client {
    async fn latest(&self, running: &str) -> Result<Option<Release>, UpdateError> {
        self.latest_version(running)
            .await
            .map_err(|err| UpdateError::ControlPlane(Box::new(err)))
    }
}
