//! What one RabbitMQ message asks of the cache: writes, a skip, or a dead letter.
//!
//! A body whose top-level object has an `op` field is an envelope:
//! `{"op": "upsert"|"delete"|"invalidate"|"warm", "key": ..., "value": ..., "version": ...,
//! "ttl_secs": ..., "entries": [...]}`. Any other object is a plain entity, mapped by its
//! queue's key template.

use std::time::Duration;

use bytes::Bytes;
use fleet::envelope::{parse_object_keeping_raw, version_field, PayloadError};
use fleet::key_template::json_kind;
use fleet::mapping::{EntityMapping, OriginMarker};
use fleet::version_guard::CacheWrite;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::QueueConfig;

/// The kind of message, a fixed metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Envelope `upsert`.
    Upsert,
    /// Envelope `delete`.
    Delete,
    /// Envelope `invalidate`.
    Invalidate,
    /// Envelope `warm`.
    Warm,
    /// A plain entity mapped by the queue's key template.
    Entity,
    /// Not known, because the message could not be read.
    Unknown,
}

impl Op {
    /// Every op, for pre-registering metric labels.
    pub const ALL: [Op; 6] = [
        Op::Upsert,
        Op::Delete,
        Op::Invalidate,
        Op::Warm,
        Op::Entity,
        Op::Unknown,
    ];

    /// The metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
            Op::Invalidate => "invalidate",
            Op::Warm => "warm",
            Op::Entity => "entity",
            Op::Unknown => "unknown",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "upsert" => Op::Upsert,
            "delete" => Op::Delete,
            "invalidate" => Op::Invalidate,
            "warm" => Op::Warm,
            _ => return None,
        })
    }
}

/// What to do with one message.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// Apply these writes, in order.
    Write {
        op: Op,
        writes: Vec<CacheWrite>,
        /// When the change happened (the envelope's `ts`), in Unix milliseconds.
        event_ms: Option<i64>,
    },
    /// The message came from Redis; skip it.
    SkippedOrigin(Op),
    /// The message cannot be used; dead-letter it.
    Poison(PayloadError),
}

/// A queue's decoding rules, built once at start-up.
#[derive(Debug, Clone)]
pub struct QueueRules {
    mapping: Option<EntityMapping>,
    origin: OriginMarker,
    max_message_bytes: usize,
}

/// Fields read as raw JSON text, in one pass with the rest: an envelope stores its `value`
/// byte for byte as it arrived, and `entries` holds the values of a `warm`.
const RAW_FIELDS: [&str; 2] = ["value", "entries"];

const ENVELOPE_FIELDS: [&str; 8] = [
    "op", "key", "value", "version", "ttl_secs", "entries", "source", "ts",
];
const ENTRY_FIELDS: [&str; 4] = ["key", "value", "version", "ttl_secs"];

impl QueueRules {
    /// Rules for one configured queue.
    pub fn new(config: &QueueConfig, origin: &OriginMarker, max_message_bytes: usize) -> Self {
        Self {
            mapping: config.mapping(),
            origin: origin.clone(),
            max_message_bytes,
        }
    }

    /// The header (and payload field) naming a message's origin.
    pub fn origin_field(&self) -> &str {
        &self.origin.field
    }

    /// Decides what a message does. `origin_header` is the value of the header named like the
    /// origin marker's field, if the message has it.
    pub fn decode(&self, body: &[u8], origin_header: Option<&[u8]>) -> Decoded {
        if self.origin.enabled && origin_header == Some(self.origin.value.as_bytes()) {
            return Decoded::SkippedOrigin(Op::Unknown);
        }
        match self.decode_body(body) {
            Ok(decoded) => decoded,
            Err(e) => Decoded::Poison(e),
        }
    }

    fn decode_body(&self, body: &[u8]) -> Result<Decoded, PayloadError> {
        let object = parse_object_keeping_raw(body, self.max_message_bytes, RAW_FIELDS)?;
        let (mut payload, [value, entries]) = (object.fields, object.raw);
        let op = match payload.get("op") {
            None => None,
            Some(Value::String(name)) => {
                Some(Op::parse(name).ok_or_else(|| PayloadError::InvalidField {
                    field: "op".into(),
                    reason: "must be upsert, delete, invalidate or warm".into(),
                })?)
            }
            Some(other) => {
                return Err(PayloadError::InvalidField {
                    field: "op".into(),
                    reason: format!("must be a string, found {}", json_kind(other)),
                })
            }
        };
        let Some(op) = op else {
            // A plain entity: its template and version may name any field, raw ones included.
            for (name, raw) in RAW_FIELDS.iter().zip([value, entries]) {
                if let Some(raw) = raw {
                    payload.insert((*name).to_string(), parse_raw(raw)?);
                }
            }
            if self.origin.matches_payload(&payload) {
                return Ok(Decoded::SkippedOrigin(Op::Entity));
            }
            let mapping = self
                .mapping
                .as_ref()
                .ok_or_else(|| PayloadError::MissingField {
                    field: "op (this queue takes only envelopes)".into(),
                })?;
            return Ok(Decoded::Write {
                op: Op::Entity,
                writes: vec![mapping.upsert(&payload, Bytes::copy_from_slice(body))?],
                event_ms: None,
            });
        };
        if self.marked_by_origin(&payload, value, entries)? {
            return Ok(Decoded::SkippedOrigin(op));
        }
        envelope(op, &payload, value, entries)
    }

