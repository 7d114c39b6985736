//! A stop burst and a start burst: `n` running environments set to STOPPED
//! at once, then to RUNNING at once; the EC2 calls each burst cost, by
//! operation, and the instance records their describes returned.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runner_proto::admin::v1 as admin;
use runner_proto::pb::EnvironmentPhase as Phase;
use testkit::proxy::FaultProxy;

use crate::recording;
use crate::steady;
use crate::world::{Tools, World};

/// One burst: every environment's desired phase set at once until every
/// environment reported it.
#[derive(Debug, Clone)]
pub(crate) struct Burst {
    /// First admin call → the last environment reported the phase.
    pub(crate) took: Duration,
    /// AWS calls in that window, by operation.
    pub(crate) calls: BTreeMap<String, usize>,
    /// Instance records the window's DescribeInstances answers held.
    pub(crate) described: usize,
    /// Of which in describes of all the runner's instances (resync or term).
    pub(crate) described_full: usize,
}

/// One run: the stop burst and the start burst.
#[derive(Debug, Clone)]
pub(crate) struct BurstRun {
    pub(crate) environments: usize,
    pub(crate) stop: Burst,
    pub(crate) start: Burst,
    /// Populating took.
    pub(crate) populated: Duration,
}

/// Populates `n` running environments, starts runnerd (default settings) on
/// them, waits until all are reported RUNNING, then stops and starts them.
pub(crate) async fn run(tools: &Tools, n: usize) -> anyhow::Result<BurstRun> {
    let populated = steady::populate(tools, n).await?;
    let world = Arc::new(populated.world);
    let n = populated.environments;
    let proxy = recording::start(&world.moto.url).await?;
    let mut runnerd = world.runnerd(tools, "burst", &proxy.url(), &[])?;
    let within = Duration::from_secs(300) + Duration::from_millis(100) * n as u32;
    runnerd.wait_ready(within).await?;
    world.wait_all_phase(n, Phase::Running, within).await?;
    let ids: Vec<String> = world
        .admin
        .clone()
        .list_environments(admin::ListEnvironmentsRequest {
            runner_id: world.runner_id.clone(),
        })
        .await?
        .into_inner()
        .environments
        .into_iter()
        .filter_map(|e| e.environment.map(|e| e.id))
        .collect();
    let stop = burst(&world, &proxy, &ids, Phase::Stopped, within).await?;
    let start = burst(&world, &proxy, &ids, Phase::Running, within).await?;
    let origin = runnerd.started;
    runnerd.stop();
    let _ = recording::save(
        &proxy,
        origin,
        &tools.work_dir.join(format!("burst-{n}-calls.csv")),
    );
    Ok(BurstRun {
        environments: n,
        stop,
        start,
        populated: populated.took,
    })
}

async fn burst(
    world: &Arc<World>,
    proxy: &FaultProxy,
    ids: &[String],
    phase: Phase,
    within: Duration,
) -> anyhow::Result<Burst> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (world, id) = (world.clone(), id.clone());
        tasks.spawn(async move { world.set_phase(&id, phase).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let settled = world.wait_all_phase(ids.len(), phase, within).await?;
    // The proxy records an exchange when it completes: let the calls that
    // started before `settled` finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut calls = BTreeMap::new();
    let (mut described, mut described_full) = (0, 0);
    for call in proxy
        .calls()
        .iter()
        .filter(|c| c.start >= started && c.start <= settled)
    {
        *calls.entry(call.operation.clone()).or_insert(0) += 1;
        described += call.instances;
        if call.operation == "DescribeInstances" && call.label.is_none() {
            described_full += call.instances;
        }
    }
    Ok(Burst {
        took: settled - started,
        calls,
        described,
        described_full,
    })
}
