//! Runs the figures and renders `BENCHMARKS.md`: the machine, the command,
//! per figure a table with the median and each run, the targets and verdicts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::lifecycle::{BACKGROUND, CACHED};
use crate::world::Tools;
use crate::{Sizes, burst, failover, launch, lifecycle, recording, steady};

/// One line of the summary.
struct Verdict {
    target: String,
    measured: String,
    met: bool,
}

/// The report being built.
pub(crate) struct Report {
    header: String,
    summary: Vec<Verdict>,
    sections: Vec<String>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The 1-minute load average now: other work on the machine shows here.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `| name | median | run1, run2, ... |` with `digits` decimals.
fn row(name: &str, unit: &str, values: &[f64], digits: usize) -> String {
    let runs: Vec<String> = values.iter().map(|v| format!("{v:.digits$}")).collect();
    format!(
        "| {name} | {:.digits$} {unit} | {} |\n",
        median(values),
        runs.join(", ")
    )
}

fn shell(command: &str, args: &[&str]) -> String {
    Command::new(command)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `debug` or `release`, from the runnerd binary's directory in the
/// cargo target directory.
fn build_kind(tools: &Tools) -> &'static str {
    if tools.runnerd.components().any(|c| c.as_os_str() == "debug") {
        "**debug**"
    } else {
        "release"
    }
}

fn machine(tools: &Tools) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_owned(), |(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|m| m.split_whitespace().next()?.parse::<f64>().ok())
        .map_or("unknown".to_owned(), |kib| {
            format!("{:.1} GiB", kib / 1024.0 / 1024.0)
        });
    // moto's Python: next to `moto_server`, or the one `bench/moto-server` runs.
    let python = std::env::var_os("MOTO_PYTHON")
        .map(std::path::PathBuf::from)
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            let beside = tools.moto_server.with_file_name("python");
            if beside.exists() {
                beside
            } else {
                ".tools/venv/bin/python3".into()
            }
        });
    let indexed = if tools.moto_server.ends_with("moto-server") {
        "; EC2 tags looked up by resource id, DynamoDB one call at a time, transactions backed up by index, `bench/moto_indexed_tags.py`"
    } else {
        ""
    };
    let moto = shell(
        &python.to_string_lossy(),
        &["-c", "import moto; print(moto.__version__)"],
    );
    let meta = std::fs::metadata(&tools.runnerd).ok();
    let size = meta.as_ref().map_or(0, std::fs::Metadata::len);
    let built = meta
        .and_then(|m| m.modified().ok())
        .map_or("unknown".to_owned(), |t| {
            humantime::format_rfc3339_seconds(t).to_string()
        });
    format!(
        "- CPU: {model}, {} cores (`nproc`)\n- memory: {memory}\n- kernel: {}\n- moto {moto} \
         (one server process per run, on 127.0.0.1{indexed})\n- runnerd: {} build of {built}, {:.1} MB \
         (`{}`)\n",
        shell("nproc", &[]),
        shell("uname", &["-sr"]),
        build_kind(tools),
        size as f64 / 1e6,
        tools.runnerd.display(),
    )
}

