//! Key templates such as `order:{order_id}`, filled from fields of a JSON payload.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::envelope::PayloadError;
use crate::payload::{FieldRef, PayloadFields};

/// A parsed key template: literal text with `{field}` placeholders.
///
/// A placeholder names a top-level field, or a nested one with dots (`{customer.id}`). The
/// field must be a string or an integer. `{{` and `}}` stand for literal braces, so a Redis
/// Cluster hash tag is written `user:{{{user_id}}}:orders`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Vec<String>),
}

/// Why a template string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`, or a lone `}`.
    #[error("unbalanced brace at byte {0}")]
    Unbalanced(usize),
    /// `{}` or a placeholder with an empty path segment.
    #[error("empty field name at byte {0}")]
    EmptyField(usize),
    /// A template with no placeholder would map every message to one key.
    #[error("template has no {{field}} placeholder")]
    NoField,
}

impl KeyTemplate {
    /// Parses a template.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let bytes = source.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'{' if bytes.get(i + 1) == Some(&b'{') => {
                    literal.push('{');
                    i += 2;
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    literal.push('}');
                    i += 2;
                }
                b'{' => {
                    let end = source[i + 1..]
                        .find('}')
                        .map(|off| i + 1 + off)
                        .ok_or(TemplateError::Unbalanced(i))?;
                    let name = &source[i + 1..end];
                    if name.contains('{') {
                        return Err(TemplateError::Unbalanced(i));
                    }
                    let path: Vec<String> = name.split('.').map(str::to_string).collect();
                    if path.iter().any(|s| s.trim().is_empty()) {
                        return Err(TemplateError::EmptyField(i));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(path));
                    i = end + 1;
                }
                b'}' => return Err(TemplateError::Unbalanced(i)),
                _ => {
                    let ch = source[i..]
                        .chars()
                        .next()
                        .expect("index is on a char boundary");
                    literal.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(TemplateError::NoField);
        }
        Ok(Self {
            source: source.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The fields the template reads, dotted.
    pub fn fields(&self) -> impl Iterator<Item = String> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(path) => Some(path.join(".")),
            Part::Literal(_) => None,
        })
    }

    /// Fills the template from a payload's fields, appending the key to `out`.
    ///
    /// Writing into a caller's buffer lets a batch reuse one allocation.
    pub fn render_into(
        &self,
        payload: &impl PayloadFields,
        out: &mut String,
    ) -> Result<(), PayloadError> {
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Field(path) => {
                    let value =
                        lookup(payload, path).ok_or_else(|| PayloadError::MissingField {
                            field: path.join("."),
                        })?;
                    match (value.as_str(), value) {
                        (Some(text), _) if !text.is_empty() => out.push_str(text),
                        (_, FieldRef::Json(Value::Number(n))) if n.is_i64() || n.is_u64() => {
                            use std::fmt::Write;
                            let _ = write!(out, "{n}");
                        }
                        _ => {
                            return Err(PayloadError::InvalidField {
                                field: path.join("."),
                                reason: format!(
                                    "key fields must be a non-empty string or an integer, found {}",
                                    value.kind()
                                ),
                            })
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Fills the template from a payload's fields.
    pub fn render(&self, payload: &impl PayloadFields) -> Result<String, PayloadError> {
        let mut key = String::with_capacity(self.source.len() + 16);
        self.render_into(payload, &mut key)?;
        Ok(key)
    }
}

/// A dotted path's value: its first segment is a field of the payload, the rest walk into
/// nested objects.
fn lookup<'a>(payload: &'a impl PayloadFields, path: &[String]) -> Option<FieldRef<'a>> {
    let (first, rest) = path.split_first()?;
    let mut value = payload.field(first)?;
    for segment in rest {
        let FieldRef::Json(Value::Object(object)) = value else {
            return None;
        };
        value = FieldRef::Json(object.get(segment)?);
    }
    Some(value)
}

/// A short name of a JSON value's type, for error messages that must not echo data.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "a number",
        Value::String(s) if s.is_empty() => "an empty string",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl fmt::Debug for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyTemplate({:?})", self.source)
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Serialize for KeyTemplate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for KeyTemplate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        KeyTemplate::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::parse_object;
    use crate::payload::parse_fields;
    use serde_json::{json, Map};

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_sparse_payload_renders_as_the_parsed_object_does() {
        let templates = ["order:{order_id}", "c:{customer.id}:{order_id}", "{a}{{x}}"];
        let bodies = [
            r#"{"order_id": "1001", "customer": {"id": 7}, "a": "b"}"#,
            r#"{"order_id": 5, "customer": {"id": "c\u00e9"}, "a": 1}"#,
            r#"{"order_id": "", "customer": {"id": 1.5}, "a": null}"#,
            r#"{"order_id": [1], "customer": "flat", "a": true}"#,
            r#"{"customer": {}, "a": {"b": 1}}"#,
            r#"{"order_id": -3, "order_id": "later", "a": "x\"y"}"#,
        ];
        for source in templates {
            let template = KeyTemplate::parse(source).unwrap();
            let wanted: Vec<String> = template
                .fields()
                .map(|field| field.split('.').next().unwrap().to_string())
                .collect();
            for body in bodies {
                let full = parse_object(body.as_bytes(), 1024).unwrap();
                let sparse = parse_fields(body.as_bytes(), 1024, &wanted).unwrap();
                assert_eq!(
                    template.render(&sparse),
                    template.render(&full),
                    "{source} {body}"
                );
            }
        }
    }

    #[test]
    fn fills_from_plain_producer_json() {
        let t = KeyTemplate::parse("order:{order_id}").unwrap();
        let p = obj(json!({"order_id": "1001", "user_id": "u1", "amount": 299.99}));
        assert_eq!(t.render(&p).unwrap(), "order:1001");
        let p = obj(json!({"amount": 1, "order_id": 1001}));
        assert_eq!(t.render(&p).unwrap(), "order:1001");
    }

    #[test]
    fn several_and_nested_fields() {
        let t = KeyTemplate::parse("user:{user.id}:order:{order_id}").unwrap();
        let p = obj(json!({"user": {"id": "u9"}, "order_id": 5}));
        assert_eq!(t.render(&p).unwrap(), "user:u9:order:5");
        assert_eq!(t.fields().collect::<Vec<_>>(), vec!["user.id", "order_id"]);
    }

    #[test]
    fn escaped_braces_make_hash_tags() {
        let t = KeyTemplate::parse("user:{{{user_id}}}:orders").unwrap();
        let p = obj(json!({"user_id": "u1"}));
        assert_eq!(t.render(&p).unwrap(), "user:{u1}:orders");
    }

    #[test]
    fn missing_and_invalid_fields_are_typed_errors() {
        let t = KeyTemplate::parse("order:{order_id}").unwrap();
        assert_eq!(
            t.render(&obj(json!({"id": 1}))),
            Err(PayloadError::MissingField {
                field: "order_id".into()
            })
        );
        assert!(matches!(
            t.render(&obj(json!({"order_id": {"a": 1}}))),
            Err(PayloadError::InvalidField { .. })
        ));
        assert!(matches!(
            t.render(&obj(json!({"order_id": 1.5}))),
            Err(PayloadError::InvalidField { .. })
        ));
        assert!(matches!(
            t.render(&obj(json!({"order_id": ""}))),
            Err(PayloadError::InvalidField { .. })
        ));
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(KeyTemplate::parse("order:"), Err(TemplateError::NoField));
        assert_eq!(
            KeyTemplate::parse("order:{id"),
            Err(TemplateError::Unbalanced(6))
        );
        assert_eq!(
            KeyTemplate::parse("order:}"),
            Err(TemplateError::Unbalanced(6))
        );
        assert_eq!(
            KeyTemplate::parse("order:{}"),
            Err(TemplateError::EmptyField(6))
        );
        assert!(KeyTemplate::parse("o:{a.}").is_err());
    }
}
