//! The admin API behind `runnerctl`: records in, events out.
//!
//! Each mutation updates the state under its lock, then sends the events it
//! produced to the runner's streams.

use std::sync::Arc;
use std::time::Duration;

use runner_core::validate;
use runner_proto::admin::v1::{self as admin, admin_service_server::AdminService};
use runner_proto::pb::{self, runner_request};
use tonic::{Request, Response, Status};

use crate::ControlPlane;
use crate::state::{
    EnvironmentRecord, HostTokenRecord, RunnerRecord, invalid, runner_phase, timestamp,
};

/// Serves `AdminService`.
#[derive(Debug, Clone)]
pub struct AdminApi(pub(crate) Arc<ControlPlane>);

/// How long a call to a runner waits by default.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a call to a runner may wait.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(300);

fn call_timeout(ms: u32) -> Duration {
    if ms == 0 {
        DEFAULT_CALL_TIMEOUT
    } else {
        Duration::from_millis(u64::from(ms)).min(MAX_CALL_TIMEOUT)
    }
}

impl AdminApi {
    fn runner_view(&self, record: &RunnerRecord) -> admin::Runner {
        let now = self.0.clock.now();
        admin::Runner {
            id: record.id.to_string(),
            name: record.name.clone(),
            region: record.region.clone(),
            phase: runner_phase(record, now, self.0.settings.inactive_after) as i32,
            version: record.version.clone(),
            degraded_message: record.degraded_message.clone(),
            last_seen: record.last_seen.map(timestamp),
            public_key: record.public_key.map(|k| k.to_vec()).unwrap_or_default(),
            auto_update: record.auto_update,
            open_streams: u32::try_from(self.0.hub.open_streams(record.id)).unwrap_or(u32::MAX),
            system_details: record.system_details.clone(),
            capabilities: record.capabilities.clone(),
            created_at: Some(timestamp(record.created_at)),
        }
    }

    /// Sends a call that stores a user's token for (principal, host): the
    /// pair is listed to the runner from before the call leaves (the runner
    /// may store the token any moment) and taken back if the call fails.
    async fn stored_call(
        &self,
        runner_id: uuid::Uuid,
        principal: &str,
        host: &str,
        kind: runner_request::Kind,
        timeout_ms: u32,
    ) -> Result<(String, pb::send_response_request::Outcome), Status> {
        let pending =
            self.0
                .state()
                .begin_host_token(runner_id, principal, host, self.0.clock.now());
        let called = self
            .0
            .hub
            .call(runner_id, kind, call_timeout(timeout_ms))
            .await;
        let stored = matches!(
            called,
            Ok((_, pb::send_response_request::Outcome::Result(_)))
        );
        if !stored && pending {
            self.0.state().abort_host_token(runner_id, principal, host);
        }
        called
    }

    fn notify(&self, events: impl IntoIterator<Item = crate::state::Event>) {
        for (runner_id, kind) in events {
            self.0.hub.notify(runner_id, kind);
        }
    }
}

fn environment_view(record: EnvironmentRecord) -> admin::Environment {
    admin::Environment {
        runner_id: record.runner_id.to_string(),
        environment: Some(record.environment),
        status: record.status,
        status_updated_at: record.status_updated_at.map(timestamp),
    }
}

