//! The order-cacher configuration. See `docs/configuration.md` for every key and its env name.

use std::collections::BTreeSet;
use std::time::Duration;

use fleet::app::ServiceConfig;
pub use fleet::config::GuardConfig;
use fleet::config::{
    ConfigError, KafkaConfig, RedisConfig, RuntimeConfig, ShutdownConfig, TelemetryConfig, Validate,
};
use fleet::key_template::KeyTemplate;
use fleet::mapping::{EntityMapping, OriginMarker};
use serde::{Deserialize, Serialize};

/// Everything order-cacher can be told. Unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrderCacherConfig {
    /// Redis connection.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Kafka connection and librdkafka properties (applied after the consumer's defaults, so
    /// they can override them).
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Consumer group, batching and limits.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// The topics to consume and how each maps to cache keys.
    #[serde(default = "default_topics")]
    pub topics: Vec<TopicConfig>,
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

/// The consumer group and how messages are batched into Redis pipelines.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Kafka consumer group; replicas with the same group share the partitions.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Most messages written in one Redis pipeline.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a batch may wait to fill while the writer is busy, in milliseconds. When the
    /// writer is idle a batch is written at once, so a quiet stream is not delayed.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Most batches written to Redis at once. A batch overlaps the ones before it only when
    /// every write in it carries a version and it deletes nothing from an index: the version
    /// guard then makes the order in which Redis applies them irrelevant. Other batches are
    /// written alone, in order. 1 writes every batch alone.
    #[serde(default = "default_batches_in_flight")]
    pub batches_in_flight: usize,
    /// Largest message value accepted; larger ones are dead-lettered.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How often stored offsets are committed, in milliseconds. Offsets are also committed on
    /// partition revoke and on shutdown.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Attempts of a write that Redis refuses for a reason of its own (a corrupt stored
    /// version of its key, say), not an outage, before its message is dead-lettered with
    /// reason `write_refused`. Outages are waited out however long they last.
    #[serde(default = "default_write_attempts")]
    pub write_attempts: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            group_id: default_group_id(),
            batch_size: default_batch_size(),
            linger_ms: default_linger_ms(),
            batches_in_flight: default_batches_in_flight(),
            max_message_bytes: default_max_message_bytes(),
            commit_interval_ms: default_commit_interval_ms(),
            write_attempts: default_write_attempts(),
        }
    }
}

impl ConsumerConfig {
    /// The linger as a duration.
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

fn default_group_id() -> String {
    "order-cacher".into()
}

fn default_batch_size() -> usize {
    500
}

fn default_linger_ms() -> u64 {
    5
}

fn default_batches_in_flight() -> usize {
    3
}

fn default_max_message_bytes() -> usize {
    1024 * 1024
}

fn default_commit_interval_ms() -> u64 {
    1000
}

fn default_write_attempts() -> u32 {
    3
}

/// One topic and how its messages become cache entries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Kafka topic name.
    pub name: String,
    /// Redis key of each message, filled from its JSON fields.
    #[serde(default = "default_key_template")]
    pub key_template: KeyTemplate,
    /// Field holding the message's version (integer, digit string, RFC 3339 or
    /// `YYYY-MM-DD HH:MM:SS` read as UTC). With it, an
    /// older message never overwrites a newer one, and messages without it are dead-lettered.
    /// For tombstones (null values) the version is read from the header of the same name.
    #[serde(default)]
    pub version_field: Option<String>,
    /// Expiry of written entries, in seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Where bad messages go; default `<name>.dlq`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Secondary indexes kept next to each entry.
    #[serde(default)]
    pub indexes: Vec<IndexConfig>,
}

impl TopicConfig {
    /// The topic's mapping from payload to cache write.
    pub fn mapping(&self) -> EntityMapping {
        EntityMapping {
            key_template: self.key_template.clone(),
            version_field: self.version_field.clone(),
            ttl_secs: self.ttl_secs,
        }
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.name))
    }
}

fn default_key_template() -> KeyTemplate {
    KeyTemplate::parse("order:{order_id}").expect("default template parses")
}

fn default_topics() -> Vec<TopicConfig> {
    vec![TopicConfig {
        name: "orders".into(),
        key_template: default_key_template(),
        version_field: None,
        ttl_secs: None,
        dead_letter_topic: None,
        indexes: Vec::new(),
    }]
}

/// A sorted set per group of entries, such as a user's recent orders:
/// `ZREVRANGE user:u1:orders 0 9` then `MGET` of the members.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// The sorted set's key, filled from the message, such as `user:{user_id}:orders`.
    pub key_template: KeyTemplate,
    /// Each member; default: the entry's cache key (such as `order:1001`).
    #[serde(default)]
    pub member_template: Option<KeyTemplate>,
    /// Field holding the score: a number, an RFC 3339 timestamp or `YYYY-MM-DD HH:MM:SS`
    /// (UTC). Timestamps score as Unix seconds. Without the field, the message's Kafka
    /// timestamp is used.
    #[serde(default = "default_score_field")]
    pub score_field: String,
    /// Only the highest-scored entries are kept.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Expiry of the whole index, in seconds, renewed on every write.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

