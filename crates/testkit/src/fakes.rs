//! In-memory implementations of the core traits, with the knobs tests need:
//! outages, capacity errors, lost responses, and a record of every call.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use runner_core::model::{EnvironmentId, Instance, InstanceState, Record, Subnet};
use runner_core::report::{Report, Stage};
use runner_core::scm::TokenKey;
use runner_core::traits::{
    Compute, ComputeError, Credentials, EnvironmentSecrets, HostToken, LaunchRequest, SecretError,
    SecretStore, StateStore, StoreError, StoredToken, TokenEntry, TokenStore, TokenStoreError,
};
use secrecy::SecretString;

fn outage() -> runner_core::traits::BoxError {
    "injected outage".into()
}

/// A state store in memory; every write is conditional on the version.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<EnvironmentId, Record>>,
    down: AtomicBool,
    fenced: AtomicBool,
    writes: AtomicU64,
    list_held: Gate,
}

impl MemoryStore {
    /// Makes every call fail (or work again).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Makes every write fail as [`StoreError::Fenced`], as for a replica
    /// that lost its lease (or lifts that); reads still work.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::SeqCst);
    }

    /// Holds every `list` until released (`false`), as listing a large
    /// table takes long.
    pub fn hold_lists(&self, held: bool) {
        self.list_held.hold(held);
    }

    /// Every record stored now.
    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }

    /// How many writes (puts and deletes) succeeded.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn up(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(outage()));
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), StoreError> {
        self.up()?;
        if self.fenced.load(Ordering::SeqCst) {
            return Err(StoreError::Fenced);
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn list(&self) -> Result<Vec<Record>, StoreError> {
        self.list_held.pass().await;
        self.up()?;
        Ok(self.records())
    }

    async fn get(&self, environment: EnvironmentId) -> Result<Option<Record>, StoreError> {
        self.up()?;
        Ok(self
            .records
            .lock()
            .expect("lock")
            .get(&environment)
            .cloned())
    }

    async fn put(&self, record: &Record) -> Result<Record, StoreError> {
        self.writable()?;
        let mut records = self.records.lock().expect("lock");
        let stored = records.get(&record.environment).map_or(0, |r| r.version);
        if stored != record.version {
            return Err(StoreError::Conflict(record.environment));
        }
        let mut saved = record.clone();
        saved.version += 1;
        records.insert(saved.environment, saved.clone());
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(saved)
    }

    async fn delete(&self, record: &Record) -> Result<(), StoreError> {
        self.writable()?;
        let mut records = self.records.lock().expect("lock");
        let stored = records.get(&record.environment).map_or(0, |r| r.version);
        if stored != record.version {
            return Err(StoreError::Conflict(record.environment));
        }
        records.remove(&record.environment);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.up()
    }
}

/// A fault to inject into the next launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchFault {
    /// Answer "no capacity" for launches into this zone.
    NoCapacity(String),
    /// Fail the next `n` launches as unavailable, without launching.
    Unavailable(u32),
    /// Launch, then fail as if the response was lost, `n` times.
    LostResponse(u32),
    /// Refuse launches into this zone as the request stands
    /// ([`ComputeError::Rejected`]: bad parameters, a missing permission).
    Rejected(String),
    /// The next `n` `find_launch` calls miss every instance, as EC2's tag
    /// index may lag a launch.
    LookupLag(u32),
}

#[derive(Debug, Default)]
struct Cloud {
    next_id: u64,
    instances: BTreeMap<String, Instance>,
    calls: HashMap<&'static str, u64>,
    faults: Vec<LaunchFault>,
    /// Client tokens seen, as EC2 keeps them per zone: token → instance.
    tokens: HashMap<(String, String), String>,
    /// Every launch request received.
    requests: Vec<LaunchRequest>,
    /// Instance ids asked for by `observe_ids`, in all.
    observed_ids: u64,
    /// What instances report once they run for the first time.
    bootstrap: FakeBootstrap,
    /// Describes that show an instance in transition before it finishes
    /// (0 and 1: the first); `looks` counts them per instance.
    transition_looks: u32,
    looks: HashMap<String, u32>,
}

