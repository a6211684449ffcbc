//! The cache-updater configuration. See `docs/configuration.md` for every key and its env name.

use std::collections::BTreeSet;

use fleet::app::ServiceConfig;
pub use fleet::config::GuardConfig;
use fleet::config::{
    AmqpConfig, ConfigError, RedisConfig, RuntimeConfig, ShutdownConfig, TelemetryConfig, Validate,
};
use fleet::key_template::KeyTemplate;
use fleet::mapping::{EntityMapping, OriginMarker};
use serde::{Deserialize, Serialize};

/// Everything cache-updater can be told. Unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheUpdaterConfig {
    /// Redis connection.
    #[serde(default)]
    pub redis: RedisConfig,
    /// RabbitMQ connection.
    #[serde(default)]
    pub amqp: AmqpConfig,
    /// Exchange, dead-letter exchange and queue, declared at start-up and after reconnects.
    #[serde(default)]
    pub topology: TopologyConfig,
    /// The queues to consume and how their plain entity messages map to cache keys.
    #[serde(default = "default_queues")]
    pub queues: Vec<QueueConfig>,
    /// Prefetch, sharding, batching and limits.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// Messages carrying this marker came from Redis and are skipped, so two-way sync cannot loop.
    #[serde(default)]
    pub origin: OriginMarker,
    /// Tombstones of versioned deletes.
    #[serde(default)]
    pub version_guard: GuardConfig,
    /// Logs, metrics and health endpoints.
    pub telemetry: TelemetryConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Worker threads.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// The exchange type of RabbitMQ's consistent-hash plugin.
pub const CONSISTENT_HASH_EXCHANGE: &str = "x-consistent-hash";

/// What is declared on the broker besides the queues themselves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyConfig {
    /// Exchange the queues are bound to; empty uses the default exchange (no bindings).
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Its type: `direct`, `topic`, `fanout`, `headers`, or `x-consistent-hash` (RabbitMQ's
    /// `rabbitmq_consistent_hash_exchange` plugin), which spreads messages over the queues by a
    /// hash of their routing key: publish each message with its cache key as routing key, and
    /// one key's messages stay on one queue, in order, while the queues (each one broker
    /// process) share the load. Each queue's `routing_keys` are then its weight, default `1`.
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    /// Exchange that dead letters are published to (a fanout bound to the dead-letter queue).
    #[serde(default = "default_dead_letter_exchange")]
    pub dead_letter_exchange: String,
    /// Queue that keeps dead letters.
    #[serde(default = "default_dead_letter_queue")]
    pub dead_letter_queue: String,
    /// Declare the queues (and the dead-letter queue) as quorum queues.
    #[serde(default)]
    pub quorum_queues: bool,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            exchange: default_exchange(),
            exchange_type: default_exchange_type(),
            dead_letter_exchange: default_dead_letter_exchange(),
            dead_letter_queue: default_dead_letter_queue(),
            quorum_queues: false,
        }
    }
}

fn default_exchange() -> String {
    "cache_update".into()
}

fn default_exchange_type() -> String {
    "direct".into()
}

fn default_dead_letter_exchange() -> String {
    "cache_update.dlx".into()
}

fn default_dead_letter_queue() -> String {
    "cache_update.dlq".into()
}

/// One queue, its bindings, and the mapping of its plain entity messages.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue name.
    pub name: String,
    /// Routing keys binding the queue to the exchange; default: the queue's name (with an
    /// `x-consistent-hash` exchange: its weight, default `1`).
    #[serde(default)]
    pub routing_keys: Option<Vec<String>>,
    /// Key template for plain entity messages, such as `product:{product_id}`. Without it only
    /// envelopes (messages with an `op` field) are accepted.
    #[serde(default)]
    pub key_template: Option<KeyTemplate>,
    /// Field of a plain entity message holding its version (integer, digit string, RFC 3339
    /// or `YYYY-MM-DD HH:MM:SS` read as UTC). With it, entity messages without the field are
    /// dead-lettered.
    #[serde(default)]
    pub version_field: Option<String>,
    /// Expiry of entries written from plain entity messages, in seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Declare the queue (durable, with the dead-letter exchange as its `x-dead-letter-exchange`)
    /// and bind it. `false` consumes a queue that already exists as it is, such as one a
    /// producer declared with other arguments: it is neither declared nor bound, and a dead
    /// letter the broker does not confirm is requeued rather than rejected, since the queue
    /// may have no dead-letter exchange of its own.
    #[serde(default = "default_declare")]
    pub declare: bool,
}

fn default_declare() -> bool {
    true
}

