//! `runnerd doctor`: checks the account setup with the daemon's own
//! configuration, one line per check (pass, fail with a fix hint, or skip),
//! as text or JSON. The daemon runs the same checks at start, and again
//! until they pass; failures show as DEGRADED with the failing check's
//! message.
//!
//! The AWS checks are `runner_aws::probes`; this module adds the
//! control-plane checks (with the stored access token, never the single-use
//! exchange token) and self-update's, and renders the report. A check that
//! needs a failed one is skipped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use runner_aws::SdkConfig;
use runner_aws::probes::{Finding, Findings, Outcome, ProbeSettings, Probes, fail};
use runner_core::retry::{Policy, retry};
use runner_core::traits::Credentials;
use runner_core::update::{Deployer, UpdateError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control_plane::Client;
use crate::health::{Health, chain, one_line};
use crate::session::VERSION;

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It works.
    Pass,
    /// It does not; see the hint.
    Fail,
    /// Not applicable here, or waiting for a failed check.
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name, e.g. `vpc` or `subnet:subnet-0abc`.
    pub name: String,
    /// The result.
    pub status: Status,
    /// What was found.
    pub message: String,
    /// How to fix a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Every check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No check failed.
    pub ok: bool,
    /// The runner.
    pub runner_id: String,
    /// The region.
    pub region: String,
    /// runnerd's version.
    pub version: String,
    /// In order.
    pub checks: Vec<Check>,
}

impl Report {
    /// The check named `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The failing checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    /// The degraded message: every failure as `name: message`.
    pub fn problem(&self) -> Option<String> {
        let failures: Vec<String> = self
            .failures()
            .map(|c| one_line(&format!("{}: {}", c.name, c.message)))
            .collect();
        (!failures.is_empty()).then(|| failures.join("; "))
    }

    /// The report for a terminal: one line per check, a hint under a failure.
    pub fn text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = format!(
            "runnerd {} doctor: runner {} in {}\n",
            self.version, self.runner_id, self.region
        );
        let mut counts = [0; 3];
        for check in &self.checks {
            let (label, i) = match check.status {
                Status::Pass => ("PASS", 0),
                Status::Fail => ("FAIL", 1),
                Status::Skip => ("SKIP", 2),
            };
            counts[i] += 1;
            let _ = writeln!(out, "{label}  {:width$}  {}", check.name, check.message);
            if let Some(hint) = &check.hint {
                let _ = writeln!(out, "      {:width$}  fix: {hint}", "");
            }
        }
        let _ = writeln!(
            out,
            "{} passed, {} failed, {} skipped",
            counts[0], counts[1], counts[2]
        );
        out
    }
}

impl From<Finding> for Check {
    fn from(finding: Finding) -> Self {
        let (status, message, hint) = match finding.outcome {
            Outcome::Pass(message) => (Status::Pass, message, None),
            Outcome::Fail { message, hint } => (Status::Fail, message, Some(hint)),
            Outcome::Skip(message) => (Status::Skip, message, None),
        };
        Self {
            name: finding.name,
            status,
            message,
            hint,
        }
    }
}

/// The fix for a control-plane call that failed with `code`: a URL that is
/// not the gRPC endpoint answers as one that is not; an endpoint that is
/// down, overloaded or failing needs no setting changed.
fn control_plane_hint(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Internal
        | Code::Aborted => {
            "the control plane did not answer or failed (see the message): the check runs again; if it keeps failing, ask the control plane's operator"
        }
        _ => "check that RUNNER_CONTROL_PLANE_URL is the control plane's gRPC endpoint",
    }
}

/// The start checks run again after a failure: from 30 s, doubling, up to
/// 10 min.
const RECHECK: Policy = Policy::new(Duration::from_secs(30), Duration::from_secs(600));

/// The checks, built on one SDK configuration.
pub struct Doctor {
    config: Config,
    probes: Probes,
    deployer: Option<Arc<dyn Deployer>>,
}

impl std::fmt::Debug for Doctor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doctor")
            .field("runner_id", &self.config.runner_id)
            .finish_non_exhaustive()
    }
}

/// What the AWS checks look at, from `config`.
fn probe_settings(config: &Config) -> ProbeSettings {
    let placement = &config.placement;
    ProbeSettings {
        runner_id: config.runner_id.clone(),
        region: config.region.clone(),
        table: config.table.clone(),
        vpc_id: placement.vpc_id.clone(),
        subnet_ids: placement.subnet_ids.clone(),
        security_group_id: placement.security_group_id.clone(),
        instance_profile: placement.instance_profile.clone(),
        ami: placement.ami.clone(),
        instance_type: placement.allowed_instance_types.types().first().cloned(),
        kms_key_id: config.kms_key_id.clone(),
        secret_id: config.secret_id.clone(),
        exchange_token_secret_id: config.exchange_token_secret_id.clone(),
    }
}

