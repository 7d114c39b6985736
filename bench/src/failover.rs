//! Leader failover with two replicas: SIGKILL the leader, time until the
//! standby holds the lease and reconciles.

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::world::{Tools, World};

/// One run.
#[derive(Debug, Clone)]
pub(crate) struct Failover {
    /// SIGKILL → the standby's "acquired the leader lease".
    pub(crate) acquired: Duration,
    /// SIGKILL → the standby's "leading: reconciling".
    pub(crate) leading: Duration,
}

pub(crate) async fn run(tools: &Tools, ttl: Duration, renew: Duration) -> anyhow::Result<Failover> {
    let world = World::new(tools).await?;
    let settings = [
        (
            "RUNNER_LEASE_TTL",
            humantime::format_duration(ttl).to_string(),
        ),
        (
            "RUNNER_LEASE_RENEW_INTERVAL",
            humantime::format_duration(renew).to_string(),
        ),
    ];
    let mut a = world.runnerd(tools, "a", &world.moto.url, &settings)?;
    a.wait_ready(Duration::from_secs(60)).await?;
    a.wait_log("leading: reconciling", Duration::from_secs(60))
        .await?;
    let mut b = world.runnerd(tools, "b", &world.moto.url, &settings)?;
    b.wait_ready(Duration::from_secs(60)).await?;
    // Let the standby settle into its polling rhythm.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let lease = aws_sdk_dynamodb::Client::new(&world.sdk)
        .get_item()
        .table_name(&world.infra.table)
        .key(
            "pk",
            AttributeValue::S(format!("RUNNER#{}", world.runner_id)),
        )
        .key("sk", AttributeValue::S("LEASE#0".into()))
        .send()
        .await?
        .item
        .context("no lease item")?;
    let holder = lease
        .get("holder")
        .and_then(|h| h.as_s().ok())
        .context("no lease holder")?
        .clone();
    let (mut leader, mut standby) = if holder.starts_with(&format!("pid-{}-", a.pid())) {
        (a, b)
    } else {
        (b, a)
    };
    let killed = SystemTime::now();
    leader.kill();
    let within = ttl * 3 + Duration::from_secs(10);
    let acquired = standby
        .wait_log_after("acquired the leader lease", killed, within)
        .await?;
    let leading = standby
        .wait_log_after("leading: reconciling", killed, within)
        .await?;
    standby.stop();
    Ok(Failover {
        acquired: acquired.duration_since(killed).unwrap_or_default(),
        leading: leading.duration_since(killed).unwrap_or_default(),
    })
}
