//! `runnerctl`: runs the reference control plane (`serve`) and drives its
//! admin API (every other command).
//!
//! Secrets given to `runnerctl` (PATs, OAuth client secrets) are read from
//! standard input, never from arguments, and sealed to the runner's public key
//! before they leave the process: the control plane never sees them in clear.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use runner_core::sealed::{self, Binding};
use runner_proto::admin::v1::{self as admin, admin_service_client::AdminServiceClient};
use runner_proto::pb::{self, environment_content::Revision, runner_request};
use serde::Serialize;
use serde_json::Value;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::server::{
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TEMPLATE_URL, ServerConfig, Settings, TlsPem,
};
use crate::views::{
    ClassView, CreatedRunnerView, EnvironmentView, HostTokenView, IntegrationView, RunnerView,
    call_outcome, render_text,
};

/// Reference control plane for the AWS runner, and its admin CLI.
#[derive(Debug, Parser)]
#[command(
    name = "runnerctl",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Control plane to talk to (http:// only for loopback).
    #[arg(
        long,
        env = "RUNNERCTL_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7443",
        global = true
    )]
    pub control_plane: String,

    /// PEM file with the CA certificate(s) that sign the control plane's
    /// certificate, in addition to the system's roots.
    #[arg(long, env = "RUNNERCTL_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,

    /// Admin token, when the control plane was started with one.
    #[arg(
        long,
        env = "RUNNERCTL_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,

    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the reference control plane.
    Serve(ServeArgs),
    /// Create and inspect runners.
    #[command(subcommand)]
    Runner(RunnerCommand),
    /// Manage environment classes (instance type and disk); never deleted.
    #[command(subcommand)]
    Class(ClassCommand),
    /// Create, inspect, start, stop and delete environments.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Manage SCM integrations (repository access per host).
    #[command(subcommand)]
    Scm(ScmCommand),
    /// Add and delete users' host tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Send a call to a runner over its stream and print its answer.
    #[command(subcommand)]
    Call(CallCommand),
    /// Publish releases for runners' self-update.
    #[command(subcommand)]
    Release(ReleaseCommand),
}

/// `runnerctl serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "RUNNERCTL_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "RUNNERCTL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "RUNNERCTL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve without TLS. Only allowed on a loopback address.
    #[arg(
        long,
        env = "RUNNERCTL_INSECURE_PLAINTEXT",
        conflicts_with = "tls_cert"
    )]
    pub insecure_plaintext: bool,
    /// URL runners use to reach this server, put into quick-create links
    /// (default: derived from --listen).
    #[arg(long, env = "RUNNERCTL_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Where the CloudFormation template is hosted, for quick-create links.
    #[arg(long, env = "RUNNERCTL_TEMPLATE_URL", default_value = DEFAULT_TEMPLATE_URL)]
    pub template_url: String,
    /// Silence after which a runner shows as INACTIVE (e.g. 90s).
    #[arg(long, env = "RUNNERCTL_INACTIVE_AFTER", default_value = "90s", value_parser = humantime::parse_duration)]
    pub inactive_after: Duration,
    /// How long a new exchange token stays valid (e.g. 24h).
    #[arg(long, env = "RUNNERCTL_EXCHANGE_TOKEN_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub exchange_token_ttl: Duration,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "RUNNERCTL_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// File holding the admin token that admin calls must carry; without it
    /// the admin API is open (fine on loopback, not elsewhere).
    #[arg(long, env = "RUNNERCTL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// `runnerctl runner ...`.
#[derive(Debug, Subcommand)]
pub enum RunnerCommand {
    /// Create a runner; prints its id, a single-use exchange token (valid
    /// 24 h) and the CloudFormation quick-create URL.
    Create {
        /// Name: letters, digits, '-' and '_'.
        #[arg(long)]
        name: String,
        /// AWS region the runner will run in; fixed for its life.
        #[arg(long)]
        region: String,
    },
    /// Show a runner: phase (CREATED, INACTIVE, ACTIVE, DEGRADED), version,
    /// region, degraded message, last seen.
    Get {
        /// Runner id.
        id: String,
    },
    /// List runners.
    List,
    /// Turn self-update on or off for a runner.
    AutoUpdate {
        /// Runner id.
        id: String,
        /// on or off.
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Cut a runner's open watch streams (to exercise reconnects).
    CloseStreams {
        /// Runner id.
        id: String,
    },
}

/// on/off switch.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    fn is_on(self) -> bool {
        matches!(self, Self::On)
    }
}