impl Doctor {
    /// The checks of `config`; `deployer` is the runner's ECS service when it
    /// runs in an ECS task.
    pub fn new(sdk: &SdkConfig, config: &Config, deployer: Option<Arc<dyn Deployer>>) -> Self {
        Self {
            config: config.clone(),
            probes: Probes::new(sdk, probe_settings(config)),
            deployer,
        }
    }

    /// Runs every check.
    pub async fn run(&self) -> Report {
        // Boxed: the checks' futures are large.
        Box::pin(self.run_checks()).await
    }

    async fn run_checks(&self) -> Report {
        let mut checks = Findings::default();
        let credentials = self.probes.run(&mut checks).await;
        self.control_plane(&mut checks, credentials.as_ref()).await;
        checks.run("self-update", self.self_update()).await;
        let checks: Vec<Check> = checks.into_iter().map(Check::from).collect();
        Report {
            ok: checks.iter().all(|c| c.status != Status::Fail),
            runner_id: self.config.runner_id.clone(),
            region: self.config.region.clone(),
            version: VERSION.to_owned(),
            checks,
        }
    }

    async fn control_plane(&self, checks: &mut Findings, credentials: Option<&Credentials>) {
        let url = &self.config.control_plane.url;
        let skip = |checks: &mut Findings, names: &[&str], why: &str| {
            for name in names {
                checks.record(name, Outcome::Skip(why.to_owned()));
            }
        };
        let uri: tonic::transport::Uri = match url.parse() {
            Ok(uri) => uri,
            Err(err) => {
                checks.record(
                    "control-plane-dns",
                    fail(
                        format!("{url} is not a URL: {err}"),
                        "fix RUNNER_CONTROL_PLANE_URL",
                    ),
                );
                return skip(
                    checks,
                    &[
                        "control-plane-connect",
                        "control-plane-tls",
                        "control-plane-auth",
                    ],
                    "needs a valid URL",
                );
            }
        };
        let tls = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });

        let mut addresses = Vec::new();
        let resolved = checks
            .run("control-plane-dns", async {
                match tokio::net::lookup_host((host.as_str(), port)).await {
                    Ok(found) => {
                        addresses = found.collect();
                        let list: Vec<String> =
                            addresses.iter().map(|a| a.ip().to_string()).collect();
                        Outcome::Pass(format!("{host} is {}", list.join(", ")))
                    }
                    Err(err) => fail(
                        format!("cannot resolve {host}: {err}"),
                        "check RUNNER_CONTROL_PLANE_URL; the runner's VPC needs DNS resolution (enableDnsSupport)",
                    ),
                }
            })
            .await;
        if !resolved {
            return skip(
                checks,
                &[
                    "control-plane-connect",
                    "control-plane-tls",
                    "control-plane-auth",
                ],
                "needs the control plane's address",
            );
        }

        let mut stream = None;
        let connected = checks
            .run("control-plane-connect", async {
                let mut last = String::new();
                for address in &addresses {
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio::net::TcpStream::connect(address),
                    )
                    .await
                    {
                        Ok(Ok(connected)) => {
                            stream = Some(connected);
                            return Outcome::Pass(format!("{host}:{port} ({address}) accepts connections"));
                        }
                        Ok(Err(err)) => last = format!("{address}: {err}"),
                        Err(_) => last = format!("{address}: no answer within 10 s"),
                    }
                }
                fail(
                    format!("cannot connect to {host}:{port} ({last})"),
                    "check that the control plane is up at RUNNER_CONTROL_PLANE_URL; the runner's subnets need a route to the internet (NAT) and its security group must allow outbound HTTPS",
                )
            })
            .await;
        let Some(stream) = stream.filter(|_| connected) else {
            return skip(
                checks,
                &["control-plane-tls", "control-plane-auth"],
                "needs a connection",
            );
        };

        if tls {
            let handshake = checks
                .run("control-plane-tls", self.tls_handshake(stream, &host))
                .await;
            if !handshake {
                return skip(
                    checks,
                    &["control-plane-auth"],
                    "needs a trusted TLS connection",
                );
            }
        } else {
            drop(stream);
            checks.record(
                "control-plane-tls",
                Outcome::Skip("plaintext to a loopback address (--allow-plaintext)".into()),
            );
        }
        checks
            .run("control-plane-auth", self.authenticated_call(credentials))
            .await;
    }

    async fn tls_handshake(&self, stream: tokio::net::TcpStream, host: &str) -> Outcome {
        let hint = "if the control plane's certificate comes from a private CA, put that CA's certificate (PEM) in the file RUNNER_CA_BUNDLE names";
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(pem) = &self.config.control_plane.ca_bundle {
            use rustls::pki_types::pem::PemObject as _;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem).flatten() {
                let _ = roots.add(cert);
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => {
                let mut config = builder.with_root_certificates(roots).with_no_client_auth();
                config.alpn_protocols = vec![b"h2".to_vec()];
                config
            }
            Err(err) => return fail(format!("TLS setup: {err}"), hint),
        };
        let Ok(name) = rustls::pki_types::ServerName::try_from(host.to_owned()) else {
            return fail(
                format!("{host} is not a TLS server name"),
                "fix RUNNER_CONTROL_PLANE_URL",
            );
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        match connector.connect(name, stream).await {
            Ok(tls) => {
                let version = tls
                    .get_ref()
                    .1
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("TLS");
                Outcome::Pass(format!("{host}: certificate trusted ({version})"))
            }
            Err(err) => fail(format!("TLS handshake with {host} failed: {err}"), hint),
        }
    }

    async fn authenticated_call(&self, credentials: Option<&Credentials>) -> Outcome {
        let Some(credentials) = credentials else {
            return Outcome::Skip("needs the runner secret".into());
        };
        let Some(token) = &credentials.access_token else {
            return Outcome::Skip(
                "the secret holds only the single-use exchange token, which runnerd trades at its first start".into(),
            );
        };
        let client = match Client::new(&self.config.control_plane) {
            Ok(client) => client,
            Err(err) => {
                return fail(
                    chain(&err),
                    "check RUNNER_CONTROL_PLANE_URL and RUNNER_CA_BUNDLE",
                );
            }
        };
        if let Err(problem) = client.authenticate(token) {
            return fail(
                problem.to_string(),
                "create a new exchange token in the control plane and put it in the secret",
            );
        }
        match client.latest_version(VERSION).await {
            Ok(latest) => {
                let release = match latest {
                    None => "nothing is released yet".to_owned(),
                    Some(latest) => format!(
                        "the latest release is {} (auto-update {})",
                        latest.version,
                        if latest.auto_update { "on" } else { "off" }
                    ),
                };
                Outcome::Pass(format!("the runner's access token is accepted; {release}"))
            }
            Err(err) if err.code() == tonic::Code::Unauthenticated => fail(
                format!(
                    "the control plane refused the runner's access token: {}",
                    err.status().message()
                ),
                "the runner's credential was revoked or is for another control plane: create a new exchange token for this runner, set it as the stack's ExchangeToken, and remove access_token from the runner's secret (RUNNER_SECRET_ID; keep private_key)",
            ),
            Err(err) => fail(
                format!("{:?}: {}", err.code(), err.status().message()),
                control_plane_hint(err.code()),
            ),
        }
    }

    async fn self_update(&self) -> Outcome {
        if !self.config.update.enabled {
            return Outcome::Skip("turned off (RUNNER_SELF_UPDATE=false)".into());
        }
        let Some(deployer) = &self.deployer else {
            return Outcome::Skip(
                "not in an ECS task (ECS_CONTAINER_METADATA_URI_V4 is not set)".into(),
            );
        };
        match deployer.service().await {
            Ok(service) => Outcome::Pass(format!(
                "service {} in cluster {} runs {} ({})",
                service.name, service.cluster, service.image, service.task_definition
            )),
            Err(UpdateError::NotAService(why)) => {
                Outcome::Skip(format!("{why}: only the service's own tasks update it"))
            }
            // ECS failed or was not reached: no permission is missing.
            Err(err @ UpdateError::Unavailable { .. }) => fail(
                chain(&err),
                "ECS did not answer or failed (see the cause): the check runs again; if it keeps failing, look at the runner's network path to ECS and at ECS's health",
            ),
            Err(err) => fail(
                chain(&err),
                "the task role needs ecs:DescribeTasks, ecs:DescribeServices and ecs:DescribeTaskDefinition (the stack grants them)",
            ),
        }
    }

    /// The daemon's start checks: runs every check, reports failures as the
    /// degraded problem `checks`, and runs them again (30 s to 10 min apart)
    /// until they all pass or `shutdown`.
    pub async fn watch(self: Arc<Self>, health: Arc<Health>, shutdown: CancellationToken) {
        let checks = async || {
            let report = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                report = self.run() => report,
            };
            for check in report.failures() {
                tracing::warn!(
                    check = %check.name,
                    problem = %check.message,
                    hint = check.hint.as_deref().unwrap_or_default(),
                    "setup check failed"
                );
            }
            health.set_problem("checks", report.problem());
            if report.ok {
                tracing::info!(checks = report.checks.len(), "setup checks pass");
                Ok(())
            } else {
                Err(())
            }
        };
        // Until they pass, or shutdown: nothing else to report.
        let _ = retry(RECHECK, &shutdown, |()| true, |(), _| {}, checks).await;
    }
}

