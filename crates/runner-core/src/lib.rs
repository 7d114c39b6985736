//! The runner's domain and policy: what an environment is, which inputs are
//! valid, how one environment is reconciled, the keyed work queue, batched
//! observation, status delivery, and the traits adapters implement.
//!
//! This crate never imports an AWS SDK or gRPC: adapters depend on it, not
//! the other way round.

pub mod backoff;
pub mod batch;
pub mod controller;
pub mod desired;
pub mod error;
pub mod leader;
pub mod model;
pub mod observer;
pub mod orphans;
pub mod outbox;
pub mod reconcile;
pub mod report;
pub mod retry;
pub mod scheduler;
pub mod scm;
pub mod sealed;
pub mod traits;
pub mod update;
pub mod validate;
