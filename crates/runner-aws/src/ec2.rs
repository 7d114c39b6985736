//! EC2 compute: launches, observes, starts, stops and terminates the runner's
//! instances, recognised by their tags.
//!
//! Every call waits for a token from a client-side bucket (launch, mutate,
//! describe) set below EC2's per-account limits. Describes keep the SDK's
//! standard retries; launches and mutations are sent with the SDK's retries
//! off and retried by `gated`, a bounded loop of its own (at most 4
//! attempts), not `runner_core::retry`: each attempt must take a bucket
//! token and recheck leadership first. Mutations refuse to run unless this
//! replica leads. Start, stop and terminate are batched (`batch`), and
//! observation by id (`observe_ids`) is one call per batch the observer
//! collects. Instances without this runner's tags are never described, and
//! an instance wearing them without also carrying the environments' instance
//! profile and security group is logged once and left out of every
//! observation: the runner never touches it.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, InstanceType,
    LocationType, ResourceType, Tag, TagSpecification, VolumeType,
};
use base64::Engine as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use runner_core::leader::Leadership;
use runner_core::model::{EnvironmentId, Instance, InstanceState, Revision, Subnet};
use runner_core::report::Report;
use runner_core::traits::{Compute, ComputeError, LaunchRequest};
use runner_core::validate;

use crate::error::{AwsError, transient_code};

mod batch;

use crate::probes::placement::Placement;
use batch::{Mutations, Op};

/// Tag: the runner that owns the instance.
pub const TAG_RUNNER: &str = "aws-runner:runner-id";
/// Tag: the environment the instance belongs to.
pub const TAG_ENVIRONMENT: &str = "aws-runner:environment-id";
/// Tag: the launch attempt that created it.
pub const TAG_ATTEMPT: &str = "aws-runner:attempt";
/// Tag: always `aws-runner`.
pub const TAG_MANAGED_BY: &str = "aws-runner:managed-by";
/// Tag: when the runner marked the instance as an orphan (Unix seconds).
pub const TAG_QUARANTINED: &str = "aws-runner:quarantined-at";

/// What the runner launches with, from its configuration.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    /// This runner's id (the ownership tag).
    pub runner_id: String,
    /// The region, to check subnets' zones.
    pub region: String,
    /// The VPC.
    pub vpc_id: String,
    /// The environments' security group.
    pub security_group_id: String,
    /// The environments' instance profile, a name or an ARN.
    pub instance_profile: String,
    /// The AMI: an id, or `resolve:ssm:<parameter>`.
    pub ami: String,
    /// Instances per DescribeInstances page.
    pub describe_page_size: i32,
    /// RunInstances per second and burst.
    pub launch_rate: (f64, u32),
    /// Mutating calls per second and burst.
    pub mutate_rate: (f64, u32),
    /// Describe calls per second (burst: twice that, at least 1).
    pub describe_rate: f64,
}

fn limiter(per_second: f64, burst: u32) -> DefaultDirectRateLimiter {
    let period = Duration::from_secs_f64(1.0 / per_second.max(0.001));
    let burst = NonZeroU32::new(burst.max(1)).expect("burst is at least 1");
    RateLimiter::direct(
        Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(burst),
    )
}

