//! A fake of the four source-control providers on one loopback HTTPS port,
//! for tests of the runner's SCM client and of git over HTTPS.
//!
//! Paths (they do not collide, so one server plays all four):
//! - GitHub Enterprise: `GET /api/v3/user`,
//!   `GET /api/v3/repos/{owner}/{repo}/pulls/{n}`,
//!   `POST /login/oauth/access_token`; github.com's API at the root
//!   (`GET /user`, `GET /repos/{owner}/{repo}/pulls/{n}`).
//! - GitLab: `GET /api/v4/user`,
//!   `GET /api/v4/projects/{owner%2Frepo}/merge_requests/{n}`,
//!   `POST /oauth/token`.
//! - Bitbucket Cloud: `GET /2.0/user`,
//!   `GET /2.0/repositories/{workspace}/{repo}/pullrequests/{n}`,
//!   `POST /site/oauth2/access_token`.
//! - Azure DevOps: `GET /_apis/profile/profiles/me`,
//!   `GET /_apis/connectionData`,
//!   `GET /{org}/{project}/_apis/git/repositories/{repo}/pullrequests/{n}`,
//!   and Microsoft Entra ID's token endpoint at `POST /entra/token` and
//!   `POST /organizations/oauth2/v2.0/token`.
//! - git's dumb HTTP protocol: `GET /{path}.git/{file}`.
//!
//! Requests are checked as the providers check them: the Authorization
//! header's form for the provider, the token's source and the purpose (API
//! or git), client credentials (HTTP Basic for Bitbucket, form fields for
//! the others), required form fields, single-use codes, PKCE verifiers,
//! token expiry, and refresh tokens that retire the tokens they replace.
//! Where a provider is lenient (any git user name with a personal access
//! token), the fake wants the documented form. Error bodies quote the
//! request's secrets, so a client that echoes them shows in leak scans.
//! The certificate is for 127.0.0.1 and the providers' public host names
//! ([`PUBLIC_NAMES`]), signed by a CA made for this server: a runner that
//! resolves those names to this server ([`FakeScm::resolve`]) talks to it
//! at the providers' real URLs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT, WWW_AUTHENTICATE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng as _;
use runner_core::scm::{AuthSource, ScmKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// The GitHub API version the fake accepts in `X-GitHub-Api-Version`.
const GITHUB_API_VERSION: &str = "2022-11-28";
/// The Entra ID scope that makes it issue refresh tokens.
const OFFLINE_ACCESS: &str = "offline_access";

/// The public host names the fake answers for, at the providers' real
/// URLs, when they resolve to it.
pub const PUBLIC_NAMES: [&str; 8] = [
    "github.com",
    "api.github.com",
    "gitlab.com",
    "bitbucket.org",
    "api.bitbucket.org",
    "dev.azure.com",
    "app.vssps.visualstudio.com",
    "login.microsoftonline.com",
];

/// A running fake provider; stops when dropped.
pub struct FakeScm {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FakeScm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeScm")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeScm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An access token the fake accepts.
struct AccessToken {
    kind: ScmKind,
    source: AuthSource,
    username: String,
    expires_at: Option<Instant>,
}

/// A refresh token and the access token issued with it.
struct RefreshToken {
    kind: ScmKind,
    client_id: String,
    username: String,
    access_token: String,
    lifetime: Duration,
}

/// A registered authorization code.
struct Code {
    kind: ScmKind,
    username: String,
    lifetime: Option<Duration>,
    verifier: Option<String>,
    used: bool,
}

/// A bare repository served over dumb HTTP.
struct Repository {
    kind: ScmKind,
    dir: PathBuf,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, AccessToken>,
    refresh_tokens: HashMap<String, RefreshToken>,
    apps: HashMap<(ScmKind, String), String>,
    codes: HashMap<String, Code>,
    pulls: HashMap<(String, String, u64), String>,
    repositories: HashMap<String, Repository>,
    calls: HashMap<&'static str, usize>,
    issued: Vec<String>,
    outage: Option<StatusCode>,
}

impl FakeScm {
    /// Starts a fake on a free port of 127.0.0.1 with a fresh CA.
    pub async fn start() -> Self {
        let (ca_pem, chain, key) = certificates();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a fresh certificate matches its key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(serve(listener, acceptor, state.clone()));
        Self {
            addr,
            ca_pem,
            state,
            task,
        }
    }

    /// Stops serving and closes every open connection.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `name=127.0.0.1:PORT` for each of [`PUBLIC_NAMES`], comma separated:
    /// the value of runnerd's `--scm-resolve`.
    pub fn resolve(&self) -> String {
        PUBLIC_NAMES
            .iter()
            .map(|name| format!("{name}={}", self.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The PEM of the CA that signed the server's certificate.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the fake's lock is never poisoned")
    }

    /// Accepts `token` of `username`, obtained through `source`, for the API
    /// and git of `kind`. It does not expire.
    pub fn add_token(&self, kind: ScmKind, source: AuthSource, token: &str, username: &str) {
        self.state().tokens.insert(
            token.to_owned(),
            AccessToken {
                kind,
                source,
                username: username.to_owned(),
                expires_at: None,
            },
        );
    }

    /// Stops accepting `token`, an access or refresh token.
    pub fn revoke_token(&self, token: &str) {
        let mut state = self.state();
        state.tokens.remove(token);
        state.refresh_tokens.remove(token);
    }

    /// Registers an OAuth app of `kind`.
    pub fn add_oauth_app(&self, kind: ScmKind, client_id: &str, client_secret: &str) {
        self.state()
            .apps
            .insert((kind, client_id.to_owned()), client_secret.to_owned());
    }

    /// Registers a one-time code of `username` for `kind`'s apps; exchanging
    /// it issues fresh access and refresh tokens valid `expires_in` (`None`:
    /// no expiry and no refresh token, like classic GitHub apps).
    pub fn add_code(
        &self,
        kind: ScmKind,
        code: &str,
        username: &str,
        expires_in: Option<Duration>,
    ) {
        self.insert_code(kind, code, username, expires_in, None);
    }

    /// Like [`FakeScm::add_code`], for a code whose authorization request
    /// carried a PKCE challenge: the exchange must present `code_verifier`.
    pub fn add_code_with_verifier(
        &self,
        kind: ScmKind,
        code: &str,
        username: &str,
        expires_in: Option<Duration>,
        code_verifier: &str,
    ) {
        self.insert_code(kind, code, username, expires_in, Some(code_verifier));
    }

    fn insert_code(
        &self,
        kind: ScmKind,
        code: &str,
        username: &str,
        lifetime: Option<Duration>,
        verifier: Option<&str>,
    ) {
        self.state().codes.insert(
            code.to_owned(),
            Code {
                kind,
                username: username.to_owned(),
                lifetime,
                verifier: verifier.map(str::to_owned),
                used: false,
            },
        );
    }

    /// Adds pull request `number` of `owner/repository` from `branch`, for
    /// every provider; for Azure DevOps `owner` is `organization/project`.
    pub fn add_pull_request(&self, owner: &str, repository: &str, number: u64, branch: &str) {
        self.state().pulls.insert(
            (owner.to_owned(), repository.to_owned(), number),
            branch.to_owned(),
        );
    }

    /// Serves the bare repository `bare_dir` (after `git update-server-info`)
    /// over git's dumb HTTP protocol at `/{path}.git/`, to requests whose
    /// Authorization header presents a valid `kind` token in git's form.
    pub fn add_repository(&self, kind: ScmKind, path: &str, bare_dir: &Path) {
        self.state().repositories.insert(
            path.trim_matches('/').to_owned(),
            Repository {
                kind,
                dir: bare_dir.to_owned(),
            },
        );
    }

    /// Answers every request with `status` (`None`: serve normally).
    pub fn set_outage(&self, status: Option<u16>) {
        self.state().outage =
            status.map(|code| StatusCode::from_u16(code).expect("a valid status code"));
    }

    /// Requests seen by endpoint: `{github,gitlab,bitbucket}.{user,token}`,
    /// `github.pull`, `gitlab.merge_request`, `bitbucket.pull`,
    /// `azure.profile`, `azure.connection_data`, `azure.pull`,
    /// `azure.token` (Entra ID), `git`, `unknown`.
    pub fn calls(&self, name: &str) -> usize {
        self.state().calls.get(name).copied().unwrap_or(0)
    }

    /// Every access and refresh token the fake issued, for leak scans.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state().issued.clone()
    }
}

/// A CA, and a certificate for 127.0.0.1 it signed, with its key.
fn certificates() -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fake SCM test CA");
    let ca = ca_params.self_signed(&ca_key).expect("a CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("a server key");
    let params = rcgen::CertificateParams::new(
        std::iter::once("127.0.0.1")
            .chain(PUBLIC_NAMES)
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    )
    .expect("server parameters");
    let cert = params
        .signed_by(&key, &issuer)
        .expect("a server certificate");
    (
        ca.pem(),
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// Accepts connections until aborted; connections live in a set owned by
/// this task, so aborting it closes them too.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                connections.spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await else {
        return respond(StatusCode::BAD_REQUEST, "text/plain", "unreadable body");
    };
    let body = body.to_bytes();
    let segments: Vec<String> = parts
        .uri
        .path()
        .split('/')
        .skip(1)
        .map(|segment| {
            percent_encoding::percent_decode_str(segment)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let query: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let route = route(&parts.method, &segments);
    let mut state = state.lock().expect("the fake's lock is never poisoned");
    *state.calls.entry(route.name()).or_default() += 1;
    if let Some(status) = state.outage {
        return respond(status, "text/html", "<html>the fake is down</html>");
    }
    state.answer(route, &parts.headers, &query, &body)
}

/// What a request asks for.
enum Route {
    User(ScmKind),
    AzureConnectionData,
    Pull {
        kind: ScmKind,
        owner: String,
        repository: String,
        number: u64,
    },
    Token(ScmKind),
    Git {
        path: String,
        file: Vec<String>,
    },
    Unknown,
}

impl Route {
    fn name(&self) -> &'static str {
        match self {
            Self::User(ScmKind::GitHub) => "github.user",
            Self::User(ScmKind::GitLab) => "gitlab.user",
            Self::User(ScmKind::Bitbucket) => "bitbucket.user",
            Self::User(ScmKind::AzureDevOps) => "azure.profile",
            Self::AzureConnectionData => "azure.connection_data",
            Self::Pull { kind, .. } => match kind {
                ScmKind::GitHub => "github.pull",
                ScmKind::GitLab => "gitlab.merge_request",
                ScmKind::Bitbucket => "bitbucket.pull",
                ScmKind::AzureDevOps => "azure.pull",
            },
            Self::Token(ScmKind::GitHub) => "github.token",
            Self::Token(ScmKind::GitLab) => "gitlab.token",
            Self::Token(ScmKind::Bitbucket) => "bitbucket.token",
            Self::Token(ScmKind::AzureDevOps) => "azure.token",
            Self::Git { .. } => "git",
            Self::Unknown => "unknown",
        }
    }
}

fn pull(kind: ScmKind, owner: &str, repository: &str, number: &str) -> Route {
    match number.parse() {
        Ok(number) => Route::Pull {
            kind,
            owner: owner.to_owned(),
            repository: repository.to_owned(),
            number,
        },
        Err(_) => Route::Unknown,
    }
}

/// Routes by method and percent-decoded path segments.
fn route(method: &Method, segments: &[String]) -> Route {
    use ScmKind::{AzureDevOps, Bitbucket, GitHub, GitLab};
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    match segments.as_slice() {
        ["api", "v3", "user"] | ["user"] if get => Route::User(GitHub),
        ["repos", owner, repo, "pulls", n] if get => pull(GitHub, owner, repo, n),
        ["api", "v3", "repos", owner, repo, "pulls", n] if get => pull(GitHub, owner, repo, n),
        ["login", "oauth", "access_token"] if post => Route::Token(GitHub),
        ["api", "v4", "user"] if get => Route::User(GitLab),
        ["api", "v4", "projects", project, "merge_requests", n] if get => {
            match project.rsplit_once('/') {
                Some((owner, repo)) => pull(GitLab, owner, repo, n),
                None => Route::Unknown,
            }
        }
        ["oauth", "token"] if post => Route::Token(GitLab),
        ["2.0", "user"] if get => Route::User(Bitbucket),
        ["2.0", "repositories", workspace, repo, "pullrequests", n] if get => {
            pull(Bitbucket, workspace, repo, n)
        }
        ["site", "oauth2", "access_token"] if post => Route::Token(Bitbucket),
        ["_apis", "profile", "profiles", "me"] if get => Route::User(AzureDevOps),
        ["_apis", "connectionData"] if get => Route::AzureConnectionData,
        [
            org,
            project,
            "_apis",
            "git",
            "repositories",
            repo,
            "pullrequests",
            n,
        ] if get => pull(AzureDevOps, &format!("{org}/{project}"), repo, n),
        ["entra", "token"] | ["organizations", "oauth2", "v2.0", "token"] if post => {
            Route::Token(AzureDevOps)
        }
        _ if get => {
            let Some(end) = segments
                .iter()
                .position(|segment| segment.len() > 4 && segment.ends_with(".git"))
            else {
                return Route::Unknown;
            };
            let path = segments[..=end].join("/");
            Route::Git {
                path: path.trim_end_matches(".git").to_owned(),
                file: segments[end + 1..]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            }
        }
        _ => Route::Unknown,
    }
}

/// Credentials in an Authorization header.
enum Credentials {
    Bearer(String),
    Basic(String, String),
}

fn credentials(headers: &HeaderMap) -> Option<Credentials> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(Credentials::Bearer(token.to_owned()));
    }
    let decoded = BASE64.decode(value.strip_prefix("Basic ")?).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some(Credentials::Basic(user.to_owned(), password.to_owned()))
}

/// The form a `source` token of `kind` must take: `None` for Bearer, else
/// the HTTP Basic user name (the token being the password).
fn expected_form(kind: ScmKind, source: AuthSource, git: bool) -> Option<&'static str> {
    match (kind, source, git) {
        (ScmKind::AzureDevOps, AuthSource::Pat, false) => Some(""),
        (ScmKind::AzureDevOps, AuthSource::Pat, true) => Some("pat"),
        (ScmKind::AzureDevOps, AuthSource::OAuth, _) | (_, _, false) => None,
        (ScmKind::GitHub, _, true) => Some("x-access-token"),
        (ScmKind::GitLab, _, true) => Some("oauth2"),
        (ScmKind::Bitbucket, _, true) => Some("x-token-auth"),
    }
}

/// Why a token request failed, before mapping to a provider's vocabulary.
enum OAuthFailure {
    InvalidRequest(&'static str),
    UnsupportedGrantType,
    InvalidClient { client_id: String, secret: String },
    InvalidGrant { refresh: bool, value: String },
}

/// Tokens issued by one token request.
struct Issued {
    access: String,
    refresh: Option<String>,
    lifetime: Option<Duration>,
}

impl State {
    fn answer(
        &mut self,
        route: Route,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        match route {
            Route::User(kind) => self.user(kind, headers, query),
            Route::AzureConnectionData => {
                match self.authenticate(ScmKind::AzureDevOps, false, headers) {
                    Some(username) => respond_json(
                        StatusCode::OK,
                        &json!({
                            "authenticatedUser": {
                                "id": "00000000-0000-0000-0000-000000000001",
                                "descriptor": format!("Microsoft.IdentityModel.Claims.ClaimsIdentity;{username}"),
                                "providerDisplayName": username,
                                "isActive": true,
                            },
                            "instanceId": "00000000-0000-0000-0000-000000000002",
                        }),
                    ),
                    None => unauthorized(ScmKind::AzureDevOps, headers),
                }
            }
            Route::Pull {
                kind,
                owner,
                repository,
                number,
            } => self.pull(kind, headers, query, (owner, repository, number)),
            Route::Token(kind) => self.token(kind, headers, body),
            Route::Git { path, file } => self.git(&path, &file, headers),
            Route::Unknown => respond(StatusCode::NOT_FOUND, "text/plain", "not found"),
        }
    }

    /// The user name of a valid token presented for `kind`'s API or git.
    fn authenticate(&self, kind: ScmKind, git: bool, headers: &HeaderMap) -> Option<String> {
        let (user, token) = match credentials(headers)? {
            Credentials::Bearer(token) => (None, token),
            Credentials::Basic(user, token) => (Some(user), token),
        };
        let grant = self.tokens.get(&token)?;
        let fresh = grant.expires_at.is_none_or(|at| Instant::now() < at);
        (grant.kind == kind && fresh && expected_form(kind, grant.source, git) == user.as_deref())
            .then(|| grant.username.clone())
    }

    /// Checks the provider's own API rules; `Some` is the refusal.
    fn api_rules(
        kind: ScmKind,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Option<Response<Full<Bytes>>> {
        match kind {
            ScmKind::GitHub => {
                if !headers.contains_key(USER_AGENT) {
                    return Some(respond_json(
                        StatusCode::FORBIDDEN,
                        &json!({"message": "Request forbidden by administrative rules. Please make sure your request has a User-Agent header"}),
                    ));
                }
                let version = headers.get("x-github-api-version");
                if version
                    .is_some_and(|version| version.as_bytes() != GITHUB_API_VERSION.as_bytes())
                {
                    return Some(respond_json(
                        StatusCode::BAD_REQUEST,
                        &json!({"message": "Unsupported 'X-GitHub-Api-Version' header"}),
                    ));
                }
                None
            }
            ScmKind::AzureDevOps if !query.contains_key("api-version") => Some(respond_json(
                StatusCode::BAD_REQUEST,
                &json!({"message": "VS800075: The project name or api-version is missing."}),
            )),
            _ => None,
        }
    }

    fn user(
        &self,
        kind: ScmKind,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Response<Full<Bytes>> {
        if let Some(refusal) = Self::api_rules(kind, headers, query) {
            return refusal;
        }
        let Some(username) = self.authenticate(kind, false, headers) else {
            return unauthorized(kind, headers);
        };
        let body = match kind {
            ScmKind::GitHub => {
                json!({"login": username, "id": 1, "type": "User", "name": username})
            }
            ScmKind::GitLab => {
                json!({"id": 1, "username": username, "name": username, "state": "active"})
            }
            ScmKind::Bitbucket => json!({
                "type": "user",
                "username": username,
                "nickname": username,
                "display_name": format!("{username} (display)"),
                "account_id": "557058:00000000",
            }),
            ScmKind::AzureDevOps => json!({
                "displayName": format!("{username} (display)"),
                "publicAlias": "00000000-0000-0000-0000-000000000003",
                "emailAddress": username,
                "coreRevision": 1,
                "id": "00000000-0000-0000-0000-000000000003",
            }),
        };
        respond_json(StatusCode::OK, &body)
    }

    fn pull(
        &self,
        kind: ScmKind,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        key: (String, String, u64),
    ) -> Response<Full<Bytes>> {
        if let Some(refusal) = Self::api_rules(kind, headers, query) {
            return refusal;
        }
        if self.authenticate(kind, false, headers).is_none() {
            return unauthorized(kind, headers);
        }
        let number = key.2;
        let Some(branch) = self.pulls.get(&key) else {
            let body = match kind {
                ScmKind::GitHub => json!({"message": "Not Found", "status": "404"}),
                ScmKind::GitLab => json!({"message": "404 Not found"}),
                ScmKind::Bitbucket => {
                    json!({"type": "error", "error": {"message": "Resource not found"}})
                }
                ScmKind::AzureDevOps => {
                    json!({"message": "TF401180: The requested pull request was not found."})
                }
            };
            return respond_json(StatusCode::NOT_FOUND, &body);
        };
        let body = match kind {
            ScmKind::GitHub => json!({
                "number": number,
                "state": "open",
                "head": {"ref": branch, "sha": "0".repeat(40)},
                "base": {"ref": "main"},
            }),
            ScmKind::GitLab => json!({
                "iid": number,
                "state": "opened",
                "source_branch": branch,
                "target_branch": "main",
            }),
            ScmKind::Bitbucket => json!({
                "id": number,
                "state": "OPEN",
                "source": {"branch": {"name": branch}},
                "destination": {"branch": {"name": "main"}},
            }),
            ScmKind::AzureDevOps => json!({
                "pullRequestId": number,
                "status": "active",
                "sourceRefName": format!("refs/heads/{branch}"),
                "targetRefName": "refs/heads/main",
            }),
        };
        respond_json(StatusCode::OK, &body)
    }

    fn token(&mut self, kind: ScmKind, headers: &HeaderMap, body: &[u8]) -> Response<Full<Bytes>> {
        match self.grant(kind, headers, body) {
            Ok(issued) => token_answer(kind, headers, &issued),
            Err(failure) => oauth_error(kind, failure),
        }
    }

    /// Checks a token request and issues its tokens.
    fn grant(
        &mut self,
        kind: ScmKind,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Issued, OAuthFailure> {
        let is_form = headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
        if !is_form {
            return Err(OAuthFailure::InvalidRequest("the body must be a form"));
        }
        let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
        let field = |name: &'static str| {
            form.get(name)
                .filter(|value| !value.is_empty())
                .ok_or(OAuthFailure::InvalidRequest(name))
        };
        let (client_id, secret) = if kind == ScmKind::Bitbucket {
            match credentials(headers) {
                Some(Credentials::Basic(id, secret)) => (id, secret),
                _ => {
                    return Err(OAuthFailure::InvalidClient {
                        client_id: String::new(),
                        secret: String::new(),
                    });
                }
            }
        } else {
            (field("client_id")?.clone(), field("client_secret")?.clone())
        };
        if self.apps.get(&(kind, client_id.clone())) != Some(&secret) {
            return Err(OAuthFailure::InvalidClient { client_id, secret });
        }
        let refresh = match (kind, form.get("grant_type").map(String::as_str)) {
            (_, Some("refresh_token")) => true,
            (_, Some("authorization_code")) | (ScmKind::GitHub, None) => false,
            (_, None) => return Err(OAuthFailure::InvalidRequest("grant_type")),
            (_, Some(_)) => return Err(OAuthFailure::UnsupportedGrantType),
        };
        let offline = if kind == ScmKind::AzureDevOps {
            field("scope")?
                .split(' ')
                .any(|scope| scope == OFFLINE_ACCESS)
        } else {
            true
        };
        if refresh {
            let value = field("refresh_token")?;
            let invalid = || OAuthFailure::InvalidGrant {
                refresh: true,
                value: value.clone(),
            };
            let old = self
                .refresh_tokens
                .get(value)
                .filter(|old| old.kind == kind && old.client_id == client_id)
                .ok_or_else(invalid)?;
            let (username, lifetime, access) =
                (old.username.clone(), old.lifetime, old.access_token.clone());
            // Like GitLab, a refresh retires both tokens it replaces.
            self.refresh_tokens.remove(value);
            self.tokens.remove(&access);
            return Ok(self.issue(kind, &client_id, &username, Some(lifetime), offline));
        }
        let value = field("code")?;
        if matches!(kind, ScmKind::GitLab | ScmKind::AzureDevOps) {
            field("redirect_uri")?;
        }
        let code = self
            .codes
            .get_mut(value)
            .filter(|code| code.kind == kind && !code.used)
            .filter(|code| {
                code.verifier.is_none() || code.verifier.as_ref() == form.get("code_verifier")
            })
            .ok_or_else(|| OAuthFailure::InvalidGrant {
                refresh: false,
                value: value.clone(),
            })?;
        code.used = true;
        let (username, lifetime) = (code.username.clone(), code.lifetime);
        Ok(self.issue(kind, &client_id, &username, lifetime, offline))
    }

    /// Issues an access token valid `lifetime`, and a refresh token when
    /// it expires and `offline` access was granted.
    fn issue(
        &mut self,
        kind: ScmKind,
        client_id: &str,
        username: &str,
        lifetime: Option<Duration>,
        offline: bool,
    ) -> Issued {
        let access = new_token(kind, "access");
        self.tokens.insert(
            access.clone(),
            AccessToken {
                kind,
                source: AuthSource::OAuth,
                username: username.to_owned(),
                expires_at: lifetime.map(|lifetime| Instant::now() + lifetime),
            },
        );
        self.issued.push(access.clone());
        let refresh = match lifetime {
            Some(lifetime) if offline => {
                let refresh = new_token(kind, "refresh");
                self.refresh_tokens.insert(
                    refresh.clone(),
                    RefreshToken {
                        kind,
                        client_id: client_id.to_owned(),
                        username: username.to_owned(),
                        access_token: access.clone(),
                        lifetime,
                    },
                );
                self.issued.push(refresh.clone());
                Some(refresh)
            }
            _ => None,
        };
        Issued {
            access,
            refresh,
            lifetime,
        }
    }

    fn git(&self, path: &str, file: &[String], headers: &HeaderMap) -> Response<Full<Bytes>> {
        let Some(repository) = self.repositories.get(path) else {
            return respond(StatusCode::NOT_FOUND, "text/plain", "Repository not found.");
        };
        if self.authenticate(repository.kind, true, headers).is_none() {
            let mut response = unauthorized(repository.kind, headers);
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Basic realm=\"fake-scm\""),
            );
            return response;
        }
        let unsafe_segment = |segment: &String| {
            segment.is_empty() || segment == "." || segment == ".." || segment.contains(['/', '\\'])
        };
        if file.is_empty() || file.iter().any(unsafe_segment) {
            return respond(StatusCode::NOT_FOUND, "text/plain", "not found");
        }
        match std::fs::read(repository.dir.join(file.join("/"))) {
            Ok(content) => Response::builder()
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(Bytes::from(content)))
                .expect("a valid response"),
            Err(_) => respond(StatusCode::NOT_FOUND, "text/plain", "not found"),
        }
    }
}

/// A fresh random token of `kind`.
fn new_token(kind: ScmKind, what: &str) -> String {
    let prefix = match kind {
        ScmKind::GitHub => "github",
        ScmKind::GitLab => "gitlab",
        ScmKind::Bitbucket => "bitbucket",
        ScmKind::AzureDevOps => "entra",
    };
    let random: u128 = rand::thread_rng().r#gen();
    format!("{prefix}-{what}-{random:032x}")
}

/// Whole seconds, rounded up.
fn seconds(lifetime: Duration) -> u64 {
    lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0)
}

