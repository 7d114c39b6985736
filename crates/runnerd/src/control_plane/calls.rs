//! The calls the control plane sends over the watch stream, answered: `ping`,
//! `validate_environment_class`, and the SCM calls (which [`Scm`] serves).
//! Each is answered in the background through `SendResponse`, at most
//! [`CONCURRENT`] at once; shutdown waits for the answers in flight.

use std::sync::Arc;
use std::time::Duration;

use runner_core::model::Subnet;
use runner_core::traits::Compute;
use runner_core::validate;
use runner_proto::pb::{self, runner_request::Kind, runner_result};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

use super::Client;
use crate::health::chain;
use crate::scm::{CallError, Scm};
use crate::session::VERSION;

/// Calls answered at once.
pub const CONCURRENT: usize = 16;

/// Answers the control plane's calls.
pub struct Calls {
    client: Client,
    scm: Arc<Scm>,
    compute: Arc<dyn Compute>,
    instance_types: validate::AllowedInstanceTypes,
    /// The subnets' zones, `None` until they are known.
    zones: watch::Sender<Option<Vec<String>>>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("zones", &self.zones)
            .finish_non_exhaustive()
    }
}

impl Calls {
    /// Answers through `client`; SCM calls go to `scm`, a class's instance
    /// type is checked against `instance_types` and `compute`'s offerings.
    pub fn new(
        client: Client,
        scm: Arc<Scm>,
        compute: Arc<dyn Compute>,
        instance_types: validate::AllowedInstanceTypes,
    ) -> Self {
        Self {
            client,
            scm,
            compute,
            instance_types,
            zones: watch::channel(None).0,
            permits: Arc::new(Semaphore::new(CONCURRENT)),
            tracker: TaskTracker::new(),
        }
    }

    /// The runner's subnets, once they are known: a class offered in none
    /// of their availability zones is refused. A class validated before
    /// then waits for them.
    pub fn set_subnets(&self, subnets: &[Subnet]) {
        let mut zones: Vec<String> = subnets
            .iter()
            .map(|s| s.availability_zone.clone())
            .collect();
        zones.sort();
        zones.dedup();
        self.zones.send_replace(Some(zones));
    }

