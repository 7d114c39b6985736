//! Where each provider's REST API and OAuth endpoints are for one host,
//! with the admin's overrides checked: an override stays on the
//! integration's own host, so the control plane cannot send users' tokens
//! anywhere else.

use url::Url;

use super::host::{UrlError, host_port};
use super::kinds::{ScmKind, public_kind};

/// Microsoft Entra ID, which issues Azure DevOps OAuth tokens.
const ENTRA_ID: &str = "https://login.microsoftonline.com/organizations/oauth2/v2.0";

/// Why a provider's endpoints cannot be computed for a host. Never echoes
/// credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The host is not a bare `name` or `name:port`.
    #[error("invalid host: expected a host name with an optional port")]
    InvalidHost,
    /// A URL names no usable host.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// Bitbucket on any host but bitbucket.org.
    #[error("Bitbucket Server and Data Center are not supported; only bitbucket.org")]
    BitbucketServer,
    /// An override for one of the providers' public hosts.
    #[error("{field}: {host} is a public host; its endpoints cannot be overridden")]
    PublicHost {
        /// `api_base_url` or `oauth_base_url`.
        field: &'static str,
        /// The public host.
        host: String,
    },
    /// An override that does not parse; the parse error never quotes it.
    #[error("{field}: not a valid URL: {error}")]
    OverrideNotAUrl {
        /// `api_base_url` or `oauth_base_url`.
        field: &'static str,
        /// Why it does not parse.
        error: url::ParseError,
    },
    /// An override neither https nor http on loopback.
    #[error("{field}: must be https (http only on loopback)")]
    OverrideScheme {
        /// `api_base_url` or `oauth_base_url`.
        field: &'static str,
    },
    /// An override with a user name or password.
    #[error("{field}: must not contain credentials")]
    OverrideCredentials {
        /// `api_base_url` or `oauth_base_url`.
        field: &'static str,
    },
    /// An override with a query or fragment.
    #[error("{field}: must not have a query or fragment")]
    OverrideQuery {
        /// `api_base_url` or `oauth_base_url`.
        field: &'static str,
    },
    /// An override on another host than the integration's.
    #[error("{field}: must be on the integration's host {host}, not {on}")]
    OverrideOffHost {
        /// `api_base_url` or `oauth_base_url`.
        field: &'static str,
        /// The integration's host.
        host: String,
        /// The override's host.
        on: String,
    },
    /// An endpoint built from validated parts did not parse.
    #[error("invalid endpoint URL: {0}")]
    Built(url::ParseError),
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

/// The endpoints of `kind` on `host`, honouring the overrides. An override
/// must be on `host` itself (same name and port), https (http only when
/// `host` is a loopback address), and is refused for the public hosts: the
/// control plane cannot send users' tokens anywhere else.
pub fn endpoints(
    kind: ScmKind,
    host: &str,
    api_base_url: Option<&str>,
    oauth_base_url: Option<&str>,
) -> Result<Endpoints, EndpointError> {
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
        ScmKind::Bitbucket => return Err(EndpointError::BitbucketServer),
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

/// Checks that `host` is a bare `name` or `name:port` and normalizes it.
fn normalize_host(host: &str) -> Result<String, EndpointError> {
    let parsed = Url::parse(&format!("https://{host}/")).map_err(|_| EndpointError::InvalidHost)?;
    let bare = parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    if !bare {
        return Err(EndpointError::InvalidHost);
    }
    Ok(host_port(&parsed)?)
}

/// A validated base URL override without trailing slashes, on `host`.
fn base_override(field: &'static str, value: &str, host: &str) -> Result<String, EndpointError> {
    if public_kind(host).is_some() {
        return Err(EndpointError::PublicHost {
            field,
            host: host.to_owned(),
        });
    }
    let parsed =
        Url::parse(value).map_err(|error| EndpointError::OverrideNotAUrl { field, error })?;
    let allowed = match parsed.scheme() {
        "https" => true,
        "http" => crate::validate::is_loopback_url(parsed.as_str()),
        _ => false,
    };
    if !allowed {
        return Err(EndpointError::OverrideScheme { field });
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(EndpointError::OverrideCredentials { field });
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(EndpointError::OverrideQuery { field });
    }
    let on = host_port(&parsed)?;
    if on != host {
        return Err(EndpointError::OverrideOffHost {
            field,
            host: host.to_owned(),
            on,
        });
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// Parses a URL built from validated parts.
fn built_url(value: &str) -> Result<Url, EndpointError> {
    Url::parse(value).map_err(EndpointError::Built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(endpoints: &Endpoints) -> [&str; 4] {
        [
            endpoints.api.as_str(),
            endpoints.user.as_str(),
            endpoints.token.as_str(),
            endpoints.authorize.as_str(),
        ]
    }

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
                let err = endpoints(kind, host, Some(&base), None)
                    .unwrap_err()
                    .to_string();
                assert_eq!(
                    err,
                    format!(
                        "api_base_url: {host} is a public host; its endpoints cannot be overridden"
                    )
                );
                let err = endpoints(kind, host, None, Some(&base))
                    .unwrap_err()
                    .to_string();
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
            let err = endpoints(ScmKind::GitHub, "ghe.example.com", Some(base), None)
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!(
                    "api_base_url: must be on the integration's host ghe.example.com, not {on}"
                )
            );
            let err = endpoints(ScmKind::GitHub, "ghe.example.com", None, Some(base))
                .unwrap_err()
                .to_string();
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
            let err = endpoints(ScmKind::Bitbucket, "bb.example.com", api, oauth)
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                "Bitbucket Server and Data Center are not supported; only bitbucket.org"
            );
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
            let err = endpoints(ScmKind::GitHub, host, None, None)
                .unwrap_err()
                .to_string();
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
            let err = endpoints(ScmKind::GitHub, host, Some(base), None)
                .unwrap_err()
                .to_string();
            assert_eq!(err, "api_base_url: must be https (http only on loopback)");
            let err = endpoints(ScmKind::GitHub, host, None, Some(base))
                .unwrap_err()
                .to_string();
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
        .unwrap_err()
        .to_string();
        assert_eq!(err, "api_base_url: must not contain credentials");
        let err = endpoints(
            ScmKind::GitLab,
            "gitlab.example.com",
            None,
            Some("https://gitlab.example.com/?x=1"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "oauth_base_url: must not have a query or fragment");
        let err = endpoints(
            ScmKind::GitLab,
            "gitlab.example.com",
            Some("gitlab.example.com"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("api_base_url: not a valid URL"), "{err}");
    }
}
