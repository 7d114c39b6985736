//! Launch overhead (runnerd against a minimal program issuing the same
//! essential calls) and runner-side latency from the watch event to
//! RunInstances.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, TransactWriteItem};
use base64::Engine as _;
use runner_aws::ec2::{RunPlacement, launch_tags, run_request};
use runner_core::model::{EnvironmentId, Revision, Subnet, client_token};
use runner_core::traits::LaunchRequest;
use testkit::proxy::{Call, FaultProxy};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::recording;
use crate::world::{self, Tools, World};

/// runnerd's default `RUNNER_CONCURRENCY`, which the baseline matches.
pub(crate) const CONCURRENCY: usize = 32;

/// Token buckets high enough never to hold a launch back.
pub(crate) fn generous_buckets() -> Vec<(&'static str, String)> {
    [
        ("RUNNER_EC2_LAUNCH_RATE", "1000"),
        ("RUNNER_EC2_LAUNCH_BURST", "1000"),
        ("RUNNER_EC2_MUTATE_RATE", "1000"),
        ("RUNNER_EC2_MUTATE_BURST", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect()
}

/// Waits until `n` RunInstances were accepted; the last acceptance.
async fn accepted(proxy: &FaultProxy, n: usize, within: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    while recording::count_ok(proxy, "RunInstances") < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} RunInstances accepted within {within:?}",
                recording::count_ok(proxy, "RunInstances")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy
        .calls()
        .iter()
        .filter(|c| c.ok && c.operation == "RunInstances")
        .map(|c| c.end)
        .max()
        .context("no RunInstances")
}

/// One side of the launch overhead: its time and its AWS calls by operation.
#[derive(Debug, Clone)]
pub(crate) struct Launched {
    pub(crate) took: Duration,
    pub(crate) calls: BTreeMap<String, usize>,
    /// runnerd only: leadership terms that ended during the launches
    /// ("no longer leading: reconciling stopped": the lease was lost, or its
    /// local validity ran out before a renewal came back).
    pub(crate) lease_losses: usize,
    /// runnerd only: of which with the lease lost in the table ("lost the
    /// leader lease", "the leader lease ran out locally").
    pub(crate) lease_lost_in_store: usize,
}

fn by_operation(proxy: &FaultProxy, from: Instant, to: Instant) -> BTreeMap<String, usize> {
    let mut calls = BTreeMap::new();
    for call in proxy
        .calls()
        .iter()
        .filter(|c| c.start >= from && c.start <= to)
    {
        *calls.entry(call.operation.clone()).or_insert(0) += 1;
    }
    calls
}

/// Creates `n` environments, `parallel` at a time.
async fn create_many(world: &Arc<World>, n: usize, parallel: usize) -> anyhow::Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let (world, next) = (world.clone(), next.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                world.create_env().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// runnerd: from the first environment created to the last RunInstances accepted.
pub(crate) async fn runnerd_launch(tools: &Tools, n: usize) -> anyhow::Result<Launched> {
    let world = Arc::new(World::new(tools).await?);
    let proxy = recording::start(&world.moto.url).await?;
    let mut runnerd = world.runnerd(tools, "launch", &proxy.url(), &generous_buckets())?;
    runnerd.wait_ready(Duration::from_secs(60)).await?;
    runnerd
        .wait_log("leading: reconciling", Duration::from_secs(60))
        .await?;
    let started = Instant::now();
    let started_at = std::time::SystemTime::now();
    create_many(&world, n, 16).await?;
    let within = Duration::from_secs(60) + Duration::from_secs(1) * n as u32;
    let last = accepted(&proxy, n, within).await?;
    let lease_losses = runnerd.log_count("no longer leading: reconciling stopped", started_at);
    let lease_lost_in_store = runnerd.log_count("lost the leader lease", started_at)
        + runnerd.log_count("the leader lease ran out locally", started_at);
    runnerd.stop();
    Ok(Launched {
        took: last - started,
        calls: by_operation(&proxy, started, last),
        lease_losses,
        lease_lost_in_store,
    })
}

/// The lease the baseline's writes are fenced on, as runnerd's: the
/// runner's `LEASE#0` item with a holder, an epoch and an expiry.
const BASELINE_HOLDER: &str = "baseline";

/// The minimal program: per environment a fenced conditional intent write,
/// RunInstances with the runner's tags and settings, a fenced conditional
/// result write (each write a `TransactWriteItems` with a condition check on
/// the lease, as runnerd's); `CONCURRENCY` at a time. From start to the
/// last RunInstances accepted.
pub(crate) async fn baseline_launch(tools: &Tools, n: usize) -> anyhow::Result<Launched> {
    let world = World::new(tools).await?;
    let proxy = recording::start(&world.moto.url).await?;
    let sdk = world::sdk(&proxy.url()).await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let far = std::time::SystemTime::now() + Duration::from_secs(86_400);
    let far_ms = far.duration_since(std::time::UNIX_EPOCH)?.as_millis();
    // Set up directly, like runnerd's lease acquisition before its launches.
    aws_sdk_dynamodb::Client::new(&world.sdk)
        .put_item()
        .table_name(&world.infra.table)
        .item(
            "pk",
            AttributeValue::S(format!("RUNNER#{}", world.runner_id)),
        )
        .item("sk", AttributeValue::S("LEASE#0".into()))
        .item("holder", AttributeValue::S(BASELINE_HOLDER.into()))
        .item("epoch", AttributeValue::N("1".into()))
        .item("expires_at", AttributeValue::N(far_ms.to_string()))
        .send()
        .await?;
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let queue = Arc::new(Mutex::new(ids.into_iter().enumerate()));
    let world = Arc::new(world);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (queue, ec2, dynamo, world) =
            (queue.clone(), ec2.clone(), dynamo.clone(), world.clone());
        tasks.spawn(async move {
            loop {
                let Some((i, id)) = queue.lock().await.next() else {
                    return anyhow::Ok(());
                };
                let (subnet, zone) = world.infra.subnets[i % world.infra.subnets.len()].clone();
                launch_one(
                    &world,
                    &ec2,
                    &dynamo,
                    EnvironmentId(id),
                    Subnet {
                        id: subnet,
                        availability_zone: zone,
                    },
                )
                .await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let last = proxy
        .calls()
        .iter()
        .filter(|c| c.ok && c.operation == "RunInstances")
        .map(|c| c.end)
        .max()
        .context("no RunInstances")?;
    if recording::count_ok(&proxy, "RunInstances") != n {
        bail!(
            "the baseline launched {} of {n}",
            recording::count_ok(&proxy, "RunInstances")
        );
    }
    Ok(Launched {
        took: last - started,
        calls: by_operation(&proxy, started, last),
        lease_losses: 0,
        lease_lost_in_store: 0,
    })
}

/// `put` in a transaction with the lease check runnerd fences its writes on.
async fn fenced_put(
    world: &World,
    dynamo: &aws_sdk_dynamodb::Client,
    item: HashMap<String, AttributeValue>,
    condition: &str,
    values: Option<HashMap<String, AttributeValue>>,
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let check = ConditionCheck::builder()
        .table_name(&world.infra.table)
        .key(
            "pk",
            AttributeValue::S(format!("RUNNER#{}", world.runner_id)),
        )
        .key("sk", AttributeValue::S("LEASE#0".into()))
        .condition_expression("holder = :holder AND epoch = :epoch AND expires_at > :now")
        .expression_attribute_values(":holder", AttributeValue::S(BASELINE_HOLDER.into()))
        .expression_attribute_values(":epoch", AttributeValue::N("1".into()))
        .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
        .build()?;
    let put = Put::builder()
        .table_name(&world.infra.table)
        .set_item(Some(item))
        .condition_expression(condition)
        .set_expression_attribute_values(values)
        .build()?;
    // moto answers some concurrent transactions with an HTML 500 (runnerd
    // retries those too): retried, and a cancellation after such an answer
    // means the earlier attempt was applied.
    let mut after_500 = false;
    for _ in 0..10 {
        let result = dynamo
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(check.clone())
                    .build(),
            )
            .transact_items(TransactWriteItem::builder().put(put.clone()).build())
            .send()
            .await;
        match result {
            Ok(_) => return Ok(()),
            Err(err)
                if err
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() >= 500) =>
            {
                after_500 = true;
            }
            Err(err)
                if after_500
                    && err
                        .as_service_error()
                        .is_some_and(|e| e.is_transaction_canceled_exception()) =>
            {
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        }
    }
    bail!("a fenced write failed 10 times with a server error")
}

fn record(world: &World, id: EnvironmentId, version: u64) -> HashMap<String, AttributeValue> {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: u64| AttributeValue::N(v.to_string());
    HashMap::from([
        ("pk".to_owned(), s(&format!("RUNNER#{}", world.runner_id))),
        ("sk".to_owned(), s(&format!("ENV#{id}"))),
        ("schema_version".to_owned(), n(1)),
        ("version".to_owned(), n(version)),
        ("spec_version".to_owned(), n(1)),
    ])
}

async fn launch_one(
    world: &World,
    ec2: &aws_sdk_ec2::Client,
    dynamo: &aws_sdk_dynamodb::Client,
    id: EnvironmentId,
    subnet: Subnet,
) -> anyhow::Result<()> {
    let token = client_token(id, 1);
    let mut intent = record(world, id, 1);
    intent.insert("launch_attempt".into(), AttributeValue::N("1".into()));
    intent.insert(
        "launch_subnet_id".into(),
        AttributeValue::S(subnet.id.clone()),
    );
    intent.insert(
        "launch_zone".into(),
        AttributeValue::S(subnet.availability_zone.clone()),
    );
    intent.insert(
        "launch_client_token".into(),
        AttributeValue::S(token.clone()),
    );
    intent.insert("launch_state".into(), AttributeValue::S("intended".into()));
    fenced_put(
        world,
        dynamo,
        intent.clone(),
        "attribute_not_exists(pk)",
        None,
    )
    .await?;
    let request = LaunchRequest {
        environment: id,
        attempt: 1,
        client_token: token.clone(),
        subnet: subnet.clone(),
        instance_type: world::INSTANCE_TYPE.to_owned(),
        disk_gib: 30,
        repository_url: world::REPOSITORY.to_owned(),
        revision: Revision::Default,
        checkout_secret: None,
    };
    let tags = launch_tags(&world.runner_id, &id.to_string(), 1);
    // What runnerd asks for, built by the same function.
    let launched = run_request(
        ec2,
        RunPlacement {
            ami: &world.infra.ami,
            security_group_id: &world.infra.security_group_id,
            instance_profile: world::INSTANCE_PROFILE,
        },
        world::INSTANCE_TYPE,
        &subnet.id,
        Some(("/dev/xvda".to_owned(), world::DISK_GIB as i32)),
        tags,
    )
    .client_token(&token)
    .user_data(
        base64::engine::general_purpose::STANDARD
            .encode(runner_aws::ec2::user_data(&request, world::REGION)?),
    )
    .send()
    .await?;
    let instance_id = launched
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .context("no instance id")?
        .to_owned();
    let mut result = intent;
    result.insert("version".into(), AttributeValue::N("2".into()));
    result.insert("launch_state".into(), AttributeValue::S("launched".into()));
    result.insert("instance_id".into(), AttributeValue::S(instance_id));
    fenced_put(
        world,
        dynamo,
        result,
        "version = :v",
        Some(HashMap::from([(
            ":v".to_owned(),
            AttributeValue::N("1".into()),
        )])),
    )
    .await?;
    Ok(())
}

/// Latencies of one run, in milliseconds.
#[derive(Debug, Clone)]
pub(crate) struct Latencies {
    /// Environment created → RunInstances arrived at the proxy.
    pub(crate) raw: Vec<f64>,
    /// The same minus the time this environment's own AWS calls spent in
    /// the proxy and moto before it.
    pub(crate) runner_side: Vec<f64>,
    /// Achieved creation rate.
    pub(crate) rate: f64,
    /// RunInstances per second that runnerd sustained: launches over the
    /// time from the first creation to the last RunInstances request.
    pub(crate) throughput: f64,
}

/// Creates `n` environments at `per_second`; per environment, the time from
/// its creation to its RunInstances leaving runnerd.
pub(crate) async fn latency(tools: &Tools, n: usize, per_second: f64) -> anyhow::Result<Latencies> {
    let world = Arc::new(World::new(tools).await?);
    let proxy = recording::start(&world.moto.url).await?;
    let mut runnerd = world.runnerd(tools, "latency", &proxy.url(), &generous_buckets())?;
    runnerd.wait_ready(Duration::from_secs(60)).await?;
    runnerd
        .wait_log("leading: reconciling", Duration::from_secs(60))
        .await?;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / per_second);
        tokio::time::sleep_until(due).await;
        let world = world.clone();
        tasks.spawn(async move {
            // The event is sent before the call returns: timing from the
            // call's start over-states the runner's latency by at most the
            // admin call.
            let at = Instant::now();
            world.create_env().await.map(|id| (id, at))
        });
    }
    let mut created: HashMap<Uuid, Instant> = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (id, at) = done??;
        created.insert(id.parse()?, at);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    accepted(
        &proxy,
        n,
        Duration::from_secs(120) + Duration::from_millis(200) * n as u32,
    )
    .await?;
    runnerd.stop();
    // For looking into the tail afterwards: every call, and when each
    // environment was created (same origin).
    let origin = start.into_std();
    let _ = recording::save(&proxy, origin, &tools.work_dir.join("latency-calls.csv"));
    let mut creations = String::from("environment,created_ms\n");
    for (id, at) in &created {
        let ms = at.saturating_duration_since(origin).as_secs_f64() * 1000.0;
        creations.push_str(&format!("{id},{ms:.1}\n"));
    }
    let _ = std::fs::write(tools.work_dir.join("latency-created.csv"), creations);
    let calls = proxy.calls();
    let mut by_env: HashMap<Uuid, Vec<&Call>> = HashMap::new();
    for call in &calls {
        if let Some(env) = recording::env(call) {
            by_env.entry(env).or_default().push(call);
        }
    }
    let mut raw = Vec::new();
    let mut runner_side = Vec::new();
    for (id, at) in created {
        let calls = by_env.get(&id).context("an environment without calls")?;
        let launch = calls
            .iter()
            .find(|c| c.operation == "RunInstances")
            .context("an environment without RunInstances")?;
        let before: Duration = calls
            .iter()
            .filter(|c| c.operation != "RunInstances" && c.start >= at && c.end <= launch.start)
            .map(|c| c.end - c.start)
            .sum();
        let total = launch.start - at;
        raw.push(total.as_secs_f64() * 1000.0);
        runner_side.push(total.saturating_sub(before).as_secs_f64() * 1000.0);
    }
    let last = calls
        .iter()
        .filter(|c| c.operation == "RunInstances")
        .map(|c| c.start)
        .max()
        .context("no RunInstances")?;
    let throughput = n as f64 / (last - start.into_std()).as_secs_f64();
    Ok(Latencies {
        raw,
        runner_side,
        rate,
        throughput,
    })
}
