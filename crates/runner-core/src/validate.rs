//! Field rules shared by the runner and the reference control plane.
//!
//! Each check takes the field's name so that its error names it: a caller
//! turns a [`FieldError`] into INVALID_ARGUMENT (control plane) or a
//! `failure_message` (runner) without rewording it. Checks never echo a value
//! that could be a secret.

use std::fmt;

/// Smallest root disk an environment class may ask for, in GiB.
pub const MIN_DISK_GIB: u32 = 8;
/// Largest root disk an environment class may ask for, in GiB (the gp3 limit).
pub const MAX_DISK_GIB: u32 = 16_384;
/// Longest repository URL accepted, in bytes.
pub const MAX_REPOSITORY_URL_LEN: usize = 2048;
/// Longest branch name accepted, in bytes.
pub const MAX_BRANCH_LEN: usize = 255;
/// Longest display name accepted, in bytes.
pub const MAX_DISPLAY_NAME_LEN: usize = 128;
/// Longest principal accepted, in bytes.
pub const MAX_PRINCIPAL_LEN: usize = 256;
/// Longest user-facing message (failure, warning) accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// A field that breaks its rule: `field: problem`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// The field's name as it appears on the wire, e.g. `spec.content.repository_url`.
    pub field: String,
    /// What is wrong, in lowercase, without the offending value when it might be secret.
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

type Result<T = ()> = std::result::Result<T, FieldError>;

/// A non-empty string of at most `max` bytes without control characters.
pub fn text(field: &str, value: &str, max: usize) -> Result {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    optional_text(field, value, max)
}

/// Like [`text`], but empty is allowed.
pub fn optional_text(field: &str, value: &str, max: usize) -> Result {
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!("is {} bytes long, the limit is {max}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// `value` fit to quote in a message built from input that was not checked
/// (say, a class's display name from the control plane): control characters
/// become U+FFFD and it is cut to at most `max` bytes, on a character
/// boundary, ending in "…" when cut. The control plane refuses a status
/// whose message holds control characters, so a raw echo would lose it.
pub fn printable(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max));
    for c in value.chars() {
        let c = if c.is_control() { '\u{fffd}' } else { c };
        if out.len() + c.len_utf8() > max {
            while out.len() + '…'.len_utf8() > max && out.pop().is_some() {}
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out
}

/// A UUID in its hyphenated form.
pub fn uuid(field: &str, value: &str) -> Result<uuid::Uuid> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() != 36 {
        return Err(FieldError::new(field, "is not a UUID"));
    }
    uuid::Uuid::try_parse(value).map_err(|_| FieldError::new(field, "is not a UUID"))
}

/// A runner name: 1 to 64 letters, digits, `-` or `_`.
pub fn runner_name(field: &str, value: &str) -> Result {
    text(field, value, 64)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(FieldError::new(
            field,
            "may contain only letters, digits, '-' and '_'",
        ));
    }
    Ok(())
}

/// An AWS region name such as `eu-west-1` or `us-gov-west-1`.
pub fn region(field: &str, value: &str) -> Result {
    text(field, value, 32)?;
    let parts: Vec<&str> = value.split('-').collect();
    let ok = parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && (1..=2).contains(&parts[parts.len() - 1].len());
    if !ok {
        return Err(FieldError::new(
            field,
            format!("{value:?} is not an AWS region name (like \"eu-west-1\")"),
        ));
    }
    Ok(())
}

/// An EC2 instance type name such as `m7i.xlarge` or `u-6tb1.metal`.
pub fn instance_type(field: &str, value: &str) -> Result {
    text(field, value, 32)?;
    let Some((family, size)) = value.split_once('.') else {
        return Err(FieldError::new(
            field,
            format!("{value:?} is not an EC2 instance type (like \"m7i.large\")"),
        ));
    };
    let family_ok = family.starts_with(|c: char| c.is_ascii_lowercase())
        && family
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let size_ok = !size.is_empty()
        && size
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !family_ok || !size_ok {
        return Err(FieldError::new(
            field,
            format!("{value:?} is not an EC2 instance type (like \"m7i.large\")"),
        ));
    }
    Ok(())
}

