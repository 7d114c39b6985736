//! `runnerd doctor` on moto: a correct setup passes every check; each broken
//! setup fails the check that names it, with a hint; and the daemon reports a
//! failing check as DEGRADED at start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use control_plane::server::TlsPem;
use control_plane::{ServerConfig, Settings, SystemClock};
use runner_core::traits::{Credentials, SecretKeyBytes};
use runner_proto::admin::v1::{self as admin, admin_service_client::AdminServiceClient};
use runner_proto::pb::{self, identity_service_client::IdentityServiceClient};
use runnerd::doctor::{Doctor, Report, Status};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{Infra, REGION, moto_url, sdk};

/// A reference control plane with one runner in it.
pub(crate) struct Plane {
    pub(crate) cp: testkit::ControlPlane,
    pub(crate) admin: AdminServiceClient<Channel>,
    pub(crate) runner_id: String,
    pub(crate) exchange_token: String,
}

impl Plane {
    pub(crate) async fn start() -> Self {
        let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(SystemClock));
        let cp = testkit::ControlPlane::start(ServerConfig::default(), plane)
            .await
            .expect("control plane");
        let mut admin = AdminServiceClient::new(cp.channel().await.expect("connect"));
        let created = admin
            .create_runner(admin::CreateRunnerRequest {
                name: "doctor".into(),
                region: REGION.into(),
            })
            .await
            .expect("create runner")
            .into_inner();
        Self {
            runner_id: created.runner.expect("runner").id,
            exchange_token: created.exchange_token,
            cp,
            admin,
        }
    }

    pub(crate) async fn runner(&self) -> admin::Runner {
        self.admin
            .clone()
            .get_runner(admin::GetRunnerRequest {
                runner_id: self.runner_id.clone(),
            })
            .await
            .expect("runner")
            .into_inner()
    }

    /// Trades the exchange token for an access token, as runnerd would.
    async fn access_token(&self) -> String {
        IdentityServiceClient::new(self.cp.channel().await.expect("connect"))
            .exchange_token(pb::ExchangeTokenRequest {
                public_key: Vec::new(),
                exchange_token: self.exchange_token.clone(),
            })
            .await
            .expect("exchange")
            .into_inner()
            .access_token
    }
}

/// A correct setup on moto: the resources, an instance profile with a role,
/// an existing AMI, and the runner's traded credentials in its secret.
pub(crate) struct Setup {
    pub(crate) sdk: aws_config::SdkConfig,
    pub(crate) infra: Infra,
    pub(crate) plane: Plane,
    pub(crate) profile: String,
    pub(crate) ami: String,
}

/// A validated configuration from `--flag value` pairs (a value "" is a bare flag).
pub(crate) fn config(flags: &[(String, String)]) -> runnerd::config::Config {
    let mut argv = vec!["runnerd".to_owned()];
    for (flag, value) in flags {
        argv.push(format!("--{flag}"));
        if !value.is_empty() {
            argv.push(value.clone());
        }
    }
    runnerd::config::Cli::try_parse_from(argv)
        .expect("parse")
        .daemon
        .validate()
        .expect("config")
}

/// An AMI that moto knows.
pub(crate) async fn existing_ami(ec2: &aws_sdk_ec2::Client) -> String {
    ec2.describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("describe images")
        .images()
        .iter()
        .find(|i| i.root_device_name().is_some())
        .and_then(|i| i.image_id())
        .expect("moto has AMIs")
        .to_owned()
}

/// An instance profile named `name`, with a role when `with_role`.
async fn instance_profile(sdk: &aws_config::SdkConfig, name: &str, with_role: bool) {
    let iam = aws_sdk_iam::Client::new(sdk);
    iam.create_instance_profile()
        .instance_profile_name(name)
        .send()
        .await
        .expect("create instance profile");
    if with_role {
        iam.create_role()
            .role_name(name)
            .assume_role_policy_document(
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
            )
            .send()
            .await
            .expect("create role");
        iam.add_role_to_instance_profile()
            .instance_profile_name(name)
            .role_name(name)
            .send()
            .await
            .expect("add role");
    }
}

