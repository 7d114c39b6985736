//! Many known environments: restart to ready, resident memory, CPU time and
//! AWS calls per resync pass. moto and the control plane are populated
//! directly (instances with the runner's tags, records in the runner's
//! format), then runnerd is started on them several times.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use aws_sdk_ec2::types::{
    IamInstanceProfileSpecification, InstanceType, ResourceType, Tag, TagSpecification,
};
use runner_aws::ec2::{TAG_ATTEMPT, TAG_ENVIRONMENT, TAG_MANAGED_BY, TAG_RUNNER};
use runner_core::model::{EnvironmentId, client_token};
use uuid::Uuid;

use crate::recording;
use crate::world::{self, Tools, World};

/// What was populated and how long it took.
pub(crate) struct Populated {
    pub(crate) world: World,
    pub(crate) environments: usize,
    pub(crate) took: Duration,
}

/// Creates `n` environments in the control plane, an instance for each in
/// moto and a launched record for each in the table.
pub(crate) async fn populate(tools: &Tools, n: usize) -> anyhow::Result<Populated> {
    let started = Instant::now();
    let world = Arc::new(World::new(tools).await?);
    let ids = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (world, ids, next) = (world.clone(), ids.clone(), next.clone());
        tasks.spawn(async move {
            let ec2 = aws_sdk_ec2::Client::new(&world.sdk);
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let id: Uuid = world.create_env().await?.parse()?;
                let index = id.as_u128() as usize % world.infra.subnets.len();
                let (subnet, zone) = world.infra.subnets[index].clone();
                let tags = vec![
                    tag(TAG_RUNNER, &world.runner_id),
                    tag(TAG_ENVIRONMENT, &id.to_string()),
                    tag(TAG_ATTEMPT, "1"),
                    tag(TAG_MANAGED_BY, "aws-runner"),
                ];
                // moto runs no user data: tagged as its bootstrap would.
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)?
                    .as_secs();
                let tags = tags
                    .into_iter()
                    .chain(recording::ready_tags(now))
                    .collect::<Vec<_>>();
                let instance = ec2
                    .run_instances()
                    .image_id(&world.infra.ami)
                    .instance_type(InstanceType::from(world::INSTANCE_TYPE))
                    .min_count(1)
                    .max_count(1)
                    .subnet_id(&subnet)
                    .security_group_ids(&world.infra.security_group_id)
                    // The runner observes only instances with its profile
                    // and group.
                    .iam_instance_profile(
                        IamInstanceProfileSpecification::builder()
                            .name(world::INSTANCE_PROFILE)
                            .build(),
                    )
                    .tag_specifications(
                        TagSpecification::builder()
                            .resource_type(ResourceType::Instance)
                            .set_tags(Some(tags))
                            .build(),
                    )
                    .send()
                    .await?
                    .instances()
                    .first()
                    .and_then(|i| i.instance_id())
                    .context("no instance id")?
                    .to_owned();
                ids.lock().await.push((id, subnet, zone, instance));
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let ids = std::mem::take(&mut *ids.lock().await);
    let dynamo = aws_sdk_dynamodb::Client::new(&world.sdk);
    let partition = format!("RUNNER#{}", world.runner_id);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_millis()
        .to_string();
    for chunk in ids.chunks(25) {
        let mut writes = Vec::new();
        for (id, subnet, zone, instance) in chunk {
            let s = |v: &str| AttributeValue::S(v.to_owned());
            let n = |v: &str| AttributeValue::N(v.to_owned());
            let item: HashMap<String, AttributeValue> = HashMap::from([
                ("pk".to_owned(), s(&partition)),
                ("sk".to_owned(), s(&format!("ENV#{id}"))),
                ("schema_version".to_owned(), n("1")),
                ("version".to_owned(), n("2")),
                ("spec_version".to_owned(), n("1")),
                ("updated_at".to_owned(), n(&now)),
                ("launch_attempt".to_owned(), n("1")),
                ("launch_subnet_id".to_owned(), s(subnet)),
                ("launch_zone".to_owned(), s(zone)),
                (
                    "launch_client_token".to_owned(),
                    s(&client_token(EnvironmentId(*id), 1)),
                ),
                ("launch_state".to_owned(), s("launched")),
                ("instance_id".to_owned(), s(instance)),
            ]);
            writes.push(
                WriteRequest::builder()
                    .put_request(PutRequest::builder().set_item(Some(item)).build()?)
                    .build(),
            );
        }
        let out = dynamo
            .batch_write_item()
            .request_items(&world.infra.table, writes)
            .send()
            .await?;
        if out.unprocessed_items().is_some_and(|u| !u.is_empty()) {
            bail!("moto left items of a batch unprocessed");
        }
    }
    let world = Arc::into_inner(world).context("populate tasks still hold the world")?;
    Ok(Populated {
        world,
        environments: ids.len(),
        took: started.elapsed(),
    })
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// One start of runnerd on the populated state.
#[derive(Debug, Clone)]
pub(crate) struct SteadyRun {
    /// Process spawned → `/readyz` 200.
    pub(crate) ready: Duration,
    /// Of which spent in DescribeInstances calls (moto).
    pub(crate) ready_describing: Duration,
    /// Ready → every environment reconciled and its status delivered.
    pub(crate) settled: Duration,
    /// Resident memory and its peak after the passes, MiB.
    pub(crate) rss: f64,
    pub(crate) hwm: f64,
    /// CPU time per resync pass.
    pub(crate) cpu_per_pass: Duration,
    /// Mean wall time of one page of a full describe (moto).
    pub(crate) describe: Duration,
    /// AWS calls per pass by operation.
    pub(crate) calls_per_pass: BTreeMap<String, f64>,
    /// DescribeInstances per pass by kind (see `recording::describe_kind`).
    pub(crate) describes_per_pass: BTreeMap<String, f64>,
    /// Instance records the DescribeInstances answers of a pass held.
    pub(crate) described_per_pass: f64,
    /// DynamoDB Scans over the whole run, start-up included.
    pub(crate) scans: usize,
}

/// Starts runnerd on `populated`, measures, stops it gracefully.
pub(crate) async fn run(
    tools: &Tools,
    populated: &Populated,
    resync: Duration,
    passes: usize,
) -> anyhow::Result<SteadyRun> {
    let world = &populated.world;
    let n = populated.environments;
    let proxy = recording::start(&world.moto.url).await?;
    let settings = [(
        "RUNNER_RESYNC_INTERVAL",
        humantime::format_duration(resync).to_string(),
    )];
    let mut runnerd = world.runnerd(tools, "steady", &proxy.url(), &settings)?;
    let runnerd_started = runnerd.started;
    let ready = runnerd
        .wait_ready(Duration::from_secs(300) + Duration::from_millis(20) * n as u32)
        .await?;
    let ready_at = runnerd.started + ready;
    let ready_describing = proxy
        .calls()
        .iter()
        .filter(|c| c.operation == "DescribeInstances" && c.end <= ready_at)
        .map(|c| c.end - c.start)
        .sum();

    // Settled: every environment reconciled once and every status delivered.
    // At 10,000 on this machine, reconciles before the first full view ran at
    // about 7 per second (each waits for a by-id describe).
    let deadline =
        Instant::now() + Duration::from_secs(300) + Duration::from_millis(250) * n as u32;
    loop {
        let reconciled = runnerd.metric("runner_reconciles_total").await?;
        let pending = runnerd.metric("runner_status_updates_pending").await?;
        let delivered = runnerd.metric("runner_status_updates_total").await?;
        if reconciled >= n as f64 && delivered >= n as f64 && pending == 0.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("not settled: {reconciled} reconciles, {delivered} statuses, {pending} pending");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = ready_at.elapsed();

    // `passes` resync intervals after settling, timed by the clock (a full
    // describe of a large fleet on moto can outlast an interval, so its
    // pages do not mark the passes). Calls are counted by arrival, those
    // still in flight at the end included.
    let first = Instant::now();
    let cpu_first = runnerd.cpu()?;
    tokio::time::sleep(resync * passes as u32).await;
    let last = Instant::now();
    let cpu_last = runnerd.cpu()?;
    let (rss, hwm) = runnerd.memory()?;
    let calls = proxy.calls();
    let mut operations: Vec<&str> = calls.iter().map(|c| c.operation.as_str()).collect();
    operations.sort_unstable();
    operations.dedup();
    let mut calls_per_pass = BTreeMap::new();
    for op in operations {
        let arrived = proxy
            .seen(op)
            .into_iter()
            .filter(|at| *at >= first && *at < last)
            .count();
        if arrived > 0 {
            calls_per_pass.insert(op.to_owned(), arrived as f64 / passes as f64);
        }
    }
    // By kind and instances returned: the completed calls only.
    let mut describes_per_pass = BTreeMap::new();
    let mut described_per_pass = 0.0;
    for call in calls.iter().filter(|c| c.start >= first && c.start < last) {
        if let Some(kind) = recording::describe_kind(call) {
            *describes_per_pass.entry(kind.to_owned()).or_insert(0.0) += 1.0 / passes as f64;
        }
        described_per_pass += call.instances as f64 / passes as f64;
    }
    // A page of a full describe, on average over the whole run.
    let pages: Vec<Duration> = calls
        .iter()
        .filter(|c| c.operation == "DescribeInstances" && c.label.is_none())
        .map(|c| c.end - c.start)
        .collect();
    let describe = pages
        .iter()
        .sum::<Duration>()
        .checked_div(pages.len() as u32)
        .unwrap_or_default();
    runnerd.stop();
    let _ = recording::save(
        &proxy,
        runnerd_started,
        &tools.work_dir.join(format!("steady-{n}-calls.csv")),
    );
    let scans = proxy
        .calls()
        .iter()
        .filter(|c| c.operation == "DynamoDB_20120810.Scan")
        .count();
    Ok(SteadyRun {
        ready,
        ready_describing,
        settled,
        rss,
        hwm,
        cpu_per_pass: (cpu_last - cpu_first) / passes as u32,
        describe,
        calls_per_pass,
        describes_per_pass,
        described_per_pass,
        scans,
    })
}
