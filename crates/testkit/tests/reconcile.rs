//! Reconcile scenarios: `runner_core::reconcile` driven pass by pass over the
//! testkit fakes, in virtual time (`start_paused`), with no AWS SDK linked.
//!
//! A scenario scripts passes, honours the requeue each pass returns by
//! sleeping it in virtual time, and asserts what the pass did: the compute
//! calls, the stored record, the published status and the requeue. Every
//! pass runs under a timeout, so a pass that waits for something that never
//! comes fails instead of hanging. The informer's orphan sweep runs here too,
//! on a hand-moved wall clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use runner_core::controller::Controller;
use runner_core::controller::informer::Event;
use runner_core::desired::Desired;
use runner_core::leader::Leadership;
use runner_core::model::{
    Action, DesiredPhase, Environment, EnvironmentClass, EnvironmentId, InstanceState, LaunchState,
    Phase, Record, Revision, Spec, Status, Subnet, client_token,
};
use runner_core::model::{Content, StopReason, Timings};
use runner_core::observer::Observer;
use runner_core::orphans::OrphanPolicy;
use runner_core::outbox::Outbox;
use runner_core::reconcile::{Context, ReconcileError, ReconcileSettings, place, reconcile};
use runner_core::report::{Report, Stage};
use runner_core::traits::{
    Checkout, CheckoutError, Clock as _, Compute as _, ComputeError, ControlPlane,
    ControlPlaneError, LaunchRequest, ManualClock, StoreError,
};
use runner_core::validate::AllowedInstanceTypes;
use testkit::fakes::{FakeBootstrap, LaunchFault, MemoryCompute, MemoryStore};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const ZONES: [&str; 3] = ["eu-west-1a", "eu-west-1b", "eu-west-1c"];
const INSTANCE_TYPE: &str = "m7i.large";

/// Every duration distinct, so a requeue names the rule that chose it.
const SETTINGS: ReconcileSettings = ReconcileSettings {
    poll: Duration::from_secs(2),
    resync: Duration::from_secs(300),
    capacity_retry: Duration::from_secs(60),
    rejected_retry: Duration::from_secs(120),
    auth_retry: Duration::from_secs(90),
    content_deadline: Duration::from_secs(600),
};

/// How long every compute call takes: the clock moves between a describe
/// and the mutation after it, as it does against a real cloud.
const LATENCY: Duration = Duration::from_millis(50);

/// How long one pass may take in virtual time before it counts as hung.
const PASS_TIMEOUT: Duration = Duration::from_secs(3600);

fn subnets() -> Vec<Subnet> {
    ZONES
        .iter()
        .zip(["subnet-a", "subnet-b", "subnet-c"])
        .map(|(zone, id)| Subnet {
            id: id.to_owned(),
            availability_zone: (*zone).to_owned(),
        })
        .collect()
}

/// A checkout credential that records its calls, and the environment's
/// stored launch state when `bind` was called.
#[derive(Debug)]
struct RecordingCheckout {
    store: Arc<MemoryStore>,
    calls: Mutex<Vec<String>>,
    state_at_bind: Mutex<Vec<Option<LaunchState>>>,
}

impl RecordingCheckout {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
}

#[async_trait]
impl Checkout for RecordingCheckout {
    async fn prepare(
        &self,
        _environment: EnvironmentId,
        creator: &str,
        _repository_url: &str,
    ) -> Result<Option<String>, CheckoutError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("prepare for {creator}"));
        Ok(None)
    }

    async fn bind(
        &self,
        environment: EnvironmentId,
        instance_id: &str,
    ) -> Result<(), CheckoutError> {
        let state = self
            .store
            .records()
            .into_iter()
            .find(|r| r.environment == environment)
            .and_then(|r| r.launch)
            .map(|l| l.state);
        self.state_at_bind.lock().expect("lock").push(state);
        self.calls
            .lock()
            .expect("lock")
            .push(format!("bind {instance_id}"));
        Ok(())
    }

    async fn remove(&self, _environment: EnvironmentId) -> Result<(), CheckoutError> {
        self.calls.lock().expect("lock").push("remove".to_owned());
        Ok(())
    }
}

/// A launch request as it arrived: when (virtual time since the scenario
/// began) and the environment's stored record at that moment.
#[derive(Debug, Clone)]
struct Arrival {
    at: Duration,
    request: LaunchRequest,
    stored: Option<Record>,
}

/// One environment, the fakes, and the reconcile context over them.
struct Scenario {
    id: EnvironmentId,
    class: EnvironmentClass,
    spec: Spec,
    store: Arc<MemoryStore>,
    compute: Arc<MemoryCompute>,
    checkout: Arc<RecordingCheckout>,
    desired: Arc<Desired>,
    outbox: Arc<Outbox>,
    allowed: AllowedInstanceTypes,
    /// The context's wall clock (instances' deadlines and idleness).
    clock: ManualClock,
    ctx: Context,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

impl Scenario {
    fn new() -> Self {
        let id = EnvironmentId(uuid::Uuid::from_u128(
            0x5ca1_ab1e_0000_4000_8000_0000_0000_0001,
        ));
        let store = Arc::new(MemoryStore::default());
        let compute = Arc::new(MemoryCompute::with_zones(&ZONES));
        compute.set_latency(LATENCY);
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        compute.on_launch({
            let (store, arrivals, began) = (store.clone(), arrivals.clone(), Instant::now());
            move |request: &LaunchRequest| {
                let stored = store
                    .records()
                    .into_iter()
                    .find(|r| r.environment == request.environment);
                arrivals.lock().expect("lock").push(Arrival {
                    at: began.elapsed(),
                    request: request.clone(),
                    stored,
                });
            }
        });
        let checkout = Arc::new(RecordingCheckout {
            store: store.clone(),
            calls: Mutex::default(),
            state_at_bind: Mutex::default(),
        });
        let class = EnvironmentClass {
            id: "0c1a55e5-0000-4000-8000-000000000001".to_owned(),
            display_name: "Small".to_owned(),
            instance_type: INSTANCE_TYPE.to_owned(),
            disk_gib: 50,
            enabled: true,
        };
        let spec = Spec {
            spec_version: 0,
            desired: None,
            class_id: class.id.clone(),
            repository_url: "https://github.com/acme/api.git".to_owned(),
            revision: Revision::Branch("main".to_owned()),
            creator: "alice".to_owned(),
            disconnected_timeout: None,
        };
        let allowed = AllowedInstanceTypes::default();
        let clock = ManualClock::new(std::time::SystemTime::now());
        let (desired, outbox, ctx) =
            Self::context(&store, &compute, &checkout, &class, &allowed, &clock);
        Self {
            clock,
            id,
            class,
            spec,
            store,
            compute,
            checkout,
            desired,
            outbox,
            allowed,
            ctx,
            arrivals,
        }
    }

