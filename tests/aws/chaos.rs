//! The runner's promises under crashes, overlaps, AWS faults and
//! control-plane faults. One mixed workload (environments created, stopped,
//! started and deleted in a random order), the real `runnerd` binary, each
//! test on its own moto, and one end state checked against emulated EC2:
//! every environment in its desired phase, at most one instance per
//! environment over its whole life, no instance of ours without an
//! environment, and the control plane holding each environment's last status.
//!
//! Sizes: `CHAOS_ENVS` (default 200) and `CHAOS_KILLS` (default 30); a soak
//! run raises them. `CHAOS_SEED` replays a workload.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use runner_proto::admin::v1 as admin;
use runner_proto::pb::EnvironmentPhase as Phase;
use testkit::proxy::{Fault, FaultProxy, Rule};

use crate::daemon::{Process, World, settled};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A moto server of this test's own, on a free loopback port.
pub(crate) struct Moto {
    pub(crate) url: String,
    child: Child,
}

impl Moto {
    pub(crate) async fn start() -> Self {
        let bin =
            std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
                .join("../.tools/venv/bin/moto_server");
        assert!(bin.exists(), "{} is missing: run tests/run", bin.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return moto;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not start on {}", moto.url);
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Stop,
    Start,
    Delete,
}

/// Each environment's steps, interleaved at random, and its final phase.
struct Plan {
    steps: Vec<(usize, Op)>,
    finals: Vec<Phase>,
}

fn plan(n: usize, rng: &mut StdRng) -> Plan {
    let mut per_env: Vec<Vec<Op>> = Vec::with_capacity(n);
    let mut finals = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ops = vec![Op::Create];
        let mut last = Phase::Running;
        if rng.gen_bool(0.5) {
            ops.push(Op::Stop);
            last = Phase::Stopped;
            if rng.gen_bool(0.5) {
                ops.push(Op::Start);
                last = Phase::Running;
            }
        }
        if rng.gen_bool(0.3) {
            ops.push(Op::Delete);
            last = Phase::Deleted;
        }
        per_env.push(ops);
        finals.push(last);
    }
    // A random merge that keeps each environment's order.
    let mut next = vec![0usize; n];
    let mut steps = Vec::new();
    let mut open: Vec<usize> = (0..n).collect();
    while !open.is_empty() {
        let pick = rng.gen_range(0..open.len());
        let env = open[pick];
        steps.push((env, per_env[env][next[env]]));
        next[env] += 1;
        if next[env] == per_env[env].len() {
            open.swap_remove(pick);
        }
    }
    Plan { steps, finals }
}

fn seed() -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    eprintln!("CHAOS_SEED={seed}");
    seed
}

/// Runs the plan's steps against the control plane, spread over `over`;
/// returns each environment's id.
async fn drive(world: &World, plan: &Plan, over: Duration) -> Vec<String> {
    let pace = over / u32::try_from(plan.steps.len().max(1)).unwrap_or(u32::MAX);
    let mut ids: Vec<Option<String>> = vec![None; plan.finals.len()];
    for &(env, op) in &plan.steps {
        match op {
            Op::Create => {
                ids[env] = Some(world.create_envs(1).await.remove(0));
            }
            Op::Stop | Op::Start | Op::Delete => {
                let phase = match op {
                    Op::Stop => Phase::Stopped,
                    Op::Start => Phase::Running,
                    _ => Phase::Deleted,
                };
                let id = ids[env].as_deref().expect("created before");
                world.set_phase(id, phase).await;
            }
        }
        tokio::time::sleep(pace).await;
    }
    ids.into_iter().map(|id| id.expect("created")).collect()
}

