//! Self-update policy: when the leader moves its own ECS service to a newer
//! release, and how an attempt ends. Pure: no AWS, no gRPC; the time of day
//! comes in as a value, versions as any ordered type (the daemon uses semver).
//!
//! The rules, in order:
//! - nothing happens unless the offered version is newer than the running one
//!   and auto-update is on, both in the control plane and locally;
//! - a version whose deployment was rolled back is not tried again; any other
//!   version offered (normally a newer one) is;
//! - one attempt at a time: a deployment in progress is watched, not repeated;
//! - the offered image must be `<repository>@sha256:<64 lowercase hex>` of the
//!   runner's own repository ([`admit`]): the control plane picks a release,
//!   never where its code comes from;
//! - the offered image must differ from the one the service runs, and no other
//!   deployment of the service may be in progress;
//! - a deployment starts only inside the update window (whole UTC hours).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::traits::BoxError;

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// The shortest update window, in hours.
pub const MIN_WINDOW_HOURS: u8 = 2;

/// The UTC hours in which a deployment may start: from `start` (inclusive) to
/// `end` (exclusive), wrapping past midnight when `end <= start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateWindow {
    start: u8,
    end: u8,
}

/// Why an update window is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Not `HH-HH`.
    #[error("{0:?} is not START-END in UTC hours (like 22-04, or 00-24 for any time)")]
    Format(String),
    /// An hour out of range.
    #[error("{0} is not an hour (start 0 to 23, end 0 to 24)")]
    Hour(u8),
    /// Shorter than [`MIN_WINDOW_HOURS`].
    #[error("{start:02}-{end:02} is {hours} h wide; it must be at least {MIN_WINDOW_HOURS} h")]
    TooShort {
        /// First hour.
        start: u8,
        /// Hour after the last.
        end: u8,
        /// Its width.
        hours: u8,
    },
}

impl UpdateWindow {
    /// Any time of day.
    pub const ANY: Self = Self { start: 0, end: 24 };

    /// The window from `start` to `end` (UTC hours).
    pub fn new(start: u8, end: u8) -> Result<Self, WindowError> {
        if start > 23 {
            return Err(WindowError::Hour(start));
        }
        if end > 24 {
            return Err(WindowError::Hour(end));
        }
        let window = Self { start, end };
        let hours = window.hours();
        if hours < MIN_WINDOW_HOURS {
            return Err(WindowError::TooShort { start, end, hours });
        }
        Ok(window)
    }

    /// Its width in hours (0 when `start == end`).
    pub fn hours(&self) -> u8 {
        if self.end > self.start {
            self.end - self.start
        } else if self.end % 24 == self.start {
            0
        } else {
            24 - self.start + self.end
        }
    }

    fn second_of_day(at: SystemTime) -> u64 {
        at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % DAY
    }

    /// Whether `at` falls inside the window.
    pub fn contains(&self, at: SystemTime) -> bool {
        let hour = Self::second_of_day(at) / HOUR;
        let (start, end) = (u64::from(self.start), u64::from(self.end));
        if start < end {
            (start..end).contains(&hour)
        } else {
            hour >= start || hour < end
        }
    }

    /// How long until the window opens; zero inside it.
    pub fn opens_in(&self, at: SystemTime) -> Duration {
        if self.contains(at) {
            return Duration::ZERO;
        }
        let now = Self::second_of_day(at);
        let start = u64::from(self.start) * HOUR;
        Duration::from_secs((start + DAY - now) % DAY)
    }
}

impl Default for UpdateWindow {
    fn default() -> Self {
        Self::ANY
    }
}

impl FromStr for UpdateWindow {
    type Err = WindowError;

    /// `HH-HH`, optionally with `:00` after each hour.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let format = || WindowError::Format(value.to_owned());
        let hour = |part: &str| -> Result<u8, WindowError> {
            let part = part.trim();
            let part = part.strip_suffix(":00").unwrap_or(part);
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format());
            }
            part.parse().map_err(|_| format())
        };
        let (start, end) = value.split_once('-').ok_or_else(format)?;
        Self::new(hour(start)?, hour(end)?)
    }
}

