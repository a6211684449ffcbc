//! How a plain entity payload, such as `{"order_id": "1001", "amount": 299.99}`, becomes a
//! cache write, and how changes that came from Redis itself are recognised.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::envelope::{version_field, PayloadError};
use crate::key_template::KeyTemplate;
use crate::payload::{FieldRef, PayloadFields};
use crate::version::Version;
use crate::version_guard::{CacheKey, CacheWrite};

/// How one topic's or queue's plain JSON messages map to cache entries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntityMapping {
    /// Key template filled from the payload's fields, such as `order:{order_id}`.
    pub key_template: KeyTemplate,
    /// Field holding the change's version: a non-negative integer, a string of digits or an
    /// RFC 3339 timestamp. With it, writes go through the version guard and a message that
    /// lacks the field is refused, since an unversioned write could overwrite newer data.
    /// Without it, writes are last-writer-wins.
    #[serde(default)]
    pub version_field: Option<String>,
    /// Expiry of written entries, in seconds. None keeps them until changed or deleted.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

impl EntityMapping {
    /// A mapping with only a key template: unversioned, no expiry.
    pub fn new(key_template: KeyTemplate) -> Self {
        Self {
            key_template,
            version_field: None,
            ttl_secs: None,
        }
    }

    /// The expiry of written entries.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl_secs.map(Duration::from_secs)
    }

    /// The payload's version, required when a version field is configured.
    pub fn version(&self, payload: &impl PayloadFields) -> Result<Option<Version>, PayloadError> {
        let Some(field) = &self.version_field else {
            return Ok(None);
        };
        match version_field(payload, field)? {
            Some(version) => Ok(Some(version)),
            None => Err(PayloadError::MissingField {
                field: field.clone(),
            }),
        }
    }

    /// The upsert that stores `body`, the message exactly as received, at the templated key.
    pub fn upsert(
        &self,
        payload: &impl PayloadFields,
        body: Bytes,
    ) -> Result<CacheWrite, PayloadError> {
        self.upsert_at(self.key_template.render(payload)?.into(), payload, body)
    }

    /// The upsert that stores `body` at `key`, which the caller rendered from `payload` with
    /// this mapping's template (into a buffer of its own, say).
    pub fn upsert_at(
        &self,
        key: CacheKey,
        payload: &impl PayloadFields,
        body: Bytes,
    ) -> Result<CacheWrite, PayloadError> {
        let version = self.version(payload)?;
        Ok(CacheWrite::upsert(key, body, version).with_ttl(self.ttl()))
    }
}

/// Marks a change that came from Redis itself (the user-change-publisher sets it), so that
/// two-way sync between Redis and a broker does not loop.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OriginMarker {
    /// Whether marked messages are skipped.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Name of the header, or top-level payload field, that carries the origin.
    #[serde(default = "default_origin_field")]
    pub field: String,
    /// The origin value that means "already in Redis".
    #[serde(default = "default_origin_value")]
    pub value: String,
}

impl Default for OriginMarker {
    fn default() -> Self {
        Self {
            enabled: true,
            field: default_origin_field(),
            value: default_origin_value(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_origin_field() -> String {
    "source".into()
}

fn default_origin_value() -> String {
    "redis".into()
}

impl OriginMarker {
    /// Whether a header marks the message.
    pub fn matches_header(&self, name: &str, value: Option<&[u8]>) -> bool {
        self.enabled && name == self.field && value == Some(self.value.as_bytes())
    }

    /// Whether a payload field marks the message.
    pub fn matches_payload(&self, payload: &impl PayloadFields) -> bool {
        self.enabled
            && payload.field(&self.field).and_then(FieldRef::as_str) == Some(self.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version_guard::Change;
    use serde_json::{json, Map, Value};

    fn mapping(version_field: Option<&str>) -> EntityMapping {
        EntityMapping {
            key_template: KeyTemplate::parse("order:{order_id}").unwrap(),
            version_field: version_field.map(str::to_string),
            ttl_secs: Some(60),
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn upsert_stores_the_body_as_received() {
        let body = br#"{"version": 3, "order_id": 1001, "amount": 299.99}"#;
        let payload = obj(serde_json::from_slice(body).unwrap());
        let write = mapping(Some("version"))
            .upsert(&payload, Bytes::from_static(body))
            .unwrap();
        assert_eq!(write.key, "order:1001");
        assert_eq!(write.version, Some(Version::new(3)));
        assert_eq!(write.ttl, Some(Duration::from_secs(60)));
        assert_eq!(write.change, Change::Upsert(Bytes::from_static(body)));
    }

    #[test]
    fn a_configured_version_field_is_required() {
        let payload = obj(json!({"order_id": "1"}));
        let err = mapping(Some("version"))
            .upsert(&payload, Bytes::from_static(b"{}"))
            .unwrap_err();
        assert_eq!(err.reason(), "missing_field");
        let payload = obj(json!({"order_id": "1", "version": "soon"}));
        let err = mapping(Some("version"))
            .upsert(&payload, Bytes::from_static(b"{}"))
            .unwrap_err();
        assert_eq!(err.reason(), "invalid_version");
        let write = mapping(None)
            .upsert(&payload, Bytes::from_static(b"{}"))
            .unwrap();
        assert_eq!(write.version, None, "no version field: last-writer-wins");
    }

    #[test]
    fn origin_marker_matches_header_or_field() {
        let marker = OriginMarker::default();
        assert!(marker.matches_header("source", Some(b"redis")));
        assert!(!marker.matches_header("source", Some(b"billing")));
        assert!(!marker.matches_header("origin", Some(b"redis")));
        assert!(marker.matches_payload(&obj(json!({"source": "redis"}))));
        assert!(!marker.matches_payload(&obj(json!({"source": "app"}))));
        let off = OriginMarker {
            enabled: false,
            ..OriginMarker::default()
        };
        assert!(!off.matches_payload(&obj(json!({"source": "redis"}))));
    }
}
