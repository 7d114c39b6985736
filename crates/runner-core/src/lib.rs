//! The runner's domain: what an environment is, which inputs are valid, and
//! (as the runner grows) the reconcile planner, the scheduler and the traits
//! its adapters implement.
//!
//! This crate never imports an AWS SDK or gRPC: adapters depend on it, not
//! the other way round.

pub mod validate;