/// `runnerctl class ...`.
#[derive(Debug, Subcommand)]
pub enum ClassCommand {
    /// Create an environment class for a runner.
    Create {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// EC2 instance type, e.g. m7i.large.
        #[arg(long)]
        instance_type: String,
        /// Root disk size in GiB (8 to 16384).
        #[arg(long)]
        disk_gib: u32,
    },
    /// List a runner's classes.
    List {
        /// Runner id.
        #[arg(long)]
        runner: String,
    },
    /// Enable a class.
    Enable {
        /// Class id.
        id: String,
    },
    /// Disable a class: no new environments; the runner fails those that use it.
    Disable {
        /// Class id.
        id: String,
    },
}

/// `runnerctl env ...`.
#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Create an environment (desired phase RUNNING).
    Create {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// Environment class id.
        #[arg(long)]
        class: String,
        /// Repository https URL.
        #[arg(long)]
        repo: String,
        /// Branch to check out (default: the repository's default branch).
        #[arg(long, conflicts_with = "commit")]
        branch: Option<String>,
        /// Full commit id to check out.
        #[arg(long)]
        commit: Option<String>,
        /// The user creating it, whose host tokens are used.
        #[arg(long, default_value = "admin")]
        creator: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        /// Stop after no client was connected for this long (e.g. 2h).
        #[arg(long, value_parser = humantime::parse_duration)]
        disconnected_timeout: Option<Duration>,
        /// Skip the control plane's checks of class and content (to test how
        /// a runner handles specs it must refuse).
        #[arg(long)]
        unchecked: bool,
    },
    /// Show an environment, with the last status its runner reported.
    Get {
        /// Environment id.
        id: String,
    },
    /// List environments.
    List {
        /// Only this runner's.
        #[arg(long)]
        runner: Option<String>,
    },
    /// Set the desired phase to RUNNING.
    Start {
        /// Environment id.
        id: String,
    },
    /// Set the desired phase to STOPPED (the instance and disk are kept).
    Stop {
        /// Environment id.
        id: String,
    },
    /// Set the desired phase to DELETED.
    Delete {
        /// Environment id.
        id: String,
    },
}

/// SCM host kinds.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    /// GitHub or GitHub Enterprise Server.
    Github,
    /// GitLab.
    Gitlab,
    /// Bitbucket.
    Bitbucket,
    /// Azure DevOps.
    AzureDevops,
}

impl From<Kind> for pb::ScmKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Github => Self::Github,
            Kind::Gitlab => Self::Gitlab,
            Kind::Bitbucket => Self::Bitbucket,
            Kind::AzureDevops => Self::AzureDevops,
        }
    }
}

/// `runnerctl scm ...`.
#[derive(Debug, Subcommand)]
pub enum ScmCommand {
    /// Create an integration for a host.
    Create {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// Kind of host.
        #[arg(long, value_enum)]
        kind: Kind,
        /// Host name, e.g. github.com or git.example.com:8443.
        #[arg(long)]
        host: String,
        /// OAuth app client id; enables OAuth (the secret is read from stdin).
        #[arg(long, requires = "oauth_client_secret_stdin")]
        oauth_client_id: Option<String>,
        /// Read the OAuth client secret from standard input.
        #[arg(long, requires = "oauth_client_id")]
        oauth_client_secret_stdin: bool,
        /// Allow personal access tokens.
        #[arg(long)]
        pat: bool,
        /// API base URL when not the kind's default for the host.
        #[arg(long, default_value = "")]
        api_base_url: String,
        /// OAuth endpoints' base URL when not the kind's default for the host.
        #[arg(long, default_value = "")]
        oauth_base_url: String,
    },
    /// Change an integration; options not given stay as they are.
    Update {
        /// Integration id.
        id: String,
        /// Runner id (its public key seals a new OAuth client secret).
        #[arg(long)]
        runner: String,
        /// New OAuth client id (the secret is read from stdin).
        #[arg(
            long,
            requires = "oauth_client_secret_stdin",
            conflicts_with = "no_oauth"
        )]
        oauth_client_id: Option<String>,
        /// Read the OAuth client secret from standard input.
        #[arg(long, requires = "oauth_client_id")]
        oauth_client_secret_stdin: bool,
        /// Turn OAuth off (the runner deletes the OAuth tokens of this host).
        #[arg(long)]
        no_oauth: bool,
        /// Allow (on) or forbid (off) personal access tokens; off deletes them.
        #[arg(long, value_enum)]
        pat: Option<OnOff>,
        /// New API base URL; "" for the default.
        #[arg(long)]
        api_base_url: Option<String>,
        /// New OAuth base URL; "" for the default.
        #[arg(long)]
        oauth_base_url: Option<String>,
    },
    /// Delete an integration (the runner deletes all its tokens).
    Delete {
        /// Integration id.
        id: String,
    },
    /// List a runner's integrations.
    List {
        /// Runner id.
        #[arg(long)]
        runner: String,
    },
}

