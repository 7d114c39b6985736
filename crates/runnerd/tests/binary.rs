//! The `runnerd` binary's command line: exit codes and help.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runnerd");

fn daemon_args() -> Vec<(&'static str, &'static str)> {
    vec![
        ("RUNNER_ID", "8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a69"),
        ("RUNNER_REGION", "eu-west-1"),
        ("RUNNER_CONTROL_PLANE_URL", "https://cp.example.com"),
        ("RUNNER_VPC_ID", "vpc-0123456789abcdef0"),
        ("RUNNER_SUBNET_IDS", "subnet-0123456789abcdef0"),
        ("RUNNER_SECURITY_GROUP_ID", "sg-0123456789abcdef0"),
        ("RUNNER_INSTANCE_PROFILE", "runner-env"),
        ("RUNNER_AMI", "ami-0123456789abcdef0"),
        ("RUNNER_TABLE", "runner-state"),
        ("RUNNER_SECRET_ID", "runner/credentials"),
        ("RUNNER_KMS_KEY_ID", "alias/runner"),
    ]
}

fn run(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run runnerd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_value_exits_64_naming_the_flag() {
    let mut env = daemon_args();
    env.retain(|(k, _)| *k != "RUNNER_REGION");
    env.push(("RUNNER_REGION", "europe-west"));
    let (code, stderr) = run(&env, &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("invalid --region (RUNNER_REGION)"),
        "{stderr}"
    );
}

#[test]
fn a_missing_value_exits_64() {
    let mut env = daemon_args();
    env.retain(|(k, _)| *k != "RUNNER_TABLE");
    let (code, stderr) = run(&env, &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--table"), "{stderr}");
}

#[test]
fn help_documents_every_flag_with_its_variable() {
    let out = Command::new(BIN).arg("--help").output().expect("help");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    let options = help.split("Options:").nth(1).expect("an Options section");
    // One entry per flag: a line starting with the flag, then its wrapped text.
    let mut entries: Vec<String> = Vec::new();
    for line in options.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") || trimmed.starts_with("-h") || trimmed.starts_with("-V") {
            entries.push(trimmed.to_owned());
        } else if let Some(last) = entries.last_mut() {
            last.push(' ');
            last.push_str(trimmed);
        }
    }
    let flags: Vec<&String> = entries
        .iter()
        .filter(|e| !e.starts_with("-h") && !e.starts_with("-V"))
        .collect();
    assert!(flags.len() >= 25, "only {} flags documented", flags.len());
    for entry in flags {
        assert!(
            entry.contains("[env: RUNNER_"),
            "no RUNNER_* variable: {entry}"
        );
    }
}

#[test]
fn health_fails_when_nothing_answers() {
    let (code, stderr) = run(
        &[],
        &[
            "health",
            "--url",
            "http://127.0.0.1:9/readyz",
            "--timeout",
            "1s",
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.starts_with("runnerd health: "), "{stderr}");
}

/// `(variable, default)` for every flag in `runnerd --help`.
fn help_variables() -> Vec<(String, String)> {
    let out = Command::new(BIN)
        .env_clear()
        .arg("--help")
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let options = help.split("Options:").nth(1).expect("an Options section");
    let mut entries: Vec<String> = Vec::new();
    for line in options.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            entries.push(trimmed.to_owned());
        } else if let Some(last) = entries.last_mut() {
            last.push(' ');
            last.push_str(trimmed);
        }
    }
    let between = |text: &str, start: &str| -> Option<String> {
        let rest = text.split(start).nth(1)?;
        Some(rest.split(']').next()?.to_owned())
    };
    entries
        .iter()
        .filter_map(|e| {
            let variable = between(e, "[env: ")?;
            // clap shows a variable that is set as NAME=value.
            let variable = variable.split('=').next().unwrap_or_default().to_owned();
            Some((variable, between(e, "[default: ").unwrap_or_default()))
        })
        .collect()
}

#[test]
fn the_readme_configuration_table_matches_help() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let table = readme
        .split("<!-- configuration table: checked by crates/runnerd/tests/binary.rs -->")
        .nth(1)
        .and_then(|t| t.split("<!-- end of configuration table -->").next())
        .expect("the configuration table markers");
    let mut documented: Vec<(String, String)> = table
        .lines()
        .filter(|l| l.starts_with("| `RUNNER_"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let default = cells[2].trim_matches('`');
            let default = if default == "required" || default == "–" {
                ""
            } else {
                default
            };
            (cells[0].trim_matches('`').to_owned(), default.to_owned())
        })
        .collect();
    let mut actual = help_variables();
    documented.sort();
    actual.sort();
    assert_eq!(
        documented, actual,
        "README.md's configuration table and runnerd --help differ"
    );
}

#[test]
fn doctor_needs_the_daemon_configuration() {
    let mut env = daemon_args();
    env.retain(|(k, _)| *k != "RUNNER_VPC_ID");
    let (code, stderr) = run(&env, &["doctor"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--vpc-id"), "{stderr}");
}

#[test]
fn doctor_fails_with_a_json_report_when_nothing_answers() {
    let mut env = daemon_args();
    env.retain(|(k, _)| *k != "RUNNER_CONTROL_PLANE_URL");
    env.extend([
        ("RUNNER_CONTROL_PLANE_URL", "http://127.0.0.1:9"),
        ("RUNNER_ALLOW_PLAINTEXT", "true"),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_MAX_ATTEMPTS", "1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    let out = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(["doctor", "--json"])
        .output()
        .expect("run runnerd doctor");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["ok"], false);
    let status = |name: &str| {
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| (c["status"].clone(), c["hint"].clone()))
            .unwrap_or_else(|| panic!("no check {name}: {report}"))
    };
    let (credentials, hint) = status("credentials");
    assert_eq!(credentials, "fail");
    assert!(hint.as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(status("vpc").0, "skip");
    assert_eq!(status("control-plane-dns").0, "pass");
    assert_eq!(status("control-plane-connect").0, "fail");
    assert_eq!(status("control-plane-auth").0, "skip");
    assert_eq!(status("self-update").0, "skip");
}

/// The allocator settings of `.cargo/config.toml` are compiled into the
/// binary (jemalloc prints its options at exit when asked).
#[test]
fn the_binary_carries_the_allocator_settings() {
    let (code, stderr) = run(
        &[(
            "_RJEM_MALLOC_CONF",
            "stats_print:true,stats_print_opts:mdablxe",
        )],
        &["--version"],
    );
    assert_eq!(code, Some(0), "{stderr}");
    for option in [
        "opt.background_thread: true",
        "opt.narenas: 2",
        "opt.dirty_decay_ms: 1000",
    ] {
        assert!(stderr.contains(option), "{option} not in:\n{stderr}");
    }
}