    /// A fresh process's view: the store's records, no instance view, no
    /// status, and nothing known of the control plane's environments.
    fn context(
        store: &Arc<MemoryStore>,
        compute: &Arc<MemoryCompute>,
        checkout: &Arc<RecordingCheckout>,
        class: &EnvironmentClass,
        allowed: &AllowedInstanceTypes,
        clock: &ManualClock,
    ) -> (Arc<Desired>, Arc<Outbox>, Context) {
        let desired = Arc::new(Desired::default());
        desired.set_classes(vec![class.clone()]);
        let outbox = Arc::new(Outbox::default());
        let observer = Arc::new(Observer::new(compute.clone(), Duration::from_secs(1)));
        let ctx = Context::new(
            store.clone(),
            compute.clone(),
            observer,
            outbox.clone(),
            desired.clone(),
            subnets(),
            SETTINGS,
            store.records(),
        )
        .with_checkout(checkout.clone())
        .with_instance_types(allowed.clone())
        .with_clock(Arc::new(clock.clone()));
        (desired, outbox, ctx)
    }

    /// The process restarts: the cloud and the store stay.
    fn restart(&mut self) {
        let (desired, outbox, ctx) = Self::context(
            &self.store,
            &self.compute,
            &self.checkout,
            &self.class,
            &self.allowed,
            &self.clock,
        );
        self.desired = desired;
        self.outbox = outbox;
        self.ctx = ctx;
    }

    /// The control plane describes the environment with a new spec.
    fn want(&mut self, phase: DesiredPhase) {
        self.edit(|spec| spec.desired = Some(phase));
    }

    fn edit(&mut self, change: impl FnOnce(&mut Spec)) {
        change(&mut self.spec);
        self.spec.spec_version += 1;
        self.desired.upsert(Environment {
            id: self.id,
            spec: self.spec.clone(),
            accepted_status_version: 0,
        });
    }

    async fn pass(&self) -> Result<Action, ReconcileError> {
        tokio::time::timeout(PASS_TIMEOUT, reconcile(&self.ctx, self.id))
            .await
            .expect("a reconcile pass never hangs")
    }

    /// An environment whose instance runs and reports nothing: launched,
    /// STARTING, and the poll after that honoured.
    async fn silent_and_starting() -> Self {
        let mut s = Self::new();
        s.compute.set_bootstrap(FakeBootstrap::Silent);
        s.want(DesiredPhase::Running);
        let action = s.ok().await;
        s.honour(action).await;
        let action = s.past_creating().await;
        assert_eq!(s.status().phase, Phase::Starting);
        s.honour(action).await;
        s
    }

    /// Runs passes until the environment is past CREATING (the launch's
    /// answer shows the instance pending; a lookup by id shows it running),
    /// honouring each requeue; the last pass's action.
    async fn past_creating(&self) -> Action {
        for _ in 0..10 {
            let action = self.ok().await;
            if self.status().phase != Phase::Creating {
                return action;
            }
            self.honour(action).await;
        }
        panic!("still CREATING after 10 passes");
    }

    /// Runs a pass that must succeed, and returns its requeue.
    async fn ok(&self) -> Action {
        self.pass().await.expect("the pass succeeds")
    }

    /// Does what `action` says: sleeps the requeue (virtual time).
    async fn honour(&self, action: Action) {
        if let Action::Requeue(after) = action {
            tokio::time::sleep(after).await;
        }
    }

    fn status(&self) -> Status {
        self.outbox.last(self.id).expect("a status was published")
    }

    fn record(&self) -> Record {
        self.store
            .records()
            .into_iter()
            .find(|r| r.environment == self.id)
            .expect("a stored record")
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("lock").clone()
    }

