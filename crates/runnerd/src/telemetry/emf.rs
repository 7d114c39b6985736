//! CloudWatch metrics without an agent: once per interval, the series of
//! `/metrics` become CloudWatch embedded metric format (EMF) records, one
//! JSON line each on standard output, which the awslogs driver ships and
//! CloudWatch turns into metrics in [`NAMESPACE`].
//!
//! Invariants: every record has one `_aws` object (`Timestamp` in ms, one
//! metric directive), every declared dimension and metric is a top-level
//! member, at most [`MAX_METRICS`] metrics a record; every metric carries
//! `RunnerId`. A record is one dimension set's values: the runner-level
//! record (dimension `RunnerId` only) is written every interval with every
//! runner-level metric, totals included; a breakdown (`Phase`, `Kind`,
//! `Outcome`, `Operation`, `State`) has its own record per value, written
//! for gauges every interval and for counts only when the count moved.
//! Counts are the increase over the interval, durations the interval's
//! mean. [`METRICS`] is the catalogue: README's operator section and the
//! stack's alarms and dashboard name these metrics (a test checks the
//! stack against the records of a real run).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::Metrics;
use super::sample::Sources;

/// The CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "AwsRunner";

/// The dimension every metric carries.
pub const RUNNER_DIMENSION: &str = "RunnerId";

/// Most metrics in one record (the format's limit).
pub const MAX_METRICS: usize = 100;

/// A CloudWatch unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A count.
    Count,
    /// A duration.
    Seconds,
    /// A state (0 or 1).
    None,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Seconds => "Seconds",
            Self::None => "None",
        }
    }
}

/// Where a metric's value comes from in the exposition.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A gauge: its value now (summed over the series it covers).
    Gauge(&'static str),
    /// A counter (`..._total`): its increase over the interval.
    Counter(&'static str),
    /// A histogram: the mean of what it observed over the interval; no
    /// value when it observed nothing.
    Mean(&'static str),
}

type Labels = BTreeMap<String, String>;

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its CloudWatch name.
    pub name: &'static str,
    /// Its unit.
    pub unit: Unit,
    /// The Prometheus series it reads.
    pub source: Source,
    /// Its breakdown: (Prometheus label, CloudWatch dimension); `None`: the
    /// runner-level total over every series `only` keeps.
    pub by: Option<(&'static str, &'static str)>,
    /// Which series count.
    pub only: fn(&Labels) -> bool,
}

fn all(_: &Labels) -> bool {
    true
}

fn label<'a>(labels: &'a Labels, name: &str) -> &'a str {
    labels.get(name).map_or("", String::as_str)
}

fn failed(labels: &Labels) -> bool {
    label(labels, "outcome") != "ok"
}

fn launch(labels: &Labels) -> bool {
    label(labels, "operation") == "launch"
}

/// A launch that did not succeed; `fenced` is this replica losing
/// leadership, not a failed launch.
fn failed_launch(labels: &Labels) -> bool {
    launch(labels) && !matches!(label(labels, "outcome"), "ok" | "fenced")
}

fn undelivered(labels: &Labels) -> bool {
    label(labels, "outcome") != "delivered"
}

const fn total(name: &'static str, unit: Unit, source: Source) -> Metric {
    Metric {
        name,
        unit,
        source,
        by: None,
        only: all,
    }
}

