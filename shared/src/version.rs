//! Versions that order changes to one cache entry.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::payload::FieldRef;

/// A monotonically increasing version of one entry. Higher wins.
///
/// Built from a non-negative integer (a counter, a sequence number, epoch milliseconds), a
/// string of digits, or a timestamp (see [`parse_timestamp`]), which becomes nanoseconds since
/// the Unix epoch.
/// One topic or queue should use one kind: a counter and a timestamp do not compare sensibly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(u64);

/// Why a version field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// A negative number, a fraction, or a number past `u64::MAX`.
    #[error("version must be a whole number from 0 to 18446744073709551615")]
    OutOfRange,
    /// A string that is neither digits nor a timestamp.
    #[error("version string is neither digits nor an RFC 3339 or `YYYY-MM-DD HH:MM:SS` timestamp")]
    Unparsable,
    /// A timestamp before 1970.
    #[error("version timestamp is before 1970-01-01")]
    BeforeEpoch,
    /// A JSON value that cannot be a version (object, array, bool, null).
    #[error("version must be a number or a string, found {0}")]
    WrongType(&'static str),
}

impl Version {
    /// A version from a plain number.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The number that orders this version.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Reads a version from a payload field.
    pub fn from_field(field: FieldRef<'_>) -> Result<Self, VersionError> {
        match field {
            FieldRef::Str(text) => text.parse(),
            FieldRef::Json(value) => Self::from_json(value),
        }
    }

    /// Reads a version from a JSON field value.
    pub fn from_json(value: &Value) -> Result<Self, VersionError> {
        match value {
            Value::Number(n) => n.as_u64().map(Self).ok_or(VersionError::OutOfRange),
            Value::String(s) => s.parse(),
            Value::Null => Err(VersionError::WrongType("null")),
            Value::Bool(_) => Err(VersionError::WrongType("a bool")),
            Value::Array(_) => Err(VersionError::WrongType("an array")),
            Value::Object(_) => Err(VersionError::WrongType("an object")),
        }
    }
}

impl std::str::FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<u64>()
                .map(Self)
                .map_err(|_| VersionError::OutOfRange);
        }
        let ts = parse_timestamp(s).ok_or(VersionError::Unparsable)?;
        let nanos = ts.unix_timestamp_nanos();
        u64::try_from(nanos)
            .map(Self)
            .map_err(|_| VersionError::BeforeEpoch)
    }
}

/// A timestamp in RFC 3339, or in the `2023-01-01 10:00:00` form (optionally with a fraction
/// of a second) that many producers send, read as UTC. Timestamps of one producer in its local
/// time still order rightly, save across the hour a clock goes back.
pub fn parse_timestamp(text: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t);
    }
    let plain = format_description!(
        version = 2,
        "[year]-[month]-[day] [hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    PrimitiveDateTime::parse(text, plain)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VersionVisitor;

        impl Visitor<'_> for VersionVisitor {
            type Value = Version;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer, a string of digits or a timestamp")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Version, E> {
                Ok(Version(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Version, E> {
                u64::try_from(v)
                    .map(Version)
                    .map_err(|_| E::custom(VersionError::OutOfRange))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Version, E> {
                Err(E::custom(VersionError::OutOfRange))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Version, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_any(VersionVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_digit_strings_are_versions() {
        assert_eq!(Version::from_json(&json!(3)).unwrap(), Version::new(3));
        assert_eq!(Version::from_json(&json!("42")).unwrap(), Version::new(42));
        assert_eq!(
            Version::from_json(&json!(u64::MAX)).unwrap(),
            Version::new(u64::MAX)
        );
    }

    #[test]
    fn rfc3339_timestamps_order_by_time() {
        let a = Version::from_json(&json!("2023-01-01T10:00:00Z")).unwrap();
        let b = Version::from_json(&json!("2023-01-01T10:00:00.000001Z")).unwrap();
        let c = Version::from_json(&json!("2023-01-01T11:00:00+01:00")).unwrap();
        assert!(a < b);
        assert_eq!(
            a, c,
            "the same instant in another offset is the same version"
        );
        assert_eq!(a.get(), 1_672_567_200_000_000_000);
    }

    #[test]
    fn the_plain_date_time_form_producers_send_is_a_utc_timestamp() {
        let plain = Version::from_json(&json!("2023-01-01 10:00:00")).unwrap();
        assert_eq!(
            plain,
            Version::from_json(&json!("2023-01-01T10:00:00Z")).unwrap()
        );
        let later = Version::from_json(&json!("2023-01-01 10:00:00.25")).unwrap();
        assert_eq!(later.get() - plain.get(), 250_000_000);
        assert_eq!(
            Version::from_json(&json!("2023-01-01 10:00")),
            Err(VersionError::Unparsable)
        );
    }

    #[test]
    fn bad_versions_are_refused() {
        assert_eq!(
            Version::from_json(&json!(-1)),
            Err(VersionError::OutOfRange)
        );
        assert_eq!(
            Version::from_json(&json!(1.5)),
            Err(VersionError::OutOfRange)
        );
        assert_eq!(
            Version::from_json(&json!("yesterday")),
            Err(VersionError::Unparsable)
        );
        assert_eq!(
            Version::from_json(&json!("99999999999999999999999")),
            Err(VersionError::OutOfRange)
        );
        assert_eq!(
            Version::from_json(&json!("1969-12-31T23:59:59Z")),
            Err(VersionError::BeforeEpoch)
        );
        assert!(matches!(
            Version::from_json(&json!({"v": 1})),
            Err(VersionError::WrongType(_))
        ));
    }

    #[test]
    fn deserializes_from_envelope_fields() {
        let v: Version = serde_json::from_str("7").unwrap();
        assert_eq!(v, Version::new(7));
        let v: Version = serde_json::from_str("\"2024-05-01T00:00:00Z\"").unwrap();
        assert!(v.get() > 0);
        assert!(serde_json::from_str::<Version>("-4").is_err());
    }
}