    /// Answers `call` (`None`: of a kind this runner does not know) in the
    /// background; `shutdown` drops it if it has not been answered yet.
    pub fn answer_later(
        self: &Arc<Self>,
        request_id: String,
        call: Option<Kind>,
        shutdown: &CancellationToken,
    ) {
        let calls = self.clone();
        let shutdown = shutdown.clone();
        self.tracker.spawn(async move {
            let Ok(_permit) = calls.permits.clone().acquire_owned().await else {
                return;
            };
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = calls.answer(call) => outcome,
            };
            if let Err(err) = calls.client.send_response(request_id.clone(), outcome).await {
                tracing::warn!(request.id = %request_id, code = ?err.code(), error = %chain(&err), "could not answer a call");
            }
        });
    }

    /// Takes no more calls and waits, at most `within`, for the answers in
    /// flight.
    pub async fn drain(&self, within: Duration) {
        self.tracker.close();
        let _ = tokio::time::timeout(within, self.tracker.wait()).await;
    }

    async fn answer(&self, call: Option<Kind>) -> pb::send_response_request::Outcome {
        use pb::send_response_request::Outcome;
        let error = |code: Code, message: String| {
            Outcome::Error(pb::RunnerError {
                code: code as i32,
                message,
            })
        };
        match call {
            Some(Kind::Ping(_)) => Outcome::Result(pb::RunnerResult {
                kind: Some(runner_result::Kind::Ping(pb::PingResult {
                    version: VERSION.to_owned(),
                })),
            }),
            Some(Kind::ValidateEnvironmentClass(request)) => match request.environment_class {
                None => error(
                    Code::InvalidArgument,
                    "environment_class: must be set".into(),
                ),
                Some(class) => Outcome::Result(pb::RunnerResult {
                    kind: Some(runner_result::Kind::ValidateEnvironmentClass(
                        self.validate_class(&class).await,
                    )),
                }),
            },
            Some(Kind::CheckAuthenticationForHost(request)) => respond(
                self.scm
                    .check_authentication(&request.principal, &request.host)
                    .await
                    .map(runner_result::Kind::CheckAuthenticationForHost),
            ),
            Some(Kind::ParseContext(request)) => respond(
                self.scm
                    .parse_context(&request.principal, &request.url)
                    .await
                    .map(runner_result::Kind::ParseContext),
            ),
            Some(Kind::StoreHostToken(request)) => respond(
                self.scm
                    .store_pat(&request.principal, &request.host, &request.sealed_token)
                    .await
                    .map(|username| {
                        runner_result::Kind::StoreHostToken(pb::StoreHostTokenResult { username })
                    }),
            ),
            Some(Kind::ExchangeOauthCode(request)) => {
                respond(self.scm.exchange_oauth(request).await.map(|expires_at| {
                    runner_result::Kind::ExchangeOauthCode(pb::ExchangeOauthCodeResult {
                        expires_at: expires_at.map(prost_types::Timestamp::from),
                    })
                }))
            }
            Some(
                other @ (Kind::EnvironmentChanged(_)
                | Kind::ScmIntegrationChanged(_)
                | Kind::HostTokenDeleted(_)),
            ) => error(
                Code::InvalidArgument,
                format!("{} is an event, not a call", kind_name(&other)),
            ),
            None => error(
                Code::Unimplemented,
                "this runner does not know this kind of call".into(),
            ),
        }
    }

    async fn validate_class(
        &self,
        class: &pb::EnvironmentClass,
    ) -> pb::ValidateEnvironmentClassResult {
        let mut problems = Vec::new();
        if let Err(e) = validate::text(
            "display_name",
            &class.display_name,
            validate::MAX_DISPLAY_NAME_LEN,
        ) {
            problems.push(e.to_string());
        }
        if let Err(e) = validate::disk_gib("disk_gib", i64::from(class.disk_gib)) {
            problems.push(e.to_string());
        }
        let mut availability_zones = Vec::new();
        // The allowlist before the offerings: a refused type costs no AWS call.
        match validate::instance_type("instance_type", &class.instance_type).and_then(|()| {
            self.instance_types
                .check("instance_type", &class.instance_type)
        }) {
            Err(e) => problems.push(e.to_string()),
            Ok(()) => match self.compute.offered_zones(&class.instance_type).await {
                Ok(zones) => {
                    let ours = self.own_zones().await;
                    availability_zones = zones.into_iter().filter(|z| ours.contains(z)).collect();
                    if availability_zones.is_empty() {
                        problems.push(format!(
                            "instance_type: {} is not offered in any of the runner's availability zones ({})",
                            class.instance_type,
                            ours.join(", ")
                        ));
                    }
                }
                Err(err) => problems.push(format!(
                    "instance_type: could not check the offerings: {}",
                    chain(&err)
                )),
            },
        }
        pb::ValidateEnvironmentClassResult {
            problems,
            availability_zones,
        }
    }

    /// The subnets' zones, once known.
    async fn own_zones(&self) -> Vec<String> {
        let mut zones = self.zones.subscribe();
        match zones.wait_for(Option::is_some).await {
            Ok(known) => known.clone().unwrap_or_default(),
            // Unreachable: `self` holds the sender.
            Err(_) => Vec::new(),
        }
    }
}

fn respond(result: Result<runner_result::Kind, CallError>) -> pb::send_response_request::Outcome {
    use pb::send_response_request::Outcome;
    match result {
        Ok(kind) => Outcome::Result(pb::RunnerResult { kind: Some(kind) }),
        Err(err) => Outcome::Error(pb::RunnerError {
            code: err.code as i32,
            message: err
                .message
                .chars()
                .take(validate::MAX_MESSAGE_LEN)
                .collect(),
        }),
    }
}

/// The name of a request's kind, for metrics and messages.
pub fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::EnvironmentChanged(_) => "environment_changed",
        Kind::ScmIntegrationChanged(_) => "scm_integration_changed",
        Kind::HostTokenDeleted(_) => "host_token_deleted",
        Kind::Ping(_) => "ping",
        Kind::CheckAuthenticationForHost(_) => "check_authentication_for_host",
        Kind::ParseContext(_) => "parse_context",
        Kind::ValidateEnvironmentClass(_) => "validate_environment_class",
        Kind::ExchangeOauthCode(_) => "exchange_oauth_code",
        Kind::StoreHostToken(_) => "store_host_token",
    }
}