    fn zone_of_attempt(&self, attempt: u32, exhausted: &[String]) -> String {
        let offered: Vec<String> = ZONES.iter().map(|z| (*z).to_owned()).collect();
        place(self.id, attempt, &subnets(), &offered, exhausted)
            .expect("a zone is left")
            .availability_zone
    }
}

fn launched(record: &Record) -> Option<&str> {
    record.launch.as_ref().and_then(|l| l.instance_id())
}

#[tokio::test(start_paused = true)]
async fn a_launch_stores_its_intent_before_run_instances_and_its_instance_after_binding() {
    let mut s = Scenario::new();
    s.want(DesiredPhase::Running);

    let action = s.ok().await;
    assert_eq!(action, Action::Requeue(SETTINGS.poll));
    let arrivals = s.arrivals();
    assert_eq!(arrivals.len(), 1, "one RunInstances");
    let Arrival {
        request, stored, ..
    } = &arrivals[0];
    let intent = stored
        .as_ref()
        .and_then(|r| r.launch.clone())
        .expect("the intent was stored before RunInstances");
    assert_eq!(intent.state, LaunchState::Intended);
    assert_eq!(intent.attempt, 1);
    assert_eq!(intent.client_token, client_token(s.id, 1));
    assert_eq!(request.client_token, intent.client_token);
    assert_eq!(request.subnet, intent.subnet);
    assert_eq!(request.instance_type, INSTANCE_TYPE);

    let instance = s.compute.instances().remove(0);
    assert_eq!(launched(&s.record()), Some(instance.id.as_str()));
    assert_eq!(
        s.checkout.calls(),
        [
            "prepare for alice".to_owned(),
            format!("bind {}", instance.id)
        ]
    );
    assert_eq!(
        *s.checkout.state_at_bind.lock().expect("lock"),
        [Some(LaunchState::Intended)],
        "the record names the instance only once its credential is bound"
    );
    let status = s.status();
    assert_eq!(status.phase, Phase::Creating);
    assert_eq!(status.machine.map(|m| m.id), Some(instance.id.clone()));

    s.honour(action).await;
    assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.resync));
    let status = s.status();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.failure_message, "");
    assert_eq!(
        status.machine.map(|m| (m.id, m.state)),
        Some((instance.id, InstanceState::Running))
    );
    assert_eq!(s.compute.calls("launch"), 1, "nothing launched twice");
}

