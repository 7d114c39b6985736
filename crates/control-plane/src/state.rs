//! The control plane's records and the rules that guard them.
//!
//! Everything lives in memory behind one lock, held only for the duration of a
//! synchronous update (never across an `.await`). Every mutation that a runner
//! must learn about returns the event to send, so the caller emits it after the
//! lock is released.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use runner_core::validate::{self, FieldError};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, environment_content::Revision, runner_request};
use tonic::Status;
use uuid::Uuid;

/// Default page size when a request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a request may ask for.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Turns a field rule violation into INVALID_ARGUMENT naming the field.
pub fn invalid(err: FieldError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// A runner as the control plane knows it.
#[derive(Debug, Clone)]
pub struct RunnerRecord {
    /// The runner id.
    pub id: Uuid,
    /// The admin's name for it.
    pub name: String,
    /// Its fixed region.
    pub region: String,
    /// When it was created.
    pub created_at: SystemTime,
    /// Its X25519 key, set by the first Signup.
    pub public_key: Option<[u8; 32]>,
    /// The version it reported.
    pub version: String,
    /// The capabilities it reported.
    pub capabilities: Vec<i32>,
    /// Its degraded message; empty when healthy.
    pub degraded_message: String,
    /// What it reported for operators.
    pub system_details: HashMap<String, String>,
    /// When it last called.
    pub last_seen: Option<SystemTime>,
    /// Whether it should update itself.
    pub auto_update: bool,
    /// The key its exchange token was traded for, if the runner named one:
    /// Signup accepts only that key.
    pub traded_key: Option<[u8; 32]>,
}

#[derive(Debug)]
struct ExchangeToken {
    runner_id: Uuid,
    expires_at: SystemTime,
    /// When it was traded, the key it was traded for, and the access token.
    used: Option<(SystemTime, Option<[u8; 32]>, String)>,
}

/// How long a trade can be repeated with the same public key.
const RETRADE_WINDOW: Duration = Duration::from_secs(600);

/// An environment and what its runner last said about it.
#[derive(Debug, Clone)]
pub struct EnvironmentRecord {
    /// The runner that runs it.
    pub runner_id: Uuid,
    /// What the runner sees.
    pub environment: pb::RunnerEnvironment,
    /// The last status reported.
    pub status: Option<pb::EnvironmentStatus>,
    /// When it arrived.
    pub status_updated_at: Option<SystemTime>,
    /// Deleted by the runner: hidden from the runner, kept for the admin.
    pub purged: bool,
}

impl EnvironmentRecord {
    fn spec(&self) -> &pb::EnvironmentSpec {
        self.environment
            .spec
            .as_ref()
            .expect("the control plane always sets the spec")
    }

    fn spec_mut(&mut self) -> &mut pb::EnvironmentSpec {
        self.environment
            .spec
            .as_mut()
            .expect("the control plane always sets the spec")
    }
}

#[derive(Debug, Clone)]
struct ClassRecord {
    runner_id: Uuid,
    class: pb::EnvironmentClass,
}

#[derive(Debug, Clone)]
struct IntegrationRecord {
    runner_id: Uuid,
    integration: pb::ScmIntegration,
}

/// A user's token held by a runner: a sealed PAT forwarded to it, or an
/// OAuth code it exchanged.
#[derive(Debug, Clone)]
pub struct HostTokenRecord {
    /// When it was added.
    pub added_at: SystemTime,
    /// The sealed box, as the admin gave it; empty for OAuth.
    pub sealed_token: Vec<u8>,
    /// The account the runner said it authenticates as.
    pub username: String,
    /// The call that stores it is still in flight: listed to the runner
    /// (which may store it any moment), not yet shown to admins.
    pub pending: bool,
}

/// All records.
#[derive(Debug, Default)]
pub struct State {
    runners: BTreeMap<Uuid, RunnerRecord>,
    exchange_tokens: HashMap<String, ExchangeToken>,
    access_tokens: HashMap<String, Uuid>,
    classes: BTreeMap<Uuid, ClassRecord>,
    environments: BTreeMap<Uuid, EnvironmentRecord>,
    integrations: BTreeMap<Uuid, IntegrationRecord>,
    host_tokens: BTreeMap<(Uuid, String, String), HostTokenRecord>,
    release: Option<(semver::Version, String)>,
}

/// An event for one runner, to send once the lock is released.
pub type Event = (Uuid, runner_request::Kind);

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Protobuf timestamp of a system time.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn changed(runner_id: Uuid, environment_id: Uuid) -> Event {
    (
        runner_id,
        runner_request::Kind::EnvironmentChanged(pb::EnvironmentChanged {
            environment_id: environment_id.to_string(),
        }),
    )
}

fn integration_changed(runner_id: Uuid, integration_id: Uuid) -> Event {
    (
        runner_id,
        runner_request::Kind::ScmIntegrationChanged(pb::ScmIntegrationChanged {
            integration_id: integration_id.to_string(),
        }),
    )
}

fn page_size(page: &pb::PageRequest) -> Result<usize, Status> {
    match page.page_size as usize {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(Status::invalid_argument(format!(
            "page.page_size: {n} is more than {MAX_PAGE_SIZE}"
        ))),
        n => Ok(n),
    }
}

/// One page of `items` after the cursor in `page`.
fn paginate<T: Clone>(
    items: &BTreeMap<Uuid, T>,
    page: Option<&pb::PageRequest>,
    keep: impl Fn(&T) -> bool,
) -> Result<(Vec<T>, pb::PageResponse), Status> {
    let default = pb::PageRequest::default();
    let page = page.unwrap_or(&default);
    let size = page_size(page)?;
    let after = if page.page_token.is_empty() {
        None
    } else {
        let bad = || Status::invalid_argument("page.page_token: is not a token this server issued");
        let bytes = URL_SAFE_NO_PAD
            .decode(&page.page_token)
            .map_err(|_| bad())?;
        Some(Uuid::from_slice(&bytes).map_err(|_| bad())?)
    };
    let range = match after {
        Some(id) => items.range((std::ops::Bound::Excluded(id), std::ops::Bound::Unbounded)),
        None => items.range(..),
    };
    let mut out = Vec::new();
    let mut last = None;
    let mut more = false;
    for (id, item) in range.filter(|(_, item)| keep(item)) {
        if out.len() == size {
            more = true;
            break;
        }
        out.push(item.clone());
        last = Some(*id);
    }
    let next_page_token = match (more, last) {
        (true, Some(id)) => URL_SAFE_NO_PAD.encode(id.as_bytes()),
        _ => String::new(),
    };
    Ok((out, pb::PageResponse { next_page_token }))
}

fn check_enum<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, Status> {
    E::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{field}: {value} is not a known value")))
}

fn check_content(content: Option<&pb::EnvironmentContent>) -> Result<(), Status> {
    let content = content.ok_or_else(|| Status::invalid_argument("content: must be set"))?;
    validate::repository_url("content.repository_url", &content.repository_url).map_err(invalid)?;
    match &content.revision {
        Some(Revision::Branch(branch)) => {
            validate::branch("content.branch", branch).map_err(invalid)
        }
        Some(Revision::Commit(commit)) => {
            validate::commit("content.commit", commit).map_err(invalid)
        }
        None => Ok(()),
    }
}

fn check_oauth(oauth: Option<&pb::OAuthApp>) -> Result<(), Status> {
    let Some(oauth) = oauth else { return Ok(()) };
    validate::text("oauth.client_id", &oauth.client_id, 256).map_err(invalid)?;
    // A sealed box is a 32-byte key, a 16-byte tag and at least one byte.
    if oauth.sealed_client_secret.len() < 49 || oauth.sealed_client_secret.len() > 4096 {
        return Err(Status::invalid_argument(
            "oauth.sealed_client_secret: is not a sealed box (49 to 4096 bytes)",
        ));
    }
    Ok(())
}

fn check_base_url(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Ok(());
    }
    let url = url_scheme(value);
    if url != Some("https") && url != Some("http") {
        return Err(Status::invalid_argument(format!(
            "{field}: must be an http(s) URL"
        )));
    }
    validate::text(field, value, 2048).map_err(invalid)
}

