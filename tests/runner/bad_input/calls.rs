//! Calls the control plane relays to the runner (validate_environment_class,
//! parse_context, store_host_token, exchange_oauth_code) and calls the
//! control plane itself refuses: each malformed one gets its exact gRPC code
//! and a message naming the problem, never a secret.

use std::sync::OnceLock;

use runner_core::scm::{AuthSource, ScmKind};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, runner_request::Kind, runner_result};
use testkit::scm::FakeScm;
use testkit::tamper::{Raw, with_invalid_utf8, with_nested_groups};
use tonic::Code;
use tonic::codegen::http;

use super::{Expect, Shared, expect, random_bytes, runner_request};
use crate::calls::call;
use crate::scm::{Integration, add_pat, create_integration, public_key, world_with};
use crate::{Runner, World};

/// A host with an integration: GitLab, PATs on, an OAuth client secret that
/// is not sealed to the runner's key.
const HOST: &str = "git.example.com";
/// A host with an integration that allows neither PATs nor OAuth.
const CLOSED: &str = "closed.example.com";
/// alice's PAT for the fake provider, stored at set-up.
const PROVIDER_PAT: &str = "ghp_alicePR0";

/// A runner with three integrations ([`HOST`], [`CLOSED`] and the fake
/// provider's, with alice's PAT and a pull request whose branch git cannot
/// check out).
pub(crate) struct CallsWorld {
    world: World,
    /// The runner's public key, to seal for it.
    key: Vec<u8>,
    /// The fake provider's host.
    provider: String,
    _runner: Runner,
    _fake: FakeScm,
}

fn shared() -> &'static Shared<CallsWorld> {
    static WORLD: OnceLock<Shared<CallsWorld>> = OnceLock::new();
    Shared::get(&WORLD, CallsWorld::start)
}

impl CallsWorld {
    async fn start() -> Self {
        crate::logs::capture();
        let fake = FakeScm::start().await;
        let world = world_with(&fake).await;
        let runner = world.start_runner().await;
        let key = public_key(&world).await;
        let mut admin = world.admin.clone();
        admin
            .create_scm_integration(admin::CreateScmIntegrationRequest {
                runner_id: world.runner_id.clone(),
                kind: pb::ScmKind::Gitlab as i32,
                host: HOST.into(),
                oauth: Some(pb::OAuthApp {
                    client_id: "cid".into(),
                    // Not sealed to the runner's key.
                    sealed_client_secret: random_bytes(80),
                }),
                pat_enabled: true,
                api_base_url: String::new(),
                oauth_base_url: String::new(),
            })
            .await
            .expect("integration");
        admin
            .create_scm_integration(admin::CreateScmIntegrationRequest {
                runner_id: world.runner_id.clone(),
                kind: pb::ScmKind::Gitlab as i32,
                host: CLOSED.into(),
                oauth: None,
                pat_enabled: false,
                api_base_url: String::new(),
                oauth_base_url: String::new(),
            })
            .await
            .expect("integration");
        let provider = fake.host();
        fake.add_token(ScmKind::GitHub, AuthSource::Pat, PROVIDER_PAT, "alice");
        fake.add_pull_request("acme", "api", 5, "bad..branch");
        create_integration(&world, Integration::pat(pb::ScmKind::Github, &provider)).await;
        // Waits until the runner lists the last integration, so all of them.
        add_pat(&world, "alice", &provider, PROVIDER_PAT)
            .await
            .expect("PAT stored");
        Self {
            world,
            key,
            provider,
            _runner: runner,
            _fake: fake,
        }
    }

