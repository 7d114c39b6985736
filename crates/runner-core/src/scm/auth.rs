//! How a token is obtained and presented: the OAuth authorization URL a
//! user is sent to, and the `Authorization` header each provider expects
//! for API calls and for git over HTTPS.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use url::Url;

use super::endpoints::Endpoints;
use super::kinds::{AuthSource, ScmKind};

/// What a token is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// REST API calls.
    Api,
    /// git over HTTPS.
    Git,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scm::endpoints::endpoints;
    use crate::scm::kinds::PROVIDERS;

    fn decode_basic(header: &str) -> String {
        let encoded = header.strip_prefix("Basic ").expect("a Basic header");
        String::from_utf8(STANDARD.decode(encoded).expect("base64")).expect("utf-8")
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
}
