//! Spec validation and context URLs on arbitrary input.
//!
//! Whatever the control plane sends, `validate_spec`, every `validate::*`
//! rule, `scm::host_of`, `scm::parse_context_url` and `scm::endpoints` must
//! return, never panic, and keep their promises:
//! - a field rule's error names the field it was given;
//! - a refused spec's message is one the control plane accepts as a
//!   `failure_message` (at most 4096 bytes, no control characters);
//! - a URL with credentials is refused, and no error echoes credentials
//!   or a query;
//! - an accepted repository URL is canonical (issue 12): its text is what
//!   the `url` crate reads back, https, without `@`, backslash, quotes,
//!   whitespace or control characters, query or fragment, with a lowercase
//!   ASCII host that is no IDN (`xn--`) and has no trailing dot, and it
//!   starts with its origin;
//! - a parsed context URL's clone URL parses back to the same repository.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use runner_core::model::{DesiredPhase, EnvironmentClass, Revision, Spec};
use runner_core::reconcile::validate_spec;
use runner_core::scm::{self, ScmKind, Target};
use runner_core::validate;

#[derive(Debug, Arbitrary)]
struct Input {
    desired: u8,
    spec_version: u64,
    class_id: String,
    repository_url: String,
    revision: u8,
    revision_value: String,
    creator: String,
    class: Option<Class>,
    kind: u8,
    context_url: String,
    text: String,
    disk: i64,
    api_base_url: Option<String>,
    oauth_base_url: Option<String>,
}

#[derive(Debug, Arbitrary)]
struct Class {
    same_id: bool,
    id: String,
    display_name: String,
    instance_type: String,
    disk_gib: u32,
    enabled: bool,
}

const KINDS: [ScmKind; 4] = [
    ScmKind::GitHub,
    ScmKind::GitLab,
    ScmKind::Bitbucket,
    ScmKind::AzureDevOps,
];

/// The control plane's rule for a status's `failure_message`.
fn acceptable_message(message: &str) {
    assert!(!message.is_empty(), "an empty failure message");
    assert!(
        validate::optional_text("failure_message", message, validate::MAX_MESSAGE_LEN).is_ok(),
        "the control plane would refuse this failure message: {message:?}"
    );
}

const USER: &str = "uSeRmArKeR";
const PASSWORD: &str = "pAsSmArKeR";
const QUERY: &str = "access_token=qUeRyMaRkEr";
/// What must never be echoed.
const MARKERS: [&str; 3] = [USER, PASSWORD, "qUeRyMaRkEr"];

/// `url` with marker credentials, and `url` with a marker query; `None`
/// when it cannot hold them. The markers are what must never be echoed
/// (the rest of a URL may be: a path is not secret).
fn with_secrets(url: &str) -> Option<(String, String)> {
    let parsed = url::Url::parse(url).ok()?;
    // A URL that already holds a marker (in its path, say, in any case,
    // percent-encoded, or once the parser drops its tabs) may be echoed.
    let holds_marker = |text: &str| {
        let decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .to_lowercase();
        MARKERS.iter().any(|m| decoded.contains(&m.to_lowercase()))
    };
    if holds_marker(url) || holds_marker(parsed.as_str()) {
        return None;
    }
    let mut credentials = parsed.clone();
    credentials.set_username(USER).ok()?;
    credentials.set_password(Some(PASSWORD)).ok()?;
    let mut query = parsed;
    query.set_query(Some(QUERY));
    Some((credentials.into(), query.into()))
}

fn no_secret(message: &str) {
    for marker in MARKERS {
        assert!(!message.contains(marker), "{message:?} echoes a secret");
    }
}

/// What an accepted repository URL promises.
fn canonical(text: &str, url: &url::Url) {
    assert_eq!(url.as_str(), text, "accepted a URL that is not canonical");
    assert_eq!(url.scheme(), "https");
    assert!(url.username().is_empty() && url.password().is_none());
    assert!(url.query().is_none() && url.fragment().is_none());
    assert!(
        !text.contains(['@', '\\', '"', '\'', '`'])
            && !text.chars().any(|c| c.is_whitespace() || c.is_control()),
        "{text:?}"
    );
    let host = url.host_str().expect("an https URL has a host");
    assert!(
        host.is_ascii()
            && !host.bytes().any(|b| b.is_ascii_uppercase())
            && !host.ends_with('.')
            && !host.split('.').any(|l| l.starts_with("xn--")),
        "{host:?}"
    );
    let authority = text["https://".len()..]
        .split('/')
        .next()
        .unwrap_or_default();
    assert!(!authority.ends_with(":443"), "{text:?}");
    let origin = validate::repository_origin(url);
    assert!(
        text.starts_with(&origin) && text.len() > origin.len(),
        "{text:?} is not under {origin:?}"
    );
}