    fn seal_for(&self, principal: &str, host: &str, plain: &[u8]) -> Vec<u8> {
        control_plane::cli::seal(
            &self.key,
            control_plane::cli::pat_binding(principal, host),
            plain,
        )
        .expect("seal")
    }

    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        self.seal_for("alice", HOST, plain)
    }

    fn seal_raw(&self, plain: &[u8]) -> Vec<u8> {
        control_plane::cli::seal_raw(&self.key, plain).expect("seal")
    }

    fn admin(&self) -> admin::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
        self.world.admin.clone()
    }

    fn call_runner(&self, kind: Kind) -> admin::CallRunnerRequest {
        admin::CallRunnerRequest {
            runner_id: self.world.runner_id.clone(),
            request: Some(runner_request("", kind)),
            timeout_ms: 5000,
        }
    }

    /// Calls `/admin.v1.AdminService/CallRunner` with a body of raw bytes.
    async fn raw_call_runner(&self, body: Vec<u8>) -> tonic::Status {
        let channel = self
            .world
            .cp
            .as_ref()
            .expect("running")
            .channel()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        match grpc
            .unary(
                tonic::Request::new(body),
                http::uri::PathAndQuery::from_static("/admin.v1.AdminService/CallRunner"),
                Raw,
            )
            .await
        {
            Ok(_) => panic!("the control plane accepted a body it cannot decode"),
            Err(status) => status,
        }
    }
}

/// Sends the call `case` builds through the admin CallRunner API and checks
/// the answer.
fn check_call(name: &'static str, case: impl FnOnce(&CallsWorld) -> (Kind, Expect)) {
    shared().run(async move |w| {
        let (kind, expected) = case(w);
        match call(&w.world, kind).await {
            admin::call_runner_response::Outcome::Error(e) => {
                expected.check(name, Code::from(e.code), &e.message);
            }
            admin::call_runner_response::Outcome::Result(pb::RunnerResult {
                kind: Some(runner_result::Kind::ValidateEnvironmentClass(v)),
            }) => expected.check(name, Code::Ok, &v.problems.join("; ")),
            other => panic!("{name}: unexpected {other:?}"),
        }
    });
}

/// [`check_call`], and no token was stored but the one of set-up.
fn check_token(name: &'static str, case: impl FnOnce(&CallsWorld) -> (Kind, Expect)) {
    check_call(name, case);
    shared().run(async |w| {
        let keys = w.world.tokens.keys();
        assert!(
            keys.iter().all(|k| k.host == w.provider),
            "{name}: a token was stored: {keys:?}"
        );
    });
}

