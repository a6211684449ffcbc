//! Layered configuration: defaults, then a TOML file, then the environment.
//!
//! Every service reads its own documented config struct through [`load`]. The layers, later
//! ones winning, are:
//! 1. the struct's defaults (and the service's default metrics port);
//! 2. a TOML file named by `--config PATH` or `CONFIG_FILE`;
//! 3. the fleet-wide short names `REDIS_URL`, `KAFKA_BROKERS`, `AMQP_URL`, `METRICS_ADDR` and
//!    `LOG_FORMAT`, each applied only when the service has that setting;
//! 4. `<SERVICE>__<SECTION>__<KEY>` for any other setting, for example
//!    `ORDER_CACHER__KAFKA__GROUP_ID` or `CACHE_UPDATER__SHUTDOWN__GRACE_PERIOD_SECS`.
//!
//! Unknown keys and invalid values fail with a [`ConfigError`] that names the key, which the
//! binaries print as one line before exiting with code 2.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::error::{Actual, Kind};
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::secret::{RedactedUrl, Secret};

/// Exit code of a binary that refused its configuration.
pub const CONFIG_EXIT_CODE: i32 = 2;

/// Identity of a service, used for its env prefix, metric names and defaults.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Kebab-case service name, such as `order-cacher`.
    pub name: &'static str,
    /// Port of the metrics and health server when `METRICS_ADDR` is not set.
    pub default_metrics_port: u16,
    /// Which fleet-wide short env names this service takes.
    pub short_env: &'static [ShortEnv],
    /// Worker threads when `runtime.worker_threads` is not set; 0 means one per CPU core.
    pub default_worker_threads: usize,
}

impl ServiceSpec {
    /// Prefix of the service's env variables: `ORDER_CACHER__` for `order-cacher`.
    pub fn env_prefix(&self) -> String {
        format!("{}__", self.name.to_uppercase().replace('-', "_"))
    }

    /// Metric namespace: `order_cacher` for `order-cacher`.
    pub fn metric_namespace(&self) -> String {
        self.name.replace('-', "_")
    }
}

/// The short env names shared by the whole fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortEnv {
    /// `REDIS_URL` sets `redis.url`.
    RedisUrl,
    /// `KAFKA_BROKERS` sets `kafka.brokers`.
    KafkaBrokers,
    /// `AMQP_URL` sets `amqp.url`.
    AmqpUrl,
}

impl ShortEnv {
    fn var(self) -> &'static str {
        match self {
            ShortEnv::RedisUrl => "REDIS_URL",
            ShortEnv::KafkaBrokers => "KAFKA_BROKERS",
            ShortEnv::AmqpUrl => "AMQP_URL",
        }
    }

    fn key(self) -> &'static str {
        match self {
            ShortEnv::RedisUrl => "redis.url",
            ShortEnv::KafkaBrokers => "kafka.brokers",
            ShortEnv::AmqpUrl => "amqp.url",
        }
    }
}

/// A configuration that could not be accepted. Its `Display` is one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key had a value of the wrong type or form, or was not a known key.
    #[error("config error: key `{key}`{origin}: {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
    /// The config file could not be read or parsed.
    #[error("config error: file `{path}`: {message}")]
    File { path: PathBuf, message: String },
}

impl ConfigError {
    /// An invalid value found by a service's own checks after deserialization.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            origin: String::new(),
            message: message.into(),
        }
    }
}

/// A config struct that can check itself beyond what its types enforce.
pub trait Validate {
    /// Returns the first invalid setting, naming its key.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Loads `T` from the layers described in the module docs.
///
/// `config_file` comes from `--config` or `CONFIG_FILE`; `env` is the process environment,
/// passed in so tests need not mutate it.
pub fn load<T>(
    spec: &ServiceSpec,
    config_file: Option<&std::path::Path>,
    env: &BTreeMap<String, String>,
) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    let mut figment = Figment::new().merge(Serialized::default(
        "telemetry.metrics_addr",
        SocketAddr::from(([127, 0, 0, 1], spec.default_metrics_port)),
    ));