/// Writes `access_token` and a key into `secret_id`, as runnerd stores them.
async fn store_credentials(sdk: &aws_config::SdkConfig, secret_id: &str, access_token: &str) {
    let credentials = Credentials {
        exchange_token: None,
        access_token: Some(SecretString::from(access_token.to_owned())),
        private_key: Some(SecretKeyBytes(
            crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng).to_bytes(),
        )),
    };
    aws_sdk_secretsmanager::Client::new(sdk)
        .put_secret_value()
        .secret_id(secret_id)
        .secret_string(runner_aws::secrets::render(&credentials).as_str())
        .send()
        .await
        .expect("store credentials");
}

impl Setup {
    pub(crate) async fn new() -> Self {
        let plane = Plane::start().await;
        let sdk = sdk(&moto_url()).await;
        let infra = Infra {
            runner_id: plane.runner_id.clone(),
            ..Infra::create(&sdk).await
        };
        let profile = format!("env-{}", &infra.table[7..]);
        instance_profile(&sdk, &profile, true).await;
        let ami = existing_ami(&aws_sdk_ec2::Client::new(&sdk)).await;
        store_credentials(&sdk, &infra.secret_id, &plane.access_token().await).await;
        Self {
            sdk,
            infra,
            plane,
            profile,
            ami,
        }
    }

