//! Why the daemon stopped with an error ([`AppError`]); `runnerd::daemon`
//! logs it and exits non-zero.

use crate::control_plane::ChannelError;
use crate::session::SessionError;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The health port could not be opened.
    #[error("listen on the health port")]
    Listen(#[source] std::io::Error),
    /// The control-plane channel could not be configured.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The session could not be established.
    #[error("control-plane session")]
    Session(#[source] SessionError),
    /// The SCM HTTP client could not be configured.
    #[error("SCM client")]
    Scm(#[source] runner_scm::ScmError),
    /// A task that must run for the daemon's life ended.
    #[error("critical task {task} ended: {reason}")]
    TaskEnded {
        /// The task.
        task: &'static str,
        /// How.
        reason: String,
    },
}