impl fmt::Display for UpdateWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}-{:02}", self.start, self.end)
    }
}

/// What the control plane offers (`GetLatestVersion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The newest released version.
    pub version: String,
    /// Its container image.
    pub image: String,
    /// Whether the control plane wants this runner to move to it.
    pub auto_update: bool,
}

/// Longest image repository accepted, in bytes (a registry's limit on a name).
pub const MAX_REPOSITORY_LEN: usize = 255;

/// The one container repository self-update deploys from:
/// `[registry[:port]/]path` without tag or digest, like
/// `123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner`. Compared as
/// written, never normalised: `acme/runnerd` and `docker.io/acme/runnerd` are
/// different repositories here, so no spelling reaches another registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRepository(String);

/// Why a repository name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RepositoryError(String);

/// Whether `digest` is `sha256:` and 64 lowercase hex digits.
fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether the first component of a name is a registry host rather than a
/// path component (the rule Docker uses: a dot, a port, or `localhost`).
fn looks_like_host(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost"
}

/// A registry host: DNS labels or an IPv4 address, optionally `:port`.
fn is_registry_host(host: &str) -> bool {
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let label_ok = |label: &str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    port_ok && name.split('.').all(label_ok)
}

/// A path component: lowercase letters and digits, separated by one `.`,
/// one or two `_`, or dashes.
fn is_path_component(component: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        return false;
    }
    bytes
        .split(alnum)
        .filter(|separator| !separator.is_empty())
        .all(|separator| {
            matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|b| *b == b'-')
        })
}

impl ImageRepository {
    /// The name, as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The repository of `image` when it is pinned: `<repository>@sha256:<64
    /// lowercase hex>` with nothing else (no tag).
    pub fn of_pinned(image: &str) -> Option<Self> {
        let (repository, digest) = image.split_once('@')?;
        if !is_sha256_digest(digest) {
            return None;
        }
        repository.parse().ok()
    }

    /// Whether `image` is exactly `<this repository>@sha256:<64 lowercase hex>`.
    pub fn admit(&self, image: &str) -> Result<(), ImageRefusal> {
        if image.is_empty() {
            return Err(ImageRefusal::Empty);
        }
        if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ImageRefusal::Whitespace);
        }
        match image.strip_prefix(self.as_str()) {
            // Nothing after the name means the tag `latest`.
            Some(rest) if rest.is_empty() || rest.starts_with(':') => {
                Err(ImageRefusal::Tag(self.clone()))
            }
            Some(rest) if rest.starts_with('@') => {
                if rest.strip_prefix('@').is_some_and(is_sha256_digest) {
                    Ok(())
                } else {
                    Err(ImageRefusal::Digest)
                }
            }
            _ => Err(ImageRefusal::Foreign(self.clone())),
        }
    }
}

impl FromStr for ImageRepository {
    type Err = RepositoryError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let fail = |problem: &str| Err(RepositoryError(format!("{value:?} {problem}")));
        let example =
            "give [registry/]path, like 123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner";
        if value.is_empty() {
            return Err(RepositoryError("is empty".to_owned()));
        }
        if value.len() > MAX_REPOSITORY_LEN {
            return Err(RepositoryError(format!(
                "is longer than {MAX_REPOSITORY_LEN} bytes"
            )));
        }
        if value.contains("://") {
            return fail(&format!("has a scheme: {example}"));
        }
        if value.contains('@') {
            return fail("holds a digest: give the repository alone, without @sha256:...");
        }
        let path = match value.split_once('/') {
            Some((host, path)) if looks_like_host(host) => {
                if !is_registry_host(host) {
                    return fail(&format!("has an invalid registry host: {example}"));
                }
                path
            }
            _ => value,
        };
        for component in path.split('/') {
            if component.contains(':') {
                return fail("holds a tag: give the repository alone, without :tag");
            }
            if !is_path_component(component) {
                return fail(&format!(
                    "has the path component {component:?}: lowercase letters and digits, separated by ., _, __ or -"
                ));
            }
        }
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Display for ImageRepository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an offered image is not deployed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefusal {
    /// No repository is configured and the service's image is not pinned.
    #[error(
        "the runner does not know its repository: RUNNER_IMAGE_REPOSITORY is not set and the service's image is not pinned by digest"
    )]
    UnknownRepository,
    /// The image is empty.
    #[error("the image is empty")]
    Empty,
    /// Whitespace or control characters.
    #[error("the image contains whitespace or control characters")]
    Whitespace,
    /// A tag of the repository (with or without a digest after it).
    #[error("the image is a tag of {0}, not a digest")]
    Tag(ImageRepository),
    /// The repository with a digest that is not `sha256:` and 64 lowercase hex.
    #[error("the image's digest is not sha256: and 64 lowercase hex digits")]
    Digest,
    /// Another repository or registry.
    #[error("the image is not in the repository {0}")]
    Foreign(ImageRepository),
}

