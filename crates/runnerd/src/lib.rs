//! The runner daemon: configuration, wiring, the control-plane session, the
//! health and metrics port, and shutdown.
//!
//! This crate is still empty: the daemon lands with the runnerd work.