/// Runs a call the control plane must refuse itself, and checks its error.
fn check_refused(
    name: &'static str,
    case: impl AsyncFnOnce(&'static CallsWorld) -> (tonic::Status, Expect),
) {
    shared().run(async move |w| {
        let (status, expected) = case(w).await;
        expected.check(name, status.code(), status.message());
    });
}

/// One `#[test]` per case: `name => case;`, checked by `check`.
macro_rules! cases {
    ($check:ident: $($name:ident => $case:expr;)+) => {
        $(
            #[test]
            fn $name() {
                $check(stringify!($name), $case);
            }
        )+
    };
}

fn class(display_name: &str, instance_type: &str, disk_gib: u32) -> Kind {
    Kind::ValidateEnvironmentClass(pb::ValidateEnvironmentClass {
        environment_class: Some(pb::EnvironmentClass {
            id: uuid::Uuid::new_v4().to_string(),
            display_name: display_name.into(),
            instance_type: instance_type.into(),
            disk_gib,
            enabled: true,
        }),
    })
}

fn parse(principal: &str, url: &str) -> Kind {
    Kind::ParseContext(pb::ParseContext {
        principal: principal.into(),
        url: url.into(),
    })
}

fn store(host: &str, sealed_token: Vec<u8>) -> Kind {
    Kind::StoreHostToken(pb::StoreHostToken {
        principal: "alice".into(),
        host: host.into(),
        sealed_token,
    })
}

fn exchange(host: &str, code: &str) -> Kind {
    Kind::ExchangeOauthCode(pb::ExchangeOauthCode {
        principal: "alice".into(),
        host: host.into(),
        code: code.into(),
        redirect_uri: "https://cp.example.com/oauth/callback".into(),
        code_verifier: String::new(),
    })
}

/// validate_environment_class: the problems name the field.
mod validate_class {
    use super::*;

    cases! { check_call:
        zero_disk => |_| (
            class("Zero", "m7i.large", 0),
            expect(Code::Ok, "disk_gib: 0 GiB is outside 8 to 16384 GiB"),
        );
        negative_disk_as_minus_one_on_the_wire => |_| (
            class("Negative", "m7i.large", u32::MAX),
            expect(Code::Ok, "disk_gib: 4294967295 GiB is outside 8 to 16384 GiB"),
        );
        huge_disk => |_| (
            class("Huge", "m7i.large", 16_385),
            expect(Code::Ok, "disk_gib: 16385 GiB is outside 8 to 16384 GiB"),
        );
        instance_type_in_capitals => |_| (
            class("Caps", "M7I.LARGE", 50),
            expect(Code::Ok, "instance_type: \"M7I.LARGE\" is not an EC2 instance type"),
        );
        empty_instance_type => |_| (
            class("Empty", "", 50),
            expect(Code::Ok, "instance_type: must not be empty"),
        );
        instance_type_no_zone_offers => |_| (
            class("Far", "unoffered.large", 50),
            expect(
                Code::Ok,
                "instance_type: unoffered.large is not offered in any of the runner's availability zones (eu-west-1a, eu-west-1b, eu-west-1c)",
            ),
        );
        display_name_with_a_control_character => |_| (
            class("Small\u{0}", "m7i.large", 50),
            expect(Code::Ok, "display_name: must not contain control characters"),
        );
        display_name_of_200_bytes => |_| (
            class(&"d".repeat(200), "m7i.large", 50),
            expect(Code::Ok, "display_name: is 200 bytes long, the limit is 128"),
        );
        no_class => |_| (
            Kind::ValidateEnvironmentClass(pb::ValidateEnvironmentClass {
                environment_class: None,
            }),
            expect(Code::InvalidArgument, "environment_class: must be set"),
        );
    }
}

/// parse_context: INVALID_ARGUMENT naming the URL's problem, or
/// FAILED_PRECONDITION for what the provider said.
mod parse_context {
    use super::*;

    cases! { check_call:
        host_without_an_integration => |_| (
            parse("alice", "https://git.unknown.example/acme/api"),
            expect(Code::InvalidArgument, "url: unknown SCM host git.unknown.example"),
        );
        unknown_github_form => |_| (
            parse("alice", "https://github.com/acme/api/wiki/Home?token=ghq_Query77"),
            expect(Code::InvalidArgument, "url: unknown GitHub URL form \"/acme/api/wiki/Home\"")
                .hiding("ghq_Query77"),
        );
        percent_encoding_that_is_not_utf8 => |_| (
            parse("alice", "https://github.com/acme/%FF%FE"),
            expect(Code::InvalidArgument, "is not valid UTF-8 once percent-decoded"),
        );
        encoded_slash_in_a_name => |_| (
            parse("alice", "https://github.com/ac%2Fme/api"),
            expect(Code::InvalidArgument, "has an encoded slash in \"ac/me\""),
        );
        github_path_of_1000_segments => |_| (
            parse("alice", &format!("https://github.com/acme/api/{}", "x/".repeat(1000))),
            expect(Code::InvalidArgument, "url: unknown GitHub URL form"),
        );
        gitlab_group_1000_levels_deep => |_| (
            parse("alice", &format!("https://gitlab.com/{}api", "g/".repeat(1000))),
            expect(
                Code::InvalidArgument,
                "nests 1000 groups; GitLab allows a group and at most 20 subgroups",
            ),
        );
        branch_of_1000_segments => |_| (
            parse(
                "alice",
                &format!(
                    "https://github.com/acme/api/tree/{}",
                    "b/".repeat(1000).trim_end_matches('/')
                ),
            ),
            expect(
                Code::InvalidArgument,
                "names a branch git cannot check out: branch: is 1999 bytes long, the limit is 255",
            ),
        );
        branch_git_cannot_check_out => |_| (
            parse("alice", "https://github.com/acme/api/tree/a..b"),
            expect(
                Code::InvalidArgument,
                "names a branch git cannot check out: branch: \"a..b\" is not a valid git branch name",
            ),
        );
        commit_that_is_not_hexadecimal => |_| (
            parse("alice", "https://github.com/acme/api/commit/xyz"),
            expect(Code::InvalidArgument, "\"xyz\" is not a full commit id"),
        );
        pull_request_number_that_overflows => |_| (
            parse("alice", "https://github.com/acme/api/pull/99999999999999999999999"),
            expect(Code::InvalidArgument, "is not a valid pull request number"),
        );
        azure_devops_version_naming_neither_branch_nor_commit => |_| (
            parse("alice", "https://dev.azure.com/acme/web/_git/ui?version=GXmain"),
            expect(Code::InvalidArgument, "names neither a branch (GB…) nor a commit (GC…)"),
        );
        url_with_credentials => |_| (
            parse("alice", "https://bob:ghp_UrlSecret9@github.com/acme/api"),
            expect(Code::InvalidArgument, "url: the URL must not contain credentials")
                .hiding("ghp_UrlSecret9"),
        );
        not_a_url => |_| (
            parse("alice", "acme/api"),
            expect(Code::InvalidArgument, "url: not a valid URL"),
        );
        empty_url => |_| (
            parse("alice", ""),
            expect(Code::InvalidArgument, "url: must not be empty"),
        );
        url_of_3000_bytes => |_| (
            parse("alice", &format!("https://github.com/acme/{}", "a".repeat(3000))),
            expect(Code::InvalidArgument, "url: is 3024 bytes long, the limit is 2048"),
        );
        empty_principal => |_| (
            parse("", "https://github.com/acme/api"),
            expect(Code::InvalidArgument, "principal: must not be empty"),
        );
        principal_with_a_control_character => |_| (
            parse("al\u{1b}ice", "https://github.com/acme/api"),
            expect(Code::InvalidArgument, "principal: must not contain control characters"),
        );
        principal_of_900_kib_through_the_stream_under_the_1_mib_limit => |_| (
            parse(&"p".repeat(900 * 1024), "https://github.com/acme/api"),
            expect(Code::InvalidArgument, "principal: is 921600 bytes long, the limit is 256"),
        );
        pull_request_branch_git_cannot_check_out => |w| (
            parse("alice", &format!("https://{}/acme/api/pull/5", w.provider)),
            expect(
                Code::FailedPrecondition,
                format!(
                    "{} named a pull request branch git cannot check out: \"bad..branch\" is not a valid git branch name",
                    w.provider
                ),
            )
            .hiding(PROVIDER_PAT),
        );
    }
}

/// store_host_token and exchange_oauth_code: refused, nothing stored, no
/// secret in the answer or the logs.
mod host_tokens {
    use super::*;

    const UNBOUND: &str = "sealed_token: is not a sealed secret of format version 1";
    const NO_OPEN: &str = "sealed_token: does not open with this runner's key";

    cases! { check_token:
        random_bytes_as_a_box => |_| (
            store(HOST, random_bytes(100)),
            expect(Code::InvalidArgument, NO_OPEN),
        );
        empty_box => |_| (
            store(HOST, Vec::new()),
            expect(Code::InvalidArgument, NO_OPEN),
        );
        box_shorter_than_its_key_and_tag => |_| (
            store(HOST, random_bytes(47)),
            expect(Code::InvalidArgument, NO_OPEN),
        );
        truncated_box => |w| {
            let sealed = w.seal(b"glpat-Truncated1");
            (
                store(HOST, sealed[..sealed.len() - 3].to_vec()),
                expect(Code::InvalidArgument, NO_OPEN).hiding("glpat-Truncated1"),
            )
        };
        tampered_box => |w| {
            let mut flipped = w.seal(b"glpat-Flipped22");
            flipped[50] ^= 0x10;
            (
                store(HOST, flipped),
                expect(Code::InvalidArgument, NO_OPEN).hiding("glpat-Flipped22"),
            )
        };
        box_sealed_to_another_key => |_| {
            let other_key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
            let to_other = control_plane::cli::seal(
                other_key.public_key().as_bytes(),
                control_plane::cli::pat_binding("alice", HOST),
                b"glpat-Other333",
            )
            .expect("seal");
            (
                store(HOST, to_other),
                expect(Code::InvalidArgument, NO_OPEN).hiding("glpat-Other333"),
            )
        };
        plaintext_that_is_not_utf8 => |w| (
            store(HOST, w.seal_raw(&[0x67, 0x6c, 0xff, 0xfe, 0x41])),
            expect(Code::InvalidArgument, UNBOUND),
        );
        bare_token_bound_to_nothing => |w| (
            store(HOST, w.seal_raw(b"glpat-Bare4444")),
            expect(Code::InvalidArgument, UNBOUND).hiding("glpat-Bare4444"),
        );
        another_users_box_replayed_as_alices => |w| (
            store(HOST, w.seal_for("bob", HOST, b"glpat-BobsOwn5")),
            expect(
                Code::InvalidArgument,
                "sealed_token: was sealed for another principal, not \"alice\"",
            )
            .hiding("glpat-BobsOwn5"),
        );
        box_for_another_host => |w| (
            store(HOST, w.seal_for("alice", "github.com", b"glpat-OtherHost")),
            expect(
                Code::InvalidArgument,
                "sealed_token: was sealed for another host, not git.example.com",
            )
            .hiding("glpat-OtherHost"),
        );
        oauth_client_secret_replayed_as_a_pat => |w| (
            store(
                HOST,
                control_plane::cli::seal(
                    &w.key,
                    control_plane::cli::client_secret_binding(HOST),
                    b"client-Secret66",
                )
                .expect("seal"),
            ),
            expect(
                Code::InvalidArgument,
                "sealed_token: was sealed as \"oauth-client-secret\", not as \"pat\"",
            )
            .hiding("client-Secret66"),
        );
        plaintext_with_whitespace_inside => |w| (
            store(HOST, w.seal(b"glpat-Two Words")),
            expect(
                Code::InvalidArgument,
                "sealed_token: the secret contains whitespace or control characters",
            )
            .hiding("glpat-Two"),
        );
        blank_plaintext => |w| (
            store(HOST, w.seal(b" \t\r\n ")),
            expect(Code::InvalidArgument, "sealed_token: the secret is empty"),
        );
        plaintext_of_5000_bytes => |w| (
            store(HOST, w.seal("t".repeat(5000).as_bytes())),
            expect(Code::InvalidArgument, "sealed_token: the secret is longer than 4096 bytes"),
        );
        host_without_an_integration => |w| (
            store(
                "nowhere.example.com",
                w.seal_for("alice", "nowhere.example.com", b"glpat-Nowhere4"),
            ),
            expect(
                Code::FailedPrecondition,
                "this runner has no SCM integration for nowhere.example.com",
            )
            .hiding("glpat-Nowhere4"),
        );
        host_that_is_not_a_host_name => |w| (
            store("Git Example", w.seal_for("alice", "Git Example", b"glpat-BadHost5")),
            expect(Code::InvalidArgument, "host: \"Git Example\" is not a lowercase host name")
                .hiding("glpat-BadHost5"),
        );
        pats_disabled => |w| (
            store(CLOSED, w.seal_for("alice", CLOSED, b"glpat-Closed66")),
            expect(
                Code::FailedPrecondition,
                "personal access tokens are disabled for closed.example.com",
            )
            .hiding("glpat-Closed66"),
        );
        oauth_code_for_a_host_without_an_integration => |_| (
            exchange("nowhere.example.com", "code-Nowhere7"),
            expect(
                Code::FailedPrecondition,
                "this runner has no SCM integration for nowhere.example.com",
            )
            .hiding("code-Nowhere7"),
        );
        empty_oauth_code => |_| (
            exchange(HOST, ""),
            expect(Code::InvalidArgument, "code: must not be empty"),
        );
        oauth_on_a_host_without_oauth => |_| (
            exchange(CLOSED, "code-Closed88"),
            expect(Code::FailedPrecondition, "OAuth is not enabled for closed.example.com")
                .hiding("code-Closed88"),
        );
        oauth_client_secret_that_does_not_open => |_| (
            exchange(HOST, "code-Sealed999"),
            expect(
                Code::FailedPrecondition,
                "the OAuth client secret of git.example.com cannot be used (oauth.sealed_client_secret: does not open with this runner's key",
            )
            .hiding("code-Sealed999"),
        );
    }
}

/// The control plane's own boundary: what it refuses before any runner
/// sees it.
mod control_plane_boundary {
    use super::*;

    cases! { check_refused:
        repository_url_of_3000_bytes_even_unchecked => async |w| {
            let mut request = w.world.create_request(&w.world.class_id);
            request.unchecked = true;
            request.content.as_mut().expect("content").repository_url =
                format!("https://github.com/acme/{}", "a".repeat(3000));
            (
                w.admin().create_environment(request).await.expect_err("refused"),
                expect(
                    Code::InvalidArgument,
                    "content.repository_url: is 3024 bytes long, the limit is 2048",
                ),
            )
        };
        creator_with_a_control_character_even_unchecked => async |w| {
            let mut request = w.world.create_request(&w.world.class_id);
            request.unchecked = true;
            request.creator = "alice\u{7f}".into();
            (
                w.admin().create_environment(request).await.expect_err("refused"),
                expect(Code::InvalidArgument, "creator: must not contain control characters"),
            )
        };
        class_with_a_zero_disk => async |w| (
            w.admin()
                .create_environment_class(new_class(w, 0))
                .await
                .expect_err("refused"),
            expect(Code::InvalidArgument, "disk_gib: 0 GiB is outside 8 to 16384 GiB"),
        );
        class_with_a_huge_disk => async |w| (
            w.admin()
                .create_environment_class(new_class(w, 1_000_000))
                .await
                .expect_err("refused"),
            expect(Code::InvalidArgument, "disk_gib: 1000000 GiB is outside 8 to 16384 GiB"),
        );
        second_integration_for_the_same_host => async |w| (
            w.admin()
                .create_scm_integration(admin::CreateScmIntegrationRequest {
                    runner_id: w.world.runner_id.clone(),
                    kind: pb::ScmKind::Gitlab as i32,
                    host: HOST.into(),
                    oauth: None,
                    pat_enabled: true,
                    api_base_url: String::new(),
                    oauth_base_url: String::new(),
                })
                .await
                .expect_err("refused"),
            expect(
                Code::AlreadyExists,
                "host: the runner already has an integration for git.example.com",
            ),
        );
        call_of_1_5_mib_over_the_1_mib_message_limit => async |w| (
            w.admin()
                .call_runner(w.call_runner(parse(
                    &"p".repeat(1536 * 1024),
                    "https://github.com/a/b",
                )))
                .await
                .expect_err("refused"),
            expect(Code::OutOfRange, "message length too large"),
        );
        principal_that_is_not_utf8 => async |w| (
            w.raw_call_runner(with_invalid_utf8(
                &w.call_runner(parse("@@BADUTF8@@", "https://github.com/a/b")),
                "@@BADUTF8@@",
            ))
            .await,
            expect(Code::Internal, "ParseContext.principal: "),
        );
        call_nested_10_000_groups_deep => async |w| (
            w.raw_call_runner(with_nested_groups(
                &w.call_runner(Kind::Ping(pb::Ping {})),
                10_000,
            ))
            .await,
            expect(Code::Internal, "recursion limit reached"),
        );
    }

    fn new_class(w: &CallsWorld, disk_gib: u32) -> admin::CreateEnvironmentClassRequest {
        admin::CreateEnvironmentClassRequest {
            runner_id: w.world.runner_id.clone(),
            display_name: "Bad".into(),
            instance_type: "m7i.large".into(),
            disk_gib,
        }
    }
}
