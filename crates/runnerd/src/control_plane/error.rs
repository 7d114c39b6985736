//! The one classifier of control-plane failures: `(operation, gRPC status)`
//! becomes an [`Error`] that says whether the same request can succeed
//! later. Every RPC of the [`Client`](super::Client) goes through it; the
//! status is kept as the error's source.

use tonic::{Code, Status};

/// A call the runner makes to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `IdentityService.ExchangeToken`.
    ExchangeToken,
    /// `Signup`.
    Signup,
    /// `MarkActive`.
    MarkActive,
    /// `UpdateRunnerStatus`.
    UpdateRunnerStatus,
    /// `WatchRequests`.
    WatchRequests,
    /// `SendResponse`.
    SendResponse,
    /// `ListEnvironments`.
    ListEnvironments,
    /// `GetEnvironment`.
    GetEnvironment,
    /// `ListEnvironmentClasses`.
    ListEnvironmentClasses,
    /// `UpdateEnvironmentStatus`.
    UpdateEnvironmentStatus,
    /// `ListScmIntegrations`.
    ListScmIntegrations,
    /// `ListHostTokens`.
    ListHostTokens,
    /// `GetLatestVersion`.
    GetLatestVersion,
}

impl Operation {
    /// The RPC's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ExchangeToken => "ExchangeToken",
            Self::Signup => "Signup",
            Self::MarkActive => "MarkActive",
            Self::UpdateRunnerStatus => "UpdateRunnerStatus",
            Self::WatchRequests => "WatchRequests",
            Self::SendResponse => "SendResponse",
            Self::ListEnvironments => "ListEnvironments",
            Self::GetEnvironment => "GetEnvironment",
            Self::ListEnvironmentClasses => "ListEnvironmentClasses",
            Self::UpdateEnvironmentStatus => "UpdateEnvironmentStatus",
            Self::ListScmIntegrations => "ListScmIntegrations",
            Self::ListHostTokens => "ListHostTokens",
            Self::GetLatestVersion => "GetLatestVersion",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed control-plane call, classified once by [`Error::classify`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused as it is: the same request will not succeed by retrying.
    #[error("{operation} refused ({:?})", .status.code())]
    Refused {
        /// The call.
        operation: Operation,
        /// The control plane's answer.
        #[source]
        status: Status,
    },
    /// No answer, or a failure that may pass: retrying may help.
    #[error("{operation} failed ({:?})", .status.code())]
    Unavailable {
        /// The call.
        operation: Operation,
        /// The control plane's answer, or the transport's.
        #[source]
        status: Status,
    },
}

impl Error {
    /// Classifies `status`, the failure of `operation`. The one rule:
    /// a request the control plane judged wrong (invalid argument, failed
    /// precondition, out of range, already exists) or naming what it does
    /// not know (not found) is final; so is a credential refused while the
    /// session establishes it (`ExchangeToken`, `Signup`: only a new exchange
    /// token helps). Everything else may pass and is retried, a refused
    /// credential later in the session included: the runner can only keep
    /// trying, and says so in its logs.
    pub fn classify(operation: Operation, status: Status) -> Self {
        let refused = match status.code() {
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::NotFound => true,
            Code::Unauthenticated | Code::PermissionDenied => {
                matches!(operation, Operation::ExchangeToken | Operation::Signup)
            }
            _ => false,
        };
        if refused {
            Self::Refused { operation, status }
        } else {
            Self::Unavailable { operation, status }
        }
    }

    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// The call that failed.
    pub fn operation(&self) -> Operation {
        match self {
            Self::Refused { operation, .. } | Self::Unavailable { operation, .. } => *operation,
        }
    }

    /// The answer.
    pub fn status(&self) -> &Status {
        match self {
            Self::Refused { status, .. } | Self::Unavailable { status, .. } => status,
        }
    }

    /// The answer's code.
    pub fn code(&self) -> Code {
        self.status().code()
    }
}

impl From<Error> for runner_core::traits::ControlPlaneError {
    fn from(err: Error) -> Self {
        if err.is_retryable() {
            Self::Unavailable(Box::new(err))
        } else {
            Self::Rejected(Box::new(err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    fn refused(operation: Operation) -> Vec<Code> {
        ALL.into_iter()
            .filter(|code| !Error::classify(operation, Status::new(*code, "m")).is_retryable())
            .collect()
    }

    #[test]
    fn a_wrong_request_is_final_everywhere_and_the_rest_is_retried() {
        let wrong = [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::OutOfRange,
        ];
        for operation in [
            Operation::MarkActive,
            Operation::UpdateRunnerStatus,
            Operation::WatchRequests,
            Operation::SendResponse,
            Operation::ListEnvironments,
            Operation::GetEnvironment,
            Operation::ListEnvironmentClasses,
            Operation::UpdateEnvironmentStatus,
            Operation::ListScmIntegrations,
            Operation::ListHostTokens,
            Operation::GetLatestVersion,
        ] {
            assert_eq!(refused(operation), wrong, "{operation}");
        }
    }

    #[test]
    fn a_refused_credential_is_final_only_while_the_session_is_established() {
        for operation in [Operation::ExchangeToken, Operation::Signup] {
            assert_eq!(
                refused(operation),
                [
                    Code::InvalidArgument,
                    Code::NotFound,
                    Code::AlreadyExists,
                    Code::PermissionDenied,
                    Code::FailedPrecondition,
                    Code::OutOfRange,
                    Code::Unauthenticated,
                ],
                "{operation}"
            );
        }
    }

    #[test]
    fn the_status_is_the_source_and_the_message_names_the_call() {
        let err = Error::classify(
            Operation::GetEnvironment,
            Status::not_found("no such environment"),
        );
        assert_eq!(err.to_string(), "GetEnvironment refused (NotFound)");
        assert_eq!(err.code(), Code::NotFound);
        let chain = runner_core::error::chain(&err);
        assert!(chain.contains("no such environment"), "{chain}");
        let core: runner_core::traits::ControlPlaneError = err.into();
        assert!(!core.is_retryable());
        let chain = runner_core::error::chain(&core);
        assert!(
            chain.starts_with("control plane rejected the request: GetEnvironment refused"),
            "{chain}"
        );
    }
}
