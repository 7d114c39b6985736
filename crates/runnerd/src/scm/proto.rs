//! The protocol's SCM types to and from the core's: kinds, methods, the
//! providers announced at signup, and integrations as listed.

use runner_core::scm::{self, AuthSource, Integration, OAuthApp, ScmKind};
use runner_core::validate::{self, FieldError};
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

/// Why a listed integration is malformed (it is skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrationError {
    /// The id is not a UUID.
    #[error("integration id {0:?} is not a UUID")]
    Id(String),
    /// The kind is unspecified or unknown.
    #[error("integration {0}: unknown kind")]
    Kind(Uuid),
    /// The host breaks the host rule.
    #[error("integration {id}: {problem}")]
    Host {
        /// The integration.
        id: Uuid,
        /// What the host rule says.
        problem: FieldError,
    },
}

/// An integration from the protocol; the error names the problem.
pub fn integration_from_proto(i: pb::ScmIntegration) -> Result<Integration, IntegrationError> {
    let id = Uuid::parse_str(&i.id).map_err(|_| IntegrationError::Id(i.id.clone()))?;
    let kind = kind_from_proto(i.kind).ok_or(IntegrationError::Kind(id))?;
    validate::host("host", &i.host).map_err(|problem| IntegrationError::Host { id, problem })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f0c6b8e-3a2d-4c1b-9e7f-0a1b2c3d4e5f";

    fn listed() -> pb::ScmIntegration {
        pb::ScmIntegration {
            id: ID.to_owned(),
            kind: pb::ScmKind::Gitlab as i32,
            host: "gitlab.example.com:8443".to_owned(),
            pat_enabled: true,
            api_base_url: "https://gitlab.example.com:8443/api/v4".to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_integration_is_taken_as_listed() {
        let integration = integration_from_proto(listed()).expect("well formed");
        assert_eq!(integration.id.to_string(), ID);
        assert_eq!(integration.kind, ScmKind::GitLab);
        assert_eq!(integration.host, "gitlab.example.com:8443");
        assert!(integration.pat_enabled);
        assert_eq!(integration.oauth, None);
        assert_eq!(
            integration.api_base_url.as_deref(),
            Some("https://gitlab.example.com:8443/api/v4")
        );
        assert_eq!(integration.oauth_base_url, None);
    }

    #[test]
    fn a_malformed_integration_names_its_problem() {
        let id = Uuid::parse_str(ID).expect("uuid");
        let err = integration_from_proto(pb::ScmIntegration {
            id: "nope".to_owned(),
            ..listed()
        })
        .unwrap_err();
        assert_eq!(err, IntegrationError::Id("nope".to_owned()));
        assert_eq!(err.to_string(), r#"integration id "nope" is not a UUID"#);
        for kind in [pb::ScmKind::Unspecified as i32, 99] {
            let err = integration_from_proto(pb::ScmIntegration { kind, ..listed() }).unwrap_err();
            assert_eq!(err, IntegrationError::Kind(id));
            assert_eq!(err.to_string(), format!("integration {ID}: unknown kind"));
        }
        let err = integration_from_proto(pb::ScmIntegration {
            host: "gitlab.example.com/evil".to_owned(),
            ..listed()
        })
        .unwrap_err();
        assert!(
            matches!(&err, IntegrationError::Host { id: got, .. } if *got == id),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("integration {ID}: host: ")),
            "{err}"
        );
    }
}
