//! Reading the top-level fields of a plain JSON payload, such as
//! `{"order_id": "1001", "amount": 299.99}`, without copying what can be borrowed.
//!
//! Key templates, version fields and origin markers read payloads through [`PayloadFields`],
//! which a parsed [`Map`] and the lighter [`SparseFields`] both implement.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use smallvec::SmallVec;

use crate::envelope::{check_size, PayloadError};
use crate::key_template::json_kind;

/// The top-level fields of a JSON object.
pub trait PayloadFields {
    /// The field `name`, if the object has it.
    fn field(&self, name: &str) -> Option<FieldRef<'_>>;
}

/// One field's value: a string, or any other JSON value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldRef<'a> {
    /// A string.
    Str(&'a str),
    /// Any JSON value (a string too, when the field came from a [`Map`]).
    Json(&'a Value),
}

impl<'a> FieldRef<'a> {
    /// The text of a string field.
    pub fn as_str(self) -> Option<&'a str> {
        match self {
            FieldRef::Str(text) => Some(text),
            FieldRef::Json(Value::String(text)) => Some(text),
            FieldRef::Json(_) => None,
        }
    }

    /// Whether the field is JSON `null`.
    pub fn is_null(self) -> bool {
        matches!(self, FieldRef::Json(Value::Null))
    }

    /// A short name of the value's type, for error messages that must not echo data.
    pub fn kind(self) -> &'static str {
        match self {
            FieldRef::Str("") => "an empty string",
            FieldRef::Str(_) => "a string",
            FieldRef::Json(value) => json_kind(value),
        }
    }
}

impl PayloadFields for Map<String, Value> {
    fn field(&self, name: &str) -> Option<FieldRef<'_>> {
        self.get(name).map(FieldRef::Json)
    }
}

/// The fields of a payload that a decoder asked for, with strings borrowed from the payload
/// where they have no escapes: reading three fields of an order costs no allocation.
#[derive(Debug, Default)]
pub struct SparseFields<'a> {
    fields: SmallVec<[(Cow<'a, str>, Field<'a>); 6]>,
}

/// A kept field's value.
#[derive(Debug, Clone, PartialEq)]
enum Field<'a> {
    Str(Cow<'a, str>),
    /// Numbers, bools and null need no allocation; objects and arrays (read by dotted
    /// template fields) are built as values.
    Json(Value),
}

impl SparseFields<'_> {
    /// How many fields were kept.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether no field was kept.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

impl PayloadFields for SparseFields<'_> {
    fn field(&self, name: &str) -> Option<FieldRef<'_>> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| match value {
                Field::Str(text) => FieldRef::Str(text),
                Field::Json(value) => FieldRef::Json(value),
            })
    }
}

/// Parses a plain entity payload like [`crate::envelope::parse_object`], but keeps only the
/// top-level fields named in `wanted`. The rest is checked for JSON syntax and skipped
/// without building values: for a decoder that reads three fields of a large message, that
/// is most of the parsing cost. As in a parsed object, the last of repeated fields wins.
pub fn parse_fields<'a>(
    body: &'a [u8],
    max_bytes: usize,
    wanted: &[String],
) -> Result<SparseFields<'a>, PayloadError> {
    parse_with(body, max_bytes, Wanted(wanted))
}

/// Keeps the fields named in it.
struct Wanted<'w>(&'w [String]);

impl<'de> ObjectReader<'de> for Wanted<'_> {
    type Object = SparseFields<'de>;

    fn read<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Object, A::Error> {
        let mut object = SparseFields::default();
        while let Some(Text(name)) = map.next_key()? {
            if !self.0.iter().any(|wanted| *wanted == *name) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value = map.next_value()?;
            match object.fields.iter_mut().find(|(field, _)| *field == name) {
                Some((_, kept)) => *kept = value,
                None => object.fields.push((name, value)),
            }
        }
        Ok(object)
    }
}

/// Reads the fields of a JSON object from its map access.
pub(crate) trait ObjectReader<'de> {
    /// What it makes of the object.
    type Object;

    /// Reads the object's fields, every one of them (skipping a value still checks it).
    fn read<A: MapAccess<'de>>(self, map: A) -> Result<Self::Object, A::Error>;
}

/// Parses `body` as one JSON value: the object `reader` reads, or `NotObject` for a value of
/// any other type.
pub(crate) fn parse_with<'de, R: ObjectReader<'de>>(
    body: &'de [u8],
    max_bytes: usize,
    reader: R,
) -> Result<R::Object, PayloadError> {
    check_size(body, max_bytes)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = TopLevel(reader)
        .deserialize(&mut de)
        .and_then(|object| de.end().map(|()| object));
    match parsed {
        Ok(Some(object)) => Ok(object),
        Ok(None) => Err(PayloadError::NotObject),
        Err(e) => Err(PayloadError::NotJson(e.to_string())),
    }
}

/// A top-level JSON value: `Some` object, `None` for any other type.
struct TopLevel<R>(R);

