//! Context URLs: what a repository, branch, commit, pull/merge request or
//! issue URL of each provider names, and the clone URL it implies.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use url::Url;

use super::host::{UrlError, host_port, parse_https};
use super::kinds::ScmKind;
use crate::validate::FieldError;

/// A GitLab namespace is a group and at most 20 subgroups (GitLab refuses
/// deeper nesting), so a project path has at most 21 owner segments.
const MAX_GITLAB_NAMESPACE_DEPTH: usize = 21;

/// What a clone URL escapes in a name: all but RFC 3986 unreserved
/// characters.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a context URL was refused. `shown` is the URL's host and path only:
/// the query, like userinfo, may carry a token and is never echoed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextUrlError {
    /// Not an https URL with a host and without credentials.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A path segment is not UTF-8 once percent-decoded.
    #[error("{shown:?} is not valid UTF-8 once percent-decoded")]
    NotUtf8 {
        /// Host and path.
        shown: String,
    },
    /// Too few path segments to name a repository.
    #[error("{shown:?} does not name a repository (expected {expected})")]
    NoRepository {
        /// Host and path.
        shown: String,
        /// The provider's repository URL form on this host.
        expected: String,
    },
    /// A repository followed by a path the parser does not know.
    #[error("unknown {} URL form {path:?}", kind.name())]
    UnknownForm {
        /// The provider.
        kind: ScmKind,
        /// The URL's path.
        path: String,
    },
    /// A Bitbucket URL on another host than bitbucket.org.
    #[error("Bitbucket Server and Data Center are not supported; only bitbucket.org")]
    BitbucketServer,
    /// An Azure DevOps work item URL.
    #[error("Azure DevOps work items do not name a repository; use the repository URL")]
    AzureWorkItem,
    /// An Azure DevOps `version` that is neither `GB…` nor `GC…`.
    #[error("Azure DevOps version {version:?} names neither a branch (GB…) nor a commit (GC…)")]
    AzureVersion {
        /// The `version` query parameter.
        version: String,
    },
    /// A commit id that is not 40 or 64 hex characters.
    #[error("{value:?} is not a full commit id (40 or 64 hex characters)")]
    NotACommit {
        /// The path segment.
        value: String,
    },
    /// A pull request, merge request or issue number that is not a
    /// positive decimal number.
    #[error("{value:?} is not a valid {what} number")]
    NotANumber {
        /// The path segment.
        value: String,
        /// "pull request", "merge request" or "issue".
        what: &'static str,
    },
    /// A GitLab project nested deeper than GitLab allows.
    #[error(
        "{shown:?} nests {depth} groups; GitLab allows a group and at most {} subgroups",
        MAX_GITLAB_NAMESPACE_DEPTH - 1
    )]
    TooDeep {
        /// Host and path.
        shown: String,
        /// How many owner segments it has.
        depth: usize,
    },
    /// A branch a spec could not hold (the spec's branch rule).
    #[error("{shown:?} names a branch git cannot check out: {problem}")]
    Branch {
        /// Host and path.
        shown: String,
        /// What the branch rule says.
        problem: FieldError,
    },
    /// An owner or repository segment holding an encoded slash.
    #[error("{shown:?} has an encoded slash in {part:?}, which cannot be part of a name")]
    EncodedSlash {
        /// Host and path.
        shown: String,
        /// The decoded segment.
        part: String,
    },
}

/// What a context URL points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The repository (its default branch).
    Repository,
    /// A branch.
    Branch(String),
    /// A full commit id.
    Commit(String),
    /// A pull/merge request by number; its source branch needs the API.
    PullRequest(u64),
    /// An issue: the repository's default branch.
    Issue(u64),
}

/// A parsed context URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextUrl {
    /// The provider.
    pub kind: ScmKind,
    /// Host name with port when not 443, lowercase.
    pub host: String,
    /// Owner: user, organization, group path, or `organization/project`.
    pub owner: String,
    /// Repository name.
    pub repository: String,
    /// https clone URL.
    pub clone_url: String,
    /// What the URL points at.
    pub target: Target,
}

