//! `bench`: measures runnerd on emulated AWS (moto) and writes
//! `BENCHMARKS.md`. Each figure starts its own moto, control plane and
//! runnerd processes on 127.0.0.1 and stops them; figures are the median of
//! several runs. Not part of the tests: nothing here asserts a speed.

mod burst;
mod failover;
mod launch;
mod lifecycle;
mod recording;
mod report;
mod steady;
mod world;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::report::Report;
use crate::world::Tools;

/// Benchmarks of runnerd on moto.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    figure: Figure,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3, global = true)]
    runs: usize,
    /// Smaller sizes, for a smoke run.
    #[arg(long, global = true)]
    quick: bool,
    /// moto's server: `bench/moto-server` is moto from `tests/python/ensure-venv`
    /// with EC2 tags looked up by resource id (moto scans every tag of every
    /// resource per instance, which makes a 10,000-instance fleet take hours),
    /// DynamoDB one call at a time, and transactions backed up by index.
    #[arg(long, global = true, default_value = "bench/moto-server")]
    moto_server: PathBuf,
    /// The runnerd binary to measure (a release build; the report says
    /// which kind it was given).
    #[arg(long, global = true, default_value = "target/release/runnerd")]
    runnerd: PathBuf,
    /// Where logs go.
    #[arg(long, global = true, default_value = "target/bench")]
    work_dir: PathBuf,
    /// Where the report goes.
    #[arg(long, global = true, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Environments launched for the launch overhead (default 500; 50 with --quick).
    #[arg(long, global = true)]
    launches: Option<usize>,
    /// Environments created for the latency (default 500; 100 with --quick).
    #[arg(long, global = true)]
    latency_envs: Option<usize>,
    /// Environments created per second for the latency (default 20).
    #[arg(long, global = true)]
    latency_rate: Option<f64>,
    /// Known environments for the steady-state figures, one size or several
    /// separated by commas, each populated once (default 2000,10000; 300 with
    /// --quick).
    #[arg(long, global = true, value_delimiter = ',')]
    steady_envs: Option<Vec<usize>>,
    /// Resync passes timed per steady run (default 2).
    #[arg(long, global = true)]
    steady_passes: Option<usize>,
    /// Running environments stopped and started at once for the burst
    /// figure (default 500; 50 with --quick).
    #[arg(long, global = true)]
    burst_envs: Option<usize>,
    /// An extra environment variable for every runnerd started, as
    /// KEY=VALUE (repeatable; the report lists them).
    #[arg(long = "runnerd-env", global = true, value_parser = key_value)]
    runnerd_env: Vec<(String, String)>,
    /// The command line to print in the report.
    #[arg(long, global = true, default_value = "bench/run")]
    command: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
enum Figure {
    /// Launch overhead against a minimal program.
    Launch,
    /// Watch event → RunInstances latency at a steady creation rate.
    Latency,
    /// AWS calls per environment lifecycle, and idle memory.
    Lifecycle,
    /// Many environments: restart to ready, memory, CPU and calls per pass.
    Steady,
    /// A stop burst and a start burst: EC2 calls and instances described.
    Burst,
    /// Leader failover with two replicas.
    Failover,
    /// Every figure.
    All,
}

/// Sizes of one invocation.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    pub(crate) launches: usize,
    pub(crate) latency_envs: usize,
    pub(crate) latency_rate: f64,
    pub(crate) steady_envs: Vec<usize>,
    pub(crate) steady_passes: usize,
    pub(crate) burst_envs: usize,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_renew: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        let full = Self {
            launches: 500,
            latency_envs: 500,
            latency_rate: 20.0,
            steady_envs: vec![2_000, 10_000],
            steady_passes: 2,
            burst_envs: 500,
            lease_ttl: Duration::from_secs(5),
            lease_renew: Duration::from_secs(1),
        };
        if quick {
            Self {
                launches: 50,
                latency_envs: 100,
                steady_envs: vec![300],
                burst_envs: 50,
                ..full
            }
        } else {
            full
        }
    }

    /// The resync interval of a steady run with `n` environments: 30 ms per
    /// environment, at least 30 s (a full describe on moto took about 25 ms
    /// per instance on an idle machine, about 50 ms on a loaded one).
    pub(crate) fn steady_resync(n: usize) -> Duration {
        Duration::from_secs(30).max(Duration::from_millis(30) * n as u32)
    }
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.work_dir)?;
    let tools = Tools {
        moto_server: std::fs::canonicalize(&cli.moto_server)?,
        runnerd: std::fs::canonicalize(&cli.runnerd)?,
        work_dir: std::fs::canonicalize(&cli.work_dir)?,
        runnerd_env: cli.runnerd_env.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut sizes = Sizes::new(cli.quick);
    if let Some(n) = cli.steady_envs.clone() {
        sizes.steady_envs = n;
    }
    if let Some(n) = cli.steady_passes {
        sizes.steady_passes = n.max(1);
    }
    if let Some(n) = cli.burst_envs {
        sizes.burst_envs = n;
    }
    if let Some(n) = cli.launches {
        sizes.launches = n;
    }
    if let Some(n) = cli.latency_envs {
        sizes.latency_envs = n;
    }
    if let Some(r) = cli.latency_rate {
        anyhow::ensure!(r > 0.0 && r.is_finite(), "--latency-rate must be positive");
        sizes.latency_rate = r;
    }
    let runs = cli.runs.max(1);
    let mut report = Report::new(&cli.command, &tools, &sizes, runs, cli.quick);
    let all = cli.figure == Figure::All;
    let figures = async {
        // A figure that fails is reported with its error; the others still run.
        if all || cli.figure == Figure::Launch {
            let result = report.launch(&tools, &sizes, runs).await;
            report.failed("Launch overhead", result);
        }
        if all || cli.figure == Figure::Latency {
            let result = report.latency(&tools, &sizes, runs).await;
            report.failed("Watch event → RunInstances latency", result);
        }
        if all || cli.figure == Figure::Lifecycle {
            let result = report.lifecycle(&tools, runs).await;
            report.failed("AWS calls per environment lifecycle", result);
        }
        if all || cli.figure == Figure::Steady {
            let result = report.steady(&tools, &sizes, runs).await;
            report.failed("Known environments", result);
        }
        if all || cli.figure == Figure::Burst {
            let result = report.burst(&tools, &sizes, runs).await;
            report.failed("Stop and start bursts", result);
        }
        if all || cli.figure == Figure::Failover {
            let result = report.failover(&tools, &sizes, runs).await;
            report.failed("Leader failover", result);
        }
    };
    // On SIGINT or SIGTERM the figures are dropped, which kills every
    // process they started.
    let interrupted = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            () = figures => anyhow::Ok(false),
            _ = tokio::signal::ctrl_c() => Ok(true),
            _ = term.recv() => Ok(true),
        }
    })?;
    if interrupted {
        runtime.shutdown_timeout(Duration::from_secs(5));
        anyhow::bail!("interrupted: nothing written");
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
    let text = report.render();
    if all {
        std::fs::write(&cli.out, &text)?;
        eprintln!("bench: wrote {}", cli.out.display());
    } else {
        println!("{text}");
    }
    Ok(())
}
