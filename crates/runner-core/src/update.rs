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