#[tokio::test(start_paused = true)]
async fn a_transient_launch_failure_retries_the_same_token_in_the_same_subnet() {
    let mut s = Scenario::new();
    s.compute.inject(LaunchFault::Unavailable(1));
    s.want(DesiredPhase::Running);

    let err = s.pass().await.expect_err("the launch failed");
    assert!(
        matches!(err, ReconcileError::Compute(ComputeError::Unavailable(_))),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(err.metric_label(), "compute_unavailable");
    let intent = s.record().launch.expect("the intent stays");
    assert_eq!(intent.state, LaunchState::Intended);

    tokio::time::sleep(SETTINGS.poll).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    let arrivals = s.arrivals();
    assert_eq!(arrivals.len(), 2);
    for arrival in &arrivals {
        assert_eq!(arrival.request.attempt, 1);
        assert_eq!(arrival.request.client_token, intent.client_token);
        assert_eq!(arrival.request.subnet, intent.subnet);
    }
    assert_eq!(s.compute.instances().len(), 1);
    assert_eq!(
        launched(&s.record()),
        Some(s.compute.instances()[0].id.as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_launch_response_is_retried_with_the_same_token_and_yields_the_same_instance() {
    let mut s = Scenario::new();
    // The instance exists but the answer is lost, and the tag lookup of the
    // next pass does not see it yet.
    s.compute.inject(LaunchFault::LostResponse(1));
    s.compute.inject(LaunchFault::LookupLag(1));
    s.want(DesiredPhase::Running);

    let err = s.pass().await.expect_err("the response was lost");
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(s.compute.instances().len(), 1, "yet the instance exists");

    tokio::time::sleep(SETTINGS.poll).await;
    s.ok().await;
    assert_eq!(s.compute.calls("find_launch"), 1, "looked up by tags first");
    let arrivals = s.arrivals();
    assert_eq!(arrivals.len(), 2, "then launched again");
    assert_eq!(
        arrivals[0].request.client_token,
        arrivals[1].request.client_token
    );
    assert_eq!(arrivals[0].request.subnet, arrivals[1].request.subnet);
    let instances = s.compute.instances();
    assert_eq!(instances.len(), 1, "the token made the retry idempotent");
    assert_eq!(launched(&s.record()), Some(instances[0].id.as_str()));
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_launch_is_found_by_its_tags_before_any_new_launch() {
    let mut s = Scenario::new();
    s.compute.inject(LaunchFault::LostResponse(1));
    s.want(DesiredPhase::Running);
    s.pass().await.expect_err("the response was lost");
    let instance = s.compute.instances().remove(0);

    // A new process finds the intent without an instance id.
    s.restart();
    s.want(DesiredPhase::Running);
    assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.resync));
    assert_eq!(s.compute.calls("launch"), 1, "no second RunInstances");
    assert_eq!(s.compute.calls("find_launch"), 1);
    assert_eq!(launched(&s.record()), Some(instance.id.as_str()));
    assert_eq!(
        s.checkout.calls().last(),
        Some(&format!("bind {}", instance.id)),
        "the found instance gets the credential"
    );
    assert_eq!(s.status().machine.map(|m| m.id), Some(instance.id));
}

#[tokio::test(start_paused = true)]
async fn no_capacity_moves_the_next_attempt_to_another_zone_at_once() {
    let mut s = Scenario::new();
    let first = s.zone_of_attempt(1, &[]);
    s.compute.inject(LaunchFault::NoCapacity(first.clone()));
    s.want(DesiredPhase::Running);

    assert_eq!(s.ok().await, Action::Requeue(Duration::ZERO));
    let record = s.record();
    let intent = record.launch.clone().expect("intent");
    assert_eq!((intent.attempt, intent.state), (1, LaunchState::Failed));
    assert_eq!(record.exhausted_zones, std::slice::from_ref(&first));

    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    let arrivals = s.arrivals();
    assert_eq!(arrivals.len(), 2);
    let retry = &arrivals[1].request;
    assert_eq!(retry.attempt, 2);
    assert_eq!(retry.client_token, client_token(s.id, 2), "a new token");
    assert_ne!(retry.subnet.availability_zone, first, "another zone");
    let record = s.record();
    assert!(launched(&record).is_some());
    assert!(
        record.exhausted_zones.is_empty(),
        "a launch clears the exhausted zones"
    );
    assert_eq!(s.status().failure_message, "");
}

#[tokio::test(start_paused = true)]
async fn a_rejected_launch_is_retried_after_rejected_retry_as_a_new_attempt_in_another_zone() {
    let mut s = Scenario::new();
    let first = s.zone_of_attempt(1, &[]);
    s.compute.inject(LaunchFault::Rejected(first.clone()));
    s.want(DesiredPhase::Running);

    let action = s.ok().await;
    assert_eq!(action, Action::Requeue(SETTINGS.rejected_retry));
    let status = s.status();
    assert_eq!(status.phase, Phase::Creating);
    assert!(
        status
            .failure_message
            .starts_with("launch failed: InvalidParameterValue"),
        "{status:?}"
    );
    let record = s.record();
    let intent = record.launch.clone().expect("intent");
    assert_eq!((intent.attempt, intent.state), (1, LaunchState::Failed));
    assert!(
        record.exhausted_zones.is_empty(),
        "a rejection says nothing of the zone's capacity"
    );

    s.honour(action).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    let arrivals = s.arrivals();
    assert_eq!(arrivals.len(), 2);
    assert!(
        arrivals[1].at - arrivals[0].at >= SETTINGS.rejected_retry,
        "retried once the requeue was served: {arrivals:?}"
    );
    let retry = &arrivals[1].request;
    assert_eq!(retry.attempt, 2);
    assert_eq!(retry.client_token, client_token(s.id, 2));
    assert_ne!(retry.subnet.availability_zone, first, "another zone");
    assert!(launched(&s.record()).is_some());
    assert_eq!(s.status().failure_message, "", "the failure is cleared");
}

#[tokio::test(start_paused = true)]
async fn with_every_zone_out_of_capacity_the_status_says_so_until_capacity_retry() {
    let mut s = Scenario::new();
    for zone in ZONES {
        s.compute.inject(LaunchFault::NoCapacity(zone.to_owned()));
    }
    s.want(DesiredPhase::Running);

    let mut action = s.ok().await;
    let mut passes = 1;
    while action == Action::Requeue(Duration::ZERO) {
        assert!(passes < 10, "the attempts end");
        action = s.ok().await;
        passes += 1;
    }
    assert_eq!(action, Action::Requeue(SETTINGS.capacity_retry));
    let tried: Vec<String> = s
        .arrivals()
        .iter()
        .map(|a| a.request.subnet.availability_zone.clone())
        .collect();
    let mut distinct = tried.clone();
    distinct.sort();
    assert_eq!(distinct, ZONES, "each zone tried once: {tried:?}");
    assert_eq!(
        s.status().failure_message,
        format!(
            "no capacity for {INSTANCE_TYPE} in {}; retrying",
            tried.join(", ")
        )
    );
    let record = s.record();
    assert!(
        record.exhausted_zones.is_empty(),
        "the next round tries every zone again"
    );
    assert!(launched(&record).is_none());

    s.compute.clear_faults();
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    let arrivals = s.arrivals();
    let last = arrivals.last().expect("a launch");
    assert_eq!(last.request.attempt, 4);
    assert!(
        last.at - arrivals[2].at >= SETTINGS.capacity_retry,
        "the next round waited capacity_retry: {arrivals:?}"
    );
    assert!(launched(&s.record()).is_some());
    assert_eq!(s.status().failure_message, "");
}

#[tokio::test(start_paused = true)]
async fn stop_start_and_delete_drive_the_instance_and_end_with_the_record_removed() {
    let mut s = Scenario::new();
    s.want(DesiredPhase::Running);
    let action = s.ok().await;
    s.honour(action).await;
    assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.resync));
    let instance = s.compute.instances().remove(0).id;

    s.want(DesiredPhase::Stopped);
    let action = s.ok().await;
    assert_eq!(action, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.compute.calls("stop"), 1);
    assert_eq!(s.status().phase, Phase::Stopping);
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.resync));
    let status = s.status();
    assert_eq!(status.phase, Phase::Stopped);
    assert_eq!(
        status.machine.map(|m| m.state),
        Some(InstanceState::Stopped)
    );

    s.want(DesiredPhase::Running);
    let action = s.ok().await;
    assert_eq!(action, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.compute.calls("start"), 1);
    assert_eq!(s.status().phase, Phase::Starting);
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.resync));
    assert_eq!(s.status().phase, Phase::Running);

    s.want(DesiredPhase::Deleted);
    let action = s.ok().await;
    assert_eq!(action, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.compute.calls("terminate"), 1);
    assert_eq!(s.status().phase, Phase::Deleting);
    assert!(
        !s.checkout.calls().contains(&"remove".to_owned()),
        "the credential stays while the instance may still read it"
    );
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::AwaitChange);
    let status = s.status();
    assert_eq!(status.phase, Phase::Deleted);
    assert_eq!(status.machine, None);
    assert!(s.store.records().is_empty(), "the record is removed");
    assert_eq!(
        s.checkout.calls().last().map(String::as_str),
        Some("remove")
    );
    assert_eq!(
        s.compute
            .instances()
            .iter()
            .map(|i| (i.id.clone(), i.state))
            .collect::<Vec<_>>(),
        [(instance, InstanceState::Terminated)]
    );
    assert_eq!(s.compute.calls("launch"), 1, "one instance all along");
}

