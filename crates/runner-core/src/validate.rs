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

/// A repository URL in its one canonical form: `https://host[:port]/path`.
///
/// The URL decides which host receives the creator's token, and its text goes
/// to the instance's shell and to git, so only the form that every parser
/// reads the same way passes: lowercase ASCII host (no IDN, no `xn--` label:
/// look-alikes of another host), no trailing dot, no explicit port 443; no
/// user info and no `@` anywhere; no backslash, whitespace, quotes or control
/// characters; no query or fragment; no empty, `.` or `..` path segment;
/// percent-encoding only where needed, in uppercase, never of `/`, `\`, `@`
/// or a control character. Anything the `url` crate would rewrite is refused
/// rather than rewritten. Errors name the problem and never echo the URL.
/// Returns the parsed URL, whose text is `value`.
pub fn repository_url(field: &str, value: &str) -> Result<url::Url> {
    text(field, value, MAX_REPOSITORY_URL_LEN)?;
    let refuse = |problem: &str| Err(FieldError::new(field, problem));
    if value.chars().any(char::is_whitespace) {
        return refuse(
            "must not contain spaces or other whitespace (write a space in a path as %20)",
        );
    }
    if value.contains('\\') {
        return refuse("must not contain a backslash");
    }
    if value.contains(['"', '\'', '`']) {
        return refuse("must not contain quotes");
    }
    let url = url::Url::parse(value)
        .map_err(|err| FieldError::new(field, format!("is not a valid URL ({err})")))?;
    if url.scheme() != "https" {
        return Err(FieldError::new(
            field,
            format!("scheme {:?} is not supported, use https", url.scheme()),
        ));
    }
    let Some(rest) = value.strip_prefix("https://") else {
        return refuse("must start with \"https://\" in lowercase");
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if authority.contains('@') {
        // Never echo the URL: the user part may be a token.
        return refuse(
            "must not contain credentials or a user name; tokens are configured per host",
        );
    }
    if tail.contains(['?', '#']) {
        return refuse("must not have a query or fragment");
    }
    if tail.contains('@') {
        return refuse("must not contain '@'");
    }
    repository_host(field, authority)?;
    repository_path(field, tail)?;
    let Some(url_host) = url.host_str() else {
        return refuse("has no host");
    };
    let host_port = match url.port() {
        Some(port) => format!("{url_host}:{port}"),
        None => url_host.to_owned(),
    };
    host(field, &host_port)?;
    if url.as_str() != value {
        return refuse(
            "is not in canonical form (it would be read differently from how it is written)",
        );
    }
    Ok(url)
}

/// The authority of a repository URL, as written.
fn repository_host(field: &str, authority: &str) -> Result {
    let refuse = |problem: &str| Err(FieldError::new(field, problem));
    if authority.is_empty() {
        return refuse("has no host");
    }
    if authority.starts_with('[') {
        return refuse("host must be a name or an IPv4 address");
    }
    let (name, port) = match authority.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (authority, None),
    };
    if !authority.is_ascii()
        || name.split('.').any(|label| {
            label
                .get(..4)
                .is_some_and(|p| p.eq_ignore_ascii_case("xn--"))
        })
    {
        return refuse(
            "host must be plain ASCII: internationalised (IDN or \"xn--\") names are refused, \
             they can imitate another host",
        );
    }
    if authority.contains('%') {
        return refuse("host must not be percent-encoded");
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return refuse("host must be lowercase");
    }
    if name.ends_with('.') {
        return refuse("host must not end with a dot");
    }
    if let Some(port) = port {
        if port == "443" {
            return refuse("must not name the default port 443");
        }
        let ok = !port.starts_with('0')
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !ok {
            return refuse("has an invalid port (a number from 1 to 65535, without leading zeros)");
        }
    }
    Ok(())
}

