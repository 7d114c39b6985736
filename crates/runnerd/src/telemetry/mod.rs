//! Logs and metrics. Logs are `tracing` events, JSON for CloudWatch
//! ([`init_logs`]); metrics are Prometheus series with low-cardinality
//! labels ([`Metrics`], served on `/metrics`). What the runner counts is
//! emitted as typed events ([`events`]): one struct per occurrence, whose
//! `emit` moves its series and writes its log line when it has one, so the
//! two cannot drift apart. [`InstrumentedCompute`] emits one per compute
//! call, [`InstrumentedStore`] one per state store call; [`sample`] reads the runner's states into gauges; [`emf`] writes
//! the same series as CloudWatch embedded metric format records.

mod compute;
pub mod emf;
pub mod events;
mod metrics;
pub mod sample;
mod store;

pub use compute::InstrumentedCompute;
pub use metrics::Metrics;
pub use store::InstrumentedStore;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber: JSON or text on standard output.
pub fn init_logs(format: LogFormat, filter: &str) {
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}