/// Admits `offered` for deployment when it is `<repository>@sha256:<64
/// lowercase hex>` of the runner's repository: `configured`
/// (`RUNNER_IMAGE_REPOSITORY`) when set, else the repository of the image the
/// service runs (`service_image`) when that is itself pinned by digest.
pub fn admit(
    configured: Option<&ImageRepository>,
    service_image: &str,
    offered: &str,
) -> Result<(), ImageRefusal> {
    let derived;
    let repository = match configured {
        Some(repository) => repository,
        None => {
            derived =
                ImageRepository::of_pinned(service_image).ok_or(ImageRefusal::UnknownRepository)?;
            &derived
        }
    };
    repository.admit(offered)
}

/// What to think of an offered version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It is not newer than the running version.
    UpToDate,
    /// It is newer, but auto-update is off (in the control plane or locally).
    Disabled,
    /// Its deployment was rolled back before.
    HeldBack,
    /// Move to it, if the service and the window allow.
    Wanted,
}

/// Judges an offered version against the running one and the last rollback.
pub fn judge<V: Ord>(
    running: &V,
    offered: &V,
    auto_update: bool,
    enabled: bool,
    rolled_back: Option<&V>,
) -> Verdict {
    if offered <= running {
        Verdict::UpToDate
    } else if !auto_update || !enabled {
        Verdict::Disabled
    } else if rolled_back.is_some_and(|failed| offered == failed) {
        Verdict::HeldBack
    } else {
        Verdict::Wanted
    }
}

/// How an ECS deployment is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// Tasks are being replaced.
    InProgress,
    /// Done.
    Completed,
    /// The deployment circuit breaker gave up on it.
    Failed,
}

/// One deployment of the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The task definition it deploys.
    pub task_definition: String,
    /// Its state; `None` when ECS does not say.
    pub rollout: Option<Rollout>,
}

/// The runner's own ECS service, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The cluster (name or ARN).
    pub cluster: String,
    /// The service's name.
    pub name: String,
    /// The task definition the service is set to.
    pub task_definition: String,
    /// The task definition this task was started from.
    pub own_task_definition: String,
    /// This container's name in it.
    pub container: String,
    /// This container's image in the service's task definition.
    pub image: String,
    /// Its deployments, newest first.
    pub deployments: Vec<Deployment>,
}

impl Service {
    /// Whether a deployment is under way (several deployments, or the
    /// service set to another task definition than this task's).
    pub fn busy(&self) -> bool {
        self.deployments.len() > 1 || self.task_definition != self.own_task_definition
    }
}

/// Whether to deploy a wanted release now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The service already runs the offered image.
    SameImage,
    /// Another deployment of the service is under way.
    Busy,
    /// Outside the window; it opens in this long.
    OutsideWindow(Duration),
    /// Deploy now.
    Go,
}

/// Decides whether `image` may be deployed to `service` at `now`.
pub fn gate(service: &Service, image: &str, window: UpdateWindow, now: SystemTime) -> Gate {
    if service.image == image {
        Gate::SameImage
    } else if service.busy() {
        Gate::Busy
    } else if !window.contains(now) {
        Gate::OutsideWindow(window.opens_in(now))
    } else {
        Gate::Go
    }
}

