//! What an instance reports about itself: its bootstrap's stage, a failure,
//! the commit checked out, and since when no client is connected, read from
//! the `aws-runner:report:*` tags the instance writes on itself
//! (`deploy/bootstrap.sh`). The instance is untrusted: every value is parsed
//! to a closed type or scrubbed text (printable ASCII, bounded, no URL user
//! info, nothing that looks like a token), and used only for display and the
//! phase. [`scrub`] is also what the console output of a failed start goes
//! through.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The prefix of every report tag; the stack's environment role may write
/// only keys under it, only on its own instance.
pub const TAG_PREFIX: &str = "aws-runner:report:";
/// Tag: the bootstrap's current stage ([`Stage`]).
pub const TAG_STAGE: &str = "aws-runner:report:stage";
/// Tag: `failed` when that stage failed, else `ok`.
pub const TAG_RESULT: &str = "aws-runner:report:result";
/// Tag: the reason of a failure, short free text.
pub const TAG_DETAIL: &str = "aws-runner:report:detail";
/// Tag: when the stage was reported (Unix seconds).
pub const TAG_AT: &str = "aws-runner:report:at";
/// Tag: when the bootstrap started (Unix seconds): the instance runs.
pub const TAG_STARTED_AT: &str = "aws-runner:report:started-at";
/// Tag: the commit checked out (40 hex digits), once ready.
pub const TAG_COMMIT: &str = "aws-runner:report:commit";
/// Tag: since when no client is connected (Unix seconds); empty while one is.
pub const TAG_IDLE_SINCE: &str = "aws-runner:report:idle-since";

/// Longest failure detail kept, in bytes.
pub const MAX_DETAIL: usize = 200;

/// A stage of the bootstrap, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Reading the checkout credential from its secret.
    Credential,
    /// Cloning the repository.
    Clone,
    /// Checking out the requested commit.
    Checkout,
    /// The repository is checked out: the content is ready.
    Ready,
}

impl Stage {
    /// The tag value, and the name a failure message uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Credential => "credential",
            Self::Clone => "clone",
            Self::Checkout => "checkout",
            Self::Ready => "ready",
        }
    }

    /// The stage a tag value names; anything else is `None`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "credential" => Some(Self::Credential),
            "clone" => Some(Self::Clone),
            "checkout" => Some(Self::Checkout),
            "ready" => Some(Self::Ready),
            _ => None,
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance's report, as read from its tags. Empty when it reported
/// nothing (yet), or nothing readable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The last stage reported.
    pub stage: Option<Stage>,
    /// Whether that stage failed.
    pub failed: bool,
    /// Why, scrubbed; empty when not said.
    pub detail: String,
    /// When the stage was reported.
    pub at: Option<SystemTime>,
    /// When the bootstrap started.
    pub started_at: Option<SystemTime>,
    /// The commit checked out (40 lowercase hex digits).
    pub commit: Option<String>,
    /// Since when no client is connected; `None` while one is, or unknown.
    pub idle_since: Option<SystemTime>,
}

impl Report {
    /// Reads a report from an instance's tags (other keys are ignored).
    pub fn from_tags<'a>(tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut report = Self::default();
        for (key, value) in tags {
            match key {
                TAG_STAGE => report.stage = Stage::parse(value),
                TAG_RESULT => report.failed = value == "failed",
                TAG_DETAIL => report.detail = scrub(value, MAX_DETAIL),
                TAG_AT => report.at = unix_seconds(value),
                TAG_STARTED_AT => report.started_at = unix_seconds(value),
                TAG_COMMIT => report.commit = commit(value),
                TAG_IDLE_SINCE => report.idle_since = unix_seconds(value),
                _ => {}
            }
        }
        if report.stage.is_none() {
            // A result without a stage it belongs to says nothing.
            report.failed = false;
        }
        report
    }

    /// Whether the content is ready.
    pub fn ready(&self) -> bool {
        self.stage == Some(Stage::Ready) && !self.failed
    }

    /// The failed stage, when the bootstrap reported a failure.
    pub fn failure(&self) -> Option<Stage> {
        self.stage.filter(|_| self.failed)
    }
}

/// A time as Unix seconds: digits only, at most 12 of them.
fn unix_seconds(value: &str) -> Option<SystemTime> {
    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value
        .parse::<u64>()
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

fn commit(value: &str) -> Option<String> {
    (value.len() == 40 && value.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| value.to_ascii_lowercase())
}

/// Words after which the next word is a credential.
const CREDENTIAL_WORDS: [&str; 5] = ["authorization:", "bearer", "basic", "token", "password"];
/// Prefixes of well-known tokens (GitHub, GitLab, the control plane's).
const TOKEN_PREFIXES: [&str; 10] = [
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "gloas-",
    "ret_",
    "rat_",
];
const REDACTED: &str = "[redacted]";

/// `text` made safe to show: printable ASCII only (anything else becomes
/// `?`), URLs without their user info, anything that looks like a token
/// redacted, at most `max` bytes (cut with `...`).
pub fn scrub(text: &str, max: usize) -> String {
    let ascii: String = text
        .chars()
        .map(|c| match c {
            ' '..='~' => c,
            '\t' | '\n' | '\r' => ' ',
            _ => '?',
        })
        .collect();
    let mut out = String::new();
    let mut after_credential_word = false;
    for word in ascii.split(' ') {
        if !out.is_empty() {
            out.push(' ');
        }
        if after_credential_word && !word.is_empty() {
            out.push_str(REDACTED);
            after_credential_word = false;
            continue;
        }
        let lower = word.to_ascii_lowercase();
        after_credential_word = CREDENTIAL_WORDS
            .iter()
            .any(|w| lower.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != ':') == *w);
        out.push_str(&scrub_word(word));
    }
    let out = out.trim().to_owned();
    if out.len() <= max {
        return out;
    }
    let mut cut = max.saturating_sub(3);
    while !out.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &out[..cut])
}

