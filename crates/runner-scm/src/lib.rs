//! The runner's HTTP client to source-control providers (GitHub, GitLab,
//! Bitbucket Cloud, Azure DevOps): who a token belongs to, OAuth code
//! exchange and refresh, and the source branch of a pull request.
//!
//! Invariants: no secret (token, client secret, code, refresh token) and no
//! response body reaches an error message or `Debug` output; an error names
//! at most the host, the status code and a sanitised OAuth error code. TLS
//! is rustls on the aws-lc-rs provider, trusting the platform's roots plus
//! the extra CA certificates given.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode};
use runner_core::scm::{AuthSource, Endpoints, Purpose, ScmKind, authorization};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;
use url::Url;

#[cfg(test)]
mod tests;

/// The largest answer read; providers answer these calls in a few KiB.
const MAX_BODY: usize = 1 << 20;
/// The GitHub REST API version the requests are written for.
const GITHUB_API_VERSION: &str = "2022-11-28";
/// The Azure DevOps REST API version the requests are written for.
const AZURE_API_VERSION: &str = "7.1";
/// Redirects followed (a renamed GitHub repository answers 301), only
/// within the origin, so no token or form body goes to another host.
const MAX_REDIRECTS: usize = 5;

/// Why a call to a provider failed, or the client could not be built.
/// Messages never carry a secret or a response body; an error names at
/// most the host, the status code, a sanitised OAuth error code and what
/// was looked up.
#[derive(Debug, thiserror::Error)]
pub enum ScmError {
    /// The token holds characters an HTTP header cannot carry.
    #[error("the token holds characters a header cannot carry")]
    TokenNotHeaderSafe,
    /// The provider refused the token (401/403, or Azure DevOps' 203).
    #[error("the token was refused by {host} ({})", status.as_u16())]
    TokenRefused {
        /// Host and port.
        host: String,
        /// The answer's status.
        status: StatusCode,
    },
    /// The token endpoint refused the client credentials with an OAuth
    /// error (`invalid_client` and the like).
    #[error("{host} refused the client credentials: {error}")]
    ClientRefused {
        /// Host and port.
        host: String,
        /// The sanitised OAuth error code.
        error: String,
    },
    /// The token endpoint refused the client credentials with a status
    /// (401/403) and no OAuth error.
    #[error("the client credentials were refused by {host} ({})", status.as_u16())]
    ClientStatus {
        /// Host and port.
        host: String,
        /// The answer's status.
        status: StatusCode,
    },
    /// The token endpoint refused the code or refresh token with an OAuth
    /// error.
    #[error("{host} refused the {grant}: {error}")]
    GrantRefused {
        /// Host and port.
        host: String,
        /// What was traded.
        grant: Grant,
        /// The sanitised OAuth error code.
        error: String,
    },
    /// What was looked up does not exist, or the token may not see it (404).
    #[error("{what} was not found on {host}")]
    NotFound {
        /// Host and port.
        host: String,
        /// The user, or the pull request of a repository.
        what: String,
    },
    /// The token endpoint answered 404.
    #[error("{host} has no OAuth token endpoint there")]
    NoTokenEndpoint {
        /// Host and port.
        host: String,
    },
    /// An Azure DevOps owner that is not `organization/project`.
    #[error("{owner} is not an Azure DevOps organization/project")]
    NotAzureProject {
        /// The owner given.
        owner: String,
    },
    /// The request timed out.
    #[error("the request to {host} timed out")]
    Timeout {
        /// Host and port.
        host: String,
    },
    /// No connection could be made.
    #[error("could not connect to {host}: {cause}")]
    Connect {
        /// Host and port.
        host: String,
        /// The innermost cause's message (a refused connection, a
        /// certificate problem): it precedes sending anything, so it holds
        /// no secret, and unlike the outer errors it does not name the URL.
        cause: String,
    },
    /// The request failed after the connection was made.
    #[error("the request to {host} failed")]
    Request {
        /// Host and port.
        host: String,
    },
    /// The answer is larger than the client reads.
    #[error("the answer from {host} is too large ({status})")]
    TooLarge {
        /// Host and port.
        host: String,
        /// The answer's status.
        status: StatusCode,
    },
    /// The provider is rate limiting the client (403 with a rate-limit
    /// header, or 429).
    #[error("{host} is rate limiting ({})", status.as_u16())]
    RateLimited {
        /// Host and port.
        host: String,
        /// The answer's status.
        status: StatusCode,
    },
    /// An unexpected status (5xx and the like).
    #[error("{host} answered {}", status.as_u16())]
    Status {
        /// Host and port.
        host: String,
        /// The answer's status.
        status: StatusCode,
    },
    /// A body that is not the JSON expected.
    #[error("{host} answered {} with an unreadable body", status.as_u16())]
    Unreadable {
        /// Host and port.
        host: String,
        /// The answer's status.
        status: StatusCode,
    },
    /// A user answer without a user name.
    #[error("{host} answered without a user name")]
    NoUserName {
        /// Host and port.
        host: String,
    },
    /// A pull request answer without a source branch.
    #[error("{host} answered without a source branch")]
    NoSourceBranch {
        /// Host and port.
        host: String,
    },
    /// A token answer without an access token.
    #[error("{host} answered without an access token")]
    NoAccessToken {
        /// Host and port.
        host: String,
    },
    /// A token that is not a bearer token.
    #[error("{host} issued a token that is not a bearer token")]
    NotBearer {
        /// Host and port.
        host: String,
    },
    /// The extra CA certificates are not PEM.
    #[error("the extra CA certificates are not valid PEM")]
    CaNotPem(#[source] rustls::pki_types::pem::Error),
    /// An extra CA certificate was refused as a trust anchor.
    #[error("an extra CA certificate was refused")]
    CaRefused(#[source] rustls::Error),
    /// The extra CA certificates hold no certificate.
    #[error("the extra CA certificates hold no certificate")]
    NoCa,
    /// TLS could not be set up.
    #[error("TLS setup failed")]
    Tls(#[source] rustls::Error),
    /// The HTTP client could not be built.
    #[error("the HTTP client could not be built")]
    Client(#[source] reqwest::Error),
}

/// What a failed call means for its caller, whichever the problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScmErrorKind {
    /// The provider refused the token or the OAuth client credentials.
    Unauthorized,
    /// The provider refused a code or refresh token with an OAuth error.
    Rejected,
    /// The user, repository or pull request does not exist, or the token
    /// may not see it.
    NotFound,
    /// The provider could not be reached or answered unexpectedly (network
    /// error, timeout, rate limit, 5xx, unreadable answer): worth retrying.
    Unavailable,
    /// The client could not be built (bad extra CA certificates).
    Config,
}

impl ScmError {
    /// What the failure means for the caller.
    pub fn kind(&self) -> ScmErrorKind {
        match self {
            Self::TokenNotHeaderSafe
            | Self::TokenRefused { .. }
            | Self::ClientRefused { .. }
            | Self::ClientStatus { .. } => ScmErrorKind::Unauthorized,
            Self::GrantRefused { .. } => ScmErrorKind::Rejected,
            Self::NotFound { .. } | Self::NoTokenEndpoint { .. } | Self::NotAzureProject { .. } => {
                ScmErrorKind::NotFound
            }
            Self::Timeout { .. }
            | Self::Connect { .. }
            | Self::Request { .. }
            | Self::TooLarge { .. }
            | Self::RateLimited { .. }
            | Self::Status { .. }
            | Self::Unreadable { .. }
            | Self::NoUserName { .. }
            | Self::NoSourceBranch { .. }
            | Self::NoAccessToken { .. }
            | Self::NotBearer { .. } => ScmErrorKind::Unavailable,
            Self::CaNotPem(_)
            | Self::CaRefused(_)
            | Self::NoCa
            | Self::Tls(_)
            | Self::Client(_) => ScmErrorKind::Config,
        }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ScmErrorKind::Unavailable
    }

    /// A low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self.kind() {
            ScmErrorKind::Unauthorized => "unauthorized",
            ScmErrorKind::Rejected => "rejected",
            ScmErrorKind::NotFound => "not_found",
            ScmErrorKind::Unavailable => "unavailable",
            ScmErrorKind::Config => "config",
        }
    }
}

/// Tokens issued by an OAuth code exchange or refresh.
pub struct TokenSet {
    /// The access token.
    pub access_token: SecretString,
    /// The refresh token, when the provider issued one.
    pub refresh_token: Option<SecretString>,
    /// When the access token expires, when the provider said.
    pub expires_at: Option<SystemTime>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &"[redacted]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// An HTTP client to source-control providers; cheap to clone.
#[derive(Debug, Clone)]
pub struct ScmClient {
    http: reqwest::Client,
}

/// An answer read in full.
struct Reply {
    status: StatusCode,
    rate_limited: bool,
    body: Vec<u8>,
}

/// Which OAuth grant a token request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// An authorization code.
    Code,
    /// A refresh token.
    Refresh,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Code => "code",
            Self::Refresh => "refresh token",
        })
    }
}