/// The instance types a runner may launch (its stack's
/// `AllowedInstanceTypes`, which the task role's `ec2:InstanceType`
/// condition enforces too); empty allows any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedInstanceTypes(Vec<String>);

impl AllowedInstanceTypes {
    /// Exactly `types`, each an instance type (checked as `field`); none, or
    /// only empty entries, allows any.
    pub fn new<'a>(field: &str, types: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let types: Vec<&str> = types.into_iter().collect();
        if types.iter().all(|t| t.is_empty()) {
            return Ok(Self::default());
        }
        let mut allowed: Vec<String> = Vec::new();
        for t in types {
            instance_type(field, t)?;
            if !allowed.iter().any(|a| a == t) {
                allowed.push(t.to_owned());
            }
        }
        Ok(Self(allowed))
    }

    /// Whether any type is allowed.
    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    /// The allowed types, in the order given; empty when any is allowed.
    pub fn types(&self) -> &[String] {
        &self.0
    }

    /// Refuses an instance type (already checked with [`instance_type`])
    /// that is not allowed, naming `field` and the allowed types.
    pub fn check(&self, field: &str, value: &str) -> Result {
        if self.is_any() || self.0.iter().any(|t| t == value) {
            return Ok(());
        }
        Err(FieldError::new(
            field,
            format!(
                "{value} is not one of the instance types this runner allows ({})",
                self.0.join(", ")
            ),
        ))
    }
}

/// A root disk size in GiB, within [`MIN_DISK_GIB`]..=[`MAX_DISK_GIB`].
pub fn disk_gib(field: &str, value: i64) -> Result {
    if !(i64::from(MIN_DISK_GIB)..=i64::from(MAX_DISK_GIB)).contains(&value) {
        return Err(FieldError::new(
            field,
            format!("{value} GiB is outside {MIN_DISK_GIB} to {MAX_DISK_GIB} GiB"),
        ));
    }
    Ok(())
}

/// An SCM host name with an optional port: `github.com`, `git.example.com:8443`.
pub fn host(field: &str, value: &str) -> Result {
    text(field, value, 253 + 6)?;
    let (name, port) = match value.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (value, None),
    };
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0)
    {
        return Err(FieldError::new(
            field,
            format!("{value:?} has an invalid port"),
        ));
    }
    let labels_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !labels_ok {
        return Err(FieldError::new(
            field,
            format!("{value:?} is not a lowercase host name (like \"github.com\")"),
        ));
    }
    Ok(())
}

/// A repository URL: `https://host[:port]/path`, without credentials, query or
/// fragment. Returns the parsed URL.
pub fn repository_url(field: &str, value: &str) -> Result<url::Url> {
    text(field, value, MAX_REPOSITORY_URL_LEN)?;
    let url = url::Url::parse(value)
        .map_err(|err| FieldError::new(field, format!("is not a valid URL ({err})")))?;
    if url.scheme() != "https" {
        return Err(FieldError::new(
            field,
            format!("scheme {:?} is not supported, use https", url.scheme()),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Never echo the URL: the user part may be a token.
        return Err(FieldError::new(
            field,
            "must not contain credentials; tokens are configured per host",
        ));
    }
    let Some(url_host) = url.host_str() else {
        return Err(FieldError::new(field, "has no host"));
    };
    let host_port = match url.port() {
        Some(port) => format!("{url_host}:{port}"),
        None => url_host.to_owned(),
    };
    host(field, &host_port)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(FieldError::new(field, "must not have a query or fragment"));
    }
    if url.path().trim_matches('/').is_empty() {
        return Err(FieldError::new(field, "has no repository path"));
    }
    Ok(url)
}

/// A git branch name, following `git check-ref-format --branch`.
pub fn branch(field: &str, value: &str) -> Result {
    text(field, value, MAX_BRANCH_LEN)?;
    let bad = value.starts_with('-')
        || value.starts_with('/')
        || value.ends_with('/')
        || value.ends_with('.')
        || value.ends_with(".lock")
        || value.contains("..")
        || value.contains("//")
        || value.contains("@{")
        || value == "@"
        || value
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
        || value.split('/').any(|part| part.starts_with('.'));
    if bad {
        return Err(FieldError::new(
            field,
            format!("{value:?} is not a valid git branch name"),
        ));
    }
    Ok(())
}

/// A full commit id: 40 (SHA-1) or 64 (SHA-256) hexadecimal characters.
pub fn commit(field: &str, value: &str) -> Result {
    let ok =
        (value.len() == 40 || value.len() == 64) && value.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(FieldError::new(
            field,
            "is not a full commit id (40 or 64 hexadecimal characters)",
        ));
    }
    Ok(())
}