fn default_score_field() -> String {
    "timestamp".into()
}

fn default_max_entries() -> usize {
    100
}

impl Validate for OrderCacherConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        self.kafka.validate()?;
        let consumer = &self.consumer;
        if consumer.group_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "consumer.group_id",
                "must not be empty",
            ));
        }
        if !(1..=10_000).contains(&consumer.batch_size) {
            return Err(ConfigError::invalid(
                "consumer.batch_size",
                "must be from 1 to 10000",
            ));
        }
        if consumer.linger_ms > 60_000 {
            return Err(ConfigError::invalid(
                "consumer.linger_ms",
                "must be at most 60000",
            ));
        }
        if consumer.max_message_bytes == 0 {
            return Err(ConfigError::invalid(
                "consumer.max_message_bytes",
                "must be positive",
            ));
        }
        if consumer.batches_in_flight == 0 {
            return Err(ConfigError::invalid(
                "consumer.batches_in_flight",
                "must be positive",
            ));
        }
        if consumer.commit_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "consumer.commit_interval_ms",
                "must be positive",
            ));
        }
        if consumer.write_attempts == 0 {
            return Err(ConfigError::invalid(
                "consumer.write_attempts",
                "must be positive",
            ));
        }
        if self.topics.is_empty() {
            return Err(ConfigError::invalid("topics", "name at least one topic"));
        }
        let mut names = BTreeSet::new();
        for (i, topic) in self.topics.iter().enumerate() {
            if topic.name.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("topics[{i}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(topic.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("topics[{i}].name"),
                    format!("topic `{}` is listed twice", topic.name),
                ));
            }
            if topic.dead_letter_topic() == topic.name {
                return Err(ConfigError::invalid(
                    format!("topics[{i}].dead_letter_topic"),
                    "must differ from the topic itself",
                ));
            }
            if topic.version_field.as_deref().is_some_and(str::is_empty) {
                return Err(ConfigError::invalid(
                    format!("topics[{i}].version_field"),
                    "must not be empty",
                ));
            }
            for (j, index) in topic.indexes.iter().enumerate() {
                if index.max_entries == 0 {
                    return Err(ConfigError::invalid(
                        format!("topics[{i}].indexes[{j}].max_entries"),
                        "must be positive",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ServiceConfig for OrderCacherConfig {
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

    fn load_env(pairs: &[(&str, &str)]) -> Result<OrderCacherConfig, fleet::config::ConfigError> {
        let env: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        fleet::config::load(&crate::SPEC, None, &env)
    }

    #[test]
    fn topics_and_their_indexes_can_come_from_the_environment() {
        let config = load_env(&[(
            "ORDER_CACHER__TOPICS",
            r#"[{name = "orders-eu", key_template = "order:{id}", version_field = "version",
                 indexes = [{key_template = "user:{user_id}:orders", score_field = "ts"}]},
                {name = "orders-us", key_template = "order:{id}"}]"#,
        )])
        .unwrap();
        let names: Vec<&str> = config.topics.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["orders-eu", "orders-us"]);
        assert_eq!(config.topics[0].version_field.as_deref(), Some("version"));
        assert_eq!(config.topics[0].indexes[0].score_field, "ts");

        let error = load_env(&[(
            "ORDER_CACHER__TOPICS",
            r#"[{name = "o", key_templat = "order:{id}"}]"#,
        )])
        .unwrap_err()
        .to_string();
        assert!(error.contains("topics.0.key_templat"), "{error}");
        assert!(error.contains("ORDER_CACHER__TOPICS"), "{error}");
    }

    #[test]
    fn batches_in_flight_must_be_positive() {
        let config = load_env(&[("ORDER_CACHER__CONSUMER__BATCHES_IN_FLIGHT", "1")]).unwrap();
        assert_eq!(config.consumer.batches_in_flight, 1);
        let error = load_env(&[("ORDER_CACHER__CONSUMER__BATCHES_IN_FLIGHT", "0")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("consumer.batches_in_flight"), "{error}");
    }

    #[test]
    fn write_attempts_default_to_three_and_must_be_positive() {
        assert_eq!(load_env(&[]).unwrap().consumer.write_attempts, 3);
        let error = load_env(&[("ORDER_CACHER__CONSUMER__WRITE_ATTEMPTS", "0")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("consumer.write_attempts"), "{error}");
    }
}
