//! The protocol's SCM types to and from the core's: kinds, methods, the
//! providers announced at signup, and integrations as listed.

use runner_core::scm::{self, AuthSource, Integration, OAuthApp, ScmKind};
use runner_core::validate;
use runner_proto::pb;
use uuid::Uuid;

/// The SCM kinds of the protocol.
pub fn kind_from_proto(kind: i32) -> Option<ScmKind> {
    match pb::ScmKind::try_from(kind).ok()? {
        pb::ScmKind::Github => Some(ScmKind::GitHub),
        pb::ScmKind::Gitlab => Some(ScmKind::GitLab),
        pb::ScmKind::Bitbucket => Some(ScmKind::Bitbucket),
        pb::ScmKind::AzureDevops => Some(ScmKind::AzureDevOps),
        pb::ScmKind::Unspecified => None,
    }
}

pub(super) fn kind_to_proto(kind: ScmKind) -> pb::ScmKind {
    match kind {
        ScmKind::GitHub => pb::ScmKind::Github,
        ScmKind::GitLab => pb::ScmKind::Gitlab,
        ScmKind::Bitbucket => pb::ScmKind::Bitbucket,
        ScmKind::AzureDevOps => pb::ScmKind::AzureDevops,
    }
}

pub(super) fn method_to_proto(source: AuthSource) -> pb::AuthMethod {
    match source {
        AuthSource::OAuth => pb::AuthMethod::Oauth,
        AuthSource::Pat => pb::AuthMethod::Pat,
    }
}

/// What the runner announces at signup: every provider, both methods.
pub fn providers() -> Vec<pb::ScmProvider> {
    scm::PROVIDERS
        .iter()
        .map(|&kind| pb::ScmProvider {
            kind: kind_to_proto(kind) as i32,
            auth_methods: vec![pb::AuthMethod::Oauth as i32, pb::AuthMethod::Pat as i32],
            self_hosted: kind != ScmKind::Bitbucket,
        })
        .collect()
}

/// An integration from the protocol; the error names the problem.
pub fn integration_from_proto(i: pb::ScmIntegration) -> Result<Integration, String> {
    let id =
        Uuid::parse_str(&i.id).map_err(|_| format!("integration id {:?} is not a UUID", i.id))?;
    let kind = kind_from_proto(i.kind).ok_or_else(|| format!("integration {id}: unknown kind"))?;
    validate::host("host", &i.host).map_err(|e| format!("integration {id}: {e}"))?;
    let nonempty = |s: String| (!s.is_empty()).then_some(s);
    Ok(Integration {
        id,
        kind,
        host: i.host,
        oauth: i.oauth.map(|o| OAuthApp {
            client_id: o.client_id,
            sealed_client_secret: o.sealed_client_secret,
        }),
        pat_enabled: i.pat_enabled,
        api_base_url: nonempty(i.api_base_url),
        oauth_base_url: nonempty(i.oauth_base_url),
    })
}