    if let Some(path) = config_file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // Parse up front so a syntax error names the file rather than a key.
        text.parse::<toml::Table>().map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: one_line(e.message()),
        })?;
        figment = figment.merge(Toml::file(path));
    }

    let mut short: Vec<(&str, &str)> = spec.short_env.iter().map(|s| (s.var(), s.key())).collect();
    short.push(("METRICS_ADDR", "telemetry.metrics_addr"));
    short.push(("LOG_FORMAT", "telemetry.log_format"));
    for (var, key) in short {
        if let Some(value) = env.get(var) {
            figment = figment.merge(EnvVar::new(var, key, value.as_str().into()));
        }
    }

    let prefix = spec.env_prefix();
    for (var, value) in env.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        let key = var[prefix.len()..].to_lowercase().replace("__", ".");
        // Values are parsed like TOML scalars, so `true` and `5` arrive as bool and int.
        let parsed: Value = value.parse().unwrap_or_else(|never| match never {});
        figment = figment.merge(EnvVar::new(var, &key, parsed));
    }

    let config: T = figment.extract().map_err(from_figment)?;
    config.validate()?;
    Ok(config)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One environment variable as a figment layer, named after the variable so errors say
/// where a bad value came from.
struct EnvVar {
    var: String,
    data: Value,
}

impl EnvVar {
    fn new(var: &str, key: &str, value: Value) -> Self {
        // librdkafka property names are dotted; in env names their dots are written `_`.
        let data = match key.strip_prefix("kafka.properties.") {
            Some(property) => {
                let mut map = figment::value::Dict::new();
                map.insert(property.replace('_', "."), value);
                figment::util::nest("kafka.properties", map.into())
            }
            None => figment::util::nest(key, value),
        };
        Self {
            var: var.to_string(),
            data,
        }
    }
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.var.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.data).data()
    }
}

fn from_figment(err: figment::Error) -> ConfigError {
    let err = err
        .into_iter()
        .next()
        .expect("a figment error holds one error");
    let path = &err.path;
    let origin = err
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    // Say what kind of value was wrong, never the value: it may be a password.
    let hide = |actual: &Actual| match actual {
        Actual::Str(_) => "a string".to_string(),
        Actual::Bytes(_) => "bytes".to_string(),
        other => other.to_string(),
    };
    let message = match &err.kind {
        Kind::InvalidType(actual, expected) => {
            format!("invalid type: found {}, expected {expected}", hide(actual))
        }
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value: found {}, expected {expected}", hide(actual))
        }
        other => other.to_string(),
    };
    ConfigError::Invalid {
        key: path.join("."),
        origin,
        message,
    }
}

/// Where a service's Redis is and how to talk to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://` for TLS. ACL users go in the user part.
    #[serde(default = "default_redis_url")]
    pub url: RedactedUrl,
    /// PEM file of a CA that signs the server's certificate, for `rediss://` with a private CA.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Connect timeout in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Timeout of one command or pipeline in milliseconds.
    #[serde(default = "default_redis_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Redis Cluster: `url` names one node, from which the client learns the others and
    /// follows slot moves. The version guard then keeps every transaction on one hash slot.
    #[serde(default)]
    pub cluster: bool,
    /// More cluster nodes to start from besides `url`. The client reconnects through these
    /// seeds when it has lost track of the cluster, so list more than one: a single seed that
    /// is down (a failed-over master, say) leaves it unable to reconnect.
    #[serde(default)]
    pub cluster_nodes: Vec<RedactedUrl>,
    /// Redis Sentinel: the name of the master that `sentinels` watch. The service asks them
    /// where that master is and connects there with `url`'s scheme, credentials and database
    /// (`url`'s host and port are not used). It asks again when writes keep failing or the
    /// server it holds is no longer a master, as after a failover.
    #[serde(default)]
    pub sentinel_master: Option<String>,
    /// The sentinels to ask, in order: `redis://[user:password@]host:port` each, with the
    /// sentinels' own credentials if they have any. List them all: one that is down is skipped.
    #[serde(default)]
    pub sentinels: Vec<RedactedUrl>,
    /// Replicas that must hold a batch's writes (Redis `WAIT`) before its messages are acked
    /// or committed. Redis replicates asynchronously, so a master that dies can take writes
    /// it already confirmed with it; with `WAIT`, such a batch is written again instead. 0
    /// (the default) does not wait.
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long one `WAIT` may take, in milliseconds; a batch too few replicas confirmed in
    /// time is written again.
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
}

