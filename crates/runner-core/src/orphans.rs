//! Orphans: instances tagged as this runner's whose environment the runner
//! neither knows nor holds a record of. They are first marked (a tag), and
//! terminated on a later pass once the grace period has passed, a bounded
//! number per pass. Only what observation returns is seen here, and it returns
//! only instances that carry this runner's tags AND were launched as the
//! runner launches (the environments' instance profile and security group;
//! see `runner_aws::ec2`): another instance wearing the tags is left alone.

use std::time::{Duration, SystemTime};

use crate::model::{Instance, InstanceState};
use crate::reconcile::Context;
use crate::traits::ComputeError;

/// How orphans are handled.
#[derive(Debug, Clone, Copy)]
pub struct OrphanPolicy {
    /// Time between marking and terminating.
    pub grace: Duration,
    /// Most terminations per pass.
    pub max_per_pass: usize,
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Newly marked.
    pub quarantined: usize,
    /// Terminated.
    pub terminated: usize,
}

fn is_orphan(ctx: &Context, instance: &Instance) -> bool {
    !matches!(
        instance.state,
        InstanceState::ShuttingDown | InstanceState::Terminated
    ) && ctx.desired.get(instance.environment).is_none()
        && !ctx.recorded().contains(&instance.environment)
}

/// One pass over the current observation.
pub async fn sweep(
    ctx: &Context,
    policy: OrphanPolicy,
    now: SystemTime,
) -> Result<Sweep, ComputeError> {
    let mut result = Sweep::default();
    for instance in ctx.observer.all().iter().filter(|i| is_orphan(ctx, i)) {
        match instance.quarantined_at {
            None => {
                ctx.compute.quarantine(&instance.id, now).await?;
                tracing::warn!(instance.id = %instance.id, env.id = %instance.environment, "marked an orphan instance for termination");
                result.quarantined += 1;
            }
            Some(at) if now.duration_since(at).unwrap_or_default() >= policy.grace => {
                if result.terminated >= policy.max_per_pass {
                    continue;
                }
                ctx.compute.terminate(&instance.id).await?;
                tracing::warn!(instance.id = %instance.id, env.id = %instance.environment, "terminated an orphan instance");
                result.terminated += 1;
            }
            Some(_) => {}
        }
    }
    Ok(result)
}