/// `runnerctl token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Add a personal access token read from stdin, sealed to the runner's key.
    Add {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// The user the token belongs to.
        #[arg(long)]
        principal: String,
        /// The SCM host.
        #[arg(long)]
        host: String,
        /// Read the token from standard input (required: never an argument).
        #[arg(long, required = true)]
        pat_stdin: bool,
    },
    /// Delete a user's token for a host.
    Delete {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// The user.
        #[arg(long)]
        principal: String,
        /// The SCM host.
        #[arg(long)]
        host: String,
    },
    /// List the tokens held for a runner (never their values).
    List {
        /// Runner id.
        #[arg(long)]
        runner: String,
    },
}

/// `runnerctl call ...`.
#[derive(Debug, Subcommand)]
pub enum CallCommand {
    /// Ping the runner.
    Ping {
        /// Runner id.
        #[arg(long)]
        runner: String,
    },
    /// Ask whether a user has a usable token for a host.
    CheckAuth {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// The user.
        #[arg(long)]
        principal: String,
        /// The SCM host.
        #[arg(long)]
        host: String,
    },
    /// Ask the runner to parse a repository, branch, commit, PR or issue URL.
    ParseContext {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// The user asking.
        #[arg(long, default_value = "admin")]
        principal: String,
        /// The URL.
        #[arg(long)]
        url: String,
    },
    /// Hand the runner an OAuth authorization code (read from stdin) to
    /// exchange for the user's token.
    ExchangeOauth {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// The user who completed the OAuth flow.
        #[arg(long)]
        principal: String,
        /// The SCM host.
        #[arg(long)]
        host: String,
        /// The redirect URI used in the authorization request.
        #[arg(long)]
        redirect_uri: String,
        /// The PKCE code verifier, when PKCE was used.
        #[arg(long, default_value = "")]
        code_verifier: String,
        /// Read the code from standard input (required: never an argument).
        #[arg(long, required = true)]
        code_stdin: bool,
    },
    /// Ask the runner whether an environment class works in its region and AZs.
    ValidateClass {
        /// Runner id.
        #[arg(long)]
        runner: String,
        /// Class id.
        #[arg(long)]
        class: String,
    },
}

/// `runnerctl release ...`.
#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Publish the newest release.
    Publish {
        /// Semantic version.
        #[arg(long)]
        version: String,
        /// Container image: `<repository>@sha256:<digest>` of the runners'
        /// own repository (runners refuse anything else; this control plane
        /// does not check).
        #[arg(long)]
        image: String,
    },
}

type Client = AdminServiceClient<InterceptedService<Channel, AddToken>>;

/// Adds the admin token to every call.
#[derive(Clone)]
pub struct AddToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Opens a channel to the control plane at `url`, verifying TLS against the
/// system roots and `ca_pem`.
pub async fn connect(url: &str, ca_pem: Option<Vec<u8>>) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("--control-plane {url:?} is not a valid URL"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(330));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(pem) = ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).context("configure TLS")?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connect to the control plane at {url}"))
}

fn read_secret_stdin(what: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .with_context(|| format!("read the {what} from standard input"))?;
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    if buf.is_empty() {
        bail!("the {what} read from standard input is empty");
    }
    Ok(buf)
}

fn runner_public_key(public_key: &[u8]) -> anyhow::Result<crypto_box::PublicKey> {
    let key: [u8; 32] = public_key.try_into().map_err(|_| {
        anyhow::anyhow!("the runner has not signed up yet, so its public key is unknown")
    })?;
    Ok(crypto_box::PublicKey::from(key))
}

