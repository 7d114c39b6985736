//! Malformed environments: specs the runner refuses with a failed status
//! naming the problem, environments damaged on the wire, malformed ids and
//! duplicates in a list, and malformed events. All share one world whose
//! environments exist before its runner starts, so the damage is in place
//! before the runner first sees them.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use prost::Message as _;
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, EnvironmentPhase as Phase, runner_request::Kind, runner_result};
use testkit::tamper::{Damage, Tamper};

use super::{Shared, changed, log_lines, logged, runner_request};
use crate::calls::call;
use crate::{Runner, World, http_get, id, settled};

/// Secrets in the specs' URLs: never in a status, an ack or the logs.
const SECRETS: [&str; 2] = ["ghp_CredInUrl1", "qs_Secret42"];

/// How a case's environment is made malformed.
enum Input {
    /// Created (unchecked) with this change to a valid request.
    Edit(Box<dyn Fn(&mut admin::CreateEnvironmentRequest)>),
    /// Created valid, damaged on its way to the runner.
    Damage(Damage),
}

/// One malformed environment and the failure its status must start with.
struct Case {
    input: Input,
    failure: String,
    /// Whether the runner refuses the spec itself (`runner_ack.code =
    /// INVALID_SPEC`), rather than failing to place a valid one.
    invalid_spec: bool,
}

fn invalid(input: Input, failure: impl Into<String>) -> Case {
    Case {
        input,
        failure: failure.into(),
        invalid_spec: true,
    }
}

fn edit(change: impl Fn(&mut admin::CreateEnvironmentRequest) + 'static) -> Input {
    Input::Edit(Box::new(change))
}

fn url(u: &'static str) -> Input {
    edit(move |r| r.content.as_mut().expect("content").repository_url = u.into())
}

fn branch(b: String) -> Input {
    edit(move |r| {
        r.content.as_mut().expect("content").revision =
            Some(pb::environment_content::Revision::Branch(b.clone()));
    })
}

fn commit(c: String) -> Input {
    edit(move |r| {
        r.content.as_mut().expect("content").revision =
            Some(pb::environment_content::Revision::Commit(c.clone()));
    })
}

fn class_id(c: String) -> Input {
    edit(move |r| r.environment_class_id = c.clone())
}

fn scheme(s: &str) -> String {
    format!("spec.content.repository_url: scheme \"{s}\" is not supported")
}

/// The classes the cases refer to.
struct Classes {
    /// Disabled.
    retired: String,
    /// Of a type no zone of the runner offers.
    far: String,
    /// Not a class at all.
    unknown: String,
}

fn make(classes: &Classes, case: impl FnOnce(&Classes) -> Case) -> Case {
    case(classes)
}

/// The table of cases, and one `#[test]` per case: `name => case;`.
macro_rules! spec_cases {
    ($($name:ident => $case:expr;)+) => {
        fn table(classes: &Classes) -> Vec<(&'static str, Case)> {
            vec![$((stringify!($name), make(classes, $case))),+]
        }

        $(
            #[test]
            fn $name() {
                check_spec(stringify!($name));
            }
        )+
    };
}