/// What a fake instance's bootstrap reports (in its tags, on a real cloud)
/// once the instance first runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FakeBootstrap {
    /// Its content is ready at once, at a commit derived from its id.
    #[default]
    Ready,
    /// Nothing, ever.
    Silent,
    /// The stage failed, for the reason given.
    Fails(Stage, String),
}

impl Cloud {
    /// What was in transition has finished by the time it is described
    /// (only the instances asked for, when `ids` is given).
    fn settle(&mut self, ids: Option<&[String]>) {
        for instance in self.instances.values_mut() {
            if ids.is_some_and(|ids| !ids.contains(&instance.id)) {
                continue;
            }
            let in_transition = matches!(
                instance.state,
                InstanceState::Pending | InstanceState::Stopping | InstanceState::ShuttingDown
            );
            if in_transition {
                let looks = self.looks.entry(instance.id.clone()).or_insert(0);
                *looks += 1;
                if *looks < self.transition_looks {
                    continue;
                }
                self.looks.remove(&instance.id);
            }
            if instance.state == InstanceState::Pending && instance.report == Report::default() {
                let now = SystemTime::now();
                instance.report = match &self.bootstrap {
                    FakeBootstrap::Ready => Report {
                        stage: Some(Stage::Ready),
                        at: Some(now),
                        started_at: Some(now),
                        commit: Some(format!("{:0>40}", instance.id.trim_start_matches("i-"))),
                        ..Report::default()
                    },
                    FakeBootstrap::Silent => Report::default(),
                    FakeBootstrap::Fails(stage, detail) => Report {
                        stage: Some(*stage),
                        failed: true,
                        detail: detail.clone(),
                        at: Some(now),
                        started_at: Some(now),
                        ..Report::default()
                    },
                };
            }
            instance.state = match instance.state {
                InstanceState::Pending => InstanceState::Running,
                InstanceState::Stopping => InstanceState::Stopped,
                InstanceState::ShuttingDown => InstanceState::Terminated,
                other => other,
            };
        }
    }
}

/// Called with every launch request as it arrives.
type LaunchHook = Box<dyn Fn(&LaunchRequest) + Send + Sync>;

#[derive(Default)]
struct Hook(Option<LaunchHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hook(..)"
        } else {
            "Hook(None)"
        })
    }
}

/// A cloud in memory. State changes complete on the next `observe`, as a
/// real describe would eventually show them.
#[derive(Debug, Default)]
pub struct MemoryCompute {
    cloud: Mutex<Cloud>,
    down: AtomicBool,
    zones: Mutex<Vec<String>>,
    on_launch: Mutex<Hook>,
    latency: Mutex<Duration>,
    /// While `true`, full describes (`observe`) wait, as a describe of a
    /// large fleet takes long.
    full_held: Gate,
    subnets_held: Gate,
    lookups_held: Gate,
}

/// A gate calls wait at while it is closed.
#[derive(Debug)]
struct Gate(tokio::sync::watch::Sender<bool>);

impl Default for Gate {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }
}

impl Gate {
    fn hold(&self, held: bool) {
        self.0.send_replace(held);
    }

    /// Waits while the gate is closed.
    async fn pass(&self) {
        let mut held = self.0.subscribe();
        // The sender lives as long as `self`.
        let _ = held.wait_for(|held| !held).await;
    }
}

impl MemoryCompute {
    /// A cloud whose zones (for `offered_zones`) are `zones`.
    pub fn with_zones(zones: &[&str]) -> Self {
        let compute = Self::default();
        *compute.zones.lock().expect("lock") = zones.iter().map(|z| (*z).to_owned()).collect();
        compute
    }

    /// Makes every call fail (or work again).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Adds a fault.
    pub fn inject(&self, fault: LaunchFault) {
        self.cloud.lock().expect("lock").faults.push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.cloud.lock().expect("lock").faults.clear();
    }

