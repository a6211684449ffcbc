//! What the cache-updater tests share: a scenario's names and config, message builders, and
//! checks of what ended up in Redis.
// Each test binary uses a different part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use fleet_tests::amqp::Message;
use fleet_tests::{
    redis, redis_url, socket_addr_of, unique_name, wait_for, FaultProxy, Service, ServiceBuilder,
};
use rand::seq::SliceRandom;
use redis::AsyncCommands;

pub const READY: Duration = Duration::from_secs(60);
pub const DRAIN: Duration = Duration::from_secs(120);

/// One test's exchange, queues and key prefix.
pub struct Scenario {
    pub exchange: String,
    pub queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub prefix: String,
}

impl Scenario {
    pub fn new(label: &str) -> Self {
        let base = unique_name(label);
        Self {
            exchange: format!("{base}.x"),
            queue: format!("{base}.q"),
            dead_letter_exchange: format!("{base}.dlx"),
            dead_letter_queue: format!("{base}.dlq"),
            prefix: base,
        }
    }

    /// The service's config: this scenario's topology; plain entities are products keyed
    /// `<prefix>:product:{product_id}`, versioned by `version`.
    pub fn config(&self, consumer: &str) -> String {
        format!(
            r#"
[topology]
exchange = "{exchange}"
dead_letter_exchange = "{dlx}"
dead_letter_queue = "{dlq}"

[consumer]
{consumer}

[[queues]]
name = "{queue}"
routing_keys = ["product.changed", "cache.update"]
key_template = "{prefix}:product:{{product_id}}"
version_field = "version"
"#,
            exchange = self.exchange,
            dlx = self.dead_letter_exchange,
            dlq = self.dead_letter_queue,
            queue = self.queue,
            prefix = self.prefix,
        )
    }

    pub fn service(&self, consumer: &str) -> ServiceBuilder {
        ServiceBuilder::new("cache-updater")
            .config_toml(self.config(consumer))
            .env("RUST_LOG", "info,lapin=warn")
    }

    /// The service with its Redis reached through a fault proxy, and the proxy.
    pub async fn service_behind_a_proxy(
        &self,
        consumer: &str,
    ) -> Result<(ServiceBuilder, FaultProxy)> {
        let redis = FaultProxy::start(socket_addr_of(&redis_url())).await?;
        let service = self
            .service(consumer)
            .env("REDIS_URL", format!("redis://{}", redis.addr()));
        Ok((service, redis))
    }

    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// Removes the scenario's queues and exchanges from the shared broker.
    pub async fn cleanup(&self) {
        let _ = fleet_tests::amqp::delete(
            &[&self.queue, &self.dead_letter_queue],
            &[&self.exchange, &self.dead_letter_exchange],
        )
        .await;
    }
}

/// An envelope upsert of about 300 bytes whose value records its version.
pub fn upsert(key: &str, version: u64) -> Message {
    Message::body(format!(
        r#"{{"op":"upsert","key":"{key}","version":{version},"value":{{"v":{version},"name":"Product name","price":19.99,"stock":7,"tags":["a","b"],"note":"{}"}}}}"#,
        "x".repeat(150)
    ))
}

/// `count` upserts over `keys` keys named `<prefix>:k:<i>`: every version of every key once,
/// then random duplicates, shuffled. Returns them and each key's highest version.
pub fn shuffled_upserts(
    scenario: &Scenario,
    keys: usize,
    count: usize,
) -> (Vec<Message>, BTreeMap<String, u64>) {
    let mut rng = rand::rng();
    let versions = (count * 9 / 10) / keys;
    let mut pairs: Vec<(usize, u64)> = (0..keys)
        .flat_map(|k| (1..=versions as u64).map(move |v| (k, v)))
        .collect();
    while pairs.len() < count {
        let duplicate = pairs[rand::Rng::random_range(&mut rng, 0..pairs.len())];
        pairs.push(duplicate);
    }
    pairs.shuffle(&mut rng);
    let name = |k: usize| scenario.key(&format!("k:{k}"));
    let highest = (0..keys).map(|k| (name(k), versions as u64)).collect();
    let messages = pairs
        .into_iter()
        .map(|(k, v)| upsert(&name(k), v))
        .collect();
    (messages, highest)
}

/// `count` upserts over `keys` keys, each key's versions in increasing order.
pub fn ordered_upserts(
    scenario: &Scenario,
    keys: usize,
    count: usize,
) -> (Vec<Message>, BTreeMap<String, u64>) {
    let versions = (count / keys) as u64;
    let name = |k: usize| scenario.key(&format!("k:{k}"));
    let messages = (1..=versions)
        .flat_map(|v| (0..keys).map(move |k| (k, v)))
        .map(|(k, v)| upsert(&name(k), v))
        .collect();
    let highest = (0..keys).map(|k| (name(k), versions)).collect();
    (messages, highest)
}

/// Messages a replica has finished with, whatever the outcome.
pub async fn handled(service: &Service) -> Result<f64> {
    service.metric_sum("cache_updater_messages_total").await
}

pub async fn sample(service: &Service, sample: &str) -> Result<f64> {
    Ok(service.metric(sample).await?.unwrap_or(0.0))
}

