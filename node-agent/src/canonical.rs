//! The canonical encoding of a signed document (a deployment), so that what is signed does not
//! depend on how the JSON was written.
//!
//! Definition (version 1):
//! - The document is first parsed into its typed form and serialized back to a JSON value, so
//!   unknown fields are refused before hashing and an absent optional field equals `null`.
//! - Objects are written with their keys sorted by their UTF-8 bytes, no whitespace anywhere.
//! - Strings are written as JSON strings with only `"` `\\` and control characters (< 0x20)
//!   escaped, as `\"`, `\\` and `\u00XX` (lower-case hex); everything else as its UTF-8 bytes.
//! - Numbers must be integers (u64 or i64), written in decimal without sign for non-negative
//!   values; floating-point numbers are refused.
//! - `true`, `false`, `null` as themselves; arrays in their order.
//!
//! The hash is BLAKE3 of the domain string `gridnode/canonical/v1\n` followed by that encoding.
//! Reordering fields or changing whitespace therefore keeps the hash; any value change
//! (including array order) changes it.

use serde_json::Value;

/// Domain separation for the canonical hash.
pub const DOMAIN: &[u8] = b"gridnode/canonical/v1\n";

/// Why a value has no canonical encoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CanonicalError {
    #[error("floating-point number {0} has no canonical encoding (use integers)")]
    Float(String),
}

/// Appends the canonical encoding of `value` to `out`.
pub fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else {
                return Err(CanonicalError::Float(n.to_string()));
            }
        }
        Value::String(s) => encode_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encode(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encode_str(key, out);
                out.push(b':');
                // The key came from the map, so the lookup cannot miss.
                if let Some(v) = map.get(key) {
                    encode(v, out)?;
                }
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// The canonical bytes of a serializable document.
pub fn to_bytes<T: serde::Serialize>(doc: &T) -> anyhow::Result<Vec<u8>> {
    let value = serde_json::to_value(doc)?;
    let mut out = Vec::new();
    encode(&value, &mut out)?;
    Ok(out)
}

/// The canonical hash of a serializable document.
pub fn hash<T: serde::Serialize>(doc: &T) -> anyhow::Result<[u8; 32]> {
    let bytes = to_bytes(doc)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(DOMAIN);
    hasher.update(&bytes);
    Ok(*hasher.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canon(text: &str) -> Vec<u8> {
        let v: Value = serde_json::from_str(text).unwrap();
        let mut out = Vec::new();
        encode(&v, &mut out).unwrap();
        out
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = canon(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#);
        let b = canon("{\n  \"a\":{\"x\":\"s\",\"y\":[1,2]},\"b\":1}");
        assert_eq!(a, b);
        assert_eq!(a, br#"{"a":{"x":"s","y":[1,2]},"b":1}"#.to_vec());
    }

    #[test]
    fn every_value_change_changes_the_encoding() {
        let base = canon(r#"{"a": [1, 2], "b": "x", "c": true, "d": null}"#);
        for other in [
            r#"{"a": [2, 1], "b": "x", "c": true, "d": null}"#,
            r#"{"a": [1, 2], "b": "X", "c": true, "d": null}"#,
            r#"{"a": [1, 2], "b": "x", "c": false, "d": null}"#,
            r#"{"a": [1, 2], "b": "x", "c": true, "d": 0}"#,
            r#"{"a": [1, 2], "b": "x", "c": true}"#,
            r#"{"a": [1, 2], "b": "x ", "c": true, "d": null}"#,
            r#"{"a": [1, 2, 3], "b": "x", "c": true, "d": null}"#,
        ] {
            assert_ne!(canon(other), base, "{other}");
        }
    }

    #[test]
    fn strings_escape_only_what_json_needs() {
        assert_eq!(
            canon(r#""a\"b\\c\n\u0001é/""#),
            "\"a\\\"b\\\\c\\u000a\\u0001é/\"".as_bytes()
        );
        // The same string written with different escapes encodes the same.
        assert_eq!(canon(r#""\u00e9\/""#), canon(r#""é/""#));
    }

    #[test]
    fn floats_are_refused_and_negative_integers_kept() {
        let mut out = Vec::new();
        assert!(matches!(
            encode(&json!(1.5), &mut out),
            Err(CanonicalError::Float(_))
        ));
        out.clear();
        encode(&json!(-3), &mut out).unwrap();
        assert_eq!(out, b"-3");
    }

    #[test]
    fn hash_is_domain_separated() {
        let v = json!({"a": 1});
        let plain = blake3::hash(br#"{"a":1}"#);
        assert_ne!(hash(&v).unwrap(), *plain.as_bytes());
    }
}