    /// Makes every call take `latency` (tokio time, so virtual in a paused
    /// test) before it is answered, as a real cloud's calls take time.
    pub fn set_latency(&self, latency: Duration) {
        *self.latency.lock().expect("lock") = latency;
    }

    /// Makes each state transition finish only on the `looks`-th describe
    /// that shows the instance (1: the first), as EC2's take seconds.
    pub fn set_transition_looks(&self, looks: u32) {
        self.cloud.lock().expect("lock").transition_looks = looks;
    }

    /// Holds every full describe (`observe`) until released (`false`);
    /// lookups by id still answer.
    pub fn hold_full_describes(&self, held: bool) {
        self.full_held.hold(held);
    }

    /// Holds every subnets lookup until released (`false`).
    pub fn hold_subnets(&self, held: bool) {
        self.subnets_held.hold(held);
    }

    /// Holds every lookup by id (`observe_ids`) until released (`false`).
    pub fn hold_lookups(&self, held: bool) {
        self.lookups_held.hold(held);
    }

    async fn answer_after_latency(&self) {
        let latency = *self.latency.lock().expect("lock");
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// Calls `hook` with every launch request as it arrives, before the
    /// launch is decided (to look at what the caller stored before it).
    pub fn on_launch(&self, hook: impl Fn(&LaunchRequest) + Send + Sync + 'static) {
        self.on_launch.lock().expect("lock").0 = Some(Box::new(hook));
    }

    /// Every launch request received, in order.
    pub fn launch_requests(&self) -> Vec<LaunchRequest> {
        self.cloud.lock().expect("lock").requests.clone()
    }

    /// Every instance ever launched, terminated ones included.
    pub fn instances(&self) -> Vec<Instance> {
        self.cloud
            .lock()
            .expect("lock")
            .instances
            .values()
            .cloned()
            .collect()
    }

    /// Instance ids asked for by `observe_ids`, in all.
    pub fn observed_ids(&self) -> u64 {
        self.cloud.lock().expect("lock").observed_ids
    }

    /// How often `operation` was called.
    pub fn calls(&self, operation: &str) -> u64 {
        self.cloud
            .lock()
            .expect("lock")
            .calls
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// What instances launched from now on report once they first run.
    pub fn set_bootstrap(&self, bootstrap: FakeBootstrap) {
        self.cloud.lock().expect("lock").bootstrap = bootstrap;
    }

    /// Sets what an instance reports, as its bootstrap would.
    pub fn set_report(&self, instance_id: &str, report: Report) {
        self.change(instance_id, |i| i.report = report);
    }

    /// Changes an instance in place, if the cloud holds it.
    fn change(&self, instance_id: &str, change: impl FnOnce(&mut Instance)) {
        if let Some(i) = self
            .cloud
            .lock()
            .expect("lock")
            .instances
            .get_mut(instance_id)
        {
            change(i);
        }
    }

    /// Sets an instance's state, as someone outside the runner might.
    pub fn set_state(&self, instance_id: &str, state: InstanceState) {
        self.change(instance_id, |i| i.state = state);
    }

    /// Counts a call that has begun (before any gate or latency).
    fn count(&self, operation: &'static str) {
        *self
            .cloud
            .lock()
            .expect("lock")
            .calls
            .entry(operation)
            .or_insert(0) += 1;
    }

    fn enter(
        &self,
        operation: &'static str,
    ) -> Result<std::sync::MutexGuard<'_, Cloud>, ComputeError> {
        let mut cloud = self.cloud.lock().expect("lock");
        *cloud.calls.entry(operation).or_insert(0) += 1;
        if self.down.load(Ordering::SeqCst) {
            return Err(ComputeError::Unavailable(outage()));
        }
        Ok(cloud)
    }

    fn transition(
        cloud: &mut Cloud,
        instance_id: &str,
        allowed: &[InstanceState],
        to: InstanceState,
    ) -> Result<(), ComputeError> {
        let instance = cloud.instances.get_mut(instance_id).ok_or_else(|| {
            ComputeError::Rejected(format!("instance {instance_id} does not exist"))
        })?;
        if instance.state == to {
            return Ok(());
        }
        if !allowed.contains(&instance.state) {
            return Err(ComputeError::Rejected(format!(
                "instance {instance_id} is {:?}, cannot go to {to:?}",
                instance.state
            )));
        }
        instance.state = to;
        Ok(())
    }
}

#[async_trait]
impl Compute for MemoryCompute {
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, ComputeError> {
        if let Some(hook) = &self.on_launch.lock().expect("lock").0 {
            hook(request);
        }
        self.answer_after_latency().await;
        let mut cloud = self.enter("launch")?;
        cloud.requests.push(request.clone());
        let zone = request.subnet.availability_zone.clone();
        if cloud
            .faults
            .contains(&LaunchFault::NoCapacity(zone.clone()))
        {
            return Err(ComputeError::NoCapacity {
                zone,
                message: "InsufficientInstanceCapacity (injected)".into(),
            });
        }
        if cloud.faults.contains(&LaunchFault::Rejected(zone.clone())) {
            return Err(ComputeError::Rejected(format!(
                "InvalidParameterValue: launches into {zone} are refused (injected)"
            )));
        }
        if let Some(pos) = cloud
            .faults
            .iter()
            .position(|f| matches!(f, LaunchFault::Unavailable(_)))
        {
            if let LaunchFault::Unavailable(n) = &mut cloud.faults[pos] {
                *n -= 1;
                if *n == 0 {
                    cloud.faults.remove(pos);
                }
            }
            return Err(ComputeError::Unavailable(outage()));
        }
        // Idempotent per zone on the client token, as EC2 is.
        let key = (zone.clone(), request.client_token.clone());
        let instance = if let Some(existing) = cloud.tokens.get(&key).cloned() {
            cloud.instances[&existing].clone()
        } else {
            cloud.next_id += 1;
            let instance = Instance {
                id: format!("i-{:017x}", cloud.next_id),
                environment: request.environment,
                attempt: request.attempt,
                availability_zone: zone,
                subnet_id: request.subnet.id.clone(),
                private_ip: Some(format!(
                    "10.0.{}.{}",
                    cloud.next_id / 250,
                    cloud.next_id % 250 + 2
                )),
                state: InstanceState::Pending,
                quarantined_at: None,
                launched_at: Some(SystemTime::now()),
                report: Report::default(),
            };
            cloud.tokens.insert(key, instance.id.clone());
            cloud
                .instances
                .insert(instance.id.clone(), instance.clone());
            instance
        };
        if let Some(pos) = cloud
            .faults
            .iter()
            .position(|f| matches!(f, LaunchFault::LostResponse(_)))
        {
            if let LaunchFault::LostResponse(n) = &mut cloud.faults[pos] {
                *n -= 1;
                if *n == 0 {
                    cloud.faults.remove(pos);
                }
            }
            return Err(ComputeError::Unavailable("response lost (injected)".into()));
        }
        Ok(instance)
    }

