//! Values that must never reach a log line.

use std::fmt;

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// A connection URL whose password is redacted whenever it is printed.
///
/// The full URL is only available through [`RedactedUrl::expose`], for handing to a client.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(Url);

impl RedactedUrl {
    /// Parses a URL. The error never repeats the input, which may hold a password.
    pub fn parse(text: &str) -> Result<Self, InvalidUrl> {
        Url::parse(text)
            .map(Self)
            .map_err(|e| InvalidUrl(e.to_string()))
    }

    /// The URL with its password, for the client library only.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The URL scheme, such as `redis` or `amqps`.
    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// The parsed URL, password included.
    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            // Only fails for URLs that cannot have credentials, which then have none to hide.
            let _ = shown.set_password(Some("***"));
        }
        f.write_str(shown.as_str())
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedactedUrl({self})")
    }
}

impl<'de> Deserialize<'de> for RedactedUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        RedactedUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Why a URL was refused, without the URL itself.
#[derive(Debug, thiserror::Error)]
#[error("not a valid URL: {0}")]
pub struct InvalidUrl(String);

/// A string setting that may be a secret: printed as `***` unless its name says it is public.
///
/// Used for pass-through client properties, where any value could be a credential. Client
/// libraries take every property as text, so a number or a bool in the config (as TOML and
/// environment values are naturally written) is kept as its text: `8388608`, `true`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;

        impl serde::de::Visitor<'_> for Text {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or bool")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
        }

        deserializer.deserialize_any(Text)
    }
}

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Printed (`--check-config`) with its password masked, as in logs.
impl Serialize for RedactedUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Printed as `***`, as in logs.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// Client properties for printing: values of credentials ([`is_sensitive_property`]) masked,
/// the others shown, so that `security.protocol` and the like can be checked.
pub fn serialize_properties<S: Serializer>(
    properties: &BTreeMap<String, Secret>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(properties.iter().map(|(name, value)| {
        let shown = if is_sensitive_property(name) {
            "***"
        } else {
            value.expose()
        };
        (name, shown)
    }))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Whether a client property name suggests a credential (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.pem`).
pub fn is_sensitive_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "sasl.oauthbearer.config",
        "token",
    ]
    .iter()
    .any(|word| name.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_redacted_in_display_and_debug() {
        let url = RedactedUrl::parse("rediss://alice:s3cret@cache:6380/0").unwrap();
        assert_eq!(url.to_string(), "rediss://alice:***@cache:6380/0");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(url.expose(), "rediss://alice:s3cret@cache:6380/0");
    }

    #[test]
    fn url_without_password_is_shown_whole() {
        let url = RedactedUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!(url.to_string(), "redis://127.0.0.1:6379");
    }

    #[test]
    fn invalid_url_error_does_not_repeat_input() {
        let err = RedactedUrl::parse("amqp://bob:pa ss@[::1").unwrap_err();
        assert!(!err.to_string().contains("pa ss"));
    }

    #[test]
    fn secret_debug_hides_value() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "\"***\"");
        assert!(is_sensitive_property("sasl.password"));
        assert!(is_sensitive_property("ssl.key.password"));
        assert!(!is_sensitive_property("security.protocol"));
    }
}