/// A semantic version such as `1.4.2`.
pub fn version(field: &str, value: &str) -> Result {
    text(field, value, 64)?;
    let core = value.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(FieldError::new(
            field,
            format!("{value:?} is not a semantic version (like \"1.4.2\")"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by `fuzz/run`, target validate_spec): the message
    /// for a disabled class quoted its display name raw, so one holding a
    /// control character made a status the control plane refuses, and the
    /// environment never showed why it failed.
    #[test]
    fn a_disabled_class_message_is_always_acceptable_as_a_failure_message() {
        use crate::model::{DesiredPhase, EnvironmentClass, Revision, Spec};
        let id = "8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a69";
        let spec = Spec {
            spec_version: 1,
            desired: Some(DesiredPhase::Running),
            class_id: id.to_owned(),
            repository_url: "https://github.com/acme/api".to_owned(),
            revision: Revision::Default,
            creator: "alice".to_owned(),
        };
        for display_name in ["\u{1}", "a\nb", &"\u{7f}".repeat(5000), &"é".repeat(3000)] {
            let class = EnvironmentClass {
                id: id.to_owned(),
                display_name: display_name.to_owned(),
                instance_type: "m7i.large".to_owned(),
                disk_gib: 50,
                enabled: false,
            };
            let message =
                crate::reconcile::validate_spec(&spec, Some(&class)).expect_err("disabled");
            assert!(message.ends_with(") is disabled"), "{message}");
            assert_eq!(
                optional_text("status.failure_message", &message, MAX_MESSAGE_LEN),
                Ok(()),
                "{message:?}"
            );
        }
    }

    #[test]
    fn regions() {
        for ok in [
            "eu-west-1",
            "us-gov-west-1",
            "ap-southeast-2",
            "il-central-1",
        ] {
            assert_eq!(region("region", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "eu-west",
            "EU-west-1",
            "europe-west-1",
            "eu-west-123",
            "eu--1",
        ] {
            let err = region("region", bad).unwrap_err();
            assert_eq!(err.field, "region");
        }
    }

    #[test]
    fn instance_types() {
        for ok in [
            "m7i.xlarge",
            "u-6tb1.metal",
            "p4d.24xlarge",
            "mac2-m2pro.metal",
        ] {
            assert_eq!(instance_type("t", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "m7i",
            ".large",
            "M7i.large",
            "m7i.",
            "m7i.large.x",
            "7i.large",
        ] {
            assert!(instance_type("t", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_instance_type_allowlist_refuses_other_types_by_name() {
        let allowed = AllowedInstanceTypes::new("allowed", ["t3.medium", "m7i.large", "t3.medium"])
            .expect("valid");
        assert!(!allowed.is_any());
        assert_eq!(allowed.check("c", "m7i.large"), Ok(()));
        assert_eq!(
            allowed.check("environment_class.instance_type", "p4d.24xlarge"),
            Err(FieldError::new(
                "environment_class.instance_type",
                "p4d.24xlarge is not one of the instance types this runner allows (t3.medium, m7i.large)"
            ))
        );
        assert!(
            allowed.check("c", "m7i.largeX").is_err(),
            "exact names only"
        );
        let any = AllowedInstanceTypes::new("allowed", [""]).expect("empty");
        assert!(any.is_any());
        assert_eq!(any.check("c", "p4d.24xlarge"), Ok(()));
        assert_eq!(
            AllowedInstanceTypes::new("allowed", ["t3.medium", "large"]).map(|_| ()),
            Err(FieldError::new(
                "allowed",
                "\"large\" is not an EC2 instance type (like \"m7i.large\")"
            ))
        );
    }

    #[test]
    fn disks() {
        assert!(disk_gib("d", 8).is_ok());
        assert!(disk_gib("d", 16_384).is_ok());
        assert_eq!(
            disk_gib("spec.disk", -1).unwrap_err().to_string(),
            "spec.disk: -1 GiB is outside 8 to 16384 GiB"
        );
        assert!(disk_gib("d", 7).is_err());
        assert!(disk_gib("d", 16_385).is_err());
    }

    #[test]
    fn repository_urls() {
        assert!(repository_url("r", "https://github.com/acme/api.git").is_ok());
        assert!(repository_url("r", "https://git.example.com:8443/group/sub/repo").is_ok());
        let err =
            repository_url("r", "https://x-access-token:ghp_secret@github.com/a/b").unwrap_err();
        assert!(!err.to_string().contains("ghp_secret"), "{err}");
        for bad in [
            "",
            "github.com/acme/api",
            "http://github.com/acme/api",
            "git@github.com:acme/api.git",
            "https://github.com/",
            "https://github.com/a/b?x=1",
        ] {
            assert!(repository_url("r", bad).is_err(), "{bad}");
        }
        let long = format!("https://github.com/{}", "a".repeat(3000));
        assert!(
            repository_url("r", &long)
                .unwrap_err()
                .problem
                .contains("limit is 2048")
        );
    }

    #[test]
    fn branches_and_commits() {
        for ok in ["main", "feature/x-1", "release-1.2"] {
            assert_eq!(branch("b", ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "-x", "a..b", "a b", "x.lock", "a/.b", "a~1", "a:b", "/a", "a/",
        ] {
            assert!(branch("b", bad).is_err(), "{bad}");
        }
        assert!(commit("c", &"a".repeat(40)).is_ok());
        assert!(commit("c", &"0".repeat(64)).is_ok());
        assert!(commit("c", "abc123").is_err());
        assert!(commit("c", &"g".repeat(40)).is_err());
    }

    #[test]
    fn hosts_uuids_versions_names() {
        assert!(host("h", "github.com").is_ok());
        assert!(host("h", "git.example.com:8443").is_ok());
        for bad in ["", "GitHub.com", "a..b", "x:0", "x:99999", "-a.com", "a b"] {
            assert!(host("h", bad).is_err(), "{bad}");
        }
        assert!(uuid("id", "8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a69").is_ok());
        assert_eq!(
            uuid("id", "nope").unwrap_err().to_string(),
            "id: is not a UUID"
        );
        assert!(version("v", "1.4.2").is_ok());
        assert!(version("v", "1.4.2-rc.1").is_ok());
        assert!(version("v", "1.4").is_err());
        assert!(runner_name("n", "prod_eu-1").is_ok());
        assert!(runner_name("n", "prod eu").is_err());
        assert!(text("n", "a\u{0}b", 10).is_err());
        assert_eq!(printable("Retired", 128), "Retired");
        assert_eq!(printable("a\u{1}b\nc", 128), "a\u{fffd}b\u{fffd}c");
        assert_eq!(printable("abcdef", 5), "ab…");
        assert_eq!(printable("ééé", 5), "é…");
        assert!(optional_text("m", &printable(&"\u{7}".repeat(5000), 128), 128).is_ok());
        assert!(optional_text("n", "", 10).is_ok());
    }
}
