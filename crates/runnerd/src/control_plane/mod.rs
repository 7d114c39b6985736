//! The control plane as the runner reaches it: one [`Client`] that makes
//! every RPC, one classifier of their failures ([`Error`]: final or worth
//! retrying), the channel and bearer token, the translation of messages
//! ([`wire`]), and the answers to the calls the control plane sends over the
//! watch stream ([`calls`]). The session, the controller's informer and
//! outbox (through the core's `ControlPlane`), SCM sync, self-update (the
//! core's `Releases`) and `runnerd doctor` all call through the client.

pub mod calls;
mod channel;
mod client;
mod error;
pub mod wire;

pub use calls::Calls;
pub use channel::{BadToken, ChannelError};
pub use client::Client;
pub use error::{Error, Operation};
pub use wire::{class_from_proto, environment_from_proto, status_to_proto};