spec_cases! {
    unknown_class => |c| invalid(
        class_id(c.unknown.clone()),
        format!("environment class {} does not exist", c.unknown),
    );
    class_id_not_a_uuid => |_| invalid(
        class_id("small".into()),
        "spec.environment_class_id: is not a UUID",
    );
    empty_class_id => |_| invalid(
        class_id(String::new()),
        "spec.environment_class_id: must not be empty",
    );
    disabled_class => |c| invalid(
        class_id(c.retired.clone()),
        format!("environment class {} (Retired) is disabled", c.retired),
    );
    instance_type_no_zone_offers => |c| Case {
        input: class_id(c.far.clone()),
        failure: "instance type unoffered.large is not offered in any of the runner's availability zones (eu-west-1a, eu-west-1b, eu-west-1c)".into(),
        invalid_spec: false,
    };
    ftp_url => |_| invalid(url("ftp://example.com/repo"), scheme("ftp"));
    http_url => |_| invalid(url("http://github.com/acme/api"), scheme("http"));
    url_with_credentials => |_| invalid(
        url("https://x-access-token:ghp_CredInUrl1@github.com/acme/api"),
        "spec.content.repository_url: must not contain credentials",
    );
    url_with_a_query => |_| invalid(
        url("https://github.com/acme/api?access_token=qs_Secret42"),
        "spec.content.repository_url: must not have a query or fragment",
    );
    url_with_a_fragment => |_| invalid(
        url("https://github.com/acme/api#readme"),
        "spec.content.repository_url: must not have a query or fragment",
    );
    url_without_a_path => |_| invalid(
        url("https://github.com/"),
        "spec.content.repository_url: has no repository path",
    );
    scp_like_url => |_| invalid(
        url("git@github.com:acme/api.git"),
        "spec.content.repository_url: is not a valid URL",
    );
    empty_url => |_| invalid(url(""), "spec.content.repository_url: must not be empty");
    url_with_an_invalid_host => |_| invalid(
        url("https://-bad-.example/acme/api"),
        "spec.content.repository_url: \"-bad-.example\" is not a lowercase host name",
    );
    branch_with_dot_dot => |_| invalid(
        branch("a..b".into()),
        "spec.content.branch: \"a..b\" is not a valid git branch name",
    );
    branch_with_a_control_character => |_| invalid(
        branch("main\u{7}".into()),
        "spec.content.branch: must not contain control characters",
    );
    branch_with_a_space => |_| invalid(
        branch("my branch".into()),
        "spec.content.branch: \"my branch\" is not a valid git branch name",
    );
    empty_branch => |_| invalid(branch(String::new()), "spec.content.branch: must not be empty");
    branch_like_an_option => |_| invalid(
        branch("--upload-pack=x".into()),
        "spec.content.branch: \"--upload-pack=x\" is not a valid git branch name",
    );
    branch_of_300_bytes => |_| invalid(
        branch("b".repeat(300)),
        "spec.content.branch: is 300 bytes long, the limit is 255",
    );
    short_commit => |_| invalid(
        commit("abc123".into()),
        "spec.content.commit: is not a full commit id",
    );
    commit_not_hexadecimal => |_| invalid(
        commit("g".repeat(40)),
        "spec.content.commit: is not a full commit id",
    );
    // Damaged on the wire, where the reference control plane cannot.
    unknown_desired_phase => |_| invalid(
        Input::Damage(Damage::DesiredPhase(99)),
        "spec.desired_phase: must be RUNNING, STOPPED or DELETED",
    );
    desired_phase_that_is_not_a_desired_phase => |_| invalid(
        Input::Damage(Damage::DesiredPhase(Phase::Creating as i32)),
        "spec.desired_phase: must be RUNNING, STOPPED or DELETED",
    );
    no_content => |_| invalid(
        Input::Damage(Damage::NoContent),
        "spec.content.repository_url: must not be empty",
    );
    no_metadata => |_| invalid(
        Input::Damage(Damage::NoMetadata),
        "metadata.creator: must not be empty",
    );
    url_with_a_tab => |_| invalid(
        Input::Damage(Damage::RepositoryUrl("https://github.com/acme/api\t.git")),
        "spec.content.repository_url: must not contain control characters",
    );
    url_with_a_newline => |_| invalid(
        Input::Damage(Damage::RepositoryUrl("https://github.com/acme/api\nHost: evil.example")),
        "spec.content.repository_url: must not contain control characters",
    );
}

/// A case's environment, created.
struct Created {
    id: String,
    failure: String,
    invalid_spec: bool,
}

/// The runner behind the tampering proxy, every case's environment, one
/// without a spec, malformed ids in every list page, and two good
/// environments, the first listed twice.
pub(crate) struct SpecsWorld {
    world: World,
    tamper: Tamper,
    runner: Runner,
    cases: HashMap<&'static str, Created>,
    no_spec: String,
    good: Vec<String>,
}

fn shared() -> &'static Shared<SpecsWorld> {
    static WORLD: OnceLock<Shared<SpecsWorld>> = OnceLock::new();
    Shared::get(&WORLD, SpecsWorld::start)
}

