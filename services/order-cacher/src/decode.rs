//! What one Kafka message asks of the cache: a write, a skip, or a dead letter.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleet::envelope::{check_size, parse_object, PayloadError};
use fleet::key_template::KeyTemplate;
use fleet::mapping::{EntityMapping, OriginMarker};
use fleet::payload::{parse_fields, FieldRef, PayloadFields};
use fleet::version::{parse_timestamp, Version};
use fleet::version_guard::{CacheKey, CacheWrite};
use serde_json::{Map, Value};
use smallvec::SmallVec;

use crate::config::{IndexConfig, TopicConfig};

/// The parts of a Kafka message that decoding reads.
pub struct Incoming<'a, H> {
    /// The message key.
    pub key: Option<&'a [u8]>,
    /// The value; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    /// The message timestamp in Unix milliseconds, if it has one.
    pub timestamp_ms: Option<i64>,
    /// Looks up a header by name: `None` when absent, `Some(None)` for a null value.
    pub header: H,
}

/// The keys and values of upserts, copied into shared chunks: one allocation per chunk
/// instead of one or two per message. Each key or value is a slice of its chunk, and a chunk
/// is freed once the writes holding its slices are dropped.
#[derive(Default)]
pub struct BatchArena {
    chunk: BytesMut,
    /// Where a key is rendered before it is copied into the chunk; reused for every key.
    scratch: String,
}

impl BatchArena {
    /// Room for about 200 orders of 300 bytes; a larger value gets a chunk of its own size.
    const CHUNK_BYTES: usize = 64 * 1024;

    /// A copy of `value` in the current chunk, or in a new one when it does not fit.
    pub fn copy(&mut self, value: &[u8]) -> Bytes {
        copy_into(&mut self.chunk, value)
    }

    /// A key rendered by `render` into a reused buffer, then copied into the chunk.
    pub fn key<E>(
        &mut self,
        render: impl FnOnce(&mut String) -> Result<(), E>,
    ) -> Result<CacheKey, E> {
        self.scratch.clear();
        render(&mut self.scratch)?;
        let bytes = copy_into(&mut self.chunk, self.scratch.as_bytes());
        // The bytes were a `String` a moment ago, so the check cannot fail; were it ever to,
        // a key of its own is as good.
        Ok(CacheKey::try_from(bytes).unwrap_or_else(|_| CacheKey::from(self.scratch.as_str())))
    }
}

fn copy_into(chunk: &mut BytesMut, value: &[u8]) -> Bytes {
    if chunk.capacity() - chunk.len() < value.len() {
        *chunk = BytesMut::with_capacity(BatchArena::CHUNK_BYTES.max(value.len()));
    }
    chunk.extend_from_slice(value);
    chunk.split().freeze()
}

/// What to do with one message.
#[derive(Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per message into its batch; boxing would cost an allocation per write"
)]
pub enum Decoded {
    /// Write the entry (and its index entries).
    Write {
        write: CacheWrite,
        indexes: IndexEntries,
    },
    /// The message came from Redis; skip it.
    SkippedOrigin,
    /// The message cannot be used; dead-letter it.
    Poison(PayloadError),
}

/// A message's index entries: kept inline for up to two indexes, so that they cost no
/// allocation of their own.
pub type IndexEntries = SmallVec<[IndexEntry; 2]>;

/// One member to add to a secondary index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    /// Which of the topic's indexes.
    pub rule: usize,
    /// The sorted set's key.
    pub key: CacheKey,
    /// The member.
    pub member: CacheKey,
    /// The score.
    pub score: f64,
}

/// A topic's decoding rules, built once at start-up.
pub struct TopicRules {
    /// The topic name.
    pub topic: String,
    /// The dead-letter topic.
    pub dead_letter_topic: String,
    /// Its secondary indexes.
    pub indexes: Vec<IndexRule>,
    mapping: EntityMapping,
    origin: OriginMarker,
    max_message_bytes: usize,
    /// The top-level payload fields the rules read; decoding skips the others.
    fields: Vec<String>,
}