impl QueueConfig {
    /// The routing keys the queue is bound with to an exchange of `exchange_type`: by default
    /// its name, or a weight of 1 to a consistent-hash exchange.
    pub fn routing_keys(&self, exchange_type: &str) -> Vec<String> {
        self.routing_keys.clone().unwrap_or_else(|| {
            if exchange_type == CONSISTENT_HASH_EXCHANGE {
                vec!["1".to_string()]
            } else {
                vec![self.name.clone()]
            }
        })
    }

    /// The mapping of plain entity messages, if the queue accepts them.
    pub fn mapping(&self) -> Option<EntityMapping> {
        self.key_template.as_ref().map(|template| EntityMapping {
            key_template: template.clone(),
            version_field: self.version_field.clone(),
            ttl_secs: self.ttl_secs,
        })
    }
}

fn default_queues() -> Vec<QueueConfig> {
    vec![QueueConfig {
        name: "cache_update".into(),
        routing_keys: None,
        key_template: None,
        version_field: None,
        ttl_secs: None,
        declare: true,
    }]
}

/// How messages are taken from the broker and written to Redis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Unacked messages the broker may send each queue's consumer (basic.qos). Bounds memory
    /// during a Redis outage.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Parallel Redis writers. Messages are routed to one by their cache key, so one key's
    /// messages apply in arrival order.
    #[serde(default = "default_shards")]
    pub shards: usize,
    /// Most cache writes in one Redis pipeline; also the batch size of `warm` entries.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long, in milliseconds, a shard's batch that is not full waits for more writes
    /// before it is written. Bigger batches cost Redis less per write: 1 ms cut Redis's CPU per
    /// message by 12 to 30% in drains (docs/benchmarks.md). 0 writes at once.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Largest message body accepted; larger ones are dead-lettered (`too_large`).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Deliveries a message gets when its write keeps failing (or it keeps coming back after a
    /// crash) before it is dead-lettered.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// Attempts of a write that Redis refuses (not an outage) within one delivery.
    #[serde(default = "default_write_attempts")]
    pub write_attempts: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            prefetch: default_prefetch(),
            shards: default_shards(),
            batch_size: default_batch_size(),
            linger_ms: default_linger_ms(),
            max_message_bytes: default_max_message_bytes(),
            max_deliveries: default_max_deliveries(),
            write_attempts: default_write_attempts(),
        }
    }
}

fn default_prefetch() -> u16 {
    1000
}

fn default_shards() -> usize {
    4
}

fn default_batch_size() -> usize {
    500
}