/// Where an attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptState {
    /// The service was (or is about to be) updated; the outcome is not known.
    Deploying,
    /// The new release runs.
    Succeeded,
    /// ECS rolled the deployment back (or it was interrupted): this version is
    /// not tried again until a newer one is offered.
    RolledBack,
    /// The runner could not update the service; tried again at the next check.
    Failed,
}

impl AttemptState {
    /// Its name in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploying => "deploying",
            Self::Succeeded => "succeeded",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        }
    }

    /// Reads a name written by [`Self::as_str`].
    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Deploying,
            Self::Succeeded,
            Self::RolledBack,
            Self::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }
}

/// The record of the last self-update attempt (one per runner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The release deployed.
    pub release: String,
    /// Its image.
    pub image: String,
    /// The release that ran before.
    pub from_release: String,
    /// The task definition revision registered for it.
    pub task_definition: String,
    /// The revision the service ran before.
    pub previous_task_definition: String,
    /// Where it stands.
    pub state: AttemptState,
    /// Why it ended the way it did (empty while deploying or on success).
    pub message: String,
    /// When it started.
    pub started_at: SystemTime,
    /// When it ended.
    pub finished_at: Option<SystemTime>,
    /// The stored item's version (0: not stored yet); writes are conditional on it.
    pub version: u64,
}

/// How a deploying attempt turned out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Still deploying.
    InProgress,
    /// The runner runs the release (or a newer one).
    Succeeded,
    /// The service no longer deploys the attempt's task definition.
    RolledBack(String),
}

/// Settles a deploying attempt from the running version and the service.
/// Call only while `attempt.state` is [`AttemptState::Deploying`].
pub fn settle<V: Ord>(attempt: &Attempt, running: &V, target: &V, service: &Service) -> Settled {
    if running >= target {
        return Settled::Succeeded;
    }
    let failed = service.deployments.iter().any(|d| {
        d.task_definition == attempt.task_definition && d.rollout == Some(Rollout::Failed)
    });
    if failed {
        return Settled::RolledBack(format!(
            "the deployment of {} failed (ECS deployment circuit breaker)",
            attempt.task_definition
        ));
    }
    if service.task_definition != attempt.task_definition {
        return Settled::RolledBack(format!(
            "the service runs {} instead of {} (rolled back by the deployment circuit breaker, or the update was interrupted)",
            service.task_definition, attempt.task_definition
        ));
    }
    Settled::InProgress
}

/// Why a self-update step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The attempt record changed concurrently (another replica wrote it).
    #[error("the update record changed concurrently")]
    Conflict,
    /// This task does not belong to an ECS service (a one-off task, or not on ECS).
    #[error("{0}")]
    NotAService(String),
    /// The request cannot succeed as it is (missing permission, bad input).
    #[error("{0}")]
    Rejected(String),
    /// The control plane did not name the latest release (the cause says
    /// whether it refused or could not be reached).
    #[error("ask the control plane for the latest release")]
    ControlPlane(#[source] BoxError),
    /// The service could not be reached or failed; try again later.
    #[error("{what} failed")]
    Unavailable {
        /// The operation.
        what: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
}

/// Where releases come from (the control plane's `GetLatestVersion`).
#[async_trait]
pub trait Releases: Send + Sync + 'static {
    /// The newest release for a runner running `running`; `None` when nothing
    /// was released.
    async fn latest(&self, running: &str) -> Result<Option<Release>, UpdateError>;
}

/// The runner's own ECS service.
#[async_trait]
pub trait Deployer: Send + Sync + 'static {
    /// Finds and describes the service this task belongs to.
    async fn service(&self) -> Result<Service, UpdateError>;
    /// Registers a revision of the service's task definition that differs
    /// only in this container's image; returns its ARN.
    async fn register(&self, service: &Service, image: &str) -> Result<String, UpdateError>;
    /// Sets the service to `task_definition` (ECS then rolls it out).
    async fn deploy(&self, service: &Service, task_definition: &str) -> Result<(), UpdateError>;
}

