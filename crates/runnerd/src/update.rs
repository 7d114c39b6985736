//! Self-update: the leader asks the control plane for the latest release
//! (every `--update-interval`, with jitter), settles the last attempt, and,
//! when the rules of `runner_core::update` allow, registers a task definition
//! revision with the new image and points its own ECS service at it. Only
//! `<repository>@sha256:<digest>` of the runner's own repository is ever
//! registered (`--image-repository`, else the repository of the service's
//! digest-pinned image); any other image is refused, logged as a warning and
//! reported as `refused`, whatever the control plane says. ECS's
//! deployment circuit breaker rolls a failing image back; the attempt record
//! then holds that version back until a newer one is offered.
//!
//! Order of a deployment: register the revision (harmless alone), record the
//! attempt (conditional write: one attempt per version, even with two
//! leaders), then `UpdateService`. Every step is logged; the state shows in
//! the runner's status as `system_details` (`update_state`, `update_message`,
//! `latest_version`). Only the leader checks; standbys report `standby`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use runner_core::leader::Leadership;
use runner_core::retry::{Failures, Policy};
use runner_core::traits::Clock;
use runner_core::update::{
    Attempt, AttemptState, Attempts, Deployer, Gate, Release, Releases, Service, Settled,
    UpdateError, Verdict, admit, gate, judge, settle,
};
use semver::Version;
use tokio_util::sync::CancellationToken;

use crate::config::UpdateConfig;
use crate::health::{Health, chain};

/// While a deployment runs, its outcome is looked at this often.
const WATCH_DEPLOYMENT: Duration = Duration::from_secs(60);

/// The AWS side of self-update, when the runner runs as an ECS service task.
pub struct SelfUpdate {
    /// The runner's own service.
    pub deployer: Arc<dyn Deployer>,
    /// The attempt record.
    pub attempts: Arc<dyn Attempts>,
    /// The version this process runs.
    pub running: String,
}

impl std::fmt::Debug for SelfUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfUpdate")
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

/// Where self-update stands, as `update_state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not the leader: the leader checks.
    Standby,
    /// Nothing newer is offered (or the service already runs its image).
    UpToDate,
    /// A newer release is offered, but auto-update is off.
    Disabled,
    /// The offered release was rolled back; waiting for a newer one.
    HeldBack,
    /// The offered image is not a digest of the runner's own repository.
    Refused,
    /// Another deployment of the service is in progress.
    Waiting,
    /// Outside the update window.
    Scheduled,
    /// A deployment is rolling out.
    Deploying,
    /// The service could not be updated; tried again at the next check.
    Failed,
    /// The check itself failed (control plane, ECS or the table).
    Error,
}

impl State {
    /// Its name in `system_details`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standby => "standby",
            Self::UpToDate => "up_to_date",
            Self::Disabled => "disabled",
            Self::HeldBack => "held_back",
            Self::Refused => "refused",
            Self::Waiting => "waiting",
            Self::Scheduled => "scheduled",
            Self::Deploying => "deploying",
            Self::Failed => "failed",
            Self::Error => "error",
        }
    }
}

/// What one check found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The state.
    pub state: State,
    /// For operators.
    pub message: String,
    /// The latest release, when the control plane named one.
    pub latest: Option<String>,
}

impl Outcome {
    fn new(state: State, message: impl Into<String>, latest: Option<&Release>) -> Self {
        Self {
            state,
            message: message.into(),
            latest: latest.map(|r| r.version.clone()),
        }
    }
}

