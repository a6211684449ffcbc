//! cache-updater across a RabbitMQ restart. Its own test binary, because it restarts the broker
//! every other test shares (`fleet_tests::restart_broker`).

#[path = "cache_updater/support.rs"]
mod support;

use std::time::Duration;

use anyhow::{ensure, Result};
use fleet_tests::amqp::Publisher;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_restart_mid_stream_heals_without_loss_or_stale_acks() -> Result<()> {
    let s = Scenario::new("cu-restart");
    // Slow writes keep the stream going while the broker restarts.
    let mut service = s
        .service("prefetch = 100\nbatch_size = 10\nshards = 1")
        .spawn()?;
    service.wait_ready(READY).await?;
    let (messages, highest) = ordered_upserts(&s, 1_000, 30_000);
    Publisher::new()
        .await?
        .publish(&s.exchange, "cache.update", &messages)
        .await?;
    wait_handled(&[&service], 2_000.0, DRAIN).await?;
    ensure!(
        fleet_tests::amqp::depth(&s.queue).await? > 0,
        "the restart happens mid-stream"
    );

    let restart = tokio::task::spawn_blocking(|| fleet_tests::restart_broker("rabbitmq"));
    service.wait_readyz(503, Duration::from_secs(60)).await?;
    restart.await??;
    service.wait_ready(Duration::from_secs(90)).await?;
    wait_queue_drained(&s.queue, &[&service]).await?;
    wait_highest_versions(&highest).await?;
    ensure!(
        sample(&service, "cache_updater_amqp_reconnects_total").await? >= 1.0,
        "the service reconnected by itself"
    );
    ensure!(
        service
            .metric_sum("cache_updater_dead_letters_total")
            .await?
            == 0.0
    );
    assert_no_stale_acks(&service)?;
    // An outage the service rides out is a warning, from its libraries too.
    let errors = service.error_lines();
    ensure!(
        errors.is_empty(),
        "errors logged for a healed outage:\n{}",
        errors.join("\n")
    );
    // lapin's own report of the lost connection is still there, as a warning.
    let logs = service.logs();
    ensure!(
        logs.lines().any(
            |line| line.contains("\"level\":\"WARN\"") && line.contains("\"source\":\"lapin::")
        ),
        "no warning from lapin about the lost connection:\n{logs}"
    );
    service.stop().await?;
    s.cleanup().await;
    Ok(())
}