impl SpecsWorld {
    async fn start() -> Self {
        crate::logs::capture();
        let mut world = World::new().await;
        let tamper = Tamper::start(&world.url).await.expect("start the proxy");
        world.url = tamper.url().to_owned();
        let mut admin = world.admin.clone();
        let new_class = |name: &str, instance_type: &str| admin::CreateEnvironmentClassRequest {
            runner_id: world.runner_id.clone(),
            display_name: name.into(),
            instance_type: instance_type.into(),
            disk_gib: 30,
        };
        let retired = admin
            .create_environment_class(new_class("Retired", "m5.large"))
            .await
            .expect("class")
            .into_inner()
            .id;
        admin
            .set_environment_class_enabled(admin::SetEnvironmentClassEnabledRequest {
                environment_class_id: retired.clone(),
                enabled: false,
            })
            .await
            .expect("disable");
        // Offered by no zone of the runner's subnets: the zone mismatch.
        let far = admin
            .create_environment_class(new_class("Far", "unoffered.large"))
            .await
            .expect("class")
            .into_inner()
            .id;
        let classes = Classes {
            retired,
            far,
            unknown: uuid::Uuid::new_v4().to_string(),
        };
        let mut cases = HashMap::new();
        for (name, case) in table(&classes) {
            let id = match case.input {
                Input::Edit(change) => {
                    let mut request = world.create_request(&world.class_id);
                    request.unchecked = true;
                    change(&mut request);
                    world.create(request).await
                }
                Input::Damage(damage) => {
                    let id = world.create_env().await;
                    tamper.damage(&id, damage);
                    id
                }
            };
            cases.insert(
                name,
                Created {
                    id,
                    failure: case.failure,
                    invalid_spec: case.invalid_spec,
                },
            );
        }
        let no_spec = world.create_env().await;
        tamper.damage(&no_spec, Damage::NoSpec);
        // Malformed ids in a list: no status can name them.
        tamper.append_to_lists(
            [
                "not-a-uuid".to_owned(),
                String::new(),
                "8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a6".to_owned(),
                "x".repeat(10_000),
            ]
            .into_iter()
            .map(|id| {
                pb::RunnerEnvironment {
                    id,
                    ..Default::default()
                }
                .encode_to_vec()
            }),
        );
        // The same id twice in a page, the older copy (deletion) first.
        let good = vec![world.create_env().await, world.create_env().await];
        tamper.duplicate(&good[0]);

        let runner = world.start_runner().await;
        // Answered through the watch stream: it is open, so events reach it.
        call(&world, Kind::Ping(pb::Ping {})).await;
        Self {
            world,
            tamper,
            runner,
            cases,
            no_spec,
            good,
        }
    }

    /// Waits until every case failed and the good environments run.
    async fn settled(&self) -> Vec<admin::Environment> {
        self.world
            .wait_for(
                "every bad spec failed and the good ones run",
                Duration::from_secs(60),
                |envs| {
                    let failed = self
                        .cases
                        .values()
                        .filter(|case| {
                            envs.iter().any(|e| {
                                id(e) == case.id
                                    && e.status
                                        .as_ref()
                                        .is_some_and(|s| !s.failure_message.is_empty())
                            })
                        })
                        .count();
                    let running = envs
                        .iter()
                        .filter(|e| self.good.contains(&id(e)) && settled(e, Phase::Running))
                        .count();
                    failed == self.cases.len() && running == self.good.len()
                },
            )
            .await
    }

    fn launches_of(&self, env: &str) -> usize {
        self.world
            .compute
            .launch_requests()
            .iter()
            .filter(|r| r.environment.to_string() == env)
            .count()
    }
}

/// The case's environment gets a status naming its problem, launches
/// nothing, and no secret shows.
fn check_spec(name: &'static str) {
    shared().run(async |w| {
        let case = &w.cases[name];
        let envs = w
            .world
            .wait_for(
                &format!("{name}: a failed status"),
                Duration::from_secs(60),
                |envs| {
                    envs.iter().any(|e| {
                        id(e) == case.id
                            && e.status
                                .as_ref()
                                .is_some_and(|s| !s.failure_message.is_empty())
                    })
                },
            )
            .await;
        let env = envs.iter().find(|e| id(e) == case.id).expect("listed");
        let status = env.status.as_ref().expect("status");
        assert!(
            status.failure_message.starts_with(&case.failure),
            "{name}: {:?} does not name the problem ({:?})",
            status.failure_message,
            case.failure
        );
        let ack = status.runner_ack.as_ref().expect("ack");
        let code = if case.invalid_spec {
            pb::RunnerAckCode::InvalidSpec
        } else {
            pb::RunnerAckCode::Ok
        };
        assert_eq!(ack.code, code as i32, "{name}");
        assert!(status.machine.is_none(), "{name}: a machine");
        assert_eq!(w.launches_of(&case.id), 0, "{name}: launched");
        let logs = log_lines();
        for secret in SECRETS {
            assert!(!status.failure_message.contains(secret), "{name}");
            assert!(!ack.message.contains(secret), "{name}");
            assert!(!logs.contains(secret), "{name}: {secret} in the logs");
        }
    });
}

#[test]
fn an_environment_without_a_spec_is_skipped_and_gets_no_status() {
    shared().run(async |w| {
        logged(
            "the environment without a spec was skipped",
            &[
                "skipping a malformed environment",
                &format!("environment {}: spec: must be set", w.no_spec),
            ],
        )
        .await;
        // Listed, so handled by the time the good environments run.
        let envs = w.settled().await;
        let env = envs.iter().find(|e| id(e) == w.no_spec).expect("listed");
        assert!(
            env.status.is_none(),
            "an environment without a spec gets no status: {env:?}"
        );
        assert_eq!(w.launches_of(&w.no_spec), 0);
    });
}

