//! The connection to the control plane: one lazily connecting channel (TLS
//! verified against the system roots plus an optional CA bundle, plaintext
//! only when configured) and the bearer token added to every call.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::config::ControlPlaneConfig;

/// Why the channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("configure the control-plane channel")]
pub struct ChannelError(#[source] tonic::transport::Error);

/// A lazily connecting channel to the control plane.
pub(super) fn channel(config: &ControlPlaneConfig) -> Result<Channel, ChannelError> {
    let mut endpoint = Endpoint::from_shared(config.url.clone())
        .map_err(ChannelError)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if config.url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(pem) = &config.ca_bundle {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(ChannelError)?;
    }
    Ok(endpoint.connect_lazy())
}

/// The access token cannot be sent (it never appears in the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the access token has characters not allowed in a header")]
pub struct BadToken;

/// The access token, set once credentials are known; added to every call.
#[derive(Clone, Default)]
pub(super) struct Auth(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

impl Auth {
    /// Uses `token` from now on.
    pub(super) fn set(&self, token: &SecretString) -> Result<(), BadToken> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.expose_secret())
            .parse()
            .map_err(|_| BadToken)?;
        value.set_sensitive(true);
        *self.0.write().expect("auth lock is never poisoned") = Some(value);
        Ok(())
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = self.0.read().expect("auth lock is never poisoned").as_ref() {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