/// The end state every test must reach.
async fn verify(world: &World, ids: &[String], finals: &[Phase], within: Duration) {
    let wanted: HashMap<&str, Phase> = ids
        .iter()
        .map(String::as_str)
        .zip(finals.iter().copied())
        .collect();
    world
        .wait_for("every environment in its desired phase", within, |envs| {
            envs.len() == ids.len()
                && envs.iter().all(|e| {
                    let id = e
                        .environment
                        .as_ref()
                        .map(|x| x.id.as_str())
                        .unwrap_or_default();
                    wanted.get(id).is_some_and(|phase| settled(e, *phase))
                })
        })
        .await;
    // Instances settle a moment after the statuses that announce them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let instances = world.instances().await;
        let tokens = world.client_tokens().await;
        let problems = instance_problems(&instances, &tokens, &wanted);
        if problems.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the instances do not match the environments:\n{}",
            problems.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What is wrong with the instances tagged as ours (env, id, zone, state).
///
/// Moto ignores `ClientToken`: a launch whose request left just before its
/// sender froze, retried with the same token by the new leader, makes two
/// instances where EC2 returns one. Such a pair (one token, all but one
/// terminated by the runner) counts as one instance.
fn instance_problems(
    instances: &[(String, String, String, String)],
    tokens: &HashMap<String, String>,
    wanted: &HashMap<&str, Phase>,
) -> Vec<String> {
    let mut per_env: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    let mut problems = Vec::new();
    for (env, id, _, state) in instances {
        if !wanted.contains_key(env.as_str()) {
            if state != "terminated" {
                problems.push(format!(
                    "instance {id} ({state}) belongs to no environment ({env:?})"
                ));
            }
            continue;
        }
        per_env.entry(env).or_default().push((id, state));
    }
    for (env, phase) in wanted {
        let mut mine = per_env.get(env).cloned().unwrap_or_default();
        let same_token = mine
            .iter()
            .map(|(id, _)| tokens.get(*id).map(String::as_str).unwrap_or_default())
            .collect::<HashSet<_>>()
            .len()
            == 1;
        let live = mine.iter().filter(|(_, s)| *s != "terminated").count();
        if mine.len() > 1 && same_token && live <= 1 {
            mine.sort_by_key(|(_, s)| *s == "terminated");
            mine.truncate(1);
        }
        let distinct: HashSet<&str> = mine.iter().map(|(id, _)| *id).collect();
        if distinct.len() > 1 {
            problems.push(format!(
                "environment {env} had {} instances: {mine:?}",
                distinct.len()
            ));
            continue;
        }
        let state = mine.first().map(|(_, s)| *s);
        let ok = match phase {
            Phase::Running => state == Some("running"),
            // Stopped before its launch, or stopped.
            Phase::Stopped => state.is_none() || state == Some("stopped"),
            // Deleted before its launch, or terminated.
            _ => state.is_none() || state == Some("terminated"),
        };
        if !ok {
            problems.push(format!(
                "environment {env} wants {phase:?}; its instance is {state:?}"
            ));
        }
    }
    problems
}

/// Settings for short leases, so that restarts take over quickly.
fn fast_lease() -> Vec<(&'static str, String)> {
    vec![
        ("RUNNER_LEASE_TTL", "4s".to_owned()),
        ("RUNNER_LEASE_RENEW_INTERVAL", "1s".to_owned()),
        ("RUNNER_RESYNC_INTERVAL", "10s".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_consistency_under_repeated_sigkill() {
    let n = setting("CHAOS_ENVS", 200);
    let kills = setting("CHAOS_KILLS", 30);
    let mut rng = StdRng::seed_from_u64(seed());
    let moto = Moto::start().await;
    let world = Arc::new(World::on(&moto.url).await);
    let plan = plan(n, &mut rng);
    let extra = fast_lease();
    let mut process = Process::start_with(&world, "crash-0", &moto.url, &extra);
    let driver = tokio::spawn({
        let world = world.clone();
        let plan = Plan {
            steps: plan.steps.clone(),
            finals: plan.finals.clone(),
        };
        async move { drive(&world, &plan, Duration::from_secs(60)).await }
    });
    for k in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2500))).await;
        process.signal("-KILL");
        drop(process);
        process = Process::start_with(&world, &format!("crash-{k}"), &moto.url, &extra);
    }
    let ids = driver.await.expect("the workload ran");
    verify(&world, &ids, &plan.finals, Duration::from_secs(300)).await;
    assert_eq!(process.stop().await, Some(0));
}

/// The leader lease's item, read consistently.
async fn lease_item(
    world: &World,
) -> Option<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    aws_sdk_dynamodb::Client::new(&world.sdk)
        .get_item()
        .table_name(&world.infra.table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("RUNNER#{}", world.infra.runner_id)),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S("LEASE#0".into()),
        )
        .consistent_read(true)
        .send()
        .await
        .ok()?
        .item
}

/// The pid in a lease holder's name (`pid-<pid>-<suffix>` outside ECS).
async fn leader_pid(world: &World) -> Option<u32> {
    let item = lease_item(world).await?;
    let holder = item.get("holder")?.as_s().ok()?;
    holder.strip_prefix("pid-")?.split('-').next()?.parse().ok()
}