    /// The daemon's flags for this setup, with `overrides` replacing or added.
    pub(crate) fn flags(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut flags: Vec<(String, String)> = [
            ("runner-id", self.infra.runner_id.clone()),
            ("region", REGION.to_owned()),
            ("control-plane-url", self.plane.cp.url()),
            ("allow-plaintext", String::new()),
            ("vpc-id", self.infra.vpc_id.clone()),
            ("subnet-ids", self.infra.subnet_ids().join(",")),
            ("security-group-id", self.infra.security_group_id.clone()),
            ("instance-profile", self.profile.clone()),
            ("ami", self.ami.clone()),
            ("table", self.infra.table.clone()),
            ("secret-id", self.infra.secret_id.clone()),
            ("kms-key-id", self.infra.kms_key_id.clone()),
            ("health-listen", "127.0.0.1:0".to_owned()),
            ("control-plane-timeout", "5s".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (flag, value) in overrides {
            match flags.iter_mut().find(|(f, _)| f == flag) {
                Some(entry) => entry.1 = (*value).to_owned(),
                None => flags.push(((*flag).to_owned(), (*value).to_owned())),
            }
        }
        flags
    }

    async fn doctor(&self, overrides: &[(&str, &str)]) -> Report {
        let config = config(&self.flags(overrides));
        Doctor::new(&self.sdk, &config, None).run().await
    }
}

fn failed(report: &Report) -> Vec<&str> {
    report.failures().map(|c| c.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_setup_passes_every_check() {
    let setup = Setup::new().await;
    let report = setup.doctor(&[]).await;
    assert!(report.ok, "{}", report.text());
    let mut expected = vec![
        "credentials",
        "region",
        "table",
        "vpc",
        "security-group",
        "instance-profile",
        "ami",
        "dry-run",
        "kms-key",
        "secret",
        "control-plane-dns",
        "control-plane-connect",
        "control-plane-auth",
    ];
    let subnets: Vec<String> = setup
        .infra
        .subnet_ids()
        .iter()
        .map(|s| format!("subnet:{s}"))
        .collect();
    expected.extend(subnets.iter().map(String::as_str));
    for name in expected {
        let check = report
            .check(name)
            .unwrap_or_else(|| panic!("no check {name}"));
        assert_eq!(check.status, Status::Pass, "{}", report.text());
    }
    // Plaintext to loopback has no TLS; not on ECS, no self-update.
    assert_eq!(
        report.check("control-plane-tls").map(|c| c.status),
        Some(Status::Skip)
    );
    assert_eq!(
        report.check("self-update").map(|c| c.status),
        Some(Status::Skip)
    );
    assert!(
        report
            .check("control-plane-auth")
            .is_some_and(|c| c.message.contains("access token is accepted")),
        "{}",
        report.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_broken_setup_fails_the_check_that_names_it_with_a_hint() {
    let setup = Setup::new().await;
    let short = &setup.infra.table[7..];
    let ec2 = aws_sdk_ec2::Client::new(&setup.sdk);
    let kms = aws_sdk_kms::Client::new(&setup.sdk);
    let secrets = aws_sdk_secretsmanager::Client::new(&setup.sdk);

    let other_vpc = ec2
        .describe_subnets()
        .subnet_ids(&setup.infra.foreign_subnet)
        .send()
        .await
        .expect("foreign subnet")
        .subnets()[0]
        .vpc_id()
        .expect("vpc")
        .to_owned();
    let bare_profile = format!("bare-{short}");
    instance_profile(&setup.sdk, &bare_profile, false).await;
    let disabled_key = kms
        .create_key()
        .send()
        .await
        .expect("key")
        .key_metadata
        .expect("metadata")
        .key_id;
    kms.disable_key()
        .key_id(&disabled_key)
        .send()
        .await
        .expect("disable key");
    let garbage_secret = format!("garbage-{short}");
    secrets
        .create_secret()
        .name(&garbage_secret)
        .secret_string("{not the runner's json")
        .send()
        .await
        .expect("secret");
    let revoked_secret = format!("revoked-{short}");
    secrets
        .create_secret()
        .name(&revoked_secret)
        .secret_string("placeholder")
        .send()
        .await
        .expect("secret");
    store_credentials(&setup.sdk, &revoked_secret, "rat_not-a-token-of-this-plane").await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let closed_url = format!("http://127.0.0.1:{closed}");
    let subnets_and_foreign = format!(
        "{},{}",
        setup.infra.subnet_ids().join(","),
        setup.infra.foreign_subnet
    );
    let foreign_subnet_check = format!("subnet:{}", setup.infra.foreign_subnet);
    let missing_table = format!("missing-{short}");

    let subnet_checks: Vec<String> = setup
        .infra
        .subnet_ids()
        .iter()
        .map(|s| format!("subnet:{s}"))
        .collect();
    // The subnets and the group are not in the configured VPC either.
    let outside: Vec<&str> = ["security-group"]
        .into_iter()
        .chain(subnet_checks.iter().map(String::as_str))
        .collect();
    let missing_vpc: Vec<&str> = ["vpc"].into_iter().chain(outside.clone()).collect();

    // (what is broken, the settings that break it, the checks that fail, words of the first's message)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "a VPC that does not exist",
            vec![("vpc-id", "vpc-00000000000000000")],
            missing_vpc,
            "vpc-00000000000000000 does not exist",
        ),
        (
            "another VPC than the subnets'",
            vec![("vpc-id", other_vpc.as_str())],
            outside,
            "is in VPC",
        ),
        (
            "a subnet from another VPC",
            vec![("subnet-ids", subnets_and_foreign.as_str())],
            vec![foreign_subnet_check.as_str()],
            "not in",
        ),
        (
            "a subnet that does not exist",
            vec![("subnet-ids", "subnet-00000000000000000")],
            vec!["subnet:subnet-00000000000000000"],
            "does not exist",
        ),
        (
            "a security group from another VPC",
            vec![(
                "security-group-id",
                setup.infra.foreign_security_group.as_str(),
            )],
            vec!["security-group"],
            "is in VPC",
        ),
        (
            "a missing table",
            vec![("table", missing_table.as_str())],
            vec!["table"],
            "does not exist",
        ),
        (
            "an AMI that does not exist",
            vec![("ami", "ami-0123456789abcdef0")],
            vec!["ami"],
            "ami-0123456789abcdef0 does not exist",
        ),
        (
            "a missing instance profile",
            vec![("instance-profile", "no-such-profile")],
            vec!["instance-profile"],
            "does not exist",
        ),
        (
            "an instance profile without a role",
            vec![("instance-profile", bare_profile.as_str())],
            vec!["instance-profile"],
            "has no role",
        ),
        (
            "a KMS key that does not exist",
            vec![("kms-key-id", "00000000-0000-0000-0000-000000000000")],
            vec!["kms-key"],
            "does not exist",
        ),
        (
            "a disabled KMS key",
            vec![("kms-key-id", disabled_key.as_str())],
            vec!["kms-key"],
            "Disabled",
        ),
        (
            "a secret that does not exist",
            vec![("secret-id", "no-such-secret")],
            vec!["secret"],
            "does not exist",
        ),
        (
            "a secret that is not the runner's",
            vec![("secret-id", garbage_secret.as_str())],
            vec!["secret"],
            "not the runner's JSON",
        ),
        (
            "an unreachable control plane",
            vec![("control-plane-url", closed_url.as_str())],
            vec!["control-plane-connect"],
            "cannot connect",
        ),
        (
            "an access token the control plane refuses",
            vec![("secret-id", revoked_secret.as_str())],
            vec!["control-plane-auth"],
            "refused the runner's access token",
        ),
    ];
    for (what, overrides, expected, words) in cases {
        let report = setup.doctor(&overrides).await;
        let mut failing = failed(&report);
        failing.sort_unstable();
        let mut want = expected.clone();
        want.sort_unstable();
        assert_eq!(failing, want, "{what}:\n{}", report.text());
        assert!(!report.ok, "{what}");
        let first = report.check(expected[0]).expect("the check");
        assert!(
            first.message.contains(words),
            "{what}: {:?} lacks {words:?}",
            first.message
        );
        assert!(
            first.hint.as_deref().is_some_and(|h| h.len() > 10),
            "{what}: no hint"
        );
    }
}

fn tls_identity() -> (String, TlsPem) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    (
        ca.pem(),
        TlsPem {
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_trusted_only_with_the_control_planes_ca() {
    let setup = Setup::new().await;
    let (ca_pem, identity) = tls_identity();
    let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(SystemClock));
    let tls_cp = testkit::ControlPlane::start(
        ServerConfig {
            tls: Some(identity),
            ..ServerConfig::default()
        },
        plane,
    )
    .await
    .expect("TLS control plane");
    let url = format!("https://localhost:{}", tls_cp.addr.port());

    let unknown_ca = setup.doctor(&[("control-plane-url", url.as_str())]).await;
    assert_eq!(
        failed(&unknown_ca),
        ["control-plane-tls"],
        "{}",
        unknown_ca.text()
    );
    let tls = unknown_ca.check("control-plane-tls").expect("tls check");
    assert!(
        tls.message.contains("UnknownIssuer") || tls.message.contains("unknown issuer"),
        "{}",
        tls.message
    );
    assert!(
        tls.hint
            .as_deref()
            .is_some_and(|h| h.contains("RUNNER_CA_BUNDLE"))
    );

    let bundle = std::env::temp_dir().join(format!("doctor-ca-{}.pem", setup.infra.runner_id));
    std::fs::write(&bundle, ca_pem).expect("write CA");
    let bundle = bundle.display().to_string();
    let trusted = setup
        .doctor(&[
            ("control-plane-url", url.as_str()),
            ("ca-bundle", bundle.as_str()),
        ])
        .await;
    assert_eq!(
        trusted.check("control-plane-tls").map(|c| c.status),
        Some(Status::Pass),
        "{}",
        trusted.text()
    );
    // This control plane never issued the runner's token.
    assert_eq!(
        failed(&trusted),
        ["control-plane-auth"],
        "{}",
        trusted.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reports_a_failing_check_as_degraded_at_start() {
    let setup = Setup::new().await;
    let config = config(&setup.flags(&[("ami", "ami-0123456789abcdef0")]));
    let deps = runnerd::aws_deps_with(&setup.sdk, &config);
    let extras = runnerd::aws_extras(&setup.sdk, &config, None);
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(runnerd::app::run_with(
        config,
        deps,
        extras,
        shutdown.clone(),
        None,
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let runner = loop {
        let runner = setup.plane.runner().await;
        if runner.phase == admin::RunnerPhase::Degraded as i32 {
            break runner;
        }
        assert!(Instant::now() < deadline, "never DEGRADED: {runner:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        runner.degraded_message,
        format!("checks: ami: ami-0123456789abcdef0 does not exist in {REGION}")
    );
    assert_eq!(
        runner
            .system_details
            .get("update_state")
            .map(String::as_str),
        Some("unavailable"),
        "not on ECS"
    );
    shutdown.cancel();
    daemon.await.expect("join").expect("clean stop");
}
