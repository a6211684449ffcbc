//! order-cacher across a Kafka broker restart. Its own test binary, because it restarts the
//! broker every other test shares (`fleet_tests::restart_broker`).

#[path = "order_cacher/support.rs"]
mod support;

use std::time::Duration;

use anyhow::{ensure, Result};
use fleet_tests::kafka;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_restart_mid_stream_heals_without_loss() -> Result<()> {
    let scenario = Scenario::new("kafka-restart", PARTITIONS).await?;
    let (records, highest) = shuffled_orders(1_000, 24_000);
    let (before, after) = records.split_at(16_000);
    let producer = kafka::producer()?;
    kafka::produce(&producer, &scenario.topic, before).await?;

    // Slow Redis writes keep the service working through the messages it fetched before the
    // broker went away, so it stores offsets it cannot commit until the broker is back.
    let (service, redis) = scenario.slow_service("batch_size = 50").await?;
    let mut service = service.spawn()?;
    service.wait_ready(READY).await?;
    wait_handled(&service, 1_000.0, DRAIN).await?;

    let restart = tokio::task::spawn_blocking(|| fleet_tests::restart_broker("kafka"));
    service.wait_readyz(503, Duration::from_secs(60)).await?;
    let (_, body) = service.get("/readyz").await?;
    ensure!(body.contains("kafka: down"), "{body}");
    ensure!(
        handled(&service).await? < before.len() as f64,
        "the broker went away mid-stream"
    );
    restart.await??;
    service.wait_ready(Duration::from_secs(90)).await?;
    redis.set_delay(Duration::ZERO);

    // The group picks up what is produced after the restart too.
    kafka::produce(&kafka::producer()?, &scenario.topic, after).await?;
    wait_handled(&service, records.len() as f64, DRAIN).await?;
    wait_highest_versions(&scenario, &highest).await?;
    ensure!(
        sample(
            &service,
            "order_cacher_messages_total{outcome=\"dead_lettered\"}"
        )
        .await?
            == 0.0
    );
    // An outage the service rides out is a warning, from librdkafka too.
    let errors = service.error_lines();
    ensure!(
        errors.is_empty(),
        "errors logged for a healed outage:\n{}",
        errors.join("\n")
    );

    // The consumer properties this test sets reach the service's producers too, which is
    // expected and not worth a warning.
    ensure!(
        !service.logs().contains("CONFWARN"),
        "configuration warnings for shared properties:\n{}",
        service.logs()
    );

    service.stop().await?;
    let committed = kafka::committed_total(&scenario.group, &scenario.topic, PARTITIONS).await?;
    ensure!(
        committed == records.len() as i64,
        "every offset committed once the broker was back: {committed} of {}",
        records.len()
    );
    Ok(())
}