fn scrub_word(word: &str) -> String {
    // A URL's user info (credentials) goes, whatever scheme.
    if let Some(scheme_end) = word.find("://") {
        let rest = &word[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!(
                "{}://{}{}",
                &word[..scheme_end],
                REDACTED_AT,
                scrub_word(&rest[at + 1..])
            );
        }
    }
    let core = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let lower = core.to_ascii_lowercase();
    if TOKEN_PREFIXES.iter().any(|p| lower.starts_with(p)) || looks_random(core) {
        return word.replace(core, REDACTED);
    }
    word.to_owned()
}

const REDACTED_AT: &str = "[redacted]@";

/// A path segment that is a long run of token characters mixing letters
/// and digits, and not a commit or a UUID: likely a secret.
fn looks_random(word: &str) -> bool {
    word.split('/').any(random_segment)
}

fn random_segment(word: &str) -> bool {
    if word.len() < 24
        || !word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_+=".contains(&b))
    {
        return false;
    }
    let hex = word.bytes().all(|b| b.is_ascii_hexdigit());
    let uuid = uuid::Uuid::try_parse(word).is_ok();
    let digits = word.bytes().any(|b| b.is_ascii_digit());
    let letters = word.bytes().any(|b| b.is_ascii_alphabetic());
    !hex && !uuid && digits && letters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_read_from_its_tags_only() {
        let report = Report::from_tags([
            (TAG_STAGE, "clone"),
            (TAG_RESULT, "failed"),
            (TAG_DETAIL, "git clone refused: HTTP 403"),
            (TAG_AT, "1700000000"),
            (TAG_COMMIT, "not-a-commit"),
            ("aws-runner:runner-id", "x"),
        ]);
        assert_eq!(report.failure(), Some(Stage::Clone));
        assert_eq!(report.detail, "git clone refused: HTTP 403");
        assert_eq!(
            report.at,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(report.commit, None, "a malformed commit is dropped");
        assert!(!report.ready());

        let ready = Report::from_tags([
            (TAG_STAGE, "ready"),
            (TAG_RESULT, "ok"),
            (TAG_COMMIT, &"A".repeat(40)),
            (TAG_IDLE_SINCE, ""),
        ]);
        assert!(ready.ready());
        assert_eq!(ready.commit.as_deref(), Some("a".repeat(40).as_str()));
        assert_eq!(ready.idle_since, None);

        for stage in ["Ready", "ready ", "done", ""] {
            let r = Report::from_tags([(TAG_STAGE, stage), (TAG_RESULT, "failed")]);
            assert_eq!(r.stage, None, "{stage:?}");
            assert!(!r.failed, "a result without a known stage");
        }
        for at in ["-1", "1e9", "9999999999999", " 1"] {
            assert_eq!(Report::from_tags([(TAG_AT, at)]).at, None, "{at:?}");
        }
    }

    #[test]
    fn scrubbed_text_keeps_no_credential() {
        let cases = [
            (
                "fatal: could not read from https://alice:glpat-abc123@gitlab.com/acme/api.git",
                "fatal: could not read from https://[redacted]@gitlab.com/acme/api.git",
            ),
            ("token ghp_0123456789abcdef", "token [redacted]"),
            (
                "Authorization: Basic eC1hY2Nlc3MtdG9rZW46Z2hw",
                "Authorization: [redacted] [redacted]",
            ),
            (
                "header x9Kf2LmQ8vT4pZ7wR1sY6uN3 sent",
                "header [redacted] sent",
            ),
            ("bell\u{7}é\nnext", "bell?? next"),
            ("key glpat-xyz.", "key [redacted]."),
        ];
        for (input, want) in cases {
            assert_eq!(scrub(input, 200), want, "{input:?}");
        }
        // What is not a secret stays readable.
        let kept = "secret aws-runner/8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a69/environments/6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f commit 0123456789abcdef0123456789abcdef01234567 of env 6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f on ip-10-0-1-23.eu-west-1.compute.internal";
        assert_eq!(scrub(kept, 400), kept);
        let long = "x".repeat(500);
        assert_eq!(scrub(&long, 50).len(), 50);
        assert!(scrub(&long, 50).ends_with("..."));
    }
}