/// One secondary index of a topic.
pub struct IndexRule {
    key_template: KeyTemplate,
    member_template: Option<KeyTemplate>,
    score_field: String,
    /// Only this many highest-scored members are kept.
    pub max_entries: usize,
    /// Expiry of the index key.
    pub ttl: Option<Duration>,
}

impl IndexRule {
    /// Whether members are the entries' own keys (no `member_template`).
    pub fn members_are_entry_keys(&self) -> bool {
        self.member_template.is_none()
    }
}

impl From<&IndexConfig> for IndexRule {
    fn from(config: &IndexConfig) -> Self {
        Self {
            key_template: config.key_template.clone(),
            member_template: config.member_template.clone(),
            score_field: config.score_field.clone(),
            max_entries: config.max_entries,
            ttl: config.ttl_secs.map(Duration::from_secs),
        }
    }
}

impl TopicRules {
    /// Rules for one configured topic.
    pub fn new(config: &TopicConfig, origin: &OriginMarker, max_message_bytes: usize) -> Self {
        let indexes: Vec<IndexRule> = config.indexes.iter().map(IndexRule::from).collect();
        let mapping = config.mapping();
        let mut fields: Vec<String> = mapping.key_template.fields().collect();
        fields.extend(mapping.version_field.clone());
        fields.push(origin.field.clone());
        for index in &indexes {
            fields.extend(index.key_template.fields());
            fields.extend(index.member_template.iter().flat_map(KeyTemplate::fields));
            fields.push(index.score_field.clone());
        }
        // A dotted template field reads a nested object: keep its top-level field whole.
        let mut fields: Vec<String> = fields
            .iter()
            .map(|field| field.split('.').next().unwrap_or(field).to_string())
            .collect();
        fields.sort();
        fields.dedup();
        Self {
            topic: config.name.clone(),
            dead_letter_topic: config.dead_letter_topic(),
            indexes,
            mapping,
            origin: origin.clone(),
            max_message_bytes,
            fields,
        }
    }