impl ScmClient {
    /// A client trusting the platform's root certificates plus those in
    /// `extra_ca_pem`, giving up on a call after `timeout`.
    pub fn new(
        extra_ca_pem: Option<&[u8]>,
        timeout: Duration,
        user_agent: &str,
        resolve: &[(String, std::net::SocketAddr)],
    ) -> Result<Self, ScmError> {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable or unparsable system certificates are skipped: the
        // extra CA certificates may be all a private host needs.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(pem) = extra_ca_pem {
            let mut added = 0_usize;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(ScmError::CaNotPem)?;
                roots.add(cert).map_err(ScmError::CaRefused)?;
                added += 1;
            }
            if added == 0 {
                return Err(ScmError::NoCa);
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ScmError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = reqwest::Client::builder();
        for (name, addr) in resolve {
            http = http.resolve(name, *addr);
        }
        let http = http
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(user_agent)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let same_origin = attempt
                    .previous()
                    .first()
                    .is_some_and(|first| first.origin() == attempt.url().origin());
                if same_origin && attempt.previous().len() <= MAX_REDIRECTS {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }))
            .build()
            .map_err(ScmError::Client)?;
        Ok(Self { http })
    }

    /// Who the token belongs to (username, login or email), via
    /// `endpoints.user`.
    pub async fn whoami(
        &self,
        kind: ScmKind,
        source: AuthSource,
        endpoints: &Endpoints,
        token: &SecretString,
    ) -> Result<String, ScmError> {
        let host = display_host(&endpoints.user);
        let request = self.api_get(kind, source, endpoints.user.clone(), token)?;
        let reply = self.send(request, &host).await?;
        check_api_status(&reply, &host, "the user")?;
        let body = json(&reply, &host)?;
        username(kind, &body).ok_or(ScmError::NoUserName { host })
    }

    /// Exchanges an authorization code for tokens at `endpoints.token`.
    #[allow(clippy::too_many_arguments)]
    pub async fn exchange_code(
        &self,
        kind: ScmKind,
        endpoints: &Endpoints,
        client_id: &str,
        client_secret: &SecretString,
        code: &SecretString,
        redirect_uri: &str,
        code_verifier: Option<&str>,
    ) -> Result<TokenSet, ScmError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose_secret()),
            ("redirect_uri", redirect_uri),
        ];
        if kind == ScmKind::AzureDevOps {
            form.push(("scope", endpoints.scope));
        }
        // Unknown parameters are ignored (RFC 6749 3.2), so the verifier
        // goes to every provider.
        if let Some(verifier) = code_verifier {
            form.push(("code_verifier", verifier));
        }
        self.token_request(kind, endpoints, client_id, client_secret, form, Grant::Code)
            .await
    }

    /// Trades a refresh token for new tokens at `endpoints.token`.
    pub async fn refresh(
        &self,
        kind: ScmKind,
        endpoints: &Endpoints,
        client_id: &str,
        client_secret: &SecretString,
        refresh_token: &SecretString,
    ) -> Result<TokenSet, ScmError> {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
        ];
        if kind == ScmKind::AzureDevOps {
            form.push(("scope", endpoints.scope));
        }
        self.token_request(
            kind,
            endpoints,
            client_id,
            client_secret,
            form,
            Grant::Refresh,
        )
        .await
    }

    /// The source branch of pull (merge) request `number` of
    /// `owner/repository`; for Azure DevOps `owner` is
    /// `organization/project`.
    #[allow(clippy::too_many_arguments)]
    pub async fn pull_request_branch(
        &self,
        kind: ScmKind,
        source: AuthSource,
        endpoints: &Endpoints,
        token: &SecretString,
        owner: &str,
        repository: &str,
        number: u64,
    ) -> Result<String, ScmError> {
        let url = pull_request_url(kind, &endpoints.api, owner, repository, number)?;
        let host = display_host(&url);
        let request = self.api_get(kind, source, url, token)?;
        let reply = self.send(request, &host).await?;
        check_api_status(
            &reply,
            &host,
            &format!("pull request {number} of {owner}/{repository}"),
        )?;
        let body = json(&reply, &host)?;
        pull_request_source(kind, &body).ok_or(ScmError::NoSourceBranch { host })
    }

    /// A GET presenting `token` for API use.
    fn api_get(
        &self,
        kind: ScmKind,
        source: AuthSource,
        url: Url,
        token: &SecretString,
    ) -> Result<RequestBuilder, ScmError> {
        let mut credentials = HeaderValue::from_str(&authorization(
            kind,
            source,
            token.expose_secret(),
            Purpose::Api,
        ))
        .map_err(|_| ScmError::TokenNotHeaderSafe)?;
        credentials.set_sensitive(true);
        let request = self.http.get(url).header(AUTHORIZATION, credentials);
        Ok(match kind {
            ScmKind::GitHub => request
                .header(ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", GITHUB_API_VERSION),
            ScmKind::GitLab | ScmKind::Bitbucket | ScmKind::AzureDevOps => {
                request.header(ACCEPT, "application/json")
            }
        })
    }

    /// POSTs an OAuth token request and reads the tokens from the answer.
    async fn token_request(
        &self,
        kind: ScmKind,
        endpoints: &Endpoints,
        client_id: &str,
        client_secret: &SecretString,
        mut form: Vec<(&str, &str)>,
        grant: Grant,
    ) -> Result<TokenSet, ScmError> {
        let host = display_host(&endpoints.token);
        let request = self
            .http
            .post(endpoints.token.clone())
            .header(ACCEPT, "application/json");
        let request = if kind == ScmKind::Bitbucket {
            // Bitbucket takes the client credentials only as HTTP Basic;
            // reqwest marks the header sensitive.
            request.basic_auth(client_id, Some(client_secret.expose_secret()))
        } else {
            form.push(("client_id", client_id));
            form.push(("client_secret", client_secret.expose_secret()));
            request
        };
        let reply = self.send(request.form(&form), &host).await?;
        token_set(&reply, &host, grant)
    }

    /// Sends `request` and reads the answer, at most [`MAX_BODY`] bytes.
    async fn send(&self, request: RequestBuilder, host: &str) -> Result<Reply, ScmError> {
        let mut response = request.send().await.map_err(|err| transport(host, &err))?;
        let status = response.status();
        let rate_limited = rate_limited(response.headers());
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| transport(host, &err))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(ScmError::TooLarge {
                    host: host.to_owned(),
                    status,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            rate_limited,
            body,
        })
    }
}