/// Seals `secret` to a runner's X25519 public key, bound to what it is for
/// (`runner_core::sealed`: the runner opens it only for that purpose,
/// principal and host).
pub fn seal(public_key: &[u8], binding: Binding<'_>, secret: &[u8]) -> anyhow::Result<Vec<u8>> {
    let secret = std::str::from_utf8(secret).context("the secret is not UTF-8")?;
    sealed::seal(&runner_public_key(public_key)?, binding, secret).map_err(anyhow::Error::msg)
}

/// Seals raw bytes to a runner's key, in no format: for tests of what the
/// runner refuses.
pub fn seal_raw(public_key: &[u8], plaintext: &[u8]) -> anyhow::Result<Vec<u8>> {
    runner_public_key(public_key)?
        .seal(&mut crypto_box::aead::OsRng, plaintext)
        .map_err(|_| anyhow::anyhow!("seal the secret"))
}

/// A PAT's binding.
pub fn pat_binding<'a>(principal: &'a str, host: &'a str) -> Binding<'a> {
    Binding {
        purpose: sealed::Purpose::Pat,
        principal,
        host,
    }
}

/// An OAuth client secret's binding.
pub fn client_secret_binding(host: &str) -> Binding<'_> {
    Binding {
        purpose: sealed::Purpose::OAuthClientSecret,
        principal: "",
        host,
    }
}

/// Runs one `runnerctl` command and prints its result.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Serve(args) = cli.command {
        return serve(args).await;
    }
    let ca = match &cli.ca_cert {
        Some(path) => Some(
            std::fs::read(path).with_context(|| format!("read --ca-cert {}", path.display()))?,
        ),
        None => None,
    };
    let channel = connect(&cli.control_plane, ca).await?;
    let admin_token = match &cli.admin_token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("--admin-token has characters not allowed in a header")?,
        ),
        None => None,
    };
    let mut client = AdminServiceClient::with_interceptor(channel, AddToken(admin_token));
    let out = Output { json: cli.json };
    match cli.command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Runner(cmd) => runner(&mut client, cmd, out).await,
        Command::Class(cmd) => class(&mut client, cmd, out).await,
        Command::Env(cmd) => env(&mut client, cmd, out).await,
        Command::Scm(cmd) => scm(&mut client, cmd, out).await,
        Command::Token(cmd) => token(&mut client, cmd, out).await,
        Command::Call(cmd) => call(&mut client, cmd, out).await,
        Command::Release(ReleaseCommand::Publish { version, image }) => {
            client
                .publish_release(admin::PublishReleaseRequest {
                    version: version.clone(),
                    image,
                })
                .await?;
            out.print(&serde_json::json!({ "published": version }), &[])
        }
    }
}

#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    fn print(self, value: &impl Serialize, columns: &[&str]) -> anyhow::Result<()> {
        let value = serde_json::to_value(value).context("encode output")?;
        let text = if self.json {
            serde_json::to_string_pretty(&value).context("encode output")?
        } else {
            render_text(&value, columns)
        };
        println!("{text}");
        Ok(())
    }
}

const RUNNER_COLUMNS: &[&str] = &[
    "id",
    "name",
    "region",
    "phase",
    "version",
    "last_seen",
    "degraded_message",
];
const CLASS_COLUMNS: &[&str] = &["id", "display_name", "instance_type", "disk_gib", "enabled"];
const ENV_COLUMNS: &[&str] = &[
    "id",
    "runner_id",
    "desired_phase",
    "spec_version",
    "phase",
    "instance_id",
    "failure_message",
];
const SCM_COLUMNS: &[&str] = &["id", "kind", "host", "oauth_client_id", "pat_enabled"];
const TOKEN_COLUMNS: &[&str] = &["principal", "host", "username", "added_at"];

async fn runner(client: &mut Client, cmd: RunnerCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        RunnerCommand::Create { name, region } => {
            let created = client
                .create_runner(admin::CreateRunnerRequest { name, region })
                .await?
                .into_inner();
            out.print(&CreatedRunnerView::from(&created), &[])
        }
        RunnerCommand::Get { id } => {
            let runner = client
                .get_runner(admin::GetRunnerRequest { runner_id: id })
                .await?
                .into_inner();
            out.print(&RunnerView::from(&runner), &[])
        }
        RunnerCommand::List => {
            let list = client
                .list_runners(admin::ListRunnersRequest {})
                .await?
                .into_inner();
            let views: Vec<RunnerView> = list.runners.iter().map(RunnerView::from).collect();
            out.print(&views, RUNNER_COLUMNS)
        }
        RunnerCommand::AutoUpdate { id, state } => {
            let runner = client
                .set_runner_auto_update(admin::SetRunnerAutoUpdateRequest {
                    runner_id: id,
                    auto_update: state.is_on(),
                })
                .await?
                .into_inner();
            out.print(&RunnerView::from(&runner), &[])
        }
        RunnerCommand::CloseStreams { id } => {
            let closed = client
                .close_runner_streams(admin::CloseRunnerStreamsRequest { runner_id: id })
                .await?
                .into_inner()
                .closed;
            out.print(&serde_json::json!({ "closed": closed }), &[])
        }
    }
}