    /// Decides what a message does; an upsert's key and value are copied into `arena`.
    pub fn decode<'a, H>(&self, message: &Incoming<'a, H>, arena: &mut BatchArena) -> Decoded
    where
        H: Fn(&str) -> Option<Option<&'a [u8]>>,
    {
        // The header check comes first: it needs no parsing.
        if self.origin.enabled
            && self
                .origin_header(&message.header)
                .is_some_and(|value| self.origin.matches_header(&self.origin.field, value))
        {
            return Decoded::SkippedOrigin;
        }
        let result = match message.payload {
            Some(body) => self.decode_upsert(body, message.timestamp_ms, arena),
            None => self.decode_tombstone(message.key, &message.header),
        };
        match result {
            Ok(Some(decoded)) => decoded,
            Ok(None) => Decoded::SkippedOrigin,
            Err(e) => Decoded::Poison(e),
        }
    }

    /// What a stored value says about its entry: the keys of the indexes it put the entry
    /// into, among indexes whose members are entry keys (what a delete of that entry takes it
    /// out of), and its version. Indexes with a `member_template` are left alone, since
    /// several entries may share a member there. A value the rules cannot read yields no
    /// index keys; one without a readable version field yields no version.
    pub fn stored_entry(&self, stored: &[u8]) -> (Vec<String>, Option<Version>) {
        let Ok(payload) = parse_fields(stored, usize::MAX, &self.fields) else {
            return (Vec::new(), None);
        };
        let index_keys = self
            .indexes
            .iter()
            .filter(|index| index.members_are_entry_keys())
            .filter_map(|index| index.key_template.render(&payload).ok())
            .collect();
        (index_keys, self.mapping.version(&payload).ok().flatten())
    }

    fn origin_header<'a, H>(&self, header: &H) -> Option<Option<&'a [u8]>>
    where
        H: Fn(&str) -> Option<Option<&'a [u8]>>,
    {
        header(&self.origin.field)
    }

    fn decode_upsert(
        &self,
        body: &[u8],
        timestamp_ms: Option<i64>,
        arena: &mut BatchArena,
    ) -> Result<Option<Decoded>, PayloadError> {
        let payload = parse_fields(body, self.max_message_bytes, &self.fields)?;
        if self.origin.matches_payload(&payload) {
            return Ok(None);
        }
        let key = arena.key(|out| self.mapping.key_template.render_into(&payload, out))?;
        let write = self.mapping.upsert_at(key, &payload, arena.copy(body))?;
        let mut indexes = IndexEntries::new();
        for (rule, index) in self.indexes.iter().enumerate() {
            let member = match &index.member_template {
                Some(template) => arena.key(|out| template.render_into(&payload, out))?,
                None => write.key.clone(),
            };
            indexes.push(IndexEntry {
                rule,
                key: arena.key(|out| index.key_template.render_into(&payload, out))?,
                member,
                score: score(&payload, &index.score_field, timestamp_ms)?,
            });
        }
        Ok(Some(Decoded::Write { write, indexes }))
    }

    /// A tombstone's key names the entry: either a JSON object the key template is filled
    /// from, or, for a one-field template, the field's value itself (`1001` → `order:1001`).
    fn decode_tombstone<'a, H>(
        &self,
        key: Option<&[u8]>,
        header: &H,
    ) -> Result<Option<Decoded>, PayloadError>
    where
        H: Fn(&str) -> Option<Option<&'a [u8]>>,
    {
        let key = key.ok_or_else(|| PayloadError::MissingField {
            field: "message key (a tombstone needs one)".into(),
        })?;
        check_size(key, self.max_message_bytes)?;
        let template = &self.mapping.key_template;
        let fields = match parse_object(key, self.max_message_bytes) {
            Ok(object) => object,
            Err(_) => {
                let mut names = template.fields();
                let (Some(field), None) = (names.next(), names.next()) else {
                    return Err(PayloadError::InvalidField {
                        field: "message key".into(),
                        reason: "must be a JSON object when the key template has several fields"
                            .into(),
                    });
                };
                let text = std::str::from_utf8(key).map_err(|_| PayloadError::InvalidField {
                    field: "message key".into(),
                    reason: "is not UTF-8".into(),
                })?;
                nested(&field, Value::String(text.to_string()))
            }
        };
        let cache_key = template.render(&fields)?;
        let version = match &self.mapping.version_field {
            Some(name) => match header(name) {
                Some(Some(bytes)) => Some(header_version(name, bytes)?),
                _ => None,
            },
            None => None,
        };
        Ok(Some(Decoded::Write {
            write: CacheWrite::delete(cache_key, version),
            indexes: IndexEntries::new(),
        }))
    }
}

/// `{"a": {"b": value}}` for the dotted name `a.b`.
fn nested(dotted: &str, value: Value) -> Map<String, Value> {
    let mut value = value;
    for segment in dotted.rsplit('.') {
        let mut map = Map::new();
        map.insert(segment.to_string(), value);
        value = Value::Object(map);
    }
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn header_version(name: &str, bytes: &[u8]) -> Result<Version, PayloadError> {
    let invalid = |source| PayloadError::InvalidVersion {
        field: format!("header {name}"),
        source,
    };
    std::str::from_utf8(bytes)
        .map_err(|_| invalid(fleet::version::VersionError::Unparsable))?
        .parse()
        .map_err(invalid)
}

/// An index score: a number, or a timestamp as Unix seconds; the message's own timestamp
/// when the field is absent.
fn score(
    payload: &impl PayloadFields,
    field: &str,
    timestamp_ms: Option<i64>,
) -> Result<f64, PayloadError> {
    let invalid = |reason: String| PayloadError::InvalidField {
        field: field.to_string(),
        reason,
    };
    match payload.field(field) {
        None => message_time(field, timestamp_ms),
        Some(value) if value.is_null() => message_time(field, timestamp_ms),
        Some(FieldRef::Json(Value::Number(n))) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| invalid("is not a finite number".into())),
        Some(value) => match value.as_str() {
            Some(text) => parse_timestamp(text)
                .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
                .ok_or_else(|| invalid("is neither RFC 3339 nor `YYYY-MM-DD HH:MM:SS`".into())),
            None => Err(invalid(format!(
                "must be a number or a timestamp, found {}",
                value.kind()
            ))),
        },
    }
}