    async fn find_launch(
        &self,
        environment: EnvironmentId,
        attempt: u32,
    ) -> Result<Option<Instance>, ComputeError> {
        self.answer_after_latency().await;
        let mut cloud = self.enter("find_launch")?;
        if let Some(pos) = cloud
            .faults
            .iter()
            .position(|f| matches!(f, LaunchFault::LookupLag(_)))
        {
            if let LaunchFault::LookupLag(n) = &mut cloud.faults[pos] {
                *n -= 1;
                if *n == 0 {
                    cloud.faults.remove(pos);
                }
            }
            return Ok(None);
        }
        Ok(cloud
            .instances
            .values()
            .find(|i| {
                i.environment == environment
                    && i.attempt == attempt
                    && i.state != InstanceState::Terminated
            })
            .cloned())
    }

    async fn observe(&self) -> Result<Vec<Instance>, ComputeError> {
        self.count("observe_started");
        self.full_held.pass().await;
        self.answer_after_latency().await;
        let mut cloud = self.enter("observe")?;
        cloud.settle(None);
        Ok(cloud.instances.values().cloned().collect())
    }

    async fn observe_ids(&self, instance_ids: &[String]) -> Result<Vec<Instance>, ComputeError> {
        self.count("observe_ids_started");
        self.lookups_held.pass().await;
        self.answer_after_latency().await;
        let mut cloud = self.enter("observe_ids")?;
        cloud.observed_ids += instance_ids.len() as u64;
        cloud.settle(Some(instance_ids));
        Ok(instance_ids
            .iter()
            .filter_map(|id| cloud.instances.get(id).cloned())
            .collect())
    }