/// Parses a repository, branch, commit, pull/merge request or issue URL of
/// a `kind` host. The error names what is wrong with the URL.
///
/// Owner, repository and branch are percent-decoded; `clone_url` re-encodes
/// every path segment, escaping all but RFC 3986 unreserved characters.
pub fn parse_context_url(url: &str, kind: ScmKind) -> Result<ContextUrl, ContextUrlError> {
    let parsed = parse_https(url)?;
    let host = host_port(&parsed)?;
    // Echo only host and path: the query may carry a token too.
    let shown = format!("https://{host}{}", parsed.path());
    let decoded = parsed
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|segment| !segment.is_empty())
        .map(percent_decode)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ContextUrlError::NotUtf8 {
            shown: shown.clone(),
        })?;
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let path = ContextPath {
        segments: &segments,
        url: &parsed,
        host: &host,
        shown: &shown,
    };
    let Parts {
        owner,
        repository,
        target,
    } = match kind {
        ScmKind::GitHub => path.github(),
        ScmKind::GitLab => path.gitlab(),
        ScmKind::Bitbucket => path.bitbucket(),
        ScmKind::AzureDevOps => path.azure_devops(),
    }?;
    let repository = repository.strip_suffix(".git").unwrap_or(repository);
    if repository.is_empty() {
        return Err(path.no_repository(kind));
    }
    if kind == ScmKind::GitLab && owner.len() > MAX_GITLAB_NAMESPACE_DEPTH {
        return Err(ContextUrlError::TooDeep {
            shown: shown.clone(),
            depth: owner.len(),
        });
    }
    if let Target::Branch(branch) = &target {
        // What a URL names must be checkable out: the control plane puts it
        // in a spec, whose branch rule is the same.
        crate::validate::branch("branch", branch).map_err(|problem| ContextUrlError::Branch {
            shown: shown.clone(),
            problem,
        })?;
    }
    if let Some(part) = owner.iter().chain([&repository]).find(|p| p.contains('/')) {
        return Err(ContextUrlError::EncodedSlash {
            shown: shown.clone(),
            part: (*part).to_owned(),
        });
    }
    let encoded_owner = owner
        .iter()
        .map(|segment| percent_encode(segment))
        .collect::<Vec<_>>()
        .join("/");
    let encoded_repository = percent_encode(repository);
    let clone_url = match kind {
        ScmKind::AzureDevOps => format!("https://{host}/{encoded_owner}/_git/{encoded_repository}"),
        ScmKind::GitHub | ScmKind::GitLab | ScmKind::Bitbucket => {
            format!("https://{host}/{encoded_owner}/{encoded_repository}.git")
        }
    };
    Ok(ContextUrl {
        kind,
        owner: owner.join("/"),
        repository: repository.to_owned(),
        host,
        clone_url,
        target,
    })
}

/// Decodes `%XX` escapes (others are kept as is); `None` when the result is
/// not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

/// Escapes everything but RFC 3986 unreserved characters.
fn percent_encode(segment: &str) -> String {
    utf8_percent_encode(segment, NOT_UNRESERVED).to_string()
}

fn expected_form(kind: ScmKind, host: &str) -> String {
    match kind {
        ScmKind::GitHub => format!("https://{host}/OWNER/REPO"),
        ScmKind::GitLab => format!("https://{host}/GROUP/PROJECT"),
        ScmKind::Bitbucket => format!("https://{host}/WORKSPACE/REPO"),
        ScmKind::AzureDevOps if host == "dev.azure.com" => {
            format!("https://{host}/ORGANIZATION/PROJECT/_git/REPO")
        }
        ScmKind::AzureDevOps => format!("https://{host}/COLLECTION/PROJECT/_git/REPO"),
    }
}

/// What a context URL path names, decoded; the repository may end in `.git`.
struct Parts<'a> {
    owner: Vec<&'a str>,
    repository: &'a str,
    target: Target,
}

/// A context URL's decoded, non-empty path segments.
struct ContextPath<'a> {
    segments: &'a [&'a str],
    url: &'a Url,
    host: &'a str,
    /// Host and path, for errors.
    shown: &'a str,
}

impl<'a> ContextPath<'a> {
    fn no_repository(&self, kind: ScmKind) -> ContextUrlError {
        ContextUrlError::NoRepository {
            shown: self.shown.to_owned(),
            expected: expected_form(kind, self.host),
        }
    }

    fn unknown_form(&self, kind: ScmKind) -> ContextUrlError {
        ContextUrlError::UnknownForm {
            kind,
            path: self.url.path().to_owned(),
        }
    }