fn default_linger_ms() -> u64 {
    1
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_max_deliveries() -> u32 {
    5
}

fn default_write_attempts() -> u32 {
    3
}

impl Validate for CacheUpdaterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        self.amqp.validate()?;
        let consumer = &self.consumer;
        if consumer.prefetch == 0 {
            return Err(ConfigError::invalid(
                "consumer.prefetch",
                "must be positive (0 would mean unbounded)",
            ));
        }
        if !(1..=256).contains(&consumer.shards) {
            return Err(ConfigError::invalid(
                "consumer.shards",
                "must be from 1 to 256",
            ));
        }
        if !(1..=10_000).contains(&consumer.batch_size) {
            return Err(ConfigError::invalid(
                "consumer.batch_size",
                "must be from 1 to 10000",
            ));
        }
        if consumer.linger_ms > 1_000 {
            return Err(ConfigError::invalid(
                "consumer.linger_ms",
                "must be at most 1000 (a second)",
            ));
        }
        if consumer.max_message_bytes == 0 {
            return Err(ConfigError::invalid(
                "consumer.max_message_bytes",
                "must be positive",
            ));
        }
        if consumer.max_deliveries == 0 {
            return Err(ConfigError::invalid(
                "consumer.max_deliveries",
                "must be positive",
            ));
        }
        if consumer.write_attempts == 0 {
            return Err(ConfigError::invalid(
                "consumer.write_attempts",
                "must be positive",
            ));
        }
        let topology = &self.topology;
        if ![
            "direct",
            "topic",
            "fanout",
            "headers",
            CONSISTENT_HASH_EXCHANGE,
        ]
        .contains(&topology.exchange_type.as_str())
        {
            return Err(ConfigError::invalid(
                "topology.exchange_type",
                "must be direct, topic, fanout, headers or x-consistent-hash",
            ));
        }
        if topology.exchange_type == CONSISTENT_HASH_EXCHANGE {
            let weight = |key: &String| key.parse::<u32>().is_ok_and(|w| w > 0);
            for queue in self.queues.iter().filter(|q| q.declare) {
                if !queue
                    .routing_keys(&topology.exchange_type)
                    .iter()
                    .all(weight)
                {
                    return Err(ConfigError::invalid(
                        "queues.routing_keys",
                        "must be weights (positive integers) with an x-consistent-hash exchange",
                    ));
                }
            }
        }
        if topology.dead_letter_exchange.trim().is_empty() {
            return Err(ConfigError::invalid(
                "topology.dead_letter_exchange",
                "must not be empty",
            ));
        }
        if topology.dead_letter_exchange == topology.exchange {
            return Err(ConfigError::invalid(
                "topology.dead_letter_exchange",
                "must differ from topology.exchange",
            ));
        }
        if topology.dead_letter_queue.trim().is_empty() {
            return Err(ConfigError::invalid(
                "topology.dead_letter_queue",
                "must not be empty",
            ));
        }
        if self.queues.is_empty() {
            return Err(ConfigError::invalid("queues", "name at least one queue"));
        }
        let mut names = BTreeSet::new();
        for (i, queue) in self.queues.iter().enumerate() {
            if queue.name.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("queues[{i}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(queue.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("queues[{i}].name"),
                    format!("queue `{}` is listed twice", queue.name),
                ));
            }
            if queue.name == topology.dead_letter_queue {
                return Err(ConfigError::invalid(
                    format!("queues[{i}].name"),
                    "must differ from topology.dead_letter_queue",
                ));
            }
            if queue.version_field.as_deref().is_some_and(str::is_empty) {
                return Err(ConfigError::invalid(
                    format!("queues[{i}].version_field"),
                    "must not be empty",
                ));
            }
            if queue.key_template.is_none()
                && (queue.version_field.is_some() || queue.ttl_secs.is_some())
            {
                return Err(ConfigError::invalid(
                    format!("queues[{i}].key_template"),
                    "is required when version_field or ttl_secs is set",
                ));
            }
        }
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

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn queues_can_come_from_the_environment() {
        let env: BTreeMap<String, String> = [(
            "CACHE_UPDATER__QUEUES".to_string(),
            r#"[{name = "products", key_template = "product:{product_id}", routing_keys = ["product.*"]},
                {name = "orders"}]"#
                .to_string(),
        )]
        .into();
        let config: CacheUpdaterConfig = fleet::config::load(&crate::SPEC, None, &env).unwrap();
        let names: Vec<&str> = config.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["products", "orders"]);
        assert_eq!(
            config.queues[0].routing_keys.as_deref(),
            Some(&["product.*".to_string()][..])
        );
        assert!(config.queues[1].key_template.is_none());
    }

    #[test]
    fn a_consistent_hash_exchange_takes_weights_as_routing_keys() {
        let load = |queues: &str| {
            let env: BTreeMap<String, String> = [
                (
                    "CACHE_UPDATER__TOPOLOGY__EXCHANGE_TYPE".to_string(),
                    "x-consistent-hash".to_string(),
                ),
                ("CACHE_UPDATER__QUEUES".to_string(), queues.to_string()),
            ]
            .into();
            fleet::config::load::<CacheUpdaterConfig>(&crate::SPEC, None, &env)
        };
        let config = load(r#"[{name = "a"}, {name = "b", routing_keys = ["3"]}]"#).unwrap();
        assert_eq!(
            config.queues[0].routing_keys(&config.topology.exchange_type),
            ["1"]
        );
        assert_eq!(
            config.queues[1].routing_keys(&config.topology.exchange_type),
            ["3"]
        );
        let error = load(r#"[{name = "a", routing_keys = ["product.*"]}]"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("queues.routing_keys"), "{error}");
        assert!(load(r#"[{name = "a", routing_keys = ["0"]}]"#).is_err());
    }

    #[test]
    fn a_linger_over_a_second_is_refused_by_name() {
        let env: BTreeMap<String, String> = [(
            "CACHE_UPDATER__CONSUMER__LINGER_MS".to_string(),
            "5000".to_string(),
        )]
        .into();
        let error = fleet::config::load::<CacheUpdaterConfig>(&crate::SPEC, None, &env)
            .unwrap_err()
            .to_string();
        assert!(error.contains("consumer.linger_ms"), "{error}");
        let env: BTreeMap<String, String> = [(
            "CACHE_UPDATER__CONSUMER__LINGER_MS".to_string(),
            "0".to_string(),
        )]
        .into();
        let config: CacheUpdaterConfig = fleet::config::load(&crate::SPEC, None, &env).unwrap();
        assert_eq!(config.consumer.linger_ms, 0);
    }
}
