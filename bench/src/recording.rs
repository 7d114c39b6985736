//! The benchmarks' recording proxy: `testkit::proxy::FaultProxy` without
//! rules, labelling each exchange with the environment its request is about
//! (from the runner's tags and tag filters, DynamoDB keys or secret names).

use std::collections::HashMap;

use runner_aws::ec2::TAG_ENVIRONMENT;
use testkit::proxy::{Call, FaultProxy};
use uuid::Uuid;

/// Starts one on 127.0.0.1 in front of `upstream` (an http:// URL).
pub(crate) async fn start(upstream: &str) -> anyhow::Result<FaultProxy> {
    Ok(FaultProxy::start_labelled(upstream, |request| {
        environment(request.params, request.body).map(|id| id.to_string())
    })
    .await?)
}

/// The environment `call` is about, when its request names one.
pub(crate) fn env(call: &Call) -> Option<Uuid> {
    call.label.as_deref()?.parse().ok()
}

/// Whether `call` is the first page of a describe of all the runner's
/// instances.
pub(crate) fn full_describe(call: &Call) -> bool {
    call.operation == "DescribeInstances" && call.label.is_none() && !call.next_page
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