    /// `/OWNER/REPO[/tree/BRANCH…|/commit/SHA|/pull/N…|/issues/N…]`.
    fn github(&self) -> Result<Parts<'a>, ContextUrlError> {
        let [owner, repository, rest @ ..] = self.segments else {
            return Err(self.no_repository(ScmKind::GitHub));
        };
        let target = match rest {
            [] => Target::Repository,
            ["tree", branch @ ..] if !branch.is_empty() => Target::Branch(branch.join("/")),
            ["commit", sha] => commit(sha)?,
            ["pull", n, ..] => Target::PullRequest(number(n, "pull request")?),
            ["issues", n, ..] => Target::Issue(number(n, "issue")?),
            _ => return Err(self.unknown_form(ScmKind::GitHub)),
        };
        Ok(Parts {
            owner: vec![owner],
            repository,
            target,
        })
    }

    /// `/GROUP…/PROJECT[/-/tree/BRANCH…|/-/commit/SHA|/-/merge_requests/N…|/-/issues/N…]`.
    fn gitlab(&self) -> Result<Parts<'a>, ContextUrlError> {
        let (project, rest) = match self.segments.iter().position(|s| *s == "-") {
            Some(dash) => (&self.segments[..dash], Some(&self.segments[dash + 1..])),
            None => (self.segments, None),
        };
        let Some((repository, owner)) = project.split_last().filter(|(_, owner)| !owner.is_empty())
        else {
            return Err(self.no_repository(ScmKind::GitLab));
        };
        let target = match rest.unwrap_or_default() {
            [] if rest.is_none() => Target::Repository,
            ["tree", branch @ ..] if !branch.is_empty() => Target::Branch(branch.join("/")),
            ["commit", sha] => commit(sha)?,
            ["merge_requests", n, ..] => Target::PullRequest(number(n, "merge request")?),
            ["issues" | "work_items", n, ..] => Target::Issue(number(n, "issue")?),
            _ => return Err(self.unknown_form(ScmKind::GitLab)),
        };
        Ok(Parts {
            owner: owner.to_vec(),
            repository,
            target,
        })
    }

    /// `/WORKSPACE/REPO[/src/REV/…|/branch/BRANCH…|/commits/SHA|/pull-requests/N…|/issues/N…]`.
    fn bitbucket(&self) -> Result<Parts<'a>, ContextUrlError> {
        if self.host != "bitbucket.org" {
            return Err(ContextUrlError::BitbucketServer);
        }
        let [workspace, repository, rest @ ..] = self.segments else {
            return Err(self.no_repository(ScmKind::Bitbucket));
        };
        let target = match rest {
            [] | ["src"] => Target::Repository,
            // The rest of a src URL is a file path, so the revision is one segment.
            ["src", revision, ..] if is_full_commit(revision) => {
                Target::Commit(revision.to_ascii_lowercase())
            }
            ["src", branch, ..] => Target::Branch((*branch).to_owned()),
            ["branch", branch @ ..] if !branch.is_empty() => Target::Branch(branch.join("/")),
            ["commits", sha] => commit(sha)?,
            ["pull-requests", n, ..] => Target::PullRequest(number(n, "pull request")?),
            ["issues", n, ..] => Target::Issue(number(n, "issue")?),
            _ => return Err(self.unknown_form(ScmKind::Bitbucket)),
        };
        Ok(Parts {
            owner: vec![workspace],
            repository,
            target,
        })
    }

    /// `/ORG/PROJECT/_git/REPO[?version=GB…|GC…|/commit/SHA|/pullrequest/N…]`;
    /// Server hosts may put a virtual directory before the collection.
    fn azure_devops(&self) -> Result<Parts<'a>, ContextUrlError> {
        if self.segments.contains(&"_workitems") {
            return Err(ContextUrlError::AzureWorkItem);
        }
        let Some(git) = self.segments.iter().position(|s| *s == "_git") else {
            return Err(self.no_repository(ScmKind::AzureDevOps));
        };
        let owner = &self.segments[..git];
        let owner_ok = if self.host == "dev.azure.com" {
            owner.len() == 2
        } else {
            owner.len() >= 2
        };
        let (true, [repository, rest @ ..]) = (owner_ok, &self.segments[git + 1..]) else {
            return Err(self.no_repository(ScmKind::AzureDevOps));
        };
        let target = match rest {
            [] => self.azure_version()?,
            ["commit", sha] => commit(sha)?,
            ["pullrequest", n, ..] => Target::PullRequest(number(n, "pull request")?),
            _ => return Err(self.unknown_form(ScmKind::AzureDevOps)),
        };
        Ok(Parts {
            owner: owner.to_vec(),
            repository,
            target,
        })
    }

    /// The target the `version` query parameter names (none: the repository).
    fn azure_version(&self) -> Result<Target, ContextUrlError> {
        let Some((_, version)) = self.url.query_pairs().find(|(key, _)| key == "version") else {
            return Ok(Target::Repository);
        };
        if let Some(branch) = version.strip_prefix("GB").filter(|b| !b.is_empty()) {
            Ok(Target::Branch(branch.to_owned()))
        } else if let Some(sha) = version.strip_prefix("GC") {
            commit(sha)
        } else {
            Err(ContextUrlError::AzureVersion {
                version: version.into_owned(),
            })
        }
    }
}