/// `host` or `host:port` of `url`, for messages.
fn display_host(url: &Url) -> String {
    let host = url.host_str().unwrap_or("the provider");
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// An Unavailable error for a failed exchange. Only a connection error's
/// cause is named: it precedes sending anything, so it holds no secret.
fn transport(host: &str, err: &reqwest::Error) -> ScmError {
    let host = host.to_owned();
    if err.is_timeout() {
        return ScmError::Timeout { host };
    }
    if err.is_connect() {
        let mut cause: &dyn std::error::Error = err;
        while let Some(source) = cause.source() {
            cause = source;
        }
        return ScmError::Connect {
            host,
            cause: cause.to_string(),
        };
    }
    ScmError::Request { host }
}

/// Whether the answer says the client is being rate limited (GitHub answers
/// 403 with `x-ratelimit-remaining: 0` or `retry-after`).
fn rate_limited(headers: &HeaderMap) -> bool {
    headers.contains_key(RETRY_AFTER)
        || headers
            .get("x-ratelimit-remaining")
            .is_some_and(|remaining| remaining.as_bytes() == b"0")
}

/// Classifies an API answer's status; `what` names the thing looked up.
fn check_api_status(reply: &Reply, host: &str, what: &str) -> Result<(), ScmError> {
    let status = reply.status;
    let host = host.to_owned();
    // Azure DevOps answers a refused token with 203 and a sign-in page.
    if status == StatusCode::NON_AUTHORITATIVE_INFORMATION {
        return Err(ScmError::TokenRefused { host, status });
    }
    if status.is_success() {
        return Ok(());
    }
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if !reply.rate_limited => {
            ScmError::TokenRefused { host, status }
        }
        StatusCode::NOT_FOUND => ScmError::NotFound {
            host,
            what: what.to_owned(),
        },
        StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => {
            ScmError::RateLimited { host, status }
        }
        _ => ScmError::Status { host, status },
    })
}

