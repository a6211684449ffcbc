//! Kafka client settings and health, through librdkafka.

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::secret::is_sensitive_property;

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