/// The `Compute` trait on EC2.
pub struct Ec2Compute {
    client: Client,
    /// The same client without the SDK's retries: launches and mutations
    /// retry here, each attempt through its token bucket.
    gated: Client,
    settings: Ec2Settings,
    leadership: Arc<Leadership>,
    launches: DefaultDirectRateLimiter,
    mutations: Arc<DefaultDirectRateLimiter>,
    /// Start, stop and terminate, batched (through `mutations`).
    batched: Arc<Mutations>,
    describes: DefaultDirectRateLimiter,
    offerings: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    root_devices: Mutex<HashMap<String, String>>,
    /// One cache fill at a time: concurrent misses wait for the first
    /// lookup instead of each making their own.
    filling: tokio::sync::Mutex<()>,
    /// Instances wearing the runner's tags without its profile and group,
    /// already logged.
    foreign: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Ec2Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Compute")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A failed DescribeInstances.
type DescribeError = aws_sdk_ec2::error::SdkError<
    aws_sdk_ec2::operation::describe_instances::DescribeInstancesError,
    aws_sdk_ec2::config::http::HttpResponse,
>;
type DescribeInstancesFluentBuilder =
    aws_sdk_ec2::operation::describe_instances::builders::DescribeInstancesFluentBuilder;

const OFFERINGS_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_ROOT_DEVICE: &str = "/dev/xvda";

fn classify<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    err: aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> ComputeError {
    AwsError::new(err).into()
}

/// Whether another attempt of the same request may succeed: throttling,
/// 5xx and transport failures, not a definite answer.
fn transient<E: ProvideErrorMetadata>(
    err: &aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> bool {
    err.as_service_error()
        .and_then(|e| e.code())
        .is_none_or(transient_code)
}

/// The instance profile by ARN or by name.
fn profile_spec(profile: &str) -> IamInstanceProfileSpecification {
    if profile.starts_with("arn:") {
        IamInstanceProfileSpecification::builder()
            .arn(profile)
            .build()
    } else {
        IamInstanceProfileSpecification::builder()
            .name(profile)
            .build()
    }
}

/// Where launches go: the runner's configured image, group and profile.
#[derive(Debug, Clone, Copy)]
pub struct RunPlacement<'a> {
    /// The AMI.
    pub ami: &'a str,
    /// The environments' security group.
    pub security_group_id: &'a str,
    /// The environments' instance profile (ARN or name).
    pub instance_profile: &'a str,
}

/// What every launch asks for, shared by the launch and `runnerd doctor`'s
/// DryRun: one instance of `instance_type` from the AMI in `subnet` with the
/// environments' group and profile, IMDSv2 required with a hop limit of 1 (a
/// container on the instance cannot reach the instance's credentials), an
/// encrypted gp3 root disk (when the AMI's root device is known: `(device, GiB)`), and `tags`
/// on the instance and its volumes.
pub fn run_request(
    client: &Client,
    placement: RunPlacement<'_>,
    instance_type: &str,
    subnet: &str,
    root: Option<(String, i32)>,
    tags: Vec<Tag>,
) -> aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder {
    let root = root.map(|(device, gib)| {
        BlockDeviceMapping::builder()
            .device_name(device)
            .ebs(
                EbsBlockDevice::builder()
                    .volume_size(gib)
                    .volume_type(VolumeType::Gp3)
                    .encrypted(true)
                    .delete_on_termination(true)
                    .build(),
            )
            .build()
    });
    client
        .run_instances()
        .image_id(placement.ami)
        .instance_type(InstanceType::from(instance_type))
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet)
        .security_group_ids(placement.security_group_id)
        .iam_instance_profile(profile_spec(placement.instance_profile))
        .set_block_device_mappings(root.map(|r| vec![r]))
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .http_put_response_hop_limit(1)
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(tags.clone()))
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                .set_tags(Some(tags))
                .build(),
        )
}

/// The tags of a launch, on the instance and its volumes: this runner's
/// ownership tag (what observation filters on and IAM conditions on), the
/// environment and attempt (how an interrupted launch is found again), and a
/// `Name` for the console. Built here only, for the launch, `doctor`'s
/// DryRun and the bench's baseline alike.
pub fn launch_tags(runner_id: &str, environment: &str, attempt: u32) -> Vec<Tag> {
    vec![
        tag(TAG_RUNNER, runner_id),
        tag(TAG_ENVIRONMENT, environment),
        tag(TAG_ATTEMPT, attempt.to_string()),
        tag(TAG_MANAGED_BY, "aws-runner"),
        tag("Name", format!("aws-runner-{environment}")),
    ]
}

/// Attempts of one launch or mutation.
const ATTEMPTS: u32 = 4;

/// Why a gated call did not go out or failed.
#[derive(Debug)]
enum Gate<E> {
    /// Leadership lapsed before the call could leave (the bucket wait may
    /// outlast it): nothing was sent.
    NotLeading,
    /// EC2 answered with an error, or could not be reached.
    Sdk(Box<aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>),
}

impl<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static> Gate<E> {
    fn into_compute(self) -> ComputeError {
        match self {
            Self::NotLeading => ComputeError::Fenced,
            Self::Sdk(err) => classify(*err),
        }
    }
}

