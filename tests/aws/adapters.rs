//! Each adapter against moto.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use runner_aws::dynamo::DynamoStore;
use runner_aws::ec2::{TAG_ATTEMPT, TAG_ENVIRONMENT, TAG_MANAGED_BY, TAG_QUARANTINED, TAG_RUNNER};
use runner_aws::envelope::Envelope;
use runner_core::desired::Desired;
use runner_core::leader::{Leadership, Lease as _};
use runner_core::model::{
    EnvironmentId, InstanceState, LaunchIntent, LaunchState, Record, Revision, Subnet, client_token,
};
use runner_core::observer::Observer;
use runner_core::orphans::{OrphanPolicy, sweep};
use runner_core::outbox::Outbox;
use runner_core::reconcile::{Context, ReconcileSettings};
use runner_core::traits::{
    Compute, ComputeError, LaunchRequest, SecretError, SecretStore as _, StateStore, StoreError,
};
use secrecy::ExposeSecret as _;

use crate::{Infra, context, leading, moto_url, sdk};

/// Takes the lease for `store` and records it in `leadership`.
async fn lead(store: &DynamoStore, leadership: &Leadership) -> u64 {
    let term = store
        .acquire(Duration::from_secs(3600))
        .await
        .expect("acquire")
        .expect("free lease");
    leadership.set(
        term.epoch,
        tokio::time::Instant::now() + Duration::from_secs(3600),
    );
    term.epoch
}

/// An instance launched outside the runner, without its tags.
async fn launch_untagged(sdk: &aws_config::SdkConfig, subnet: &str) -> String {
    aws_sdk_ec2::Client::new(sdk)
        .run_instances()
        .image_id("ami-0123456789abcdef0")
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet)
        .send()
        .await
        .expect("an untagged instance")
        .instances()[0]
        .instance_id()
        .expect("id")
        .to_owned()
}

fn env() -> EnvironmentId {
    EnvironmentId(uuid::Uuid::new_v4())
}

/// Launches `n` environments' instances across the subnets; their ids.
async fn launch_many(compute: &dyn Compute, infra: &Infra, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let launched = compute.launch(&request(infra, env(), 1, i % 3)).await;
        ids.push(launched.expect("launch").id);
    }
    ids
}

/// The ids a lookup by id of `ids` returns, sorted.
async fn looked_up(compute: &dyn Compute, ids: &[String]) -> Vec<String> {
    let found = compute.observe_ids(ids).await.expect("observe by id");
    let mut found: Vec<String> = found.into_iter().map(|i| i.id).collect();
    found.sort();
    found
}