fn default_wait_timeout_ms() -> u64 {
    1_000
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis_url(),
            tls_ca_file: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            response_timeout_ms: default_redis_response_timeout_ms(),
            cluster: false,
            cluster_nodes: Vec::new(),
            sentinel_master: None,
            sentinels: Vec::new(),
            wait_replicas: 0,
            wait_timeout_ms: default_wait_timeout_ms(),
        }
    }
}

fn default_redis_url() -> RedactedUrl {
    RedactedUrl::parse("redis://127.0.0.1:6379").expect("default Redis URL parses")
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_redis_response_timeout_ms() -> u64 {
    5_000
}

impl RedisConfig {
    /// Checks the URL scheme, and that a cluster is reached over TCP, in database 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.url.scheme() {
            "redis" | "rediss" | "unix" | "redis+unix" => {}
            other => {
                return Err(ConfigError::invalid(
                    "redis.url",
                    format!("unsupported scheme `{other}`, expected redis:// or rediss://"),
                ))
            }
        }
        self.validate_sentinel()?;
        if !self.cluster {
            if !self.cluster_nodes.is_empty() {
                return Err(ConfigError::invalid(
                    "redis.cluster_nodes",
                    "set only with redis.cluster = true",
                ));
            }
            return Ok(());
        }
        for (key, url) in std::iter::once(("redis.url", &self.url)).chain(
            self.cluster_nodes
                .iter()
                .map(|u| ("redis.cluster_nodes", u)),
        ) {
            if !matches!(url.scheme(), "redis" | "rediss") {
                return Err(ConfigError::invalid(
                    key,
                    "a Redis Cluster node is reached by redis:// or rediss://",
                ));
            }
            let db = url.url().path().trim_start_matches('/');
            if !(db.is_empty() || db == "0") {
                return Err(ConfigError::invalid(
                    key,
                    format!("database `{db}` selected, but a Redis Cluster has only database 0"),
                ));
            }
        }
        if self.tls_ca_file.is_some() {
            return Err(ConfigError::invalid(
                "redis.tls_ca_file",
                "not supported with redis.cluster; the cluster's certificates must chain to the system's roots",
            ));
        }
        Ok(())
    }
}

impl RedisConfig {
    /// Whether the server behind this config can change under the service (a cluster's
    /// failover or slot move, or a failover Sentinel makes), so that a connection that keeps
    /// failing is built anew from the config rather than only reconnected.
    pub fn follows_failovers(&self) -> bool {
        self.cluster || self.sentinel_master.is_some()
    }