/// Waits until the replicas together handled at least `at_least` messages.
pub async fn wait_handled(services: &[&Service], at_least: f64, timeout: Duration) -> Result<()> {
    wait_for(&format!("{at_least} messages handled"), timeout, || async {
        let mut total = 0.0;
        for service in services {
            total += handled(service).await?;
        }
        Ok((total >= at_least).then_some(()))
    })
    .await
}

/// Keys not holding their highest version, as a reader's plain GET sees them.
pub async fn wrong_versions(highest: &BTreeMap<String, u64>) -> Result<Vec<String>> {
    wrong_versions_on(&mut redis().await?, highest).await
}

/// [`wrong_versions`] through `conn`, such as a cluster client's.
pub async fn wrong_versions_on<C: redis::aio::ConnectionLike + Send + Sync>(
    conn: &mut C,
    highest: &BTreeMap<String, u64>,
) -> Result<Vec<String>> {
    let entries: Vec<(&String, &u64)> = highest.iter().collect();
    let mut wrong = Vec::new();
    for chunk in entries.chunks(500) {
        let keys: Vec<&String> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<Option<String>> = conn.mget(keys).await?;
        for (value, (key, expected)) in values.into_iter().zip(chunk) {
            let version = value
                .as_deref()
                .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
                .and_then(|v| v["v"].as_u64());
            if version != Some(**expected) {
                wrong.push(format!("{key}: {version:?} != {expected}"));
            }
        }
    }
    Ok(wrong)
}

/// Waits until every key holds its highest version.
pub async fn wait_highest_versions(highest: &BTreeMap<String, u64>) -> Result<()> {
    wait_highest_versions_on(&mut redis().await?, highest).await
}

/// [`wait_highest_versions`] through `conn`, such as a cluster client's.
pub async fn wait_highest_versions_on<C: redis::aio::ConnectionLike + Send + Sync>(
    conn: &mut C,
    highest: &BTreeMap<String, u64>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + DRAIN;
    loop {
        let wrong = wrong_versions_on(conn, highest).await?;
        if wrong.is_empty() {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{} keys not at their highest version: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the queue has no ready messages and the replicas hold none unacked.
pub async fn wait_queue_drained(queue: &str, services: &[&Service]) -> Result<()> {
    wait_for("the queue drained and everything acked", DRAIN, || async {
        let mut unacked = 0.0;
        for service in services {
            unacked += sample(service, "cache_updater_unacked_messages").await?;
        }
        Ok((fleet_tests::amqp::depth(queue).await? == 0 && unacked == 0.0).then_some(()))
    })
    .await
}

/// The service never sent a delivery tag the broker did not know.
pub fn assert_no_stale_acks(service: &Service) -> Result<()> {
    let logs = service.logs();
    for bad in ["PRECONDITION_FAILED", "unknown delivery tag"] {
        ensure!(!logs.contains(bad), "{bad} in logs:\n{logs}");
    }
    Ok(())
}

/// Lets a replica declare the scenario's topology and stops it, so messages can be published
/// before the replica that consumes them starts.
pub async fn declare_topology(scenario: &Scenario) -> Result<()> {
    let mut service = scenario.service("").spawn()?;
    service.wait_ready(READY).await?;
    service.stop().await
}

/// Nothing was dead-lettered, and no upsert was put back on its queue (towards the DLQ): a
/// failure was waited out where the messages were.
pub async fn assert_waited_out(service: &Service) -> Result<()> {
    let dead = service
        .metric_sum("cache_updater_dead_letters_total")
        .await?;
    ensure!(dead == 0.0, "{dead} messages dead-lettered");
    let retried = sample(
        service,
        r#"cache_updater_messages_total{op="upsert",outcome="retried"}"#,
    )
    .await?;
    ensure!(retried == 0.0, "{retried} messages put back on the queue");
    Ok(())
}

/// [`assert_waited_out`] checked every half second for `spell`: a failure that outlasts a
/// delivery's write attempts is waited out the whole time. Fails as soon as it is not.
pub async fn assert_waited_out_through(service: &Service, spell: Duration) -> Result<()> {
    let started = std::time::Instant::now();
    while started.elapsed() < spell {
        assert_waited_out(service).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_waited_out(service).await
}

/// Starts `service` with a write that counts once a replica holds it, and publishes 6,000
/// shuffled upserts over 300 keys around `fail_over`: half before it (and handled), half after
/// it. Returns the started service and each key's highest version, for the caller to drain
/// and check against the master that is left.
pub async fn publish_across_a_failover<F>(
    s: &Scenario,
    service: ServiceBuilder,
    fail_over: F,
) -> Result<(Service, BTreeMap<String, u64>)>
where
    F: std::future::Future<Output = Result<()>>,
{
    let mut service = service
        .env("CACHE_UPDATER__REDIS__WAIT_REPLICAS", "1")
        .spawn()?;
    service.wait_ready(READY).await?;
    let (messages, highest) = shuffled_upserts(s, 300, 6_000);
    let (before, after) = messages.split_at(3_000);
    let publisher = fleet_tests::amqp::Publisher::new().await?;
    publisher
        .publish(&s.exchange, "cache.update", before)
        .await?;
    wait_handled(&[&service], before.len() as f64, DRAIN).await?;
    fail_over.await?;
    publisher
        .publish(&s.exchange, "cache.update", after)
        .await?;
    Ok((service, highest))
}