    /// The origin check of an envelope, whose raw fields are not in `payload`.
    fn marked_by_origin(
        &self,
        payload: &Map<String, Value>,
        value: Option<&RawValue>,
        entries: Option<&RawValue>,
    ) -> Result<bool, PayloadError> {
        let raw = match self.origin.field.as_str() {
            "value" => value,
            "entries" => entries,
            _ => return Ok(self.origin.matches_payload(payload)),
        };
        Ok(self.origin.enabled
            && matches!(raw.map(parse_raw).transpose()?, Some(Value::String(s)) if s == self.origin.value))
    }
}

/// Raw JSON text as a value. The text was checked as JSON when it was read, so this fails
/// only if that parse and this one disagree.
fn parse_raw(raw: &RawValue) -> Result<Value, PayloadError> {
    serde_json::from_str(raw.get()).map_err(|e| PayloadError::NotJson(e.to_string()))
}

/// A raw field that is present and not `null`: a `null` value counts as missing.
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|raw| raw.get() != "null")
}

fn envelope(
    op: Op,
    payload: &Map<String, Value>,
    value: Option<&RawValue>,
    entries: Option<&RawValue>,
) -> Result<Decoded, PayloadError> {
    only_known_fields(payload, &ENVELOPE_FIELDS, "")?;
    let ttl_secs = ttl(payload, "ttl_secs")?;
    let event_ms = match payload.get("ts") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_i64(),
        Some(other) => {
            return Err(PayloadError::InvalidField {
                field: "ts".into(),
                reason: format!("must be Unix milliseconds, found {}", json_kind(other)),
            })
        }
    };
    let writes = match op {
        Op::Warm => warm_entries(present(entries), ttl_secs)?,
        _ => {
            let key = key(payload, "key")?;
            let version = version_field(payload, "version")?;
            vec![match op {
                Op::Upsert => {
                    let value = present(value).ok_or_else(|| PayloadError::MissingField {
                        field: "value".into(),
                    })?;
                    CacheWrite::upsert(key, Bytes::copy_from_slice(value.get().as_bytes()), version)
                        .with_ttl(ttl_secs.map(Duration::from_secs))
                }
                Op::Delete => CacheWrite::delete(key, version),
                // Invalidation drops the entry and keeps its version, so older data cannot
                // come back through a late upsert.
                _ => CacheWrite::delete(key, None),
            }]
        }
    };
    Ok(Decoded::Write {
        op,
        writes,
        event_ms,
    })
}

fn warm_entries(
    entries: Option<&RawValue>,
    default_ttl: Option<u64>,
) -> Result<Vec<CacheWrite>, PayloadError> {
    let Some(entries) = entries else {
        return Err(PayloadError::MissingField {
            field: "entries".into(),
        });
    };
    let Ok(entries) = serde_json::from_str::<Vec<&RawValue>>(entries.get()) else {
        return Err(PayloadError::InvalidField {
            field: "entries".into(),
            reason: format!(
                "must be an array, found {}",
                json_kind(&parse_raw(entries)?)
            ),
        });
    };
    if entries.is_empty() {
        return Err(PayloadError::InvalidField {
            field: "entries".into(),
            reason: "must not be empty".into(),
        });
    }
    let mut writes = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let field = |name: &str| format!("entries[{i}].{name}");
        let entry = match parse_object_keeping_raw(entry.get().as_bytes(), usize::MAX, ["value"]) {
            Ok(entry) => entry,
            Err(PayloadError::NotObject) => {
                return Err(PayloadError::InvalidField {
                    field: format!("entries[{i}]"),
                    reason: format!("must be an object, found {}", json_kind(&parse_raw(entry)?)),
                })
            }
            Err(e) => return Err(e),
        };
        let ([value], entry) = (entry.raw, entry.fields);
        let value = present(value);
        only_known_fields(&entry, &ENTRY_FIELDS, &format!("entries[{i}]."))?;
        let key = key(&entry, &field("key"))?;
        let value = value.ok_or_else(|| PayloadError::MissingField {
            field: field("value"),
        })?;
        let version = version_field(&entry, "version").map_err(|e| match e {
            PayloadError::InvalidVersion { source, .. } => PayloadError::InvalidVersion {
                field: field("version"),
                source,
            },
            other => other,
        })?;
        let ttl_secs = ttl(&entry, &field("ttl_secs"))?.or(default_ttl);
        writes.push(
            CacheWrite::upsert(key, Bytes::copy_from_slice(value.get().as_bytes()), version)
                .with_ttl(ttl_secs.map(Duration::from_secs)),
        );
    }
    Ok(writes)
}