    fn validate_sentinel(&self) -> Result<(), ConfigError> {
        match (&self.sentinel_master, self.sentinels.is_empty()) {
            (None, true) => return Ok(()),
            (None, false) => {
                return Err(ConfigError::invalid(
                    "redis.sentinels",
                    "set only with redis.sentinel_master",
                ))
            }
            (Some(_), true) => {
                return Err(ConfigError::invalid(
                    "redis.sentinel_master",
                    "needs redis.sentinels, the sentinels to ask",
                ))
            }
            (Some(name), false) if name.trim().is_empty() => {
                return Err(ConfigError::invalid("redis.sentinel_master", "is empty"))
            }
            (Some(_), false) => {}
        }
        if self.cluster {
            return Err(ConfigError::invalid(
                "redis.sentinel_master",
                "a Redis Cluster fails over by itself; set either redis.cluster or redis.sentinel_master",
            ));
        }
        if !matches!(self.url.scheme(), "redis" | "rediss") {
            return Err(ConfigError::invalid(
                "redis.url",
                "with redis.sentinel_master the master is reached over TCP: redis:// or rediss://",
            ));
        }
        if let Some(bad) = self
            .sentinels
            .iter()
            .find(|url| !matches!(url.scheme(), "redis" | "rediss"))
        {
            return Err(ConfigError::invalid(
                "redis.sentinels",
                format!(
                    "unsupported scheme `{}`, expected redis:// or rediss://",
                    bad.scheme()
                ),
            ));
        }
        Ok(())
    }
}

/// Where the Kafka cluster is, plus any librdkafka property.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap brokers.
    #[serde(default = "default_kafka_brokers")]
    pub brokers: String,
    /// librdkafka properties passed through as they are, for example `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password` or `ssl.ca.location`.
    /// Values of properties whose name contains `password` or `secret` are never logged.
    #[serde(default, serialize_with = "crate::secret::serialize_properties")]
    pub properties: BTreeMap<String, Secret>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_kafka_brokers(),
            properties: BTreeMap::new(),
        }
    }
}

fn default_kafka_brokers() -> String {
    "127.0.0.1:9092".to_string()
}

impl KafkaConfig {
    /// Checks that brokers are given.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "must not be empty"));
        }
        if self.properties.contains_key("bootstrap.servers") {
            return Err(ConfigError::invalid(
                "kafka.properties.bootstrap.servers",
                "set kafka.brokers instead",
            ));
        }
        Ok(())
    }
}

/// Where RabbitMQ is.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` or `amqps://` for TLS.
    #[serde(default = "default_amqp_url")]
    pub url: RedactedUrl,
    /// PEM file of a CA that signs the server's certificate, for `amqps://` with a private CA.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: default_amqp_url(),
            tls_ca_file: None,
        }
    }
}

fn default_amqp_url() -> RedactedUrl {
    RedactedUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("default AMQP URL parses")
}

impl AmqpConfig {
    /// Checks the URL scheme.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.url.scheme() {
            "amqp" | "amqps" => Ok(()),
            other => Err(ConfigError::invalid(
                "amqp.url",
                format!("unsupported scheme `{other}`, expected amqp:// or amqps://"),
            )),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// Logs, metrics and health.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: SocketAddr,
    /// `json` or `text`. The filter comes from `RUST_LOG` (default `info`).
    #[serde(default)]
    pub log_format: LogFormat,
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Seconds that in-flight work has to finish after SIGTERM or SIGINT before the process
    /// gives up and exits non-zero.
    #[serde(default = "default_grace_period_secs")]
    pub grace_period_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period_secs: default_grace_period_secs(),
        }
    }
}

impl ShutdownConfig {
    /// The grace period as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}

/// The async runtime (`[runtime]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run the service's tasks; 0 means one per CPU core. Unset, the service's
    /// own default applies (see `docs/configuration.md`).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl RuntimeConfig {
    /// The worker threads to start, given the service's default; `None` means one per core.
    pub fn worker_threads(&self, spec: &ServiceSpec) -> Option<usize> {
        Some(self.worker_threads.unwrap_or(spec.default_worker_threads)).filter(|&n| n > 0)
    }
}