/// A token endpoint's success answer in `kind`'s format.
fn token_answer(kind: ScmKind, headers: &HeaderMap, issued: &Issued) -> Response<Full<Bytes>> {
    let mut body = json!({"access_token": issued.access});
    let extra = match kind {
        ScmKind::GitHub => json!({"token_type": "bearer", "scope": "repo"}),
        ScmKind::GitLab => json!({
            "token_type": "Bearer",
            "scope": "api",
            "created_at": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |now| now.as_secs()),
        }),
        ScmKind::Bitbucket => json!({
            "token_type": "bearer",
            "scopes": "repository",
            "state": "authorization_code",
        }),
        ScmKind::AzureDevOps => json!({
            "token_type": "Bearer",
            "scope": "499b84ac-1321-427f-aa17-267ca6975798/user_impersonation",
        }),
    };
    let fields = body.as_object_mut().expect("built as an object");
    if let Value::Object(extra) = extra {
        fields.extend(extra);
    }
    if let Some(lifetime) = issued.lifetime {
        fields.insert("expires_in".to_owned(), json!(seconds(lifetime)));
        if kind == ScmKind::AzureDevOps {
            fields.insert("ext_expires_in".to_owned(), json!(seconds(lifetime)));
        }
    }
    if let Some(refresh) = &issued.refresh {
        fields.insert("refresh_token".to_owned(), json!(refresh));
        if kind == ScmKind::GitHub {
            fields.insert("refresh_token_expires_in".to_owned(), json!(15_811_200));
        }
    }
    // GitHub answers in form encoding unless asked for JSON.
    let wants_json = headers
        .get(ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("application/json"));
    if kind == ScmKind::GitHub && !wants_json {
        let mut encoded = form_urlencoded::Serializer::new(String::new());
        for (name, value) in fields.iter() {
            match value {
                Value::String(value) => encoded.append_pair(name, value),
                other => encoded.append_pair(name, &other.to_string()),
            };
        }
        return respond(
            StatusCode::OK,
            "application/x-www-form-urlencoded",
            encoded.finish(),
        );
    }
    respond_json(StatusCode::OK, &body)
}