/// The leader's self-update loop.
pub struct Updater {
    /// Where releases come from.
    pub releases: Arc<dyn Releases>,
    /// The service and the attempt record.
    pub parts: SelfUpdate,
    /// Only the leader updates.
    pub leadership: Arc<Leadership>,
    /// Where the state is shown.
    pub health: Arc<Health>,
    /// The time of day, for the window.
    pub clock: Arc<dyn Clock>,
    /// Window, interval, on/off.
    pub config: UpdateConfig,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("parts", &self.parts)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn version(what: &str, value: &str) -> Result<Version, UpdateError> {
    Version::parse(value)
        .map_err(|_| UpdateError::Rejected(format!("{what} {value:?} is not a semantic version")))
}

/// An offered image for messages: quoted, escaped, at most 200 characters.
fn shown(image: &str) -> String {
    match image.char_indices().nth(200) {
        Some((end, _)) => format!("{:?}...", &image[..end]),
        None => format!("{image:?}"),
    }
}

fn since(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

impl Updater {
    /// The updater of `parts`, asking `releases`; without parts (not an ECS
    /// service task) there is none, and the runner's status says why.
    pub fn start(
        parts: Option<SelfUpdate>,
        releases: Arc<dyn Releases>,
        leadership: Arc<Leadership>,
        health: Arc<Health>,
        config: UpdateConfig,
    ) -> Option<Self> {
        let Some(parts) = parts else {
            health.set_detail("update_state", "unavailable");
            health.set_detail("update_message", "not running as an ECS service task");
            return None;
        };
        Some(Self {
            releases,
            parts,
            leadership,
            health,
            clock: Arc::new(runner_core::traits::SystemClock),
            config,
        })
    }

    fn lead(&self) -> Result<(), Outcome> {
        if self.leadership.is_leader() {
            Ok(())
        } else {
            Err(Outcome::new(State::Standby, "the leader updates", None))
        }
    }

    async fn finish(
        &self,
        attempt: &Attempt,
        state: AttemptState,
        message: &str,
    ) -> Result<Attempt, UpdateError> {
        self.parts
            .attempts
            .save(&Attempt {
                state,
                message: message.to_owned(),
                finished_at: Some(self.clock.now()),
                ..attempt.clone()
            })
            .await
    }

    /// One check: settle the last attempt, judge the offer, deploy if allowed.
    pub async fn check(&self) -> Result<Outcome, UpdateError> {
        if let Err(standby) = self.lead() {
            return Ok(standby);
        }
        let running = version("the running version", &self.parts.running)?;
        let release = self.releases.latest(&self.parts.running).await?;
        let mut last = self.parts.attempts.load().await?;
        let mut service = None;

        if let Some(attempt) = last.clone().filter(|a| a.state == AttemptState::Deploying) {
            let observed = self.parts.deployer.service().await?;
            let target = version("the attempt's release", &attempt.release)?;
            match settle(&attempt, &running, &target, &observed) {
                Settled::InProgress => {
                    return Ok(Outcome::new(
                        State::Deploying,
                        format!(
                            "deploying {} ({}) as {} since {}",
                            attempt.release,
                            attempt.image,
                            attempt.task_definition,
                            since(attempt.started_at)
                        ),
                        release.as_ref(),
                    ));
                }
                Settled::Succeeded => {
                    tracing::info!(release = %attempt.release, from = %attempt.from_release, "self-update succeeded");
                    last = Some(self.finish(&attempt, AttemptState::Succeeded, "").await?);
                }
                Settled::RolledBack(why) => {
                    tracing::warn!(release = %attempt.release, reason = %why, "self-update rolled back; this release is not tried again");
                    last = Some(
                        self.finish(&attempt, AttemptState::RolledBack, &why)
                            .await?,
                    );
                }
            }
            service = Some(observed);
        }

        let Some(release) = release else {
            return Ok(Outcome::new(
                State::UpToDate,
                "the control plane has no release",
                None,
            ));
        };
        let offered = version("the offered release", &release.version)?;
        let rolled_back = last
            .as_ref()
            .filter(|a| a.state == AttemptState::RolledBack)
            .and_then(|a| Version::parse(&a.release).ok());
        let latest = Some(&release);
        match judge(
            &running,
            &offered,
            release.auto_update,
            self.config.enabled,
            rolled_back.as_ref(),
        ) {
            Verdict::UpToDate => {
                return Ok(Outcome::new(
                    State::UpToDate,
                    format!("runs {running}; the latest release is {offered}"),
                    latest,
                ));
            }
            Verdict::Disabled => {
                let why = if self.config.enabled {
                    "auto-update is off in the control plane"
                } else {
                    "self-update is off here (RUNNER_SELF_UPDATE=false)"
                };
                return Ok(Outcome::new(
                    State::Disabled,
                    format!("{offered} is available; {why}"),
                    latest,
                ));
            }
            Verdict::HeldBack => {
                let why = last.as_ref().map_or("", |a| a.message.as_str());
                return Ok(Outcome::new(
                    State::HeldBack,
                    format!("{offered} was rolled back ({why}); waiting for a newer release"),
                    latest,
                ));
            }
            Verdict::Wanted => {}
        }

        let service = match service {
            Some(service) => service,
            None => self.parts.deployer.service().await?,
        };
        // Before anything else about the image: the control plane names a
        // release, never where the runner's code comes from.
        if let Err(refusal) = admit(
            self.config.repository.as_ref(),
            &service.image,
            &release.image,
        ) {
            return Ok(Outcome::new(
                State::Refused,
                format!(
                    "{offered} refused: {refusal}; offered {}",
                    shown(&release.image)
                ),
                latest,
            ));
        }
        match gate(
            &service,
            &release.image,
            self.config.window,
            self.clock.now(),
        ) {
            Gate::SameImage => Ok(Outcome::new(
                State::UpToDate,
                format!("the service already runs {}", release.image),
                latest,
            )),
            Gate::Busy => Ok(Outcome::new(
                State::Waiting,
                format!(
                    "{offered} waits: another deployment of service {} is in progress",
                    service.name
                ),
                latest,
            )),
            Gate::OutsideWindow(opens_in) => Ok(Outcome::new(
                State::Scheduled,
                format!(
                    "{offered} will be deployed in the update window {} UTC (opens in {})",
                    self.config.window,
                    humantime::format_duration(Duration::from_secs(opens_in.as_secs() / 60 * 60))
                ),
                latest,
            )),
            Gate::Go => self.deploy(&service, &release, last.as_ref()).await,
        }
    }

    async fn deploy(
        &self,
        service: &Service,
        release: &Release,
        last: Option<&Attempt>,
    ) -> Result<Outcome, UpdateError> {
        if let Err(standby) = self.lead() {
            return Ok(standby);
        }
        tracing::info!(
            release = %release.version,
            image = %release.image,
            from = %self.parts.running,
            ecs.service = %service.name,
            "self-update: registering a task definition revision with the new image"
        );
        let task_definition = self
            .parts
            .deployer
            .register(service, &release.image)
            .await?;
        tracing::info!(task_definition = %task_definition, "self-update: registered");
        let attempt = self
            .parts
            .attempts
            .save(&Attempt {
                release: release.version.clone(),
                image: release.image.clone(),
                from_release: self.parts.running.clone(),
                task_definition: task_definition.clone(),
                previous_task_definition: service.task_definition.clone(),
                state: AttemptState::Deploying,
                message: String::new(),
                started_at: self.clock.now(),
                finished_at: None,
                version: last.map_or(0, |a| a.version),
            })
            .await?;
        tracing::info!(release = %release.version, "self-update: attempt recorded");
        match self.parts.deployer.deploy(service, &task_definition).await {
            Ok(()) => {
                tracing::info!(
                    ecs.service = %service.name,
                    task_definition = %task_definition,
                    "self-update: service updated; ECS rolls the new release out"
                );
                Ok(Outcome::new(
                    State::Deploying,
                    format!(
                        "deploying {} ({}) as {task_definition} since {}",
                        release.version,
                        release.image,
                        since(attempt.started_at)
                    ),
                    Some(release),
                ))
            }
            Err(err @ UpdateError::Rejected(_)) => {
                // The service was not changed: try again at the next check.
                let problem = chain(&err);
                tracing::warn!(error = %problem, "self-update: cannot update the service");
                self.finish(&attempt, AttemptState::Failed, &problem)
                    .await?;
                Ok(Outcome::new(
                    State::Failed,
                    format!("cannot deploy {}: {problem}", release.version),
                    Some(release),
                ))
            }
            // It may have happened: the next check sees what the service runs.
            Err(err) => Err(err),
        }
    }

    fn report(&self, outcome: &Outcome, previous: Option<&Outcome>) {
        self.health
            .set_detail("update_state", outcome.state.as_str());
        self.health.set_detail("update_message", &outcome.message);
        if let Some(latest) = &outcome.latest {
            self.health.set_detail("latest_version", latest);
        }
        if previous != Some(outcome) {
            // `outcome`, not `message`: the event's own message is the fixed text.
            if matches!(outcome.state, State::Error | State::Failed | State::Refused) {
                tracing::warn!(state = outcome.state.as_str(), outcome = %outcome.message, "self-update check");
            } else {
                tracing::info!(state = outcome.state.as_str(), outcome = %outcome.message, "self-update check");
            }
        }
    }

    /// Checks while leading, every interval (with jitter), until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut leading = self.leadership.watch();
        // A failed check is retried from 30 s, doubling, up to the interval.
        let mut failures =
            Failures::new(Policy::new(Duration::from_secs(30), self.config.interval));
        let mut previous: Option<Outcome> = None;
        loop {
            let (outcome, failed) = match self.check().await {
                Ok(outcome) => {
                    failures.reset();
                    (outcome, false)
                }
                Err(err) => (Outcome::new(State::Error, chain(&err), None), true),
            };
            self.report(&outcome, previous.as_ref());
            let delay = if failed {
                failures.failed()
            } else if outcome.state == State::Deploying {
                WATCH_DEPLOYMENT.min(self.config.interval)
            } else {
                let interval = self.config.interval;
                rand::thread_rng().gen_range(interval * 9 / 10..=interval * 11 / 10)
            };
            previous = Some(outcome);
            // A standby waits for leadership; a leader for the next check.
            let standby = !self.leadership.is_leader();
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(delay), if !standby => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    use async_trait::async_trait;
    use runner_core::traits::ManualClock;
    use runner_core::update::{Deployment, Rollout, UpdateWindow};

    use super::*;

    const REPO: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com/aws-runner";

    /// `<REPO>@sha256:<64 hex>`, one digest per version.
    fn pinned(version: &str) -> String {
        let hex: String = version.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{REPO}@sha256:{hex:0<64}")
    }

    /// 1 January 2025 at `hour`:00 UTC.
    fn at(hour: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_735_689_600 + hour * 3600)
    }

    #[derive(Default)]
    struct FakeReleases {
        release: Mutex<Option<Release>>,
        calls: AtomicUsize,
    }

    impl FakeReleases {
        fn publish(&self, version: &str, auto_update: bool) {
            *self.release.lock().unwrap() = Some(Release {
                version: version.into(),
                image: pinned(version),
                auto_update,
            });
        }
    }

    #[async_trait]
    impl Releases for FakeReleases {
        async fn latest(&self, _running: &str) -> Result<Option<Release>, UpdateError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(self.release.lock().unwrap().clone())
        }
    }

    /// An ECS service that, like moto, never starts tasks: the task keeps
    /// running its own revision while the service points at the new one.
    struct FakeService {
        service: Mutex<Service>,
        images: Mutex<Vec<String>>,
        deploys: AtomicUsize,
    }

    impl FakeService {
        fn new(image: &str) -> Self {
            Self {
                service: Mutex::new(Service {
                    cluster: "runners".into(),
                    name: "runner".into(),
                    task_definition: "td:1".into(),
                    own_task_definition: "td:1".into(),
                    container: "runnerd".into(),
                    image: image.into(),
                    deployments: vec![Deployment {
                        task_definition: "td:1".into(),
                        rollout: Some(Rollout::Completed),
                    }],
                }),
                images: Mutex::new(vec![image.to_owned()]),
                deploys: AtomicUsize::new(0),
            }
        }

        fn registered(&self) -> usize {
            self.images.lock().unwrap().len() - 1
        }

        /// What the circuit breaker does: back to the revision this task runs.
        fn roll_back(&self) {
            let mut service = self.service.lock().unwrap();
            service.task_definition = service.own_task_definition.clone();
            service.image = self.images.lock().unwrap()[0].clone();
        }
    }

    #[async_trait]
    impl Deployer for FakeService {
        async fn service(&self) -> Result<Service, UpdateError> {
            Ok(self.service.lock().unwrap().clone())
        }

        async fn register(&self, _service: &Service, image: &str) -> Result<String, UpdateError> {
            let mut images = self.images.lock().unwrap();
            images.push(image.to_owned());
            Ok(format!("td:{}", images.len()))
        }

        async fn deploy(&self, _service: &Service, td: &str) -> Result<(), UpdateError> {
            self.deploys.fetch_add(1, Ordering::SeqCst);
            let revision: usize = td.trim_start_matches("td:").parse().unwrap();
            let mut service = self.service.lock().unwrap();
            service.task_definition = td.to_owned();
            service.image = self.images.lock().unwrap()[revision - 1].clone();
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeAttempts(Mutex<Option<Attempt>>);

    #[async_trait]
    impl Attempts for FakeAttempts {
        async fn load(&self) -> Result<Option<Attempt>, UpdateError> {
            Ok(self.0.lock().unwrap().clone())
        }

        async fn save(&self, attempt: &Attempt) -> Result<Attempt, UpdateError> {
            let mut stored = self.0.lock().unwrap();
            if stored.as_ref().map_or(0, |a| a.version) != attempt.version {
                return Err(UpdateError::Conflict);
            }
            let saved = Attempt {
                version: attempt.version + 1,
                ..attempt.clone()
            };
            *stored = Some(saved.clone());
            Ok(saved)
        }
    }

    struct Fixture {
        releases: Arc<FakeReleases>,
        service: Arc<FakeService>,
        attempts: Arc<FakeAttempts>,
        clock: Arc<ManualClock>,
        leadership: Arc<Leadership>,
        health: Arc<Health>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                releases: Arc::default(),
                service: Arc::new(FakeService::new(&pinned("0.1.0"))),
                attempts: Arc::default(),
                clock: Arc::new(ManualClock::new(at(23))),
                leadership: Arc::new(Leadership::always()),
                health: Arc::default(),
            }
        }

        fn updater(&self, running: &str, window: &str, enabled: bool) -> Updater {
            Updater {
                releases: self.releases.clone(),
                parts: SelfUpdate {
                    deployer: self.service.clone(),
                    attempts: self.attempts.clone(),
                    running: running.into(),
                },
                leadership: self.leadership.clone(),
                health: self.health.clone(),
                clock: self.clock.clone(),
                config: UpdateConfig {
                    enabled,
                    window: window.parse::<UpdateWindow>().unwrap(),
                    interval: Duration::from_secs(3600),
                    repository: Some(REPO.parse().unwrap()),
                },
            }
        }

        fn attempt(&self) -> Attempt {
            self.attempts.0.lock().unwrap().clone().expect("an attempt")
        }
    }

    #[tokio::test]
    async fn a_newer_release_inside_the_window_is_deployed_exactly_once() {
        let f = Fixture::new();
        let updater = f.updater("0.1.0", "22-04", true);
        f.releases.publish("0.2.0", true);

        let outcome = updater.check().await.unwrap();
        assert_eq!(outcome.state, State::Deploying, "{outcome:?}");
        assert_eq!(f.service.registered(), 1);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 1);
        let attempt = f.attempt();
        assert_eq!(attempt.state, AttemptState::Deploying);
        assert_eq!(attempt.release, "0.2.0");
        assert_eq!(attempt.task_definition, "td:2");
        assert_eq!(attempt.previous_task_definition, "td:1");

        // The old task keeps running while ECS rolls out: nothing more happens.
        for _ in 0..3 {
            assert_eq!(updater.check().await.unwrap().state, State::Deploying);
        }
        assert_eq!(f.service.registered(), 1);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn outside_the_window_nothing_is_deployed_until_it_opens() {
        let f = Fixture::new();
        f.clock.set(at(12));
        let updater = f.updater("0.1.0", "22-04", true);
        f.releases.publish("0.2.0", true);

        let outcome = updater.check().await.unwrap();
        assert_eq!(outcome.state, State::Scheduled);
        assert!(
            outcome.message.contains("22-04 UTC (opens in 10h)"),
            "{}",
            outcome.message
        );
        assert_eq!(f.service.registered(), 0);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 0);
        assert!(
            f.attempts.0.lock().unwrap().is_none(),
            "no attempt recorded"
        );

        f.clock.set(at(24 + 3));
        assert_eq!(updater.check().await.unwrap().state, State::Deploying);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_rolled_back_release_is_not_retried_until_a_newer_one_is_offered() {
        let f = Fixture::new();
        let updater = f.updater("0.1.0", "00-24", true);
        f.releases.publish("0.2.0", true);
        assert_eq!(updater.check().await.unwrap().state, State::Deploying);

        f.service.roll_back();
        let outcome = updater.check().await.unwrap();
        assert_eq!(outcome.state, State::HeldBack, "{outcome:?}");
        assert!(
            outcome.message.contains("0.2.0 was rolled back"),
            "{}",
            outcome.message
        );
        let attempt = f.attempt();
        assert_eq!(attempt.state, AttemptState::RolledBack);
        assert!(
            attempt.message.contains("runs td:1 instead of td:2"),
            "{}",
            attempt.message
        );
        assert!(attempt.finished_at.is_some());
        for _ in 0..3 {
            assert_eq!(updater.check().await.unwrap().state, State::HeldBack);
        }
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 1);

        f.releases.publish("0.2.1", true);
        assert_eq!(updater.check().await.unwrap().state, State::Deploying);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 2);
        assert_eq!(f.attempt().release, "0.2.1");
    }

    #[tokio::test]
    async fn the_new_release_marks_the_attempt_succeeded() {
        let f = Fixture::new();
        f.releases.publish("0.2.0", true);
        f.updater("0.1.0", "00-24", true).check().await.unwrap();

        // The new task leads now.
        let outcome = f.updater("0.2.0", "00-24", true).check().await.unwrap();
        assert_eq!(outcome.state, State::UpToDate, "{outcome:?}");
        assert_eq!(f.attempt().state, AttemptState::Succeeded);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn nothing_is_deployed_unless_newer_enabled_and_a_different_image() {
        let f = Fixture::new();
        let updater = f.updater("0.1.0", "00-24", true);
        assert_eq!(updater.check().await.unwrap().state, State::UpToDate);

        f.releases.publish("0.1.0", true);
        assert_eq!(updater.check().await.unwrap().state, State::UpToDate);
        f.releases.publish("0.0.9", true);
        assert_eq!(updater.check().await.unwrap().state, State::UpToDate);

        f.releases.publish("0.2.0", false);
        let outcome = updater.check().await.unwrap();
        assert_eq!(outcome.state, State::Disabled);
        assert!(outcome.message.contains("off in the control plane"));

        f.releases.publish("0.2.0", true);
        let off_here = f.updater("0.1.0", "00-24", false).check().await.unwrap();
        assert_eq!(off_here.state, State::Disabled);
        assert!(off_here.message.contains("RUNNER_SELF_UPDATE=false"));

        // A newer version with the image the service already runs.
        *f.releases.release.lock().unwrap() = Some(Release {
            version: "0.2.0".into(),
            image: pinned("0.1.0"),
            auto_update: true,
        });
        assert_eq!(updater.check().await.unwrap().state, State::UpToDate);
        assert_eq!(f.service.registered(), 0);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 0);
    }

    /// Offers `image` as release 0.2.0 and checks once.
    async fn offer(f: &Fixture, updater: &Updater, image: &str) -> Outcome {
        *f.releases.release.lock().unwrap() = Some(Release {
            version: "0.2.0".into(),
            image: image.into(),
            auto_update: true,
        });
        updater.check().await.unwrap()
    }

    #[tokio::test]
    async fn only_a_digest_of_the_runners_repository_is_deployed() {
        let f = Fixture::new();
        let updater = f.updater("0.1.0", "00-24", true);
        let digest = pinned("0.2.0");
        let digest = digest.split_once('@').unwrap().1;
        for (image, why) in [
            (
                format!("evil.example.com/aws-runner@{digest}"),
                format!("the image is not in the repository {REPO}"),
            ),
            (
                format!("{REPO}-evil@{digest}"),
                format!("the image is not in the repository {REPO}"),
            ),
            (
                format!("{REPO}:0.2.0"),
                format!("the image is a tag of {REPO}, not a digest"),
            ),
            (
                format!("{REPO}@sha256:abc"),
                "the image's digest is not sha256: and 64 lowercase hex digits".to_owned(),
            ),
        ] {
            let outcome = offer(&f, &updater, &image).await;
            assert_eq!(outcome.state, State::Refused, "{image}: {outcome:?}");
            assert!(
                outcome
                    .message
                    .starts_with(&format!("0.2.0 refused: {why}")),
                "{image}: {}",
                outcome.message
            );
            assert!(outcome.message.contains(&format!("{image:?}")));
            assert_eq!(outcome.latest.as_deref(), Some("0.2.0"));
        }
        assert_eq!(f.service.registered(), 0);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 0);
        assert!(
            f.attempts.0.lock().unwrap().is_none(),
            "no attempt recorded"
        );

        // A long hostile image is cut in the message.
        let long = format!("evil.example.com/{}", "a".repeat(4096));
        let outcome = offer(&f, &updater, &long).await;
        assert_eq!(outcome.state, State::Refused);
        assert!(outcome.message.len() < 400, "{}", outcome.message);

        assert_eq!(
            offer(&f, &updater, &pinned("0.2.0")).await.state,
            State::Deploying
        );
        assert_eq!(f.service.registered(), 1);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 1);
    }

    /// Log lines written through it.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refusal_is_logged_as_a_warning_and_shown_in_the_status() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer({
                let capture = capture.clone();
                move || capture.clone()
            })
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let f = Fixture::new();
        let updater = f.updater("0.1.0", "00-24", true);
        let hostile = format!("{REPO}:0.2.0");
        let outcome = offer(&f, &updater, &hostile).await;
        updater.report(&outcome, None);

        let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = logs
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .find(|l: &serde_json::Value| l["state"] == "refused")
            .unwrap_or_else(|| panic!("no refusal logged: {logs}"));
        assert_eq!(line["level"], "WARN", "{line}");
        let reason = line["outcome"].as_str().unwrap_or_default();
        assert!(
            reason.contains(&format!("the image is a tag of {REPO}, not a digest")),
            "{line}"
        );
        assert!(reason.contains(&format!("{hostile:?}")), "{line}");
        let details = f.health.details().borrow().clone();
        assert_eq!(
            details.get("update_state").map(String::as_str),
            Some("refused")
        );
        assert_eq!(details.get("update_message"), Some(&outcome.message));
        assert_eq!(
            details.get("latest_version").map(String::as_str),
            Some("0.2.0")
        );
    }

    #[tokio::test]
    async fn without_the_flag_the_repository_is_the_service_images_when_pinned() {
        let f = Fixture::new();
        let mut updater = f.updater("0.1.0", "00-24", true);
        updater.config.repository = None;
        let look_alike = format!("{REPO}-evil@sha256:{}", "0".repeat(64));
        let outcome = offer(&f, &updater, &look_alike).await;
        assert_eq!(outcome.state, State::Refused, "{outcome:?}");
        assert_eq!(f.service.registered(), 0);

        // The flag wins over the service's image.
        updater.config.repository = Some("registry.example.com/aws-runner".parse().unwrap());
        let outcome = offer(&f, &updater, &pinned("0.2.0")).await;
        assert_eq!(outcome.state, State::Refused, "{outcome:?}");
        assert!(
            outcome
                .message
                .contains("not in the repository registry.example.com/aws-runner"),
            "{}",
            outcome.message
        );
        assert_eq!(f.service.registered(), 0);

        updater.config.repository = None;
        assert_eq!(
            offer(&f, &updater, &pinned("0.2.0")).await.state,
            State::Deploying
        );
        assert_eq!(f.service.registered(), 1);

        // A service image pinned by tag tells nothing: everything is refused.
        let f = Fixture {
            service: Arc::new(FakeService::new(&format!("{REPO}:0.1.0"))),
            ..Fixture::new()
        };
        let mut updater = f.updater("0.1.0", "00-24", true);
        updater.config.repository = None;
        let outcome = offer(&f, &updater, &pinned("0.2.0")).await;
        assert_eq!(outcome.state, State::Refused, "{outcome:?}");
        assert!(
            outcome
                .message
                .contains("RUNNER_IMAGE_REPOSITORY is not set"),
            "{}",
            outcome.message
        );
        assert_eq!(f.service.registered(), 0);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_standby_never_deploys() {
        let f = Fixture {
            leadership: Arc::new(Leadership::default()),
            ..Fixture::new()
        };
        f.releases.publish("0.2.0", true);
        let outcome = f.updater("0.1.0", "00-24", true).check().await.unwrap();
        assert_eq!(outcome.state, State::Standby);
        assert_eq!(f.releases.calls.load(Ordering::SeqCst), 0);
        assert_eq!(f.service.deploys.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_checks_hourly_with_jitter_and_only_while_leading() {
        let f = Fixture {
            leadership: Arc::new(Leadership::default()),
            ..Fixture::new()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(f.updater("0.1.0", "00-24", true).run(shutdown.clone()));
        let calls = || f.releases.calls.load(Ordering::SeqCst);

        tokio::time::sleep(Duration::from_secs(5 * 3600)).await;
        assert_eq!(calls(), 0, "a standby does not ask");
        assert_eq!(
            f.health
                .details()
                .borrow()
                .get("update_state")
                .map(String::as_str),
            Some("standby")
        );

        f.leadership.set(
            1,
            tokio::time::Instant::now() + Duration::from_secs(100 * 24 * 3600),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(calls(), 1, "checks as soon as it leads");
        // The next check comes between 54 and 66 minutes later.
        tokio::time::sleep(Duration::from_secs(53 * 60)).await;
        assert_eq!(calls(), 1);
        tokio::time::sleep(Duration::from_secs(14 * 60)).await;
        assert_eq!(calls(), 2);
        assert_eq!(
            f.health
                .details()
                .borrow()
                .get("update_state")
                .map(String::as_str),
            Some("up_to_date")
        );

        shutdown.cancel();
        task.await.unwrap();
    }
}