/// Sends a launch or mutation: every attempt, retries included, first takes
/// a token from `bucket`, so EC2 never sees more than the bucket allows,
/// then checks leadership at the moment it leaves (the wait may outlast the
/// lease's local validity); transient failures are retried with full-jitter
/// backoff, a bounded number of times, with the same request (same client
/// token). The SDK's retries would skip the bucket, so this is a loop of its
/// own, kept apart from `runner_core::retry`: every attempt, retries
/// included, waits for a bucket token and then rechecks leadership, and
/// what ends it early is the loss of leadership, not a shutdown token.
async fn gated<T, E, Fut>(
    bucket: &DefaultDirectRateLimiter,
    leadership: &Leadership,
    mut send: impl FnMut() -> Fut,
) -> Result<T, Gate<E>>
where
    E: ProvideErrorMetadata,
    Fut: std::future::Future<
            Output = Result<
                T,
                aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
            >,
        >,
{
    let backoff = runner_core::backoff::Backoff {
        base: Duration::from_millis(200),
        max: Duration::from_secs(5),
    };
    let mut attempt = 1;
    loop {
        bucket.until_ready().await;
        if !leadership.is_leader() {
            return Err(Gate::NotLeading);
        }
        match send().await {
            Err(err) if attempt < ATTEMPTS && transient(&err) && leadership.is_leader() => {
                tokio::time::sleep(backoff.full_jitter(attempt)).await;
                attempt += 1;
            }
            result => return result.map_err(|err| Gate::Sdk(Box::new(err))),
        }
    }
}

fn state(name: Option<&InstanceStateName>) -> InstanceState {
    match name {
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        _ => InstanceState::Pending,
    }
}

fn tag(key: &str, value: impl Into<String>) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// Reads an instance the runner launched; `None` when its tags are not ours
/// or are malformed.
fn instance(i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let tags: HashMap<&str, &str> = i
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)))
        .collect();
    let environment: EnvironmentId = tags.get(TAG_ENVIRONMENT)?.parse().ok()?;
    let attempt = tags.get(TAG_ATTEMPT)?.parse().ok()?;
    let quarantined_at = tags
        .get(TAG_QUARANTINED)
        .and_then(|t| t.parse::<u64>().ok())
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
    Some(Instance {
        id: i.instance_id()?.to_owned(),
        environment,
        attempt,
        availability_zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_owned(),
        subnet_id: i.subnet_id().unwrap_or_default().to_owned(),
        private_ip: i.private_ip_address().map(str::to_owned),
        state: state(i.state().and_then(|s| s.name())),
        quarantined_at,
        launched_at: i.launch_time().and_then(|t| SystemTime::try_from(*t).ok()),
        // What the instance wrote about itself: untrusted, parsed and scrubbed.
        report: Report::from_tags(tags.iter().map(|(k, v)| (*k, *v))),
    })
}

/// Whether the instance profile `arn` (as DescribeInstances shows it) is the
/// configured one, given as an ARN or a name.
fn same_profile(arn: &str, configured: &str) -> bool {
    if configured.starts_with("arn:") {
        arn == configured
    } else {
        arn.rsplit('/').next() == Some(configured)
    }
}

/// Whether a described instance wearing the runner's tags was launched as
/// the runner launches: with the environments' instance profile and security
/// group. A terminated instance has neither any more and is let through:
/// nothing can be done to it, and a reconcile waits to see it go.
fn placed_like_ours(i: &aws_sdk_ec2::types::Instance, settings: &Ec2Settings) -> bool {
    if matches!(
        state(i.state().and_then(|s| s.name())),
        InstanceState::ShuttingDown | InstanceState::Terminated
    ) {
        return true;
    }
    let profile = i
        .iam_instance_profile()
        .and_then(|p| p.arn())
        .is_some_and(|arn| same_profile(arn, &settings.instance_profile));
    let group = i
        .security_groups()
        .iter()
        .any(|g| g.group_id() == Some(settings.security_group_id.as_str()));
    profile && group
}

/// The bootstrap script every instance runs (`deploy/bootstrap.sh`).
pub const BOOTSTRAP: &str = include_str!("../../../deploy/bootstrap.sh");