/// Where the attempt record lives.
#[async_trait]
pub trait Attempts: Send + Sync + 'static {
    /// The last attempt, if any.
    async fn load(&self) -> Result<Option<Attempt>, UpdateError>;
    /// Writes `attempt` if the stored version equals `attempt.version` (0: must
    /// not exist); returns it with its new version, or [`UpdateError::Conflict`].
    async fn save(&self, attempt: &Attempt) -> Result<Attempt, UpdateError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 January 2025 at `hour`:`minute` UTC.
    fn at(hour: u64, minute: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_735_689_600 + hour * HOUR + minute * 60)
    }

    fn window(text: &str) -> UpdateWindow {
        text.parse().expect("a valid window")
    }

    #[test]
    fn a_window_contains_its_hours_and_not_its_end() {
        let w = window("02-05");
        assert!(!w.contains(at(1, 59)));
        assert!(w.contains(at(2, 0)));
        assert!(w.contains(at(4, 59)));
        assert!(!w.contains(at(5, 0)));
        assert_eq!(w.hours(), 3);
        assert_eq!(w.to_string(), "02-05");
    }

    #[test]
    fn a_window_may_wrap_midnight() {
        let w = window("22-04");
        assert_eq!(w.hours(), 6);
        for hour in [22, 23, 0, 1, 2, 3] {
            assert!(w.contains(at(hour, 30)), "{hour}:30 is inside 22-04");
        }
        for hour in [4, 5, 12, 21] {
            assert!(!w.contains(at(hour, 30)), "{hour}:30 is outside 22-04");
        }
        // Ending at midnight, written either way.
        assert_eq!(window("22-00").hours(), 2);
        assert!(window("22-00").contains(at(23, 59)));
        assert!(!window("22-00").contains(at(0, 0)));
        assert!(window("22-24").contains(at(23, 59)));
    }

    #[test]
    fn any_time_is_00_24() {
        let w = window("00-24");
        assert_eq!(w, UpdateWindow::ANY);
        assert_eq!(w.hours(), 24);
        for hour in 0..24 {
            assert!(w.contains(at(hour, 0)));
        }
    }

    #[test]
    fn a_window_is_at_least_two_hours_wide() {
        assert!(matches!(
            "03-04".parse::<UpdateWindow>(),
            Err(WindowError::TooShort { hours: 1, .. })
        ));
        assert!(matches!(
            "23-00".parse::<UpdateWindow>(),
            Err(WindowError::TooShort { hours: 1, .. })
        ));
        assert!(matches!(
            "05-05".parse::<UpdateWindow>(),
            Err(WindowError::TooShort { hours: 0, .. })
        ));
        assert!(matches!(
            "00-00".parse::<UpdateWindow>(),
            Err(WindowError::TooShort { hours: 0, .. })
        ));
        assert_eq!(window("23-01").hours(), 2);
        assert_eq!(window("03:00-05:00"), window("03-05"));
    }

    #[test]
    fn malformed_windows_are_refused() {
        for bad in [
            "", "22", "22-", "-04", "a-b", "22-04-06", "1000-02", "2.5-04",
        ] {
            assert!(
                matches!(bad.parse::<UpdateWindow>(), Err(WindowError::Format(_))),
                "{bad:?}"
            );
        }
        assert_eq!("24-02".parse::<UpdateWindow>(), Err(WindowError::Hour(24)));
        assert_eq!("02-25".parse::<UpdateWindow>(), Err(WindowError::Hour(25)));
    }

    #[test]
    fn opens_in_counts_to_the_next_start() {
        let w = window("22-04");
        assert_eq!(w.opens_in(at(23, 0)), Duration::ZERO);
        assert_eq!(w.opens_in(at(21, 30)), Duration::from_secs(30 * 60));
        assert_eq!(w.opens_in(at(4, 0)), Duration::from_secs(18 * HOUR));
        let morning = window("02-05");
        assert_eq!(morning.opens_in(at(5, 0)), Duration::from_secs(21 * HOUR));
    }

    type V = (u64, u64, u64);

    #[test]
    fn only_a_newer_version_is_wanted() {
        let running: V = (1, 4, 0);
        assert_eq!(
            judge(&running, &(1, 4, 0), true, true, None),
            Verdict::UpToDate
        );
        assert_eq!(
            judge(&running, &(1, 3, 9), true, true, None),
            Verdict::UpToDate
        );
        assert_eq!(
            judge(&running, &(1, 5, 0), true, true, None),
            Verdict::Wanted
        );
        assert_eq!(
            judge(&running, &(1, 5, 0), false, true, None),
            Verdict::Disabled
        );
        assert_eq!(
            judge(&running, &(1, 5, 0), true, false, None),
            Verdict::Disabled
        );
    }

    #[test]
    fn a_rolled_back_version_waits_for_a_newer_one() {
        let running: V = (1, 4, 0);
        let failed: V = (1, 5, 0);
        assert_eq!(
            judge(&running, &(1, 5, 0), true, true, Some(&failed)),
            Verdict::HeldBack
        );
        assert_eq!(
            judge(&running, &(1, 5, 1), true, true, Some(&failed)),
            Verdict::Wanted
        );
        // An older rollback does not hold anything back.
        assert_eq!(
            judge(&running, &(1, 5, 0), true, true, Some(&(1, 4, 5))),
            Verdict::Wanted
        );
        // Nor does a newer one hold back a version that was never tried.
        assert_eq!(
            judge(&running, &(1, 4, 9), true, true, Some(&failed)),
            Verdict::Wanted
        );
    }

    fn service(td: &str, image: &str) -> Service {
        Service {
            cluster: "c".into(),
            name: "s".into(),
            task_definition: td.into(),
            own_task_definition: td.into(),
            container: "runnerd".into(),
            image: image.into(),
            deployments: vec![Deployment {
                task_definition: td.into(),
                rollout: Some(Rollout::Completed),
            }],
        }
    }

    #[test]
    fn the_gate_opens_for_a_new_image_of_an_idle_service_inside_the_window() {
        let svc = service("td:1", "img:1.4.0");
        let w = window("22-04");
        assert_eq!(gate(&svc, "img:1.5.0", w, at(23, 0)), Gate::Go);
        assert_eq!(
            gate(&svc, "img:1.5.0", w, at(12, 0)),
            Gate::OutsideWindow(Duration::from_secs(10 * HOUR))
        );
        assert_eq!(gate(&svc, "img:1.4.0", w, at(23, 0)), Gate::SameImage);
        let mut rolling = svc.clone();
        rolling.deployments.push(Deployment {
            task_definition: "td:0".into(),
            rollout: Some(Rollout::InProgress),
        });
        assert_eq!(gate(&rolling, "img:1.5.0", w, at(23, 0)), Gate::Busy);
        let mut replaced = svc;
        replaced.task_definition = "td:2".into();
        assert_eq!(gate(&replaced, "img:1.5.0", w, at(23, 0)), Gate::Busy);
    }

    fn deploying() -> Attempt {
        Attempt {
            release: "1.5.0".into(),
            image: "img:1.5.0".into(),
            from_release: "1.4.0".into(),
            task_definition: "td:2".into(),
            previous_task_definition: "td:1".into(),
            state: AttemptState::Deploying,
            message: String::new(),
            started_at: at(23, 0),
            finished_at: None,
            version: 1,
        }
    }

    #[test]
    fn an_attempt_settles_from_the_running_version_and_the_service() {
        let attempt = deploying();
        let (old, new): (V, V) = ((1, 4, 0), (1, 5, 0));
        let mut svc = service("td:2", "img:1.5.0");
        svc.own_task_definition = "td:1".into();
        assert_eq!(settle(&attempt, &old, &new, &svc), Settled::InProgress);
        assert_eq!(settle(&attempt, &new, &new, &svc), Settled::Succeeded);

        // The circuit breaker marked it failed.
        svc.deployments[0].rollout = Some(Rollout::Failed);
        assert!(matches!(
            settle(&attempt, &old, &new, &svc),
            Settled::RolledBack(m) if m.contains("td:2 failed")
        ));

        // The service runs the previous revision again.
        let back = service("td:1", "img:1.4.0");
        assert!(matches!(
            settle(&attempt, &old, &new, &back),
            Settled::RolledBack(m) if m.contains("runs td:1 instead of td:2")
        ));
    }

    const REPO: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner";
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn repo(name: &str) -> ImageRepository {
        name.parse().expect("a valid repository")
    }

    #[test]
    fn only_a_digest_of_the_repository_is_admitted() {
        let ours = repo(REPO);
        assert_eq!(ours.admit(&format!("{REPO}@{DIGEST}")), Ok(()));
        let upper = DIGEST.to_uppercase().replace("SHA256", "sha256");
        let nbsp = format!("{REPO}@{DIGEST}\u{a0}");
        let hostile: &[(String, ImageRefusal)] = &[
            // Another registry or repository.
            (
                format!("evil.example.com/aws-runner@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/other@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("210987654321.dkr.ecr.us-east-1.amazonaws.com/aws-runner@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("public.ecr.aws/aws-runner/runnerd@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            // Look-alikes: a longer name, a sub-path, a path escape, a prefix,
            // a Cyrillic "a", a registry host that merely starts alike.
            (
                format!("{REPO}-evil@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("{REPO}/../x@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("{REPO}/sub@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("{REPO}.evil.com@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("evil.com/{REPO}@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runn\u{430}r@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!(
                    "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.com/aws-runner@{DIGEST}"
                ),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runne".to_owned(),
                ImageRefusal::Foreign(ours.clone()),
            ),
            (
                format!("docker.io/{REPO}@{DIGEST}"),
                ImageRefusal::Foreign(ours.clone()),
            ),
            // A tag, with or without a digest after it.
            (format!("{REPO}:0.2.0"), ImageRefusal::Tag(ours.clone())),
            (format!("{REPO}:latest"), ImageRefusal::Tag(ours.clone())),
            (
                format!("{REPO}:0.2.0@{DIGEST}"),
                ImageRefusal::Tag(ours.clone()),
            ),
            (REPO.to_owned(), ImageRefusal::Tag(ours.clone())),
            // Digests that are not sha256 with 64 lowercase hex digits.
            (format!("{REPO}@{upper}"), ImageRefusal::Digest),
            (format!("{REPO}@{}", &DIGEST[..70]), ImageRefusal::Digest),
            (format!("{REPO}@{DIGEST}0"), ImageRefusal::Digest),
            (
                format!("{REPO}@{}", DIGEST.replace('a', "g")),
                ImageRefusal::Digest,
            ),
            (
                format!("{REPO}@{}", DIGEST.replace("sha256", "sha512")),
                ImageRefusal::Digest,
            ),
            (format!("{REPO}@{}", &DIGEST[7..]), ImageRefusal::Digest),
            (format!("{REPO}@"), ImageRefusal::Digest),
            (format!("{REPO}@@{DIGEST}"), ImageRefusal::Digest),
            (format!("{REPO}@{DIGEST}@{DIGEST}"), ImageRefusal::Digest),
            // Whitespace and control characters anywhere.
            (format!(" {REPO}@{DIGEST}"), ImageRefusal::Whitespace),
            (format!("{REPO}@{DIGEST}\n"), ImageRefusal::Whitespace),
            (format!("{REPO} @{DIGEST}"), ImageRefusal::Whitespace),
            (nbsp, ImageRefusal::Whitespace),
            (format!("{REPO}@{DIGEST}\0"), ImageRefusal::Whitespace),
            (String::new(), ImageRefusal::Empty),
        ];
        for (image, why) in hostile {
            assert_eq!(ours.admit(image).as_ref(), Err(why), "{image:?}");
            assert_eq!(
                admit(Some(&ours), "", image).as_ref(),
                Err(why),
                "{image:?}"
            );
        }
    }

    #[test]
    fn the_flag_wins_and_else_the_service_image_names_the_repository() {
        let pinned = format!("{REPO}@{DIGEST}");
        let other = "registry.example.com:5000/team/runnerd";
        let offered_other = format!("{other}@{DIGEST}");
        // Derived from the service's image when it is pinned by digest.
        assert_eq!(admit(None, &pinned, &pinned), Ok(()));
        assert_eq!(
            admit(None, &pinned, &offered_other),
            Err(ImageRefusal::Foreign(repo(REPO)))
        );
        // The flag wins over the service's image.
        assert_eq!(admit(Some(&repo(other)), &pinned, &offered_other), Ok(()));
        assert_eq!(
            admit(Some(&repo(other)), &pinned, &pinned),
            Err(ImageRefusal::Foreign(repo(other)))
        );
        // No repository known: every image is refused.
        for service_image in [
            format!("{REPO}:0.1.0"),
            format!("{REPO}:0.1.0@{DIGEST}"),
            format!("{REPO}@sha256:abc"),
            "example.com/Aws@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .to_owned(),
            String::new(),
        ] {
            assert_eq!(
                admit(None, &service_image, &pinned),
                Err(ImageRefusal::UnknownRepository),
                "{service_image:?}"
            );
        }
        let message = ImageRefusal::UnknownRepository.to_string();
        assert!(message.contains("RUNNER_IMAGE_REPOSITORY"), "{message}");
    }

    #[test]
    fn repositories_are_registry_and_path_without_tag_or_digest() {
        for good in [
            REPO,
            "public.ecr.aws/aws-runner/runnerd",
            "registry.example.com:5000/team/run_ner__d-x.y",
            "localhost:5000/aws-runner",
            "localhost/aws-runner",
            "10.0.0.1/a",
            "acme/aws-runner",
            "aws-runner",
        ] {
            assert_eq!(repo(good).as_str(), good);
            assert_eq!(
                ImageRepository::of_pinned(&format!("{good}@{DIGEST}")),
                Some(repo(good))
            );
        }
        let cases: &[(&str, &str)] = &[
            ("", "is empty"),
            ("Acme/aws-runner", "path component \"Acme\""),
            ("aws-runner:1.0", "holds a tag"),
            ("https://example.com/aws-runner", "has a scheme"),
            (&format!("{REPO}@{DIGEST}"), "holds a digest"),
            (&format!("{REPO}:0.1.0"), "holds a tag"),
            ("example.com/Aws-Runner", "path component \"Aws-Runner\""),
            ("example.com/a/../b", "path component \"..\""),
            ("example.com/a/", "path component \"\""),
            ("example.com//a", "path component \"\""),
            ("example.com/a___b", "path component"),
            ("example.com/a._b", "path component"),
            ("example.com/-a", "path component"),
            ("example.com/a b", "path component"),
            ("-example.com/a", "registry host"),
            ("example..com/a", "registry host"),
            ("example.com:port/a", "registry host"),
            ("exa_mple.com/a", "registry host"),
        ];
        for (bad, expected) in cases {
            let err = bad
                .parse::<ImageRepository>()
                .expect_err(&format!("{bad:?} must be refused"))
                .to_string();
            assert!(
                err.contains(expected),
                "{bad:?}: {err:?} lacks {expected:?}"
            );
        }
        let long = format!("example.com/{}", "a".repeat(MAX_REPOSITORY_LEN));
        assert!(long.parse::<ImageRepository>().is_err());
        // A tag or a short digest does not pin an image.
        assert_eq!(ImageRepository::of_pinned(&format!("{REPO}:0.1.0")), None);
        assert_eq!(
            ImageRepository::of_pinned(&format!("{REPO}@sha256:abc")),
            None
        );
        assert_eq!(
            ImageRepository::of_pinned(&format!("{REPO}:0.1.0@{DIGEST}")),
            None
        );
    }

    #[test]
    fn attempt_states_round_trip() {
        for state in [
            AttemptState::Deploying,
            AttemptState::Succeeded,
            AttemptState::RolledBack,
            AttemptState::Failed,
        ] {
            assert_eq!(AttemptState::parse(state.as_str()), Some(state));
        }
        assert_eq!(AttemptState::parse("done"), None);
    }
}