async fn class(client: &mut Client, cmd: ClassCommand, out: Output) -> anyhow::Result<()> {
    let class = match cmd {
        ClassCommand::Create {
            runner,
            name,
            instance_type,
            disk_gib,
        } => {
            client
                .create_environment_class(admin::CreateEnvironmentClassRequest {
                    runner_id: runner,
                    display_name: name,
                    instance_type,
                    disk_gib,
                })
                .await?
        }
        ClassCommand::List { runner } => {
            let list = client
                .list_environment_classes(admin::ListEnvironmentClassesRequest {
                    runner_id: runner,
                })
                .await?
                .into_inner();
            let views: Vec<ClassView> = list
                .environment_classes
                .iter()
                .map(ClassView::from)
                .collect();
            return out.print(&views, CLASS_COLUMNS);
        }
        ClassCommand::Enable { id } => {
            client
                .set_environment_class_enabled(admin::SetEnvironmentClassEnabledRequest {
                    environment_class_id: id,
                    enabled: true,
                })
                .await?
        }
        ClassCommand::Disable { id } => {
            client
                .set_environment_class_enabled(admin::SetEnvironmentClassEnabledRequest {
                    environment_class_id: id,
                    enabled: false,
                })
                .await?
        }
    };
    out.print(&ClassView::from(class.get_ref()), &[])
}