/// `value` as one single-quoted shell word: bash expands nothing inside
/// single quotes, and a `'` ends the quote, is escaped, and reopens it.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The instance's user data: the bootstrap script after shell assignments
/// saying what to check out and from which secret. It holds no secret: the
/// git credential reaches the instance through its own secret. The
/// repository URL must be canonical (`validate::repository_url`); the
/// credential's scope, its origin, is computed here so that the script
/// never parses the URL.
pub fn user_data(request: &LaunchRequest, region: &str) -> Result<String, ComputeError> {
    let url = validate::repository_url("spec.content.repository_url", &request.repository_url)
        .map_err(|err| ComputeError::Rejected(err.to_string()))?;
    let origin = validate::repository_origin(&url);
    let (branch, commit) = match &request.revision {
        Revision::Default => ("", ""),
        Revision::Branch(b) => (b.as_str(), ""),
        Revision::Commit(c) => ("", c.as_str()),
    };
    let mut out = String::from("#!/bin/bash\n");
    for (name, value) in [
        (
            "AWS_RUNNER_ENVIRONMENT_ID",
            request.environment.to_string().as_str(),
        ),
        ("AWS_RUNNER_REPOSITORY_URL", url.as_str()),
        ("AWS_RUNNER_REPOSITORY_ORIGIN", origin.as_str()),
        ("AWS_RUNNER_BRANCH", branch),
        ("AWS_RUNNER_COMMIT", commit),
        (
            "AWS_RUNNER_SECRET_ID",
            request.checkout_secret.as_deref().unwrap_or_default(),
        ),
        ("AWS_RUNNER_REGION", region),
    ] {
        out.push_str(name);
        out.push('=');
        out.push_str(&shell_quote(value));
        out.push('\n');
    }
    out.push_str(BOOTSTRAP);
    Ok(out)
}

impl Ec2Compute {
    /// EC2 with `settings`, mutating only while `leadership` holds.
    pub fn new(client: Client, settings: Ec2Settings, leadership: Arc<Leadership>) -> Self {
        let mutations = Arc::new(limiter(settings.mutate_rate.0, settings.mutate_rate.1));
        let gated = Client::from_conf(
            client
                .config()
                .to_builder()
                .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
                .build(),
        );
        Self {
            launches: limiter(settings.launch_rate.0, settings.launch_rate.1),
            batched: Mutations::new(gated.clone(), mutations.clone(), leadership.clone()),
            mutations,
            describes: limiter(
                settings.describe_rate,
                (settings.describe_rate * 2.0).ceil() as u32,
            ),
            gated,
            client,
            settings,
            leadership,
            offerings: Mutex::new(HashMap::new()),
            root_devices: Mutex::new(HashMap::new()),
            filling: tokio::sync::Mutex::new(()),
            foreign: Mutex::new(HashSet::new()),
        }
    }

    fn lead(&self) -> Result<(), ComputeError> {
        if self.leadership.is_leader() {
            Ok(())
        } else {
            Err(ComputeError::Fenced)
        }
    }

    /// Sends a mutation (start, stop, terminate, tag) through the mutation
    /// bucket, only while leading.
    async fn mutate<T, E, Fut>(&self, send: impl FnMut() -> Fut) -> Result<(), ComputeError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        Fut: std::future::Future<
                Output = Result<
                    T,
                    aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
                >,
            >,
    {
        self.lead()?;
        gated(&self.mutations, &self.leadership, send)
            .await
            .map(drop)
            .map_err(Gate::into_compute)
    }

    fn owner_filter(&self) -> Filter {
        Filter::builder()
            .name(format!("tag:{TAG_RUNNER}"))
            .values(&self.settings.runner_id)
            .build()
    }

