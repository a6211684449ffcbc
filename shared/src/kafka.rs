//! Kafka client settings and logging, through librdkafka.

use std::sync::LazyLock;
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::secret::is_sensitive_property;
use crate::telemetry::Repeats;

/// A librdkafka config with the brokers and every pass-through property set.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    client_config_with(config, &[])
}

/// Like [`client_config`], starting from a component's own defaults, which the configured
/// pass-through properties override.
pub fn client_config_with(config: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (name, value) in defaults {
        client.set(*name, *value);
    }
    client.set("bootstrap.servers", &config.brokers);
    for (name, value) in &config.properties {
        client.set(name, value.expose());
    }
    client
}

/// The fleet's Kafka client callbacks: librdkafka's errors and logs go to `tracing` at a level
/// that says whether the service copes with them by itself.
///
/// librdkafka reports an unreachable broker or a topic that does not exist yet as an error,
/// and retries on its own; the services report such outages on `/readyz` and wait. Logging
/// them at ERROR would page an operator for something that heals, so they are WARN. Errors
/// that need a person (fatal client errors, failed authentication or authorization, bad TLS)
/// stay ERROR.
#[derive(Debug, Clone, Copy, Default)]
pub struct FleetClientContext;

impl ClientContext for FleetClientContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_client_message(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }
}

/// For producers built on this context directly, such as the readiness probe, which sends
/// nothing. (`FutureProducer` wraps the context and handles deliveries itself.)
impl ProducerContext for FleetClientContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// For consumers that assign their partitions themselves, outside any group.
impl ConsumerContext for FleetClientContext {}

/// librdkafka's transient reports, shared by every client of the process: they report the
/// same outage alike.
static REPEATS: LazyLock<Repeats> = LazyLock::new(Repeats::default);

/// librdkafka's own log lines. Its error-level lines are about connections and brokers, which
/// it retries, so they are WARN; only its critical levels are ERROR.
pub fn log_client_message(level: RDKafkaLogLevel, facility: &str, message: &str) {
    if is_shared_property_notice(facility, message) {
        tracing::debug!(target: "librdkafka", facility, "{message}");
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
            if let Some(left_out) = REPEATS.admit(&format!("{facility} {message}"), Instant::now())
            {
                tracing::warn!(target: "librdkafka", facility, repeats_left_out = left_out, "{message}");
            }
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// librdkafka's notice that a property of the other client kind is ignored ("... is a
/// consumer property and will be ignored by this producer instance"). `kafka.properties`
/// configures every client a service creates, consumers and producers alike, so this is
/// expected and says nothing to act on.
fn is_shared_property_notice(facility: &str, message: &str) -> bool {
    facility == "CONFWARN"
        && (message.contains("is a consumer property and will be ignored by this producer")
            || message.contains("is a producer property and will be ignored by this consumer"))
}

/// An error librdkafka reports through its error callback.
pub fn log_client_error(error: &KafkaError, reason: &str) {
    if needs_a_person(error) {
        tracing::error!(target: "librdkafka", error = %error, "{reason}");
    } else if let Some(left_out) = REPEATS.admit(&format!("{error} {reason}"), Instant::now()) {
        tracing::warn!(target: "librdkafka", error = %error, repeats_left_out = left_out, "{reason}");
    }
}

/// Errors librdkafka does not recover from by retrying.
fn needs_a_person(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::InvalidArgument
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::UnsupportedSASLMechanism
        )
    )
}

/// The pass-through properties as `name=value` with credentials masked, for a start-up log.
pub fn describe_properties(config: &KafkaConfig) -> String {
    config
        .properties
        .iter()
        .map(|(name, value)| {
            if is_sensitive_property(name) {
                format!("{name}=***")
            } else {
                format!("{name}={}", value.expose())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn outages_are_warnings_and_what_needs_a_person_is_an_error() {
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
        ] {
            assert!(!needs_a_person(&KafkaError::Global(code)), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert!(needs_a_person(&KafkaError::Global(code)), "{code:?}");
        }
    }

    #[test]
    fn a_property_of_the_other_client_kind_is_not_a_warning() {
        assert!(is_shared_property_notice(
            "CONFWARN",
            "[thrd:app]: Configuration property session.timeout.ms is a consumer property and \
             will be ignored by this producer instance"
        ));
        assert!(is_shared_property_notice(
            "CONFWARN",
            "[thrd:app]: Configuration property linger.ms is a producer property and will be \
             ignored by this consumer instance"
        ));
        // Other configuration warnings still reach the user.
        assert!(!is_shared_property_notice(
            "CONFWARN",
            "[thrd:app]: Configuration property auto.commit.enable is deprecated"
        ));
        assert!(!is_shared_property_notice(
            "FAIL",
            "is a consumer property and will be ignored by this producer"
        ));
    }

    #[test]
    fn properties_pass_through_and_secrets_stay_hidden() {
        let mut config = KafkaConfig::default();
        config
            .properties
            .insert("security.protocol".into(), Secret::new("SASL_SSL"));
        config
            .properties
            .insert("sasl.password".into(), Secret::new("hunter2"));
        let client = client_config(&config);
        assert_eq!(client.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(client.get("sasl.password"), Some("hunter2"));
        let shown = describe_properties(&config);
        assert_eq!(shown, "sasl.password=***,security.protocol=SASL_SSL");
        config
            .properties
            .insert("session.timeout.ms".into(), Secret::new("6000"));
        let client = client_config_with(
            &config,
            &[("session.timeout.ms", "10000"), ("linger.ms", "5")],
        );
        assert_eq!(
            client.get("session.timeout.ms"),
            Some("6000"),
            "configured wins"
        );
        assert_eq!(client.get("linger.ms"), Some("5"));
    }
}
