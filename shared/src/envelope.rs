//! The change envelope that services exchange, and the errors of reading any payload.

use serde::de::MapAccess;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::payload::{parse_with, ObjectReader, PayloadFields, Text};
use crate::version::{Version, VersionError};

/// What a change does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    /// Write `value` if `version` is newer than the stored one.
    Upsert,
    /// Delete the key if `version` is newer, leaving a versioned tombstone.
    Delete,
}

/// A change to one cache entry, as published on Kafka or RabbitMQ:
/// `{"op": "upsert", "key": "user:1", "value": {...}, "version": 7, "ttl_secs": 60,
///   "source": "redis", "ts": 1700000000000}`.
///
/// `value` is kept as raw JSON text so it is stored byte for byte as it arrived.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeEnvelope {
    /// Upsert or delete.
    pub op: ChangeOp,
    /// The Redis key.
    pub key: String,
    /// The JSON value to store; required for upserts, ignored for deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<RawValue>>,
    /// Orders changes to the key. Without it the write is last-writer-wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// Expiry of the written entry, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Which system produced the change, such as `redis`; used to stop two-way sync loops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// When the change happened, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
}

impl ChangeEnvelope {
    /// Parses and checks an envelope from a message body.
    pub fn from_slice(body: &[u8], max_bytes: usize) -> Result<Self, PayloadError> {
        check_size(body, max_bytes)?;
        let envelope: ChangeEnvelope =
            serde_json::from_slice(body).map_err(|e| PayloadError::from_json_error(&e))?;
        if envelope.key.is_empty() {
            return Err(PayloadError::InvalidField {
                field: "key".into(),
                reason: "must not be empty".into(),
            });
        }
        if envelope.op == ChangeOp::Upsert && envelope.value.is_none() {
            return Err(PayloadError::MissingField {
                field: "value".into(),
            });
        }
        Ok(envelope)
    }
}

/// Why a message body could not be used. Each variant maps to a dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The body is not JSON, or not the JSON shape expected.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not an object.
    #[error("payload must be a JSON object")]
    NotObject,
    /// A required field is absent.
    #[error("missing field `{field}`")]
    MissingField { field: String },
    /// A field has a value that cannot be used.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: String, reason: String },
    /// The version field cannot be read.
    #[error("invalid version field `{field}`: {source}")]
    InvalidVersion { field: String, source: VersionError },
    /// The body is larger than allowed.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl PayloadError {
    /// Every [`PayloadError::reason`], so that metrics can show each one from the start: a
    /// counter that first appears at 1 hides its first increase from `rate()` and alerts.
    pub const REASONS: [&'static str; 6] = [
        "not_json",
        "not_object",
        "missing_field",
        "invalid_field",
        "invalid_version",
        "too_large",
    ];

    /// A fixed, low-cardinality name for metrics labels and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::NotJson(_) => "not_json",
            PayloadError::NotObject => "not_object",
            PayloadError::MissingField { .. } => "missing_field",
            PayloadError::InvalidField { .. } => "invalid_field",
            PayloadError::InvalidVersion { .. } => "invalid_version",
            PayloadError::TooLarge { .. } => "too_large",
        }
    }

    fn from_json_error(e: &serde_json::Error) -> Self {
        // serde_json names missing fields in its message; keep that as a typed error.
        let text = e.to_string();
        if let Some(rest) = text.strip_prefix("missing field `") {
            if let Some(field) = rest.split('`').next() {
                return PayloadError::MissingField {
                    field: field.to_string(),
                };
            }
        }
        PayloadError::NotJson(text)
    }
}

/// Refuses a body over `max_bytes`, before any parsing is spent on it.
pub fn check_size(body: &[u8], max_bytes: usize) -> Result<(), PayloadError> {
    if body.len() > max_bytes {
        return Err(PayloadError::TooLarge {
            size: body.len(),
            limit: max_bytes,
        });
    }
    Ok(())
}

/// Parses a plain entity payload, such as `{"order_id": "1001", "amount": 299.99}`. A decoder
/// that reads only a few of its fields has the lighter [`crate::payload::parse_fields`].
pub fn parse_object(body: &[u8], max_bytes: usize) -> Result<Map<String, Value>, PayloadError> {
    check_size(body, max_bytes)?;
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(PayloadError::NotObject),
        Err(e) => Err(PayloadError::NotJson(e.to_string())),
    }
}

/// A JSON object read in one pass by [`parse_object_keeping_raw`].
#[derive(Debug)]
pub struct ObjectWithRaw<'a, const N: usize> {
    /// Every top-level field except the raw ones.
    pub fields: Map<String, Value>,
    /// The raw fields' JSON text, byte for byte, in the order they were asked for; `None`
    /// where the object lacks one.
    pub raw: [Option<&'a RawValue>; N],
}

/// Parses an object like [`parse_object`], but keeps the top-level fields named in `raw` as
/// their JSON text instead of building values from them: for a message that carries a value
/// to store as it is, this reads the message once.
pub fn parse_object_keeping_raw<'a, const N: usize>(
    body: &'a [u8],
    max_bytes: usize,
    raw: [&str; N],
) -> Result<ObjectWithRaw<'a, N>, PayloadError> {
    parse_with(body, max_bytes, KeepingRaw { raw })
}

/// Reads every field of an object, the ones named in `raw` as their JSON text.
struct KeepingRaw<'w, const N: usize> {
    raw: [&'w str; N],
}

