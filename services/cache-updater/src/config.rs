//! The cache-updater configuration. See `docs/configuration.md` for every key and its env name.

use fleet::app::ServiceConfig;
use fleet::config::{
    AmqpConfig, ConfigError, RedisConfig, ShutdownConfig, TelemetryConfig, Validate,
};
use serde::Deserialize;

/// Everything cache-updater can be told. Unknown keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheUpdaterConfig {
    /// Redis connection.
    #[serde(default)]
    pub redis: RedisConfig,
    /// RabbitMQ connection.
    #[serde(default)]
    pub amqp: AmqpConfig,
    /// Logs, metrics and health endpoints.
    pub telemetry: TelemetryConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

impl Validate for CacheUpdaterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        self.amqp.validate()?;
        Ok(())
    }
}

impl ServiceConfig for CacheUpdaterConfig {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }

    fn shutdown(&self) -> &ShutdownConfig {
        &self.shutdown
    }
}