    async fn root_device(&self) -> String {
        let ami = &self.settings.ami;
        if ami.starts_with("resolve:ssm:") {
            return DEFAULT_ROOT_DEVICE.to_owned();
        }
        let cached = || self.root_devices.lock().expect("lock").get(ami).cloned();
        if let Some(device) = cached() {
            return device;
        }
        let _turn = self.filling.lock().await;
        if let Some(device) = cached() {
            return device;
        }
        self.describes.until_ready().await;
        let device = self
            .client
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .ok()
            .and_then(|o| {
                o.images()
                    .first()
                    .and_then(|i| i.root_device_name())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| DEFAULT_ROOT_DEVICE.to_owned());
        self.root_devices
            .lock()
            .expect("lock")
            .insert(ami.clone(), device.clone());
        device
    }

    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<Instance>, ComputeError> {
        let request = self
            .client
            .describe_instances()
            .set_filters(Some(filters))
            .max_results(self.settings.describe_page_size);
        self.read_pages(request).await.map_err(classify)
    }

    /// Every page of one DescribeInstances of `ids`.
    async fn describe_ids(&self, ids: &[String]) -> Result<Vec<Instance>, DescribeError> {
        let request = self
            .client
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .filters(self.owner_filter());
        self.read_pages(request).await
    }

    /// The environments' instances on every page of `request`, each page
    /// through the describe bucket.
    async fn read_pages(
        &self,
        request: DescribeInstancesFluentBuilder,
    ) -> Result<Vec<Instance>, DescribeError> {
        let mut pages = request.into_paginator().send();
        let mut out = Vec::new();
        loop {
            self.describes.until_ready().await;
            let Some(page) = pages.next().await else {
                return Ok(out);
            };
            out.extend(
                page?
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(|raw| self.ours(raw)),
            );
        }
    }

    /// The instance, if it is one of the environments' (tags, profile and
    /// group); one that only wears the tags is left alone, and said once.
    fn ours(&self, raw: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
        let found = instance(raw)?;
        if placed_like_ours(raw, &self.settings) {
            return Some(found);
        }
        if self.foreign.lock().expect("lock").insert(found.id.clone()) {
            tracing::warn!(
                instance.id = %found.id,
                env.id = %found.environment,
                "an instance wears this runner's tags without the environments' instance profile and security group: left alone"
            );
        }
        None
    }
}

#[async_trait]
impl Compute for Ec2Compute {
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, ComputeError> {
        self.lead()?;
        let root = self.root_device().await;
        let tags = launch_tags(
            &self.settings.runner_id,
            &request.environment.to_string(),
            request.attempt,
        );
        self.lead()?;
        let run = run_request(
            &self.gated,
            RunPlacement {
                ami: &self.settings.ami,
                security_group_id: &self.settings.security_group_id,
                instance_profile: &self.settings.instance_profile,
            },
            &request.instance_type,
            &request.subnet.id,
            Some((root, i32::try_from(request.disk_gib).unwrap_or(i32::MAX))),
            tags,
        )
        .client_token(&request.client_token)
        .user_data(
            base64::engine::general_purpose::STANDARD
                .encode(user_data(request, &self.settings.region)?),
        );
        let result = gated(&self.launches, &self.leadership, || run.clone().send()).await;
        let output = match result {
            Ok(output) => output,
            Err(Gate::NotLeading) => return Err(ComputeError::Fenced),
            Err(Gate::Sdk(err)) => {
                let err = *err;
                let code = err
                    .as_service_error()
                    .and_then(|e| e.code())
                    .unwrap_or_default()
                    .to_owned();
                if code == "InsufficientInstanceCapacity" || code == "Unsupported" {
                    let message = err
                        .as_service_error()
                        .and_then(|e| e.message())
                        .unwrap_or_default()
                        .to_owned();
                    return Err(ComputeError::NoCapacity {
                        zone: request.subnet.availability_zone.clone(),
                        message: format!("{code}: {message}"),
                    });
                }
                return Err(classify(err));
            }
        };
        output
            .instances()
            .first()
            .and_then(instance)
            .ok_or_else(|| {
                ComputeError::Rejected(
                    "RunInstances returned no instance with the runner's tags".into(),
                )
            })
    }

    async fn find_launch(
        &self,
        environment: EnvironmentId,
        attempt: u32,
    ) -> Result<Option<Instance>, ComputeError> {
        let found = self
            .describe(vec![
                self.owner_filter(),
                Filter::builder()
                    .name(format!("tag:{TAG_ENVIRONMENT}"))
                    .values(environment.to_string())
                    .build(),
                Filter::builder()
                    .name(format!("tag:{TAG_ATTEMPT}"))
                    .values(attempt.to_string())
                    .build(),
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(
                        ["pending", "running", "stopping", "stopped", "shutting-down"]
                            .map(str::to_owned)
                            .to_vec(),
                    ))
                    .build(),
            ])
            .await?;
        Ok(found.into_iter().next())
    }

