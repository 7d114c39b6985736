//! Source-control hosts: the providers the runner knows, where their APIs
//! live, what their URLs mean, how a token is presented, and which stored
//! tokens an integration still allows. Pure: no I/O.

use std::collections::BTreeSet;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use url::{Host, Url};
use uuid::Uuid;

/// A kind of source-control host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScmKind {
    /// GitHub (github.com) and GitHub Enterprise Server.
    GitHub,
    /// GitLab (gitlab.com) and self-managed GitLab.
    GitLab,
    /// Bitbucket Cloud (bitbucket.org) only.
    Bitbucket,
    /// Azure DevOps Services (dev.azure.com) and Azure DevOps Server.
    AzureDevOps,
}

/// Every provider, in announcement order.
pub const PROVIDERS: [ScmKind; 4] = [
    ScmKind::GitHub,
    ScmKind::GitLab,
    ScmKind::Bitbucket,
    ScmKind::AzureDevOps,
];

/// How a user's token for a host was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthSource {
    /// Through the integration's OAuth app.
    OAuth,
    /// A personal access token the user pasted.
    Pat,
}

impl AuthSource {
    /// `"oauth"` or `"pat"`: the form used in keys and encryption contexts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OAuth => "oauth",
            Self::Pat => "pat",
        }
    }

    /// The inverse of [`AuthSource::as_str`].
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "oauth" => Some(Self::OAuth),
            "pat" => Some(Self::Pat),
            _ => None,
        }
    }
}

/// An integration's OAuth app.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthApp {
    /// The app's client id.
    pub client_id: String,
    /// The client secret, sealed to the runner's public key.
    pub sealed_client_secret: Vec<u8>,
}

impl std::fmt::Debug for OAuthApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthApp")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Repository access to one host, as the admin configured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Integration {
    /// The integration id.
    pub id: Uuid,
    /// The provider.
    pub kind: ScmKind,
    /// Host name with port when not 443, lowercase (e.g. "github.com").
    pub host: String,
    /// OAuth app; `None` means OAuth is off.
    pub oauth: Option<OAuthApp>,
    /// Whether personal access tokens are allowed.
    pub pat_enabled: bool,
    /// The REST API base when not the kind's default for the host.
    pub api_base_url: Option<String>,
    /// The OAuth endpoints' base when not the kind's default for the host.
    pub oauth_base_url: Option<String>,
}

impl Integration {
    /// The methods this integration offers, OAuth first.
    pub fn methods(&self) -> Vec<AuthSource> {
        let mut methods = Vec::new();
        if self.oauth.is_some() {
            methods.push(AuthSource::OAuth);
        }
        if self.pat_enabled {
            methods.push(AuthSource::Pat);
        }
        methods
    }

    /// Whether tokens obtained through `source` are still allowed.
    pub fn allows(&self, source: AuthSource) -> bool {
        match source {
            AuthSource::OAuth => self.oauth.is_some(),
            AuthSource::Pat => self.pat_enabled,
        }
    }
}

/// Where a provider's endpoints are for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The REST API base (no trailing slash), e.g. `https://api.github.com`.
    pub api: Url,
    /// GET with a token: who the token belongs to.
    pub user: Url,
    /// OAuth token endpoint (code exchange and refresh).
    pub token: Url,
    /// OAuth authorization endpoint (where users are sent).
    pub authorize: Url,
    /// OAuth scopes to request, space separated.
    pub scope: &'static str,
}

impl Endpoints {
    /// Where a token obtained through these endpoints may be presented: the
    /// API base and the OAuth token endpoint. Stored tokens are bound to it
    /// (it is part of their encryption context), so a token is only ever
    /// presented where it was issued.
    pub fn binding(&self) -> String {
        format!("{} {}", self.api, self.token)
    }
}

/// What a token is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// REST API calls.
    Api,
    /// git over HTTPS.
    Git,
}

/// What a context URL points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The repository (its default branch).
    Repository,
    /// A branch.
    Branch(String),
    /// A full commit id.
    Commit(String),
    /// A pull/merge request by number; its source branch needs the API.
    PullRequest(u64),
    /// An issue: the repository's default branch.
    Issue(u64),
}

/// A parsed context URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextUrl {
    /// The provider.
    pub kind: ScmKind,
    /// Host name with port when not 443, lowercase.
    pub host: String,
    /// Owner: user, organization, group path, or `organization/project`.
    pub owner: String,
    /// Repository name.
    pub repository: String,
    /// https clone URL.
    pub clone_url: String,
    /// What the URL points at.
    pub target: Target,
}

/// Identifies one stored token: one per (principal, host, source).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    /// The user.
    pub principal: String,
    /// Host name with port when not 443.
    pub host: String,
    /// How it was obtained.
    pub source: AuthSource,
}

/// The kind of a public host, when `host` is one of the providers' public
/// hosts (github.com, gitlab.com, bitbucket.org, dev.azure.com).
pub fn public_kind(host: &str) -> Option<ScmKind> {
    match host {
        "github.com" => Some(ScmKind::GitHub),
        "gitlab.com" => Some(ScmKind::GitLab),
        "bitbucket.org" => Some(ScmKind::Bitbucket),
        "dev.azure.com" => Some(ScmKind::AzureDevOps),
        _ => None,
    }
}

/// The host (`name` or `name:port`, lowercase, port omitted when 443) of an
/// https URL; the error names the problem and never echoes credentials.
pub fn host_of(url: &str) -> Result<String, String> {
    host_port(&parse_https(url)?)
}

/// The endpoints of `kind` on `host`, honouring the overrides. An override
/// must be on `host` itself (same name and port), https (http only when
/// `host` is a loopback address), and is refused for the public hosts: the
/// control plane cannot send users' tokens anywhere else.
pub fn endpoints(
    kind: ScmKind,
    host: &str,
    api_base_url: Option<&str>,
    oauth_base_url: Option<&str>,
) -> Result<Endpoints, String> {
    let host = normalize_host(host)?;
    let api_override = api_base_url
        .map(|value| base_override("api_base_url", value, &host))
        .transpose()?;
    let oauth_override = oauth_base_url
        .map(|value| base_override("oauth_base_url", value, &host))
        .transpose()?;
    let (api_default, oauth_default) = match kind {
        ScmKind::GitHub if host == "github.com" => (
            "https://api.github.com".to_owned(),
            "https://github.com".to_owned(),
        ),
        ScmKind::GitHub => (format!("https://{host}/api/v3"), format!("https://{host}")),
        ScmKind::GitLab => (format!("https://{host}/api/v4"), format!("https://{host}")),
        ScmKind::Bitbucket if host == "bitbucket.org" => (
            "https://api.bitbucket.org/2.0".to_owned(),
            "https://bitbucket.org".to_owned(),
        ),
        ScmKind::Bitbucket => return Err(BITBUCKET_CLOUD_ONLY.to_owned()),
        ScmKind::AzureDevOps => (format!("https://{host}"), ENTRA_ID.to_owned()),
    };
    let api = api_override.unwrap_or(api_default);
    let oauth = oauth_override.unwrap_or(oauth_default);
    let (user, token, authorize, scope) = match kind {
        ScmKind::GitHub => (
            format!("{api}/user"),
            format!("{oauth}/login/oauth/access_token"),
            format!("{oauth}/login/oauth/authorize"),
            "repo read:user",
        ),
        ScmKind::GitLab => (
            format!("{api}/user"),
            format!("{oauth}/oauth/token"),
            format!("{oauth}/oauth/authorize"),
            "read_api read_repository",
        ),
        ScmKind::Bitbucket => (
            format!("{api}/user"),
            format!("{oauth}/site/oauth2/access_token"),
            format!("{oauth}/site/oauth2/authorize"),
            "repository pullrequest account",
        ),
        ScmKind::AzureDevOps => {
            // Services answers "who am I" on the profile service, not the
            // organization host; Server has no profile service.
            let user = if host == "dev.azure.com" {
                "https://app.vssps.visualstudio.com/_apis/profile/profiles/me?api-version=7.1"
                    .to_owned()
            } else {
                format!("{api}/_apis/connectionData")
            };
            (
                user,
                format!("{oauth}/token"),
                format!("{oauth}/authorize"),
                "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access",
            )
        }
    };
    Ok(Endpoints {
        api: built_url(&api)?,
        user: built_url(&user)?,
        token: built_url(&token)?,
        authorize: built_url(&authorize)?,
        scope,
    })
}

/// The authorization URL to send a user to: the provider's authorize
/// endpoint with `client_id`, `response_type=code` and `scope` set; the
/// control plane adds `redirect_uri`, `state` and PKCE.
pub fn authorize_url(endpoints: &Endpoints, client_id: &str) -> Url {
    let mut url = endpoints.authorize.clone();
    url.query_pairs_mut()
        .append_pair("client_id", client_id)
        .append_pair("response_type", "code")
        .append_pair("scope", endpoints.scope);
    url
}

