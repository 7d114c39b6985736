//! Source-control hosts: the providers the runner knows, where their APIs
//! live, what their URLs mean, how a token is presented, and which stored
//! tokens an integration still allows. Pure: no I/O.
//!
//! One module a concern; this one re-exports them, so callers write
//! `runner_core::scm::endpoints` whatever file it lives in.

mod auth;
mod context_url;
mod endpoints;
mod host;
mod kinds;
mod revoke;

pub use auth::{Purpose, authorization, authorize_url};
pub use context_url::{ContextUrl, ContextUrlError, Target, parse_context_url};
pub use endpoints::{EndpointError, Endpoints, endpoints};
pub use host::{UrlError, host_of};
pub use kinds::{AuthSource, Integration, OAuthApp, PROVIDERS, ScmKind, TokenKey, public_kind};
pub use revoke::{Held, Live, Revocation, binding_allowed, revoked};