/// An invalid spec gets a status naming the problem and costs nothing: no
/// compute call, no write, no credential.
async fn refused(mut s: Scenario, change: impl FnOnce(&mut Spec), problem: &str) {
    s.edit(|spec| {
        spec.desired = Some(DesiredPhase::Running);
        change(spec);
    });
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.resync));
    let status = s.status();
    assert!(!status.spec_valid, "reported as INVALID_SPEC: {status:?}");
    assert_eq!(status.failure_message, problem);
    assert_eq!(status.phase, Phase::Creating);
    assert_eq!(status.machine, None);
    for call in [
        "launch",
        "find_launch",
        "observe",
        "offered_zones",
        "start",
        "stop",
        "terminate",
    ] {
        assert_eq!(s.compute.calls(call), 0, "{call}");
    }
    assert_eq!(s.store.writes(), 0, "nothing stored");
    assert!(s.checkout.calls().is_empty(), "no credential prepared");
}

#[tokio::test(start_paused = true)]
async fn a_branch_git_cannot_check_out_is_an_invalid_spec_without_side_effect() {
    refused(
        Scenario::new(),
        |spec| spec.revision = Revision::Branch("a..b".into()),
        "spec.content.branch: \"a..b\" is not a valid git branch name",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_class_is_an_invalid_spec_without_side_effect() {
    let unknown = "0c1a55e5-0000-4000-8000-0000000000ff";
    refused(
        Scenario::new(),
        |spec| spec.class_id = unknown.into(),
        &format!("environment class {unknown} does not exist"),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_class_of_a_type_the_runner_does_not_allow_is_an_invalid_spec_without_side_effect() {
    let mut s = Scenario::new();
    s.allowed = AllowedInstanceTypes::new("allowed", ["t3.medium"]).expect("a valid allowlist");
    s.restart();
    refused(
        s,
        |_| {},
        "environment_class.instance_type: m7i.large is not one of the instance types this runner allows (t3.medium)",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_environment_the_control_plane_has_not_described_is_left_alone_until_it_says_gone() {
    let mut s = Scenario::new();
    s.want(DesiredPhase::Running);
    s.ok().await;
    let writes = s.store.writes();

    // A new process before its first full sync: the store has the record,
    // the cloud the instance, and nothing is known of the environment.
    s.restart();
    assert_eq!(s.ok().await, Action::AwaitChange);
    assert_eq!(s.compute.calls("terminate"), 0, "unknown is not gone");
    assert_eq!(s.compute.calls("launch"), 1);
    assert_eq!(s.store.writes(), writes);
    assert_eq!(s.outbox.last(s.id), None, "no status");

    // The control plane said NOT_FOUND on a direct lookup.
    s.desired.mark_gone(s.id);
    let action = s.ok().await;
    assert_eq!(action, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.compute.calls("terminate"), 1);
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::AwaitChange);
    assert!(s.store.records().is_empty(), "the record is removed");
    assert_eq!(s.desired.get(s.id), None, "and the environment forgotten");
}

#[tokio::test(start_paused = true)]
async fn a_fenced_store_is_a_final_error_and_nothing_is_launched() {
    let mut s = Scenario::new();
    s.store.set_fenced(true);
    s.want(DesiredPhase::Running);

    let err = s.pass().await.expect_err("fenced");
    assert!(
        matches!(err, ReconcileError::Store(StoreError::Fenced)),
        "{err:?}"
    );
    assert!(!err.is_retryable(), "a lost lease is final");
    assert_eq!(err.metric_label(), "fenced");
    assert_eq!(
        s.compute.calls("launch"),
        0,
        "no RunInstances without a stored intent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_is_a_transient_error_and_the_launch_waits_for_the_store() {
    let mut s = Scenario::new();
    s.store.set_down(true);
    s.want(DesiredPhase::Running);

    let err = s.pass().await.expect_err("the store is down");
    assert!(
        matches!(err, ReconcileError::Store(StoreError::Unavailable(_))),
        "{err:?}"
    );
    assert!(err.is_retryable(), "an outage is retried");
    assert_eq!(err.metric_label(), "store_unavailable");
    assert_eq!(s.compute.calls("launch"), 0);

    s.store.set_down(false);
    tokio::time::sleep(SETTINGS.poll).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.compute.calls("launch"), 1);
    assert!(launched(&s.record()).is_some());
}

/// A control plane that lists nothing, knows at most `known`, never answers
/// about `stuck`, and notes every environment fetched.
#[derive(Default)]
struct Plane {
    stuck: Option<EnvironmentId>,
    known: Option<Environment>,
    fetched: Mutex<Vec<EnvironmentId>>,
}

#[async_trait]
impl ControlPlane for Plane {
    async fn list_environments(&self) -> Result<Vec<Environment>, ControlPlaneError> {
        Ok(Vec::new())
    }
    async fn get_environment(
        &self,
        id: EnvironmentId,
    ) -> Result<Option<Environment>, ControlPlaneError> {
        self.fetched.lock().expect("lock").push(id);
        if self.stuck == Some(id) {
            std::future::pending::<()>().await;
        }
        Ok(self.known.clone().filter(|k| k.id == id))
    }
    async fn list_classes(&self) -> Result<Vec<EnvironmentClass>, ControlPlaneError> {
        Ok(Vec::new())
    }
    async fn update_status(
        &self,
        _: EnvironmentId,
        _: u64,
        _: &Status,
    ) -> Result<(), ControlPlaneError> {
        unreachable!("the informer sends no status")
    }
}

/// A running informer over `ctx` and `plane`, past its first full sync.
struct RunningInformer {
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningInformer {
    async fn start(ctx: Context, plane: Arc<Plane>, grace: Duration) -> Self {
        let controller = Controller::new(
            Arc::new(ctx),
            Arc::new(Leadership::always()),
            Arc::new(()),
            4,
            Duration::from_secs(1),
        );
        let informer = controller.informer(
            plane,
            Duration::from_secs(24 * 3600),
            OrphanPolicy {
                grace,
                max_per_pass: 10,
            },
        );
        let (events, events_rx) = mpsc::channel(4);
        let (synced, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(informer.run(events_rx, synced.clone(), shutdown.clone()));
        // The first full sync of the control plane ends before `synced`;
        // the describe and orphan pass follow in the background.
        tokio::time::timeout(PASS_TIMEOUT, synced.cancelled())
            .await
            .expect("a first full sync");
        Self {
            events,
            shutdown,
            task,
        }
    }

    async fn send(&self, event: Event) {
        self.events.send(event).await.expect("the informer listens");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("the informer ends");
    }
}

/// The informer's orphan sweep runs on the context's clock: a stray instance
/// is marked with that clock's time, and terminated at the first full sync
/// after that clock has passed the grace period (the wall clock has not).
#[tokio::test(start_paused = true)]
async fn the_orphan_sweep_marks_and_terminates_by_the_contexts_clock() {
    let s = Scenario::new();
    let stranger = EnvironmentId(uuid::Uuid::from_u128(0x0dd));
    let stray = s
        .compute
        .launch(&LaunchRequest {
            environment: stranger,
            attempt: 1,
            client_token: client_token(stranger, 1),
            subnet: subnets().remove(0),
            instance_type: INSTANCE_TYPE.to_owned(),
            disk_gib: 50,
            repository_url: s.spec.repository_url.clone(),
            revision: Revision::Default,
            checkout_secret: None,
        })
        .await
        .expect("a stray instance");
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(4_000_000_000));
    let (_, _, ctx) = Scenario::context(
        &s.store,
        &s.compute,
        &s.checkout,
        &s.class,
        &s.allowed,
        &s.clock,
    );
    let grace = Duration::from_secs(1800);
    let informer = RunningInformer::start(
        ctx.with_clock(Arc::new(clock.clone())),
        Arc::new(Plane::default()),
        grace,
    )
    .await;
    // The orphan pass follows the sync's describe, in the background.
    tokio::time::timeout(PASS_TIMEOUT, async {
        while s.compute.instances()[0].quarantined_at.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the stray is marked");
    let marked = s.compute.instances().remove(0);
    assert_eq!(marked.id, stray.id);
    assert_eq!(
        marked.quarantined_at,
        Some(clock.now()),
        "marked at the clock's time"
    );
    assert_eq!(s.compute.calls("terminate"), 0);

    clock.advance(grace);
    informer.send(Event::Connected).await;
    tokio::time::timeout(PASS_TIMEOUT, async {
        while s.compute.calls("terminate") == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("terminated once the clock passed the grace period");
    informer.stop().await;
}

/// A watch event never waits for another environment's fetch: with the
/// control plane's answer about one environment hanging, the next event's
/// environment is fetched and known at once.
#[tokio::test(start_paused = true)]
async fn a_hanging_fetch_delays_only_its_own_environment() {
    let s = Scenario::new();
    let stuck = EnvironmentId(uuid::Uuid::from_u128(0x51));
    let known = Environment {
        id: EnvironmentId(uuid::Uuid::from_u128(0x52)),
        spec: s.spec.clone(),
        accepted_status_version: 0,
    };
    let plane = Arc::new(Plane {
        stuck: Some(stuck),
        known: Some(known.clone()),
        ..Plane::default()
    });
    let (desired, _, ctx) = Scenario::context(
        &s.store,
        &s.compute,
        &s.checkout,
        &s.class,
        &s.allowed,
        &s.clock,
    );
    let informer = RunningInformer::start(ctx, plane.clone(), Duration::from_secs(1800)).await;
    for id in [stuck, stuck, known.id] {
        informer.send(Event::EnvironmentChanged(id)).await;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while desired.get(known.id).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the second environment is known while the first one's fetch hangs");
    assert_eq!(
        plane
            .fetched
            .lock()
            .expect("lock")
            .iter()
            .filter(|id| **id == stuck)
            .count(),
        1,
        "a second event during a fetch does not fetch twice at once"
    );
    informer.stop().await;
}

/// Before a term's first full describe ends, a new environment launches and
/// a known one is looked up by id and reported; only a deletion, which must
/// see that no instance is left, waits for the full view.
#[tokio::test(start_paused = true)]
async fn before_the_first_full_describe_only_a_deletion_waits_for_it() {
    let mut s = Scenario::new();
    s.compute.hold_full_describes(true);
    s.want(DesiredPhase::Running);
    let action = s.ok().await;
    assert_eq!(
        s.compute.calls("launch"),
        1,
        "launched without the full view"
    );
    s.honour(action).await;
    assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.resync));
    assert_eq!(s.status().phase, Phase::Running);

    // A new process: its instance is looked up by id.
    s.restart();
    s.want(DesiredPhase::Running);
    let by_id = s.compute.calls("observe_ids");
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.resync));
    assert!(s.compute.calls("observe_ids") > by_id, "looked up by id");
    assert_eq!(s.status().phase, Phase::Running);
    assert_eq!(s.compute.calls("observe"), 0, "no full describe ended");

    s.want(DesiredPhase::Deleted);
    let deletion = reconcile(&s.ctx, s.id);
    tokio::pin!(deletion);
    let waited = tokio::time::timeout(Duration::from_secs(600), &mut deletion).await;
    assert!(waited.is_err(), "the deletion waits for the full view");
    assert_eq!(s.compute.calls("terminate"), 0);
    assert_eq!(s.compute.calls("observe_started"), 1, "one full describe");
    s.compute.hold_full_describes(false);
    let action = tokio::time::timeout(PASS_TIMEOUT, deletion)
        .await
        .expect("the deletion goes on")
        .expect("the pass succeeds");
    assert_eq!(action, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.compute.calls("terminate"), 1);
}

/// The scenario's one instance, as the fake cloud holds it.
fn the_instance(s: &Scenario) -> String {
    s.compute.instances()[0].id.clone()
}

#[tokio::test(start_paused = true)]
async fn an_environment_is_starting_until_its_instance_reports_its_content_ready() {
    let mut s = Scenario::new();
    s.compute.set_bootstrap(FakeBootstrap::Silent);
    s.want(DesiredPhase::Running);
    let action = s.ok().await;
    s.honour(action).await;
    // EC2 runs the instance; it has reported nothing: STARTING, looked at
    // again after the poll interval.
    assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.poll));
    let status = s.status();
    assert_eq!(status.phase, Phase::Starting);
    assert_eq!(status.content, Content::default());
    assert_eq!(status.failure_message, "");

    let id = the_instance(&s);
    let started = std::time::SystemTime::now();
    s.compute.set_report(
        &id,
        Report {
            stage: Some(Stage::Clone),
            started_at: Some(started),
            at: Some(started),
            ..Report::default()
        },
    );
    // A pass reads the view and asks for a lookup; the next reads its answer.
    let action = s.ok().await;
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    assert_eq!(
        (s.status().phase, s.status().content.stage),
        (Phase::Starting, Some(Stage::Clone))
    );

    let commit = "0123456789abcdef0123456789abcdef01234567".to_owned();
    let ready_at = started + Duration::from_secs(25);
    s.compute.set_report(
        &id,
        Report {
            stage: Some(Stage::Ready),
            started_at: Some(started),
            at: Some(ready_at),
            commit: Some(commit.clone()),
            ..Report::default()
        },
    );
    let action = s.ok().await;
    assert_eq!(s.status().phase, Phase::Starting, "the lookup not read yet");
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.resync));
    let status = s.status();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.content.stage, Some(Stage::Ready));
    assert_eq!(status.content.commit, Some(commit));
    assert_eq!(status.content.ready_at, Some(ready_at));
    assert_eq!(
        status.content.timings.running_to_ready,
        Some(Duration::from_secs(25))
    );
    assert!(status.content.timings.launch_to_ready.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_reported_failure_names_its_stage_and_the_console_is_read_once() {
    let mut s = Scenario::new();
    s.compute.set_bootstrap(FakeBootstrap::Fails(
        Stage::Checkout,
        "git checkout 0123 failed: fatal: reference is not a tree".into(),
    ));
    s.want(DesiredPhase::Running);
    let action = s.ok().await;
    s.honour(action).await;
    for _ in 0..2 {
        assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.resync));
        let status = s.status();
        assert_eq!(status.phase, Phase::Starting);
        assert_eq!(status.content.stage, Some(Stage::Checkout));
        assert_eq!(
            status.failure_message,
            "the environment's content is not ready: checkout failed at stage checkout: git checkout 0123 failed: fatal: reference is not a tree"
        );
    }
    assert_eq!(
        s.compute.calls("console_output"),
        1,
        "read once, on the failure"
    );
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_reports_nothing_fails_at_the_deadline() {
    let mut s = Scenario::silent_and_starting().await;
    s.clock
        .advance(SETTINGS.content_deadline - Duration::from_secs(5));
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.status().failure_message, "", "not yet");
    s.clock.advance(Duration::from_secs(6));
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.resync));
    let status = s.status();
    assert_eq!(status.phase, Phase::Starting);
    assert_eq!(
        status.failure_message,
        "the environment's content is not ready: no report of it within 10m of the instance's start (the instance reported nothing)"
    );
    // A restarted runner reads the same from the instance, not from memory.
    s.restart();
    s.desired.upsert(Environment {
        id: s.id,
        spec: s.spec.clone(),
        accepted_status_version: 0,
    });
    s.ok().await;
    assert_eq!(s.status().failure_message, status.failure_message);
}

