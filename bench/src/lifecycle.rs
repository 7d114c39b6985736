//! AWS calls per environment lifecycle (create → running → stopped →
//! running → deleted), by operation, and resident memory when idle.

use std::collections::BTreeMap;
use std::time::Duration;

use runner_proto::pb::EnvironmentPhase as Phase;

use crate::recording;
use crate::world::{Tools, World};

/// Calls made in the background whatever the environments do: the lease
/// renewals and the health checks.
pub(crate) const BACKGROUND: [&str; 3] = [
    "DynamoDB_20120810.UpdateItem",
    "DynamoDB_20120810.DescribeTable",
    "DescribeAvailabilityZones",
];

/// Lookups cached per process (the AMI's root device; the zones offering
/// the type, for an hour): the first launch of a process pays them.
pub(crate) const CACHED: [&str; 2] = ["DescribeImages", "DescribeInstanceTypeOfferings"];

/// One run.
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    /// Calls by operation during the lifecycle.
    pub(crate) calls: BTreeMap<String, usize>,
    /// Resident memory with no environment, after start-up, MiB.
    pub(crate) idle_rss: f64,
    /// How long the lifecycle took.
    pub(crate) took: Duration,
}

pub(crate) async fn run(tools: &Tools) -> anyhow::Result<Lifecycle> {
    let world = World::new(tools).await?;
    let proxy = std::sync::Arc::new(recording::start(&world.moto.url).await?);
    let _bootstraps = recording::stand_in_bootstraps(proxy.clone(), world.sdk.clone());
    let mut runnerd = world.runnerd(tools, "lifecycle", &proxy.url(), &[])?;
    runnerd.wait_ready(Duration::from_secs(60)).await?;
    runnerd
        .wait_log("leading: reconciling", Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle_rss, _) = runnerd.memory()?;

    let started = std::time::Instant::now();
    let id = world.create_env().await?;
    let within = Duration::from_secs(60);
    world.wait_phase(&id, Phase::Running, within).await?;
    world.set_phase(&id, Phase::Stopped).await?;
    world.wait_phase(&id, Phase::Stopped, within).await?;
    world.set_phase(&id, Phase::Running).await?;
    world.wait_phase(&id, Phase::Running, within).await?;
    world.set_phase(&id, Phase::Deleted).await?;
    world.wait_phase(&id, Phase::Deleted, within).await?;
    // The record is removed before DELETED is reported; let the last calls land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = started.elapsed();
    let recorded = proxy.calls();
    runnerd.stop();
    let mut calls = BTreeMap::new();
    for call in recorded.iter().filter(|c| c.start >= started) {
        *calls.entry(call.operation.clone()).or_insert(0) += 1;
    }
    Ok(Lifecycle {
        calls,
        idle_rss,
        took,
    })
}
