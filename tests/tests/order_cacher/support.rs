//! What the order-cacher tests share: a scenario's topic, group and config, order messages,
//! and checks of what ended up in Redis.
// Each test binary uses a different part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use fleet_tests::kafka::{self, Record};
use fleet_tests::{
    redis, redis_url, socket_addr_of, unique_name, wait_for, FaultProxy, Service, ServiceBuilder,
};
use rand::seq::SliceRandom;
use rand::Rng;
use redis::AsyncCommands;

pub const PARTITIONS: i32 = 3;
pub const READY: Duration = Duration::from_secs(60);
pub const DRAIN: Duration = Duration::from_secs(120);

/// One test's topic, group and key prefix.
pub struct Scenario {
    pub topic: String,
    pub group: String,
    pub prefix: String,
}

impl Scenario {
    pub async fn new(label: &str, partitions: i32) -> Result<Self> {
        let scenario = Self {
            topic: unique_name(&format!("{label}-orders")),
            group: unique_name(&format!("{label}-group")),
            prefix: unique_name(label),
        };
        kafka::create_topic(&scenario.topic, partitions).await?;
        Ok(scenario)
    }

    /// The service's config: this scenario's topic, keys and group, version-guarded.
    pub fn config(&self, extra: &str) -> String {
        format!(
            r#"
[consumer]
group_id = "{group}"
linger_ms = 5

[kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"

[[topics]]
name = "{topic}"
key_template = "{prefix}:order:{{order_id}}"
version_field = "version"
{extra}
"#,
            group = self.group,
            topic = self.topic,
            prefix = self.prefix,
        )
    }

    /// [`Scenario::config`] without the version field: every write is last-writer-wins.
    pub fn unversioned_config(&self, extra: &str) -> String {
        self.config(extra)
            .replace("version_field = \"version\"\n", "")
    }

    pub fn service(&self, extra: &str) -> ServiceBuilder {
        service_with(self.config(extra))
    }

    /// A service whose Redis writes are slowed (20 ms each way through a fault proxy), with
    /// `consumer` added to its `[consumer]` settings: a stream of a few thousand messages then
    /// lasts seconds, so a fault can be made to come mid-stream. Keep the proxy as long as the
    /// service.
    pub async fn slow_service(&self, consumer: &str) -> Result<(ServiceBuilder, FaultProxy)> {
        let (service, redis) = self.service_behind_a_proxy().await?;
        redis.set_delay(Duration::from_millis(20));
        let service = service.config_toml(
            self.config("")
                .replace("linger_ms = 5", &format!("linger_ms = 5\n{consumer}")),
        );
        Ok((service, redis))
    }

    /// The service, reaching Redis through a fault proxy that can cut it. Keep the proxy as
    /// long as the service.
    pub async fn service_behind_a_proxy(&self) -> Result<(ServiceBuilder, FaultProxy)> {
        let redis = FaultProxy::start(socket_addr_of(&redis_url())).await?;
        let service = self
            .service("")
            .env("REDIS_URL", format!("redis://{}", redis.addr()));
        Ok((service, redis))
    }

    pub fn key(&self, order: usize) -> String {
        format!("{}:order:{order}", self.prefix)
    }

    /// A `[[topics.indexes]]` table: each user's newest `max_entries` orders.
    pub fn user_index(&self, max_entries: usize) -> String {
        format!(
            r#"[[topics.indexes]]
key_template = "{}:user:{{user_id}}:orders"
max_entries = {max_entries}
"#,
            self.prefix
        )
    }
}

/// The service with a config of its own.
pub fn service_with(config: String) -> ServiceBuilder {
    ServiceBuilder::new("order-cacher")
        .config_toml(config)
        .env("RUST_LOG", "info,rdkafka=warn")
}

/// An order JSON of about 300 bytes, as producers send them.
pub fn order(id: usize, version: u64) -> Vec<u8> {
    format!(
        r#"{{"order_id": "{id}", "user_id": "user_{}", "amount": 299.99, "status": "paid", "version": {version}, "timestamp": "2023-01-01 10:00:00", "items": [{{"sku": "SKU-{id}-A", "qty": 1}}, {{"sku": "SKU-{id}-B", "qty": 2}}], "note": "{}"}}"#,
        id % 97,
        "x".repeat(90)
    )
    .into_bytes()
}

/// `count` messages over `orders` keys with versions 1..: every version of every order once,
/// then random duplicates, shuffled, each on a random partition (so versions of one order
/// arrive out of order). Returns the messages and each order's highest version.
pub fn shuffled_orders(orders: usize, count: usize) -> (Vec<Record>, BTreeMap<usize, u64>) {
    let mut rng = rand::rng();
    let versions = (count * 9 / 10) / orders;
    let mut pairs: Vec<(usize, u64)> = (0..orders)
        .flat_map(|id| (1..=versions as u64).map(move |v| (id, v)))
        .collect();
    while pairs.len() < count {
        let duplicate = pairs[rng.random_range(0..pairs.len())];
        pairs.push(duplicate);
    }
    pairs.shuffle(&mut rng);
    let highest = (0..orders).map(|id| (id, versions as u64)).collect();
    let records = pairs
        .into_iter()
        .map(|(id, v)| Record::value(order(id, v)).partition(rng.random_range(0..PARTITIONS)))
        .collect();
    (records, highest)
}

/// Messages the service has finished with, whatever the outcome.
pub async fn handled(service: &Service) -> Result<f64> {
    service.metric_sum("order_cacher_messages_total").await
}

pub async fn wait_handled(service: &Service, at_least: f64, timeout: Duration) -> Result<()> {
    wait_for(&format!("{at_least} messages handled"), timeout, || async {
        Ok((handled(service).await? >= at_least).then_some(()))
    })
    .await
}

/// Every order holds its highest version, as a reader's plain GET sees it.
pub async fn assert_highest_versions(
    scenario: &Scenario,
    highest: &BTreeMap<usize, u64>,
) -> Result<()> {
    assert_highest_versions_on(&mut redis().await?, scenario, highest).await
}

/// [`assert_highest_versions`] through `conn`, such as a cluster client's.
pub async fn assert_highest_versions_on<C: redis::aio::ConnectionLike + Send + Sync>(
    conn: &mut C,
    scenario: &Scenario,
    highest: &BTreeMap<usize, u64>,
) -> Result<()> {
    let keys: Vec<String> = highest.keys().map(|&id| scenario.key(id)).collect();
    let mut wrong = Vec::new();
    for (chunk_keys, chunk) in keys
        .chunks(500)
        .zip(highest.iter().collect::<Vec<_>>().chunks(500))
    {
        let values: Vec<Option<String>> = conn.mget(chunk_keys).await?;
        for (value, (id, expected)) in values.into_iter().zip(chunk) {
            let version = value
                .as_deref()
                .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
                .and_then(|v| v["version"].as_u64());
            if version != Some(**expected) {
                wrong.push(format!("order {id}: {version:?} != {expected}"));
            }
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} keys not at their highest version: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    Ok(())
}

pub async fn wait_highest_versions(
    scenario: &Scenario,
    highest: &BTreeMap<usize, u64>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + DRAIN;
    loop {
        match assert_highest_versions(scenario, highest).await {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Restarts the group and checks that it resumes from its committed offsets: it handles
/// exactly the messages after them, and every order ends at its highest version.
pub async fn restart_and_expect_only_the_uncommitted(
    scenario: &Scenario,
    highest: &BTreeMap<usize, u64>,
    produced: i64,
    committed: i64,
) -> Result<()> {
    let mut service = scenario.service("").spawn()?;
    service.wait_ready(READY).await?;
    wait_highest_versions(scenario, highest).await?;
    let remaining = (produced - committed) as f64;
    wait_handled(&service, remaining, DRAIN).await?;
    // Give a wrong re-read time to show up in the count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let handled = handled(&service).await?;
    ensure!(
        handled == remaining,
        "the restarted group handled {handled} messages, expected exactly the {remaining} uncommitted"
    );
    Ok(())
}

pub async fn sample(service: &Service, sample: &str) -> Result<f64> {
    Ok(service.metric(sample).await?.unwrap_or(0.0))
}

/// Messages the service dead-lettered so far.
pub async fn dead_lettered(service: &Service) -> Result<f64> {
    sample(
        service,
        r#"order_cacher_messages_total{outcome="dead_lettered"}"#,
    )
    .await
}

/// Starts `service` with a write that counts once a replica holds it, and produces 6,000
/// shuffled orders over 300 ids around `fail_over`: half before it (and handled), half after
/// it. Returns the started service and each order's highest version, for the caller to check
/// against the master that is left.
pub async fn produce_across_a_failover<F>(
    scenario: &Scenario,
    service: ServiceBuilder,
    fail_over: F,
) -> Result<(Service, BTreeMap<usize, u64>)>
where
    F: std::future::Future<Output = Result<()>>,
{
    let mut service = service
        .env("ORDER_CACHER__REDIS__WAIT_REPLICAS", "1")
        .spawn()?;
    service.wait_ready(READY).await?;
    let (records, highest) = shuffled_orders(300, 6_000);
    let (before, after) = records.split_at(3_000);
    let producer = kafka::producer()?;
    kafka::produce(&producer, &scenario.topic, before).await?;
    wait_handled(&service, before.len() as f64, DRAIN).await?;
    fail_over.await?;
    kafka::produce(&producer, &scenario.topic, after).await?;
    Ok((service, highest))
}