#[tokio::test(start_paused = true)]
async fn an_environment_idle_for_its_timeout_is_stopped_and_stays_stopped_until_started() {
    let mut s = Scenario::new();
    s.edit(|spec| {
        spec.desired = Some(DesiredPhase::Running);
        spec.disconnected_timeout = Some(Duration::from_secs(60));
    });
    let action = s.ok().await;
    s.honour(action).await;
    assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.resync));
    assert_eq!(s.status().phase, Phase::Running);
    let id = the_instance(&s);
    let mut report = s.compute.instances()[0].report.clone();
    report.idle_since = Some(s.clock.now());
    s.compute.set_report(&id, report);
    // A RUNNING instance's report is read on the resync's full describe.
    s.ctx
        .observer
        .refresh()
        .await
        .expect("the resync's describe");
    s.clock.advance(Duration::from_secs(59));
    s.ok().await;
    assert_eq!(s.status().phase, Phase::Running, "idle for less than 60 s");
    assert_eq!(s.compute.calls("stop"), 0);

    // (The fake's launch time is the real clock's, a little after this one's start.)
    s.clock.advance(Duration::from_secs(2));
    s.ok().await;
    assert_eq!(s.compute.calls("stop"), 1);
    let status = s.status();
    assert_eq!(
        (status.phase, status.stop_reason),
        (Phase::Stopping, Some(StopReason::DisconnectedTimeout))
    );
    assert_eq!(s.record().idle_stopped_at_spec, Some(s.spec.spec_version));
    // Still RUNNING desired at that spec: it stays stopped (a restart too).
    s.restart();
    s.desired.upsert(Environment {
        id: s.id,
        spec: s.spec.clone(),
        accepted_status_version: 0,
    });
    for _ in 0..2 {
        let action = s.ok().await;
        s.honour(action).await;
    }
    assert_eq!(
        (s.status().phase, s.status().stop_reason),
        (Phase::Stopped, Some(StopReason::DisconnectedTimeout))
    );
    assert_eq!(s.compute.calls("start"), 0);
    // The control plane's STOPPED keeps the reason; a new start starts.
    s.want(DesiredPhase::Stopped);
    s.ok().await;
    assert_eq!(
        s.status().stop_reason,
        Some(StopReason::DisconnectedTimeout)
    );
    s.want(DesiredPhase::Running);
    s.ok().await;
    assert_eq!(s.compute.calls("start"), 1);
    assert_eq!(s.record().idle_stopped_at_spec, None);
}