impl Report {
    pub(crate) fn new(
        command: &str,
        tools: &Tools,
        sizes: &Sizes,
        runs: usize,
        quick: bool,
    ) -> Self {
        let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let mut header = String::new();
        let _ = write!(
            header,
            "# Benchmarks\n\nMeasured {date} by\n\n```sh\n{command}\n```\n\n\
             (the `bench` crate; `bench/run --help`). {}{}. Every run starts its own moto, reference \
             control plane and `runnerd` on 127.0.0.1. AWS calls are counted by \
             `testkit::proxy::FaultProxy`, without faults, between runnerd and moto: it names \
             each request by its EC2 `Action` or `X-Amz-Target` and keeps each request's \
             arrival and completion time. Memory is `VmRSS` and CPU time \
             `utime + stime` of the runnerd process, from `/proc`.\n\n## Machine\n\n{}",
            if runs == 1 {
                "Each figure is from one run".to_owned()
            } else {
                format!("Each figure is the median of {runs} runs (the individual runs follow it)")
            },
            if quick {
                "; **quick mode: reduced sizes, not the figures of record**"
            } else {
                ""
            },
            machine(tools),
        );
        if !tools.runnerd_env.is_empty() {
            let vars: Vec<String> = tools
                .runnerd_env
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .collect();
            let _ = writeln!(header, "\nExtra runnerd environment: {}.", vars.join(", "));
        }
        let known: Vec<String> = sizes
            .steady_envs
            .iter()
            .map(|n| {
                format!(
                    "{n} (resync interval {})",
                    humantime::format_duration(Sizes::steady_resync(*n))
                )
            })
            .collect();
        let _ = writeln!(
            header,
            "\nSizes: {} launches; {} environments created at {}/s; known environments: {}; \
             {} environments in the stop and start bursts; lease TTL {}, renewed every {} \
             (failover figure).",
            sizes.launches,
            sizes.latency_envs,
            sizes.latency_rate,
            known.join(", "),
            sizes.burst_envs,
            humantime::format_duration(sizes.lease_ttl),
            humantime::format_duration(sizes.lease_renew),
        );
        Self {
            header,
            summary: Vec::new(),
            sections: Vec::new(),
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut out = self.header.clone();
        out.push_str("\n## Targets\n\n| target | measured (median) | verdict |\n|---|---|---|\n");
        for v in &self.summary {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                v.target,
                v.measured,
                if v.met { "met" } else { "**missed**" }
            );
        }
        for section in &self.sections {
            out.push('\n');
            out.push_str(section);
        }
        out
    }

    /// Records a figure that could not be measured, with the reason.
    pub(crate) fn failed(&mut self, figure: &str, result: anyhow::Result<()>) {
        if let Err(err) = result {
            eprintln!("bench: {figure} failed: {err:#}");
            self.sections.push(format!(
                "## {figure}\n\n**Not measured**: a run failed with: `{err:#}`. Logs of the \
                 processes are in the work directory (`target/bench` under the cargo target \
                 directory).\n"
            ));
        }
    }

    fn verdict(&mut self, target: &str, measured: String, met: bool) {
        self.summary.push(Verdict {
            target: target.to_owned(),
            measured,
            met,
        });
    }