impl<'de, R: ObjectReader<'de>> DeserializeSeed<'de> for TopLevel<R> {
    type Value = Option<R::Object>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de, R: ObjectReader<'de>> Visitor<'de> for TopLevel<R> {
    type Value = Option<R::Object>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.read(map).map(Some)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// A string, borrowed from the input unless it has escapes: an object's field name.
pub(crate) struct Text<'de>(pub(crate) Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        match Field::deserialize(de)? {
            Field::Str(text) => Ok(Text(text)),
            Field::Json(value) => Err(serde::de::Error::custom(format_args!(
                "expected a string, found {}",
                json_kind(&value)
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(text)))
            }

            fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
                Ok(Field::Json(Value::Bool(value)))
            }

            fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
                Ok(Field::Json(Value::from(value)))
            }

            fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
                Ok(Field::Json(Value::from(value)))
            }

            fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
                Ok(Field::Json(Value::from(value)))
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Field::Json(Value::Null))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(Field::Json)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Field::Json)
            }
        }
        de.deserialize_any(FieldVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::parse_object;
    use serde_json::json;

    fn wanted(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn keeps_only_the_wanted_fields_and_reads_them_as_a_parsed_object_would() {
        let names = wanted(&["order_id", "meta", "k\"ey", "s", "n", "f", "b", "z", "gone"]);
        let body = br#"{"order_id": "7", "pad": [1, {"x": "y"}], "meta": {"a": [1]}, "k\"ey": 1,
            "s": "caf\u00e9", "n": -3, "f": 1.5, "b": true, "z": null}"#;
        let sparse = parse_fields(body, 1024, &names).unwrap();
        let full = parse_object(body, 1024).unwrap();
        assert_eq!(sparse.len(), 8);
        for name in &names {
            let (kept, parsed) = (sparse.field(name), full.field(name));
            match (kept, parsed) {
                (Some(FieldRef::Str(text)), Some(parsed)) => {
                    assert_eq!(Some(text), parsed.as_str(), "{name}")
                }
                (kept, parsed) => assert_eq!(kept, parsed, "{name}"),
            }
        }
        assert_eq!(sparse.field("pad"), None, "not wanted");
        assert_eq!(sparse.field("s"), Some(FieldRef::Str("café")));
        assert_eq!(
            sparse.field("meta"),
            Some(FieldRef::Json(&json!({"a": [1]})))
        );
    }

    #[test]
    fn strings_without_escapes_are_borrowed_from_the_payload() {
        let body = br#"{"order_id": "1001", "note": "a\"b"}"#;
        let sparse = parse_fields(body, 1024, &wanted(&["order_id", "note"])).unwrap();
        let borrowed = |name: &str| {
            sparse
                .fields
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| matches!(value, Field::Str(Cow::Borrowed(_))))
        };
        assert_eq!(borrowed("order_id"), Some(true));
        assert_eq!(
            borrowed("note"),
            Some(false),
            "an escaped string is unescaped"
        );
        assert_eq!(
            sparse.field("note").and_then(FieldRef::as_str),
            Some("a\"b")
        );
    }

    #[test]
    fn the_last_of_repeated_fields_wins_as_in_a_parsed_object() {
        let body = br#"{"id": 1, "id": "two"}"#;
        let sparse = parse_fields(body, 1024, &wanted(&["id"])).unwrap();
        assert_eq!(sparse.len(), 1);
        assert_eq!(sparse.field("id"), Some(FieldRef::Str("two")));
        assert_eq!(
            parse_object(body, 1024).unwrap().field("id"),
            Some(FieldRef::Json(&json!("two")))
        );
    }

    #[test]
    fn errs_like_parse_object() {
        let names = wanted(&["order_id"]);
        for bad in [&b"[1, 2]"[..], b"\"text\"", b"3", b"null", b"true"] {
            assert!(matches!(
                parse_fields(bad, 1024, &names),
                Err(PayloadError::NotObject)
            ));
            assert!(matches!(
                parse_object(bad, 1024),
                Err(PayloadError::NotObject)
            ));
        }
        for bad in [
            &b"not json"[..],
            b"{\"a\": }",
            b"{\"order_id\": 1} trailing",
            b"{\"pad\": [1,]}",
            b"{\"order_id\": [1,]}",
        ] {
            assert!(
                matches!(
                    parse_fields(bad, 1024, &names),
                    Err(PayloadError::NotJson(_))
                ),
                "{bad:?}"
            );
            assert!(matches!(
                parse_object(bad, 1024),
                Err(PayloadError::NotJson(_))
            ));
        }
        assert!(matches!(
            parse_fields(&[b' '; 2000], 1024, &names),
            Err(PayloadError::TooLarge { .. })
        ));
    }

    #[test]
    fn field_refs_name_their_kind_without_echoing_data() {
        assert_eq!(FieldRef::Str("").kind(), "an empty string");
        assert_eq!(FieldRef::Str("secret").kind(), "a string");
        assert_eq!(FieldRef::Json(&json!(1.5)).kind(), "a fractional number");
        assert!(FieldRef::Json(&Value::Null).is_null());
        assert!(!FieldRef::Str("null").is_null());
    }
}