/// A token endpoint's error answer in `kind`'s format. The description
/// quotes the refused secret, which a client must never pass on.
fn oauth_error(kind: ScmKind, failure: OAuthFailure) -> Response<Full<Bytes>> {
    let (status, error, description) = match failure {
        OAuthFailure::InvalidRequest(field) => (
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the request is missing {field}"),
        ),
        OAuthFailure::UnsupportedGrantType => (
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "the grant type is not supported".to_owned(),
        ),
        OAuthFailure::InvalidClient { client_id, secret } => (
            StatusCode::UNAUTHORIZED,
            if kind == ScmKind::GitHub {
                "incorrect_client_credentials"
            } else {
                "invalid_client"
            },
            format!("client authentication failed for {client_id}:{secret}"),
        ),
        OAuthFailure::InvalidGrant { refresh, value } => (
            StatusCode::BAD_REQUEST,
            match (kind, refresh) {
                (ScmKind::GitHub, false) => "bad_verification_code",
                (ScmKind::GitHub, true) => "bad_refresh_token",
                _ => "invalid_grant",
            },
            format!("the grant {value} is invalid, expired, revoked or already used"),
        ),
    };
    // GitHub reports OAuth errors with 200.
    let status = if kind == ScmKind::GitHub {
        StatusCode::OK
    } else {
        status
    };
    respond_json(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// A refused token in `kind`'s format; the body quotes the presented
/// Authorization header.
fn unauthorized(kind: ScmKind, headers: &HeaderMap) -> Response<Full<Bytes>> {
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let message = format!("Bad credentials: {presented}");
    let body = match kind {
        ScmKind::GitHub => json!({"message": message, "status": "401"}),
        ScmKind::GitLab => json!({"message": format!("401 Unauthorized: {presented}")}),
        ScmKind::Bitbucket => json!({"type": "error", "error": {"message": message}}),
        ScmKind::AzureDevOps => json!({"message": format!("TF400813: {message}")}),
    };
    respond_json(StatusCode::UNAUTHORIZED, &body)
}

fn respond_json(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", body.to_string())
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}