/// The answer's body as JSON.
fn json(reply: &Reply, host: &str) -> Result<Value, ScmError> {
    // serde's message may quote the body, so it is dropped.
    serde_json::from_slice(&reply.body).map_err(|_| ScmError::Unreadable {
        host: host.to_owned(),
        status: reply.status,
    })
}

/// The tokens in a token endpoint's answer, or the error it names.
fn token_set(reply: &Reply, host: &str, grant: Grant) -> Result<TokenSet, ScmError> {
    let status = reply.status;
    let host = host.to_owned();
    if status.is_server_error() {
        return Err(ScmError::Status { host, status });
    }
    let body = serde_json::from_slice::<Value>(&reply.body).ok();
    // GitHub reports OAuth errors with 200; the others with 400 or 401.
    if let Some(error) = body.as_ref().and_then(|body| body.get("error")?.as_str()) {
        let error = oauth_error_code(error);
        return Err(match error.as_str() {
            "invalid_client" | "incorrect_client_credentials" | "unauthorized_client" => {
                ScmError::ClientRefused { host, error }
            }
            _ => ScmError::GrantRefused { host, grant, error },
        });
    }
    if !status.is_success() {
        return Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                ScmError::ClientStatus { host, status }
            }
            StatusCode::NOT_FOUND => ScmError::NoTokenEndpoint { host },
            _ => ScmError::Status { host, status },
        });
    }
    let Some(body) = body else {
        return Err(ScmError::Unreadable { host, status });
    };
    let secret = |field: &str| {
        body.get(field)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .map(|value| SecretString::from(value.to_owned()))
    };
    let Some(access_token) = secret("access_token") else {
        return Err(ScmError::NoAccessToken { host });
    };
    if let Some(token_type) = body.get("token_type").and_then(Value::as_str)
        && !token_type.eq_ignore_ascii_case("bearer")
    {
        return Err(ScmError::NotBearer { host });
    }
    let expires_in = match body.get("expires_in") {
        Some(Value::Number(seconds)) => seconds.as_u64(),
        // Older Microsoft endpoints send the number as a string.
        Some(Value::String(seconds)) => seconds.parse().ok(),
        _ => None,
    };
    Ok(TokenSet {
        access_token,
        refresh_token: secret("refresh_token"),
        expires_at: expires_in
            .and_then(|seconds| SystemTime::now().checked_add(Duration::from_secs(seconds))),
    })
}