#[tokio::test(start_paused = true)]
async fn a_start_after_a_stop_is_running_at_once_without_the_first_boots_timings() {
    let mut s = Scenario::new();
    s.want(DesiredPhase::Running);
    let action = s.ok().await;
    s.honour(action).await;
    s.past_creating().await;
    let first = s.status();
    assert_eq!(first.phase, Phase::Running);
    let id = the_instance(&s);
    // The first boot's report, as the bootstrap left it: ready a minute
    // before this start (the bootstrap does not run again).
    let boot = std::time::SystemTime::now() - Duration::from_secs(120);
    s.compute.set_report(
        &id,
        Report {
            stage: Some(Stage::Ready),
            started_at: Some(boot),
            at: Some(boot + Duration::from_secs(60)),
            commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            ..Report::default()
        },
    );
    s.want(DesiredPhase::Stopped);
    for _ in 0..2 {
        let action = s.ok().await;
        s.honour(action).await;
    }
    assert_eq!(s.status().phase, Phase::Stopped);
    s.want(DesiredPhase::Running);
    for _ in 0..3 {
        let action = s.ok().await;
        s.honour(action).await;
    }
    let status = s.status();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.content.stage, Some(Stage::Ready));
    assert_eq!(status.content.timings, Timings::default());
}

