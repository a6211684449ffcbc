//! Consumes RabbitMQ change messages and updates, invalidates or warms Redis cache entries.
//!
//! - [`config`]: queues, topology, prefetch, sharding.
//! - [`decode`]: envelopes and plain entities to cache writes.
//! - `consumer`: connection, topology, one consumer per queue, reconnects.
//! - `shard`: key-sharded, batched, version-guarded Redis writes.
//! - `ack`: acks in delivery order, never on a stale channel.
//! - `delivery`: dead letters with their reason, retries with a delivery count.
#![forbid(unsafe_code)]

mod ack;
pub mod config;
mod consumer;
pub mod decode;
mod delivery;
mod metrics;
mod shard;

use fleet::cache_writer::CacheWriter;
use fleet::config::{ServiceSpec, ShortEnv};
use fleet::observability::{self, Metrics};
use fleet::Shutdown;

pub use config::CacheUpdaterConfig;

/// The service's name, env prefix (`CACHE_UPDATER__`) and default metrics port.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: "cache-updater",
    default_metrics_port: 9101,
    short_env: &[ShortEnv::RedisUrl, ShortEnv::AmqpUrl],
    // One thread measured fastest: the consumer, shard writers and ack trackers hand work to
    // each other for every message, and across threads each hand-off costs a wake-up.
    default_worker_threads: 1,
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
}

/// Runs cache-updater until `shutdown` fires, then drains and returns.
pub async fn run(config: CacheUpdaterConfig, shutdown: Shutdown) -> Result<(), Error> {
    let metrics = Metrics::new(&SPEC.metric_namespace())?;
    let pipeline_metrics = metrics::PipelineMetrics::register(&metrics)?;
    let addr = config.telemetry.metrics_addr;
    let _server = observability::serve(addr, metrics.clone())
        .await
        .map_err(|source| Error::MetricsBind { addr, source })?;
    fleet::watch::redis(&config.redis, &metrics, &shutdown);
    // Down until the topology is declared and the consumers run.
    let amqp_status = metrics.readiness().dependency("amqp");
    metrics.readiness().drain_on(&shutdown);

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
    .await;
    if let Some(cache) = cache {
        let consumer = &config.consumer;
        let shards = shard::Shards::start(
            consumer.shards,
            usize::from(consumer.prefetch),
            shard::WriterSettings {
                batch_size: consumer.batch_size,
                linger: std::time::Duration::from_millis(consumer.linger_ms),
                write_attempts: consumer.write_attempts,
                max_deliveries: consumer.max_deliveries,
            },
            cache,
            pipeline_metrics.clone(),
            &shutdown,
        );
        consumer::run(
            &config,
            shards,
            pipeline_metrics,
            amqp_status,
            shutdown.clone(),
        )
        .await;
    }

    shutdown.triggered().await;
    shutdown.wait_for_tasks().await;
    Ok(())
}
