//! The translation between `runner.v1` messages and the core model: what
//! the control plane sends is read (and refused with the field named when
//! malformed), statuses are written.

use runner_core::model::{
    DesiredPhase, Environment, EnvironmentClass, EnvironmentId, Instance, InstanceState, Phase,
    Revision, Spec, Status, StopReason, Timings,
};
use runner_core::report::Stage;
use runner_proto::pb::{self, environment_content};

/// Reads an environment from the wire; the error names what is malformed.
pub fn environment_from_proto(env: pb::RunnerEnvironment) -> Result<Environment, String> {
    let id: EnvironmentId = env
        .id
        .parse()
        .map_err(|e: runner_core::validate::FieldError| e.to_string())?;
    let spec = env
        .spec
        .ok_or_else(|| format!("environment {id}: spec: must be set"))?;
    let desired = match pb::EnvironmentPhase::try_from(spec.desired_phase) {
        Ok(pb::EnvironmentPhase::Running) => Some(DesiredPhase::Running),
        Ok(pb::EnvironmentPhase::Stopped) => Some(DesiredPhase::Stopped),
        Ok(pb::EnvironmentPhase::Deleted) => Some(DesiredPhase::Deleted),
        _ => None,
    };
    let content = spec.content.unwrap_or_default();
    let revision = match content.revision {
        None => Revision::Default,
        Some(environment_content::Revision::Branch(b)) => Revision::Branch(b),
        Some(environment_content::Revision::Commit(c)) => Revision::Commit(c),
    };
    Ok(Environment {
        id,
        accepted_status_version: env.accepted_status_version,
        spec: Spec {
            spec_version: spec.spec_version,
            desired,
            class_id: spec.environment_class_id,
            repository_url: content.repository_url,
            revision,
            creator: env.metadata.map(|m| m.creator).unwrap_or_default(),
            disconnected_timeout: disconnected_timeout(spec.timeout.as_ref()),
        },
    })
}

/// `timeout.disconnected`: unset, zero or negative means never.
fn disconnected_timeout(timeout: Option<&pb::EnvironmentTimeout>) -> Option<std::time::Duration> {
    let d = timeout?.disconnected?;
    let d = std::time::Duration::try_from(d).ok()?;
    (!d.is_zero()).then_some(d)
}

fn duration(d: Option<std::time::Duration>) -> Option<prost_types::Duration> {
    d.and_then(|d| prost_types::Duration::try_from(d).ok())
}

fn stage_to_proto(stage: Option<Stage>) -> pb::ContentStage {
    match stage {
        None => pb::ContentStage::Unspecified,
        Some(Stage::Credential) => pb::ContentStage::Credential,
        Some(Stage::Clone) => pb::ContentStage::Clone,
        Some(Stage::Checkout) => pb::ContentStage::Checkout,
        Some(Stage::Ready) => pb::ContentStage::Ready,
    }
}

fn timings_to_proto(t: &Timings) -> Option<pb::StartTimings> {
    (*t != Timings::default()).then(|| pb::StartTimings {
        launch_to_running: duration(t.launch_to_running),
        running_to_content_ready: duration(t.running_to_ready),
        launch_to_content_ready: duration(t.launch_to_ready),
    })
}

/// Reads an environment class from the wire.
pub fn class_from_proto(class: pb::EnvironmentClass) -> EnvironmentClass {
    EnvironmentClass {
        id: class.id,
        display_name: class.display_name,
        instance_type: class.instance_type,
        disk_gib: class.disk_gib,
        enabled: class.enabled,
    }
}

fn phase_to_proto(phase: Phase) -> pb::EnvironmentPhase {
    match phase {
        Phase::Creating => pb::EnvironmentPhase::Creating,
        Phase::Starting => pb::EnvironmentPhase::Starting,
        Phase::Running => pb::EnvironmentPhase::Running,
        Phase::Stopping => pb::EnvironmentPhase::Stopping,
        Phase::Stopped => pb::EnvironmentPhase::Stopped,
        Phase::Deleting => pb::EnvironmentPhase::Deleting,
        Phase::Deleted => pb::EnvironmentPhase::Deleted,
    }
}

fn machine_to_proto(instance: &Instance) -> pb::Machine {
    let phase = match instance.state {
        InstanceState::Pending => pb::MachinePhase::Pending,
        InstanceState::Running => pb::MachinePhase::Running,
        InstanceState::Stopping => pb::MachinePhase::Stopping,
        InstanceState::Stopped => pb::MachinePhase::Stopped,
        InstanceState::ShuttingDown => pb::MachinePhase::ShuttingDown,
        InstanceState::Terminated => pb::MachinePhase::Terminated,
    };
    pb::Machine {
        instance_id: instance.id.clone(),
        availability_zone: instance.availability_zone.clone(),
        subnet_id: instance.subnet_id.clone(),
        private_ip: instance.private_ip.clone().unwrap_or_default(),
        phase: phase as i32,
    }
}

/// Writes a status to the wire.
pub fn status_to_proto(version: u64, status: &Status) -> pb::EnvironmentStatus {
    let (code, message) = if status.spec_valid {
        (pb::RunnerAckCode::Ok, String::new())
    } else {
        (
            pb::RunnerAckCode::InvalidSpec,
            status.failure_message.chars().take(1024).collect(),
        )
    };
    pb::EnvironmentStatus {
        status_version: version,
        runner_ack: Some(pb::RunnerAck {
            spec_version: status.spec_version,
            code: code as i32,
            message,
        }),
        phase: phase_to_proto(status.phase) as i32,
        machine: status.machine.as_ref().map(machine_to_proto),
        failure_message: status.failure_message.chars().take(4096).collect(),
        warning_message: status.warning_message.chars().take(4096).collect(),
        content_stage: stage_to_proto(status.content.stage) as i32,
        content_commit: status.content.commit.clone().unwrap_or_default(),
        content_ready_time: status.content.ready_at.map(prost_types::Timestamp::from),
        start_timings: timings_to_proto(&status.content.timings),
        stop_reason: match status.stop_reason {
            None => pb::StopReason::Unspecified,
            Some(StopReason::DisconnectedTimeout) => pb::StopReason::DisconnectedTimeout,
        } as i32,
    }
}