    pub(crate) async fn launch(
        &mut self,
        tools: &Tools,
        sizes: &Sizes,
        runs: usize,
    ) -> anyhow::Result<()> {
        let n = sizes.launches;
        let load = load();
        let (mut runner, mut base, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        let (mut runner_calls, mut base_calls) = (Vec::new(), Vec::new());
        let (mut losses, mut lost_in_store) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            // Interleaved, and the order alternates: neither side always
            // runs on the machine the other just left.
            let (r, b) = if run % 2 == 1 {
                let r = launch::runnerd_launch(tools, n).await?;
                (r, launch::baseline_launch(tools, n).await?)
            } else {
                let b = launch::baseline_launch(tools, n).await?;
                (launch::runnerd_launch(tools, n).await?, b)
            };
            losses.push(r.lease_losses as f64);
            lost_in_store.push(r.lease_lost_in_store as f64);
            eprintln!(
                "launch {run}/{runs}: runnerd {:?}, baseline {:?}",
                r.took, b.took
            );
            runner.push(secs(r.took));
            base.push(secs(b.took));
            ratio.push(secs(r.took) / secs(b.took));
            runner_calls.push(r.calls);
            base_calls.push(b.calls);
        }
        let m = median(&ratio);
        self.verdict(
            &format!("launch overhead ratio, {n} launches, ≤ 1.2"),
            format!("{m:.2}"),
            m <= 1.2,
        );
        let worst = losses.iter().copied().fold(0.0, f64::max);
        self.verdict(
            &format!("lease losses during the {n}-launch burst: 0"),
            format!("{worst:.0} in the worst run"),
            worst == 0.0,
        );
        let mut s = format!(
            "## Launch overhead\n\n{n} environments from \"created in the control plane\" to \
             \"RunInstances accepted\" (the proxy received the last RunInstances response), \
             against a minimal program that issues the same essential calls with the same \
             concurrency ({}, runnerd's default `RUNNER_CONCURRENCY`) against a fresh moto of \
             its own (runnerd's run also gets a fresh moto): per environment the fenced intent \
             write (`TransactWriteItems`: a condition check on the leader lease item plus a \
             conditional put, as runnerd writes its records), `RunInstances` with the runner's \
             tags, settings and user data (built by the same `runner_aws::ec2::run_request`), \
             and the fenced result write. Both go through the same recording proxy. The runs \
             are interleaved, alternating which side goes first. \
             runnerd runs with its default settings except the EC2 token buckets, raised to \
             1000/s (`RUNNER_EC2_LAUNCH_RATE`, `_BURST`, `RUNNER_EC2_MUTATE_RATE`, `_BURST`) so \
             that they do not set the pace; it is ready and leading before the first \
             environment is created, and the environments are created 16 at a time.\n\n\
             | figure | median | runs |\n|---|---|---|\n",
            launch::CONCURRENCY
        );
        s.push_str(&row("runnerd", "s", &runner, 2));
        s.push_str(&row("minimal program", "s", &base, 2));
        s.push_str(&row("ratio", "", &ratio, 2));
        s.push_str(&row(
            "runnerd: leadership lost during the launches",
            "",
            &losses,
            0,
        ));
        s.push_str(&row(
            "… of which the lease lost in the table",
            "",
            &lost_in_store,
            0,
        ));
        let mut ops: Vec<&String> = runner_calls
            .iter()
            .chain(&base_calls)
            .flat_map(|c| c.keys())
            .collect();
        ops.sort();
        ops.dedup();
        s.push_str(
            "\nAWS calls from the first creation (the program's start) to the last \
             RunInstances accepted, by operation (median of the runs):\n\n| operation | \
             runnerd | minimal program |\n|---|---|---|\n",
        );
        for op in ops {
            let count = |calls: &[BTreeMap<String, usize>]| {
                median(
                    &calls
                        .iter()
                        .map(|c| c.get(op).copied().unwrap_or(0) as f64)
                        .collect::<Vec<_>>(),
                )
            };
            let _ = writeln!(
                s,
                "| `{op}` | {:.0} | {:.0} |",
                count(&runner_calls),
                count(&base_calls)
            );
        }
        let _ = write!(
            s,
            "\nLeadership losses are counted from runnerd's log from the first creation to the \
             last RunInstances accepted: each `no longer leading: reconciling stopped` ends a \
             term (its reconciles are cancelled and fail with `this replica lost its lease`); \
             it follows either a lease lost in the table (`lost the leader lease`, `the leader \
             lease ran out locally`, counted apart) or a renewal that came back after the \
             lease's local validity (TTL less a fifth) had run out.\n"
        );
        let _ = writeln!(s, "\nLoad average (1 min) when the figure started: {load}.");
        self.sections.push(s);
        Ok(())
    }

    pub(crate) async fn latency(
        &mut self,
        tools: &Tools,
        sizes: &Sizes,
        runs: usize,
    ) -> anyhow::Result<()> {
        let load = load();
        let (mut raw50, mut raw99, mut side50, mut side99, mut rates) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut throughputs = Vec::new();
        for run in 1..=runs {
            let l = launch::latency(tools, sizes.latency_envs, sizes.latency_rate).await?;
            eprintln!(
                "latency {run}/{runs}: runner-side p50 {:.1} ms p99 {:.1} ms, raw p99 {:.1} ms",
                percentile(&l.runner_side, 50.0),
                percentile(&l.runner_side, 99.0),
                percentile(&l.raw, 99.0)
            );
            raw50.push(percentile(&l.raw, 50.0));
            raw99.push(percentile(&l.raw, 99.0));
            side50.push(percentile(&l.runner_side, 50.0));
            side99.push(percentile(&l.runner_side, 99.0));
            rates.push(l.rate);
            throughputs.push(l.throughput);
        }
        let m = median(&side99);
        self.verdict(
            "p99 runner-side latency, watch event → RunInstances, ≤ 20 ms",
            format!("{m:.1} ms (raw, moto included: {:.1} ms)", median(&raw99)),
            m <= 20.0,
        );
        let mut s = format!(
            "## Watch event → RunInstances latency\n\n{} environments created at {}/s; per \
             environment, from the start of its `CreateEnvironment` admin call (the control \
             plane sends `environment_changed` before that call returns) to its RunInstances \
             request arriving at the proxy. *Raw* is that whole time. *Runner-side* subtracts \
             the time this environment's own AWS calls before RunInstances spent in the proxy \
             and moto (normally one: the intent `TransactWriteItems`); it still includes the \
             `GetEnvironment` call to the in-process control plane and any wait for a CPU on \
             this 2-core machine, which moto, the control plane and the proxy share with \
             runnerd. EC2 token buckets as for the launch overhead.\n\n\
             | figure | median | runs |\n|---|---|---|\n",
            sizes.latency_envs, sizes.latency_rate
        );
        s.push_str(&row("runner-side p50", "ms", &side50, 1));
        s.push_str(&row("runner-side p99", "ms", &side99, 1));
        s.push_str(&row("raw p50", "ms", &raw50, 1));
        s.push_str(&row("raw p99", "ms", &raw99, 1));
        s.push_str(&row("achieved creation rate", "/s", &rates, 1));
        s.push_str(&row(
            "RunInstances rate runnerd sustained",
            "/s",
            &throughputs,
            1,
        ));
        if median(&throughputs) < sizes.latency_rate * 0.95 {
            s.push_str(
                "\nrunnerd launched more slowly than environments were created, so they queued \
                 inside runnerd (its work queue runs `RUNNER_CONCURRENCY` reconciles at a time, \
                 busy with other environments): the latency grows with the backlog, and the \
                 percentiles measure that backlog rather than the path of one launch. The launch \
                 overhead figure shows why throughput is lower than the minimal program's on \
                 the same moto.\n",
            );
        }
        let _ = writeln!(s, "\nLoad average (1 min) when the figure started: {load}.");
        self.sections.push(s);
        Ok(())
    }