fn url_scheme(value: &str) -> Option<&str> {
    value.split_once("://").map(|(scheme, _)| scheme)
}

impl State {
    // ------------------------------------------------------------ runners

    /// Creates a runner and its single-use exchange token.
    pub fn create_runner(
        &mut self,
        name: &str,
        region: &str,
        now: SystemTime,
        token_ttl: Duration,
    ) -> Result<(RunnerRecord, String, SystemTime), Status> {
        validate::runner_name("name", name).map_err(invalid)?;
        validate::region("region", region).map_err(invalid)?;
        let record = RunnerRecord {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            region: region.to_owned(),
            created_at: now,
            public_key: None,
            version: String::new(),
            capabilities: Vec::new(),
            degraded_message: String::new(),
            system_details: HashMap::new(),
            last_seen: None,
            auto_update: false,
            traded_key: None,
        };
        let token = random_token("ret_");
        let expires_at = now + token_ttl;
        self.exchange_tokens.insert(
            token.clone(),
            ExchangeToken {
                runner_id: record.id,
                expires_at,
                used: None,
            },
        );
        self.runners.insert(record.id, record.clone());
        Ok((record, token, expires_at))
    }

    /// Trades an exchange token, once, for an access token; a trade with
    /// the same public key repeated within [`RETRADE_WINDOW`] answers the
    /// same again.
    pub fn exchange(
        &mut self,
        token: &str,
        public_key: &[u8],
        now: SystemTime,
    ) -> Result<(Uuid, String), Status> {
        validate::text("exchange_token", token, 512).map_err(invalid)?;
        let key: Option<[u8; 32]> = match public_key.len() {
            0 => None,
            _ => Some(public_key.try_into().map_err(|_| {
                Status::invalid_argument(format!(
                    "public_key: must be 32 bytes (an X25519 key), got {}",
                    public_key.len()
                ))
            })?),
        };
        let record = self
            .exchange_tokens
            .get_mut(token)
            .ok_or_else(|| Status::unauthenticated("exchange token is not valid"))?;
        if let Some((at, traded_for, access)) = &record.used {
            let same_key = key.is_some() && *traded_for == key;
            let in_window = now.duration_since(*at).unwrap_or_default() < RETRADE_WINDOW;
            if same_key && in_window {
                return Ok((record.runner_id, access.clone()));
            }
            return Err(Status::unauthenticated("exchange token was already used"));
        }
        if now >= record.expires_at {
            return Err(Status::unauthenticated("exchange token has expired"));
        }
        let runner_id = record.runner_id;
        let access = random_token("rat_");
        record.used = Some((now, key, access.clone()));
        self.access_tokens.insert(access.clone(), runner_id);
        if let (Some(key), Some(runner)) = (key, self.runners.get_mut(&runner_id)) {
            runner.traded_key = Some(key);
        }
        Ok((runner_id, access))
    }