    async fn observe(&self) -> Result<Vec<Instance>, ComputeError> {
        self.describe(vec![self.owner_filter()]).await
    }

    /// One DescribeInstances by id (with the owner filter), every page of
    /// it (an answer may be paged: moto pages 100 ids). EC2 fails the whole
    /// call for an id it does not know (yet): the batch is halved until that
    /// id is alone, and left out.
    async fn observe_ids(&self, instance_ids: &[String]) -> Result<Vec<Instance>, ComputeError> {
        let mut out = Vec::new();
        let mut batches = vec![instance_ids.to_vec()];
        while let Some(batch) = batches.pop() {
            if batch.is_empty() {
                continue;
            }
            let result = self.describe_ids(&batch).await;
            match result {
                Ok(found) => out.extend(found),
                Err(err)
                    if err
                        .as_service_error()
                        .and_then(ProvideErrorMetadata::code)
                        .is_some_and(|c| c.starts_with("InvalidInstanceID")) =>
                {
                    if batch.len() > 1 {
                        let (a, b) = batch.split_at(batch.len() / 2);
                        batches.push(a.to_vec());
                        batches.push(b.to_vec());
                    }
                }
                Err(err) => return Err(classify(err)),
            }
        }
        Ok(out)
    }

    async fn start(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.batched.submit(Op::Start, instance_id).await
    }

    async fn stop(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.batched.submit(Op::Stop, instance_id).await
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), ComputeError> {
        self.batched.submit(Op::Terminate, instance_id).await
    }

    async fn quarantine(&self, instance_id: &str, at: SystemTime) -> Result<(), ComputeError> {
        let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let request = self
            .gated
            .create_tags()
            .resources(instance_id)
            .tags(tag(TAG_QUARANTINED, secs.to_string()));
        self.mutate(|| request.clone().send()).await
    }

    async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>, ComputeError> {
        Placement {
            client: &self.client,
            region: &self.settings.region,
            vpc_id: &self.settings.vpc_id,
            security_group_id: &self.settings.security_group_id,
            bucket: Some(&self.describes),
        }
        .subnets(ids)
        .await
        .map_err(ComputeError::from)
    }

    async fn offered_zones(&self, instance_type: &str) -> Result<Vec<String>, ComputeError> {
        let cached = || {
            self.offerings
                .lock()
                .expect("lock")
                .get(instance_type)
                .filter(|(at, _)| at.elapsed() < OFFERINGS_TTL)
                .map(|(_, zones)| zones.clone())
        };
        if let Some(zones) = cached() {
            return Ok(zones);
        }
        let _turn = self.filling.lock().await;
        if let Some(zones) = cached() {
            return Ok(zones);
        }
        let mut pages = self
            .client
            .describe_instance_type_offerings()
            .location_type(LocationType::AvailabilityZone)
            .filters(
                Filter::builder()
                    .name("instance-type")
                    .values(instance_type)
                    .build(),
            )
            .into_paginator()
            .send();
        let mut zones = Vec::new();
        loop {
            self.describes.until_ready().await;
            let Some(page) = pages.next().await else {
                break;
            };
            let page = page.map_err(classify)?;
            zones.extend(
                page.instance_type_offerings()
                    .iter()
                    .filter_map(|o| o.location().map(str::to_owned)),
            );
        }
        zones.sort();
        self.offerings
            .lock()
            .expect("lock")
            .insert(instance_type.to_owned(), (Instant::now(), zones.clone()));
        Ok(zones)
    }

    async fn check(&self) -> Result<(), ComputeError> {
        self.describes.until_ready().await;
        self.client
            .describe_availability_zones()
            .send()
            .await
            .map(drop)
            .map_err(classify)
    }

    /// `GetConsoleOutput` (the latest output, decoded from base64; invalid
    /// UTF-8 replaced). Through the describe bucket: it mutates nothing.
    async fn console_output(&self, instance_id: &str) -> Result<String, ComputeError> {
        self.describes.until_ready().await;
        let output = self
            .client
            .get_console_output()
            .instance_id(instance_id)
            .latest(true)
            .send()
            .await
            .map_err(classify)?;
        let encoded = output.output().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|err| {
                ComputeError::Rejected(format!("console output is not base64: {err}"))
            })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
