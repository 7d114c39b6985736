//! The read-only SCM calls of the watch stream: whether a user can reach a
//! host (`check_authentication_for_host`), and what a context URL names
//! (`parse_context`).

use runner_core::scm::{self, ContextUrl, Target};
use runner_core::validate;
use runner_proto::pb;

use super::proto::{kind_to_proto, method_to_proto};
use super::{CallError, Scm, provider_error, store_unavailable};

impl Scm {
    /// `check_authentication_for_host`.
    pub async fn check_authentication(
        &self,
        principal: &str,
        host: &str,
    ) -> Result<pb::CheckAuthenticationForHostResult, CallError> {
        Self::check_principal_host(principal, host)?;
        let Some(integration) = self.integration(host) else {
            return Ok(pb::CheckAuthenticationForHostResult::default());
        };
        let authenticated = self
            .usable(principal, host)
            .await
            .map_err(|e| store_unavailable(&e))?
            .is_some();
        let oauth_authorize_url = match (&integration.oauth, Self::endpoints(&integration)) {
            (Some(app), Ok(endpoints)) => {
                scm::authorize_url(&endpoints, &app.client_id).to_string()
            }
            _ => String::new(),
        };
        Ok(pb::CheckAuthenticationForHostResult {
            authenticated,
            available_methods: integration
                .methods()
                .into_iter()
                .map(|m| method_to_proto(m) as i32)
                .collect(),
            oauth_authorize_url,
        })
    }

    /// `parse_context`.
    pub async fn parse_context(
        &self,
        principal: &str,
        url: &str,
    ) -> Result<pb::ParseContextResult, CallError> {
        validate::text("principal", principal, validate::MAX_PRINCIPAL_LEN)
            .map_err(|e| CallError::invalid(e.to_string()))?;
        validate::text("url", url, validate::MAX_REPOSITORY_URL_LEN)
            .map_err(|e| CallError::invalid(e.to_string()))?;
        let host = scm::host_of(url).map_err(|e| CallError::invalid(format!("url: {e}")))?;
        let integration = self.integration(&host);
        let kind = integration
            .as_ref()
            .map(|i| i.kind)
            .or_else(|| scm::public_kind(&host))
            .ok_or_else(|| {
                CallError::invalid(format!(
                    "url: unknown SCM host {host}; an admin must configure an integration for it"
                ))
            })?;
        let parsed: ContextUrl = scm::parse_context_url(url, kind)
            .map_err(|e| CallError::invalid(format!("url: {e}")))?;
        // Only a clone URL the runner will accept in a spec is answered.
        validate::repository_url("url", &parsed.clone_url).map_err(|e| {
            CallError::invalid(format!(
                "url: the repository's clone URL is not in canonical form: {}",
                e.problem
            ))
        })?;
        let usable = match &integration {
            None => None,
            Some(_) => Some(
                self.usable(principal, &host)
                    .await
                    .map_err(|e| store_unavailable(&e))?
                    .ok_or_else(|| {
                        CallError::precondition(format!("authentication required for {host}"))
                    })?,
            ),
        };
        let revision = match &parsed.target {
            Target::Repository | Target::Issue(_) => None,
            Target::Branch(b) => Some(pb::parse_context_result::Revision::Branch(b.clone())),
            Target::Commit(c) => Some(pb::parse_context_result::Revision::Commit(c.clone())),
            Target::PullRequest(number) => {
                let Some(usable) = usable else {
                    return Err(CallError::precondition(format!(
                        "authentication required for {host}: pull request URLs are resolved through its API, which needs an SCM integration"
                    )));
                };
                let endpoints = Self::endpoints(&usable.integration)?;
                let branch = self
                    .client
                    .pull_request_branch(
                        kind,
                        usable.source,
                        &endpoints,
                        &usable.token.access_token,
                        &parsed.owner,
                        &parsed.repository,
                        *number,
                    )
                    .await
                    .map_err(|e| provider_error(&e, &host, "look up the pull request"))?;
                // The provider's answer is input too: only a branch git can check out.
                validate::branch("branch", &branch).map_err(|e| {
                    CallError::precondition(format!(
                        "{host} named a pull request branch git cannot check out: {}",
                        e.problem
                    ))
                })?;
                Some(pb::parse_context_result::Revision::Branch(branch))
            }
        };
        Ok(pb::ParseContextResult {
            kind: kind_to_proto(kind) as i32,
            host,
            owner: parsed.owner,
            repository: parsed.repository,
            clone_url: parsed.clone_url,
            revision,
        })
    }
}
