//! The runner side of the protocol: `IdentityService` and `RunnerService`.
//!
//! Every `RunnerService` call is authenticated by its bearer token first; the
//! token decides which runner's records the call may see.

use std::sync::Arc;

use runner_proto::pb::{
    self, identity_service_server::IdentityService, runner_service_server::RunnerService,
};
use tonic::{Request, Response, Status};

use crate::ControlPlane;
use crate::hub::WatchStream;
use crate::state::invalid;

/// Serves `IdentityService` and `RunnerService`.
#[derive(Debug, Clone)]
pub struct RunnerApi(pub(crate) Arc<ControlPlane>);

fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <access token>"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <access token>\""))
}

impl RunnerApi {
    fn authenticate<T>(&self, request: &Request<T>) -> Result<uuid::Uuid, Status> {
        let token = bearer(request)?;
        let now = self.0.clock.now();
        self.0.state().authenticate(token, now)
    }
}

#[tonic::async_trait]
impl IdentityService for RunnerApi {
    async fn exchange_token(
        &self,
        request: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::ExchangeTokenResponse>, Status> {
        let now = self.0.clock.now();
        let (runner_id, access_token) = self.0.state().exchange(
            &request.get_ref().exchange_token,
            &request.get_ref().public_key,
            now,
        )?;
        tracing::info!(runner.id = %runner_id, "exchange token traded for an access token");
        Ok(Response::new(pb::ExchangeTokenResponse {
            access_token,
            expires_at: None,
            runner_id: runner_id.to_string(),
        }))
    }
}

#[tonic::async_trait]
impl RunnerService for RunnerApi {
    async fn signup(
        &self,
        request: Request<pb::SignupRequest>,
    ) -> Result<Response<pb::SignupResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        self.0.state().signup(runner_id, request.get_ref())?;
        tracing::info!(runner.id = %runner_id, version = %request.get_ref().version, "runner signed up");
        Ok(Response::new(pb::SignupResponse {
            runner_id: runner_id.to_string(),
        }))
    }

    async fn mark_active(
        &self,
        request: Request<pb::MarkActiveRequest>,
    ) -> Result<Response<pb::MarkActiveResponse>, Status> {
        self.authenticate(&request)?;
        Ok(Response::new(pb::MarkActiveResponse {}))
    }

    async fn update_runner_status(
        &self,
        request: Request<pb::UpdateRunnerStatusRequest>,
    ) -> Result<Response<pb::UpdateRunnerStatusResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        self.0
            .state()
            .update_runner_status(runner_id, request.get_ref())?;
        Ok(Response::new(pb::UpdateRunnerStatusResponse {}))
    }

    async fn list_environments(
        &self,
        request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        if self.0.list_fault() == crate::ListFault::Unavailable {
            self.0
                .lists_refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(Status::unavailable(
                "environment lists are failing (injected)",
            ));
        }
        let (mut environments, mut page) = self
            .0
            .state()
            .list_runner_environments(runner_id, request.get_ref().page.as_ref())?;
        match self.0.list_fault() {
            crate::ListFault::None | crate::ListFault::Unavailable => {}
            crate::ListFault::Empty => {
                environments.clear();
                page = pb::PageResponse::default();
            }
            crate::ListFault::Partial => {
                let mut keep = false;
                environments.retain(|_| {
                    keep = !keep;
                    keep
                });
            }
        }
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments,
            page: Some(page),
        }))
    }

    async fn get_environment(
        &self,
        request: Request<pb::GetEnvironmentRequest>,
    ) -> Result<Response<pb::GetEnvironmentResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        let environment = self
            .0
            .state()
            .runner_environment(runner_id, &request.get_ref().environment_id)?;
        Ok(Response::new(pb::GetEnvironmentResponse {
            environment: Some(environment),
        }))
    }

    async fn update_environment_status(
        &self,
        request: Request<pb::UpdateEnvironmentStatusRequest>,
    ) -> Result<Response<pb::UpdateEnvironmentStatusResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        let now = self.0.clock.now();
        let result = self
            .0
            .state()
            .update_environment_status(runner_id, request.get_ref(), now);
        match &result {
            Ok(event) => {
                self.0
                    .statuses_accepted
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Some((runner, kind)) = event.clone() {
                    self.0.hub.notify(runner, kind);
                }
            }
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().starts_with("status.status_version") =>
            {
                self.0
                    .statuses_stale
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Err(_) => {}
        }
        result?;
        Ok(Response::new(pb::UpdateEnvironmentStatusResponse {}))
    }

    type WatchRequestsStream = WatchStream;

    async fn watch_requests(
        &self,
        request: Request<pb::WatchRequestsRequest>,
    ) -> Result<Response<Self::WatchRequestsStream>, Status> {
        let runner_id = self.authenticate(&request)?;
        tracing::debug!(runner.id = %runner_id, "watch stream opened");
        Ok(Response::new(self.0.hub.open(runner_id)))
    }

    async fn send_response(
        &self,
        request: Request<pb::SendResponseRequest>,
    ) -> Result<Response<pb::SendResponseResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        let req = request.into_inner();
        runner_core::validate::uuid("request_id", &req.request_id).map_err(invalid)?;
        let outcome = req
            .outcome
            .ok_or_else(|| Status::invalid_argument("outcome: must be set (result or error)"))?;
        if let pb::send_response_request::Outcome::Error(error) = &outcome {
            runner_core::validate::optional_text(
                "error.message",
                &error.message,
                runner_core::validate::MAX_MESSAGE_LEN,
            )
            .map_err(invalid)?;
            if !(1..=16).contains(&error.code) {
                return Err(Status::invalid_argument(format!(
                    "error.code: {} is not a gRPC error code",
                    error.code
                )));
            }
        }
        self.0.hub.respond(runner_id, &req.request_id, outcome)?;
        Ok(Response::new(pb::SendResponseResponse {}))
    }

    async fn list_environment_classes(
        &self,
        request: Request<pb::ListEnvironmentClassesRequest>,
    ) -> Result<Response<pb::ListEnvironmentClassesResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        let (environment_classes, page) = self
            .0
            .state()
            .list_classes(runner_id, request.get_ref().page.as_ref())?;
        Ok(Response::new(pb::ListEnvironmentClassesResponse {
            environment_classes,
            page: Some(page),
        }))
    }

    async fn list_scm_integrations(
        &self,
        request: Request<pb::ListScmIntegrationsRequest>,
    ) -> Result<Response<pb::ListScmIntegrationsResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        let (integrations, page) = self
            .0
            .state()
            .list_integrations(runner_id, request.get_ref().page.as_ref())?;
        Ok(Response::new(pb::ListScmIntegrationsResponse {
            integrations,
            page: Some(page),
        }))
    }

    async fn list_host_tokens(
        &self,
        request: Request<pb::ListHostTokensRequest>,
    ) -> Result<Response<pb::ListHostTokensResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        let (host_tokens, page) = self
            .0
            .state()
            .list_host_token_refs(runner_id, request.get_ref().page.as_ref())?;
        Ok(Response::new(pb::ListHostTokensResponse {
            host_tokens,
            page: Some(page),
        }))
    }

    async fn get_latest_version(
        &self,
        request: Request<pb::GetLatestVersionRequest>,
    ) -> Result<Response<pb::GetLatestVersionResponse>, Status> {
        let runner_id = self.authenticate(&request)?;
        let response = self
            .0
            .state()
            .latest_version(runner_id, &request.get_ref().current_version)?;
        Ok(Response::new(response))
    }
}