/// How long the version guard remembers deletes (`[version_guard]`, for the consumers).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// How long a versioned delete's tombstone blocks older upserts, in seconds (0 keeps
    /// tombstones forever). Should exceed the longest a message can be late.
    #[serde(default = "default_tombstone_ttl_secs")]
    pub tombstone_ttl_secs: u64,
    /// Every batch in the inline form (always so on a cluster): each script call writes only
    /// what applies, so a stale or duplicate write leaves no trace at all: no keyspace events,
    /// no client-side-caching invalidations, no aborted `WATCH`. Off, large batches on one
    /// server go as a transaction that writes every value and puts back the refused ones,
    /// which costs Redis less (see docs/version-guard.md).
    #[serde(default)]
    pub inline_values: bool,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            tombstone_ttl_secs: default_tombstone_ttl_secs(),
            inline_values: false,
        }
    }
}

impl GuardConfig {
    /// The tombstone lifetime as a duration.
    pub fn tombstone_ttl(&self) -> Duration {
        Duration::from_secs(self.tombstone_ttl_secs)
    }

    /// The guard a consumer writes through, with script calls as large as its batches, in
    /// cluster mode when Redis is a cluster.
    pub fn version_guard(
        &self,
        entries_per_call: usize,
        redis: &RedisConfig,
    ) -> crate::version_guard::VersionGuard {
        crate::version_guard::VersionGuard::new(self.tombstone_ttl())
            .with_entries_per_call(entries_per_call)
            .with_cluster_slots(redis.cluster)
            .with_inline_values(redis.cluster || self.inline_values)
            .with_inline_below(crate::version_guard::INLINE_BELOW)
    }
}

fn default_tombstone_ttl_secs() -> u64 {
    7 * 24 * 3600
}

