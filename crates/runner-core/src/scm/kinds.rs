//! The providers the runner knows, how a user's token was obtained, the
//! integrations an admin configures, and the key a stored token is kept by.

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

impl ScmKind {
    /// The provider's name, for messages ("GitHub", "Azure DevOps").
    pub fn name(self) -> &'static str {
        match self {
            Self::GitHub => "GitHub",
            Self::GitLab => "GitLab",
            Self::Bitbucket => "Bitbucket",
            Self::AzureDevOps => "Azure DevOps",
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