/// The `Authorization` header value presenting `token` for `purpose`.
pub fn authorization(kind: ScmKind, source: AuthSource, token: &str, purpose: Purpose) -> String {
    let basic = |user: &str| format!("Basic {}", STANDARD.encode(format!("{user}:{token}")));
    match (purpose, kind, source) {
        (Purpose::Api, ScmKind::AzureDevOps, AuthSource::Pat) => basic(""),
        (Purpose::Api, _, _) | (Purpose::Git, ScmKind::AzureDevOps, AuthSource::OAuth) => {
            format!("Bearer {token}")
        }
        (Purpose::Git, ScmKind::GitHub, _) => basic("x-access-token"),
        (Purpose::Git, ScmKind::GitLab, _) => basic("oauth2"),
        (Purpose::Git, ScmKind::Bitbucket, _) => basic("x-token-auth"),
        (Purpose::Git, ScmKind::AzureDevOps, AuthSource::Pat) => basic("pat"),
    }
}

/// Parses a repository, branch, commit, pull/merge request or issue URL of
/// a `kind` host. The error names what is wrong with the URL.
///
/// Owner, repository and branch are percent-decoded; `clone_url` re-encodes
/// every path segment, escaping all but RFC 3986 unreserved characters.
pub fn parse_context_url(url: &str, kind: ScmKind) -> Result<ContextUrl, String> {
    let parsed = parse_https(url)?;
    let host = host_port(&parsed)?;
    // Echo only host and path: the query may carry a token too.
    let shown = format!("https://{host}{}", parsed.path());
    let decoded = parsed
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|segment| !segment.is_empty())
        .map(percent_decode)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("{shown:?} is not valid UTF-8 once percent-decoded"))?;
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let path = ContextPath {
        segments: &segments,
        url: &parsed,
        host: &host,
    };
    let parts = match kind {
        ScmKind::GitHub => path.github(),
        ScmKind::GitLab => path.gitlab(),
        ScmKind::Bitbucket => path.bitbucket(),
        ScmKind::AzureDevOps => path.azure_devops(),
    };
    let fail = |problem| match problem {
        Problem::NoRepository(expected) => {
            format!("{shown:?} does not name a repository (expected {expected})")
        }
        Problem::UnknownForm => {
            format!("unknown {} URL form {:?}", kind_name(kind), parsed.path())
        }
        Problem::Other(message) => message,
    };
    let Parts {
        owner,
        repository,
        target,
    } = parts.map_err(fail)?;
    let repository = repository.strip_suffix(".git").unwrap_or(repository);
    if repository.is_empty() {
        return Err(fail(Problem::NoRepository(expected_form(kind, &host))));
    }
    if kind == ScmKind::GitLab && owner.len() > MAX_GITLAB_NAMESPACE_DEPTH {
        return Err(format!(
            "{shown:?} nests {} groups; GitLab allows a group and at most {} subgroups",
            owner.len(),
            MAX_GITLAB_NAMESPACE_DEPTH - 1
        ));
    }
    if let Target::Branch(branch) = &target {
        // What a URL names must be checkable out: the control plane puts it
        // in a spec, whose branch rule is the same.
        crate::validate::branch("branch", branch)
            .map_err(|err| format!("{shown:?} names a branch git cannot check out: {err}"))?;
    }
    if let Some(part) = owner.iter().chain([&repository]).find(|p| p.contains('/')) {
        return Err(format!(
            "{shown:?} has an encoded slash in {part:?}, which cannot be part of a name"
        ));
    }
    let encoded_owner = owner
        .iter()
        .map(|segment| percent_encode(segment))
        .collect::<Vec<_>>()
        .join("/");
    let encoded_repository = percent_encode(repository);
    let clone_url = match kind {
        ScmKind::AzureDevOps => format!("https://{host}/{encoded_owner}/_git/{encoded_repository}"),
        ScmKind::GitHub | ScmKind::GitLab | ScmKind::Bitbucket => {
            format!("https://{host}/{encoded_owner}/{encoded_repository}.git")
        }
    };
    Ok(ContextUrl {
        kind,
        owner: owner.join("/"),
        repository: repository.to_owned(),
        host,
        clone_url,
        target,
    })
}

/// A stored token as revocation sees it (no value).
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// Whose, for which host, obtained how.
    pub key: &'a TokenKey,
    /// When it was stored.
    pub stored_at: SystemTime,
    /// The endpoints it is bound to ([`Endpoints::binding`]); `None` for a
    /// token stored before tokens were bound to endpoints.
    pub binding: Option<&'a str>,
}

/// What the control plane says is live, as listed at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Live<'a> {
    /// Every integration.
    pub integrations: &'a [Integration],
    /// Every (principal, host) whose token the runner may keep.
    pub authenticated: &'a BTreeSet<(String, String)>,
    /// When the lists were requested.
    pub listed_at: SystemTime,
}

/// Why a stored token is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Revocation {
    /// Its host has no integration any more.
    NoIntegration,
    /// The integration disabled the method it was obtained with.
    MethodDisabled,
    /// The integration's endpoints are not the ones it was issued for.
    EndpointChanged,
    /// The control plane no longer lists it (the user or an admin deleted it).
    NotListed,
}

impl Revocation {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoIntegration => "its host has no integration",
            Self::MethodDisabled => "its method is disabled",
            Self::EndpointChanged => "the integration's endpoints changed",
            Self::NotListed => "the control plane no longer lists it",
        }
    }
}

/// Whether a token bound to `binding` may be presented through
/// `integration`'s endpoints.
pub fn binding_allowed(integration: &Integration, binding: Option<&str>) -> bool {
    let current = endpoints(
        integration.kind,
        &integration.host,
        integration.api_base_url.as_deref(),
        integration.oauth_base_url.as_deref(),
    );
    match (current, binding) {
        (Ok(endpoints), Some(binding)) => endpoints.binding() == binding,
        // Stored before binding: the host's default endpoints only.
        (Ok(_), None) => integration.api_base_url.is_none() && integration.oauth_base_url.is_none(),
        (Err(_), _) => false,
    }
}

/// The stored tokens the control plane no longer allows: those of hosts
/// with no integration, whose method the integration disabled, whose
/// endpoints changed, or whose (principal, host) it no longer lists.
/// Tokens stored at or after `listed_at` are kept (the lists may predate
/// them). Sorted by key, one entry per key.
pub fn revoked<'a>(
    tokens: impl IntoIterator<Item = Held<'a>>,
    live: &Live<'_>,
) -> Vec<(TokenKey, Revocation)> {
    let mut revoked: Vec<(TokenKey, Revocation)> = tokens
        .into_iter()
        .filter(|held| held.stored_at < live.listed_at)
        .filter_map(|held| {
            let key = held.key;
            let why = match live.integrations.iter().find(|i| i.host == key.host) {
                None => Revocation::NoIntegration,
                Some(integration) if !integration.allows(key.source) => Revocation::MethodDisabled,
                Some(integration) if !binding_allowed(integration, held.binding) => {
                    Revocation::EndpointChanged
                }
                Some(_)
                    if !live
                        .authenticated
                        .contains(&(key.principal.clone(), key.host.clone())) =>
                {
                    Revocation::NotListed
                }
                Some(_) => return None,
            };
            Some((key.clone(), why))
        })
        .collect();
    revoked.sort();
    revoked.dedup_by(|a, b| a.0 == b.0);
    revoked
}

/// A GitLab namespace is a group and at most 20 subgroups (GitLab refuses
/// deeper nesting), so a project path has at most 21 owner segments.
const MAX_GITLAB_NAMESPACE_DEPTH: usize = 21;

const BITBUCKET_CLOUD_ONLY: &str =
    "Bitbucket Server and Data Center are not supported; only bitbucket.org";

const AZURE_WORK_ITEMS: &str =
    "Azure DevOps work items do not name a repository; use the repository URL";

/// Microsoft Entra ID, which issues Azure DevOps OAuth tokens.
const ENTRA_ID: &str = "https://login.microsoftonline.com/organizations/oauth2/v2.0";

fn kind_name(kind: ScmKind) -> &'static str {
    match kind {
        ScmKind::GitHub => "GitHub",
        ScmKind::GitLab => "GitLab",
        ScmKind::Bitbucket => "Bitbucket",
        ScmKind::AzureDevOps => "Azure DevOps",
    }
}