    async fn start(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.answer_after_latency().await;
        let mut cloud = self.enter("start")?;
        Self::transition(
            &mut cloud,
            instance_id,
            &[InstanceState::Stopped],
            InstanceState::Pending,
        )?;
        // EC2's launch time is that of the last start.
        if let Some(i) = cloud.instances.get_mut(instance_id) {
            i.launched_at = Some(SystemTime::now());
        }
        Ok(())
    }

    async fn stop(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.answer_after_latency().await;
        let mut cloud = self.enter("stop")?;
        Self::transition(
            &mut cloud,
            instance_id,
            &[InstanceState::Running],
            InstanceState::Stopping,
        )
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.answer_after_latency().await;
        let mut cloud = self.enter("terminate")?;
        let Some(instance) = cloud.instances.get_mut(instance_id) else {
            return Err(ComputeError::Rejected(format!(
                "instance {instance_id} does not exist"
            )));
        };
        if instance.state != InstanceState::Terminated {
            instance.state = InstanceState::ShuttingDown;
        }
        Ok(())
    }

    async fn quarantine(&self, instance_id: &str, at: SystemTime) -> Result<(), ComputeError> {
        self.answer_after_latency().await;
        let mut cloud = self.enter("quarantine")?;
        let instance = cloud.instances.get_mut(instance_id).ok_or_else(|| {
            ComputeError::Rejected(format!("instance {instance_id} does not exist"))
        })?;
        instance.quarantined_at = Some(at);
        Ok(())
    }

    async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>, ComputeError> {
        self.subnets_held.pass().await;
        self.answer_after_latency().await;
        let _cloud = self.enter("subnets")?;
        let zones = self.zones.lock().expect("lock").clone();
        if zones.is_empty() {
            return Err(ComputeError::Rejected("the fake cloud has no zones".into()));
        }
        Ok(ids
            .iter()
            .enumerate()
            .map(|(i, id)| Subnet {
                id: id.clone(),
                availability_zone: zones[i % zones.len()].clone(),
            })
            .collect())
    }

    async fn offered_zones(&self, instance_type: &str) -> Result<Vec<String>, ComputeError> {
        self.answer_after_latency().await;
        let _cloud = self.enter("offered_zones")?;
        if instance_type.starts_with("unoffered") {
            return Ok(Vec::new());
        }
        Ok(self.zones.lock().expect("lock").clone())
    }

    async fn check(&self) -> Result<(), ComputeError> {
        self.answer_after_latency().await;
        self.enter("check").map(drop)
    }

    /// A boot log whose last line carries a credential, as a careless
    /// script might print it (the runner must scrub it).
    async fn console_output(&self, instance_id: &str) -> Result<String, ComputeError> {
        self.answer_after_latency().await;
        let cloud = self.enter("console_output")?;
        if !cloud.instances.contains_key(instance_id) {
            return Err(ComputeError::Rejected(format!(
                "instance {instance_id} does not exist"
            )));
        }
        Ok(format!(
            "booting {instance_id}\ncloud-init: running user data\nfatal: https://alice:{FAKE_CONSOLE_SECRET}@git.example.com/acme/api.git refused\n"
        ))
    }
}

/// The credential the fake console output prints.
pub const FAKE_CONSOLE_SECRET: &str = "glpat-consoleQ7x2Lk9Vm4";

/// A secret store in memory.
#[derive(Debug, Default)]
pub struct MemorySecrets {
    credentials: Mutex<Credentials>,
    saves: AtomicU64,
}

impl MemorySecrets {
    /// A store holding only an exchange token, as the stack creates it.
    pub fn with_exchange_token(token: &str) -> Self {
        let secrets = Self::default();
        secrets.credentials.lock().expect("lock").exchange_token = Some(token.to_owned().into());
        secrets
    }