/// Runs passes, honouring each requeue, until one waits for the resync or
/// a change (settled) or `most` passes ran; the phases published, in order.
async fn settle_within(s: &Scenario, most: usize) -> Vec<Phase> {
    let mut phases = Vec::new();
    for _ in 0..most {
        let action = s.ok().await;
        let phase = s.status().phase;
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
        if matches!(action, Action::AwaitChange) || action == Action::Requeue(SETTINGS.resync) {
            return phases;
        }
        s.honour(action).await;
    }
    panic!("not settled within {most} passes: {phases:?}");
}

/// EC2's transitions take seconds: an environment watching one (pending,
/// stopping, shutting down) looks its instance up by id every poll, in the
/// background, and settles without any full describe.
#[tokio::test(start_paused = true)]
async fn transitions_that_take_several_describes_end_by_lookups_by_id() {
    let mut s = Scenario::new();
    s.compute.set_transition_looks(4);
    s.want(DesiredPhase::Running);
    let phases = settle_within(&s, 12).await;
    assert_eq!(phases.first(), Some(&Phase::Creating), "{phases:?}");
    assert_eq!(phases.last(), Some(&Phase::Running), "{phases:?}");

    s.want(DesiredPhase::Stopped);
    let phases = settle_within(&s, 12).await;
    assert_eq!(phases, [Phase::Stopping, Phase::Stopped]);

    s.want(DesiredPhase::Running);
    let phases = settle_within(&s, 12).await;
    assert_eq!(phases, [Phase::Starting, Phase::Running]);

    assert_eq!(s.compute.calls("observe"), 0, "no full describe");

    // A deletion ends in "no instance left": it waits for the term's first
    // full view, then for the shutdown by id.
    s.want(DesiredPhase::Deleted);
    let phases = settle_within(&s, 12).await;
    assert_eq!(phases, [Phase::Deleting, Phase::Deleted]);
    assert!(s.store.records().is_empty(), "the record is removed");
    assert_eq!(s.compute.calls("observe"), 1, "the term's first full view");
    assert_eq!(s.compute.calls("launch"), 1, "one instance all along");
}

/// A pass watching for the instance's report does not wait for the lookup
/// it asks for (a worker held for a batch's window would starve the other
/// environments): with every lookup by id held, passes still return, and
/// the pending lookup is not asked for again.
#[tokio::test(start_paused = true)]
async fn a_pass_waiting_for_a_report_does_not_wait_for_its_lookup() {
    let s = Scenario::silent_and_starting().await;

    s.compute.hold_lookups(true);
    let asked = s.compute.calls("observe_ids_started");
    for _ in 0..3 {
        // `ok` fails the test if the pass does not return in time.
        let action = s.ok().await;
        assert_eq!(action, Action::Requeue(SETTINGS.poll));
        assert_eq!(s.status().phase, Phase::Starting);
        s.honour(action).await;
    }
    assert_eq!(
        s.compute.calls("observe_ids_started") - asked,
        1,
        "one lookup, still held, asked for once"
    );
    s.compute.hold_lookups(false);
}

/// The pass after a launch decides on the launch's answer (the instance
/// pending) and asks for a lookup without waiting for it: a worker is not
/// held for a batch's window after every launch.
#[tokio::test(start_paused = true)]
async fn the_pass_after_a_launch_does_not_wait_for_a_lookup() {
    let mut s = Scenario::new();
    s.want(DesiredPhase::Running);
    let action = s.ok().await;
    s.compute.hold_lookups(true);
    s.honour(action).await;
    assert_eq!(s.ok().await, Action::Requeue(SETTINGS.poll));
    assert_eq!(s.status().phase, Phase::Creating);
    s.compute.hold_lookups(false);
    assert_eq!(s.past_creating().await, Action::Requeue(SETTINGS.resync));
    assert_eq!(s.status().phase, Phase::Running);
}