fn runner_id(field: &str, value: &str) -> Result<uuid::Uuid, Status> {
    validate::uuid(field, value).map_err(invalid)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_runner(
        &self,
        request: Request<admin::CreateRunnerRequest>,
    ) -> Result<Response<admin::CreateRunnerResponse>, Status> {
        let req = request.into_inner();
        let now = self.0.clock.now();
        let (record, exchange_token, expires_at) = self.0.state().create_runner(
            &req.name,
            &req.region,
            now,
            self.0.settings.exchange_token_ttl,
        )?;
        let quick_create_url = self.0.settings.quick_create_url(&record, &exchange_token);
        tracing::info!(runner.id = %record.id, name = %record.name, "runner created");
        Ok(Response::new(admin::CreateRunnerResponse {
            runner: Some(self.runner_view(&record)),
            exchange_token,
            exchange_token_expires_at: Some(timestamp(expires_at)),
            quick_create_url,
        }))
    }

    async fn get_runner(
        &self,
        request: Request<admin::GetRunnerRequest>,
    ) -> Result<Response<admin::Runner>, Status> {
        let id = runner_id("runner_id", &request.get_ref().runner_id)?;
        let record = self.0.state().runner(id)?.clone();
        Ok(Response::new(self.runner_view(&record)))
    }

    async fn list_runners(
        &self,
        _request: Request<admin::ListRunnersRequest>,
    ) -> Result<Response<admin::ListRunnersResponse>, Status> {
        let records: Vec<RunnerRecord> = self.0.state().runners().cloned().collect();
        Ok(Response::new(admin::ListRunnersResponse {
            runners: records.iter().map(|r| self.runner_view(r)).collect(),
        }))
    }

    async fn set_runner_auto_update(
        &self,
        request: Request<admin::SetRunnerAutoUpdateRequest>,
    ) -> Result<Response<admin::Runner>, Status> {
        let req = request.into_inner();
        let id = runner_id("runner_id", &req.runner_id)?;
        let record = self.0.state().set_auto_update(id, req.auto_update)?;
        Ok(Response::new(self.runner_view(&record)))
    }

    async fn create_environment_class(
        &self,
        request: Request<admin::CreateEnvironmentClassRequest>,
    ) -> Result<Response<pb::EnvironmentClass>, Status> {
        let class = self.0.state().create_class(request.get_ref())?;
        Ok(Response::new(class))
    }

    async fn list_environment_classes(
        &self,
        request: Request<admin::ListEnvironmentClassesRequest>,
    ) -> Result<Response<admin::ListEnvironmentClassesResponse>, Status> {
        let id = runner_id("runner_id", &request.get_ref().runner_id)?;
        let state = self.0.state();
        state.runner(id)?;
        Ok(Response::new(admin::ListEnvironmentClassesResponse {
            environment_classes: state.classes_of(id),
        }))
    }

    async fn set_environment_class_enabled(
        &self,
        request: Request<admin::SetEnvironmentClassEnabledRequest>,
    ) -> Result<Response<pb::EnvironmentClass>, Status> {
        let req = request.get_ref();
        let (class, events) = self
            .0
            .state()
            .set_class_enabled(&req.environment_class_id, req.enabled)?;
        self.notify(events);
        Ok(Response::new(class))
    }

    async fn create_environment(
        &self,
        request: Request<admin::CreateEnvironmentRequest>,
    ) -> Result<Response<admin::Environment>, Status> {
        let now = self.0.clock.now();
        let (record, event) = self.0.state().create_environment(request.get_ref(), now)?;
        self.notify([event]);
        Ok(Response::new(environment_view(record)))
    }

    async fn get_environment(
        &self,
        request: Request<admin::GetEnvironmentRequest>,
    ) -> Result<Response<admin::Environment>, Status> {
        let record = self
            .0
            .state()
            .environment(&request.get_ref().environment_id)?
            .clone();
        Ok(Response::new(environment_view(record)))
    }

    async fn list_environments(
        &self,
        request: Request<admin::ListEnvironmentsRequest>,
    ) -> Result<Response<admin::ListEnvironmentsResponse>, Status> {
        let filter = match request.get_ref().runner_id.as_str() {
            "" => None,
            id => Some(runner_id("runner_id", id)?),
        };
        let records = self.0.state().environments(filter);
        Ok(Response::new(admin::ListEnvironmentsResponse {
            environments: records.into_iter().map(environment_view).collect(),
        }))
    }

    async fn set_environment_desired_phase(
        &self,
        request: Request<admin::SetEnvironmentDesiredPhaseRequest>,
    ) -> Result<Response<admin::Environment>, Status> {
        let req = request.get_ref();
        let (record, event) = self
            .0
            .state()
            .set_desired_phase(&req.environment_id, req.desired_phase)?;
        self.notify(event);
        Ok(Response::new(environment_view(record)))
    }

    async fn create_scm_integration(
        &self,
        request: Request<admin::CreateScmIntegrationRequest>,
    ) -> Result<Response<pb::ScmIntegration>, Status> {
        let (integration, event) = self.0.state().create_integration(request.get_ref())?;
        self.notify([event]);
        Ok(Response::new(integration))
    }

    async fn update_scm_integration(
        &self,
        request: Request<admin::UpdateScmIntegrationRequest>,
    ) -> Result<Response<pb::ScmIntegration>, Status> {
        let (integration, event) = self.0.state().update_integration(request.get_ref())?;
        self.notify([event]);
        Ok(Response::new(integration))
    }

    async fn delete_scm_integration(
        &self,
        request: Request<admin::DeleteScmIntegrationRequest>,
    ) -> Result<Response<admin::DeleteScmIntegrationResponse>, Status> {
        let event = self
            .0
            .state()
            .delete_integration(&request.get_ref().integration_id)?;
        self.notify([event]);
        Ok(Response::new(admin::DeleteScmIntegrationResponse {}))
    }

    async fn list_scm_integrations(
        &self,
        request: Request<admin::ListScmIntegrationsRequest>,
    ) -> Result<Response<admin::ListScmIntegrationsResponse>, Status> {
        let id = runner_id("runner_id", &request.get_ref().runner_id)?;
        let state = self.0.state();
        state.runner(id)?;
        Ok(Response::new(admin::ListScmIntegrationsResponse {
            integrations: state.integrations_of(id),
        }))
    }

    async fn add_host_token(
        &self,
        request: Request<admin::AddHostTokenRequest>,
    ) -> Result<Response<admin::AddHostTokenResponse>, Status> {
        let req = request.into_inner();
        let runner_id = self.0.state().check_host_token(&req)?;
        let call = runner_request::Kind::StoreHostToken(pb::StoreHostToken {
            principal: req.principal.clone(),
            host: req.host.clone(),
            sealed_token: req.sealed_token.clone(),
        });
        let (_, outcome) = self
            .stored_call(runner_id, &req.principal, &req.host, call, req.timeout_ms)
            .await?;
        let username = match outcome {
            pb::send_response_request::Outcome::Result(pb::RunnerResult {
                kind: Some(pb::runner_result::Kind::StoreHostToken(result)),
            }) => result.username,
            pb::send_response_request::Outcome::Result(_) => String::new(),
            pb::send_response_request::Outcome::Error(error) => {
                return Err(Status::new(
                    tonic::Code::from_i32(error.code),
                    error.message,
                ));
            }
        };
        let added_at = self.0.clock.now();
        let record = HostTokenRecord {
            added_at,
            sealed_token: req.sealed_token,
            username: username.clone(),
            pending: false,
        };
        self.0
            .state()
            .store_host_token(runner_id, &req.principal, &req.host, record);
        Ok(Response::new(admin::AddHostTokenResponse {
            token: Some(admin::HostToken {
                runner_id: runner_id.to_string(),
                principal: req.principal,
                host: req.host,
                added_at: Some(timestamp(added_at)),
                username,
            }),
        }))
    }

    async fn delete_host_token(
        &self,
        request: Request<admin::DeleteHostTokenRequest>,
    ) -> Result<Response<admin::DeleteHostTokenResponse>, Status> {
        let event = self.0.state().delete_host_token(request.get_ref())?;
        self.notify([event]);
        Ok(Response::new(admin::DeleteHostTokenResponse {}))
    }

    async fn list_host_tokens(
        &self,
        request: Request<admin::ListHostTokensRequest>,
    ) -> Result<Response<admin::ListHostTokensResponse>, Status> {
        let id = runner_id("runner_id", &request.get_ref().runner_id)?;
        let state = self.0.state();
        state.runner(id)?;
        let tokens = state
            .host_tokens_of(id)
            .into_iter()
            .map(|(principal, host, t)| admin::HostToken {
                runner_id: id.to_string(),
                principal,
                host,
                added_at: Some(timestamp(t.added_at)),
                username: t.username,
            })
            .collect();
        Ok(Response::new(admin::ListHostTokensResponse { tokens }))
    }

    async fn call_runner(
        &self,
        request: Request<admin::CallRunnerRequest>,
    ) -> Result<Response<admin::CallRunnerResponse>, Status> {
        let req = request.into_inner();
        let id = runner_id("runner_id", &req.runner_id)?;
        self.0.state().runner(id)?;
        let kind = req
            .request
            .and_then(|r| r.kind)
            .ok_or_else(|| Status::invalid_argument("request.kind: must be set"))?;
        let (request_id, outcome) = match kind {
            runner_request::Kind::ExchangeOauthCode(x) => {
                let (principal, host) = (x.principal.clone(), x.host.clone());
                let kind = runner_request::Kind::ExchangeOauthCode(x);
                let called = self
                    .stored_call(id, &principal, &host, kind, req.timeout_ms)
                    .await?;
                if let pb::send_response_request::Outcome::Result(_) = &called.1 {
                    let record = HostTokenRecord {
                        added_at: self.0.clock.now(),
                        sealed_token: Vec::new(),
                        username: String::new(),
                        pending: false,
                    };
                    self.0
                        .state()
                        .store_host_token(id, &principal, &host, record);
                }
                called
            }
            kind => {
                self.0
                    .hub
                    .call(id, kind, call_timeout(req.timeout_ms))
                    .await?
            }
        };
        Ok(Response::new(admin::CallRunnerResponse {
            request_id,
            outcome: Some(match outcome {
                pb::send_response_request::Outcome::Result(r) => {
                    admin::call_runner_response::Outcome::Result(r)
                }
                pb::send_response_request::Outcome::Error(e) => {
                    admin::call_runner_response::Outcome::Error(e)
                }
            }),
        }))
    }

    async fn close_runner_streams(
        &self,
        request: Request<admin::CloseRunnerStreamsRequest>,
    ) -> Result<Response<admin::CloseRunnerStreamsResponse>, Status> {
        let id = runner_id("runner_id", &request.get_ref().runner_id)?;
        self.0.state().runner(id)?;
        let closed = self.0.hub.close_all(id);
        Ok(Response::new(admin::CloseRunnerStreamsResponse {
            closed: u32::try_from(closed).unwrap_or(u32::MAX),
        }))
    }

    async fn publish_release(
        &self,
        request: Request<admin::PublishReleaseRequest>,
    ) -> Result<Response<admin::PublishReleaseResponse>, Status> {
        let req = request.get_ref();
        self.0.state().publish_release(&req.version, &req.image)?;
        Ok(Response::new(admin::PublishReleaseResponse {}))
    }
}