fn field_rules(input: &Input) {
    let s = input.text.as_str();
    let named = |result: Result<(), validate::FieldError>| {
        if let Err(err) = result {
            assert_eq!(err.field, "f");
            assert!(err.to_string().starts_with("f: "));
        }
    };
    named(validate::text("f", s, 64));
    named(validate::optional_text("f", s, 64));
    named(validate::uuid("f", s).map(drop));
    named(validate::runner_name("f", s));
    named(validate::region("f", s));
    named(validate::instance_type("f", s));
    named(validate::disk_gib("f", input.disk));
    named(validate::host("f", s));
    named(validate::branch("f", s));
    named(validate::commit("f", s));
    named(validate::version("f", s));
    match validate::repository_url("f", &input.repository_url) {
        Ok(url) => canonical(&input.repository_url, &url),
        Err(err) => assert_eq!(err.field, "f"),
    }
    if let Some((credentials, query)) = with_secrets(&input.repository_url) {
        for url in [credentials, query] {
            let err = validate::repository_url("f", &url)
                .expect_err("credentials and queries are refused");
            no_secret(&err.problem);
        }
    }
}

fn spec(input: &Input) {
    let desired = match input.desired % 4 {
        0 => None,
        1 => Some(DesiredPhase::Running),
        2 => Some(DesiredPhase::Stopped),
        _ => Some(DesiredPhase::Deleted),
    };
    let revision = match input.revision % 3 {
        0 => Revision::Default,
        1 => Revision::Branch(input.revision_value.clone()),
        _ => Revision::Commit(input.revision_value.clone()),
    };
    let spec = Spec {
        spec_version: input.spec_version,
        desired,
        class_id: input.class_id.clone(),
        repository_url: input.repository_url.clone(),
        revision,
        creator: input.creator.clone(),
    };
    let class = input.class.as_ref().map(|c| EnvironmentClass {
        id: if c.same_id {
            input.class_id.clone()
        } else {
            c.id.clone()
        },
        display_name: c.display_name.clone(),
        instance_type: c.instance_type.clone(),
        disk_gib: c.disk_gib,
        enabled: c.enabled,
    });
    // The runner looks the class up by the spec's class id (`Desired` keys
    // classes by id), so the class it passes always has that id.
    let class = class.filter(|c| c.id == spec.class_id);
    match validate_spec(&spec, class.as_ref()) {
        Ok(phase) => {
            assert_eq!(Some(phase), desired);
            if phase != DesiredPhase::Deleted {
                // Everything a launch uses passed its rule.
                assert!(validate::repository_url("r", &spec.repository_url).is_ok());
                assert!(class.as_ref().is_some_and(|c| c.enabled));
            }
        }
        Err(message) => acceptable_message(&message),
    }
}

fn context_url(input: &Input) {
    let url = input.context_url.as_str();
    if let Ok(host) = scm::host_of(url) {
        assert!(!host.is_empty());
    }
    let kind = KINDS[usize::from(input.kind) % KINDS.len()];
    if let Some((credentials, query)) = with_secrets(url) {
        no_secret(
            &scm::host_of(&credentials)
                .expect_err("credentials are refused")
                .to_string(),
        );
        no_secret(
            &scm::parse_context_url(&credentials, kind)
                .expect_err("credentials are refused")
                .to_string(),
        );
        match scm::parse_context_url(&query, kind) {
            Ok(parsed) => no_secret(&format!("{parsed:?}")),
            Err(err) => no_secret(&err.to_string()),
        }
    }
    match scm::parse_context_url(url, kind) {
        Ok(parsed) => {
            assert_eq!(parsed.kind, kind);
            assert_eq!(scm::host_of(url).ok().as_deref(), Some(parsed.host.as_str()));
            assert!(!parsed.repository.is_empty());
            if let Target::Branch(branch) = &parsed.target {
                assert!(validate::branch("b", branch).is_ok(), "{branch:?}");
            }
            // The clone URL names the same repository.
            let again = scm::parse_context_url(&parsed.clone_url, kind)
                .unwrap_or_else(|err| panic!("{}: {err}", parsed.clone_url));
            assert_eq!(
                (
                    again.host.as_str(),
                    again.owner.as_str(),
                    again.repository.as_str()
                ),
                (
                    parsed.host.as_str(),
                    parsed.owner.as_str(),
                    parsed.repository.as_str()
                ),
                "{url} → {}",
                parsed.clone_url
            );
            assert_eq!(again.target, Target::Repository);
            assert_eq!(again.clone_url, parsed.clone_url);
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
    if let Ok(endpoints) = scm::endpoints(
        kind,
        &input.text,
        input.api_base_url.as_deref(),
        input.oauth_base_url.as_deref(),
    ) {
        for url in [
            &endpoints.api,
            &endpoints.user,
            &endpoints.token,
            &endpoints.authorize,
        ] {
            assert!(matches!(url.scheme(), "https" | "http"), "{url}");
        }
        let _ = scm::authorize_url(&endpoints, &input.creator);
    }
}

fuzz_target!(|input: Input| {
    field_rules(&input);
    spec(&input);
    context_url(&input);
});
