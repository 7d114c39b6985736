//! What moto cannot do, injected by the proxy: throttling, 5xx and capacity
//! errors reach the adapters as the SDK and EC2 would present them.

use runner_core::model::{EnvironmentId, Revision, Subnet, client_token};
use runner_core::traits::{Compute as _, ComputeError, LaunchRequest, StoreError};
use testkit::proxy::{Fault, FaultProxy, Rule};

use crate::{Infra, leading, moto_url, sdk};

fn rule(operations: &[&str], rate: f64, fault: Fault) -> Rule {
    Rule {
        operations: operations.iter().map(|o| (*o).to_owned()).collect(),
        rate,
        fault,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_are_retried_by_the_sdk_and_capacity_errors_name_the_zone() {
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let direct = sdk(&moto_url()).await;
    let infra = Infra::create(&direct).await;
    let through = sdk(&proxy.url()).await;
    let compute = infra.adapters(&through, "a", &leading()).compute;

    // About half the describes throttled or failing, never three in a row
    // (the proxy spreads faults evenly): the SDK's retries absorb them all.
    proxy.set_rules(vec![
        rule(&["DescribeAvailabilityZones"], 0.3, Fault::Throttle),
        rule(&["DescribeAvailabilityZones"], 0.3, Fault::Status(503)),
    ]);
    let mut ok = 0;
    for _ in 0..10 {
        if compute.check().await.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "checks that succeeded");
    assert!(
        proxy.faulted() >= 5,
        "faults were injected: {}",
        proxy.faulted()
    );
    assert!(
        proxy.seen("DescribeAvailabilityZones").len() > 10,
        "the SDK retried"
    );

    // Always throttled: the error surfaces as unavailable, to retry later.
    proxy.set_rules(vec![rule(
        &["DescribeAvailabilityZones"],
        1.0,
        Fault::Throttle,
    )]);
    assert!(matches!(
        compute.check().await,
        Err(ComputeError::Unavailable(_))
    ));

    let (subnet, zone) = infra.subnets[0].clone();
    proxy.set_rules(vec![rule(
        &["RunInstances"],
        1.0,
        Fault::NoCapacityInSubnet(subnet.clone()),
    )]);
    let environment = EnvironmentId(uuid::Uuid::new_v4());
    let launch = |subnet: &(String, String)| LaunchRequest {
        environment,
        attempt: 1,
        client_token: client_token(environment, 1),
        subnet: Subnet {
            id: subnet.0.clone(),
            availability_zone: subnet.1.clone(),
        },
        instance_type: "m5.large".into(),
        disk_gib: 20,
        repository_url: "https://github.com/acme/api.git".into(),
        revision: Revision::Default,
        checkout_secret: None,
    };
    match compute.launch(&launch(&infra.subnets[0])).await {
        Err(ComputeError::NoCapacity { zone: z, message }) => {
            assert_eq!(z, zone);
            assert!(
                message.starts_with("InsufficientInstanceCapacity"),
                "{message}"
            );
        }
        other => panic!("expected no capacity, got {other:?}"),
    }
    // An instance type the zone does not offer: as definite as no capacity.
    proxy.set_rules(vec![rule(
        &["RunInstances"],
        1.0,
        Fault::RefuseInSubnet {
            subnet: subnet.clone(),
            code: "Unsupported".into(),
        },
    )]);
    match compute.launch(&launch(&infra.subnets[0])).await {
        Err(ComputeError::NoCapacity { zone: z, message }) => {
            assert_eq!(z, zone);
            assert!(message.starts_with("Unsupported"), "{message}");
        }
        other => panic!("expected unsupported as no capacity, got {other:?}"),
    }
    // Any other refusal is a rejection (a new attempt), not retried here.
    proxy.set_rules(vec![rule(
        &["RunInstances"],
        1.0,
        Fault::RefuseInSubnet {
            subnet: subnet.clone(),
            code: "InvalidParameterValue".into(),
        },
    )]);
    let before = proxy.launches().len();
    assert!(
        matches!(
            compute.launch(&launch(&infra.subnets[0])).await,
            Err(ComputeError::Rejected(_))
        ),
        "a refused launch is rejected"
    );
    assert_eq!(proxy.launches().len(), before + 1, "sent once");
    compute
        .launch(&launch(&infra.subnets[1]))
        .await
        .expect("another zone has capacity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_retry_only_transient_failures_and_only_while_leading() {
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let direct = sdk(&moto_url()).await;
    let infra = Infra::create(&direct).await;
    let through = sdk(&proxy.url()).await;
    let leadership = leading();
    let compute = infra.adapters(&through, "a", &leadership).compute;
    let stop = || async { compute.stop("i-0123456789abcdef0").await };

    // A definite refusal: sent once, never retried.
    proxy.set_rules(vec![rule(
        &["StopInstances"],
        1.0,
        Fault::Refuse("InvalidParameterValue".into()),
    )]);
    assert!(matches!(stop().await, Err(ComputeError::Rejected(_))));
    assert_eq!(
        proxy.seen("StopInstances").len(),
        1,
        "a refusal is not retried"
    );

    // Throttling, 5xx and a cut connection: retried, a bounded number of times.
    for (fault, seen_before) in [
        (Fault::Throttle, 1),
        (Fault::Status(503), 5),
        (Fault::Reset, 9),
    ] {
        proxy.set_rules(vec![rule(&["StopInstances"], 1.0, fault.clone())]);
        assert!(
            matches!(stop().await, Err(ComputeError::Unavailable(_))),
            "{fault:?}"
        );
        assert_eq!(
            proxy.seen("StopInstances").len(),
            seen_before + 4,
            "{fault:?}: four attempts in all"
        );
    }

    // Not leading: nothing is sent at all.
    leadership.clear();
    assert!(matches!(stop().await, Err(ComputeError::Fenced)));
    assert_eq!(
        proxy.seen("StopInstances").len(),
        13,
        "nothing sent while not leading"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mutations_share_a_call_and_a_bad_id_blocks_no_other() {
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let direct = sdk(&moto_url()).await;
    let infra = Infra::create(&direct).await;
    let through = sdk(&proxy.url()).await;
    let compute = infra.adapters(&through, "a", &leading()).compute;
    let mut ids = Vec::new();
    for _ in 0..12 {
        let environment = EnvironmentId(uuid::Uuid::new_v4());
        let launched = compute
            .launch(&LaunchRequest {
                environment,
                attempt: 1,
                client_token: client_token(environment, 1),
                subnet: Subnet {
                    id: infra.subnets[0].0.clone(),
                    availability_zone: infra.subnets[0].1.clone(),
                },
                instance_type: "m5.large".into(),
                disk_gib: 20,
                repository_url: "https://github.com/acme/api.git".into(),
                revision: Revision::Default,
                checkout_secret: None,
            })
            .await
            .expect("launch");
        ids.push(launched.id);
    }
    // Twelve stops at once: one StopInstances.
    let stops = at_once(&ids, |id| {
        let compute = compute.clone();
        async move { compute.stop(&id).await }
    })
    .await;
    assert!(stops.iter().all(Result::is_ok), "{stops:?}");
    assert_eq!(
        proxy.seen("StopInstances").len(),
        1,
        "one call for the batch"
    );

    // Twelve terminations and an id EC2 does not know: the batch is split
    // until that id stands alone; every other one is terminated.
    let unknown = "i-0123456789abcdef0".to_owned();
    let mut asked = ids.clone();
    asked.insert(5, unknown.clone());
    let ends = at_once(&asked, |id| {
        let compute = compute.clone();
        async move { compute.terminate(&id).await }
    })
    .await;
    for (id, end) in asked.iter().zip(&ends) {
        if *id == unknown {
            assert!(matches!(end, Err(ComputeError::Rejected(_))), "{end:?}");
        } else {
            assert!(end.is_ok(), "{id}: {end:?}");
        }
    }
    let calls = proxy.seen("TerminateInstances").len();
    assert!(
        (2..=9).contains(&calls),
        "split in halves down to the bad id: {calls} calls"
    );
    let observed = compute.observe_ids(&ids).await.expect("observe");
    assert!(
        observed.iter().all(|i| matches!(
            i.state,
            runner_core::model::InstanceState::Terminated
                | runner_core::model::InstanceState::ShuttingDown
        )),
        "{observed:?}"
    );
}

/// Runs `call` for every id at the same time; the answers in order.
async fn at_once<F, Fut>(ids: &[String], call: F) -> Vec<Result<(), ComputeError>>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), ComputeError>> + Send + 'static,
{
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| tokio::spawn(call(id.clone())))
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("joined"));
    }
    out
}

/// What EC2's and DynamoDB's throttling look like to the runner's metrics:
/// a call that stays throttled through the retries counts as `throttled` (a
/// 5xx as `unavailable`), and the CloudWatch records count it by operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_call_is_counted_as_throttled_by_operation() {
    use runner_core::traits::StateStore as _;
    use runnerd::telemetry::emf::Emf;
    use runnerd::telemetry::{InstrumentedCompute, InstrumentedStore, Metrics};

    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let direct = sdk(&moto_url()).await;
    let infra = Infra::create(&direct).await;
    let through = sdk(&proxy.url()).await;
    let metrics = std::sync::Arc::new(Metrics::default());
    let adapters = infra.adapters(&through, "a", &leading());
    let compute =
        InstrumentedCompute::new(adapters.compute, metrics.clone(), std::time::Duration::ZERO);
    let store = InstrumentedStore::new(adapters.store, metrics.clone());
    let environment = EnvironmentId(uuid::Uuid::new_v4());
    for fault in [Fault::Throttle, Fault::Status(503)] {
        proxy.set_rules(vec![
            rule(&["StopInstances"], 1.0, fault.clone()),
            rule(&["DynamoDB_20120810.GetItem"], 1.0, fault),
        ]);
        let stopped = compute.stop("i-0123456789abcdef0").await;
        assert!(matches!(stopped, Err(ComputeError::Unavailable(_))));
        let read = store.get(environment).await;
        assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    }
    let exposition = metrics.encode();
    for line in [
        "runner_compute_calls_total{operation=\"stop\",outcome=\"throttled\"} 1",
        "runner_compute_calls_total{operation=\"stop\",outcome=\"unavailable\"} 1",
        "runner_store_calls_total{operation=\"store_get\",outcome=\"throttled\"} 1",
        "runner_store_calls_total{operation=\"store_get\",outcome=\"unavailable\"} 1",
        "runner_aws_throttled_total{operation=\"stop\"} 1",
        "runner_aws_throttled_total{operation=\"store_get\"} 1",
    ] {
        assert!(
            exposition.lines().any(|l| l == line),
            "{line}\n{exposition}"
        );
    }
    let records = Emf::new("r-1").records(&exposition, 1_700_000_000_000);
    for operation in ["stop", "store_get"] {
        let by_operation = records
            .iter()
            .find(|r| r["Operation"] == operation)
            .expect("a record for the operation");
        assert_eq!(
            by_operation["AwsThrottled"].as_u64(),
            Some(1),
            "{operation}"
        );
    }
    let runner = records
        .iter()
        .find(|r| r.get("AwsThrottled").is_some() && r.get("Operation").is_none())
        .expect("the runner-level record");
    assert_eq!(runner["AwsThrottled"].as_u64(), Some(2));
}

/// The per-process lookups are filled once: sixteen concurrent first asks
/// for the zones offering a type make one DescribeInstanceTypeOfferings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cache_misses_share_one_lookup() {
    let proxy = FaultProxy::start(&moto_url()).await.expect("proxy");
    let direct = sdk(&moto_url()).await;
    let infra = Infra::create(&direct).await;
    let through = sdk(&proxy.url()).await;
    let compute = infra.adapters(&through, "a", &leading()).compute;
    let asks: Vec<_> = (0..16)
        .map(|_| {
            let compute = compute.clone();
            tokio::spawn(async move { compute.offered_zones("m5.large").await })
        })
        .collect();
    for ask in asks {
        let zones = ask.await.expect("joined").expect("offerings");
        assert!(!zones.is_empty());
    }
    assert_eq!(proxy.seen("DescribeInstanceTypeOfferings").len(), 1);
}
