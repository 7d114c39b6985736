//! What `runnerctl` prints: flat, snake_case records with enum names and
//! RFC 3339 times, the same shape for `--json` and for the text form.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use runner_proto::admin::v1 as admin;
use runner_proto::pb::{self, environment_content::Revision};
use serde::Serialize;
use serde_json::Value;

fn time(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = SystemTime::try_from(*ts?).ok()?;
    Some(humantime::format_rfc3339_seconds(t).to_string())
}

fn strip<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}

fn enum_name<E: TryFrom<i32>>(value: i32, name: fn(&E) -> &'static str, prefix: &str) -> String {
    match E::try_from(value) {
        Ok(e) => strip(name(&e), prefix).to_owned(),
        Err(_) => value.to_string(),
    }
}

/// Name of an environment phase without its prefix, e.g. `RUNNING`.
pub(crate) fn env_phase(value: i32) -> String {
    enum_name(
        value,
        pb::EnvironmentPhase::as_str_name,
        "ENVIRONMENT_PHASE_",
    )
}

#[derive(Serialize)]
pub(crate) struct RunnerView {
    id: String,
    name: String,
    region: String,
    phase: String,
    version: String,
    degraded_message: String,
    last_seen: Option<String>,
    auto_update: bool,
    open_streams: u32,
    public_key: Option<String>,
    created_at: Option<String>,
}