async fn env(client: &mut Client, cmd: EnvCommand, out: Output) -> anyhow::Result<()> {
    let (id, phase) = match cmd {
        EnvCommand::Create {
            runner,
            class,
            repo,
            branch,
            commit,
            creator,
            name,
            disconnected_timeout,
            unchecked,
        } => {
            let revision = branch
                .map(Revision::Branch)
                .or(commit.map(Revision::Commit));
            let timeout = disconnected_timeout
                .map(|d| -> anyhow::Result<_> {
                    Ok(pb::EnvironmentTimeout {
                        disconnected: Some(
                            prost_types::Duration::try_from(d)
                                .context("--disconnected-timeout is too long")?,
                        ),
                    })
                })
                .transpose()?;
            let env = client
                .create_environment(admin::CreateEnvironmentRequest {
                    runner_id: runner,
                    environment_class_id: class,
                    content: Some(pb::EnvironmentContent {
                        repository_url: repo,
                        revision,
                    }),
                    creator,
                    name,
                    timeout,
                    unchecked,
                })
                .await?
                .into_inner();
            return out.print(&EnvironmentView::from(&env), &[]);
        }
        EnvCommand::Get { id } => {
            let env = client
                .get_environment(admin::GetEnvironmentRequest { environment_id: id })
                .await?
                .into_inner();
            return out.print(&EnvironmentView::from(&env), &[]);
        }
        EnvCommand::List { runner } => {
            let list = client
                .list_environments(admin::ListEnvironmentsRequest {
                    runner_id: runner.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let views: Vec<EnvironmentView> = list
                .environments
                .iter()
                .map(EnvironmentView::from)
                .collect();
            if out.json {
                return out.print(&views, ENV_COLUMNS);
            }
            // The table shows the status's phase beside the desired one.
            let rows: Vec<Value> = views
                .iter()
                .map(|v| {
                    let mut row = serde_json::to_value(v).unwrap_or_default();
                    if let Some(status) = row.get("status").cloned().filter(|s| !s.is_null()) {
                        row["phase"] = status["phase"].clone();
                        row["instance_id"] = status["instance_id"].clone();
                        row["failure_message"] = status["failure_message"].clone();
                    }
                    row
                })
                .collect();
            return out.print(&rows, ENV_COLUMNS);
        }
        EnvCommand::Start { id } => (id, pb::EnvironmentPhase::Running),
        EnvCommand::Stop { id } => (id, pb::EnvironmentPhase::Stopped),
        EnvCommand::Delete { id } => (id, pb::EnvironmentPhase::Deleted),
    };
    let env = client
        .set_environment_desired_phase(admin::SetEnvironmentDesiredPhaseRequest {
            environment_id: id,
            desired_phase: phase as i32,
        })
        .await?
        .into_inner();
    out.print(&EnvironmentView::from(&env), &[])
}

async fn public_key(client: &mut Client, runner_id: &str) -> anyhow::Result<Vec<u8>> {
    Ok(client
        .get_runner(admin::GetRunnerRequest {
            runner_id: runner_id.to_owned(),
        })
        .await?
        .into_inner()
        .public_key)
}

async fn sealed_oauth(
    client: &mut Client,
    runner_id: &str,
    host: &str,
    client_id: Option<String>,
) -> anyhow::Result<Option<pb::OAuthApp>> {
    let Some(client_id) = client_id else {
        return Ok(None);
    };
    let key = public_key(client, runner_id).await?;
    let secret = read_secret_stdin("OAuth client secret")?;
    Ok(Some(pb::OAuthApp {
        client_id,
        sealed_client_secret: seal(&key, client_secret_binding(host), &secret)?,
    }))
}

/// The host of a runner's integration.
async fn integration_host(
    client: &mut Client,
    runner_id: &str,
    integration_id: &str,
) -> anyhow::Result<String> {
    client
        .list_scm_integrations(admin::ListScmIntegrationsRequest {
            runner_id: runner_id.to_owned(),
        })
        .await?
        .into_inner()
        .integrations
        .into_iter()
        .find(|i| i.id == integration_id)
        .map(|i| i.host)
        .ok_or_else(|| anyhow::anyhow!("runner {runner_id} has no integration {integration_id}"))
}

async fn scm(client: &mut Client, cmd: ScmCommand, out: Output) -> anyhow::Result<()> {
    let integration = match cmd {
        ScmCommand::Create {
            runner,
            kind,
            host,
            oauth_client_id,
            oauth_client_secret_stdin: _,
            pat,
            api_base_url,
            oauth_base_url,
        } => {
            let oauth = sealed_oauth(client, &runner, &host, oauth_client_id).await?;
            client
                .create_scm_integration(admin::CreateScmIntegrationRequest {
                    runner_id: runner,
                    kind: pb::ScmKind::from(kind) as i32,
                    host,
                    oauth,
                    pat_enabled: pat,
                    api_base_url,
                    oauth_base_url,
                })
                .await?
        }
        ScmCommand::Update {
            id,
            runner,
            oauth_client_id,
            oauth_client_secret_stdin: _,
            no_oauth,
            pat,
            api_base_url,
            oauth_base_url,
        } => {
            let oauth = if no_oauth {
                Some(admin::OAuthUpdate { app: None })
            } else if oauth_client_id.is_some() {
                let host = integration_host(client, &runner, &id).await?;
                sealed_oauth(client, &runner, &host, oauth_client_id)
                    .await?
                    .map(|app| admin::OAuthUpdate { app: Some(app) })
            } else {
                None
            };
            client
                .update_scm_integration(admin::UpdateScmIntegrationRequest {
                    integration_id: id,
                    oauth,
                    pat_enabled: pat.map(OnOff::is_on),
                    api_base_url,
                    oauth_base_url,
                })
                .await?
        }
        ScmCommand::Delete { id } => {
            client
                .delete_scm_integration(admin::DeleteScmIntegrationRequest {
                    integration_id: id.clone(),
                })
                .await?;
            return out.print(&serde_json::json!({ "deleted": id }), &[]);
        }
        ScmCommand::List { runner } => {
            let list = client
                .list_scm_integrations(admin::ListScmIntegrationsRequest { runner_id: runner })
                .await?
                .into_inner();
            let views: Vec<IntegrationView> = list
                .integrations
                .iter()
                .map(IntegrationView::from)
                .collect();
            return out.print(&views, SCM_COLUMNS);
        }
    };
    out.print(&IntegrationView::from(integration.get_ref()), &[])
}

async fn token(client: &mut Client, cmd: TokenCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Add {
            runner,
            principal,
            host,
            pat_stdin: _,
        } => {
            let key = public_key(client, &runner).await?;
            let pat = read_secret_stdin("personal access token")?;
            let sealed_token = seal(&key, pat_binding(&principal, &host), &pat)?;
            let token = client
                .add_host_token(admin::AddHostTokenRequest {
                    runner_id: runner,
                    principal,
                    host,
                    sealed_token,
                    timeout_ms: 0,
                })
                .await?
                .into_inner()
                .token
                .unwrap_or_default();
            out.print(&HostTokenView::from(&token), &[])
        }
        TokenCommand::Delete {
            runner,
            principal,
            host,
        } => {
            client
                .delete_host_token(admin::DeleteHostTokenRequest {
                    runner_id: runner,
                    principal: principal.clone(),
                    host: host.clone(),
                })
                .await?;
            out.print(
                &serde_json::json!({ "deleted": { "principal": principal, "host": host } }),
                &[],
            )
        }
        TokenCommand::List { runner } => {
            let list = client
                .list_host_tokens(admin::ListHostTokensRequest { runner_id: runner })
                .await?
                .into_inner();
            let views: Vec<HostTokenView> = list.tokens.iter().map(HostTokenView::from).collect();
            out.print(&views, TOKEN_COLUMNS)
        }
    }
}

async fn call(client: &mut Client, cmd: CallCommand, out: Output) -> anyhow::Result<()> {
    let (runner_id, kind) = match cmd {
        CallCommand::Ping { runner } => (runner, runner_request::Kind::Ping(pb::Ping {})),
        CallCommand::CheckAuth {
            runner,
            principal,
            host,
        } => (
            runner,
            runner_request::Kind::CheckAuthenticationForHost(pb::CheckAuthenticationForHost {
                principal,
                host,
            }),
        ),
        CallCommand::ParseContext {
            runner,
            principal,
            url,
        } => (
            runner,
            runner_request::Kind::ParseContext(pb::ParseContext { principal, url }),
        ),
        CallCommand::ExchangeOauth {
            runner,
            principal,
            host,
            redirect_uri,
            code_verifier,
            code_stdin: _,
        } => {
            let code = String::from_utf8(read_secret_stdin("authorization code")?)
                .context("the authorization code is not UTF-8")?;
            (
                runner,
                runner_request::Kind::ExchangeOauthCode(pb::ExchangeOauthCode {
                    principal,
                    host,
                    code,
                    redirect_uri,
                    code_verifier,
                }),
            )
        }
        CallCommand::ValidateClass { runner, class } => {
            let classes = client
                .list_environment_classes(admin::ListEnvironmentClassesRequest {
                    runner_id: runner.clone(),
                })
                .await?
                .into_inner()
                .environment_classes;
            let class = classes
                .into_iter()
                .find(|c| c.id == class)
                .with_context(|| format!("runner {runner} has no environment class {class}"))?;
            (
                runner,
                runner_request::Kind::ValidateEnvironmentClass(pb::ValidateEnvironmentClass {
                    environment_class: Some(class),
                }),
            )
        }
    };
    let response = client
        .call_runner(admin::CallRunnerRequest {
            runner_id,
            request: Some(pb::RunnerRequest {
                request_id: String::new(),
                kind: Some(kind),
            }),
            timeout_ms: 0,
        })
        .await?
        .into_inner();
    out.print(&call_outcome(&response), &[])
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsPem {
            cert: std::fs::read(cert)
                .with_context(|| format!("read --tls-cert {}", cert.display()))?,
            key: std::fs::read(key).with_context(|| format!("read --tls-key {}", key.display()))?,
        }),
        _ if args.insecure_plaintext => None,
        _ => bail!("give --tls-cert and --tls-key, or --insecure-plaintext on a loopback address"),
    };
    // `serve` refuses plaintext on anything but a loopback address.
    let admin_token = match &args.admin_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("read --admin-token-file {}", path.display()))?
                .trim()
                .to_owned();
            if token.is_empty() {
                bail!("--admin-token-file {} is empty", path.display());
            }
            Some(token)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let local = listener
        .local_addr()
        .context("read the listener's address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public_url = args
        .public_url
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let config = ServerConfig {
        tls,
        max_message_bytes: args.max_message_bytes,
        admin_token,
    };
    let settings = Settings {
        public_url,
        template_url: args.template_url,
        inactive_after: args.inactive_after,
        exchange_token_ttl: args.exchange_token_ttl,
    };
    let plane = crate::ControlPlane::new(settings, Arc::new(crate::SystemClock));
    crate::serve(listener, config, plane, shutdown_signal()).await?;
    tracing::info!("control plane stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