/// Every metric the runner writes.
pub const METRICS: &[Metric] = &[
    total("Ready", Unit::None, Source::Gauge("runner_ready")),
    total("Degraded", Unit::None, Source::Gauge("runner_degraded")),
    total(
        "ControlPlaneConnected",
        Unit::None,
        Source::Gauge("runner_control_plane_connected"),
    ),
    total(
        "ControlPlaneReconnects",
        Unit::Count,
        Source::Counter("runner_control_plane_reconnects_total"),
    ),
    total("Leader", Unit::None, Source::Gauge("runner_leader")),
    total(
        "LeadershipChanges",
        Unit::Count,
        Source::Counter("runner_leadership_changes_total"),
    ),
    total(
        "SetupChecksFailing",
        Unit::None,
        Source::Gauge("runner_setup_checks_failing"),
    ),
    total(
        "Environments",
        Unit::Count,
        Source::Gauge("runner_environments"),
    ),
    Metric {
        by: Some(("phase", "Phase")),
        ..total(
            "Environments",
            Unit::Count,
            Source::Gauge("runner_environments"),
        )
    },
    total(
        "EnvironmentOldestStarting",
        Unit::Seconds,
        Source::Gauge("runner_environment_oldest_starting_seconds"),
    ),
    total(
        "Reconciles",
        Unit::Count,
        Source::Counter("runner_reconciles_total"),
    ),
    Metric {
        only: failed,
        ..total(
            "ReconcileErrors",
            Unit::Count,
            Source::Counter("runner_reconciles_total"),
        )
    },
    Metric {
        only: failed,
        by: Some(("outcome", "Kind")),
        ..total(
            "ReconcileErrors",
            Unit::Count,
            Source::Counter("runner_reconciles_total"),
        )
    },
    total(
        "ReconcileDuration",
        Unit::Seconds,
        Source::Mean("runner_reconcile_duration_seconds"),
    ),
    Metric {
        only: launch,
        ..total(
            "Launches",
            Unit::Count,
            Source::Counter("runner_compute_calls_total"),
        )
    },
    Metric {
        only: launch,
        by: Some(("outcome", "Outcome")),
        ..total(
            "Launches",
            Unit::Count,
            Source::Counter("runner_compute_calls_total"),
        )
    },
    Metric {
        only: failed_launch,
        ..total(
            "LaunchFailures",
            Unit::Count,
            Source::Counter("runner_compute_calls_total"),
        )
    },
    Metric {
        only: launch,
        ..total(
            "LaunchLatency",
            Unit::Seconds,
            Source::Mean("runner_compute_call_duration_seconds"),
        )
    },
    total(
        "AwsThrottled",
        Unit::Count,
        Source::Counter("runner_aws_throttled_total"),
    ),
    Metric {
        by: Some(("operation", "Operation")),
        ..total(
            "AwsThrottled",
            Unit::Count,
            Source::Counter("runner_aws_throttled_total"),
        )
    },
    total(
        "QueueWaiting",
        Unit::Count,
        Source::Gauge("runner_queue_waiting"),
    ),
    total(
        "StatusUpdatesPending",
        Unit::Count,
        Source::Gauge("runner_status_updates_pending"),
    ),
    total(
        "StatusDeliveryLag",
        Unit::Seconds,
        Source::Gauge("runner_status_delivery_lag_seconds"),
    ),
    Metric {
        only: undelivered,
        ..total(
            "StatusDeliveryFailures",
            Unit::Count,
            Source::Counter("runner_status_updates_total"),
        )
    },
    total(
        "SelfUpdateFailing",
        Unit::None,
        Source::Gauge("runner_self_update_failing"),
    ),
    Metric {
        by: Some(("state", "State")),
        ..total(
            "SelfUpdateState",
            Unit::None,
            Source::Gauge("runner_self_update_state"),
        )
    },
];

/// A series of the exposition: its name and labels.
type Series = (String, Labels);

/// The exposition's samples (`# ...` lines skipped). Label values are the
/// runner's own, without quotes or backslashes.
fn parse(exposition: &str) -> BTreeMap<Series, f64> {
    let mut samples = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                    .collect();
                (name, labels)
            }
            None => (series, Labels::new()),
        };
        samples.insert((name.to_owned(), labels), value);
    }
    samples
}