impl<'de, const N: usize> ObjectReader<'de> for KeepingRaw<'_, N> {
    type Object = ObjectWithRaw<'de, N>;

    fn read<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Object, A::Error> {
        let mut fields = Map::new();
        let mut raw = [None; N];
        while let Some(Text(name)) = map.next_key()? {
            if let Some(i) = self.raw.iter().position(|wanted| **wanted == *name) {
                raw[i] = Some(map.next_value::<&'de RawValue>()?);
            } else {
                fields.insert(name.into_owned(), map.next_value()?);
            }
        }
        Ok(ObjectWithRaw { fields, raw })
    }
}

/// Reads an optional version from a field of a plain payload.
pub fn version_field(
    payload: &impl PayloadFields,
    field: &str,
) -> Result<Option<Version>, PayloadError> {
    match payload.field(field) {
        None => Ok(None),
        Some(value) if value.is_null() => Ok(None),
        Some(value) => {
            Version::from_field(value)
                .map(Some)
                .map_err(|source| PayloadError::InvalidVersion {
                    field: field.to_string(),
                    source,
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed() {
        let errors = [
            PayloadError::NotJson(String::new()),
            PayloadError::NotObject,
            PayloadError::MissingField { field: "f".into() },
            PayloadError::InvalidField {
                field: "f".into(),
                reason: "r".into(),
            },
            PayloadError::InvalidVersion {
                field: "f".into(),
                source: crate::version::VersionError::Unparsable,
            },
            PayloadError::TooLarge { size: 2, limit: 1 },
        ];
        let reasons: Vec<&str> = errors.iter().map(PayloadError::reason).collect();
        assert_eq!(reasons, PayloadError::REASONS);
    }

    #[test]
    fn parse_object_keeping_raw_reads_every_field_once() {
        let body = br#"{"a": 1, "v": {"x": [1, 2]}, "b": "s", "v": [ 3 ], "n": null}"#;
        let object = parse_object_keeping_raw(body, 1024, ["v", "w"]).unwrap();
        let full = parse_object(body, 1024).unwrap();
        // The last of duplicate fields wins, as in parse_object.
        assert_eq!(object.raw[0].map(RawValue::get), Some("[ 3 ]"));
        assert!(object.raw[1].is_none());
        assert_eq!(object.fields.len(), 3);
        for name in ["a", "b", "n"] {
            assert_eq!(object.fields[name], full[name]);
        }
        for bad in [&b"[1]"[..], b"7", b"null"] {
            assert!(matches!(
                parse_object_keeping_raw(bad, 1024, ["v"]),
                Err(PayloadError::NotObject)
            ));
        }
        assert!(matches!(
            parse_object_keeping_raw(br#"{"v": [1,}"#, 1024, ["v"]),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            parse_object_keeping_raw(br#"{"v": 1} x"#, 1024, ["v"]),
            Err(PayloadError::NotJson(_))
        ));
    }

    #[test]
    fn envelope_round_trips_and_keeps_value_bytes() {
        let body = br#"{"op":"upsert","key":"user:1","value":{"b":1, "a":2},"version":7,"ttl_secs":60,"source":"redis","ts":1700000000000}"#;
        let e = ChangeEnvelope::from_slice(body, 1024).unwrap();
        assert_eq!(e.op, ChangeOp::Upsert);
        assert_eq!(e.key, "user:1");
        assert_eq!(e.value.as_ref().unwrap().get(), r#"{"b":1, "a":2}"#);
        assert_eq!(e.version, Some(Version::new(7)));
        assert_eq!(e.ttl_secs, Some(60));
        assert_eq!(e.source.as_deref(), Some("redis"));
        let again = serde_json::to_vec(&e).unwrap();
        let e2 = ChangeEnvelope::from_slice(&again, 1024).unwrap();
        assert_eq!(e2.version, e.version);
    }

    #[test]
    fn envelope_errors_are_typed() {
        assert!(matches!(
            ChangeEnvelope::from_slice(b"not json", 1024),
            Err(PayloadError::NotJson(_))
        ));
        assert_eq!(
            ChangeEnvelope::from_slice(br#"{"op":"upsert","value":1}"#, 1024).unwrap_err(),
            PayloadError::MissingField {
                field: "key".into()
            }
        );
        assert_eq!(
            ChangeEnvelope::from_slice(br#"{"op":"upsert","key":"k"}"#, 1024).unwrap_err(),
            PayloadError::MissingField {
                field: "value".into()
            }
        );
        assert!(matches!(
            ChangeEnvelope::from_slice(br#"{"op":"explode","key":"k"}"#, 1024),
            Err(PayloadError::NotJson(_))
        ));
        assert_eq!(
            ChangeEnvelope::from_slice(&[b' '; 2000], 1024).unwrap_err(),
            PayloadError::TooLarge {
                size: 2000,
                limit: 1024
            }
        );
        let delete =
            ChangeEnvelope::from_slice(br#"{"op":"delete","key":"k","version":"3"}"#, 1024)
                .unwrap();
        assert_eq!(delete.version, Some(Version::new(3)));
    }

    #[test]
    fn plain_payload_helpers() {
        let p = parse_object(
            br#"{"order_id":"1","version":"2024-01-01T00:00:00Z"}"#,
            1024,
        )
        .unwrap();
        assert!(version_field(&p, "version").unwrap().is_some());
        assert_eq!(version_field(&p, "absent").unwrap(), None);
        assert_eq!(
            parse_object(b"[1]", 1024).unwrap_err(),
            PayloadError::NotObject
        );
        assert_eq!(parse_object(b"{", 1024).unwrap_err().reason(), "not_json");
        let p = parse_object(br#"{"version":true}"#, 1024).unwrap();
        assert_eq!(
            version_field(&p, "version").unwrap_err().reason(),
            "invalid_version"
        );
    }
}