fn request(
    infra: &Infra,
    environment: EnvironmentId,
    attempt: u32,
    subnet: usize,
) -> LaunchRequest {
    let (id, zone) = infra.subnets[subnet].clone();
    LaunchRequest {
        environment,
        attempt,
        client_token: client_token(environment, attempt),
        subnet: Subnet {
            id,
            availability_zone: zone,
        },
        instance_type: "m5.large".into(),
        disk_gib: 40,
        repository_url: "https://github.com/acme/api.git".into(),
        revision: Revision::Branch("main".into()),
        checkout_secret: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_versioned_and_a_lost_race_is_a_typed_conflict() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let leadership = Arc::new(Leadership::default());
    let adapters = infra.adapters(&sdk, "a", &leadership);
    let store = adapters.store;
    store.check().await.expect("the table is as expected");
    lead(&store, &leadership).await;

    let id = env();
    let mut record = Record::new(id);
    record.launch = Some(LaunchIntent {
        attempt: 1,
        subnet: Subnet {
            id: "subnet-1".into(),
            availability_zone: "eu-west-1a".into(),
        },
        client_token: client_token(id, 1),
        state: LaunchState::Intended,
    });
    record.exhausted_zones = vec!["eu-west-1c".into()];
    let v1 = store.put(&record).await.expect("create");
    assert_eq!(v1.version, 1);
    assert!(
        matches!(store.put(&record).await, Err(StoreError::Conflict(e)) if e == id),
        "a second create conflicts"
    );

    let mut launched = v1.clone();
    launched.launch.as_mut().expect("launch").state = LaunchState::Launched {
        instance_id: "i-0abc".into(),
    };
    let v2 = store.put(&launched).await.expect("update");
    assert_eq!(v2.version, 2);
    assert!(
        matches!(store.put(&v1).await, Err(StoreError::Conflict(_))),
        "a stale version conflicts"
    );
    assert_eq!(store.get(id).await.expect("get"), Some(v2.clone()));
    assert_eq!(store.list().await.expect("list"), vec![v2.clone()]);
    assert!(matches!(
        store.delete(&v1).await,
        Err(StoreError::Conflict(_))
    ));
    store.delete(&v2).await.expect("delete");
    assert_eq!(store.get(id).await.expect("get"), None);

    // Every item carries schema_version.
    let raw = aws_sdk_dynamodb::Client::new(&sdk)
        .scan()
        .table_name(&infra.table)
        .send()
        .await
        .expect("scan (test only)");
    for item in raw.items() {
        assert_eq!(
            item.get("schema_version")
                .and_then(|v| v.as_n().ok())
                .map(String::as_str),
            Some("1"),
            "{item:?}"
        );
    }

    let missing = runner_aws::adapters(
        &sdk,
        &runner_aws::AdapterSettings {
            table: "no-such-table".into(),
            ..infra.settings("a")
        },
        &leadership,
    );
    let err = missing
        .store
        .check()
        .await
        .expect_err("a missing table fails the check");
    assert!(
        runnerd::health::chain(&err).contains("no-such-table"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_fences_a_replica_whose_epoch_is_stale() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let a_leads = Arc::new(Leadership::default());
    let b_leads = Arc::new(Leadership::default());
    let a = infra.adapters(&sdk, "replica-a", &a_leads).store;
    let b = infra.adapters(&sdk, "replica-b", &b_leads).store;

    // Long enough that no pause of this machine lets it lapse by itself.
    let ttl = Duration::from_secs(30);
    let term_a = a
        .acquire(ttl)
        .await
        .expect("acquire")
        .expect("A takes the free lease");
    a_leads.set(
        term_a.epoch,
        tokio::time::Instant::now() + Duration::from_secs(3600),
    );
    assert_eq!(
        b.acquire(ttl).await.expect("acquire"),
        None,
        "B waits while A holds it"
    );
    let record = a
        .put(&Record::new(env()))
        .await
        .expect("A writes while leading");
    // A's last renewal, short; then it stops renewing (frozen). B takes over
    // with a new epoch once that expires, and not before.
    a.renew(term_a.epoch, Duration::from_millis(500))
        .await
        .expect("A renews");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let term_b = loop {
        if let Some(term) = b.acquire(ttl).await.expect("acquire") {
            break term;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never took the expired lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(term_b.epoch, term_a.epoch + 1);
    b_leads.set(
        term_b.epoch,
        tokio::time::Instant::now() + Duration::from_secs(3600),
    );

    // A still believes it leads (its local view was set far ahead), but
    // every write and renewal it attempts is refused.
    assert!(matches!(
        a.put(&Record::new(env())).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(a.put(&record).await, Err(StoreError::Fenced)));
    assert!(matches!(a.delete(&record).await, Err(StoreError::Fenced)));
    assert!(matches!(
        a.renew(term_a.epoch, ttl).await,
        Err(StoreError::Fenced)
    ));
    b.put(&Record::new(env())).await.expect("B writes");

    // A graceful release lets a standby in at once.
    b.release(term_b.epoch).await.expect("release");
    let term_a2 = a
        .acquire(ttl)
        .await
        .expect("acquire")
        .expect("A takes the released lease");
    assert_eq!(term_a2.epoch, term_b.epoch + 1);

    // Without local leadership nothing is even attempted.
    a_leads.clear();
    assert!(matches!(
        a.put(&Record::new(env())).await,
        Err(StoreError::Fenced)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_sets_tags_disk_imds_profile_and_secret_free_user_data() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let compute = infra.adapters(&sdk, "a", &leading()).compute;
    let id = env();
    let instance = compute
        .launch(&request(&infra, id, 1, 1))
        .await
        .expect("launch");
    assert_eq!(instance.environment, id);
    assert_eq!(instance.attempt, 1);
    assert_eq!(instance.subnet_id, infra.subnets[1].0);
    assert_eq!(instance.availability_zone, "eu-west-1b");

    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let described = ec2
        .describe_instances()
        .instance_ids(&instance.id)
        .send()
        .await
        .expect("describe");
    let raw = described.reservations()[0].instances()[0].clone();
    let tags: std::collections::HashMap<&str, &str> = raw
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)))
        .collect();
    assert_eq!(tags.get(TAG_RUNNER), Some(&infra.runner_id.as_str()));
    assert_eq!(
        tags.get(TAG_ENVIRONMENT).map(|s| s.to_string()),
        Some(id.to_string())
    );
    assert_eq!(tags.get(TAG_ATTEMPT), Some(&"1"));
    assert_eq!(tags.get(TAG_MANAGED_BY), Some(&"aws-runner"));
    assert_eq!(raw.instance_type().map(|t| t.as_str()), Some("m5.large"));
    assert_eq!(
        raw.security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect::<Vec<_>>(),
        [infra.security_group_id.as_str()]
    );
    let options = raw.metadata_options().expect("metadata options");
    assert_eq!(
        options.http_tokens().map(|t| t.as_str()),
        Some("required"),
        "IMDSv2 required"
    );
    // Regression (issue 12): a hop limit of 2 let a container on the
    // instance fetch the instance's credentials.
    assert_eq!(
        options.http_put_response_hop_limit(),
        Some(1),
        "IMDS answers the instance itself, not its containers"
    );
    assert!(
        raw.iam_instance_profile()
            .and_then(|p| p.arn())
            .is_some_and(|arn| arn.ends_with("aws-runner-environment"))
    );

    let volumes = ec2
        .describe_volumes()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("attachment.instance-id")
                .values(&instance.id)
                .build(),
        )
        .send()
        .await
        .expect("volumes");
    let root = &volumes.volumes()[0];
    assert_eq!(root.size(), Some(40));
    assert_eq!(root.encrypted(), Some(true));
    assert_eq!(root.volume_type().map(|t| t.as_str()), Some("gp3"));
    let volume_tags: Vec<&str> = root.tags().iter().filter_map(|t| t.key()).collect();
    assert!(
        volume_tags.contains(&TAG_RUNNER) && volume_tags.contains(&TAG_ENVIRONMENT),
        "{volume_tags:?}"
    );

    let user_data = crate::user_data(&ec2, &instance.id).await;
    assert!(user_data.starts_with("#!/bin/bash\n"), "{user_data}");
    assert!(
        user_data.contains("\nAWS_RUNNER_REPOSITORY_URL='https://github.com/acme/api.git'\n"),
        "{user_data}"
    );
    assert!(
        user_data.contains("\nAWS_RUNNER_BRANCH='main'\n"),
        "{user_data}"
    );
    assert!(
        user_data.contains("\nAWS_RUNNER_SECRET_ID=''\n"),
        "{user_data}"
    );
    assert!(
        user_data.ends_with(runner_aws::ec2::BOOTSTRAP),
        "the bootstrap script follows"
    );
    for secret in ["token", "password", "ghp_"] {
        assert!(
            !user_data.to_lowercase().contains(secret),
            "user data mentions {secret}: {user_data}"
        );
    }

    // Stop, start and terminate, as EC2 (and moto) show them.
    compute.stop(&instance.id).await.expect("stop");
    let seen = compute.observe().await.expect("observe");
    assert_eq!(seen[0].state, InstanceState::Stopped);
    compute.start(&instance.id).await.expect("start");
    compute.terminate(&instance.id).await.expect("terminate");
    let seen = compute.observe().await.expect("observe");
    assert_eq!(seen[0].state, InstanceState::Terminated);
    assert_eq!(
        compute.find_launch(id, 1).await.expect("find"),
        None,
        "terminated instances are not launches to resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observation_pages_through_only_this_runners_instances() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let compute = infra.adapters(&sdk, "a", &leading()).compute;
    let other = Infra {
        runner_id: uuid::Uuid::new_v4().to_string(),
        ..Infra::create(&sdk).await
    };
    let others = other.adapters(&sdk, "b", &leading()).compute;
    let mut ours = launch_many(compute.as_ref(), &infra, 12).await;
    others
        .launch(&request(&other, env(), 1, 0))
        .await
        .expect("another runner's");
    let untagged = launch_untagged(&sdk, &infra.subnets[0].0).await;
    let mut seen: Vec<String> = compute
        .observe()
        .await
        .expect("observe")
        .into_iter()
        .map(|i| i.id)
        .collect();
    seen.sort();
    ours.sort();
    assert_eq!(
        seen, ours,
        "exactly this runner's instances, across pages of 5"
    );
    assert!(!seen.contains(&untagged));

    // By id: this runner's among them only; an id EC2 does not know fails
    // the whole call there, and is split out instead of failing the others.
    let theirs = others.observe().await.expect("observe theirs").remove(0).id;
    let mut asked: Vec<String> = ours[..5].to_vec();
    asked.insert(2, "i-0123456789abcdef0".into());
    asked.push(theirs);
    asked.push(untagged);
    let found = looked_up(compute.as_ref(), &asked).await;
    assert_eq!(found, ours[..5].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_security_group_and_vpc_are_checked_at_start() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let compute = infra.adapters(&sdk, "a", &leading()).compute;
    let subnets = compute
        .subnets(&infra.subnet_ids())
        .await
        .expect("valid subnets");
    assert_eq!(
        subnets
            .iter()
            .map(|s| s.availability_zone.as_str())
            .collect::<Vec<_>>(),
        crate::ZONES
    );

    let err = compute
        .subnets(std::slice::from_ref(&infra.foreign_subnet))
        .await
        .expect_err("a subnet of another VPC");
    assert!(
        matches!(&err, ComputeError::Rejected(m) if m.contains(&infra.foreign_subnet) && m.contains("not in the configured")),
        "{err:?}"
    );
    let err = compute
        .subnets(&["subnet-0123456789abcdef0".into()])
        .await
        .expect_err("an unknown subnet");
    assert!(
        matches!(&err, ComputeError::Rejected(m) if m.contains("subnet-0123456789abcdef0 does not exist")),
        "{err:?}"
    );

    let mut settings = infra.settings("a");
    settings.ec2.security_group_id = infra.foreign_security_group.clone();
    let wrong_group = runner_aws::adapters(&sdk, &settings, &leading()).compute;
    let err = wrong_group
        .subnets(&infra.subnet_ids())
        .await
        .expect_err("a group of another VPC");
    assert!(
        matches!(&err, ComputeError::Rejected(m) if m.contains(&infra.foreign_security_group)),
        "{err:?}"
    );

    let mut settings = infra.settings("a");
    settings.ec2.vpc_id = "vpc-0123456789abcdef0".into();
    let wrong_vpc = runner_aws::adapters(&sdk, &settings, &leading()).compute;
    let err = wrong_vpc
        .subnets(&infra.subnet_ids())
        .await
        .expect_err("an unknown VPC");
    assert!(
        matches!(&err, ComputeError::Rejected(m) if m.contains("VPC vpc-0123456789abcdef0 does not exist")),
        "{err:?}"
    );

    let offered = compute.offered_zones("m5.large").await.expect("offerings");
    assert!(
        !offered.is_empty() && offered.iter().all(|z| z.starts_with("eu-west-1")),
        "{offered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_lead_cannot_mutate() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let leadership = leading();
    let compute = infra.adapters(&sdk, "a", &leadership).compute;
    let instance = compute
        .launch(&request(&infra, env(), 1, 0))
        .await
        .expect("launch while leading");
    leadership.clear();
    assert!(matches!(
        compute.launch(&request(&infra, env(), 1, 0)).await,
        Err(ComputeError::Fenced)
    ));
    assert!(matches!(
        compute.stop(&instance.id).await,
        Err(ComputeError::Fenced)
    ));
    assert!(matches!(
        compute.terminate(&instance.id).await,
        Err(ComputeError::Fenced)
    ));
    assert!(matches!(
        compute.quarantine(&instance.id, SystemTime::now()).await,
        Err(ComputeError::Fenced)
    ));
    assert_eq!(
        compute.observe().await.expect("observe still works").len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_launch_is_resolved_by_tags_although_moto_ignores_client_tokens() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let leadership = Arc::new(Leadership::default());
    let adapters = infra.adapters(&sdk, "a", &leadership);
    lead(&adapters.store, &leadership).await;
    let compute: Arc<dyn Compute> = adapters.compute.clone();
    let store: Arc<dyn StateStore> = adapters.store.clone();

    // The crash: the intent is stored and RunInstances happened, but the
    // instance id never reached the record.
    let id = env();
    let launch = request(&infra, id, 1, 2);
    let mut record = Record::new(id);
    record.launch = Some(LaunchIntent {
        attempt: 1,
        subnet: launch.subnet.clone(),
        client_token: launch.client_token.clone(),
        state: LaunchState::Intended,
    });
    store.put(&record).await.expect("intent");
    let first = compute
        .launch(&launch)
        .await
        .expect("the launch before the crash");

    // Restart: a fresh context from the store.
    let desired = Arc::new(Desired::default());
    desired.set_classes(vec![runner_core::model::EnvironmentClass {
        id: uuid::Uuid::nil().to_string(),
        display_name: "Small".into(),
        instance_type: "m5.large".into(),
        disk_gib: 40,
        enabled: true,
    }]);
    desired.upsert(runner_core::model::Environment {
        id,
        accepted_status_version: 0,
        spec: runner_core::model::Spec {
            spec_version: 1,
            desired: Some(runner_core::model::DesiredPhase::Running),
            class_id: uuid::Uuid::nil().to_string(),
            repository_url: "https://github.com/acme/api.git".into(),
            revision: Revision::Default,
            creator: "alice".into(),
            disconnected_timeout: None,
        },
    });
    let records = store.list().await.expect("records");
    let context = Context::new(
        store.clone(),
        compute.clone(),
        Arc::new(Observer::new(compute.clone(), Duration::ZERO)),
        Arc::new(Outbox::default()),
        desired,
        compute.subnets(&infra.subnet_ids()).await.expect("subnets"),
        ReconcileSettings::default(),
        records,
    );
    for _ in 0..3 {
        runner_core::reconcile::reconcile(&context, id)
            .await
            .expect("reconcile");
    }
    let instances = compute.observe().await.expect("observe");
    assert_eq!(instances.len(), 1, "no second instance: {instances:?}");
    let stored = store.get(id).await.expect("get").expect("record");
    assert_eq!(
        stored
            .launch
            .and_then(|l| l.instance_id().map(str::to_owned)),
        Some(first.id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_marked_then_terminated_after_the_grace_period_a_few_per_pass() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let leadership = Arc::new(Leadership::default());
    let adapters = infra.adapters(&sdk, "a", &leadership);
    lead(&adapters.store, &leadership).await;
    let compute: Arc<dyn Compute> = adapters.compute.clone();
    for _ in 0..3 {
        compute
            .launch(&request(&infra, env(), 1, 0))
            .await
            .expect("an orphan");
    }
    let untagged = launch_untagged(&sdk, &infra.subnets[0].0).await;
    let observer = Arc::new(Observer::new(compute.clone(), Duration::ZERO));
    let context = Context::new(
        adapters.store.clone(),
        compute.clone(),
        observer.clone(),
        Arc::new(Outbox::default()),
        Arc::new(Desired::default()),
        Vec::new(),
        ReconcileSettings::default(),
        Vec::new(),
    );
    let policy = OrphanPolicy {
        grace: Duration::from_secs(600),
        max_per_pass: 2,
    };
    let now = SystemTime::now();
    observer.refresh().await.expect("observe");
    let first = sweep(&context, policy, now).await.expect("sweep");
    assert_eq!(
        (first.quarantined, first.terminated),
        (3, 0),
        "marked, not terminated"
    );
    observer.refresh().await.expect("observe");
    assert!(observer.all().iter().all(|i| i.quarantined_at.is_some()));
    let raw = aws_sdk_ec2::Client::new(&sdk)
        .describe_instances()
        .instance_ids(observer.all()[0].id.clone())
        .send()
        .await
        .expect("describe");
    assert!(
        raw.reservations()[0].instances()[0]
            .tags()
            .iter()
            .any(|t| t.key() == Some(TAG_QUARANTINED))
    );

    let early = sweep(&context, policy, now + Duration::from_secs(60))
        .await
        .expect("sweep");
    assert_eq!(
        early,
        Default::default(),
        "within the grace period nothing happens"
    );
    let later = sweep(&context, policy, now + Duration::from_secs(601))
        .await
        .expect("sweep");
    assert_eq!(later.terminated, 2, "at most two per pass");
    observer.refresh().await.expect("observe");
    let last = sweep(&context, policy, now + Duration::from_secs(602))
        .await
        .expect("sweep");
    assert_eq!(last.terminated, 1);
    let state = aws_sdk_ec2::Client::new(&sdk)
        .describe_instances()
        .instance_ids(&untagged)
        .send()
        .await
        .expect("describe");
    assert_eq!(
        state.reservations()[0].instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str()),
        Some("running"),
        "an instance without our tags is never touched"
    );
}

/// An instance launched outside the runner but wearing its tags (for
/// `environment`), with `profile` (none when `None`) and `group`.
async fn launch_wearing_tags(
    sdk: &aws_config::SdkConfig,
    infra: &Infra,
    environment: EnvironmentId,
    profile: Option<&str>,
    group: &str,
) -> String {
    use aws_sdk_ec2::types::{IamInstanceProfileSpecification, ResourceType, TagSpecification};
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    aws_sdk_ec2::Client::new(sdk)
        .run_instances()
        .image_id(&infra.ami)
        .min_count(1)
        .max_count(1)
        .subnet_id(&infra.subnets[0].0)
        .security_group_ids(group)
        .set_iam_instance_profile(
            profile.map(|p| IamInstanceProfileSpecification::builder().name(p).build()),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(tag(TAG_RUNNER, &infra.runner_id))
                .tags(tag(TAG_ENVIRONMENT, &environment.to_string()))
                .tags(tag(TAG_ATTEMPT, "1"))
                .tags(tag(TAG_MANAGED_BY, "aws-runner"))
                .build(),
        )
        .send()
        .await
        .expect("an instance wearing the runner's tags")
        .instances()[0]
        .instance_id()
        .expect("id")
        .to_owned()
}

/// Regression (issue 12): the orphan sweep terminated anything that wore the
/// runner's tags. Now only instances with the tags AND the environments'
/// instance profile AND security group are observed, so swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_leaves_alone_tagged_instances_without_the_runners_profile_and_group() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let leadership = Arc::new(Leadership::default());
    let adapters = infra.adapters(&sdk, "a", &leadership);
    lead(&adapters.store, &leadership).await;
    let compute: Arc<dyn Compute> = adapters.compute.clone();
    let orphan = compute
        .launch(&request(&infra, env(), 1, 0))
        .await
        .expect("a real orphan")
        .id;

    let iam = aws_sdk_iam::Client::new(&sdk);
    let other_profile = "some-other-profile";
    let _ = iam
        .create_instance_profile()
        .instance_profile_name(other_profile)
        .send()
        .await;
    let other_group = aws_sdk_ec2::Client::new(&sdk)
        .create_security_group()
        .group_name(format!("other-{}", &infra.runner_id[..8]))
        .description("another group in the runner's VPC")
        .vpc_id(&infra.vpc_id)
        .send()
        .await
        .expect("create security group")
        .group_id
        .expect("group id");
    let foreign = [
        launch_wearing_tags(
            &sdk,
            &infra,
            env(),
            Some(other_profile),
            &infra.security_group_id,
        )
        .await,
        launch_wearing_tags(
            &sdk,
            &infra,
            env(),
            Some(crate::INSTANCE_PROFILE),
            &other_group,
        )
        .await,
        launch_wearing_tags(&sdk, &infra, env(), None, &infra.security_group_id).await,
    ];

    let observer = Arc::new(Observer::new(compute.clone(), Duration::ZERO));
    let context = Context::new(
        adapters.store.clone(),
        compute.clone(),
        observer.clone(),
        Arc::new(Outbox::default()),
        Arc::new(Desired::default()),
        Vec::new(),
        ReconcileSettings::default(),
        Vec::new(),
    );
    let policy = OrphanPolicy {
        grace: Duration::from_secs(600),
        max_per_pass: 10,
    };
    let now = SystemTime::now();
    observer.refresh().await.expect("observe");
    assert_eq!(
        observer
            .all()
            .iter()
            .map(|i| i.id.clone())
            .collect::<Vec<_>>(),
        [orphan.as_str()],
        "only the runner's own instance is observed"
    );
    let first = sweep(&context, policy, now).await.expect("sweep");
    assert_eq!((first.quarantined, first.terminated), (1, 0));
    observer.refresh().await.expect("observe");
    let later = sweep(&context, policy, now + Duration::from_secs(601))
        .await
        .expect("sweep");
    assert_eq!((later.quarantined, later.terminated), (0, 1));

    let described = aws_sdk_ec2::Client::new(&sdk)
        .describe_instances()
        .set_instance_ids(Some(
            std::iter::once(orphan.clone())
                .chain(foreign.iter().cloned())
                .collect(),
        ))
        .send()
        .await
        .expect("describe");
    for raw in described.reservations().iter().flat_map(|r| r.instances()) {
        let id = raw.instance_id().expect("id");
        let state = raw.state().and_then(|s| s.name()).map(|n| n.as_str());
        let marked = raw.tags().iter().any(|t| t.key() == Some(TAG_QUARANTINED));
        if id == orphan {
            assert_eq!(state, Some("terminated"), "the real orphan is terminated");
            assert!(marked, "the real orphan was marked first");
        } else {
            assert_eq!(
                state,
                Some("running"),
                "{id} wears the tags only: untouched"
            );
            assert!(!marked, "{id} wears the tags only: not even marked");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_round_trip_through_secrets_manager() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let client = aws_sdk_secretsmanager::Client::new(&sdk);
    client
        .put_secret_value()
        .secret_id(&infra.secret_id)
        .secret_string("ret_exchange_token_from_the_stack\n")
        .send()
        .await
        .expect("the stack's value");
    let secrets = infra.adapters(&sdk, "a", &leading()).secrets;
    let mut credentials = secrets.load().await.expect("load");
    assert_eq!(
        credentials
            .exchange_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
            .as_deref(),
        Some("ret_exchange_token_from_the_stack")
    );
    assert!(credentials.access_token.is_none());

    credentials.exchange_token = None;
    credentials.access_token = Some("rat_access".to_owned().into());
    credentials.private_key = Some(runner_core::traits::SecretKeyBytes([7; 32]));
    secrets.save(&credentials).await.expect("save");
    let loaded = secrets.load().await.expect("load again");
    assert_eq!(
        loaded
            .access_token
            .map(|t| t.expose_secret().to_owned())
            .as_deref(),
        Some("rat_access")
    );
    assert_eq!(
        loaded.private_key,
        Some(runner_core::traits::SecretKeyBytes([7; 32]))
    );
    assert!(loaded.exchange_token.is_none());

    client
        .put_secret_value()
        .secret_id(&infra.secret_id)
        .secret_string("{\"private_key\": 12")
        .send()
        .await
        .expect("garbage");
    assert!(matches!(
        secrets.load().await,
        Err(SecretError::Malformed(_))
    ));
    let missing = runner_aws::adapters(
        &sdk,
        &runner_aws::AdapterSettings {
            secret_id: "nope".into(),
            ..infra.settings("a")
        },
        &leading(),
    )
    .secrets;
    assert!(matches!(missing.load().await, Err(SecretError::Malformed(m)) if m.contains("nope")));
}

/// Regression (issue 12): one secret held the exchange token, then the
/// runner's credential, so a stack update with a new exchange token wiped
/// the credential and key pair. Now the stack's exchange-token secret is
/// read only while the runner's own secret holds no access token, and never
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_exchange_token_in_the_stacks_secret_never_replaces_the_stored_credential() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let client = aws_sdk_secretsmanager::Client::new(&sdk);
    let create = |name: String, value: &'static str| {
        let client = client.clone();
        async move {
            client
                .create_secret()
                .name(&name)
                .secret_string(value)
                .send()
                .await
                .expect("create secret");
            name
        }
    };
    let value = |id: String| {
        let client = client.clone();
        async move {
            client
                .get_secret_value()
                .secret_id(id)
                .send()
                .await
                .expect("read")
                .secret_string()
                .unwrap_or_default()
                .to_owned()
        }
    };
    let short = &infra.runner_id[..8];
    // As the stack creates them: the runner's empty, the exchange token's.
    let runner_secret = create(format!("runner-{short}/credential"), "{}").await;
    let stack_secret = create(format!("runner-{short}/exchange-token"), "ret_first").await;
    let adapters = runner_aws::adapters(
        &sdk,
        &runner_aws::AdapterSettings {
            secret_id: runner_secret.clone(),
            exchange_token_secret_id: Some(stack_secret.clone()),
            ..infra.settings("a")
        },
        &leading(),
    );
    let secrets = adapters.secrets;
    let exposed =
        |t: &Option<secrecy::SecretString>| t.as_ref().map(|t| t.expose_secret().to_owned());

    let mut first = secrets.load().await.expect("load");
    assert_eq!(exposed(&first.exchange_token).as_deref(), Some("ret_first"));
    assert!(first.access_token.is_none() && first.private_key.is_none());
    // The first start: key pair, then the traded credential.
    first.private_key = Some(runner_core::traits::SecretKeyBytes([7; 32]));
    secrets.save(&first).await.expect("save the key");
    assert!(
        !value(runner_secret.clone()).await.contains("ret_first"),
        "the exchange token is not copied into the runner's secret"
    );
    first.exchange_token = None;
    first.access_token = Some("rat_access".to_owned().into());
    secrets.save(&first).await.expect("save the credential");

    // A stack update with a new exchange token.
    client
        .put_secret_value()
        .secret_id(&stack_secret)
        .secret_string("ret_second")
        .send()
        .await
        .expect("the stack's update");
    let loaded = secrets.load().await.expect("load after the update");
    assert_eq!(exposed(&loaded.access_token).as_deref(), Some("rat_access"));
    assert_eq!(
        loaded.private_key,
        Some(runner_core::traits::SecretKeyBytes([7; 32]))
    );
    assert!(
        loaded.exchange_token.is_none(),
        "the new exchange token is not even read while a credential is stored"
    );
    assert_eq!(
        value(stack_secret.clone()).await,
        "ret_second",
        "never written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_encryption_binds_the_context() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let envelope = Envelope::new(aws_sdk_kms::Client::new(&sdk), &infra.kms_key_id);
    let token = b"ghp_a_users_personal_access_token";
    let alice = context(&infra.runner_id, "alice", "github.com");
    let sealed = envelope.seal(token, &alice).await.expect("seal");
    assert!(!sealed.ciphertext.windows(token.len()).any(|w| w == token));
    assert_eq!(
        envelope
            .open(&sealed, &alice)
            .await
            .expect("open")
            .as_slice(),
        token
    );
    for moved in [
        context(&infra.runner_id, "mallory", "github.com"),
        context(&infra.runner_id, "alice", "gitlab.com"),
        context("another-runner", "alice", "github.com"),
    ] {
        assert!(
            envelope.open(&sealed, &moved).await.is_err(),
            "opened under {moved:?}"
        );
    }
    let mut tampered = sealed.clone();
    tampered.ciphertext[0] ^= 1;
    assert!(envelope.open(&tampered, &alice).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_that_waits_past_the_leases_validity_never_leaves() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let mut settings = infra.settings("a");
    // One launch per 5 s: the second waits for the bucket longer than the
    // leadership below stays valid.
    settings.ec2.launch_rate = (0.2, 1);
    let leadership = Arc::new(Leadership::default());
    leadership.set(7, tokio::time::Instant::now() + Duration::from_secs(3600));
    let compute = runner_aws::adapters(&sdk, &settings, &leadership).compute;
    let first = env();
    compute
        .launch(&request(&infra, first, 1, 1))
        .await
        .expect("the first launch takes the only token");
    // Valid when the call starts (so it passes the check at entry), lapsed
    // long before the bucket has a token again.
    leadership.set(7, tokio::time::Instant::now() + Duration::from_secs(1));
    let second = env();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        compute.launch(&request(&infra, second, 1, 1)),
    )
    .await
    .expect("the bucket refills within a minute");
    assert!(
        matches!(outcome, Err(ComputeError::Fenced)),
        "{outcome:?} after {:?}",
        started.elapsed()
    );
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let launched = ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{TAG_ENVIRONMENT}"))
                .values(second.to_string())
                .build(),
        )
        .send()
        .await
        .expect("describe");
    assert!(
        launched.reservations().is_empty(),
        "the second launch reached EC2"
    );
}

/// A lookup by id of more instances than moto answers in one page (100)
/// reads every page: an instance on a later page is not taken for gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_by_id_reads_every_page_of_its_answer() {
    let sdk = sdk(&moto_url()).await;
    let infra = Infra::create(&sdk).await;
    let compute = infra.adapters(&sdk, "a", &leading()).compute;
    let mut ours = launch_many(compute.as_ref(), &infra, 110).await;
    let found = looked_up(compute.as_ref(), &ours).await;
    ours.sort();
    assert_eq!(found.len(), 110);
    assert_eq!(found, ours);
}