/// A record's dimension values, `RunnerId` aside: `(dimension, value)`.
type Dimensions = Vec<(&'static str, String)>;

/// Turns successive expositions into records; keeps the last one, to count
/// increases.
#[derive(Debug)]
pub struct Emf {
    runner_id: String,
    previous: BTreeMap<Series, f64>,
}

impl Emf {
    /// Records for `runner_id`; counts start from zero.
    pub fn new(runner_id: &str) -> Self {
        Self {
            runner_id: runner_id.to_owned(),
            previous: BTreeMap::new(),
        }
    }

    /// The records of one interval ending at `timestamp` (ms since the Unix
    /// epoch), from the exposition at its end.
    pub fn records(&mut self, exposition: &str, timestamp: u64) -> Vec<Value> {
        let now = parse(exposition);
        let increase = |series: &Series| {
            let before = self.previous.get(series).copied().unwrap_or(0.0);
            // A counter never goes down; should one, count from zero.
            let value = now.get(series).copied().unwrap_or(0.0);
            if value >= before {
                value - before
            } else {
                value
            }
        };
        let mut groups: BTreeMap<Dimensions, Vec<(&'static str, Unit, f64)>> = BTreeMap::new();
        for metric in METRICS {
            let (name, suffix) = match metric.source {
                Source::Gauge(name) | Source::Counter(name) => (name, ""),
                Source::Mean(name) => (name, "_count"),
            };
            // (value, observations) per breakdown value.
            let mut values: BTreeMap<Dimensions, (f64, f64)> = BTreeMap::new();
            for (series, value) in &now {
                let (series_name, labels) = series;
                if series_name.strip_suffix(suffix) != Some(name) || !(metric.only)(labels) {
                    continue;
                }
                let dimensions = match metric.by {
                    Some((label_name, dimension)) => {
                        vec![(dimension, label(labels, label_name).to_owned())]
                    }
                    None => Vec::new(),
                };
                let entry = values.entry(dimensions).or_default();
                match metric.source {
                    Source::Gauge(_) => entry.0 += value,
                    Source::Counter(_) => entry.0 += increase(series),
                    Source::Mean(_) => {
                        let sum = (format!("{name}_sum"), labels.clone());
                        entry.0 += increase(&sum);
                        entry.1 += increase(series);
                    }
                }
            }
            // A runner-level count is written even before its first event.
            if metric.by.is_none() && matches!(metric.source, Source::Counter(_)) {
                values.entry(Vec::new()).or_default();
            }
            for (dimensions, (value, observations)) in values {
                let value = match metric.source {
                    Source::Mean(_) if observations > 0.0 => value / observations,
                    Source::Mean(_) => continue,
                    Source::Counter(_) if metric.by.is_some() && value == 0.0 => continue,
                    Source::Gauge(_) | Source::Counter(_) => value,
                };
                groups
                    .entry(dimensions)
                    .or_default()
                    .push((metric.name, metric.unit, value));
            }
        }
        self.previous = now;
        let mut records = Vec::new();
        for (dimensions, metrics) in groups {
            for chunk in metrics.chunks(MAX_METRICS) {
                records.push(self.record(timestamp, &dimensions, chunk));
            }
        }
        records
    }

    fn record(
        &self,
        timestamp: u64,
        dimensions: &Dimensions,
        metrics: &[(&'static str, Unit, f64)],
    ) -> Value {
        let names: Vec<&str> = std::iter::once(RUNNER_DIMENSION)
            .chain(dimensions.iter().map(|(name, _)| *name))
            .collect();
        let definitions: Vec<Value> = metrics
            .iter()
            .map(|(name, unit, _)| json!({"Name": name, "Unit": unit.as_str()}))
            .collect();
        let mut record = Map::new();
        record.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [names],
                    "Metrics": definitions,
                }],
            }),
        );
        record.insert(RUNNER_DIMENSION.into(), self.runner_id.clone().into());
        for (name, value) in dimensions {
            record.insert((*name).into(), value.clone().into());
        }
        for (name, _, value) in metrics {
            record.insert((*name).into(), number(*value));
        }
        Value::Object(record)
    }
}