/// The sum of a process's metric samples whose line contains `needle`.
pub(crate) async fn metric_sum(port: u16, needle: &str) -> f64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return 0.0;
    };
    let _ = stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await;
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body).await;
    body.lines()
        .filter(|l| !l.starts_with('#') && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two distinct free loopback ports.
pub(crate) fn free_ports() -> [u16; 2] {
    let listeners = [0, 1].map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    listeners.map(|l| l.local_addr().expect("address").port())
}

/// Waits until a process's health port answers `/readyz` with 200.
async fn ready(port: u16, name: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    for _ in 0..300 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = stream
                .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await;
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer).await;
            if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{name} never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_throughout_with_the_leader_frozen_past_its_lease() {
    let n = setting("CHAOS_ENVS", 200);
    let mut rng = StdRng::seed_from_u64(seed());
    let moto = Moto::start().await;
    let world = Arc::new(World::on(&moto.url).await);
    let plan = plan(n, &mut rng);
    let ports = free_ports();
    let start = |name: &str, port: u16| {
        let mut extra = fast_lease();
        extra.push(("RUNNER_HEALTH_LISTEN", format!("127.0.0.1:{port}")));
        Process::start_with(&world, name, &moto.url, &extra)
    };
    // One after the other: two replicas trading one fresh exchange token at
    // the same instant race for it (the stack's first deployment runs one).
    let a = start("overlap-a", ports[0]);
    ready(ports[0], "overlap-a").await;
    let b = start("overlap-b", ports[1]);
    ready(ports[1], "overlap-b").await;
    let replicas = [a, b];
    let driver = tokio::spawn({
        let world = world.clone();
        let plan = Plan {
            steps: plan.steps.clone(),
            finals: plan.finals.clone(),
        };
        async move { drive(&world, &plan, Duration::from_secs(45)).await }
    });
    // Mid-workload, freeze whichever replica leads, past its lease.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut leader = None;
    for _ in 0..50 {
        if let Some(pid) = leader_pid(&world).await
            && let Some(i) = replicas.iter().position(|p| p.pid() == pid)
        {
            leader = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let frozen = leader.expect("one replica leads");
    let fenced_metrics = [
        "outcome=\"fenced\"",
        "result=\"fenced\"",
        "outcome=\"rejected\"",
    ];
    let mut before = 0.0;
    for needle in fenced_metrics {
        before += metric_sum(ports[frozen], needle).await;
    }
    let stale_before = world.plane.status_counts().stale;
    replicas[frozen].signal("-STOP");
    tokio::time::sleep(Duration::from_secs(4 + 5)).await;
    replicas[frozen].signal("-CONT");
    // Thawed, it notices that its lease lapsed.
    assert!(
        replicas[frozen]
            .logged(
                &["lost the leader lease", "the leader lease ran out locally"],
                Duration::from_secs(30)
            )
            .await,
        "the frozen leader (pid {}) noticed",
        replicas[frozen].pid()
    );
    let mut after = 0.0;
    for needle in fenced_metrics {
        after += metric_sum(ports[frozen], needle).await;
    }
    let ids = driver.await.expect("the workload ran");
    verify(&world, &ids, &plan.finals, Duration::from_secs(300)).await;
    // A deposed leader sends nothing: no status of it is refused as stale.
    // Writes it had in flight may meet the fence (counted, not required).
    let stale = world.plane.status_counts().stale - stale_before;
    assert_eq!(
        stale,
        0,
        "statuses refused as stale after the freeze ({} late writes fenced)",
        after - before
    );
    let standby = replicas[1 - frozen].logs();
    assert!(
        standby.contains("acquired the leader lease"),
        "the standby took over"
    );
    let [a, b] = replicas;
    assert_eq!(a.stop().await, Some(0));
    assert_eq!(b.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_faults_throttling_5xx_latency_and_a_zone_out_of_capacity() {
    let n = setting("CHAOS_ENVS", 200);
    let mut rng = StdRng::seed_from_u64(seed());
    let moto = Moto::start().await;
    let world = Arc::new(World::on(&moto.url).await);
    let proxy = FaultProxy::start(&moto.url).await.expect("proxy");
    let exhausted = world.infra.subnets[0].0.clone();
    proxy.set_rules(vec![
        Rule {
            operations: vec!["RunInstances".into()],
            rate: 1.0,
            fault: Fault::NoCapacityInSubnet(exhausted.clone()),
        },
        Rule {
            operations: vec![],
            rate: 0.20,
            fault: Fault::Throttle,
        },
        Rule {
            operations: vec![],
            rate: 0.05,
            fault: Fault::Status(500),
        },
        Rule {
            operations: vec![],
            rate: 0.25,
            fault: Fault::Delay(Duration::from_millis(150)),
        },
    ]);
    let plan = plan(n, &mut rng);
    let process = Process::start_with(&world, "aws-faults", &proxy.url(), &[]);
    let ids = drive(&world, &plan, Duration::from_secs(40)).await;
    verify(&world, &ids, &plan.finals, Duration::from_secs(300)).await;
    assert_eq!(process.stop().await, Some(0));
    // The faults were there: every fifth call or so throttled, capacity
    // refused in one zone.
    let exhausted_launches =
        proxy.seen("RunInstances").len() - proxy.forwarded("RunInstances").len();
    assert!(exhausted_launches > 0, "no launch met a fault");
    assert!(
        proxy.faulted() >= 50,
        "only {} faults injected",
        proxy.faulted()
    );

    // An environment refused in the exhausted zone never tried it again;
    // calls within the buckets (World::env: launches 20/s burst 10,
    // mutations 20/s burst 20).
    for (environment, attempts) in crate::daemon::exhausted_attempts(&proxy.launches(), &exhausted)
    {
        assert_eq!(
            attempts.len(),
            1,
            "{environment} tried the exhausted zone in attempts {attempts:?}"
        );
    }
    for (ops, rate, burst) in [
        (vec!["RunInstances"], 20, 10),
        (
            vec![
                "StartInstances",
                "StopInstances",
                "TerminateInstances",
                "CreateTags",
            ],
            20,
            20,
        ),
    ] {
        let mut times: Vec<Instant> = ops.iter().flat_map(|op| proxy.seen(op)).collect();
        times.sort();
        let worst = (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(times[i]) < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0);
        // The SDK retries a throttled call; retries count against the bucket
        // too. The proxy sees a call when it arrives, not when its token was
        // taken: on these shared cores a call can spend up to a quarter of a
        // second between the two, so a one-second window at the proxy may
        // hold tokens of 1.25 s.
        let bound = burst + rate * 5 / 4;
        assert!(
            worst <= bound,
            "{ops:?}: {worst} calls within one second (bound {bound})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_faults_cut_streams_restarts_and_partial_lists() {
    let n = setting("CHAOS_ENVS", 200);
    let mut rng = StdRng::seed_from_u64(seed());
    let moto = Moto::start().await;
    let world = Arc::new(World::on(&moto.url).await);
    let plan = plan(n, &mut rng);
    let process = Process::start_with(
        &world,
        "cp-faults",
        &moto.url,
        &[("RUNNER_RESYNC_INTERVAL", "3s".to_owned())],
    );
    let driver = tokio::spawn({
        let world = world.clone();
        let plan = Plan {
            steps: plan.steps.clone(),
            finals: plan.finals.clone(),
        };
        async move { drive(&world, &plan, Duration::from_secs(45)).await }
    });
    let started = Instant::now();
    let mut restarts = 0;
    let mut tick = 0u32;
    let mut cut = 0;
    while started.elapsed() < Duration::from_secs(50) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tick += 1;
        {
            let _open = world.gate.read().await;
            if let Ok(closed) = world
                .admin
                .clone()
                .close_runner_streams(admin::CloseRunnerStreamsRequest {
                    runner_id: world.infra.runner_id.clone(),
                })
                .await
            {
                cut += closed.into_inner().closed;
            }
        }
        world.plane.set_list_fault(match tick % 4 {
            1 => control_plane::ListFault::Partial,
            2 => control_plane::ListFault::Empty,
            _ => control_plane::ListFault::None,
        });
        if tick.is_multiple_of(6) && restarts < 2 {
            let _closed = world.gate.write().await;
            let mut cp = world.cp.lock().await;
            let restarted = cp
                .take()
                .expect("running")
                .restart()
                .await
                .expect("restart");
            *cp = Some(restarted);
            restarts += 1;
        }
    }
    world.plane.set_list_fault(control_plane::ListFault::None);
    assert_eq!(restarts, 2);
    // Streams were really cut, and the runner came back after each cut.
    // (A cut finds no stream while the runner is reconnecting.)
    assert!(cut >= tick / 4, "only {cut} streams cut in {tick} tries");
    let reconnects = process.logs().matches("watch stream open").count();
    assert!(
        reconnects as u32 > tick / 4,
        "{reconnects} streams opened for {cut} cut in {tick} tries"
    );
    let ids = driver.await.expect("the workload ran");
    verify(&world, &ids, &plan.finals, Duration::from_secs(300)).await;
    // Accepted versions only ever grow, and the runner never sends a
    // version twice: across cut streams, restarts and lists that come back
    // partial or empty, the control plane refuses nothing as stale.
    let counts = world.plane.status_counts();
    eprintln!(
        "statuses: {} accepted, {} refused as stale",
        counts.accepted, counts.stale
    );
    assert!(counts.accepted > 0);
    assert_eq!(counts.stale, 0, "statuses refused as stale");
    assert_eq!(process.stop().await, Some(0));
}

/// The lease item's expiry (0 once released), in the store's units.
async fn lease_expiry(world: &World) -> Option<u64> {
    lease_item(world)
        .await?
        .get("expires_at")?
        .as_n()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_burst_drains_releases_the_lease_and_a_restart_converges() {
    let n = setting("CHAOS_ENVS", 100);
    let moto = Moto::start().await;
    let world = Arc::new(World::on(&moto.url).await);
    let grace = Duration::from_secs(5);
    let settings = |port: u16| {
        let mut extra = fast_lease();
        extra.push(("RUNNER_SHUTDOWN_GRACE", "5s".to_owned()));
        // A long TTL: the standby can only lead at once if the lease was
        // released, not because it expired.
        extra.retain(|(k, _)| *k != "RUNNER_LEASE_TTL");
        extra.push(("RUNNER_LEASE_TTL", "60s".to_owned()));
        extra.push(("RUNNER_HEALTH_LISTEN", format!("127.0.0.1:{port}")));
        extra
    };
    let [port_a, port_b] = free_ports();
    let mut a = Process::start_with(&world, "term-a", &moto.url, &settings(port_a));
    ready(port_a, "the first replica").await;
    let b = Process::start_with(&world, "term-b", &moto.url, &settings(port_b));
    ready(port_b, "the standby").await;
    assert_eq!(leader_pid(&world).await, Some(a.pid()), "the first leads");

    let creating = tokio::spawn({
        let world = world.clone();
        async move { world.create_envs(n).await }
    });
    // In the middle of the burst: some instances launched, not all.
    let deadline = Instant::now() + Duration::from_secs(120);
    while world.instances().await.len() < n / 10 {
        assert!(Instant::now() < deadline, "no launches within 2 min");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.signal("-TERM");
    let code = a
        .exited(grace + Duration::from_secs(10))
        .await
        .expect("exited within the grace period and the last delivery");
    assert_eq!(code, Some(0), "a clean stop");
    let logs = a.logs();
    let flushed = logs
        .find("last status delivery before stopping")
        .expect("the outbox made its last delivery");
    let released = logs
        .find("released the leader lease")
        .expect("the lease was released");
    assert!(
        flushed < released,
        "delivered while still leading, then released"
    );
    // Released, not left to expire: free, or already the standby's.
    let (expiry, holder) = (lease_expiry(&world).await, leader_pid(&world).await);
    assert!(
        expiry == Some(0) || holder == Some(b.pid()),
        "released, not left to expire: expires at {expiry:?}, held by {holder:?}"
    );
    // The standby takes over (it could not before the 60 s TTL otherwise).
    let deadline = Instant::now() + Duration::from_secs(30);
    while leader_pid(&world).await != Some(b.pid()) {
        assert!(Instant::now() < deadline, "the standby never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ids = creating.await.expect("created");
    verify(
        &world,
        &ids,
        &vec![Phase::Running; ids.len()],
        Duration::from_secs(300),
    )
    .await;

    // A second signal exits at once, whatever is in flight. A standby has
    // little to drain, so its store is made to hang: the first signal's
    // graceful stop then waits for the lease attempt in flight.
    let proxy = FaultProxy::start(&moto.url).await.expect("proxy");
    let [port_c, _] = free_ports();
    let mut c = Process::start_with(&world, "term-c", &proxy.url(), &settings(port_c));
    ready(port_c, "a third replica").await;
    let acquire = "DynamoDB_20120810.UpdateItem";
    proxy.set_rules(vec![Rule {
        operations: vec![acquire.into()],
        rate: 1.0,
        fault: Fault::Delay(Duration::from_secs(30)),
    }]);
    let before = proxy.seen(acquire).len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.seen(acquire).len() == before {
        assert!(
            Instant::now() < deadline,
            "the standby never tried the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.signal("-TERM");
    assert_eq!(
        c.exited(Duration::from_secs(1)).await,
        None,
        "the graceful stop waits for the lease attempt in flight"
    );
    c.signal("-TERM");
    assert_eq!(
        c.exited(Duration::from_secs(5)).await,
        Some(Some(130)),
        "the second signal exits at once"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_at_once_on_a_fresh_exchange_token_share_one_key() {
    // `FIRST_START_ROUNDS` repeats it (a sweep runs 10).
    let rounds = setting("FIRST_START_ROUNDS", 2);
    let replicas = setting("FIRST_START_REPLICAS", 5);
    let moto = Moto::start().await;
    for round in 0..rounds {
        // A fresh runner: the stack's secret holds only its exchange token.
        let world = World::on(&moto.url).await;
        let listeners: Vec<std::net::TcpListener> = (0..replicas)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("address").port())
            .collect();
        drop(listeners);
        let processes: Vec<Process> = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                Process::start_with(
                    &world,
                    &format!("first-{round}-{i}"),
                    &moto.url,
                    &[("RUNNER_HEALTH_LISTEN", format!("127.0.0.1:{port}"))],
                )
            })
            .collect();
        for port in &ports {
            ready(*port, "every replica").await;
        }
        let text = aws_sdk_secretsmanager::Client::new(&world.sdk)
            .get_secret_value()
            .secret_id(&world.infra.secret_id)
            .send()
            .await
            .expect("the runner's secret")
            .secret_string
            .expect("text");
        let stored = runner_aws::secrets::parse(&text).expect("credentials");
        assert!(
            stored.access_token.is_some(),
            "round {round}: no access token"
        );
        let key = stored.private_key.expect("a key pair");
        let public = crypto_box::SecretKey::from(key.0).public_key();
        let signed_up = world.runner().await.public_key;
        assert_eq!(
            signed_up,
            public.as_bytes().to_vec(),
            "round {round}: the control plane holds the stored key"
        );
        let traded = processes
            .iter()
            .filter(|p| {
                p.logs()
                    .contains("traded the exchange token for an access token")
            })
            .count();
        assert_eq!(traded, 1, "round {round}: replicas that traded");
        for process in processes {
            assert_eq!(process.stop().await, Some(0), "round {round}: a clean stop");
        }
    }
}

/// `/readyz`'s status code, or `None` when nothing answers.
async fn readyz(port: u16) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_task_that_dies_stops_the_process_and_is_never_ready_again() {
    // Every critical task of a daemon outside ECS (self-update needs ECS).
    let tasks = [
        "health-port",
        "health-monitor",
        "heartbeat",
        "lease",
        "watch",
        "informer",
        "scm-sync",
        "scheduler",
        "status-outbox",
    ];
    let moto = Moto::start().await;
    let world = World::on(&moto.url).await;
    for (i, task) in tasks.iter().enumerate() {
        let how = if i % 2 == 0 { "panic" } else { "return" };
        let trigger =
            std::env::temp_dir().join(format!("runnerd-death-{}-{task}", uuid::Uuid::new_v4()));
        let [port, _] = free_ports();
        let mut process = Process::start_with(
            &world,
            &format!("death-{task}"),
            &moto.url,
            &[
                ("RUNNER_HEALTH_LISTEN", format!("127.0.0.1:{port}")),
                (
                    "RUNNERD_TEST_TASK_DEATH",
                    format!("{task}:{how}:{}", trigger.display()),
                ),
            ],
        );
        ready(port, task).await;
        std::fs::write(&trigger, b"").expect("trigger");
        let died = Instant::now();
        let mut red = false;
        let code = loop {
            if let Some(code) = process.exited(Duration::ZERO).await {
                break code;
            }
            match readyz(port).await {
                Some(200) => assert!(!red, "{task}: ready again after it died"),
                _ => red = true,
            }
            assert!(
                died.elapsed() < Duration::from_secs(5),
                "{task} ({how}): still running 5 s after it died"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let took = died.elapsed();
        assert!(
            matches!(code, Some(c) if c != 0),
            "{task} ({how}): exit code {code:?}"
        );
        let logs = process.logs();
        assert!(
            logs.contains("critical task ended; stopping")
                && logs.contains(&format!("\"task\":\"{task}\"")),
            "{task}: the log names the task"
        );
        eprintln!("{task} ({how}): exited {code:?} {took:?} after it died");
        let _ = std::fs::remove_file(&trigger);
    }
}
