//! The counter-flusher configuration. See `docs/configuration.md` for every key and its env name.

use fleet::app::ServiceConfig;
use fleet::config::{
    ConfigError, KafkaConfig, RedisConfig, RuntimeConfig, ShutdownConfig, TelemetryConfig, Validate,
};
use serde::{Deserialize, Serialize};

/// Everything counter-flusher can be told. Unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CounterFlusherConfig {
    /// Redis connection.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Kafka connection and librdkafka properties.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Logs, metrics and health endpoints.
    pub telemetry: TelemetryConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Worker threads.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

impl Validate for CounterFlusherConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        self.kafka.validate()?;
        Ok(())
    }
}

impl ServiceConfig for CounterFlusherConfig {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }

    fn shutdown(&self) -> &ShutdownConfig {
        &self.shutdown
    }

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }
}