impl From<&admin::Runner> for RunnerView {
    fn from(r: &admin::Runner) -> Self {
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            region: r.region.clone(),
            phase: enum_name(r.phase, admin::RunnerPhase::as_str_name, "RUNNER_PHASE_"),
            version: r.version.clone(),
            degraded_message: r.degraded_message.clone(),
            last_seen: time(r.last_seen.as_ref()),
            auto_update: r.auto_update,
            open_streams: r.open_streams,
            public_key: (!r.public_key.is_empty()).then(|| STANDARD.encode(&r.public_key)),
            created_at: time(r.created_at.as_ref()),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct CreatedRunnerView {
    #[serde(flatten)]
    runner: RunnerView,
    exchange_token: String,
    exchange_token_expires_at: Option<String>,
    quick_create_url: String,
}

impl From<&admin::CreateRunnerResponse> for CreatedRunnerView {
    fn from(r: &admin::CreateRunnerResponse) -> Self {
        Self {
            runner: RunnerView::from(&r.runner.clone().unwrap_or_default()),
            exchange_token: r.exchange_token.clone(),
            exchange_token_expires_at: time(r.exchange_token_expires_at.as_ref()),
            quick_create_url: r.quick_create_url.clone(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct ClassView {
    id: String,
    display_name: String,
    instance_type: String,
    disk_gib: u32,
    enabled: bool,
}

impl From<&pb::EnvironmentClass> for ClassView {
    fn from(c: &pb::EnvironmentClass) -> Self {
        Self {
            id: c.id.clone(),
            display_name: c.display_name.clone(),
            instance_type: c.instance_type.clone(),
            disk_gib: c.disk_gib,
            enabled: c.enabled,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct StatusView {
    status_version: u64,
    phase: String,
    ack_spec_version: u64,
    ack_code: String,
    ack_message: String,
    instance_id: String,
    availability_zone: String,
    subnet_id: String,
    private_ip: String,
    machine_phase: String,
    failure_message: String,
    warning_message: String,
    content_stage: String,
    content_commit: String,
    content_ready_at: Option<String>,
    launch_to_running: Option<String>,
    running_to_content_ready: Option<String>,
    launch_to_content_ready: Option<String>,
    stop_reason: String,
    updated_at: Option<String>,
}

/// A duration as people read it (`1m 12s 300ms`); `None` when unset or
/// negative.
fn duration(d: Option<&prost_types::Duration>) -> Option<String> {
    let d = std::time::Duration::try_from(*d?).ok()?;
    // Milliseconds are enough for a person.
    let d = std::time::Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Some(humantime::format_duration(d).to_string())
}

#[derive(Serialize)]
pub(crate) struct EnvironmentView {
    id: String,
    runner_id: String,
    creator: String,
    name: String,
    class_id: String,
    repository_url: String,
    branch: Option<String>,
    commit: Option<String>,
    desired_phase: String,
    spec_version: u64,
    created_at: Option<String>,
    status: Option<StatusView>,
}

impl From<&admin::Environment> for EnvironmentView {
    fn from(e: &admin::Environment) -> Self {
        let env = e.environment.clone().unwrap_or_default();
        let meta = env.metadata.unwrap_or_default();
        let spec = env.spec.unwrap_or_default();
        let content = spec.content.unwrap_or_default();
        let (branch, commit) = match content.revision {
            Some(Revision::Branch(b)) => (Some(b), None),
            Some(Revision::Commit(c)) => (None, Some(c)),
            None => (None, None),
        };
        let status = e.status.as_ref().map(|s| {
            let ack = s.runner_ack.clone().unwrap_or_default();
            let machine = s.machine.clone().unwrap_or_default();
            StatusView {
                status_version: s.status_version,
                phase: env_phase(s.phase),
                ack_spec_version: ack.spec_version,
                ack_code: enum_name(ack.code, pb::RunnerAckCode::as_str_name, "RUNNER_ACK_CODE_"),
                ack_message: ack.message,
                instance_id: machine.instance_id,
                availability_zone: machine.availability_zone,
                subnet_id: machine.subnet_id,
                private_ip: machine.private_ip,
                machine_phase: enum_name(
                    machine.phase,
                    pb::MachinePhase::as_str_name,
                    "MACHINE_PHASE_",
                ),
                failure_message: s.failure_message.clone(),
                warning_message: s.warning_message.clone(),
                content_stage: enum_name(
                    s.content_stage,
                    pb::ContentStage::as_str_name,
                    "CONTENT_STAGE_",
                ),
                content_commit: s.content_commit.clone(),
                content_ready_at: time(s.content_ready_time.as_ref()),
                launch_to_running: duration(
                    s.start_timings
                        .as_ref()
                        .and_then(|t| t.launch_to_running.as_ref()),
                ),
                running_to_content_ready: duration(
                    s.start_timings
                        .as_ref()
                        .and_then(|t| t.running_to_content_ready.as_ref()),
                ),
                launch_to_content_ready: duration(
                    s.start_timings
                        .as_ref()
                        .and_then(|t| t.launch_to_content_ready.as_ref()),
                ),
                stop_reason: enum_name(s.stop_reason, pb::StopReason::as_str_name, "STOP_REASON_"),
                updated_at: time(e.status_updated_at.as_ref()),
            }
        });
        Self {
            id: env.id,
            runner_id: e.runner_id.clone(),
            creator: meta.creator,
            name: meta.name,
            class_id: spec.environment_class_id,
            repository_url: content.repository_url,
            branch,
            commit,
            desired_phase: env_phase(spec.desired_phase),
            spec_version: spec.spec_version,
            created_at: time(meta.created_at.as_ref()),
            status,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct IntegrationView {
    id: String,
    kind: String,
    host: String,
    oauth_client_id: Option<String>,
    pat_enabled: bool,
    api_base_url: String,
    oauth_base_url: String,
}

impl From<&pb::ScmIntegration> for IntegrationView {
    fn from(i: &pb::ScmIntegration) -> Self {
        Self {
            id: i.id.clone(),
            kind: enum_name(i.kind, pb::ScmKind::as_str_name, "SCM_KIND_"),
            host: i.host.clone(),
            oauth_client_id: i.oauth.as_ref().map(|o| o.client_id.clone()),
            pat_enabled: i.pat_enabled,
            api_base_url: i.api_base_url.clone(),
            oauth_base_url: i.oauth_base_url.clone(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct HostTokenView {
    runner_id: String,
    principal: String,
    host: String,
    username: String,
    added_at: Option<String>,
}

impl From<&admin::HostToken> for HostTokenView {
    fn from(t: &admin::HostToken) -> Self {
        Self {
            runner_id: t.runner_id.clone(),
            principal: t.principal.clone(),
            host: t.host.clone(),
            username: t.username.clone(),
            added_at: time(t.added_at.as_ref()),
        }
    }
}

/// A runner's answer to a call, as `{request_id, result}` or `{request_id, error}`.
pub(crate) fn call_outcome(response: &admin::CallRunnerResponse) -> Value {
    use admin::call_runner_response::Outcome;
    use pb::runner_result::Kind;
    let mut out = serde_json::Map::new();
    out.insert("request_id".into(), response.request_id.clone().into());
    match &response.outcome {
        Some(Outcome::Error(e)) => {
            let code = tonic::Code::from_i32(e.code);
            out.insert(
                "error".into(),
                serde_json::json!({ "code": format!("{code:?}"), "message": e.message }),
            );
        }
        Some(Outcome::Result(r)) => {
            let result = match &r.kind {
                Some(Kind::Ping(p)) => serde_json::json!({ "version": p.version }),
                Some(Kind::CheckAuthenticationForHost(c)) => serde_json::json!({
                    "authenticated": c.authenticated,
                    "available_methods": c.available_methods.iter()
                        .map(|m| enum_name(*m, pb::AuthMethod::as_str_name, "AUTH_METHOD_"))
                        .collect::<Vec<_>>(),
                    "oauth_authorize_url": c.oauth_authorize_url,
                }),
                Some(Kind::ParseContext(p)) => {
                    let (branch, commit) = match &p.revision {
                        Some(pb::parse_context_result::Revision::Branch(b)) => (Some(b), None),
                        Some(pb::parse_context_result::Revision::Commit(c)) => (None, Some(c)),
                        None => (None, None),
                    };
                    serde_json::json!({
                        "kind": enum_name(p.kind, pb::ScmKind::as_str_name, "SCM_KIND_"),
                        "host": p.host, "owner": p.owner, "repository": p.repository,
                        "clone_url": p.clone_url, "branch": branch, "commit": commit,
                    })
                }
                Some(Kind::ValidateEnvironmentClass(v)) => serde_json::json!({
                    "valid": v.problems.is_empty(),
                    "problems": v.problems,
                    "availability_zones": v.availability_zones,
                }),
                Some(Kind::ExchangeOauthCode(x)) => {
                    serde_json::json!({ "expires_at": time(x.expires_at.as_ref()) })
                }
                Some(Kind::StoreHostToken(s)) => serde_json::json!({ "username": s.username }),
                None => Value::Null,
            };
            out.insert("result".into(), result);
        }
        None => {}
    }
    Value::Object(out)
}

/// Renders a value as text: an object as `key: value` lines, a list of
/// objects as a table of `columns`.
pub(crate) fn render_text(value: &Value, columns: &[&str]) -> String {
    match value {
        Value::Array(items) => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|item| {
                    columns
                        .iter()
                        .map(|c| scalar(item.get(*c).unwrap_or(&Value::Null)))
                        .collect()
                })
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    rows.iter()
                        .map(|r| r[i].len())
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            let mut out = vec![line(columns.iter().map(|c| c.to_uppercase()).collect())];
            out.extend(rows.into_iter().map(line));
            out.join("\n")
        }
        Value::Object(_) => {
            let mut lines = Vec::new();
            flatten("", value, &mut lines);
            let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            lines
                .into_iter()
                .map(|(k, v)| format!("{k:<width$}  {v}").trim_end().to_owned())
                .collect::<Vec<_>>()
                .join("\n")
        }
        other => scalar(other),
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((format!("{prefix}:"), scalar(other))),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(scalar).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}
