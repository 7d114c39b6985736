//! Which stored tokens the control plane still allows: a token is revoked
//! when its host has no integration, its method was disabled, the
//! integration's endpoints are not the ones it was issued for, or its
//! (principal, host) is no longer listed.

use std::collections::BTreeSet;
use std::time::SystemTime;

use super::endpoints::endpoints;
use super::kinds::{Integration, TokenKey};

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::*;
    use crate::scm::kinds::{AuthSource, OAuthApp, ScmKind};

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