fn default_grace_period_secs() -> u64 {
    30
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TestConfig {
        #[serde(default)]
        redis: RedisConfig,
        #[serde(default)]
        kafka: KafkaConfig,
        telemetry: TelemetryConfig,
        #[serde(default)]
        shutdown: ShutdownConfig,
        #[serde(default)]
        runtime: RuntimeConfig,
        #[serde(default = "five")]
        batch_size: usize,
    }

    fn five() -> usize {
        5
    }

    impl Validate for TestConfig {
        fn validate(&self) -> Result<(), ConfigError> {
            self.redis.validate()?;
            self.kafka.validate()
        }
    }

    const SPEC: ServiceSpec = ServiceSpec {
        name: "test-svc",
        default_metrics_port: 9999,
        short_env: &[ShortEnv::RedisUrl, ShortEnv::KafkaBrokers],
        default_worker_threads: 1,
    };

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_env(pairs: &[(&str, &str)]) -> Result<TestConfig, ConfigError> {
        load(&SPEC, None, &env(pairs))
    }

    #[test]
    fn defaults_apply_without_any_input() {
        let c = load_env(&[]).unwrap();
        assert_eq!(c.telemetry.metrics_addr.port(), 9999);
        assert_eq!(c.redis.url.scheme(), "redis");
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.batch_size, 5);
        assert_eq!(c.telemetry.log_format, LogFormat::Json);
    }

    #[test]
    fn worker_threads_fall_back_to_the_service_default_and_zero_means_per_core() {
        let c = load_env(&[]).unwrap();
        assert_eq!(c.runtime.worker_threads(&SPEC), Some(1));
        let c = load_env(&[("TEST_SVC__RUNTIME__WORKER_THREADS", "3")]).unwrap();
        assert_eq!(c.runtime.worker_threads(&SPEC), Some(3));
        let c = load_env(&[("TEST_SVC__RUNTIME__WORKER_THREADS", "0")]).unwrap();
        assert_eq!(c.runtime.worker_threads(&SPEC), None);
        let e = load_env(&[("TEST_SVC__RUNTIME__WORKER_THREADS", "-1")]).unwrap_err();
        assert!(e.to_string().contains("`runtime.worker_threads`"), "{e}");
    }

    #[test]
    fn short_and_prefixed_env_names_set_values() {
        let c = load_env(&[
            ("REDIS_URL", "redis://alice:pw@10.0.0.1:6380/2"),
            ("KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("METRICS_ADDR", "0.0.0.0:9200"),
            ("LOG_FORMAT", "text"),
            ("TEST_SVC__BATCH_SIZE", "64"),
            ("TEST_SVC__SHUTDOWN__GRACE_PERIOD_SECS", "7"),
            ("TEST_SVC__KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ("AMQP_URL", "amqp://ignored-because-the-service-has-no-amqp"),
        ])
        .unwrap();
        assert_eq!(c.redis.url.expose(), "redis://alice:pw@10.0.0.1:6380/2");
        assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(c.telemetry.metrics_addr.port(), 9200);
        assert_eq!(c.telemetry.log_format, LogFormat::Text);
        assert_eq!(c.batch_size, 64);
        assert_eq!(c.shutdown.grace_period_secs, 7);
        assert_eq!(c.kafka.properties["sasl.password"].expose(), "hunter2");
    }

    /// Writes `text` to a config file in a directory of its own.
    fn config_file(dir: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("{dir}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        let path = config_file(
            "fleet-config",
            "batch_size = 10\n[shutdown]\ngrace_period_secs = 3\n",
        );
        let c: TestConfig =
            load(&SPEC, Some(&path), &env(&[("TEST_SVC__BATCH_SIZE", "11")])).unwrap();
        assert_eq!(c.batch_size, 11);
        assert_eq!(c.shutdown.grace_period_secs, 3);
    }

    #[test]
    fn kafka_properties_may_be_numbers_and_bools_and_pass_as_text() {
        let path = config_file(
            "fleet-props",
            "[kafka.properties]\n\"max.partition.fetch.bytes\" = 8388608\n\"enable.idempotence\" = true\n\"retry.backoff.ms\" = \"150\"\n",
        );
        let c: TestConfig = load(
            &SPEC,
            Some(&path),
            &env(&[("TEST_SVC__KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS", "20")]),
        )
        .unwrap();
        let text = |name: &str| c.kafka.properties[name].expose().to_string();
        assert_eq!(text("max.partition.fetch.bytes"), "8388608");
        assert_eq!(text("enable.idempotence"), "true");
        assert_eq!(text("retry.backoff.ms"), "150");
        assert_eq!(text("fetch.wait.max.ms"), "20");
        let err = load_env(&[("TEST_SVC__KAFKA__PROPERTIES__ACKS", "[1]")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`kafka.properties.acks`"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_env(&[("TEST_SVC__REDIS__URLL", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`redis.urll`"), "{err}");
        assert!(err.contains("TEST_SVC__REDIS__URLL"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let err = load_env(&[("TEST_SVC__BATCH_SIZE", "many")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`batch_size`"), "{err}");
        let err = load_env(&[("METRICS_ADDR", "nowhere")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`telemetry.metrics_addr`"), "{err}");
        assert!(err.contains("METRICS_ADDR"), "{err}");
        let err = load_env(&[("REDIS_URL", "http://x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`redis.url`"), "{err}");
        let err = load_env(&[("REDIS_URL", "not a url")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`redis.url`"), "{err}");
        assert!(
            !err.contains("not a url"),
            "the raw value may hold a secret: {err}"
        );
        let err = load_env(&[("LOG_FORMAT", "xml")]).unwrap_err().to_string();
        assert!(err.contains("`telemetry.log_format`"), "{err}");
    }

    #[test]
    fn a_cluster_is_reached_over_tcp_in_database_0() {
        let c = load_env(&[
            ("REDIS_URL", "redis://10.0.0.1:7000"),
            ("TEST_SVC__REDIS__CLUSTER", "true"),
        ])
        .unwrap();
        assert!(c.redis.cluster);
        for (url, key) in [
            ("redis://10.0.0.1:7000/2", "`redis.url`"),
            ("unix:///tmp/redis.sock", "`redis.url`"),
        ] {
            let err = load_env(&[("REDIS_URL", url), ("TEST_SVC__REDIS__CLUSTER", "true")])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{url}: {err}");
        }
        let err = load_env(&[
            ("TEST_SVC__REDIS__CLUSTER", "true"),
            ("TEST_SVC__REDIS__TLS_CA_FILE", "/etc/ca.pem"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("`redis.tls_ca_file`"), "{err}");
        let c = load_env(&[
            ("TEST_SVC__REDIS__CLUSTER", "true"),
            (
                "TEST_SVC__REDIS__CLUSTER_NODES",
                r#"["redis://10.0.0.2:7000", "redis://10.0.0.3:7000"]"#,
            ),
        ])
        .unwrap();
        assert_eq!(c.redis.cluster_nodes.len(), 2);
        let err = load_env(&[
            ("TEST_SVC__REDIS__CLUSTER", "true"),
            (
                "TEST_SVC__REDIS__CLUSTER_NODES",
                r#"["redis://10.0.0.2:7000/3"]"#,
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("`redis.cluster_nodes`"), "{err}");
        let err = load_env(&[(
            "TEST_SVC__REDIS__CLUSTER_NODES",
            r#"["redis://10.0.0.2:7000"]"#,
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("`redis.cluster_nodes`"), "{err}");
        // Without cluster mode, a database number is fine.
        load_env(&[("REDIS_URL", "redis://10.0.0.1:7000/2")]).unwrap();
    }

    #[test]
    fn sentinel_mode_needs_a_master_name_and_sentinels_and_excludes_a_cluster() {
        let sentinels = (
            "TEST_SVC__REDIS__SENTINELS",
            r#"["redis://10.0.0.5:26379", "redis://10.0.0.6:26379"]"#,
        );
        let master = ("TEST_SVC__REDIS__SENTINEL_MASTER", "cache");
        let c = load_env(&[sentinels, master, ("REDIS_URL", "redis://:pw@master/2")]).unwrap();
        assert_eq!(c.redis.sentinel_master.as_deref(), Some("cache"));
        assert_eq!(c.redis.sentinels.len(), 2);
        assert!(c.redis.follows_failovers());
        for (env, key) in [
            (vec![sentinels], "`redis.sentinels`"),
            (vec![master], "`redis.sentinel_master`"),
            (
                vec![sentinels, ("TEST_SVC__REDIS__SENTINEL_MASTER", " ")],
                "`redis.sentinel_master`",
            ),
            (
                vec![sentinels, master, ("TEST_SVC__REDIS__CLUSTER", "true")],
                "`redis.sentinel_master`",
            ),
            (
                vec![sentinels, master, ("REDIS_URL", "unix:///tmp/redis.sock")],
                "`redis.url`",
            ),
            (
                vec![
                    ("TEST_SVC__REDIS__SENTINELS", r#"["http://10.0.0.5:26379"]"#),
                    master,
                ],
                "`redis.sentinels`",
            ),
        ] {
            let err = load_env(&env).unwrap_err().to_string();
            assert!(err.contains(key), "{env:?}: {err}");
        }
        assert!(!load_env(&[]).unwrap().redis.follows_failovers());
    }

    #[test]
    fn bad_file_is_named() {
        let dir = std::env::temp_dir().join(format!("fleet-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "batch_size = [").unwrap();
        let err = load::<TestConfig>(&SPEC, Some(&path), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let err = load::<TestConfig>(&SPEC, Some(&dir.join("missing.toml")), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn inline_values_is_off_by_default_and_always_on_for_a_cluster() {
        let guard = |inline_values: bool, cluster: bool| {
            let config = GuardConfig {
                inline_values,
                ..GuardConfig::default()
            };
            let redis = RedisConfig {
                cluster,
                ..RedisConfig::default()
            };
            format!("{:?}", config.version_guard(500, &redis))
        };
        assert!(guard(false, false).contains("inline_values: false"));
        assert!(guard(true, false).contains("inline_values: true"));
        assert!(guard(false, true).contains("inline_values: true"));
        assert!(!GuardConfig::default().inline_values);
    }
}