fn is_full_commit(value: &str) -> bool {
    matches!(value.len(), 40 | 64) && value.bytes().all(|b| b.is_ascii_hexdigit())
}

fn commit(value: &str) -> Result<Target, ContextUrlError> {
    if is_full_commit(value) {
        Ok(Target::Commit(value.to_ascii_lowercase()))
    } else {
        Err(ContextUrlError::NotACommit {
            value: value.to_owned(),
        })
    }
}

/// A positive decimal number; `what` names it in the error.
fn number(value: &str, what: &'static str) -> Result<u64, ContextUrlError> {
    value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse::<u64>().ok())
        .flatten()
        .filter(|n| *n > 0)
        .ok_or_else(|| ContextUrlError::NotANumber {
            value: value.to_owned(),
            what,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scm::kinds::PROVIDERS;

    const SHA1: &str = "0123456789abcdef0123456789abcdef01234567";
    const SHA256: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(url: &str, kind: ScmKind) -> ContextUrl {
        parse_context_url(url, kind).unwrap_or_else(|err| panic!("{url}: {err}"))
    }

    fn target(url: &str, kind: ScmKind) -> Target {
        parse(url, kind).target
    }

    fn parse_err(url: &str, kind: ScmKind) -> String {
        match parse_context_url(url, kind) {
            Ok(parsed) => panic!("{url} parsed as {parsed:?}"),
            Err(err) => err.to_string(),
        }
    }

    // parse_context_url: GitHub

    #[test]
    fn github_repository() {
        let parsed = parse("https://github.com/acme/api", ScmKind::GitHub);
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::GitHub,
                host: "github.com".to_owned(),
                owner: "acme".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://github.com/acme/api.git".to_owned(),
                target: Target::Repository,
            }
        );
        for url in [
            "https://github.com/acme/api.git",
            "https://github.com/acme/api/",
            "https://GITHUB.com/acme/api?tab=readme#install",
            "https://github.com:443/acme/api.git/",
        ] {
            assert_eq!(parse(url, ScmKind::GitHub), parsed, "{url}");
        }
    }

    #[test]
    fn github_enterprise_keeps_the_port() {
        let parsed = parse("https://ghe.example:8443/Acme/API", ScmKind::GitHub);
        assert_eq!(parsed.host, "ghe.example:8443");
        assert_eq!(parsed.owner, "Acme");
        assert_eq!(parsed.repository, "API");
        assert_eq!(parsed.clone_url, "https://ghe.example:8443/Acme/API.git");
    }

    #[test]
    fn github_branch_keeps_slashes_and_decodes() {
        assert_eq!(
            target("https://github.com/acme/api/tree/main", ScmKind::GitHub),
            Target::Branch("main".to_owned())
        );
        assert_eq!(
            target(
                "https://github.com/acme/api/tree/feature/login/v2/",
                ScmKind::GitHub
            ),
            Target::Branch("feature/login/v2".to_owned())
        );
        assert_eq!(
            target(
                "https://github.com/acme/api/tree/fix%2Fcaf%C3%A9?x=1",
                ScmKind::GitHub
            ),
            Target::Branch("fix/café".to_owned())
        );
    }

    #[test]
    fn branches_git_cannot_check_out_are_refused() {
        // Bad input: a URL names what a spec will hold, so the spec's
        // branch rule applies (a space, "..", a control character, length).
        for (url, problem) in [
            (
                "https://github.com/acme/api/tree/fix%20x".to_owned(),
                r#"branch: "fix x" is not a valid git branch name"#.to_owned(),
            ),
            (
                "https://github.com/acme/api/tree/a..b".to_owned(),
                r#"branch: "a..b" is not a valid git branch name"#.to_owned(),
            ),
            (
                "https://dev.azure.com/acme/proj/_git/api?version=GBma%07in".to_owned(),
                "branch: must not contain control characters".to_owned(),
            ),
            (
                format!(
                    "https://github.com/acme/api/tree/{}",
                    "b/".repeat(1000).trim_end_matches('/')
                ),
                "branch: is 1999 bytes long, the limit is 255".to_owned(),
            ),
            (
                "https://bitbucket.org/acme/api/branch/-x".to_owned(),
                r#"branch: "-x" is not a valid git branch name"#.to_owned(),
            ),
        ] {
            let kind = if url.contains("azure") {
                ScmKind::AzureDevOps
            } else if url.contains("bitbucket") {
                ScmKind::Bitbucket
            } else {
                ScmKind::GitHub
            };
            let err = parse_err(&url, kind);
            assert!(
                err.contains("names a branch git cannot check out") && err.ends_with(&problem),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn gitlab_namespaces_nest_at_most_twenty_subgroups() {
        let deepest = format!("https://gitlab.com/{}api", "g/".repeat(21));
        assert_eq!(
            parse(&deepest, ScmKind::GitLab).owner.split('/').count(),
            21
        );
        let deeper = format!("https://gitlab.com/{}api/-/tree/main", "g/".repeat(1000));
        let err = parse_err(&deeper, ScmKind::GitLab);
        assert!(
            err.ends_with("nests 1000 groups; GitLab allows a group and at most 20 subgroups"),
            "{err}"
        );
    }

    #[test]
    fn github_commit_pull_and_issue() {
        let upper = SHA1.to_ascii_uppercase();
        assert_eq!(
            target(
                &format!("https://github.com/acme/api/commit/{upper}#diff-1"),
                ScmKind::GitHub
            ),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(
                &format!("https://github.com/acme/api/commit/{SHA256}"),
                ScmKind::GitHub
            ),
            Target::Commit(SHA256.to_owned())
        );
        assert_eq!(
            target("https://github.com/acme/api/pull/42", ScmKind::GitHub),
            Target::PullRequest(42)
        );
        assert_eq!(
            target(
                "https://github.com/acme/api/pull/42/files?w=1",
                ScmKind::GitHub
            ),
            Target::PullRequest(42)
        );
        assert_eq!(
            target("https://github.com/acme/api/issues/7/", ScmKind::GitHub),
            Target::Issue(7)
        );
    }

    #[test]
    fn github_errors() {
        assert_eq!(
            parse_err("https://github.com/acme", ScmKind::GitHub),
            r#""https://github.com/acme" does not name a repository (expected https://github.com/OWNER/REPO)"#
        );
        assert!(
            parse_err("https://github.com/", ScmKind::GitHub)
                .contains("does not name a repository")
        );
        assert_eq!(
            parse_err("https://github.com/acme/api/wiki", ScmKind::GitHub),
            r#"unknown GitHub URL form "/acme/api/wiki""#
        );
        assert!(
            parse_err("https://github.com/acme/api/tree", ScmKind::GitHub)
                .starts_with("unknown GitHub URL form")
        );
        assert_eq!(
            parse_err("https://github.com/acme/api/commit/abc123", ScmKind::GitHub),
            r#""abc123" is not a full commit id (40 or 64 hex characters)"#
        );
        let not_hex = format!("{}g", &SHA1[..39]);
        assert!(
            parse_err(
                &format!("https://github.com/acme/api/commit/{not_hex}"),
                ScmKind::GitHub
            )
            .contains("is not a full commit id")
        );
        assert_eq!(
            parse_err("https://github.com/acme/api/pull/abc", ScmKind::GitHub),
            r#""abc" is not a valid pull request number"#
        );
        for n in ["0", "-1", "+5", "1.5", "99999999999999999999"] {
            let err = parse_err(
                &format!("https://github.com/acme/api/pull/{n}"),
                ScmKind::GitHub,
            );
            assert!(
                err.contains("is not a valid pull request number"),
                "{n}: {err}"
            );
        }
        assert_eq!(
            parse_err("https://github.com/acme/api/issues/x", ScmKind::GitHub),
            r#""x" is not a valid issue number"#
        );
        assert!(
            parse_err("https://github.com/acme/.git", ScmKind::GitHub)
                .contains("does not name a repository")
        );
    }

    // parse_context_url: GitLab

    #[test]
    fn gitlab_repository_with_nested_groups() {
        let parsed = parse(
            "https://gitlab.com/acme/platform/infra/api.git/",
            ScmKind::GitLab,
        );
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::GitLab,
                host: "gitlab.com".to_owned(),
                owner: "acme/platform/infra".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://gitlab.com/acme/platform/infra/api.git".to_owned(),
                target: Target::Repository,
            }
        );
        let simple = parse("https://gitlab.example.com/acme/api", ScmKind::GitLab);
        assert_eq!(simple.owner, "acme");
        assert_eq!(simple.clone_url, "https://gitlab.example.com/acme/api.git");
    }

    #[test]
    fn gitlab_forms_after_the_dash_segment() {
        let base = "https://gitlab.com/acme/sub/api/-";
        assert_eq!(
            target(
                &format!("{base}/tree/release/1.x?ref_type=heads"),
                ScmKind::GitLab
            ),
            Target::Branch("release/1.x".to_owned())
        );
        assert_eq!(
            target(&format!("{base}/commit/{SHA1}"), ScmKind::GitLab),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}/merge_requests/12"), ScmKind::GitLab),
            Target::PullRequest(12)
        );
        assert_eq!(
            target(&format!("{base}/merge_requests/12/diffs"), ScmKind::GitLab),
            Target::PullRequest(12)
        );
        assert_eq!(
            target(&format!("{base}/issues/3#note_1"), ScmKind::GitLab),
            Target::Issue(3)
        );
        assert_eq!(
            target(&format!("{base}/work_items/4"), ScmKind::GitLab),
            Target::Issue(4)
        );
        let parsed = parse(&format!("{base}/issues/3"), ScmKind::GitLab);
        assert_eq!(parsed.owner, "acme/sub");
        assert_eq!(parsed.repository, "api");
    }

    #[test]
    fn gitlab_errors() {
        assert_eq!(
            parse_err("https://gitlab.com/acme", ScmKind::GitLab),
            r#""https://gitlab.com/acme" does not name a repository (expected https://gitlab.com/GROUP/PROJECT)"#
        );
        assert!(
            parse_err("https://gitlab.com/acme/-/issues/1", ScmKind::GitLab)
                .contains("does not name a repository")
        );
        assert_eq!(
            parse_err("https://gitlab.com/acme/api/-/wikis/home", ScmKind::GitLab),
            r#"unknown GitLab URL form "/acme/api/-/wikis/home""#
        );
        assert!(
            parse_err("https://gitlab.com/acme/api/-/", ScmKind::GitLab)
                .starts_with("unknown GitLab URL form")
        );
        assert!(
            parse_err("https://gitlab.com/acme/api/-/commit/main", ScmKind::GitLab)
                .contains("is not a full commit id")
        );
        assert!(
            parse_err(
                "https://gitlab.com/acme/api/-/merge_requests/new",
                ScmKind::GitLab
            )
            .contains(r#""new" is not a valid merge request number"#)
        );
    }

    // parse_context_url: Bitbucket

    #[test]
    fn bitbucket_forms() {
        let parsed = parse("https://bitbucket.org/acme/api/", ScmKind::Bitbucket);
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::Bitbucket,
                host: "bitbucket.org".to_owned(),
                owner: "acme".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://bitbucket.org/acme/api.git".to_owned(),
                target: Target::Repository,
            }
        );
        let base = "https://bitbucket.org/acme/api";
        assert_eq!(
            target(&format!("{base}/src"), ScmKind::Bitbucket),
            Target::Repository
        );
        assert_eq!(
            target(
                &format!("{base}/src/develop/docs/README.md?at=x"),
                ScmKind::Bitbucket
            ),
            Target::Branch("develop".to_owned())
        );
        assert_eq!(
            target(&format!("{base}/src/feature%2Flogin/"), ScmKind::Bitbucket),
            Target::Branch("feature/login".to_owned())
        );
        assert_eq!(
            target(
                &format!("{base}/src/{}/lib", SHA1.to_ascii_uppercase()),
                ScmKind::Bitbucket
            ),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}/branch/feature/login"), ScmKind::Bitbucket),
            Target::Branch("feature/login".to_owned())
        );
        assert_eq!(
            target(&format!("{base}/commits/{SHA1}"), ScmKind::Bitbucket),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}/pull-requests/5/diff"), ScmKind::Bitbucket),
            Target::PullRequest(5)
        );
        assert_eq!(
            target(
                &format!("{base}/issues/9/crash-on-start"),
                ScmKind::Bitbucket
            ),
            Target::Issue(9)
        );
    }

    #[test]
    fn bitbucket_errors() {
        assert_eq!(
            parse_err("https://bitbucket.example.com/acme/api", ScmKind::Bitbucket),
            "Bitbucket Server and Data Center are not supported; only bitbucket.org"
        );
        assert_eq!(
            parse_err("https://bitbucket.org/acme", ScmKind::Bitbucket),
            r#""https://bitbucket.org/acme" does not name a repository (expected https://bitbucket.org/WORKSPACE/REPO)"#
        );
        assert!(
            parse_err(
                "https://bitbucket.org/acme/api/commits/xyz",
                ScmKind::Bitbucket
            )
            .contains(r#""xyz" is not a full commit id"#)
        );
        assert!(
            parse_err(
                "https://bitbucket.org/acme/api/pull-requests/x",
                ScmKind::Bitbucket
            )
            .contains("is not a valid pull request number")
        );
        assert_eq!(
            parse_err("https://bitbucket.org/acme/api/wiki", ScmKind::Bitbucket),
            r#"unknown Bitbucket URL form "/acme/api/wiki""#
        );
    }

    // parse_context_url: Azure DevOps

    #[test]
    fn azure_devops_repository_keeps_percent_encoding_in_the_clone_url() {
        let parsed = parse(
            "https://dev.azure.com/acme/My%20Project/_git/api",
            ScmKind::AzureDevOps,
        );
        assert_eq!(
            parsed,
            ContextUrl {
                kind: ScmKind::AzureDevOps,
                host: "dev.azure.com".to_owned(),
                owner: "acme/My Project".to_owned(),
                repository: "api".to_owned(),
                clone_url: "https://dev.azure.com/acme/My%20Project/_git/api".to_owned(),
                target: Target::Repository,
            }
        );
        // Unescaped input is escaped the same way.
        assert_eq!(
            parse(
                "https://dev.azure.com/acme/My Project/_git/api/",
                ScmKind::AzureDevOps
            ),
            parsed
        );
    }

    #[test]
    fn azure_devops_version_query() {
        let base = "https://dev.azure.com/acme/proj/_git/api";
        assert_eq!(
            target(
                &format!("{base}?path=/src&version=GBfeature/x&_a=contents"),
                ScmKind::AzureDevOps
            ),
            Target::Branch("feature/x".to_owned())
        );
        assert_eq!(
            target(
                &format!("{base}?version=GBfeature%2Fy"),
                ScmKind::AzureDevOps
            ),
            Target::Branch("feature/y".to_owned())
        );
        assert_eq!(
            target(&format!("{base}?version=GC{SHA1}"), ScmKind::AzureDevOps),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(&format!("{base}?path=/README.md"), ScmKind::AzureDevOps),
            Target::Repository
        );
        let err = parse_err(&format!("{base}?version=GTv1.0"), ScmKind::AzureDevOps);
        assert!(err.contains(r#""GTv1.0""#), "{err}");
        assert!(
            parse_err(&format!("{base}?version=GB"), ScmKind::AzureDevOps)
                .contains("names neither a branch")
        );
        assert!(
            parse_err(&format!("{base}?version=GCabc"), ScmKind::AzureDevOps)
                .contains("is not a full commit id")
        );
    }

    #[test]
    fn azure_devops_commit_and_pull_request() {
        let base = "https://dev.azure.com/acme/proj/_git/api";
        assert_eq!(
            target(
                &format!("{base}/commit/{SHA1}?refName=refs/heads/main"),
                ScmKind::AzureDevOps
            ),
            Target::Commit(SHA1.to_owned())
        );
        assert_eq!(
            target(
                &format!("{base}/pullrequest/31?_a=files"),
                ScmKind::AzureDevOps
            ),
            Target::PullRequest(31)
        );
        let parsed = parse(&format!("{base}/pullrequest/31"), ScmKind::AzureDevOps);
        assert_eq!(parsed.owner, "acme/proj");
        assert_eq!(parsed.repository, "api");
        assert_eq!(parsed.clone_url, base);
    }

    #[test]
    fn azure_devops_server_uses_a_collection() {
        let parsed = parse(
            "https://tfs.example.com:8080/DefaultCollection/proj/_git/api",
            ScmKind::AzureDevOps,
        );
        assert_eq!(parsed.host, "tfs.example.com:8080");
        assert_eq!(parsed.owner, "DefaultCollection/proj");
        assert_eq!(
            parsed.clone_url,
            "https://tfs.example.com:8080/DefaultCollection/proj/_git/api"
        );
        // A virtual directory before the collection is kept.
        let parsed = parse(
            "https://tfs.example.com/tfs/DefaultCollection/proj/_git/api",
            ScmKind::AzureDevOps,
        );
        assert_eq!(parsed.owner, "tfs/DefaultCollection/proj");
        assert_eq!(
            parsed.clone_url,
            "https://tfs.example.com/tfs/DefaultCollection/proj/_git/api"
        );
    }

    #[test]
    fn azure_devops_errors() {
        assert_eq!(
            parse_err(
                "https://dev.azure.com/acme/proj/_workitems/edit/12",
                ScmKind::AzureDevOps
            ),
            "Azure DevOps work items do not name a repository; use the repository URL"
        );
        assert_eq!(
            parse_err("https://dev.azure.com/acme/proj", ScmKind::AzureDevOps),
            r#""https://dev.azure.com/acme/proj" does not name a repository (expected https://dev.azure.com/ORGANIZATION/PROJECT/_git/REPO)"#
        );
        for url in [
            "https://dev.azure.com/acme/_git/api",
            "https://dev.azure.com/a/b/c/_git/api",
            "https://dev.azure.com/acme/proj/_git/",
        ] {
            assert!(
                parse_err(url, ScmKind::AzureDevOps).contains("does not name a repository"),
                "{url}"
            );
        }
        assert!(
            parse_err(
                "https://tfs.example.com/proj/_git/api",
                ScmKind::AzureDevOps
            )
            .contains("expected https://tfs.example.com/COLLECTION/PROJECT/_git/REPO")
        );
        assert_eq!(
            parse_err(
                "https://dev.azure.com/acme/proj/_git/api/branches",
                ScmKind::AzureDevOps
            ),
            r#"unknown Azure DevOps URL form "/acme/proj/_git/api/branches""#
        );
        assert!(
            parse_err(
                "https://dev.azure.com/acme/proj/_git/api/pullrequest/zero",
                ScmKind::AzureDevOps
            )
            .contains("is not a valid pull request number")
        );
    }

    // parse_context_url: shared rules

    #[test]
    fn context_urls_must_be_https_without_credentials() {
        for kind in PROVIDERS {
            let err = parse_err("http://github.com/acme/api", kind);
            assert_eq!(err, r#"scheme "http" is not supported, use https"#);
            for url in [
                "https://x-access-token:ghp_Secret@github.com/acme/api",
                "https://ghp_Secret@github.com/acme/api",
                "https://acme:ghp_Secret@dev.azure.com/acme/proj/_git/api",
            ] {
                let err = parse_err(url, kind);
                assert!(err.contains("must not contain credentials"), "{err}");
                assert!(!err.contains("ghp_Secret"), "{err}");
                assert!(!err.contains("x-access-token"), "{err}");
            }
        }
    }

    #[test]
    fn errors_do_not_echo_the_query() {
        let err = parse_err(
            "https://gitlab.com/acme?private_token=glpat-secret",
            ScmKind::GitLab,
        );
        assert!(err.contains("does not name a repository"), "{err}");
        assert!(!err.contains("glpat-secret"), "{err}");
    }

    #[test]
    fn names_are_decoded_and_reencoded_consistently() {
        let parsed = parse("https://github.com/ac%6De/a%2Bb~c", ScmKind::GitHub);
        assert_eq!(parsed.owner, "acme");
        assert_eq!(parsed.repository, "a+b~c");
        assert_eq!(parsed.clone_url, "https://github.com/acme/a%2Bb~c.git");
        let parsed = parse("https://gitlab.com/gr%C3%BCn/%C3%A4pi", ScmKind::GitLab);
        assert_eq!(parsed.owner, "grün");
        assert_eq!(parsed.repository, "äpi");
        assert_eq!(
            parsed.clone_url,
            "https://gitlab.com/gr%C3%BCn/%C3%A4pi.git"
        );
    }

    #[test]
    fn encoded_slashes_and_bad_utf8_in_names_are_rejected() {
        let err = parse_err("https://github.com/acme%2Fevil/api", ScmKind::GitHub);
        assert!(err.contains("encoded slash"), "{err}");
        let err = parse_err("https://github.com/acme/%FF", ScmKind::GitHub);
        assert!(err.contains("not valid UTF-8"), "{err}");
    }

    #[test]
    fn percent_decode_keeps_malformed_escapes() {
        assert_eq!(percent_decode("a%2"), Some("a%2".to_owned()));
        assert_eq!(percent_decode("a%zz%41"), Some("a%zzA".to_owned()));
        assert_eq!(percent_decode("%e2%82%ac"), Some("€".to_owned()));
        assert_eq!(percent_decode("%C3"), None);
    }

    #[test]
    fn percent_encode_escapes_all_but_unreserved_characters() {
        assert_eq!(
            percent_encode("aZ09-._~ /+%@:é"),
            "aZ09-._~%20%2F%2B%25%40%3A%C3%A9"
        );
    }
}