/// An OAuth `error` value reduced to `[a-z_]`, at most 64 characters.
fn oauth_error_code(error: &str) -> String {
    let code: String = error
        .chars()
        .filter(|c| c.is_ascii_lowercase() || *c == '_')
        .take(64)
        .collect();
    if code.is_empty() {
        "unknown_error".to_owned()
    } else {
        code
    }
}

/// A non-empty string at `pointer` (RFC 6901) in `body`.
fn text(body: &Value, pointer: &str) -> Option<String> {
    body.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
}

/// The user name in a user endpoint's answer.
fn username(kind: ScmKind, body: &Value) -> Option<String> {
    match kind {
        ScmKind::GitHub => text(body, "/login"),
        ScmKind::GitLab => text(body, "/username"),
        ScmKind::Bitbucket => text(body, "/username")
            .or_else(|| text(body, "/nickname"))
            .or_else(|| text(body, "/display_name")),
        // Azure DevOps Server's connectionData, or the public profile.
        ScmKind::AzureDevOps if body.get("authenticatedUser").is_some() => {
            text(body, "/authenticatedUser/providerDisplayName")
        }
        ScmKind::AzureDevOps => text(body, "/emailAddress").or_else(|| text(body, "/displayName")),
    }
}

/// `base` with `segments` appended, each percent-encoded (a `/` inside one
/// becomes `%2F`).
fn join(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    // Only URLs like `mailto:` cannot be a base; endpoints are http(s).
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Where the pull request lives in `kind`'s REST API.
fn pull_request_url(
    kind: ScmKind,
    api: &Url,
    owner: &str,
    repository: &str,
    number: u64,
) -> Result<Url, ScmError> {
    let number = number.to_string();
    Ok(match kind {
        ScmKind::GitHub => join(api, &["repos", owner, repository, "pulls", &number]),
        ScmKind::GitLab => join(
            api,
            &[
                "projects",
                &format!("{owner}/{repository}"),
                "merge_requests",
                &number,
            ],
        ),
        ScmKind::Bitbucket => join(
            api,
            &["repositories", owner, repository, "pullrequests", &number],
        ),
        ScmKind::AzureDevOps => {
            let Some((organization, project)) = owner
                .split_once('/')
                .filter(|(organization, project)| !organization.is_empty() && !project.is_empty())
            else {
                return Err(ScmError::NotAzureProject {
                    owner: owner.to_owned(),
                });
            };
            let mut url = join(
                api,
                &[
                    organization,
                    project,
                    "_apis",
                    "git",
                    "repositories",
                    repository,
                    "pullrequests",
                    &number,
                ],
            );
            url.query_pairs_mut()
                .append_pair("api-version", AZURE_API_VERSION);
            url
        }
    })
}

/// The source branch in a pull request's answer.
fn pull_request_source(kind: ScmKind, body: &Value) -> Option<String> {
    match kind {
        ScmKind::GitHub => text(body, "/head/ref"),
        ScmKind::GitLab => text(body, "/source_branch"),
        ScmKind::Bitbucket => text(body, "/source/branch/name"),
        ScmKind::AzureDevOps => text(body, "/sourceRefName").map(|name| {
            name.strip_prefix("refs/heads/")
                .map_or(name.clone(), str::to_owned)
        }),
    }
}