/// `runnerd doctor`: runs the checks of `config`, prints the report (text or
/// JSON) and returns 0 when no check failed, 1 otherwise.
pub async fn command(config: Config, json: bool) -> std::process::ExitCode {
    let sdk = runner_aws::sdk_config(&config.region).await;
    let deployer = crate::ecs_metadata_uri().map(|uri| runner_aws::ecs_deployer(&sdk, &uri));
    let report = Doctor::new(&sdk, &config, deployer).run().await;
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("runnerd doctor: {err}");
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.text());
    }
    if report.ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, status: Status, message: &str, hint: Option<&str>) -> Check {
        Check {
            name: name.into(),
            status,
            message: message.into(),
            hint: hint.map(str::to_owned),
        }
    }

    fn report(checks: Vec<Check>) -> Report {
        Report {
            ok: checks.iter().all(|c| c.status != Status::Fail),
            runner_id: "r".into(),
            region: "eu-west-1".into(),
            version: "0.1.0".into(),
            checks,
        }
    }

    #[test]
    fn failures_become_the_degraded_message() {
        let r = report(vec![
            check("vpc", Status::Pass, "vpc-1", None),
            check(
                "ami",
                Status::Fail,
                "ami-1 does not exist",
                Some("set RUNNER_AMI"),
            ),
            check("dry-run", Status::Skip, "waits", None),
            check("secret", Status::Fail, "holds nothing", Some("new token")),
        ]);
        assert!(!r.ok);
        assert_eq!(
            r.problem().as_deref(),
            Some("ami: ami-1 does not exist; secret: holds nothing")
        );
        let passing = report(vec![check("vpc", Status::Pass, "vpc-1", None)]);
        assert!(passing.ok);
        assert_eq!(passing.problem(), None);
    }

    #[test]
    fn the_degraded_message_has_no_control_characters() {
        let r = report(vec![check(
            "kms-key",
            Status::Fail,
            "line one\nline two\t.",
            None,
        )]);
        assert_eq!(r.problem().as_deref(), Some("kms-key: line one line two ."));
    }

    #[test]
    fn a_failing_control_plane_is_not_blamed_on_the_url() {
        for code in [tonic::Code::Unavailable, tonic::Code::Internal] {
            assert!(!super::control_plane_hint(code).contains("RUNNER_CONTROL_PLANE_URL"));
        }
        assert!(
            super::control_plane_hint(tonic::Code::Unimplemented)
                .contains("RUNNER_CONTROL_PLANE_URL")
        );
    }

    #[test]
    fn the_text_report_has_a_line_per_check_and_a_hint_under_failures() {
        let text = report(vec![
            check("vpc", Status::Pass, "vpc-1", None),
            check(
                "ami",
                Status::Fail,
                "ami-1 does not exist",
                Some("set RUNNER_AMI"),
            ),
        ])
        .text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "PASS  vpc  vpc-1");
        assert_eq!(lines[2], "FAIL  ami  ami-1 does not exist");
        assert_eq!(lines[3], "           fix: set RUNNER_AMI");
        assert_eq!(lines[4], "1 passed, 1 failed, 0 skipped");
    }

    #[test]
    fn the_json_report_names_status_and_hint() {
        let json = serde_json::to_value(report(vec![check(
            "ami",
            Status::Fail,
            "gone",
            Some("fix it"),
        )]))
        .unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][0]["status"], "fail");
        assert_eq!(json["checks"][0]["hint"], "fix it");
        let pass = serde_json::to_value(check("vpc", Status::Pass, "ok", None)).unwrap();
        assert!(pass.get("hint").is_none());
    }
}