/// The path of a repository URL, as written (empty or starting with `/`).
fn repository_path(field: &str, path: &str) -> Result {
    let refuse = |problem: &str| Err(FieldError::new(field, problem));
    if !path.is_ascii() {
        return refuse("must be ASCII (percent-encode other characters in its path)");
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    if segments.iter().all(|s| s.is_empty()) {
        return refuse("has no repository path");
    }
    for segment in &segments {
        if segment.is_empty() {
            return refuse("must not have an empty path segment (\"//\" or a trailing \"/\")");
        }
        let dots = segment.to_ascii_lowercase().replace("%2e", ".");
        if dots == "." || dots == ".." {
            return refuse("must not have a \".\" or \"..\" path segment");
        }
        let mut bytes = segment.bytes();
        while let Some(b) = bytes.next() {
            if b != b'%' {
                let allowed = b.is_ascii_alphanumeric() || b"-._~!$&()*+,;=:".contains(&b);
                if !allowed {
                    return Err(FieldError::new(
                        field,
                        format!(
                            "must not contain {:?} in its path (percent-encode it)",
                            char::from(b)
                        ),
                    ));
                }
                continue;
            }
            let hex = [bytes.next(), bytes.next()];
            let [Some(hi), Some(lo)] = hex else {
                return refuse("has a malformed percent-encoding");
            };
            let digit = |d: u8| match d {
                b'0'..=b'9' => Some(d - b'0'),
                b'A'..=b'F' => Some(d - b'A' + 10),
                _ => None,
            };
            let (Some(h), Some(l)) = (digit(hi), digit(lo)) else {
                return if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() {
                    refuse("must write percent-encodings in uppercase (like %2A)")
                } else {
                    refuse("has a malformed percent-encoding")
                };
            };
            let byte = h * 16 + l;
            match byte {
                b'/' => return refuse("must not contain an encoded slash (%2F)"),
                b'\\' => return refuse("must not contain an encoded backslash (%5C)"),
                b'@' => return refuse("must not contain '@', even percent-encoded"),
                0..0x20 | 0x7f => return refuse("must not contain encoded control characters"),
                b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                    return refuse("percent-encodes a character that needs no encoding");
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The origin `https://host[:port]/` of a URL [`repository_url`] accepted:
/// the one place its checkout credential may be sent.
pub fn repository_origin(url: &url::Url) -> String {
    format!("{}/", url.origin().ascii_serialization())
}

/// Whether `url` names a loopback host (`localhost`, `127.0.0.0/8`, `::1`),
/// the only place plaintext HTTP is allowed: the runner's control-plane URL
/// and SCM endpoint overrides. Parsed as a browser would (WHATWG), so the
/// host is the one a client connects to, whatever user info or port is there.
pub fn is_loopback_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|url| match url.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    })
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
            disconnected_timeout: None,
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
    fn repository_urls_in_canonical_form_pass() {
        for ok in [
            "https://github.com/acme/api",
            "https://github.com/acme/api.git",
            "https://gitlab.com/group/sub/subsub/repo.git",
            "https://git.example.com:8443/group/sub/repo",
            "https://127.0.0.1:8443/acme/api.git",
            "https://dev.azure.com/org/My%20Project/_git/repo",
            "https://dev.azure.com/org/Caf%C3%A9/_git/repo",
            "https://org.visualstudio.com/Project/_git/repo",
            "https://bitbucket.org/acme/api_v2-x.y~z",
        ] {
            let url = repository_url("r", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(url.as_str(), ok);
        }
        let origin = |u: &str| repository_origin(&repository_url("r", u).expect("valid"));
        assert_eq!(origin("https://github.com/acme/api"), "https://github.com/");
        assert_eq!(
            origin("https://git.example.com:8443/group/sub/repo"),
            "https://git.example.com:8443/"
        );
    }

    /// Regression (issue 12): `https://github.com\@evil.example/acme/api`
    /// passed with host github.com (the `url` crate ends an https host at
    /// `\`), so the github.com token went to an environment whose git and
    /// curl read `github.com\` as a user name and connected to evil.example.
    /// This table is the crafted URLs of that review and more tricks; each is
    /// refused naming its problem, without echoing the URL.
    #[test]
    fn crafted_repository_urls_are_refused_naming_the_problem() {
        let cases: &[(&str, &str)] = &[
            (
                "https://github.com\\@evil.example/acme/api",
                "must not contain a backslash",
            ),
            (
                "https://github.com\\evil.example/acme/api",
                "must not contain a backslash",
            ),
            (
                "https://github.com/acme\\api",
                "must not contain a backslash",
            ),
            (
                "https://x-access-token:ghp_SeCrEt1@github.com/a/b",
                "must not contain credentials or a user name",
            ),
            (
                "https://ghp_SeCrEt1@github.com/a/b",
                "must not contain credentials",
            ),
            (
                "https://github.com:443@evil.example/a/b",
                "must not contain credentials",
            ),
            (
                "https://github.com/@evil.example/acme/api",
                "must not contain '@'",
            ),
            ("https://github.com/acme/api@evil", "must not contain '@'"),
            (
                "https://github.com/acme%40evil.example/api",
                "'@', even percent-encoded",
            ),
            (
                "https://github.com/acme%2Fapi",
                "must not contain an encoded slash (%2F)",
            ),
            ("https://github.com/acme%2fapi", "in uppercase"),
            ("https://github.com/acme%5Capi", "encoded backslash (%5C)"),
            (
                "https://github.com/acme%0Aapi",
                "encoded control characters",
            ),
            (
                "https://github.com/acme%00api",
                "encoded control characters",
            ),
            (
                "https://github.com/acme%7Fapi",
                "encoded control characters",
            ),
            ("https://github.com/%61cme/api", "needs no encoding"),
            ("https://github.com/acme%2", "malformed percent-encoding"),
            (
                "https://github.com/acme%zzapi",
                "malformed percent-encoding",
            ),
            // Cyrillic і (U+0456), and its punycode.
            (
                "https://g\u{456}thub.com/acme/api",
                "host must be plain ASCII",
            ),
            (
                "https://xn--gthub-n2e.com/acme/api",
                "host must be plain ASCII",
            ),
            (
                "https://XN--gthub-n2e.com/acme/api",
                "host must be plain ASCII",
            ),
            ("https://github.com/acm\u{e9}/api", "must be ASCII"),
            ("https://GitHub.com/acme/api", "host must be lowercase"),
            (
                "https://github.com./acme/api",
                "host must not end with a dot",
            ),
            (
                "https://github.com:443/acme/api",
                "must not name the default port 443",
            ),
            ("https://github.com:0443/acme/api", "has an invalid port"),
            ("https://github.com:/acme/api", "has an invalid port"),
            ("https://github.com:+8443/acme/api", "is not a valid URL"),
            ("https://github.com:65536/acme/api", "is not a valid URL"),
            ("https://github.com:0/acme/api", "has an invalid port"),
            (
                "https://[::1]:8443/acme/api",
                "host must be a name or an IPv4 address",
            ),
            ("https://127.1/acme/api", "is not in canonical form"),
            (
                "https://git%68ub.com/acme/api",
                "host must not be percent-encoded",
            ),
            ("https://github.com/acme/api\"", "must not contain quotes"),
            ("https://github.com/ac'me/api", "must not contain quotes"),
            ("https://github.com/ac`id`/api", "must not contain quotes"),
            ("https://github.com/acme/my api", "must not contain spaces"),
            (
                "https://github.com/acme/api\u{a0}",
                "must not contain spaces",
            ),
            (
                "https://github.com/acme/api\tx",
                "must not contain control characters",
            ),
            (
                "https://github.com/acme/api\n",
                "must not contain control characters",
            ),
            (
                "https://github.com/acme/\r\nHost: evil",
                "must not contain control characters",
            ),
            (
                "https://github.com/acme/../evil/api",
                "must not have a \".\" or \"..\" path segment",
            ),
            (
                "https://github.com/acme/./api",
                "must not have a \".\" or \"..\"",
            ),
            (
                "https://github.com/acme/%2E%2E/api",
                "must not have a \".\" or \"..\"",
            ),
            (
                "https://github.com/acme/.%2e/api",
                "must not have a \".\" or \"..\"",
            ),
            (
                "https://github.com/acme//api",
                "must not have an empty path segment",
            ),
            (
                "https://github.com/acme/api/",
                "must not have an empty path segment",
            ),
            (
                "https://github.com/acme/a<b>",
                "must not contain '<' in its path",
            ),
            (
                "https://github.com/acme/a|b",
                "must not contain '|' in its path",
            ),
            (
                "https://github.com/a/b?x=1",
                "must not have a query or fragment",
            ),
            (
                "https://github.com/a/b?",
                "must not have a query or fragment",
            ),
            (
                "https://github.com/a/b#readme",
                "must not have a query or fragment",
            ),
            (
                "https://github.com?a/b",
                "must not have a query or fragment",
            ),
            (
                "HTTPS://github.com/acme/api",
                "must start with \"https://\" in lowercase",
            ),
            ("https:github.com/acme/api", "must start with \"https://\""),
            ("https:/github.com/acme/api", "must start with \"https://\""),
            ("https:///github.com/acme/api", "has no host"),
            (
                "http://github.com/acme/api",
                "scheme \"http\" is not supported",
            ),
            (
                "ftp://github.com/acme/api",
                "scheme \"ftp\" is not supported",
            ),
            ("git@github.com:acme/api.git", "is not a valid URL"),
            ("github.com/acme/api", "is not a valid URL"),
            ("https://github.com/", "has no repository path"),
            ("https://github.com", "has no repository path"),
            (
                "https://-bad-.example/acme/api",
                "is not a lowercase host name",
            ),
            ("", "must not be empty"),
        ];
        for (url, problem) in cases {
            let err = repository_url("r", url).expect_err(url);
            assert_eq!(err.field, "r");
            assert!(
                err.problem.contains(problem),
                "{url:?}: {:?} does not say {problem:?}",
                err.problem
            );
            let message = err.to_string();
            for echo in ["ghp_SeCrEt1", "evil", "gthub", "acme"] {
                assert!(
                    !message.contains(echo),
                    "{url:?}: {message:?} echoes the URL"
                );
            }
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

    #[test]
    fn loopback_urls_are_localhost_127_and_ipv6_one_only() {
        for loopback in [
            "http://127.0.0.1:7443",
            "http://127.8.9.10/api",
            "http://localhost:7443",
            "http://LOCALHOST",
            "http://[::1]:7443",
            "https://localhost",
        ] {
            assert!(is_loopback_url(loopback), "{loopback}");
        }
        for other in [
            "http://10.0.0.1:7443",
            "http://localhost.example.com",
            "http://127.0.0.1.example.com",
            "http://127.0.0.1@example.com",
            "http://example.com#@127.0.0.1",
            "http://[::2]",
            "not a url",
            "127.0.0.1:7443",
        ] {
            assert!(!is_loopback_url(other), "{other}");
        }
    }
}
