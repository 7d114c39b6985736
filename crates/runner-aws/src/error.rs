//! An AWS call's failure as the adapters and the setup checks read it: the
//! service's code and message, or no answer at all (credentials, network);
//! the SDK's error is kept as the source.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use runner_core::traits::{BoxError, ComputeError};

/// A failed AWS call, any service.
#[derive(Debug)]
pub struct AwsError {
    /// The service's answer, `None` when it never answered.
    answer: Option<Answer>,
    /// The SDK's error.
    source: BoxError,
}

#[derive(Debug)]
struct Answer {
    code: Option<String>,
    message: Option<String>,
}

impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

/// Transparent: the SDK error's own text and sources.
impl std::error::Error for AwsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

/// Whether an error code means "try again": throttling and 5xx.
pub(crate) fn transient_code(code: &str) -> bool {
    code.starts_with("RequestLimitExceeded")
        || code.contains("Throttl")
        || code.starts_with("Unavailable")
        || code == "InternalError"
        || code == "ServiceUnavailable"
}

impl AwsError {
    /// Reads `err`'s code and message.
    pub fn new<E, R>(err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let answer = err.as_service_error().map(|e| Answer {
            code: e.code().map(str::to_owned),
            message: e.message().map(str::to_owned),
        });
        Self {
            answer,
            source: Box::new(err),
        }
    }

    /// The service's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        self.answer.as_ref().and_then(|a| a.code.as_deref())
    }

    /// Whether the caller lacks a permission.
    pub fn is_denied(&self) -> bool {
        self.code()
            .is_some_and(|c| c.contains("AccessDenied") || c.contains("UnauthorizedOperation"))
    }

    /// For a person: `Code: message` (`Code` alone without a message), or the
    /// error's chain when the service never answered.
    pub fn text(&self) -> String {
        match &self.answer {
            Some(answer) => {
                let code = answer.code.as_deref().unwrap_or("error");
                match answer.message.as_deref() {
                    Some(message) if !message.is_empty() => format!("{code}: {message}"),
                    _ => code.to_owned(),
                }
            }
            None => runner_core::error::chain(self.source.as_ref()),
        }
    }
}

/// EC2's classification: no answer, throttling and 5xx are `Unavailable`
/// (the SDK's error as the source), any other answer is `Rejected` with its
/// code and message.
impl From<AwsError> for ComputeError {
    fn from(err: AwsError) -> Self {
        match err.code() {
            Some(code) if !transient_code(code) => {
                let message = err
                    .answer
                    .as_ref()
                    .and_then(|a| a.message.as_deref())
                    .unwrap_or_default();
                Self::Rejected(format!("{code}: {message}"))
            }
            _ => Self::Unavailable(err.source),
        }
    }
}
