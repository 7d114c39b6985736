//! A malformed integration list revokes nothing: when `ListScmIntegrations`
//! does not decode, or lists an integration with a malformed field, a runner
//! with a stored token deletes neither it nor the checkout secret holding
//! it, keeps serving and logs the problem; once the list is whole again, a
//! real revocation still deletes both.

use std::time::Duration;

use prost::Message as _;
use runner_core::model::EnvironmentId;
use runner_core::scm::{AuthSource, ScmKind, TokenKey};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase, runner_request::Kind, runner_result};
use testkit::scm::FakeScm;
use testkit::tamper::{LIST_SCM_INTEGRATIONS, Tamper, with_invalid_utf8};

use super::{log_lines_with, logged_times, runner_request};
use crate::calls::call;
use crate::scm::{Integration, add_pat, create_integration, repository_on, wait_until, world_with};
use crate::{Runner, World, http_get, id, settled};

const PAT: &str = "glpat-Lq7wEr4Ty1Ui8Op3As6D";

/// A runner behind the tampering proxy with alice's PAT for the fake
/// provider, and an environment checked out with it.
struct Setup {
    world: World,
    tamper: Tamper,
    runner: Runner,
    host: String,
    integration: String,
    env: String,
    _fake: FakeScm,
}

impl Setup {
    async fn start() -> Self {
        crate::logs::capture();
        let fake = FakeScm::start().await;
        let host = fake.host();
        fake.add_token(ScmKind::GitLab, AuthSource::Pat, PAT, "alice-gl");
        let mut world = world_with(&fake).await;
        let tamper = Tamper::start(&world.url).await.expect("start the proxy");
        world.url = tamper.url().to_owned();
        let runner = world.start_runner().await;
        let integration =
            create_integration(&world, Integration::pat(pb::ScmKind::Gitlab, &host)).await;
        add_pat(&world, "alice", &host, PAT).await.expect("stored");
        let env = world.create(repository_on(&world, &host)).await;
        world
            .wait_for("RUNNING", Duration::from_secs(30), |envs| {
                envs.iter()
                    .any(|e| id(e) == env && settled(e, Phase::Running))
            })
            .await;
        let setup = Self {
            world,
            tamper,
            runner,
            host,
            integration,
            env,
            _fake: fake,
        };
        setup.assert_nothing_revoked().await;
        setup
    }

    fn env_id(&self) -> EnvironmentId {
        EnvironmentId(uuid::Uuid::parse_str(&self.env).expect("uuid"))
    }

    /// The token and the checkout secret holding it are still stored.
    async fn assert_nothing_revoked(&self) {
        assert_eq!(
            self.world.tokens.keys(),
            [TokenKey {
                principal: "alice".into(),
                host: self.host.clone(),
                source: AuthSource::Pat,
            }],
            "the token is kept"
        );
        assert!(
            self.world
                .environment_secrets
                .value(self.env_id())
                .is_some(),
            "the checkout secret is kept"
        );
    }

    /// Answers `ListScmIntegrations` with `damage` done to the integration
    /// of the setup's host, then encoded by `encode`.
    fn damage_integration(
        &self,
        damage: impl Fn(&mut pb::ScmIntegration) + Send + Sync + 'static,
        encode: impl Fn(&pb::ListScmIntegrationsResponse) -> Vec<u8> + Send + Sync + 'static,
    ) {
        let host = self.host.clone();
        self.tamper.rewrite(LIST_SCM_INTEGRATIONS, move |body| {
            let mut page = pb::ListScmIntegrationsResponse::decode(body.as_slice())
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            for integration in &mut page.integrations {
                if integration.host == host {
                    damage(integration);
                }
            }
            Ok(encode(&page))
        });
    }

    /// Tells the runner an integration changed: it lists them all again.
    fn integration_changed(&self) {
        self.tamper.inject(
            runner_request(
                &uuid::Uuid::new_v4().to_string(),
                Kind::ScmIntegrationChanged(pb::ScmIntegrationChanged {
                    integration_id: self.integration.clone(),
                }),
            )
            .encode_to_vec(),
        );
    }

    /// The runner answers, its environment runs, and it is ready.
    async fn assert_serving(&self) {
        match call(&self.world, Kind::Ping(pb::Ping {})).await {
            admin::call_runner_response::Outcome::Result(pb::RunnerResult {
                kind: Some(runner_result::Kind::Ping(_)),
            }) => {}
            other => panic!("ping: unexpected {other:?}"),
        }
        let envs = self.world.environments().await;
        let env = envs.iter().find(|e| id(e) == self.env).expect("listed");
        assert!(settled(env, Phase::Running), "{env:?}");
        assert_eq!(self.world.compute.calls("terminate"), 0);
        let (code, _) = http_get(self.runner.health, "/readyz").await;
        assert_eq!(code, 200, "still ready");
    }

    /// With the list whole again, deleting the integration deletes the
    /// token, after the checkout secret holding it.
    async fn assert_revocation_works(self) {
        self.tamper.stop_rewriting(LIST_SCM_INTEGRATIONS);
        self.world
            .admin
            .clone()
            .delete_scm_integration(admin::DeleteScmIntegrationRequest {
                integration_id: self.integration.clone(),
            })
            .await
            .expect("delete the integration");
        wait_until("the token to be deleted", async || {
            self.world.tokens.keys().is_empty()
        })
        .await;
        assert_eq!(
            self.world.environment_secrets.value(self.env_id()),
            None,
            "the checkout secret holding the revoked token went first"
        );
        self.runner.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integration_list_that_does_not_decode_revokes_nothing() {
    let s = Setup::start().await;
    s.damage_integration(
        |integration| integration.host = "@@BADUTF8@@".into(),
        |page| with_invalid_utf8(page, "@@BADUTF8@@"),
    );
    let problem = [
        "cannot sync the SCM integrations; retrying",
        "ScmIntegration.host",
    ];
    let before = log_lines_with(&problem);
    s.integration_changed();
    // Failed twice: the first failed sync is over, and is retried.
    logged_times("the undecodable list", before + 2, &problem).await;
    assert!(s.tamper.rewritten(LIST_SCM_INTEGRATIONS) >= 2);
    s.assert_nothing_revoked().await;
    s.assert_serving().await;
    s.assert_revocation_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integration_with_a_malformed_field_revokes_nothing() {
    let s = Setup::start().await;
    s.damage_integration(
        |integration| integration.kind = 99,
        pb::ListScmIntegrationsResponse::encode_to_vec,
    );
    let skipped = format!("integration {}: unknown kind", s.integration);
    let problem = ["skipping a malformed SCM integration", skipped.as_str()];
    s.integration_changed();
    logged_times("the malformed integration", 1, &problem).await;
    // A second sync starts only once the first is over.
    s.integration_changed();
    logged_times("the malformed integration again", 2, &problem).await;
    s.assert_nothing_revoked().await;
    s.assert_serving().await;
    s.assert_revocation_works().await;
}
