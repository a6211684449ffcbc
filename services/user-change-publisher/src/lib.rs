//! Tails Redis keyspace notifications on `user:*` and publishes each change to Kafka and/or RabbitMQ.
#![forbid(unsafe_code)]

pub mod config;

use fleet::config::{ServiceSpec, ShortEnv};
use fleet::observability::{self, Metrics};
use fleet::Shutdown;

pub use config::UserChangePublisherConfig;

/// The service's name, env prefix (`USER_CHANGE_PUBLISHER__`) and default metrics port.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "user-change-publisher",
    default_metrics_port: 9103,
    short_env: &[ShortEnv::RedisUrl, ShortEnv::KafkaBrokers],
    default_worker_threads: 0,
};

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics and health server could not bind its address.
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// A metric could not be registered.
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The Kafka client could not be created from the config.
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Runs user-change-publisher until `shutdown` fires, then drains and returns.
pub async fn run(config: UserChangePublisherConfig, shutdown: Shutdown) -> Result<(), Error> {
    let metrics = Metrics::new(&SPEC.metric_namespace())?;
    let addr = config.telemetry.metrics_addr;
    let _server = observability::serve(addr, metrics.clone())
        .await
        .map_err(|source| Error::MetricsBind { addr, source })?;
    fleet::watch::redis(&config.redis, &metrics, &shutdown);
    fleet::watch::kafka(&config.kafka, &metrics, &shutdown)?;

    shutdown.triggered().await;
    metrics.readiness().set_draining();
    shutdown.wait_for_tasks().await;
    Ok(())
}