    /// What is stored now.
    pub fn credentials(&self) -> Credentials {
        self.credentials.lock().expect("lock").clone()
    }

    /// How many saves happened.
    pub fn saves(&self) -> u64 {
        self.saves.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl SecretStore for MemorySecrets {
    async fn load(&self) -> Result<Credentials, SecretError> {
        Ok(self.credentials())
    }

    async fn save(&self, credentials: &Credentials) -> Result<(), SecretError> {
        *self.credentials.lock().expect("lock") = credentials.clone();
        self.saves.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A leader lease in memory, shared by the replicas of a test.
#[derive(Debug, Default)]
pub struct MemoryLease {
    state: Mutex<Option<(String, u64, SystemTime)>>,
    epochs: AtomicU64,
}

/// One replica's handle on a [`MemoryLease`].
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    lease: std::sync::Arc<MemoryLease>,
    holder: String,
}

impl MemoryLease {
    /// A handle for the replica `holder`.
    pub fn handle(self: &std::sync::Arc<Self>, holder: &str) -> LeaseHandle {
        LeaseHandle {
            lease: self.clone(),
            holder: holder.to_owned(),
        }
    }
}

#[async_trait]
impl runner_core::leader::Lease for LeaseHandle {
    async fn acquire(
        &self,
        ttl: Duration,
    ) -> Result<Option<runner_core::leader::Term>, StoreError> {
        let now = SystemTime::now();
        let mut state = self.lease.state.lock().expect("lock");
        match &*state {
            Some((holder, _, expires)) if holder != &self.holder && *expires > now => Ok(None),
            _ => {
                let epoch = self.lease.epochs.fetch_add(1, Ordering::SeqCst) + 1;
                *state = Some((self.holder.clone(), epoch, now + ttl));
                Ok(Some(runner_core::leader::Term {
                    epoch,
                    expires_at: now + ttl,
                }))
            }
        }
    }

    async fn renew(
        &self,
        epoch: u64,
        ttl: Duration,
    ) -> Result<runner_core::leader::Term, StoreError> {
        let now = SystemTime::now();
        let mut state = self.lease.state.lock().expect("lock");
        match &mut *state {
            Some((holder, e, expires)) if *holder == self.holder && *e == epoch => {
                *expires = now + ttl;
                Ok(runner_core::leader::Term {
                    epoch,
                    expires_at: now + ttl,
                })
            }
            _ => Err(StoreError::Fenced),
        }
    }

    async fn release(&self, epoch: u64) -> Result<(), StoreError> {
        let mut state = self.lease.state.lock().expect("lock");
        if matches!(&*state, Some((holder, e, _)) if *holder == self.holder && *e == epoch) {
            *state = None;
        }
        Ok(())
    }
}

/// A token store in memory (values held as given: tests only).
#[derive(Debug, Default)]
pub struct MemoryTokens {
    tokens: Mutex<BTreeMap<TokenKey, StoredToken>>,
}

impl MemoryTokens {
    /// The keys stored now.
    pub fn keys(&self) -> Vec<TokenKey> {
        self.tokens.lock().expect("lock").keys().cloned().collect()
    }
}

#[async_trait]
impl TokenStore for MemoryTokens {
    async fn get(&self, key: &TokenKey) -> Result<Option<StoredToken>, TokenStoreError> {
        Ok(self.tokens.lock().expect("lock").get(key).cloned())
    }

    async fn put(
        &self,
        key: &TokenKey,
        token: &HostToken,
        expected: Option<u64>,
    ) -> Result<u64, TokenStoreError> {
        let mut tokens = self.tokens.lock().expect("lock");
        let current = tokens.get(key).map_or(0, |t| t.version);
        if expected.is_some_and(|v| v != current) {
            return Err(TokenStoreError::Conflict);
        }
        let version = current + 1;
        tokens.insert(
            key.clone(),
            StoredToken {
                key: key.clone(),
                token: token.clone(),
                stored_at: SystemTime::now(),
                version,
            },
        );
        Ok(version)
    }

    async fn list(&self) -> Result<Vec<TokenEntry>, TokenStoreError> {
        Ok(self
            .tokens
            .lock()
            .expect("lock")
            .values()
            .map(|t| TokenEntry {
                key: t.key.clone(),
                stored_at: t.stored_at,
                version: t.version,
                binding: t.token.binding.clone(),
            })
            .collect())
    }

    async fn delete(&self, key: &TokenKey, expected: Option<u64>) -> Result<(), TokenStoreError> {
        let mut tokens = self.tokens.lock().expect("lock");
        match (tokens.get(key), expected) {
            (Some(t), Some(v)) if t.version != v => Err(TokenStoreError::Conflict),
            _ => {
                tokens.remove(key);
                Ok(())
            }
        }
    }
}

/// Per-environment secrets in memory: value and the instance bound to it.
#[derive(Debug, Default)]
pub struct MemoryEnvironmentSecrets {
    secrets: Mutex<BTreeMap<EnvironmentId, (SecretString, Option<String>)>>,
    holders: Mutex<BTreeMap<EnvironmentId, TokenKey>>,
}

impl MemoryEnvironmentSecrets {
    /// The instance bound to an environment's secret, if it exists.
    pub fn bound(&self, environment: EnvironmentId) -> Option<Option<String>> {
        self.secrets
            .lock()
            .expect("lock")
            .get(&environment)
            .map(|(_, instance)| instance.clone())
    }

    /// An environment's secret value (tests only).
    pub fn value(&self, environment: EnvironmentId) -> Option<String> {
        use secrecy::ExposeSecret as _;
        self.secrets
            .lock()
            .expect("lock")
            .get(&environment)
            .map(|(v, _)| v.expose_secret().to_owned())
    }

    /// How many secrets exist.
    pub fn len(&self) -> usize {
        self.secrets.lock().expect("lock").len()
    }

    /// Whether no secret exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl EnvironmentSecrets for MemoryEnvironmentSecrets {
    async fn put(
        &self,
        environment: EnvironmentId,
        value: &SecretString,
        holder: &TokenKey,
    ) -> Result<String, SecretError> {
        self.holders
            .lock()
            .expect("lock")
            .insert(environment, holder.clone());
        self.secrets
            .lock()
            .expect("lock")
            .entry(environment)
            .and_modify(|(v, _)| *v = value.clone())
            .or_insert_with(|| (value.clone(), None));
        Ok(format!("memory/environments/{environment}"))
    }

    async fn bind(&self, environment: EnvironmentId, instance_id: &str) -> Result<(), SecretError> {
        if let Some((_, bound)) = self.secrets.lock().expect("lock").get_mut(&environment) {
            *bound = Some(instance_id.to_owned());
        }
        Ok(())
    }

    async fn delete(&self, environment: EnvironmentId) -> Result<(), SecretError> {
        self.secrets.lock().expect("lock").remove(&environment);
        self.holders.lock().expect("lock").remove(&environment);
        Ok(())
    }

    async fn delete_holding(&self, holder: &TokenKey) -> Result<usize, SecretError> {
        let mut holders = self.holders.lock().expect("lock");
        let mut secrets = self.secrets.lock().expect("lock");
        let held: Vec<EnvironmentId> = holders
            .iter()
            .filter(|(_, h)| *h == holder)
            .map(|(id, _)| *id)
            .collect();
        for id in &held {
            holders.remove(id);
            secrets.remove(id);
        }
        Ok(held.len())
    }
}