/// Parses `url`, which must be https without userinfo.
fn parse_https(url: &str) -> Result<Url, String> {
    // Url's parse errors never quote the input.
    let parsed = Url::parse(url).map_err(|err| format!("not a valid URL: {err}"))?;
    if parsed.scheme() != "https" {
        return Err(format!(
            "scheme {:?} is not supported, use https",
            parsed.scheme()
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("the URL must not contain credentials".to_owned());
    }
    Ok(parsed)
}

/// `name` or `name:port`; Url already lowercases the name and drops 443.
fn host_port(url: &Url) -> Result<String, String> {
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| "the URL has no host".to_owned())?;
    Ok(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// Checks that `host` is a bare `name` or `name:port` and normalizes it.
fn normalize_host(host: &str) -> Result<String, String> {
    let invalid = || "invalid host: expected a host name with an optional port".to_owned();
    let parsed = Url::parse(&format!("https://{host}/")).map_err(|_| invalid())?;
    let bare = parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    if !bare {
        return Err(invalid());
    }
    host_port(&parsed)
}

/// A validated base URL override without trailing slashes, on `host`.
fn base_override(field: &str, value: &str, host: &str) -> Result<String, String> {
    if public_kind(host).is_some() {
        return Err(format!(
            "{field}: {host} is a public host; its endpoints cannot be overridden"
        ));
    }
    let parsed = Url::parse(value).map_err(|err| format!("{field}: not a valid URL: {err}"))?;
    let allowed = match parsed.scheme() {
        "https" => true,
        "http" => is_loopback(&parsed),
        _ => false,
    };
    if !allowed {
        return Err(format!("{field}: must be https (http only on loopback)"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!("{field}: must not contain credentials"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("{field}: must not have a query or fragment"));
    }
    let on = host_port(&parsed)?;
    if on != host {
        return Err(format!(
            "{field}: must be on the integration's host {host}, not {on}"
        ));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(name)) => name == "localhost",
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Parses a URL built from validated parts.
fn built_url(value: &str) -> Result<Url, String> {
    Url::parse(value).map_err(|err| format!("invalid endpoint URL: {err}"))
}

/// Decodes `%XX` escapes (others are kept as is); `None` when the result is
/// not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', high, low]) => hex_value(*high).zip(hex_value(*low)),
            _ => None,
        };
        if let Some((high, low)) = escaped {
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

/// Escapes everything but RFC 3986 unreserved characters.
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn expected_form(kind: ScmKind, host: &str) -> String {
    match kind {
        ScmKind::GitHub => format!("https://{host}/OWNER/REPO"),
        ScmKind::GitLab => format!("https://{host}/GROUP/PROJECT"),
        ScmKind::Bitbucket => format!("https://{host}/WORKSPACE/REPO"),
        ScmKind::AzureDevOps if host == "dev.azure.com" => {
            format!("https://{host}/ORGANIZATION/PROJECT/_git/REPO")
        }
        ScmKind::AzureDevOps => format!("https://{host}/COLLECTION/PROJECT/_git/REPO"),
    }
}

/// Why a context URL path was not understood.
enum Problem {
    /// Too few segments; holds the expected form.
    NoRepository(String),
    /// A repository followed by a path this parser does not know.
    UnknownForm,
    /// A finished message.
    Other(String),
}

/// What a context URL path names, decoded; the repository may end in `.git`.
struct Parts<'a> {
    owner: Vec<&'a str>,
    repository: &'a str,
    target: Target,
}

/// A context URL's decoded, non-empty path segments.
struct ContextPath<'a> {
    segments: &'a [&'a str],
    url: &'a Url,
    host: &'a str,
}

impl<'a> ContextPath<'a> {
    fn no_repository(&self, kind: ScmKind) -> Problem {
        Problem::NoRepository(expected_form(kind, self.host))
    }

    /// `/OWNER/REPO[/tree/BRANCH…|/commit/SHA|/pull/N…|/issues/N…]`.
    fn github(&self) -> Result<Parts<'a>, Problem> {
        let [owner, repository, rest @ ..] = self.segments else {
            return Err(self.no_repository(ScmKind::GitHub));
        };
        let target = match rest {
            [] => Target::Repository,
            ["tree", branch @ ..] if !branch.is_empty() => Target::Branch(branch.join("/")),
            ["commit", sha] => commit(sha)?,
            ["pull", n, ..] => Target::PullRequest(number(n, "pull request")?),
            ["issues", n, ..] => Target::Issue(number(n, "issue")?),
            _ => return Err(Problem::UnknownForm),
        };
        Ok(Parts {
            owner: vec![owner],
            repository,
            target,
        })
    }

    /// `/GROUP…/PROJECT[/-/tree/BRANCH…|/-/commit/SHA|/-/merge_requests/N…|/-/issues/N…]`.
    fn gitlab(&self) -> Result<Parts<'a>, Problem> {
        let (project, rest) = match self.segments.iter().position(|s| *s == "-") {
            Some(dash) => (&self.segments[..dash], Some(&self.segments[dash + 1..])),
            None => (self.segments, None),
        };
        let Some((repository, owner)) = project.split_last().filter(|(_, owner)| !owner.is_empty())
        else {
            return Err(self.no_repository(ScmKind::GitLab));
        };
        let target = match rest.unwrap_or_default() {
            [] if rest.is_none() => Target::Repository,
            ["tree", branch @ ..] if !branch.is_empty() => Target::Branch(branch.join("/")),
            ["commit", sha] => commit(sha)?,
            ["merge_requests", n, ..] => Target::PullRequest(number(n, "merge request")?),
            ["issues" | "work_items", n, ..] => Target::Issue(number(n, "issue")?),
            _ => return Err(Problem::UnknownForm),
        };
        Ok(Parts {
            owner: owner.to_vec(),
            repository,
            target,
        })
    }

    /// `/WORKSPACE/REPO[/src/REV/…|/branch/BRANCH…|/commits/SHA|/pull-requests/N…|/issues/N…]`.
    fn bitbucket(&self) -> Result<Parts<'a>, Problem> {
        if self.host != "bitbucket.org" {
            return Err(Problem::Other(BITBUCKET_CLOUD_ONLY.to_owned()));
        }
        let [workspace, repository, rest @ ..] = self.segments else {
            return Err(self.no_repository(ScmKind::Bitbucket));
        };
        let target = match rest {
            [] | ["src"] => Target::Repository,
            // The rest of a src URL is a file path, so the revision is one segment.
            ["src", revision, ..] if is_full_commit(revision) => {
                Target::Commit(revision.to_ascii_lowercase())
            }
            ["src", branch, ..] => Target::Branch((*branch).to_owned()),
            ["branch", branch @ ..] if !branch.is_empty() => Target::Branch(branch.join("/")),
            ["commits", sha] => commit(sha)?,
            ["pull-requests", n, ..] => Target::PullRequest(number(n, "pull request")?),
            ["issues", n, ..] => Target::Issue(number(n, "issue")?),
            _ => return Err(Problem::UnknownForm),
        };
        Ok(Parts {
            owner: vec![workspace],
            repository,
            target,
        })
    }

    /// `/ORG/PROJECT/_git/REPO[?version=GB…|GC…|/commit/SHA|/pullrequest/N…]`;
    /// Server hosts may put a virtual directory before the collection.
    fn azure_devops(&self) -> Result<Parts<'a>, Problem> {
        if self.segments.contains(&"_workitems") {
            return Err(Problem::Other(AZURE_WORK_ITEMS.to_owned()));
        }
        let Some(git) = self.segments.iter().position(|s| *s == "_git") else {
            return Err(self.no_repository(ScmKind::AzureDevOps));
        };
        let owner = &self.segments[..git];
        let owner_ok = if self.host == "dev.azure.com" {
            owner.len() == 2
        } else {
            owner.len() >= 2
        };
        let (true, [repository, rest @ ..]) = (owner_ok, &self.segments[git + 1..]) else {
            return Err(self.no_repository(ScmKind::AzureDevOps));
        };
        let target = match rest {
            [] => self.azure_version()?,
            ["commit", sha] => commit(sha)?,
            ["pullrequest", n, ..] => Target::PullRequest(number(n, "pull request")?),
            _ => return Err(Problem::UnknownForm),
        };
        Ok(Parts {
            owner: owner.to_vec(),
            repository,
            target,
        })
    }

    /// The target the `version` query parameter names (none: the repository).
    fn azure_version(&self) -> Result<Target, Problem> {
        let Some((_, version)) = self.url.query_pairs().find(|(key, _)| key == "version") else {
            return Ok(Target::Repository);
        };
        if let Some(branch) = version.strip_prefix("GB").filter(|b| !b.is_empty()) {
            Ok(Target::Branch(branch.to_owned()))
        } else if let Some(sha) = version.strip_prefix("GC") {
            commit(sha)
        } else {
            Err(Problem::Other(format!(
                "Azure DevOps version {version:?} names neither a branch (GB…) nor a commit (GC…)"
            )))
        }
    }
}

fn is_full_commit(value: &str) -> bool {
    matches!(value.len(), 40 | 64) && value.bytes().all(|b| b.is_ascii_hexdigit())
}

fn commit(value: &str) -> Result<Target, Problem> {
    if is_full_commit(value) {
        Ok(Target::Commit(value.to_ascii_lowercase()))
    } else {
        Err(Problem::Other(format!(
            "{value:?} is not a full commit id (40 or 64 hex characters)"
        )))
    }
}

