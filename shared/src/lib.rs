//! Common ground of the cache-consistency fleet.
//!
//! - [`config`]: layered configuration with one-line errors that name the key.
//! - [`app`]: what every binary does around its `run(config, shutdown)`.
//! - [`observability`]: Prometheus metrics, readiness, `/metrics` `/healthz` `/readyz`.
//! - [`shutdown`]: cancellation plus a named task set with a grace period.
//! - [`version_guard`]: version-guarded Redis writes, the core of cache consistency.
//! - [`envelope`], [`payload`], [`key_template`], [`version`]: reading changes from messages.
//! - [`mapping`]: plain entity payloads to cache writes, and the two-way-sync origin marker.
//! - [`cache_writer`]: version-guarded batches retried until written.
//! - [`redis_conn`], [`kafka`], [`amqp`]: broker clients; [`retry`]: backoff.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod app;
pub mod cache_writer;
pub mod config;
pub mod envelope;
pub mod kafka;
pub mod key_template;
pub mod mapping;
pub mod observability;
pub mod payload;
pub mod redis_conn;
pub mod retry;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod version;
pub mod version_guard;
pub mod watch;

pub use shutdown::Shutdown;