    /// The runner an access token belongs to; records the call as a sign of life.
    pub fn authenticate(&mut self, access_token: &str, now: SystemTime) -> Result<Uuid, Status> {
        let runner_id = *self
            .access_tokens
            .get(access_token)
            .ok_or_else(|| Status::unauthenticated("access token is not valid"))?;
        let runner = self
            .runners
            .get_mut(&runner_id)
            .ok_or_else(|| Status::unauthenticated("access token is not valid"))?;
        runner.last_seen = Some(now);
        Ok(runner_id)
    }

    /// A runner by id.
    pub fn runner(&self, id: Uuid) -> Result<&RunnerRecord, Status> {
        self.runners
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("runner {id} does not exist")))
    }

    /// Every runner, by id.
    pub fn runners(&self) -> impl Iterator<Item = &RunnerRecord> {
        self.runners.values()
    }

    /// Registers a runner's key and what it supports.
    pub fn signup(&mut self, runner_id: Uuid, req: &pb::SignupRequest) -> Result<(), Status> {
        let key: [u8; 32] = req.public_key.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "public_key: must be 32 bytes (an X25519 key), got {}",
                req.public_key.len()
            ))
        })?;
        validate::version("version", &req.version).map_err(invalid)?;
        validate::region("region", &req.region).map_err(invalid)?;
        for (i, c) in req.capabilities.iter().enumerate() {
            check_enum::<pb::RunnerCapability>(&format!("capabilities[{i}]"), *c)?;
        }
        if req.environment_class_schema.len() > 64 * 1024 {
            return Err(Status::invalid_argument(
                "environment_class_schema: is larger than 64 KiB",
            ));
        }
        if !req.environment_class_schema.is_empty()
            && serde_json::from_str::<serde_json::Value>(&req.environment_class_schema).is_err()
        {
            return Err(Status::invalid_argument(
                "environment_class_schema: is not valid JSON",
            ));
        }
        for (i, p) in req.scm_providers.iter().enumerate() {
            let kind = check_enum::<pb::ScmKind>(&format!("scm_providers[{i}].kind"), p.kind)?;
            if kind == pb::ScmKind::Unspecified {
                return Err(Status::invalid_argument(format!(
                    "scm_providers[{i}].kind: must be set"
                )));
            }
            for (j, m) in p.auth_methods.iter().enumerate() {
                check_enum::<pb::AuthMethod>(&format!("scm_providers[{i}].auth_methods[{j}]"), *m)?;
            }
        }
        let runner = self
            .runners
            .get_mut(&runner_id)
            .ok_or_else(|| Status::unauthenticated("access token is not valid"))?;
        if req.region != runner.region {
            return Err(Status::failed_precondition(format!(
                "region: the runner was created for {}, not {}",
                runner.region, req.region
            )));
        }
        if runner.traded_key.is_some_and(|traded| traded != key) {
            return Err(Status::failed_precondition(
                "public_key: not the key the exchange token was traded for",
            ));
        }
        match runner.public_key {
            Some(existing) if existing != key => {
                return Err(Status::failed_precondition(
                    "public_key: the runner already signed up with a different key",
                ));
            }
            _ => runner.public_key = Some(key),
        }
        runner.version.clone_from(&req.version);
        runner.capabilities.clone_from(&req.capabilities);
        Ok(())
    }

    /// Records a runner's reported status.
    pub fn update_runner_status(
        &mut self,
        runner_id: Uuid,
        req: &pb::UpdateRunnerStatusRequest,
    ) -> Result<(), Status> {
        validate::version("version", &req.version).map_err(invalid)?;
        validate::region("region", &req.region).map_err(invalid)?;
        validate::optional_text("degraded_message", &req.degraded_message, 1024)
            .map_err(invalid)?;
        for (i, c) in req.capabilities.iter().enumerate() {
            check_enum::<pb::RunnerCapability>(&format!("capabilities[{i}]"), *c)?;
        }
        if req.system_details.len() > 32 {
            return Err(Status::invalid_argument(
                "system_details: has more than 32 entries",
            ));
        }
        for (k, v) in &req.system_details {
            validate::text("system_details key", k, 64).map_err(invalid)?;
            validate::optional_text(&format!("system_details[{k}]"), v, 256).map_err(invalid)?;
        }
        let runner = self
            .runners
            .get_mut(&runner_id)
            .ok_or_else(|| Status::unauthenticated("access token is not valid"))?;
        if runner.public_key.is_none() {
            return Err(Status::failed_precondition("the runner has not signed up"));
        }
        if req.region != runner.region {
            return Err(Status::failed_precondition(format!(
                "region: the runner was created for {}, not {}",
                runner.region, req.region
            )));
        }
        runner.version.clone_from(&req.version);
        runner.capabilities.clone_from(&req.capabilities);
        runner.degraded_message.clone_from(&req.degraded_message);
        runner.system_details.clone_from(&req.system_details);
        Ok(())
    }

    /// Sets whether a runner updates itself.
    pub fn set_auto_update(&mut self, runner_id: Uuid, on: bool) -> Result<RunnerRecord, Status> {
        let runner = self
            .runners
            .get_mut(&runner_id)
            .ok_or_else(|| Status::not_found(format!("runner {runner_id} does not exist")))?;
        runner.auto_update = on;
        Ok(runner.clone())
    }

    // ------------------------------------------------------------ classes

    /// Creates an environment class for a runner.
    pub fn create_class(
        &mut self,
        req: &admin::CreateEnvironmentClassRequest,
    ) -> Result<pb::EnvironmentClass, Status> {
        let runner_id = validate::uuid("runner_id", &req.runner_id).map_err(invalid)?;
        self.runner(runner_id)?;
        validate::text(
            "display_name",
            &req.display_name,
            validate::MAX_DISPLAY_NAME_LEN,
        )
        .map_err(invalid)?;
        validate::instance_type("instance_type", &req.instance_type).map_err(invalid)?;
        validate::disk_gib("disk_gib", i64::from(req.disk_gib)).map_err(invalid)?;
        let class = pb::EnvironmentClass {
            id: Uuid::new_v4().to_string(),
            display_name: req.display_name.clone(),
            instance_type: req.instance_type.clone(),
            disk_gib: req.disk_gib,
            enabled: true,
        };
        let id = Uuid::parse_str(&class.id).expect("a UUID just formatted parses");
        self.classes.insert(
            id,
            ClassRecord {
                runner_id,
                class: class.clone(),
            },
        );
        Ok(class)
    }

    /// Enables or disables a class. Environments that use it are re-announced,
    /// so the runner re-validates them.
    pub fn set_class_enabled(
        &mut self,
        class_id: &str,
        enabled: bool,
    ) -> Result<(pb::EnvironmentClass, Vec<Event>), Status> {
        let id = validate::uuid("environment_class_id", class_id).map_err(invalid)?;
        let record = self
            .classes
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("environment class {id} does not exist")))?;
        let mut events = Vec::new();
        if record.class.enabled != enabled {
            record.class.enabled = enabled;
            for (env_id, env) in &self.environments {
                if !env.purged && env.spec().environment_class_id == class_id {
                    events.push(changed(env.runner_id, *env_id));
                }
            }
        }
        Ok((record.class.clone(), events))
    }

    /// A runner's classes, for the admin.
    pub fn classes_of(&self, runner_id: Uuid) -> Vec<pb::EnvironmentClass> {
        self.classes
            .values()
            .filter(|c| c.runner_id == runner_id)
            .map(|c| c.class.clone())
            .collect()
    }

    /// A page of a runner's classes.
    pub fn list_classes(
        &self,
        runner_id: Uuid,
        page: Option<&pb::PageRequest>,
    ) -> Result<(Vec<pb::EnvironmentClass>, pb::PageResponse), Status> {
        let (records, page) = paginate(&self.classes, page, |c| c.runner_id == runner_id)?;
        Ok((records.into_iter().map(|c| c.class).collect(), page))
    }

    // ------------------------------------------------------------ environments

    /// Creates an environment with desired phase RUNNING.
    pub fn create_environment(
        &mut self,
        req: &admin::CreateEnvironmentRequest,
        now: SystemTime,
    ) -> Result<(EnvironmentRecord, Event), Status> {
        let runner_id = validate::uuid("runner_id", &req.runner_id).map_err(invalid)?;
        self.runner(runner_id)?;
        if req.unchecked {
            // Unchecked specs still fit the wire limits a runner relies on.
            validate::optional_text("environment_class_id", &req.environment_class_id, 64)
                .map_err(invalid)?;
            let url = req
                .content
                .as_ref()
                .map(|c| c.repository_url.as_str())
                .unwrap_or_default();
            validate::optional_text(
                "content.repository_url",
                url,
                validate::MAX_REPOSITORY_URL_LEN,
            )
            .map_err(invalid)?;
        } else {
            let class_id = validate::uuid("environment_class_id", &req.environment_class_id)
                .map_err(invalid)?;
            let class = self
                .classes
                .get(&class_id)
                .filter(|c| c.runner_id == runner_id)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "environment_class_id: class {class_id} does not exist for runner {runner_id}"
                    ))
                })?;
            if !class.class.enabled {
                return Err(Status::failed_precondition(format!(
                    "environment_class_id: class {class_id} is disabled"
                )));
            }
            check_content(req.content.as_ref())?;
        }
        let creator = if req.creator.is_empty() {
            "admin"
        } else {
            &req.creator
        };
        validate::text("creator", creator, validate::MAX_PRINCIPAL_LEN).map_err(invalid)?;
        validate::optional_text("name", &req.name, validate::MAX_DISPLAY_NAME_LEN)
            .map_err(invalid)?;
        if let Some(d) = req.timeout.as_ref().and_then(|t| t.disconnected.as_ref())
            && (d.seconds < 0 || d.nanos < 0 || d.seconds > 7 * 24 * 3600)
        {
            return Err(Status::invalid_argument(
                "timeout.disconnected: must be between 0 and 7 days",
            ));
        }
        let id = Uuid::new_v4();
        let record = EnvironmentRecord {
            runner_id,
            environment: pb::RunnerEnvironment {
                id: id.to_string(),
                metadata: Some(pb::EnvironmentMetadata {
                    creator: creator.to_owned(),
                    name: req.name.clone(),
                    created_at: Some(timestamp(now)),
                }),
                spec: Some(pb::EnvironmentSpec {
                    spec_version: 1,
                    desired_phase: pb::EnvironmentPhase::Running as i32,
                    environment_class_id: req.environment_class_id.clone(),
                    content: req.content.clone(),
                    timeout: req.timeout,
                }),
                accepted_status_version: 0,
            },
            status: None,
            status_updated_at: None,
            purged: false,
        };
        self.environments.insert(id, record.clone());
        Ok((record, changed(runner_id, id)))
    }

    /// An environment by id, for the admin (deleted ones included).
    pub fn environment(&self, id: &str) -> Result<&EnvironmentRecord, Status> {
        let id = validate::uuid("environment_id", id).map_err(invalid)?;
        self.environments
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("environment {id} does not exist")))
    }

    /// Every environment, optionally of one runner, for the admin.
    pub fn environments(&self, runner_id: Option<Uuid>) -> Vec<EnvironmentRecord> {
        self.environments
            .values()
            .filter(|e| runner_id.is_none_or(|r| e.runner_id == r))
            .cloned()
            .collect()
    }

    /// Sets an environment's desired phase; a change bumps its spec version.
    pub fn set_desired_phase(
        &mut self,
        id: &str,
        phase: i32,
    ) -> Result<(EnvironmentRecord, Option<Event>), Status> {
        let id = validate::uuid("environment_id", id).map_err(invalid)?;
        let phase = check_enum::<pb::EnvironmentPhase>("desired_phase", phase)?;
        if !matches!(
            phase,
            pb::EnvironmentPhase::Running
                | pb::EnvironmentPhase::Stopped
                | pb::EnvironmentPhase::Deleted
        ) {
            return Err(Status::invalid_argument(
                "desired_phase: must be RUNNING, STOPPED or DELETED",
            ));
        }
        let record = self
            .environments
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("environment {id} does not exist")))?;
        if record.purged {
            return Err(Status::failed_precondition(format!(
                "environment {id} was deleted"
            )));
        }
        let spec = record.spec_mut();
        if spec.desired_phase == phase as i32 {
            return Ok((record.clone(), None));
        }
        if spec.desired_phase == pb::EnvironmentPhase::Deleted as i32 {
            return Err(Status::failed_precondition(format!(
                "environment {id} is being deleted"
            )));
        }
        spec.desired_phase = phase as i32;
        spec.spec_version += 1;
        Ok((record.clone(), Some(changed(record.runner_id, id))))
    }

    /// A page of the environments a runner must reconcile.
    pub fn list_runner_environments(
        &self,
        runner_id: Uuid,
        page: Option<&pb::PageRequest>,
    ) -> Result<(Vec<pb::RunnerEnvironment>, pb::PageResponse), Status> {
        let (records, page) = paginate(&self.environments, page, |e| {
            e.runner_id == runner_id && !e.purged
        })?;
        Ok((records.into_iter().map(|e| e.environment).collect(), page))
    }

    /// One environment of a runner.
    pub fn runner_environment(
        &self,
        runner_id: Uuid,
        id: &str,
    ) -> Result<pb::RunnerEnvironment, Status> {
        let id = validate::uuid("environment_id", id).map_err(invalid)?;
        self.environments
            .get(&id)
            .filter(|e| e.runner_id == runner_id && !e.purged)
            .map(|e| e.environment.clone())
            .ok_or_else(|| Status::not_found(format!("environment {id} does not exist")))
    }

    /// Records a status the runner reported. A status saying the runner
    /// stopped the environment for want of a client (`stop_reason`
    /// DISCONNECTED_TIMEOUT), answering the current spec while RUNNING is
    /// desired, moves the desired phase to STOPPED (a new spec version, and
    /// the event saying so), so the runner does not start it again.
    pub fn update_environment_status(
        &mut self,
        runner_id: Uuid,
        req: &pb::UpdateEnvironmentStatusRequest,
        now: SystemTime,
    ) -> Result<Option<Event>, Status> {
        let id = validate::uuid("environment_id", &req.environment_id).map_err(invalid)?;
        let status = req
            .status
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("status: must be set"))?;
        if status.status_version == 0 {
            return Err(Status::invalid_argument(
                "status.status_version: must be at least 1",
            ));
        }
        let phase = check_enum::<pb::EnvironmentPhase>("status.phase", status.phase)?;
        if phase == pb::EnvironmentPhase::Unspecified {
            return Err(Status::invalid_argument("status.phase: must be set"));
        }
        validate::optional_text(
            "status.failure_message",
            &status.failure_message,
            validate::MAX_MESSAGE_LEN,
        )
        .map_err(invalid)?;
        validate::optional_text(
            "status.warning_message",
            &status.warning_message,
            validate::MAX_MESSAGE_LEN,
        )
        .map_err(invalid)?;
        check_enum::<pb::ContentStage>("status.content_stage", status.content_stage)?;
        let stop_reason = check_enum::<pb::StopReason>("status.stop_reason", status.stop_reason)?;
        if !status.content_commit.is_empty()
            && (status.content_commit.len() != 40
                || !status
                    .content_commit
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(Status::invalid_argument(
                "status.content_commit: must be empty or 40 lowercase hex digits",
            ));
        }
        if let Some(t) = &status.content_ready_time
            && t.nanos.clamp(0, 999_999_999) != t.nanos
        {
            return Err(Status::invalid_argument(
                "status.content_ready_time: nanos must be between 0 and 999999999",
            ));
        }
        if let Some(timings) = &status.start_timings {
            for (field, d) in [
                (
                    "status.start_timings.launch_to_running",
                    &timings.launch_to_running,
                ),
                (
                    "status.start_timings.running_to_content_ready",
                    &timings.running_to_content_ready,
                ),
                (
                    "status.start_timings.launch_to_content_ready",
                    &timings.launch_to_content_ready,
                ),
            ] {
                if d.as_ref()
                    .is_some_and(|d| d.seconds < 0 || d.nanos < 0 || d.nanos > 999_999_999)
                {
                    return Err(Status::invalid_argument(format!(
                        "{field}: must not be negative"
                    )));
                }
            }
        }
        let ack = status
            .runner_ack
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("status.runner_ack: must be set"))?;
        check_enum::<pb::RunnerAckCode>("status.runner_ack.code", ack.code)?;
        validate::optional_text("status.runner_ack.message", &ack.message, 1024)
            .map_err(invalid)?;
        if let Some(machine) = &status.machine {
            check_enum::<pb::MachinePhase>("status.machine.phase", machine.phase)?;
            for (field, value) in [
                ("status.machine.instance_id", &machine.instance_id),
                (
                    "status.machine.availability_zone",
                    &machine.availability_zone,
                ),
                ("status.machine.subnet_id", &machine.subnet_id),
                ("status.machine.private_ip", &machine.private_ip),
            ] {
                validate::optional_text(field, value, 64).map_err(invalid)?;
            }
        }
        let record = self
            .environments
            .get_mut(&id)
            .filter(|e| e.runner_id == runner_id && !e.purged)
            .ok_or_else(|| Status::not_found(format!("environment {id} does not exist")))?;
        let spec = record.spec();
        if ack.spec_version > spec.spec_version {
            return Err(Status::invalid_argument(format!(
                "status.runner_ack.spec_version: {} is newer than the spec ({})",
                ack.spec_version, spec.spec_version
            )));
        }
        if let Some(previous) = &record.status {
            if status.status_version < previous.status_version {
                return Err(Status::failed_precondition(format!(
                    "status.status_version: {} is lower than the stored {}",
                    status.status_version, previous.status_version
                )));
            }
            if status.status_version == previous.status_version {
                if previous == status {
                    return Ok(None);
                }
                return Err(Status::failed_precondition(format!(
                    "status.status_version: {} was already stored with different content",
                    status.status_version
                )));
            }
        }
        let deleted = phase == pb::EnvironmentPhase::Deleted
            && spec.desired_phase == pb::EnvironmentPhase::Deleted as i32;
        let idle_stop = stop_reason == pb::StopReason::DisconnectedTimeout
            && ack.spec_version == spec.spec_version
            && spec.desired_phase == pb::EnvironmentPhase::Running as i32;
        record.environment.accepted_status_version = status.status_version;
        record.status = Some(status.clone());
        record.status_updated_at = Some(now);
        record.purged = deleted;
        if idle_stop {
            let spec = record.spec_mut();
            spec.desired_phase = pb::EnvironmentPhase::Stopped as i32;
            spec.spec_version += 1;
            return Ok(Some(changed(record.runner_id, id)));
        }
        Ok(None)
    }

    // ------------------------------------------------------------ SCM

    /// Creates an integration; one per host per runner.
    pub fn create_integration(
        &mut self,
        req: &admin::CreateScmIntegrationRequest,
    ) -> Result<(pb::ScmIntegration, Event), Status> {
        let runner_id = validate::uuid("runner_id", &req.runner_id).map_err(invalid)?;
        self.runner(runner_id)?;
        let kind = check_enum::<pb::ScmKind>("kind", req.kind)?;
        if kind == pb::ScmKind::Unspecified {
            return Err(Status::invalid_argument("kind: must be set"));
        }
        validate::host("host", &req.host).map_err(invalid)?;
        check_oauth(req.oauth.as_ref())?;
        check_base_url("api_base_url", &req.api_base_url)?;
        check_base_url("oauth_base_url", &req.oauth_base_url)?;
        if self
            .integrations
            .values()
            .any(|i| i.runner_id == runner_id && i.integration.host == req.host)
        {
            return Err(Status::already_exists(format!(
                "host: the runner already has an integration for {}",
                req.host
            )));
        }
        let id = Uuid::new_v4();
        let integration = pb::ScmIntegration {
            id: id.to_string(),
            kind: req.kind,
            host: req.host.clone(),
            oauth: req.oauth.clone(),
            pat_enabled: req.pat_enabled,
            api_base_url: req.api_base_url.clone(),
            oauth_base_url: req.oauth_base_url.clone(),
        };
        self.integrations.insert(
            id,
            IntegrationRecord {
                runner_id,
                integration: integration.clone(),
            },
        );
        Ok((integration, integration_changed(runner_id, id)))
    }

    /// Replaces an integration's OAuth app, PAT switch and API URL.
    pub fn update_integration(
        &mut self,
        req: &admin::UpdateScmIntegrationRequest,
    ) -> Result<(pb::ScmIntegration, Event), Status> {
        let id = validate::uuid("integration_id", &req.integration_id).map_err(invalid)?;
        if let Some(update) = &req.oauth {
            check_oauth(update.app.as_ref())?;
        }
        if let Some(url) = &req.api_base_url {
            check_base_url("api_base_url", url)?;
        }
        if let Some(url) = &req.oauth_base_url {
            check_base_url("oauth_base_url", url)?;
        }
        let record = self
            .integrations
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("integration {id} does not exist")))?;
        if let Some(update) = &req.oauth {
            record.integration.oauth.clone_from(&update.app);
        }
        if let Some(on) = req.pat_enabled {
            record.integration.pat_enabled = on;
        }
        if let Some(url) = &req.api_base_url {
            record.integration.api_base_url.clone_from(url);
        }
        if let Some(url) = &req.oauth_base_url {
            record.integration.oauth_base_url.clone_from(url);
        }
        Ok((
            record.integration.clone(),
            integration_changed(record.runner_id, id),
        ))
    }

    /// Deletes an integration and the sealed tokens held for its host.
    pub fn delete_integration(&mut self, integration_id: &str) -> Result<Event, Status> {
        let id = validate::uuid("integration_id", integration_id).map_err(invalid)?;
        let record = self
            .integrations
            .remove(&id)
            .ok_or_else(|| Status::not_found(format!("integration {id} does not exist")))?;
        self.host_tokens.retain(|(runner, _, host), _| {
            !(*runner == record.runner_id && *host == record.integration.host)
        });
        Ok(integration_changed(record.runner_id, id))
    }

    /// A runner's integrations, for the admin.
    pub fn integrations_of(&self, runner_id: Uuid) -> Vec<pb::ScmIntegration> {
        self.integrations
            .values()
            .filter(|i| i.runner_id == runner_id)
            .map(|i| i.integration.clone())
            .collect()
    }

    /// A page of a runner's integrations.
    pub fn list_integrations(
        &self,
        runner_id: Uuid,
        page: Option<&pb::PageRequest>,
    ) -> Result<(Vec<pb::ScmIntegration>, pb::PageResponse), Status> {
        let (records, page) = paginate(&self.integrations, page, |i| i.runner_id == runner_id)?;
        Ok((records.into_iter().map(|i| i.integration).collect(), page))
    }

    /// Checks a host token before it is forwarded: the runner has signed up
    /// and has an integration for the host that accepts PATs.
    pub fn check_host_token(&self, req: &admin::AddHostTokenRequest) -> Result<Uuid, Status> {
        let runner_id = validate::uuid("runner_id", &req.runner_id).map_err(invalid)?;
        validate::text("principal", &req.principal, validate::MAX_PRINCIPAL_LEN)
            .map_err(invalid)?;
        validate::host("host", &req.host).map_err(invalid)?;
        if req.sealed_token.len() < 49 || req.sealed_token.len() > 8192 {
            return Err(Status::invalid_argument(
                "sealed_token: is not a sealed box (49 to 8192 bytes)",
            ));
        }
        if self.runner(runner_id)?.public_key.is_none() {
            return Err(Status::failed_precondition("the runner has not signed up"));
        }
        let integration = self
            .integrations
            .values()
            .find(|i| i.runner_id == runner_id && i.integration.host == req.host)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "host: the runner has no integration for {}",
                    req.host
                ))
            })?;
        if !integration.integration.pat_enabled {
            return Err(Status::failed_precondition(format!(
                "host: personal access tokens are disabled for {}",
                req.host
            )));
        }
        Ok(runner_id)
    }

    /// Lists (principal, host) to the runner before the call that stores its
    /// token is sent; true when nothing was listed for it before, so that
    /// [`State::abort_host_token`] takes it back if the call fails.
    pub fn begin_host_token(
        &mut self,
        runner_id: Uuid,
        principal: &str,
        host: &str,
        now: SystemTime,
    ) -> bool {
        let key = (runner_id, principal.to_owned(), host.to_owned());
        if self.host_tokens.contains_key(&key) {
            return false;
        }
        self.host_tokens.insert(
            key,
            HostTokenRecord {
                added_at: now,
                sealed_token: Vec::new(),
                username: String::new(),
                pending: true,
            },
        );
        true
    }

    /// Takes back what [`State::begin_host_token`] listed, if it is still
    /// pending (the call failed).
    pub fn abort_host_token(&mut self, runner_id: Uuid, principal: &str, host: &str) {
        let key = (runner_id, principal.to_owned(), host.to_owned());
        if self.host_tokens.get(&key).is_some_and(|r| r.pending) {
            self.host_tokens.remove(&key);
        }
    }

    /// A page of the (principal, host) pairs whose tokens the runner may
    /// keep, ordered by (principal, host).
    pub fn list_host_token_refs(
        &self,
        runner_id: Uuid,
        page: Option<&pb::PageRequest>,
    ) -> Result<(Vec<pb::HostTokenRef>, pb::PageResponse), Status> {
        let default = pb::PageRequest::default();
        let page = page.unwrap_or(&default);
        let size = page_size(page)?;
        let after = if page.page_token.is_empty() {
            None
        } else {
            let bad =
                || Status::invalid_argument("page.page_token: is not a token this server issued");
            let bytes = URL_SAFE_NO_PAD
                .decode(&page.page_token)
                .map_err(|_| bad())?;
            let text = String::from_utf8(bytes).map_err(|_| bad())?;
            let (principal, host) = text.split_once('\0').ok_or_else(bad)?;
            Some((principal.to_owned(), host.to_owned()))
        };
        let start = match &after {
            Some((p, h)) => std::ops::Bound::Excluded((runner_id, p.clone(), h.clone())),
            None => std::ops::Bound::Included((runner_id, String::new(), String::new())),
        };
        let mut refs: Vec<pb::HostTokenRef> = self
            .host_tokens
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|((r, _, _), _)| *r == runner_id)
            .take(size + 1)
            .map(|((_, principal, host), _)| pb::HostTokenRef {
                principal: principal.clone(),
                host: host.clone(),
            })
            .collect();
        let next_page_token = if refs.len() > size {
            refs.truncate(size);
            refs.last()
                .map(|r| URL_SAFE_NO_PAD.encode(format!("{}\0{}", r.principal, r.host)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((refs, pb::PageResponse { next_page_token }))
    }

    /// Keeps a sealed host token the runner accepted.
    pub fn store_host_token(
        &mut self,
        runner_id: Uuid,
        principal: &str,
        host: &str,
        record: HostTokenRecord,
    ) {
        self.host_tokens
            .insert((runner_id, principal.to_owned(), host.to_owned()), record);
    }

    /// Forgets a host token; the runner is told to forget it too.
    pub fn delete_host_token(
        &mut self,
        req: &admin::DeleteHostTokenRequest,
    ) -> Result<Event, Status> {
        let runner_id = validate::uuid("runner_id", &req.runner_id).map_err(invalid)?;
        validate::text("principal", &req.principal, validate::MAX_PRINCIPAL_LEN)
            .map_err(invalid)?;
        validate::host("host", &req.host).map_err(invalid)?;
        self.runner(runner_id)?;
        self.host_tokens
            .remove(&(runner_id, req.principal.clone(), req.host.clone()));
        Ok((
            runner_id,
            runner_request::Kind::HostTokenDeleted(pb::HostTokenDeleted {
                principal: req.principal.clone(),
                host: req.host.clone(),
            }),
        ))
    }

    /// A runner's host tokens: (principal, host, record), without those
    /// still being stored.
    pub fn host_tokens_of(&self, runner_id: Uuid) -> Vec<(String, String, HostTokenRecord)> {
        self.host_tokens
            .iter()
            .filter(|((r, _, _), t)| *r == runner_id && !t.pending)
            .map(|((_, p, h), t)| (p.clone(), h.clone(), t.clone()))
            .collect()
    }

    // ------------------------------------------------------------ releases

    /// Publishes the newest release.
    pub fn publish_release(&mut self, version: &str, image: &str) -> Result<(), Status> {
        let parsed = semver::Version::parse(version).map_err(|_| {
            Status::invalid_argument(format!("version: {version:?} is not a semantic version"))
        })?;
        validate::text("image", image, 512).map_err(invalid)?;
        self.release = Some((parsed, image.to_owned()));
        Ok(())
    }

    /// The newest release and whether the runner should move to it.
    pub fn latest_version(
        &self,
        runner_id: Uuid,
        current: &str,
    ) -> Result<pb::GetLatestVersionResponse, Status> {
        if !current.is_empty() {
            validate::version("current_version", current).map_err(invalid)?;
        }
        let runner = self.runner(runner_id)?;
        Ok(match &self.release {
            Some((version, image)) => pb::GetLatestVersionResponse {
                version: version.to_string(),
                image: image.clone(),
                auto_update: runner.auto_update,
            },
            None => pb::GetLatestVersionResponse::default(),
        })
    }
}

/// A runner's phase, derived at read time.
pub fn runner_phase(
    runner: &RunnerRecord,
    now: SystemTime,
    inactive_after: Duration,
) -> admin::RunnerPhase {
    if runner.public_key.is_none() {
        return admin::RunnerPhase::Created;
    }
    let silent = runner
        .last_seen
        .and_then(|seen| now.duration_since(seen).ok())
        .unwrap_or_default();
    if silent > inactive_after {
        admin::RunnerPhase::Inactive
    } else if !runner.degraded_message.is_empty() {
        admin::RunnerPhase::Degraded
    } else {
        admin::RunnerPhase::Active
    }
}
