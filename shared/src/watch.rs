//! Background tasks that keep a dependency's readiness up to date.
//!
//! A service whose loops talk to a broker reports failures there; these watchers cover the
//! time before the first message and idle periods, so `/readyz` never claims a dead link is up.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer};

use crate::config::{AmqpConfig, KafkaConfig, RedisConfig};
use crate::observability::Metrics;
use crate::shutdown::Shutdown;

/// Connects to Redis in the background, with backoff, and keeps probing it.
pub fn redis(config: &RedisConfig, metrics: &Metrics, shutdown: &Shutdown) {
    let status = metrics.readiness().dependency("redis");
    let (config, task_shutdown) = (config.clone(), shutdown.clone());
    shutdown.spawn("redis-watch", async move {
        if let Some(conn) =
            crate::redis_conn::connect_with_retry(&config, &status, &task_shutdown).await
        {
            crate::redis_conn::probe(conn, config, status, task_shutdown).await;
        }
    });
}

/// Probes the Kafka cluster in the background with metadata requests.
pub fn kafka(
    config: &KafkaConfig,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<(), rdkafka::error::KafkaError> {
    let status = metrics.readiness().dependency("kafka");
    tracing::info!(brokers = %config.brokers, properties = %crate::kafka::describe_properties(config), "Watching Kafka.");
    let producer: Arc<BaseProducer<crate::kafka::FleetClientContext>> = Arc::new(
        crate::kafka::client_config(config)
            .create_with_context(crate::kafka::FleetClientContext)?,
    );
    shutdown.spawn(
        "kafka-watch",
        crate::retry::probe_loop(
            status,
            shutdown.clone(),
            Duration::from_secs(2),
            move || {
                let producer = Arc::clone(&producer);
                async move {
                    tokio::task::spawn_blocking(move || {
                        // The probe sends nothing, but librdkafka queues its error reports
                        // until someone polls: serve them (they are logged), or they pile up
                        // with every outage.
                        producer.poll(Duration::ZERO);
                        producer
                            .client()
                            .fetch_metadata(None, Duration::from_secs(3))
                            .is_ok()
                    })
                    .await
                    .unwrap_or(false)
                }
            },
        ),
    );
    Ok(())
}

/// Connects to RabbitMQ in the background, with backoff, reconnecting whenever the
/// connection drops.
pub fn amqp(config: &AmqpConfig, connection_name: &str, metrics: &Metrics, shutdown: &Shutdown) {
    let status = metrics.readiness().dependency("amqp");
    let (config, name, task_shutdown) = (
        config.clone(),
        connection_name.to_string(),
        shutdown.clone(),
    );
    shutdown.spawn("amqp-watch", async move {
        while let Some(conn) =
            crate::amqp::connect_with_retry(&config, &name, &status, &task_shutdown).await
        {
            while conn.status().connected() {
                tokio::select! {
                    biased;
                    _ = task_shutdown.triggered() => {
                        let _ = conn.close(200, "shutdown".into()).await;
                        return;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            status.set_up(false);
        }
    });
}