fn only_known_fields(
    object: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
) -> Result<(), PayloadError> {
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(PayloadError::InvalidField {
            field: format!("{prefix}{unknown}"),
            reason: "is not an envelope field".into(),
        }),
        None => Ok(()),
    }
}

/// A non-empty string field; `name` is how errors call it (the last segment is looked up).
fn key(object: &Map<String, Value>, name: &str) -> Result<String, PayloadError> {
    let field = name.rsplit('.').next().unwrap_or(name);
    match object.get(field) {
        Some(Value::String(key)) if !key.is_empty() => Ok(key.clone()),
        None | Some(Value::Null) => Err(PayloadError::MissingField { field: name.into() }),
        Some(other) => Err(PayloadError::InvalidField {
            field: name.into(),
            reason: format!("must be a non-empty string, found {}", json_kind(other)),
        }),
    }
}

fn ttl(object: &Map<String, Value>, name: &str) -> Result<Option<u64>, PayloadError> {
    let field = name.rsplit('.').next().unwrap_or(name);
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|s| s > 0) => Ok(n.as_u64()),
        Some(_) => Err(PayloadError::InvalidField {
            field: name.into(),
            reason: "must be a positive whole number of seconds".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::key_template::KeyTemplate;
    use fleet::version::Version;
    use fleet::version_guard::Change;

    fn rules(template: Option<&str>, version_field: Option<&str>) -> QueueRules {
        let config = QueueConfig {
            name: "q".into(),
            routing_keys: None,
            key_template: template.map(|t| KeyTemplate::parse(t).unwrap()),
            version_field: version_field.map(str::to_string),
            ttl_secs: None,
            declare: true,
        };
        QueueRules::new(&config, &OriginMarker::default(), 4096)
    }

    fn writes(decoded: Decoded) -> (Op, Vec<CacheWrite>) {
        match decoded {
            Decoded::Write { op, writes, .. } => (op, writes),
            other => panic!("{other:?}"),
        }
    }

    fn poison(rules: &QueueRules, body: &[u8]) -> PayloadError {
        match rules.decode(body, None) {
            Decoded::Poison(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn envelopes_keep_value_bytes_and_map_each_op() {
        let r = rules(None, None);
        let (op, w) = writes(r.decode(
            br#"{"op":"upsert","key":"product:1","value":{"b":1, "a":2},"version":7,"ttl_secs":60}"#,
            None,
        ));
        assert_eq!(op, Op::Upsert);
        assert_eq!(
            w,
            vec![CacheWrite::upsert(
                "product:1",
                br#"{"b":1, "a":2}"#.to_vec(),
                Some(Version::new(7))
            )
            .with_ttl(Some(Duration::from_secs(60)))]
        );
        let (op, w) = writes(r.decode(br#"{"op":"delete","key":"k","version":"9"}"#, None));
        assert_eq!(op, Op::Delete);
        assert_eq!(w, vec![CacheWrite::delete("k", Some(Version::new(9)))]);
        let (op, w) = writes(r.decode(br#"{"op":"invalidate","key":"k","version":3}"#, None));
        assert_eq!(op, Op::Invalidate);
        assert_eq!(w, vec![CacheWrite::delete("k", None)]);
    }

    #[test]
    fn warm_carries_many_entries_with_a_default_ttl() {
        let r = rules(None, None);
        let (op, w) = writes(r.decode(
            br#"{"op":"warm","ttl_secs":30,"entries":[{"key":"a","value":"x","version":1},{"key":"b","value":[1],"ttl_secs":5}]}"#,
            None,
        ));
        assert_eq!(op, Op::Warm);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].change, Change::Upsert(Bytes::from_static(br#""x""#)));
        assert_eq!(w[0].ttl, Some(Duration::from_secs(30)));
        assert_eq!(w[1].change, Change::Upsert(Bytes::copy_from_slice(b"[1]")));
        assert_eq!(w[1].ttl, Some(Duration::from_secs(5)));
        assert_eq!(w[1].version, None);
    }

    #[test]
    fn plain_entities_use_the_queue_template() {
        let r = rules(Some("product:{product_id}"), Some("version"));
        let body = br#"{"product_id": 1, "product_name": "New Product", "version": 2}"#;
        let (op, w) = writes(r.decode(body, None));
        assert_eq!(op, Op::Entity);
        assert_eq!(w[0].key, "product:1");
        assert_eq!(w[0].change, Change::Upsert(Bytes::copy_from_slice(body)));
        assert_eq!(
            r.decode(br#"{"product_id": 1}"#, None),
            Decoded::Poison(PayloadError::MissingField {
                field: "version".into()
            })
        );
        assert!(matches!(
            rules(None, None).decode(br#"{"product_id": 1}"#, None),
            Decoded::Poison(PayloadError::MissingField { .. })
        ));
    }

    #[test]
    fn origin_marker_in_header_or_body_skips() {
        let r = rules(Some("p:{id}"), None);
        assert_eq!(
            r.decode(br#"{"id": 1}"#, Some(b"redis")),
            Decoded::SkippedOrigin(Op::Unknown)
        );
        assert_eq!(
            r.decode(
                br#"{"op":"upsert","key":"k","value":1,"source":"redis"}"#,
                None
            ),
            Decoded::SkippedOrigin(Op::Upsert)
        );
        assert!(matches!(
            r.decode(br#"{"id": 1}"#, Some(b"app")),
            Decoded::Write { .. }
        ));
    }

    #[test]
    fn poison_of_every_kind_is_typed() {
        let r = rules(None, None);
        let reason = |body: &[u8]| poison(&r, body).reason();
        assert_eq!(reason(b"not json"), "not_json");
        assert_eq!(reason(b"[1]"), "not_object");
        assert_eq!(reason(br#"{"op":"explode","key":"k"}"#), "invalid_field");
        assert_eq!(reason(br#"{"op":"upsert","value":1}"#), "missing_field");
        assert_eq!(reason(br#"{"op":"upsert","key":"k"}"#), "missing_field");
        assert_eq!(
            reason(br#"{"op":"upsert","key":"k","value":1,"version":"soon"}"#),
            "invalid_version"
        );
        assert_eq!(
            reason(br#"{"op":"upsert","key":"k","value":1,"extra":2}"#),
            "invalid_field"
        );
        assert_eq!(reason(br#"{"op":"warm","entries":[]}"#), "invalid_field");
        assert_eq!(
            reason(br#"{"op":"warm","entries":[{"key":"a"}]}"#),
            "missing_field"
        );
        assert_eq!(reason(&[b' '; 5000]), "too_large");
    }

    #[test]
    fn raw_fields_read_in_one_pass_keep_their_meaning() {
        let r = rules(None, None);
        let reason = |body: &[u8]| poison(&r, body).to_string();
        // A null value is a missing one, as a write of the text `null` would not be wanted.
        assert!(reason(br#"{"op":"upsert","key":"k","value":null}"#).contains("value"));
        assert!(reason(br#"{"op":"warm","entries":null}"#).contains("entries"));
        assert!(reason(br#"{"op":"warm","entries":{"a":1}}"#).contains("must be an array"));
        assert!(reason(br#"{"op":"warm","entries":[1]}"#).contains("entries[0]"));
        assert!(
            reason(br#"{"op":"warm","entries":[{"key":"a","value":1,"entries":[]}]}"#)
                .contains("entries[0].entries")
        );
        // Escapes and whitespace inside a value are stored exactly as sent.
        let (_, w) = writes(r.decode(
            br#"{"value" : {"s": "a\"b\u00e9", "n": [1, 2 ]}, "key":"k","op":"upsert"}"#,
            None,
        ));
        assert_eq!(
            w[0].change,
            Change::Upsert(Bytes::from_static(br#"{"s": "a\"b\u00e9", "n": [1, 2 ]}"#))
        );
        // A plain entity sees every field, those read as raw text too.
        let entity = rules(Some("p:{value}"), Some("entries"));
        let (op, w) = writes(entity.decode(br#"{"value": "x", "entries": 4}"#, None));
        assert_eq!(op, Op::Entity);
        assert_eq!(w[0].key, "p:x");
        assert_eq!(w[0].version, Some(Version::new(4)));
    }

    #[test]
    fn an_origin_marker_may_name_a_raw_field() {
        let config = QueueConfig {
            name: "q".into(),
            routing_keys: None,
            key_template: None,
            version_field: None,
            ttl_secs: None,
            declare: true,
        };
        let origin = OriginMarker {
            field: "value".into(),
            ..OriginMarker::default()
        };
        let r = QueueRules::new(&config, &origin, 4096);
        assert_eq!(
            r.decode(br#"{"op":"upsert","key":"k","value":"redis"}"#, None),
            Decoded::SkippedOrigin(Op::Upsert)
        );
        assert!(matches!(
            r.decode(br#"{"op":"upsert","key":"k","value":"other"}"#, None),
            Decoded::Write { .. }
        ));
    }
}