/// A positive decimal number; `what` names it in the error.
fn number(value: &str, what: &str) -> Result<u64, Problem> {
    value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse::<u64>().ok())
        .flatten()
        .filter(|n| *n > 0)
        .ok_or_else(|| Problem::Other(format!("{value:?} is not a valid {what} number")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SHA1: &str = "0123456789abcdef0123456789abcdef01234567";
    const SHA256: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(url: &str, kind: ScmKind) -> ContextUrl {
        parse_context_url(url, kind).unwrap_or_else(|err| panic!("{url}: {err}"))
    }

    fn target(url: &str, kind: ScmKind) -> Target {
        parse(url, kind).target
    }

    fn parse_err(url: &str, kind: ScmKind) -> String {
        match parse_context_url(url, kind) {
            Ok(parsed) => panic!("{url} parsed as {parsed:?}"),
            Err(err) => err,
        }
    }

    fn strs(endpoints: &Endpoints) -> [&str; 4] {
        [
            endpoints.api.as_str(),
            endpoints.user.as_str(),
            endpoints.token.as_str(),
            endpoints.authorize.as_str(),
        ]
    }

    fn decode_basic(header: &str) -> String {
        let encoded = header.strip_prefix("Basic ").expect("a Basic header");
        String::from_utf8(STANDARD.decode(encoded).expect("base64")).expect("utf-8")
    }

    // public_kind

    #[test]
    fn public_kind_knows_exactly_the_four_public_hosts() {
        assert_eq!(public_kind("github.com"), Some(ScmKind::GitHub));
        assert_eq!(public_kind("gitlab.com"), Some(ScmKind::GitLab));
        assert_eq!(public_kind("bitbucket.org"), Some(ScmKind::Bitbucket));
        assert_eq!(public_kind("dev.azure.com"), Some(ScmKind::AzureDevOps));
        for host in [
            "www.github.com",
            "ghe.example.com",
            "gitlab.example.com",
            "github.com:8443",
            "acme.visualstudio.com",
            "",
        ] {
            assert_eq!(public_kind(host), None, "{host}");
        }
    }

    // host_of

    #[test]
    fn host_of_lowercases_and_keeps_only_non_default_ports() {
        assert_eq!(
            host_of("https://GitHub.COM/acme/api").unwrap(),
            "github.com"
        );
        assert_eq!(
            host_of("https://github.com:443/acme").unwrap(),
            "github.com"
        );
        assert_eq!(
            host_of("https://ghe.example:8443/").unwrap(),
            "ghe.example:8443"
        );
        assert_eq!(host_of("https://127.0.0.1:8443").unwrap(), "127.0.0.1:8443");
        assert_eq!(host_of("https://[::1]:9000/x").unwrap(), "[::1]:9000");
    }

    #[test]
    fn host_of_rejects_other_schemes() {
        let err = host_of("http://github.com/acme").unwrap_err();
        assert_eq!(err, r#"scheme "http" is not supported, use https"#);
        let err = host_of("ssh://git@github.com/acme/api.git").unwrap_err();
        assert!(err.contains(r#""ssh""#), "{err}");
        assert!(!err.contains("git@"), "{err}");
    }

    #[test]
    fn host_of_rejects_credentials_without_echoing_them() {
        for url in [
            "https://ghp_secret123@github.com/acme/api",
            "https://user:ghp_secret123@github.com/acme/api",
            "https://:ghp_secret123@github.com/",
        ] {
            let err = host_of(url).unwrap_err();
            assert!(err.contains("must not contain credentials"), "{err}");
            assert!(!err.contains("ghp_secret123"), "{err}");
            assert!(!err.contains("user"), "{err}");
        }
    }

    #[test]
    fn host_of_rejects_garbage() {
        let err = host_of("github.com/acme").unwrap_err();
        assert!(err.starts_with("not a valid URL"), "{err}");
        assert!(host_of("").is_err());
    }

    // endpoints

    #[test]
    fn github_com_endpoints() {
        let e = endpoints(ScmKind::GitHub, "github.com", None, None).unwrap();
        assert_eq!(
            strs(&e),
            [
                "https://api.github.com/",
                "https://api.github.com/user",
                "https://github.com/login/oauth/access_token",
                "https://github.com/login/oauth/authorize",
            ]
        );
        assert_eq!(e.scope, "repo read:user");
    }

    #[test]
    fn github_enterprise_endpoints() {
        let e = endpoints(ScmKind::GitHub, "ghe.example:8443", None, None).unwrap();
        assert_eq!(
            strs(&e),
            [
                "https://ghe.example:8443/api/v3",
                "https://ghe.example:8443/api/v3/user",
                "https://ghe.example:8443/login/oauth/access_token",
                "https://ghe.example:8443/login/oauth/authorize",
            ]
        );
    }

    #[test]
    fn github_overrides_replace_the_bases_and_drop_trailing_slashes() {
        let e = endpoints(
            ScmKind::GitHub,
            "127.0.0.1:8080",
            Some("http://127.0.0.1:8080/api/"),
            Some("https://127.0.0.1:8080//"),
        )
        .unwrap();
        assert_eq!(
            strs(&e),
            [
                "http://127.0.0.1:8080/api",
                "http://127.0.0.1:8080/api/user",
                "https://127.0.0.1:8080/login/oauth/access_token",
                "https://127.0.0.1:8080/login/oauth/authorize",
            ]
        );
    }

    #[test]
    fn public_hosts_take_no_override() {
        for (kind, host) in [
            (ScmKind::GitHub, "github.com"),
            (ScmKind::GitLab, "gitlab.com"),
            (ScmKind::Bitbucket, "bitbucket.org"),
            (ScmKind::AzureDevOps, "dev.azure.com"),
        ] {
            for base in [
                format!("https://{host}/api"),
                "https://evil.example".to_owned(),
            ] {
                let err = endpoints(kind, host, Some(&base), None).unwrap_err();
                assert_eq!(
                    err,
                    format!(
                        "api_base_url: {host} is a public host; its endpoints cannot be overridden"
                    )
                );
                let err = endpoints(kind, host, None, Some(&base)).unwrap_err();
                assert!(err.starts_with("oauth_base_url: "), "{err}");
            }
        }
    }

    #[test]
    fn overrides_stay_on_the_integrations_host() {
        for (base, on) in [
            ("https://evil.example/api/v3", "evil.example"),
            (
                "https://ghe.example.com.evil.example/api",
                "ghe.example.com.evil.example",
            ),
            ("https://api.ghe.example.com/", "api.ghe.example.com"),
            ("https://ghe.example.com:8443/api", "ghe.example.com:8443"),
            ("https://github.com/api", "github.com"),
            ("http://127.0.0.1:8080/api", "127.0.0.1:8080"),
        ] {
            let err = endpoints(ScmKind::GitHub, "ghe.example.com", Some(base), None).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "api_base_url: must be on the integration's host ghe.example.com, not {on}"
                )
            );
            let err = endpoints(ScmKind::GitHub, "ghe.example.com", None, Some(base)).unwrap_err();
            assert!(err.starts_with("oauth_base_url: must be on"), "{err}");
        }
        // The same host, however spelled.
        let e = endpoints(
            ScmKind::GitHub,
            "GHE.example.com:443",
            Some("https://ghe.EXAMPLE.com:443/ghe/api/v3/"),
            None,
        )
        .unwrap();
        assert_eq!(e.api.as_str(), "https://ghe.example.com/ghe/api/v3");
        // Bound to the endpoints: an override changes the binding.
        let default = endpoints(ScmKind::GitHub, "ghe.example.com", None, None).unwrap();
        assert_ne!(default.binding(), e.binding());
        assert_eq!(
            default.binding(),
            "https://ghe.example.com/api/v3 https://ghe.example.com/login/oauth/access_token"
        );
    }

    #[test]
    fn gitlab_endpoints_default_and_overridden() {
        for host in ["gitlab.com", "gitlab.example.com"] {
            let e = endpoints(ScmKind::GitLab, host, None, None).unwrap();
            assert_eq!(
                strs(&e),
                [
                    format!("https://{host}/api/v4").as_str(),
                    &format!("https://{host}/api/v4/user"),
                    &format!("https://{host}/oauth/token"),
                    &format!("https://{host}/oauth/authorize"),
                ]
            );
            assert_eq!(e.scope, "read_api read_repository");
        }
        let e = endpoints(
            ScmKind::GitLab,
            "gitlab.example.com",
            Some("https://gitlab.example.com/gitlab/api/v4"),
            Some("https://gitlab.example.com/sso/"),
        )
        .unwrap();
        assert_eq!(
            strs(&e),
            [
                "https://gitlab.example.com/gitlab/api/v4",
                "https://gitlab.example.com/gitlab/api/v4/user",
                "https://gitlab.example.com/sso/oauth/token",
                "https://gitlab.example.com/sso/oauth/authorize",
            ]
        );
    }

    #[test]
    fn bitbucket_endpoints() {
        let e = endpoints(ScmKind::Bitbucket, "bitbucket.org", None, None).unwrap();
        assert_eq!(
            strs(&e),
            [
                "https://api.bitbucket.org/2.0",
                "https://api.bitbucket.org/2.0/user",
                "https://bitbucket.org/site/oauth2/access_token",
                "https://bitbucket.org/site/oauth2/authorize",
            ]
        );
        assert_eq!(e.scope, "repository pullrequest account");
    }

    #[test]
    fn bitbucket_self_hosted_is_rejected_even_with_overrides() {
        for (api, oauth) in [
            (None, None),
            (
                Some("https://bb.example.com/rest/api/1.0"),
                Some("https://bb.example.com"),
            ),
        ] {
            let err = endpoints(ScmKind::Bitbucket, "bb.example.com", api, oauth).unwrap_err();
            assert_eq!(err, BITBUCKET_CLOUD_ONLY);
        }
    }

    #[test]
    fn azure_devops_services_endpoints() {
        let e = endpoints(ScmKind::AzureDevOps, "dev.azure.com", None, None).unwrap();
        assert_eq!(
            strs(&e),
            [
                "https://dev.azure.com/",
                "https://app.vssps.visualstudio.com/_apis/profile/profiles/me?api-version=7.1",
                "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
                "https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize",
            ]
        );
        assert_eq!(
            e.scope,
            "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access"
        );
    }

    #[test]
    fn azure_devops_server_endpoints() {
        let e = endpoints(ScmKind::AzureDevOps, "tfs.example.com", None, None).unwrap();
        assert_eq!(
            strs(&e),
            [
                "https://tfs.example.com/",
                "https://tfs.example.com/_apis/connectionData",
                "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
                "https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize",
            ]
        );
        let e = endpoints(
            ScmKind::AzureDevOps,
            "tfs.example.com",
            Some("https://tfs.example.com/tfs/"),
            None,
        )
        .unwrap();
        assert_eq!(e.api.as_str(), "https://tfs.example.com/tfs");
        assert_eq!(
            e.user.as_str(),
            "https://tfs.example.com/tfs/_apis/connectionData"
        );
    }

    #[test]
    fn endpoints_normalize_the_host() {
        let e = endpoints(ScmKind::GitHub, "GitHub.com", None, None).unwrap();
        assert_eq!(e.api.as_str(), "https://api.github.com/");
        let e = endpoints(ScmKind::GitLab, "GitLab.Example.com:443", None, None).unwrap();
        assert_eq!(e.api.as_str(), "https://gitlab.example.com/api/v4");
    }

    #[test]
    fn endpoints_reject_a_host_that_is_not_bare() {
        for host in [
            "",
            "github.com/evil",
            "tok@github.com",
            "github.com?x=1",
            "github.com#x",
            "a b",
        ] {
            let err = endpoints(ScmKind::GitHub, host, None, None).unwrap_err();
            assert!(err.starts_with("invalid host"), "{host}: {err}");
            assert!(!err.contains("tok@"), "{err}");
        }
    }

    #[test]
    fn overrides_allow_http_only_on_loopback() {
        for host in [
            "127.0.0.1:8080",
            "127.255.0.1",
            "[::1]:8080",
            "localhost:8080",
        ] {
            for kind in [ScmKind::GitHub, ScmKind::GitLab, ScmKind::AzureDevOps] {
                for scheme in ["http", "https"] {
                    let base = format!("{scheme}://{host}/x");
                    assert!(
                        endpoints(kind, host, Some(&base), Some(&base)).is_ok(),
                        "{kind:?} {base}"
                    );
                }
            }
        }
        for (host, base) in [
            ("api.example.com", "http://api.example.com"),
            ("10.0.0.1", "http://10.0.0.1"),
            ("[::2]", "http://[::2]"),
            ("localhost.example.com", "http://localhost.example.com"),
            ("127.0.0.1", "ftp://127.0.0.1"),
        ] {
            let err = endpoints(ScmKind::GitHub, host, Some(base), None).unwrap_err();
            assert_eq!(err, "api_base_url: must be https (http only on loopback)");
            let err = endpoints(ScmKind::GitHub, host, None, Some(base)).unwrap_err();
            assert_eq!(err, "oauth_base_url: must be https (http only on loopback)");
        }
    }

    #[test]
    fn overrides_reject_credentials_queries_and_garbage() {
        let err = endpoints(
            ScmKind::GitLab,
            "gitlab.example.com",
            Some("https://root:glpat-secret@gitlab.example.com/api/v4"),
            None,
        )
        .unwrap_err();
        assert_eq!(err, "api_base_url: must not contain credentials");
        let err = endpoints(
            ScmKind::GitLab,
            "gitlab.example.com",
            None,
            Some("https://gitlab.example.com/?x=1"),
        )
        .unwrap_err();
        assert_eq!(err, "oauth_base_url: must not have a query or fragment");
        let err = endpoints(
            ScmKind::GitLab,
            "gitlab.example.com",
            Some("gitlab.example.com"),
            None,
        )
        .unwrap_err();
        assert!(err.starts_with("api_base_url: not a valid URL"), "{err}");
    }

    // authorize_url

    #[test]
    fn authorize_url_sets_client_id_response_type_and_scope() {
        let e = endpoints(ScmKind::GitLab, "gitlab.com", None, None).unwrap();
        let url = authorize_url(&e, "client id&x=1");
        assert_eq!(
            url.as_str(),
            "https://gitlab.com/oauth/authorize?client_id=client+id%26x%3D1\
             &response_type=code&scope=read_api+read_repository"
        );
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [
                ("client_id".to_owned(), "client id&x=1".to_owned()),
                ("response_type".to_owned(), "code".to_owned()),
                ("scope".to_owned(), "read_api read_repository".to_owned()),
            ]
        );
        // The endpoints themselves are not changed.
        assert_eq!(e.authorize.query(), None);
    }

    #[test]
    fn authorize_url_for_azure_devops_keeps_the_entra_scope() {
        let e = endpoints(ScmKind::AzureDevOps, "dev.azure.com", None, None).unwrap();
        let url = authorize_url(&e, "abc");
        assert_eq!(url.path(), "/organizations/oauth2/v2.0/authorize");
        let scope = url
            .query_pairs()
            .find(|(key, _)| key == "scope")
            .map(|(_, value)| value.into_owned());
        assert_eq!(scope.as_deref(), Some(e.scope));
    }

    // authorization

    #[test]
    fn api_authorization_is_bearer_except_azure_devops_pats() {
        for kind in PROVIDERS {
            assert_eq!(
                authorization(kind, AuthSource::OAuth, "tok", Purpose::Api),
                "Bearer tok"
            );
        }
        for kind in [ScmKind::GitHub, ScmKind::GitLab, ScmKind::Bitbucket] {
            assert_eq!(
                authorization(kind, AuthSource::Pat, "tok", Purpose::Api),
                "Bearer tok"
            );
        }
        let header = authorization(ScmKind::AzureDevOps, AuthSource::Pat, "tok", Purpose::Api);
        assert_eq!(header, "Basic OnRvaw==");
        assert_eq!(decode_basic(&header), ":tok");
    }

    #[test]
    fn git_authorization_uses_each_providers_basic_user() {
        for source in [AuthSource::OAuth, AuthSource::Pat] {
            for (kind, expected) in [
                (ScmKind::GitHub, "x-access-token:s3cr3t"),
                (ScmKind::GitLab, "oauth2:s3cr3t"),
                (ScmKind::Bitbucket, "x-token-auth:s3cr3t"),
            ] {
                let header = authorization(kind, source, "s3cr3t", Purpose::Git);
                assert_eq!(decode_basic(&header), expected, "{kind:?} {source:?}");
            }
        }
        let header = authorization(
            ScmKind::AzureDevOps,
            AuthSource::Pat,
            "s3cr3t",
            Purpose::Git,
        );
        assert_eq!(decode_basic(&header), "pat:s3cr3t");
        assert_eq!(
            authorization(
                ScmKind::AzureDevOps,
                AuthSource::OAuth,
                "s3cr3t",
                Purpose::Git
            ),
            "Bearer s3cr3t"
        );
    }

    #[test]
    fn basic_authorization_uses_padded_standard_base64() {
        // "x-access-token:a" is 16 bytes, so it needs padding; "?>" maps to
        // '+' and '/' only in the standard alphabet.
        let header = authorization(ScmKind::GitHub, AuthSource::Pat, "a", Purpose::Git);
        assert_eq!(header, "Basic eC1hY2Nlc3MtdG9rZW46YQ==");
        let header = authorization(ScmKind::GitHub, AuthSource::Pat, "?>?", Purpose::Git);
        assert!(header.contains('/') || header.contains('+'), "{header}");
        assert_eq!(decode_basic(&header), "x-access-token:?>?");
    }

    // parse_context_url: GitHub

    #[test]
    fn github_repository() {
        let parsed = parse("https://github.com/acme/api", ScmKind::GitHub);
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::GitHub,
                host: "github.com".to_owned(),
                owner: "acme".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://github.com/acme/api.git".to_owned(),
                target: Target::Repository,
            }
        );
        for url in [
            "https://github.com/acme/api.git",
            "https://github.com/acme/api/",
            "https://GITHUB.com/acme/api?tab=readme#install",
            "https://github.com:443/acme/api.git/",
        ] {
            assert_eq!(parse(url, ScmKind::GitHub), parsed, "{url}");
        }
    }

    #[test]
    fn github_enterprise_keeps_the_port() {
        let parsed = parse("https://ghe.example:8443/Acme/API", ScmKind::GitHub);
        assert_eq!(parsed.host, "ghe.example:8443");
        assert_eq!(parsed.owner, "Acme");
        assert_eq!(parsed.repository, "API");
        assert_eq!(parsed.clone_url, "https://ghe.example:8443/Acme/API.git");
    }

    #[test]
    fn github_branch_keeps_slashes_and_decodes() {
        assert_eq!(
            target("https://github.com/acme/api/tree/main", ScmKind::GitHub),
            Target::Branch("main".to_owned())
        );
        assert_eq!(
            target(
                "https://github.com/acme/api/tree/feature/login/v2/",
                ScmKind::GitHub
            ),
            Target::Branch("feature/login/v2".to_owned())
        );
        assert_eq!(
            target(
                "https://github.com/acme/api/tree/fix%2Fcaf%C3%A9?x=1",
                ScmKind::GitHub
            ),
            Target::Branch("fix/café".to_owned())
        );
    }

    #[test]
    fn branches_git_cannot_check_out_are_refused() {
        // Bad input: a URL names what a spec will hold, so the spec's
        // branch rule applies (a space, "..", a control character, length).
        for (url, problem) in [
            (
                "https://github.com/acme/api/tree/fix%20x".to_owned(),
                r#"branch: "fix x" is not a valid git branch name"#.to_owned(),
            ),
            (
                "https://github.com/acme/api/tree/a..b".to_owned(),
                r#"branch: "a..b" is not a valid git branch name"#.to_owned(),
            ),
            (
                "https://dev.azure.com/acme/proj/_git/api?version=GBma%07in".to_owned(),
                "branch: must not contain control characters".to_owned(),
            ),
            (
                format!(
                    "https://github.com/acme/api/tree/{}",
                    "b/".repeat(1000).trim_end_matches('/')
                ),
                "branch: is 1999 bytes long, the limit is 255".to_owned(),
            ),
            (
                "https://bitbucket.org/acme/api/branch/-x".to_owned(),
                r#"branch: "-x" is not a valid git branch name"#.to_owned(),
            ),
        ] {
            let kind = if url.contains("azure") {
                ScmKind::AzureDevOps
            } else if url.contains("bitbucket") {
                ScmKind::Bitbucket
            } else {
                ScmKind::GitHub
            };
            let err = parse_err(&url, kind);
            assert!(
                err.contains("names a branch git cannot check out") && err.ends_with(&problem),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn gitlab_namespaces_nest_at_most_twenty_subgroups() {
        let deepest = format!("https://gitlab.com/{}api", "g/".repeat(21));
        assert_eq!(
            parse(&deepest, ScmKind::GitLab).owner.split('/').count(),
            21
        );
        let deeper = format!("https://gitlab.com/{}api/-/tree/main", "g/".repeat(1000));
        let err = parse_err(&deeper, ScmKind::GitLab);
        assert!(
            err.ends_with("nests 1000 groups; GitLab allows a group and at most 20 subgroups"),
            "{err}"
        );
    }

    #[test]
    fn github_commit_pull_and_issue() {
        let upper = SHA1.to_ascii_uppercase();
        assert_eq!(
            target(
                &format!("https://github.com/acme/api/commit/{upper}#diff-1"),
                ScmKind::GitHub
            ),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(
                &format!("https://github.com/acme/api/commit/{SHA256}"),
                ScmKind::GitHub
            ),
            Target::Commit(SHA256.to_owned())
        );
        assert_eq!(
            target("https://github.com/acme/api/pull/42", ScmKind::GitHub),
            Target::PullRequest(42)
        );
        assert_eq!(
            target(
                "https://github.com/acme/api/pull/42/files?w=1",
                ScmKind::GitHub
            ),
            Target::PullRequest(42)
        );
        assert_eq!(
            target("https://github.com/acme/api/issues/7/", ScmKind::GitHub),
            Target::Issue(7)
        );
    }

    #[test]
    fn github_errors() {
        assert_eq!(
            parse_err("https://github.com/acme", ScmKind::GitHub),
            r#""https://github.com/acme" does not name a repository (expected https://github.com/OWNER/REPO)"#
        );
        assert!(
            parse_err("https://github.com/", ScmKind::GitHub)
                .contains("does not name a repository")
        );
        assert_eq!(
            parse_err("https://github.com/acme/api/wiki", ScmKind::GitHub),
            r#"unknown GitHub URL form "/acme/api/wiki""#
        );
        assert!(
            parse_err("https://github.com/acme/api/tree", ScmKind::GitHub)
                .starts_with("unknown GitHub URL form")
        );
        assert_eq!(
            parse_err("https://github.com/acme/api/commit/abc123", ScmKind::GitHub),
            r#""abc123" is not a full commit id (40 or 64 hex characters)"#
        );
        let not_hex = format!("{}g", &SHA1[..39]);
        assert!(
            parse_err(
                &format!("https://github.com/acme/api/commit/{not_hex}"),
                ScmKind::GitHub
            )
            .contains("is not a full commit id")
        );
        assert_eq!(
            parse_err("https://github.com/acme/api/pull/abc", ScmKind::GitHub),
            r#""abc" is not a valid pull request number"#
        );
        for n in ["0", "-1", "+5", "1.5", "99999999999999999999"] {
            let err = parse_err(
                &format!("https://github.com/acme/api/pull/{n}"),
                ScmKind::GitHub,
            );
            assert!(
                err.contains("is not a valid pull request number"),
                "{n}: {err}"
            );
        }
        assert_eq!(
            parse_err("https://github.com/acme/api/issues/x", ScmKind::GitHub),
            r#""x" is not a valid issue number"#
        );
        assert!(
            parse_err("https://github.com/acme/.git", ScmKind::GitHub)
                .contains("does not name a repository")
        );
    }

    // parse_context_url: GitLab

    #[test]
    fn gitlab_repository_with_nested_groups() {
        let parsed = parse(
            "https://gitlab.com/acme/platform/infra/api.git/",
            ScmKind::GitLab,
        );
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::GitLab,
                host: "gitlab.com".to_owned(),
                owner: "acme/platform/infra".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://gitlab.com/acme/platform/infra/api.git".to_owned(),
                target: Target::Repository,
            }
        );
        let simple = parse("https://gitlab.example.com/acme/api", ScmKind::GitLab);
        assert_eq!(simple.owner, "acme");
        assert_eq!(simple.clone_url, "https://gitlab.example.com/acme/api.git");
    }

    #[test]
    fn gitlab_forms_after_the_dash_segment() {
        let base = "https://gitlab.com/acme/sub/api/-";
        assert_eq!(
            target(
                &format!("{base}/tree/release/1.x?ref_type=heads"),
                ScmKind::GitLab
            ),
            Target::Branch("release/1.x".to_owned())
        );
        assert_eq!(
            target(&format!("{base}/commit/{SHA1}"), ScmKind::GitLab),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}/merge_requests/12"), ScmKind::GitLab),
            Target::PullRequest(12)
        );
        assert_eq!(
            target(&format!("{base}/merge_requests/12/diffs"), ScmKind::GitLab),
            Target::PullRequest(12)
        );
        assert_eq!(
            target(&format!("{base}/issues/3#note_1"), ScmKind::GitLab),
            Target::Issue(3)
        );
        assert_eq!(
            target(&format!("{base}/work_items/4"), ScmKind::GitLab),
            Target::Issue(4)
        );
        let parsed = parse(&format!("{base}/issues/3"), ScmKind::GitLab);
        assert_eq!(parsed.owner, "acme/sub");
        assert_eq!(parsed.repository, "api");
    }

    #[test]
    fn gitlab_errors() {
        assert_eq!(
            parse_err("https://gitlab.com/acme", ScmKind::GitLab),
            r#""https://gitlab.com/acme" does not name a repository (expected https://gitlab.com/GROUP/PROJECT)"#
        );
        assert!(
            parse_err("https://gitlab.com/acme/-/issues/1", ScmKind::GitLab)
                .contains("does not name a repository")
        );
        assert_eq!(
            parse_err("https://gitlab.com/acme/api/-/wikis/home", ScmKind::GitLab),
            r#"unknown GitLab URL form "/acme/api/-/wikis/home""#
        );
        assert!(
            parse_err("https://gitlab.com/acme/api/-/", ScmKind::GitLab)
                .starts_with("unknown GitLab URL form")
        );
        assert!(
            parse_err("https://gitlab.com/acme/api/-/commit/main", ScmKind::GitLab)
                .contains("is not a full commit id")
        );
        assert!(
            parse_err(
                "https://gitlab.com/acme/api/-/merge_requests/new",
                ScmKind::GitLab
            )
            .contains(r#""new" is not a valid merge request number"#)
        );
    }

    // parse_context_url: Bitbucket

    #[test]
    fn bitbucket_forms() {
        let parsed = parse("https://bitbucket.org/acme/api/", ScmKind::Bitbucket);
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::Bitbucket,
                host: "bitbucket.org".to_owned(),
                owner: "acme".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://bitbucket.org/acme/api.git".to_owned(),
                target: Target::Repository,
            }
        );
        let base = "https://bitbucket.org/acme/api";
        assert_eq!(
            target(&format!("{base}/src"), ScmKind::Bitbucket),
            Target::Repository
        );
        assert_eq!(
            target(
                &format!("{base}/src/develop/docs/README.md?at=x"),
                ScmKind::Bitbucket
            ),
            Target::Branch("develop".to_owned())
        );
        assert_eq!(
            target(&format!("{base}/src/feature%2Flogin/"), ScmKind::Bitbucket),
            Target::Branch("feature/login".to_owned())
        );
        assert_eq!(
            target(
                &format!("{base}/src/{}/lib", SHA1.to_ascii_uppercase()),
                ScmKind::Bitbucket
            ),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}/branch/feature/login"), ScmKind::Bitbucket),
            Target::Branch("feature/login".to_owned())
        );
        assert_eq!(
            target(&format!("{base}/commits/{SHA1}"), ScmKind::Bitbucket),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}/pull-requests/5/diff"), ScmKind::Bitbucket),
            Target::PullRequest(5)
        );
        assert_eq!(
            target(
                &format!("{base}/issues/9/crash-on-start"),
                ScmKind::Bitbucket
            ),
            Target::Issue(9)
        );
    }

    #[test]
    fn bitbucket_errors() {
        assert_eq!(
            parse_err("https://bitbucket.example.com/acme/api", ScmKind::Bitbucket),
            BITBUCKET_CLOUD_ONLY
        );
        assert_eq!(
            parse_err("https://bitbucket.org/acme", ScmKind::Bitbucket),
            r#""https://bitbucket.org/acme" does not name a repository (expected https://bitbucket.org/WORKSPACE/REPO)"#
        );
        assert!(
            parse_err(
                "https://bitbucket.org/acme/api/commits/xyz",
                ScmKind::Bitbucket
            )
            .contains(r#""xyz" is not a full commit id"#)
        );
        assert!(
            parse_err(
                "https://bitbucket.org/acme/api/pull-requests/x",
                ScmKind::Bitbucket
            )
            .contains("is not a valid pull request number")
        );
        assert_eq!(
            parse_err("https://bitbucket.org/acme/api/wiki", ScmKind::Bitbucket),
            r#"unknown Bitbucket URL form "/acme/api/wiki""#
        );
    }

    // parse_context_url: Azure DevOps

    #[test]
    fn azure_devops_repository_keeps_percent_encoding_in_the_clone_url() {
        let parsed = parse(
            "https://dev.azure.com/acme/My%20Project/_git/api",
            ScmKind::AzureDevOps,
        );
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::AzureDevOps,
                host: "dev.azure.com".to_owned(),
                owner: "acme/My Project".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://dev.azure.com/acme/My%20Project/_git/api".to_owned(),
                target: Target::Repository,
            }
        );
        // Unescaped input is escaped the same way.
        assert_eq!(
            parse(
                "https://dev.azure.com/acme/My Project/_git/api/",
                ScmKind::AzureDevOps
            ),
            parsed
        );
    }

    #[test]
    fn azure_devops_version_query() {
        let base = "https://dev.azure.com/acme/proj/_git/api";
        assert_eq!(
            target(
                &format!("{base}?path=/src&version=GBfeature/x&_a=contents"),
                ScmKind::AzureDevOps
            ),
            Target::Branch("feature/x".to_owned())
        );
        assert_eq!(
            target(
                &format!("{base}?version=GBfeature%2Fy"),
                ScmKind::AzureDevOps
            ),
            Target::Branch("feature/y".to_owned())
        );
        assert_eq!(
            target(&format!("{base}?version=GC{SHA1}"), ScmKind::AzureDevOps),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}?path=/README.md"), ScmKind::AzureDevOps),
            Target::Repository
        );
        let err = parse_err(&format!("{base}?version=GTv1.0"), ScmKind::AzureDevOps);
        assert!(err.contains(r#""GTv1.0""#), "{err}");
        assert!(
            parse_err(&format!("{base}?version=GB"), ScmKind::AzureDevOps)
                .contains("names neither a branch")
        );
        assert!(
            parse_err(&format!("{base}?version=GCabc"), ScmKind::AzureDevOps)
                .contains("is not a full commit id")
        );
    }

    #[test]
    fn azure_devops_commit_and_pull_request() {
        let base = "https://dev.azure.com/acme/proj/_git/api";
        assert_eq!(
            target(
                &format!("{base}/commit/{SHA1}?refName=refs/heads/main"),
                ScmKind::AzureDevOps
            ),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(
                &format!("{base}/pullrequest/31?_a=files"),
                ScmKind::AzureDevOps
            ),
            Target::PullRequest(31)
        );
        let parsed = parse(&format!("{base}/pullrequest/31"), ScmKind::AzureDevOps);
        assert_eq!(parsed.owner, "acme/proj");
        assert_eq!(parsed.repository, "api");
        assert_eq!(parsed.clone_url, base);
    }

    #[test]
    fn azure_devops_server_uses_a_collection() {
        let parsed = parse(
            "https://tfs.example.com:8080/DefaultCollection/proj/_git/api",
            ScmKind::AzureDevOps,
        );
        assert_eq!(parsed.host, "tfs.example.com:8080");
        assert_eq!(parsed.owner, "DefaultCollection/proj");
        assert_eq!(
            parsed.clone_url,
            "https://tfs.example.com:8080/DefaultCollection/proj/_git/api"
        );
        // A virtual directory before the collection is kept.
        let parsed = parse(
            "https://tfs.example.com/tfs/DefaultCollection/proj/_git/api",
            ScmKind::AzureDevOps,
        );
        assert_eq!(parsed.owner, "tfs/DefaultCollection/proj");
        assert_eq!(
            parsed.clone_url,
            "https://tfs.example.com/tfs/DefaultCollection/proj/_git/api"
        );
    }

    #[test]
    fn azure_devops_errors() {
        assert_eq!(
            parse_err(
                "https://dev.azure.com/acme/proj/_workitems/edit/12",
                ScmKind::AzureDevOps
            ),
            AZURE_WORK_ITEMS
        );
        assert_eq!(
            parse_err("https://dev.azure.com/acme/proj", ScmKind::AzureDevOps),
            r#""https://dev.azure.com/acme/proj" does not name a repository (expected https://dev.azure.com/ORGANIZATION/PROJECT/_git/REPO)"#
        );
        for url in [
            "https://dev.azure.com/acme/_git/api",
            "https://dev.azure.com/a/b/c/_git/api",
            "https://dev.azure.com/acme/proj/_git/",
        ] {
            assert!(
                parse_err(url, ScmKind::AzureDevOps).contains("does not name a repository"),
                "{url}"
            );
        }
        assert!(
            parse_err(
                "https://tfs.example.com/proj/_git/api",
                ScmKind::AzureDevOps
            )
            .contains("expected https://tfs.example.com/COLLECTION/PROJECT/_git/REPO")
        );
        assert_eq!(
            parse_err(
                "https://dev.azure.com/acme/proj/_git/api/branches",
                ScmKind::AzureDevOps
            ),
            r#"unknown Azure DevOps URL form "/acme/proj/_git/api/branches""#
        );
        assert!(
            parse_err(
                "https://dev.azure.com/acme/proj/_git/api/pullrequest/zero",
                ScmKind::AzureDevOps
            )
            .contains("is not a valid pull request number")
        );
    }

    // parse_context_url: shared rules

    #[test]
    fn context_urls_must_be_https_without_credentials() {
        for kind in PROVIDERS {
            let err = parse_err("http://github.com/acme/api", kind);
            assert_eq!(err, r#"scheme "http" is not supported, use https"#);
            for url in [
                "https://x-access-token:ghp_Secret@github.com/acme/api",
                "https://ghp_Secret@github.com/acme/api",
                "https://acme:ghp_Secret@dev.azure.com/acme/proj/_git/api",
            ] {
                let err = parse_err(url, kind);
                assert!(err.contains("must not contain credentials"), "{err}");
                assert!(!err.contains("ghp_Secret"), "{err}");
                assert!(!err.contains("x-access-token"), "{err}");
            }
        }
    }

    #[test]
    fn errors_do_not_echo_the_query() {
        let err = parse_err(
            "https://gitlab.com/acme?private_token=glpat-secret",
            ScmKind::GitLab,
        );
        assert!(err.contains("does not name a repository"), "{err}");
        assert!(!err.contains("glpat-secret"), "{err}");
    }

    #[test]
    fn names_are_decoded_and_reencoded_consistently() {
        let parsed = parse("https://github.com/ac%6De/a%2Bb~c", ScmKind::GitHub);
        assert_eq!(parsed.owner, "acme");
        assert_eq!(parsed.repository, "a+b~c");
        assert_eq!(parsed.clone_url, "https://github.com/acme/a%2Bb~c.git");
        let parsed = parse("https://gitlab.com/gr%C3%BCn/%C3%A4pi", ScmKind::GitLab);
        assert_eq!(parsed.owner, "grün");
        assert_eq!(parsed.repository, "äpi");
        assert_eq!(
            parsed.clone_url,
            "https://gitlab.com/gr%C3%BCn/%C3%A4pi.git"
        );
    }

    #[test]
    fn encoded_slashes_and_bad_utf8_in_names_are_rejected() {
        let err = parse_err("https://github.com/acme%2Fevil/api", ScmKind::GitHub);
        assert!(err.contains("encoded slash"), "{err}");
        let err = parse_err("https://github.com/acme/%FF", ScmKind::GitHub);
        assert!(err.contains("not valid UTF-8"), "{err}");
    }

    #[test]
    fn percent_decode_keeps_malformed_escapes() {
        assert_eq!(percent_decode("a%2"), Some("a%2".to_owned()));
        assert_eq!(percent_decode("a%zz%41"), Some("a%zzA".to_owned()));
        assert_eq!(percent_decode("%e2%82%ac"), Some("€".to_owned()));
        assert_eq!(percent_decode("%C3"), None);
    }

    // revoked

    fn key(principal: &str, host: &str, source: AuthSource) -> TokenKey {
        TokenKey {
            principal: principal.to_owned(),
            host: host.to_owned(),
            source,
        }
    }

    fn integration(host: &str, oauth: bool, pat_enabled: bool) -> Integration {
        Integration {
            id: Uuid::nil(),
            kind: ScmKind::GitHub,
            host: host.to_owned(),
            oauth: oauth.then(|| OAuthApp {
                client_id: "id".to_owned(),
                sealed_client_secret: vec![1, 2, 3],
            }),
            pat_enabled,
            api_base_url: None,
            oauth_base_url: None,
        }
    }

    fn held(key: &TokenKey, stored_at: SystemTime) -> Held<'_> {
        Held {
            key,
            stored_at,
            binding: None,
        }
    }

    fn all_listed<'a>(keys: impl IntoIterator<Item = &'a TokenKey>) -> BTreeSet<(String, String)> {
        keys.into_iter()
            .map(|k| (k.principal.clone(), k.host.clone()))
            .collect()
    }

    #[test]
    fn revoked_finds_tokens_the_integrations_no_longer_allow() {
        let listed_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let before = listed_at - Duration::from_secs(1);
        let integrations = [
            integration("github.com", true, true),
            integration("gitlab.com", false, true),
            integration("ghe.example:8443", true, false),
        ];
        let allowed_oauth = key("alice", "github.com", AuthSource::OAuth);
        let allowed_pat = key("alice", "github.com", AuthSource::Pat);
        let oauth_removed = key("bob", "gitlab.com", AuthSource::OAuth);
        let gitlab_pat = key("bob", "gitlab.com", AuthSource::Pat);
        let pat_disabled = key("carol", "ghe.example:8443", AuthSource::Pat);
        let ghe_oauth = key("carol", "ghe.example:8443", AuthSource::OAuth);
        let no_integration = key("dave", "bitbucket.org", AuthSource::OAuth);
        // Same host name, other port: a different host.
        let other_port = key("erin", "github.com:8443", AuthSource::Pat);
        let stored_after = key("frank", "dev.azure.com", AuthSource::Pat);
        let stored_at_listing = key("grace", "dev.azure.com", AuthSource::OAuth);
        let keys = [
            &no_integration,
            &allowed_oauth,
            &allowed_pat,
            &oauth_removed,
            &gitlab_pat,
            &pat_disabled,
            &ghe_oauth,
            &other_port,
        ];
        let mut tokens: Vec<Held<'_>> = keys.iter().map(|k| held(k, before)).collect();
        tokens.push(held(&stored_after, listed_at + Duration::from_secs(5)));
        tokens.push(held(&stored_at_listing, listed_at));
        // Duplicates collapse.
        tokens.push(held(&oauth_removed, before));
        let authenticated = all_listed(keys);
        let live = Live {
            integrations: &integrations,
            authenticated: &authenticated,
            listed_at,
        };
        assert_eq!(
            revoked(tokens, &live),
            [
                (no_integration, Revocation::NoIntegration),
                (oauth_removed, Revocation::MethodDisabled),
                (pat_disabled, Revocation::MethodDisabled),
                (other_port, Revocation::NoIntegration),
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn revoked_deletes_what_the_control_plane_no_longer_lists() {
        let listed_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let before = listed_at - Duration::from_secs(1);
        let integrations = [integration("github.com", true, true)];
        let kept = key("alice", "github.com", AuthSource::Pat);
        let kept_oauth = key("alice", "github.com", AuthSource::OAuth);
        let unlisted = key("bob", "github.com", AuthSource::Pat);
        let unlisted_but_new = key("carol", "github.com", AuthSource::Pat);
        let authenticated = all_listed([&kept]);
        let live = Live {
            integrations: &integrations,
            authenticated: &authenticated,
            listed_at,
        };
        let got = revoked(
            [
                held(&kept, before),
                held(&kept_oauth, before),
                held(&unlisted, before),
                held(&unlisted_but_new, listed_at),
            ],
            &live,
        );
        assert_eq!(got, [(unlisted, Revocation::NotListed)]);
    }

    #[test]
    fn revoked_deletes_tokens_bound_to_other_endpoints() {
        let listed_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let before = listed_at - Duration::from_secs(1);
        let mut ghe = integration("ghe.example:8443", true, true);
        let default = endpoints(ScmKind::GitHub, "ghe.example:8443", None, None)
            .unwrap()
            .binding();
        ghe.api_base_url = Some("https://ghe.example:8443/api/v4".to_owned());
        let overridden = endpoints(
            ScmKind::GitHub,
            "ghe.example:8443",
            ghe.api_base_url.as_deref(),
            None,
        )
        .unwrap()
        .binding();
        let same = key("a", "ghe.example:8443", AuthSource::Pat);
        let moved = key("b", "ghe.example:8443", AuthSource::Pat);
        let legacy = key("c", "ghe.example:8443", AuthSource::Pat);
        let authenticated = all_listed([&same, &moved, &legacy]);
        let integrations = [ghe.clone()];
        let live = Live {
            integrations: &integrations,
            authenticated: &authenticated,
            listed_at,
        };
        let got = revoked(
            [
                Held {
                    binding: Some(&overridden),
                    ..held(&same, before)
                },
                Held {
                    binding: Some(&default),
                    ..held(&moved, before)
                },
                held(&legacy, before),
            ],
            &live,
        );
        assert_eq!(
            got,
            [
                (moved, Revocation::EndpointChanged),
                (legacy, Revocation::EndpointChanged),
            ]
        );
        // A token stored before binding keeps working on the default endpoints.
        ghe.api_base_url = None;
        assert!(binding_allowed(&ghe, None));
        assert!(binding_allowed(&ghe, Some(&default)));
        assert!(!binding_allowed(&ghe, Some(&overridden)));
    }

    #[test]
    fn revoked_with_no_integrations_revokes_every_older_token() {
        let listed_at = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let b = key("b", "github.com", AuthSource::Pat);
        let a = key("a", "gitlab.com", AuthSource::OAuth);
        let newer = key("c", "github.com", AuthSource::OAuth);
        let authenticated = all_listed([&a, &b, &newer]);
        let live = Live {
            integrations: &[],
            authenticated: &authenticated,
            listed_at,
        };
        let got = revoked(
            [
                held(&b, SystemTime::UNIX_EPOCH),
                held(&a, SystemTime::UNIX_EPOCH),
                held(&newer, listed_at + Duration::from_nanos(1)),
            ],
            &live,
        );
        assert_eq!(
            got,
            [
                (a, Revocation::NoIntegration),
                (b, Revocation::NoIntegration)
            ]
        );
        let integrations = [integration("github.com", true, true)];
        let live = Live {
            integrations: &integrations,
            ..live
        };
        assert!(revoked([], &live).is_empty());
    }
}
