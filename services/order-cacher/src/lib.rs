//! Consumes Kafka order topics into Redis keys such as `order:{order_id}`, version-guarded.
#![forbid(unsafe_code)]

pub mod config;
mod context;
pub mod dead_letter;
pub mod decode;
mod metrics;
mod ownership;
mod pipeline;

use std::sync::Arc;

use fleet::cache_writer::CacheWriter;
use fleet::config::{ServiceSpec, ShortEnv};
use fleet::observability::{self, Metrics};
use fleet::Shutdown;

pub use config::OrderCacherConfig;

/// The service's name, env prefix (`ORDER_CACHER__`) and default metrics port.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "order-cacher",
    default_metrics_port: 9102,
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
    /// The Kafka client could not be created or subscribed from the config.
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Runs order-cacher until `shutdown` fires, then drains and returns.
pub async fn run(config: OrderCacherConfig, shutdown: Shutdown) -> Result<(), Error> {
    let metrics = Metrics::new(&SPEC.metric_namespace())?;
    let pipeline_metrics = metrics::PipelineMetrics::register(&metrics)?;
    let addr = config.telemetry.metrics_addr;
    let _server = observability::serve(addr, metrics.clone())
        .await
        .map_err(|source| Error::MetricsBind { addr, source })?;
    fleet::watch::redis(&config.redis, &metrics, &shutdown);
    fleet::watch::kafka(&config.kafka, &metrics, &shutdown)?;
    metrics.readiness().drain_on(&shutdown);

    // Created before Redis is reachable, so a bad Kafka setting fails at once.
    let consumer = Arc::new(pipeline::consumer(
        &config,
        &pipeline_metrics,
        metrics.readiness().dependency("kafka"),
    )?);
    let dead_letters = dead_letter::DeadLetterProducer::new(&config.kafka)?;
    dead_letter::ensure_topics(
        &config.kafka,
        config
            .topics
            .iter()
            .map(|t| t.dead_letter_topic())
            .collect(),
        &shutdown,
    )?;
    let guard = config
        .version_guard
        .version_guard(config.consumer.batch_size, &config.redis);
    let cache = CacheWriter::connect(
        &config.redis,
        guard,
        metrics.readiness(),
        pipeline_metrics.writer.clone(),
        &shutdown,
    )
    .await
    .map(|cache| cache.with_rejected_after(config.consumer.write_attempts));
    if let Some(cache) = cache {
        pipeline::run(
            &config,
            consumer,
            cache,
            dead_letters,
            pipeline_metrics,
            shutdown.clone(),
        )
        .await?;
    }

    shutdown.triggered().await;
    shutdown.wait_for_tasks().await;
    Ok(())
}
