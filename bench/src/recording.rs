//! The benchmarks' recording proxy: `testkit::proxy::FaultProxy` without
//! rules, labelling each exchange with the environment its request is about
//! (from the runner's tags and tag filters, DynamoDB keys or secret names)
//! or, for a DescribeInstances by instance id, with [`BY_ID`].

use std::collections::HashMap;

use runner_aws::ec2::TAG_ENVIRONMENT;
use testkit::proxy::{Call, FaultProxy};
use uuid::Uuid;

/// The label of a DescribeInstances that names instance ids.
pub(crate) const BY_ID: &str = "by-id";

/// Starts one on 127.0.0.1 in front of `upstream` (an http:// URL).
pub(crate) async fn start(upstream: &str) -> anyhow::Result<FaultProxy> {
    Ok(FaultProxy::start_labelled(upstream, |request| {
        if request.operation == "DescribeInstances" && request.params.contains_key("InstanceId.1") {
            return Some(BY_ID.to_owned());
        }
        environment(request.params, request.body).map(|id| id.to_string())
    })
    .await?)
}

/// Whether `operation` is an EC2 call that changes something (not a
/// `Describe*`; DynamoDB and other JSON-protocol targets have a dot).
pub(crate) fn ec2_mutation(operation: &str) -> bool {
    !operation.contains('.') && !operation.starts_with("Describe")
}

/// Whether `operation` is an EC2 read (`Describe*`).
pub(crate) fn ec2_read(operation: &str) -> bool {
    !operation.contains('.') && operation.starts_with("Describe")
}

/// The environment `call` is about, when its request names one.
pub(crate) fn env(call: &Call) -> Option<Uuid> {
    call.label.as_deref()?.parse().ok()
}

/// What kind of DescribeInstances `call` is: `full` (a page of a describe
/// of all the runner's instances), `by id`, or `one environment`; `None`
/// for other operations.
pub(crate) fn describe_kind(call: &Call) -> Option<&'static str> {
    if call.operation != "DescribeInstances" {
        return None;
    }
    Some(match call.label.as_deref() {
        None => "full (a page)",
        Some(BY_ID) => "by instance id",
        Some(_) => "one environment",
    })
}

/// Writes every recorded call to `path` as CSV (operation, label, later
/// page, start and duration in ms from `origin`, ok, instances returned),
/// for looking into a figure afterwards.
pub(crate) fn save(
    proxy: &FaultProxy,
    origin: std::time::Instant,
    path: &std::path::Path,
) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut out = String::from("operation,label,next_page,start_ms,duration_ms,ok,instances\n");
    for c in proxy.calls() {
        let _ = writeln!(
            out,
            "{},{},{},{:.1},{:.1},{},{}",
            c.operation,
            c.label.as_deref().unwrap_or(""),
            c.next_page,
            c.start.saturating_duration_since(origin).as_secs_f64() * 1000.0,
            (c.end - c.start).as_secs_f64() * 1000.0,
            c.ok,
            c.instances
        );
    }
    std::fs::write(path, out)
}

/// Successful calls of `op` so far.
pub(crate) fn count_ok(proxy: &FaultProxy, op: &str) -> usize {
    proxy
        .calls()
        .iter()
        .filter(|c| c.ok && c.operation == op)
        .count()
}

/// The environment a request is about: a tag or filter on the runner's
/// environment tag (EC2), an `ENV#<id>` key (DynamoDB) or an
/// `environments/<id>` secret name (Secrets Manager).
fn environment(params: &HashMap<String, String>, body: &[u8]) -> Option<Uuid> {
    let filter = format!("tag:{TAG_ENVIRONMENT}");
    for (key, value) in params {
        let value_key = if value == TAG_ENVIRONMENT && key.ends_with(".Key") {
            format!("{}.Value", key.trim_end_matches(".Key"))
        } else if *value == filter && key.ends_with(".Name") {
            format!("{}.Value.1", key.trim_end_matches(".Name"))
        } else {
            continue;
        };
        if let Some(id) = params.get(&value_key).and_then(|v| v.parse().ok()) {
            return Some(id);
        }
    }
    let text = std::str::from_utf8(body).ok()?;
    ["ENV#", "environments/"].iter().find_map(|marker| {
        let at = text.find(marker)? + marker.len();
        text.get(at..at + 36)?.parse().ok()
    })
}

/// The report tags of a bootstrap that checked out commit 0…0 at `now`
/// (Unix seconds), as `deploy/bootstrap.sh` writes them.
pub(crate) fn ready_tags(now: u64) -> Vec<aws_sdk_ec2::types::Tag> {
    use runner_core::report;
    let now = now.to_string();
    let commit = "0".repeat(40);
    [
        (report::TAG_STAGE, "ready"),
        (report::TAG_RESULT, "ok"),
        (report::TAG_AT, now.as_str()),
        (report::TAG_STARTED_AT, now.as_str()),
        (report::TAG_COMMIT, commit.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
    .collect()
}

/// Stops its task when dropped.
pub(crate) struct StandIn(tokio::task::JoinHandle<()>);

impl Drop for StandIn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// moto runs no user data: stands in for the bootstrap of every instance
/// the runner launches through `proxy`, tagging it ready (one `CreateTags`
/// straight to moto, not through the proxy, for the instances launched in
/// each 200 ms), so that environments reach RUNNING as with a real
/// bootstrap and the figures count only the runner's calls.
pub(crate) fn stand_in_bootstraps(
    proxy: std::sync::Arc<FaultProxy>,
    sdk: aws_config::SdkConfig,
) -> StandIn {
    StandIn(tokio::spawn(async move {
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let mut tagged = std::collections::HashSet::new();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let fresh: Vec<String> = proxy
                .calls()
                .iter()
                .flat_map(|c| c.launched.iter())
                .filter(|id| !tagged.contains(*id))
                .cloned()
                .collect();
            if fresh.is_empty() {
                continue;
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let sent = ec2
                .create_tags()
                .set_resources(Some(fresh.clone()))
                .set_tags(Some(ready_tags(now)))
                .send()
                .await;
            if sent.is_ok() {
                tagged.extend(fresh);
            }
        }
    }))
}