#[test]
fn a_listed_environment_whose_id_is_not_a_uuid_is_skipped() {
    shared().run(async |w| {
        logged(
            "an environment with a malformed id was skipped",
            &[
                "skipping a malformed environment",
                "environment_id: is not a UUID",
            ],
        )
        .await;
        assert!(w.tamper.pages_with_appended() > 0);
    });
}

#[test]
fn a_listed_environment_with_an_empty_id_is_skipped() {
    shared().run(async |w| {
        logged(
            "an environment with an empty id was skipped",
            &[
                "skipping a malformed environment",
                "environment_id: must not be empty",
            ],
        )
        .await;
        assert!(w.tamper.pages_with_appended() > 0);
    });
}

#[test]
fn an_environment_listed_twice_keeps_its_newer_spec() {
    shared().run(async |w| {
        // The older copy asks for deletion; the newer spec wins.
        let envs = w.settled().await;
        let duplicated = envs.iter().find(|e| id(e) == w.good[0]).expect("listed");
        assert!(settled(duplicated, Phase::Running), "{duplicated:?}");
        assert_eq!(w.launches_of(&w.good[0]), 1);
        assert_eq!(w.world.compute.calls("terminate"), 0, "nothing torn down");
    });
}

#[test]
fn the_runner_keeps_serving_beside_the_bad_input() {
    shared().run(async |w| {
        w.settled().await;
        let fresh = w.world.create_env().await;
        w.world
            .wait_for(
                "the new environment RUNNING",
                Duration::from_secs(60),
                |envs| {
                    envs.iter()
                        .any(|e| id(e) == fresh && settled(e, Phase::Running))
                },
            )
            .await;
        match call(&w.world, Kind::Ping(pb::Ping {})).await {
            admin::call_runner_response::Outcome::Result(pb::RunnerResult {
                kind: Some(runner_result::Kind::Ping(p)),
            }) => assert_eq!(p.version, env!("CARGO_PKG_VERSION")),
            other => panic!("ping: unexpected {other:?}"),
        }
        let (code, _) = http_get(w.runner.health, "/readyz").await;
        assert_eq!(code, 200, "still ready");
        for good in w.good.iter().chain([&fresh]) {
            assert_eq!(w.launches_of(good), 1, "one launch per good environment");
        }
        for case in w.cases.values() {
            assert_eq!(w.launches_of(&case.id), 0, "none for bad input");
        }
        assert_eq!(w.world.compute.calls("terminate"), 0, "nothing torn down");
    });
}

/// Pushes an event with a malformed id into the stream: the runner logs it
/// by its request id and ignores it.
fn check_malformed_event(environment_id: &str, problem: &str) {
    shared().run(async |w| {
        let request_id = uuid::Uuid::new_v4().to_string();
        w.tamper
            .inject(runner_request(&request_id, changed(environment_id)).encode_to_vec());
        logged(
            "an event with a malformed id was ignored",
            &[
                "ignoring a malformed environment_changed",
                &request_id,
                problem,
            ],
        )
        .await;
    });
}

#[test]
fn an_event_whose_id_is_not_a_uuid_is_ignored() {
    check_malformed_event("not-a-uuid", "environment_id: is not a UUID");
}

#[test]
fn an_event_with_an_empty_id_is_ignored() {
    check_malformed_event("", "environment_id: must not be empty");
}

#[test]
fn an_event_with_an_id_of_100_000_bytes_is_ignored() {
    check_malformed_event(&"x".repeat(100_000), "environment_id: is not a UUID");
}

#[test]
fn an_event_for_an_environment_the_control_plane_does_not_know_is_looked_up_and_forgotten() {
    shared().run(async |w| {
        // The control plane answers the lookup with NOT_FOUND.
        let stranger = uuid::Uuid::new_v4().to_string();
        w.tamper.inject(
            runner_request(&uuid::Uuid::new_v4().to_string(), changed(&stranger)).encode_to_vec(),
        );
        logged(
            "an unknown environment was looked up and forgotten",
            &[
                "the control plane no longer knows the environment",
                &stranger,
            ],
        )
        .await;
        assert_eq!(w.launches_of(&stranger), 0);
    });
}

#[test]
fn a_call_of_a_kind_this_runner_does_not_know_is_answered_unimplemented() {
    shared().run(async |w| {
        // A request of a kind from a newer control plane.
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut bytes = pb::RunnerRequest {
            request_id: request_id.clone(),
            kind: None,
        }
        .encode_to_vec();
        prost::encoding::string::encode(99, &"a future call".to_owned(), &mut bytes);
        w.tamper.inject(bytes);
        // The control plane knows no such call, so it says NOT_FOUND to the
        // runner's UNIMPLEMENTED answer.
        logged(
            "a call of an unknown kind was answered",
            &["could not answer a call", &request_id, "NotFound"],
        )
        .await;
    });
}