    pub(crate) async fn lifecycle(&mut self, tools: &Tools, runs: usize) -> anyhow::Result<()> {
        let load = load();
        let mut results = Vec::new();
        for run in 1..=runs {
            let l = lifecycle::run(tools).await?;
            eprintln!(
                "lifecycle {run}/{runs}: {:?}, idle {:.1} MiB",
                l.calls, l.idle_rss
            );
            results.push(l);
        }
        let idle: Vec<f64> = results.iter().map(|l| l.idle_rss).collect();
        let m = median(&idle);
        self.verdict(
            "idle resident memory ≤ 25 MB",
            format!("{m:.1} MiB"),
            m <= 25.0 / 1.048_576,
        );
        let minimum: BTreeMap<&str, usize> = [
            ("RunInstances", 1),
            ("StopInstances", 1),
            ("StartInstances", 1),
            ("TerminateInstances", 1),
            ("DescribeInstances", 4),
            ("DynamoDB_20120810.TransactWriteItems", 3),
        ]
        .into_iter()
        .collect();
        let mut ops: Vec<String> = results
            .iter()
            .flat_map(|l| l.calls.keys().cloned())
            .chain(minimum.keys().map(|k| (*k).to_owned()))
            .collect();
        ops.sort();
        ops.dedup();
        let mut s = String::from(
            "## AWS calls per environment lifecycle\n\nOne environment through create → \
             running → stopped → running → deleted, each step waiting until the runner \
             reported the phase for the new spec; runnerd with its default settings (2 s \
             poll and observe intervals, 5 min resync, lease renewed every 5 s, health \
             checks every 30 s). Every AWS call during the lifecycle, by operation:\n\n\
             | operation | kind | median | runs | minimum |\n|---|---|---|---|---|\n",
        );
        let mut per_env = Vec::new();
        for op in &ops {
            let counts: Vec<f64> = results
                .iter()
                .map(|l| l.calls.get(op).copied().unwrap_or(0) as f64)
                .collect();
            let kind = if BACKGROUND.contains(&op.as_str()) {
                "background (lease, health)"
            } else if CACHED.contains(&op.as_str()) {
                "per process, cached"
            } else {
                "per environment"
            };
            let min = minimum.get(op.as_str()).copied().unwrap_or(0);
            let runs: Vec<String> = counts.iter().map(|c| format!("{c:.0}")).collect();
            let _ = writeln!(
                s,
                "| `{op}` | {kind} | {:.0} | {} | {} |",
                median(&counts),
                runs.join(", "),
                if kind == "per environment" {
                    min.to_string()
                } else {
                    "–".to_owned()
                }
            );
            if kind == "per environment" {
                per_env.push(counts);
            }
        }
        let totals: Vec<f64> = (0..results.len())
            .map(|i| per_env.iter().map(|c| c[i]).sum())
            .collect();
        let min_total: usize = minimum.values().sum();
        let m = median(&totals);
        let _ = write!(
            s,
            "\nPer-environment total: median {m:.0} (runs {}), minimum {min_total}. Lifecycle \
             wall time: {}.\n\nThe minimum: one call per EC2 mutation (run, stop, start, \
             terminate); three record writes (the launch intent before RunInstances, the \
             instance id after, the record's removal), which the design requires; one \
             DescribeInstances after each of the four mutations to see its outcome \
             (batched across environments, so under load one describe serves many). The \
             runner's record writes are `TransactWriteItems` (a lease check plus the write, \
             for fencing), counted as one call each. Background calls (lease renewal \
             `UpdateItem`, health checks) do not depend on the environments; the AMI's root \
             device and the zones offering the type are looked up on a process's first \
             launch and cached. The environment's repository has no SCM integration, so no \
             checkout-credential secret is stored and the minimum counts no \
             `secretsmanager.DeleteSecret`; runnerd deletes that secret with every environment \
             (after a restart it could not tell whether one was stored). Load average (1 min) when the figure started: {load}.\n",
            totals
                .iter()
                .map(|t| format!("{t:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            results
                .iter()
                .map(|l| format!("{:.1} s", secs(l.took)))
                .collect::<Vec<_>>()
                .join(", "),
        );
        self.verdict(
            "AWS calls per lifecycle ≤ minimum + 10 %",
            format!("{m:.0} per environment, minimum {min_total}"),
            m <= min_total as f64 * 1.1,
        );
        let mut idle_section = String::from(
            "## Idle memory\n\nrunnerd ready and leading with no environment, 5 s after the \
             lease was acquired.\n\n| figure | median | runs |\n|---|---|---|\n",
        );
        idle_section.push_str(&row("resident memory (VmRSS)", "MiB", &idle, 1));
        self.sections.push(s);
        self.sections.push(idle_section);
        Ok(())
    }

    pub(crate) async fn steady(
        &mut self,
        tools: &Tools,
        sizes: &Sizes,
        runs: usize,
    ) -> anyhow::Result<()> {
        // Resident memory (median) per size, for the cost of one environment.
        let mut memory: Vec<(usize, f64)> = Vec::new();
        let mut ready_by_size: Vec<(usize, f64)> = Vec::new();
        for &size in &sizes.steady_envs {
            let (rss, ready) = self
                .steady_size(tools, size, sizes.steady_passes, runs)
                .await?;
            memory.push((size, rss));
            ready_by_size.push((size, ready));
        }
        if let (Some(&(small, rss_small)), Some(&(large, rss_large))) =
            (memory.first(), memory.last())
            && large > small
        {
            let per_env = (rss_large - rss_small) * 1024.0 * 1024.0 / (large - small) as f64;
            let (ready_small, ready_large) =
                (ready_by_size[0].1, ready_by_size[ready_by_size.len() - 1].1);
            self.verdict(
                &format!(
                    "restart to ready equal (within noise, here: 0.5 s) at {small} and {large} environments"
                ),
                format!("{ready_small:.2} s and {ready_large:.2} s"),
                (ready_large - ready_small).abs() <= 0.5,
            );
            self.sections.push(format!(
                "## Memory per known environment\n\nFrom the steady runs above: (resident memory \
                 at {large} − at {small}) / {} = ({rss_large:.1} MiB − {rss_small:.1} MiB) / {} \
                 = **{:.0} bytes per environment** (medians; `VmRSS` includes what the \
                 allocator keeps, so this is an upper estimate of the live data).\n",
                large - small,
                large - small,
                per_env,
            ));
        }
        Ok(())
    }

    /// The steady figure at one size; (median resident memory in MiB,
    /// median restart to ready in seconds).
    async fn steady_size(
        &mut self,
        tools: &Tools,
        size: usize,
        passes: usize,
        runs: usize,
    ) -> anyhow::Result<(f64, f64)> {
        let load = load();
        let resync = Sizes::steady_resync(size);
        eprintln!("steady: populating {size} environments");
        let populated = steady::populate(tools, size).await?;
        eprintln!(
            "steady: populated {} in {:?}",
            populated.environments, populated.took
        );
        let mut results = Vec::new();
        for run in 1..=runs {
            let r = steady::run(tools, &populated, resync, passes).await?;
            eprintln!(
                "steady {size} {run}/{runs}: ready {:?}, settled {:?}, rss {:.1} MiB, cpu/pass {:?}, calls/pass {:?}",
                r.ready, r.settled, r.rss, r.cpu_per_pass, r.calls_per_pass
            );
            results.push(r);
        }
        let n = populated.environments;
        let col =
            |f: &dyn Fn(&steady::SteadyRun) -> f64| -> Vec<f64> { results.iter().map(f).collect() };
        let ready = col(&|r| secs(r.ready));
        let rss = col(&|r| r.rss);
        let scans: usize = results.iter().map(|r| r.scans).sum();
        let m_ready = median(&ready);
        let m_rss = median(&rss);
        let reads = col(&|r| {
            r.calls_per_pass
                .iter()
                .filter(|(op, _)| recording::ec2_read(op))
                .map(|(_, c)| c)
                .sum()
        });
        let m_reads = median(&reads);
        let read_target = n.div_ceil(1000) + 2;
        if n >= 10_000 {
            self.verdict(
                &format!("{n} environments: resident memory ≤ 64 MiB"),
                format!("{m_rss:.1} MiB"),
                m_rss <= 64.0,
            );
        } else {
            self.verdict(
                &format!("{n} environments: resident memory ≤ 128 MB"),
                format!("{m_rss:.1} MiB"),
                m_rss <= 128.0 / 1.048_576,
            );
        }
        self.verdict(
            &format!("restart to ready with {n} environments ≤ 3 s"),
            format!("{m_ready:.2} s"),
            m_ready <= 3.0,
        );
        self.verdict(
            &format!(
                "EC2 read calls per resync interval, {n} environments, ≤ ⌈{n} / 1000⌉ + 2 = {read_target}"
            ),
            format!("{m_reads:.1}"),
            m_reads <= read_target as f64,
        );
        self.verdict(
            &format!("zero DynamoDB scans in steady state ({n} environments)"),
            format!("{scans} Scan calls over all runs"),
            scans == 0,
        );
        let mut s = format!(
            "## {n} known environments\n\nSet up once, directly (not through the proxy): {n} \
             environments in the control plane, an instance for each in moto with the \
             runner's tags, a launched record for each in the table in the runner's format \
             (took {:.0} s). Then, per run, runnerd starts on that state (run 1 also trades \
             the exchange token; later runs follow a graceful stop of the previous one, which \
             releases the lease) with `RUNNER_RESYNC_INTERVAL={}` (30 ms per environment, \
             at least 30 s; a full describe on a loaded moto can take longer) and default \
             settings otherwise (`RUNNER_EC2_DESCRIBE_PAGE_SIZE` 1000). *Restart to ready* is process \
             spawn → `/readyz` 200 (the control-plane session is up and leadership decided; \
             the first full describe runs in the background). *Settled*: every environment \
             reconciled once and its status delivered to the control plane (a new leadership \
             term reports every status again). Then the next {passes} resync interval(s) are \
             timed by the clock (a full describe of a large fleet on moto can outlast an \
             interval, so describe pages cannot mark the passes): *per resync pass* is per \
             interval, counting every call that arrived in the window, and includes what \
             happens between passes (lease renewals, health checks every 30 s). The split \
             of DescribeInstances by kind and the instance records counted are from the \
             calls completed by the window's end. Memory is read at the window's end.\n\n\
             | figure | median | runs |\n|---|---|---|\n",
            secs(populated.took),
            humantime::format_duration(resync),
        );
        s.push_str(&row("restart to ready", "s", &ready, 2));
        s.push_str(&row(
            "… of which in DescribeInstances (moto) before ready",
            "s",
            &col(&|r| secs(r.ready_describing)),
            2,
        ));
        s.push_str(&row("ready → settled", "s", &col(&|r| secs(r.settled)), 1));
        s.push_str(&row("resident memory (VmRSS)", "MiB", &rss, 1));
        s.push_str(&row(
            "peak resident memory (VmHWM)",
            "MiB",
            &col(&|r| r.hwm),
            1,
        ));
        s.push_str(&row(
            "CPU time per resync pass",
            "ms",
            &col(&|r| r.cpu_per_pass.as_secs_f64() * 1000.0),
            0,
        ));
        s.push_str(&row(
            "one page (1,000 instances) of a full describe, mean (moto)",
            "s",
            &col(&|r| secs(r.describe)),
            2,
        ));
        s.push_str(&row("EC2 read calls per resync pass", "", &reads, 1));
        for kind in union_keys(results.iter().map(|r| &r.describes_per_pass)) {
            let values = col(&|r| r.describes_per_pass.get(&kind).copied().unwrap_or(0.0));
            s.push_str(&row(
                &format!("… DescribeInstances {kind} per pass"),
                "",
                &values,
                1,
            ));
        }
        s.push_str(&row(
            "instance records described per pass",
            "",
            &col(&|r| r.described_per_pass),
            0,
        ));
        let ops = union_keys(results.iter().map(|r| &r.calls_per_pass));
        s.push_str("\nAWS calls per resync interval, by operation:\n\n| operation | median | runs |\n|---|---|---|\n");
        for op in ops {
            let values = col(&|r| r.calls_per_pass.get(&op).copied().unwrap_or(0.0));
            s.push_str(&row(&format!("`{op}`"), "", &values, 1));
        }
        let _ = writeln!(
            s,
            "\nDynamoDB `Scan` calls over all runs, start-up included: {scans}. Load average \
             (1 min) when the figure started: {load}."
        );
        self.sections.push(s);
        drop(populated);
        Ok((m_rss, m_ready))
    }

    pub(crate) async fn burst(
        &mut self,
        tools: &Tools,
        sizes: &Sizes,
        runs: usize,
    ) -> anyhow::Result<()> {
        let load = load();
        let mut results = Vec::new();
        for run in 1..=runs {
            let b = burst::run(tools, sizes.burst_envs).await?;
            eprintln!(
                "burst {run}/{runs}: stop {:?} {:?} described {}, start {:?} {:?} described {}",
                b.stop.took,
                b.stop.calls,
                b.stop.described,
                b.start.took,
                b.start.calls,
                b.start.described
            );
            results.push(b);
        }
        let n = results.first().map_or(sizes.burst_envs, |r| r.environments);
        let col =
            |f: &dyn Fn(&burst::BurstRun) -> f64| -> Vec<f64> { results.iter().map(f).collect() };
        let mutations = |b: &burst::Burst| -> f64 {
            b.calls
                .iter()
                .filter(|(op, _)| recording::ec2_mutation(op))
                .map(|(_, c)| *c as f64)
                .sum()
        };
        let stop_mutations = col(&|r| mutations(&r.stop));
        let start_mutations = col(&|r| mutations(&r.start));
        let stop_described = col(&|r| r.stop.described as f64 / n as f64);
        let start_described = col(&|r| r.start.described as f64 / n as f64);
        let m = median(&stop_mutations);
        self.verdict(
            &format!("mutating EC2 calls for a {n}-environment stop burst ≤ 25"),
            format!("{m:.0} (start burst: {:.0})", median(&start_mutations)),
            m <= 25.0,
        );
        let worst = median(&stop_described).max(median(&start_described));
        self.verdict(
            "instances described per changed environment during a burst ≤ 2",
            format!(
                "{:.2} (stop), {:.2} (start)",
                median(&stop_described),
                median(&start_described)
            ),
            worst <= 2.0,
        );
        let mut s = format!(
            "## Stop and start bursts\n\n{n} running environments, set up directly as for the \
             known-environments figure (took {:.0} s); runnerd with its default settings (EC2 \
             token buckets, 5 min resync, 2 s observe interval) on them, ready and every \
             environment reported RUNNING. Then every environment's desired phase is set to \
             STOPPED at once ({n} concurrent admin calls), and the window runs from the first \
             call until the control plane has STOPPED reported for all of them; then the same \
             for RUNNING. *Instances described* are the instance records in the \
             DescribeInstances answers of the window (the proxy counts each answer's \
             `<instanceId>` elements), divided by {n}; *of which full* is the share from \
             describes of all the runner's instances (a resync or term start in the window), \
             not by id.\n\n| figure | median | runs |\n|---|---|---|\n",
            median(&col(&|r| secs(r.populated))),
        );
        s.push_str(&row(
            "stop burst: wall time",
            "s",
            &col(&|r| secs(r.stop.took)),
            1,
        ));
        s.push_str(&row(
            "stop burst: mutating EC2 calls",
            "",
            &stop_mutations,
            0,
        ));
        s.push_str(&row(
            "stop burst: instances described per environment",
            "",
            &stop_described,
            2,
        ));
        s.push_str(&row(
            "… of which full describes",
            "",
            &col(&|r| r.stop.described_full as f64 / n as f64),
            2,
        ));
        s.push_str(&row(
            "start burst: wall time",
            "s",
            &col(&|r| secs(r.start.took)),
            1,
        ));
        s.push_str(&row(
            "start burst: mutating EC2 calls",
            "",
            &start_mutations,
            0,
        ));
        s.push_str(&row(
            "start burst: instances described per environment",
            "",
            &start_described,
            2,
        ));
        s.push_str(&row(
            "… of which full describes",
            "",
            &col(&|r| r.start.described_full as f64 / n as f64),
            2,
        ));
        let mut ops: Vec<String> = results
            .iter()
            .flat_map(|r| r.stop.calls.keys().chain(r.start.calls.keys()).cloned())
            .collect();
        ops.sort();
        ops.dedup();
        s.push_str(
            "\nAWS calls in each window, by operation (median of the runs):\n\n| operation | \
             stop burst | start burst |\n|---|---|---|\n",
        );
        for op in ops {
            let count = |f: &dyn Fn(&burst::BurstRun) -> &BTreeMap<String, usize>| {
                median(&col(&|r| f(r).get(&op).copied().unwrap_or(0) as f64))
            };
            let _ = writeln!(
                s,
                "| `{op}` | {:.0} | {:.0} |",
                count(&|r| &r.stop.calls),
                count(&|r| &r.start.calls)
            );
        }
        let _ = writeln!(s, "\nLoad average (1 min) when the figure started: {load}.");
        self.sections.push(s);
        Ok(())
    }

    pub(crate) async fn failover(
        &mut self,
        tools: &Tools,
        sizes: &Sizes,
        runs: usize,
    ) -> anyhow::Result<()> {
        let load = load();
        let (mut acquired, mut leading) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let f = failover::run(tools, sizes.lease_ttl, sizes.lease_renew).await?;
            eprintln!("failover {run}/{runs}: {f:?}");
            acquired.push(secs(f.acquired));
            leading.push(secs(f.leading));
        }
        let limit = secs(sizes.lease_ttl) + 2.0;
        let m = median(&leading);
        self.verdict(
            &format!(
                "failover ≤ lease TTL + 2 s ({} + 2 s)",
                humantime::format_duration(sizes.lease_ttl)
            ),
            format!("{m:.2} s"),
            m <= limit,
        );
        let mut s = format!(
            "## Leader failover\n\nTwo runnerd processes on one table and control plane, \
             `RUNNER_LEASE_TTL={}`, `RUNNER_LEASE_RENEW_INTERVAL={}` (a standby tries to take \
             the lease at that interval). The leader (the lease's holder) is killed with \
             SIGKILL, so it cannot release the lease; the time runs from the kill to the \
             standby's log lines (their timestamps). The lease expires TTL after the \
             leader's last renewal, which happened up to one renewal interval before the \
             kill.\n\n| figure | median | runs |\n|---|---|---|\n",
            humantime::format_duration(sizes.lease_ttl),
            humantime::format_duration(sizes.lease_renew),
        );
        s.push_str(&row(
            "kill → \"acquired the leader lease\"",
            "s",
            &acquired,
            2,
        ));
        s.push_str(&row("kill → \"leading: reconciling\"", "s", &leading, 2));
        let _ = writeln!(s, "\nLoad average (1 min) when the figure started: {load}.");
        self.sections.push(s);
        Ok(())
    }
}

/// Every key of the runs' maps, sorted, once each.
fn union_keys<'a, V: 'a>(maps: impl Iterator<Item = &'a BTreeMap<String, V>>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = maps.flat_map(BTreeMap::keys).collect();
    keys.into_iter().cloned().collect()
}