/// The message's own timestamp, in Unix seconds, for a score field it lacks.
fn message_time(field: &str, timestamp_ms: Option<i64>) -> Result<f64, PayloadError> {
    timestamp_ms
        .map(|ms| ms as f64 / 1000.0)
        .ok_or_else(|| PayloadError::MissingField {
            field: field.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::version_guard::Change;

    fn rules(version_field: Option<&str>, indexes: Vec<IndexConfig>) -> TopicRules {
        let config = TopicConfig {
            name: "orders".into(),
            key_template: KeyTemplate::parse("order:{order_id}").unwrap(),
            version_field: version_field.map(str::to_string),
            ttl_secs: None,
            dead_letter_topic: None,
            indexes,
        };
        TopicRules::new(&config, &OriginMarker::default(), 1024)
    }

    fn decode(
        rules: &TopicRules,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Decoded {
        let message = Incoming {
            key,
            payload,
            timestamp_ms: Some(1_700_000_000_000),
            header: |name: &str| {
                headers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| Some(*v))
            },
        };
        rules.decode(&message, &mut BatchArena::default())
    }

    #[test]
    fn values_share_chunks_and_a_large_one_gets_its_own() {
        let mut values = BatchArena::default();
        let first = values.copy(b"first");
        let second = values.copy(b"second");
        assert_eq!((&first[..], &second[..]), (&b"first"[..], &b"second"[..]));
        // One chunk: the second value starts where the first ends.
        assert_eq!(second.as_ptr(), first.as_ptr().wrapping_add(first.len()));
        let large = vec![b'x'; BatchArena::CHUNK_BYTES + 1];
        assert_eq!(&values.copy(&large)[..], &large[..]);
        // A value that no longer fits the current chunk starts a new one.
        let filler = vec![b'y'; BatchArena::CHUNK_BYTES - 10];
        let filled = values.copy(&filler);
        let next = values.copy(b"does not fit");
        assert_ne!(next.as_ptr(), filled.as_ptr().wrapping_add(filled.len()));
        assert_eq!(&next[..], b"does not fit");
    }

    #[test]
    fn keys_share_the_chunk_with_values() {
        let mut arena = BatchArena::default();
        let value = arena.copy(b"{}");
        let key = arena
            .key(|out| {
                out.push_str("order:1");
                Ok::<_, ()>(())
            })
            .unwrap();
        assert_eq!(key, "order:1");
        assert_eq!(key.as_bytes().as_ptr(), value.as_ptr().wrapping_add(2));
        let again = arena.key(|out| {
            out.push_str("order:2");
            Ok::<_, ()>(())
        });
        assert_eq!(
            again.unwrap(),
            "order:2",
            "the buffer is cleared for each key"
        );
        assert_eq!(arena.key(|_| Err("missing field")), Err("missing field"));
    }

    #[test]
    fn plain_orders_become_versioned_writes_of_the_message_itself() {
        let body = br#"{"order_id": "1001", "user_id": "user_123", "amount": 299.99, "status": "paid", "version": 3, "timestamp": "2023-01-01 10:00:00"}"#;
        let Decoded::Write { write, indexes } =
            decode(&rules(Some("version"), vec![]), None, Some(body), &[])
        else {
            panic!("a write")
        };
        assert_eq!(write.key, "order:1001");
        assert_eq!(write.version, Some(Version::new(3)));
        assert_eq!(write.change, Change::Upsert(Bytes::copy_from_slice(body)));
        assert!(indexes.is_empty());
    }

    #[test]
    fn only_the_fields_the_rules_read_are_kept_and_nested_ones_work() {
        let config = TopicConfig {
            name: "orders".into(),
            key_template: KeyTemplate::parse("order:{meta.id}").unwrap(),
            version_field: Some("version".into()),
            ttl_secs: None,
            dead_letter_topic: None,
            indexes: vec![],
        };
        let r = TopicRules::new(&config, &OriginMarker::default(), 1024);
        assert_eq!(r.fields, ["meta", "source", "version"]);
        let body = br#"{"pad": {"deep": [1, 2, {"x": null}]}, "meta": {"id": 5}, "version": 2}"#;
        let Decoded::Write { write, .. } = decode(&r, None, Some(body), &[]) else {
            panic!("a write")
        };
        assert_eq!(write.key, "order:5");
        assert_eq!(
            write.change,
            Change::Upsert(Bytes::copy_from_slice(body)),
            "stored as received"
        );
    }

    #[test]
    fn origin_marker_in_header_or_payload_skips() {
        let r = rules(None, vec![]);
        let body = br#"{"order_id": 1}"#;
        assert_eq!(
            decode(&r, None, Some(body), &[("source", b"redis")]),
            Decoded::SkippedOrigin
        );
        assert_eq!(
            decode(
                &r,
                None,
                Some(br#"{"order_id": 1, "source": "redis"}"#),
                &[]
            ),
            Decoded::SkippedOrigin
        );
        assert!(matches!(
            decode(&r, None, Some(body), &[("source", b"app")]),
            Decoded::Write { .. }
        ));
    }

    #[test]
    fn tombstones_delete_through_the_guard_when_versioned() {
        let r = rules(Some("version"), vec![]);
        let Decoded::Write { write, .. } = decode(&r, Some(b"1001"), None, &[("version", b"9")])
        else {
            panic!("a delete")
        };
        assert_eq!(
            write,
            CacheWrite::delete("order:1001", Some(Version::new(9)))
        );
        let Decoded::Write { write, .. } = decode(&r, Some(br#"{"order_id": 7}"#), None, &[])
        else {
            panic!("a delete")
        };
        assert_eq!(
            write,
            CacheWrite::delete("order:7", None),
            "no version: invalidate"
        );
        assert!(matches!(
            decode(&r, None, None, &[]),
            Decoded::Poison(PayloadError::MissingField { .. })
        ));
        assert!(matches!(
            decode(&r, Some(b"1"), None, &[("version", b"later")]),
            Decoded::Poison(PayloadError::InvalidVersion { .. })
        ));
    }

    #[test]
    fn poison_of_every_kind_is_typed() {
        let r = rules(Some("version"), vec![]);
        let reason = |body: &[u8]| match decode(&r, None, Some(body), &[]) {
            Decoded::Poison(e) => e.reason(),
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(b"not json"), "not_json");
        assert_eq!(reason(b"[1, 2]"), "not_object");
        assert_eq!(reason(br#"{"version": 1}"#), "missing_field");
        assert_eq!(reason(br#"{"order_id": 1}"#), "missing_field");
        assert_eq!(
            reason(br#"{"order_id": 1, "version": "soon"}"#),
            "invalid_version"
        );
        assert_eq!(
            reason(br#"{"order_id": {"x": 1}, "version": 1}"#),
            "invalid_field"
        );
        assert_eq!(reason(&[b' '; 2000]), "too_large");
    }

    #[test]
    fn index_entries_score_by_timestamp() {
        let index = IndexConfig {
            key_template: KeyTemplate::parse("user:{user_id}:orders").unwrap(),
            member_template: None,
            score_field: "timestamp".into(),
            max_entries: 10,
            ttl_secs: None,
        };
        let r = rules(None, vec![index]);
        let body = br#"{"order_id": "1001", "user_id": "u1", "timestamp": "2023-01-01 10:00:00"}"#;
        let Decoded::Write { indexes, .. } = decode(&r, None, Some(body), &[]) else {
            panic!("a write")
        };
        assert_eq!(
            indexes.to_vec(),
            vec![IndexEntry {
                rule: 0,
                key: "user:u1:orders".into(),
                member: "order:1001".into(),
                score: 1_672_567_200.0,
            }]
        );
        let body = br#"{"order_id": "1002", "user_id": "u1"}"#;
        let Decoded::Write { indexes, .. } = decode(&r, None, Some(body), &[]) else {
            panic!("a write")
        };
        assert_eq!(
            indexes[0].score, 1_700_000_000.0,
            "the Kafka timestamp stands in"
        );
        let body = br#"{"order_id": "1003", "user_id": "u1", "timestamp": true}"#;
        assert!(matches!(
            decode(&r, None, Some(body), &[]),
            Decoded::Poison(PayloadError::InvalidField { .. })
        ));
    }
}
