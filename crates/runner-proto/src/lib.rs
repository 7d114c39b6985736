//! Generated code for the runner ⇄ control-plane protocol.
//!
//! `runner::v1` is the protocol itself (see `proto/runner/v1/`); `admin::v1` is
//! the reference control plane's admin API. Both come from `proto/` at build
//! time, compiled by protox, so building needs no system `protoc`.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// The `runner.v1` package: the runner protocol.
pub mod runner {
    /// Version 1 of the runner protocol.
    pub mod v1 {
        tonic::include_proto!("runner.v1");
    }
}

/// The `admin.v1` package: the reference control plane's admin API.
pub mod admin {
    /// Version 1 of the admin API.
    pub mod v1 {
        tonic::include_proto!("admin.v1");
    }
}

pub use runner::v1 as pb;
