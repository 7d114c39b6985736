//! An AWS call's failure as the adapters and the setup checks read and
//! report it: which call (`kms:DescribeKey`), the HTTP status, the service's
//! code and message, or the SDK's own account of why there was no answer
//! (its `DisplayErrorContext`: credentials, network, timeout). Its text is
//! never a bare "error".

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use runner_core::traits::{BoxError, ComputeError};

/// A failed AWS call, any service.
#[derive(Debug)]
pub struct AwsError {
    /// `service:Operation`, e.g. `kms:DescribeKey`.
    operation: String,
    /// The HTTP status, when a response came back.
    status: Option<u16>,
    /// The service's answer, `None` when it never answered.
    answer: Option<Answer>,
    /// Why there was no answer (the SDK's error with its sources), `None`
    /// when there was one.
    context: Option<String>,
    /// The SDK's error.
    source: BoxError,
}

#[derive(Debug)]
struct Answer {
    code: Option<String>,
    message: Option<String>,
}

/// The whole account, on one line: [`AwsError::text`].
impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// No source: the text already holds the SDK error's chain (a reported
/// chain would repeat it).
impl std::error::Error for AwsError {}

/// Whether an error code means "try again": throttling and 5xx.
pub(crate) fn transient_code(code: &str) -> bool {
    code.starts_with("RequestLimitExceeded")
        || code.contains("Throttl")
        || code.starts_with("Unavailable")
        || code == "InternalError"
        || code == "ServiceUnavailable"
}

/// `kms:DescribeKey` from the SDK's error type
/// `aws_sdk_kms::operation::describe_key::DescribeKeyError`.
fn operation_name<E>() -> String {
    let path = std::any::type_name::<E>();
    let path = path.split('<').next().unwrap_or(path);
    let service = path
        .split("::")
        .next()
        .and_then(|krate| krate.strip_prefix("aws_sdk_"));
    let last = path.rsplit("::").next().unwrap_or(path);
    let operation = last
        .strip_suffix("Error")
        .filter(|o| !o.is_empty())
        .unwrap_or(last);
    match service {
        Some(service) => format!("{service}:{operation}"),
        None => operation.to_owned(),
    }
}

impl AwsError {
    /// Reads `err`'s operation, status, code and message.
    pub fn new<E>(err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let answer = err.as_service_error().map(|e| Answer {
            code: e.code().map(str::to_owned),
            message: e.message().map(str::to_owned),
        });
        let context = answer
            .is_none()
            .then(|| DisplayErrorContext(&err).to_string());
        Self {
            operation: operation_name::<E>(),
            status: err.raw_response().map(|r| r.status().as_u16()),
            answer,
            context,
            source: Box::new(err),
        }
    }

    /// The call that failed, `service:Operation`.
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// The HTTP status, when a response came back.
    pub fn status(&self) -> Option<u16> {
        self.status
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

    /// Whether the fault is the service's or the way to it (no answer, a 5xx
    /// or throttling), not the request's: no setting of the caller's fixes it.
    pub fn is_fault(&self) -> bool {
        match self.code() {
            Some(code) if transient_code(code) => true,
            _ => self.answer.is_none() || self.status.is_some_and(|s| s >= 500),
        }
    }

    /// The fix to suggest: `setting_hint` when the request may be what is
    /// wrong, and when the service failed, what to do about that instead.
    pub fn hint(&self, setting_hint: &str) -> String {
        if self.answer.is_none() {
            "the call got no answer (see the cause): check the network path to the service (NAT or VPC endpoints) and the task's credentials; the check runs again".to_owned()
        } else if self.is_fault() {
            format!(
                "the service failed ({}), not the setting: the check runs again; if it keeps failing, look at the service's health",
                self.status
                    .map_or_else(|| "throttled".to_owned(), |s| format!("HTTP {s}"))
            )
        } else {
            setting_hint.to_owned()
        }
    }

    /// For a person: `service:Operation: HTTP status: Code: message` (each
    /// part the answer had; "no error code" when it had none), or the SDK's
    /// account of why the service never answered.
    pub fn text(&self) -> String {
        let mut parts = vec![self.operation.clone()];
        if let Some(status) = self.status {
            parts.push(format!("HTTP {status}"));
        }
        match &self.answer {
            Some(answer) => {
                parts.push(
                    answer
                        .code
                        .clone()
                        .unwrap_or_else(|| "no error code".to_owned()),
                );
                if let Some(message) = answer.message.as_deref().filter(|m| !m.is_empty()) {
                    parts.push(message.to_owned());
                }
            }
            None => parts.push(self.context.clone().unwrap_or_default()),
        }
        parts.join(": ")
    }

    /// The SDK's error.
    pub fn sdk_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.source.as_ref()
    }
}

impl<E> From<SdkError<E, HttpResponse>> for AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    fn from(err: SdkError<E, HttpResponse>) -> Self {
        Self::new(err)
    }
}

/// `err`, boxed with its whole account, for the adapters' `Unavailable`s.
pub(crate) fn boxed(err: impl Into<AwsError>) -> BoxError {
    Box::new(err.into())
}

/// EC2's classification: no answer, throttling and 5xx are `Unavailable`
/// (with the whole account of the failure), any other answer is `Rejected`
/// with its code and message.
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
            _ => Self::Unavailable(Box::new(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::operation_name;

    #[test]
    fn the_operation_is_named_after_the_sdk_error_type() {
        assert_eq!(
            operation_name::<aws_sdk_kms::operation::describe_key::DescribeKeyError>(),
            "kms:DescribeKey"
        );
        assert_eq!(
            operation_name::<aws_sdk_ec2::operation::run_instances::RunInstancesError>(),
            "ec2:RunInstances"
        );
        assert_eq!(operation_name::<std::io::Error>(), "Error");
    }
}