/// A whole number as an integer, anything else as a float.
fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        // Whole and well inside i64: the conversion is exact.
        #[allow(clippy::cast_possible_truncation)]
        let whole = value as i64;
        Value::from(whole)
    } else {
        Value::from(value)
    }
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Writes `records` to standard output, one line each, in one write: the
/// log lines, written the same way, never cut into them.
fn write(records: &[Value]) {
    let mut text = String::new();
    for record in records {
        text.push_str(&record.to_string());
        text.push('\n');
    }
    let mut out = std::io::stdout().lock();
    // Nowhere to report a closed standard output.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// How often the states are read when no records are written.
const SAMPLE_ONLY: Duration = Duration::from_secs(60);

/// Every `interval` until `shutdown` (and once more then), samples the
/// runner's states and writes the interval's records; a zero interval
/// writes none and samples every minute, for `/metrics`.
pub async fn run(
    metrics: Arc<Metrics>,
    sources: Sources,
    runner_id: String,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let records = !interval.is_zero();
    let every = if records { interval } else { SAMPLE_ONLY };
    let mut emf = Emf::new(&runner_id);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            () = shutdown.cancelled() => true,
            _ = ticks.tick() => false,
        };
        sources.sample(&metrics);
        if records {
            write(&emf.records(&metrics.encode(), now_ms()));
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use runner_core::model::Phase;
    use runner_core::outbox::Snapshot;
    use runner_core::traits::ComputeError;

    use super::*;
    use crate::telemetry::events::{
        ComputeCallFinished, LeadershipChanged, ReconcileFinished, RunnerSampled,
    };

    /// Checks `record` against the format's rules; returns its metrics as
    /// (name, dimension names).
    fn validate(record: &Value) -> Vec<(String, Vec<String>)> {
        let object = record.as_object().expect("a record is an object");
        let aws = object["_aws"].as_object().expect("one _aws object");
        assert!(aws["Timestamp"].is_u64(), "Timestamp in ms: {record}");
        let directives = aws["CloudWatchMetrics"].as_array().expect("directives");
        assert_eq!(directives.len(), 1, "{record}");
        let mut found = Vec::new();
        for directive in directives {
            let namespace = directive["Namespace"].as_str().expect("a namespace");
            assert_eq!(namespace, NAMESPACE);
            let sets = directive["Dimensions"].as_array().expect("dimension sets");
            for set in sets {
                let set = set.as_array().expect("a set");
                assert!(!set.is_empty() && set.len() <= 30, "{record}");
                assert_eq!(set[0], RUNNER_DIMENSION);
                for name in set {
                    let name = name.as_str().expect("a dimension name");
                    assert!(
                        object[name].is_string(),
                        "dimension {name} is a string field"
                    );
                }
            }
            let definitions = directive["Metrics"].as_array().expect("metrics");
            assert!(!definitions.is_empty() && definitions.len() <= MAX_METRICS);
            for definition in definitions {
                let name = definition["Name"].as_str().expect("a name");
                let unit = definition["Unit"].as_str().expect("a unit");
                assert!(["Count", "Seconds", "None"].contains(&unit), "{unit}");
                assert!(object[name].is_number(), "metric {name} is a number field");
                for set in sets {
                    let set = set.as_array().expect("a set");
                    let names = set
                        .iter()
                        .map(|n| n.as_str().unwrap_or_default().to_owned());
                    found.push((name.to_owned(), names.collect()));
                }
            }
        }
        found
    }

    fn metric<'a>(
        records: &'a [Value],
        dimensions: &[(&str, &str)],
        name: &str,
    ) -> Option<&'a Value> {
        records.iter().find_map(|record| {
            let object = record.as_object()?;
            let dims = &record["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0];
            let count = dims.as_array()?.len();
            let matches = count == dimensions.len() + 1
                && dimensions
                    .iter()
                    .all(|(k, v)| object.get(*k) == Some(&json!(v)));
            matches.then(|| object.get(name)).flatten()
        })
    }

    fn sampled(metrics: &Metrics, creating: usize, update_state: Option<&str>) {
        RunnerSampled {
            connected: true,
            degraded: false,
            setup_checks_failing: true,
            leading: true,
            outbox: Snapshot {
                phases: BTreeMap::from([(Phase::Creating, creating), (Phase::Running, 2)]),
                pending: 1,
                oldest_pending: Some(Duration::from_secs(7)),
                oldest_starting: Some(Duration::from_secs(40)),
            },
            update_state: update_state.map(str::to_owned),
        }
        .emit(metrics);
    }

    #[test]
    fn every_record_follows_the_format_and_carries_the_runner_id() {
        let metrics = Metrics::default();
        sampled(&metrics, 1, Some("failed"));
        let throttled = ComputeError::Unavailable("RequestLimitExceeded: slow down".into());
        for (operation, error, millis) in [
            ("launch", None, 200),
            ("launch", None, 400),
            ("launch", Some(&throttled), 100),
            ("stop", Some(&throttled), 100),
        ] {
            ComputeCallFinished {
                operation,
                error,
                took: Duration::from_millis(millis),
            }
            .emit(&metrics);
        }
        let mut emf = Emf::new("r-1");
        let records = emf.records(&metrics.encode(), 1_700_000_000_000);
        let mut found = BTreeSet::new();
        for record in &records {
            assert_eq!(record["RunnerId"], "r-1");
            assert_eq!(record["_aws"]["Timestamp"], 1_700_000_000_000_u64);
            found.extend(validate(record));
            // One line each: serialised without a newline.
            assert!(!record.to_string().contains('\n'));
        }
        // Every metric of the catalogue, but those with nothing to say: no
        // reconcile ran, so no duration and no error kind.
        let declared: BTreeSet<(String, Vec<String>)> = METRICS
            .iter()
            .map(|m| {
                let mut dims = vec![RUNNER_DIMENSION.to_owned()];
                dims.extend(m.by.map(|(_, d)| d.to_owned()));
                (m.name.to_owned(), dims)
            })
            .filter(|(name, dims)| {
                name != "ReconcileDuration" && !(name == "ReconcileErrors" && dims.len() == 2)
            })
            .collect();
        assert_eq!(found, declared);
        let runner = |name| metric(&records, &[], name).cloned();
        assert_eq!(runner("Launches"), Some(json!(3)));
        assert_eq!(runner("LaunchFailures"), Some(json!(1)));
        assert_eq!(runner("AwsThrottled"), Some(json!(2)));
        assert_eq!(runner("Leader"), Some(json!(1)));
        assert_eq!(runner("SetupChecksFailing"), Some(json!(1)));
        assert_eq!(runner("SelfUpdateFailing"), Some(json!(1)));
        assert_eq!(runner("StatusDeliveryLag"), Some(json!(7)));
        assert_eq!(runner("EnvironmentOldestStarting"), Some(json!(40)));
        assert_eq!(runner("Environments"), Some(json!(3)));
        let latency = runner("LaunchLatency")
            .and_then(|v| v.as_f64())
            .expect("a latency");
        assert!((latency - 0.7 / 3.0).abs() < 1e-9, "{latency}");
        let by = |dims: &[(&str, &str)], name| metric(&records, dims, name).cloned();
        assert_eq!(by(&[("Phase", "creating")], "Environments"), Some(json!(1)));
        assert_eq!(by(&[("Phase", "stopped")], "Environments"), Some(json!(0)));
        assert_eq!(by(&[("Outcome", "throttled")], "Launches"), Some(json!(1)));
        assert_eq!(by(&[("Operation", "stop")], "AwsThrottled"), Some(json!(1)));
        assert_eq!(
            by(&[("State", "failed")], "SelfUpdateState"),
            Some(json!(1))
        );
    }

    #[test]
    fn counts_are_the_increase_over_the_interval_and_breakdowns_appear_when_they_move() {
        let metrics = Metrics::default();
        sampled(&metrics, 0, None);
        let capacity = ComputeError::NoCapacity {
            zone: "eu-west-1a".into(),
            message: "none".into(),
        };
        let fail = runner_core::reconcile::ReconcileError::Compute(capacity);
        let mut emf = Emf::new("r-1");
        for _ in 0..2 {
            ReconcileFinished {
                took: Duration::from_millis(10),
                error: Some(&fail),
            }
            .emit(&metrics);
        }
        LeadershipChanged { leading: true }.emit(&metrics);
        let first = emf.records(&metrics.encode(), 1);
        assert_eq!(metric(&first, &[], "ReconcileErrors"), Some(&json!(2)));
        assert_eq!(
            metric(&first, &[("Kind", "no_capacity")], "ReconcileErrors"),
            Some(&json!(2))
        );
        assert_eq!(metric(&first, &[], "LeadershipChanges"), Some(&json!(1)));
        assert_eq!(metric(&first, &[], "AwsThrottled"), Some(&json!(0)));
        assert!(metric(&first, &[], "ReconcileDuration").is_some());

        ReconcileFinished {
            took: Duration::from_millis(10),
            error: None,
        }
        .emit(&metrics);
        let second = emf.records(&metrics.encode(), 2);
        assert_eq!(metric(&second, &[], "Reconciles"), Some(&json!(1)));
        assert_eq!(metric(&second, &[], "ReconcileErrors"), Some(&json!(0)));
        assert_eq!(metric(&second, &[], "LeadershipChanges"), Some(&json!(0)));
        assert_eq!(
            metric(&second, &[("Kind", "no_capacity")], "ReconcileErrors"),
            None
        );
        // Nothing launched in either interval: no latency to report.
        assert_eq!(metric(&second, &[], "LaunchLatency"), None);
        assert_eq!(metric(&first, &[], "LaunchLatency"), None);
    }
}
