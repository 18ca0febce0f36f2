//! Request bodies with unknown fields are refused.
//!
//! Types that only ever arrive in a request carry `#[serde(deny_unknown_fields)]`
//! (which also works on the internally tagged `CreateEnvironment`). A few types arrive
//! in requests *and* are read back from the catalog (`GuestPlan` in `net` snapshots,
//! `Keep` in policies, `NicConfig` in stored VM configurations): rows written by another
//! version of weftd must keep reading, so those types stay lenient and are checked only
//! on the request path, by [`Strict`] (a whole body) or [`fields`] (a field of one).

use std::fmt;

use serde::de::{DeserializeOwned, Visitor};
use serde::{forward_to_deserialize_any, Deserialize, Deserializer};

/// The field names a derived `Deserialize` of a struct asks for (its own list, renames
/// included), learnt by handing it a deserializer that only records them.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut names));
    names
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field names recorded")
    }
}

impl std::error::Error for Stop {}

impl serde::de::Error for Stop {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        *self.0 = fields;
        Err(Stop)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

/// `T` read from `input`, refusing first (as `deny_unknown_fields` does) a key of the
/// input object that is not one of `T`'s fields.
fn check<T: DeserializeOwned, E: serde::de::Error>(input: serde_json::Value) -> Result<T, E> {
    if let serde_json::Value::Object(m) = &input {
        let known = field_names::<T>();
        if let Some(unknown) = m.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(E::unknown_field(unknown, known));
        }
    }
    serde_json::from_value(input).map_err(E::custom)
}

/// A request body of a type that is also stored: unknown fields are refused here only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strict<T>(pub T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Strict<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        check(serde_json::Value::deserialize(d)?).map(Strict)
    }
}

/// `#[serde(deserialize_with = "crate::strict::fields")]` on a request field whose
/// type is also stored.
pub fn fields<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    check(serde_json::Value::deserialize(d)?)
}

/// [`fields`] for a list.
pub fn each<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    Vec::<serde_json::Value>::deserialize(d)?
        .into_iter()
        .map(check)
        .collect()
}

/// Makes the message of a refused body one line for the operator: what serde said,
/// with field names in double quotes (`unknown field "foo", expected one of "a", "b"`),
/// without axum's preamble.
pub fn body_error(text: &str) -> String {
    let text = text
        .strip_prefix("Failed to deserialize the JSON body into the target type: ")
        .or_else(|| text.strip_prefix("Failed to parse the request body as JSON: "))
        .unwrap_or(text);
    let text = text.replace('`', "\"");
    // serde_path_to_error names an unknown top-level field twice ("f: unknown field \"f\"").
    let text = match text.split_once(": unknown field \"") {
        Some((path, rest)) if rest.starts_with(&format!("{path}\"")) => {
            format!("unknown field \"{rest}")
        }
        _ => text,
    };
    // "… at line 1 column 0" says nothing once the body was buffered (tagged enums).
    let text = text
        .strip_suffix(" at line 1 column 0")
        .unwrap_or(&text)
        .to_string();
    // The caller's own text (a key, a value) is quoted back: one line, no control
    // characters, bounded.
    let mut line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if line.chars().count() > MAX_REASON {
        line = line.chars().take(MAX_REASON).collect::<String>() + "…";
    }
    format!("invalid request body: {line}")
}

/// The longest reason [`body_error`] quotes back, in characters.
const MAX_REASON: usize = 300;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_are_one_bounded_line() {
        let key = format!("a\nb\u{7}{}", "x".repeat(5000));
        let text = format!("unknown field `{key}`, expected `name`");
        let e = body_error(&text);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
        assert!(e.chars().count() < MAX_REASON + 40, "{}", e.len());
        assert!(
            e.starts_with("invalid request body: unknown field \"a b"),
            "{e}"
        );
    }
    use crate::net::GuestPlan;
    use crate::snapshot::Keep;
    use crate::vm::NicConfig;

    #[test]
    fn stored_types_are_strict_on_the_request_path_only() {
        let plan = r#"{"guest_ip":"10.0.0.2","guest_prefix":24,"gateway":"10.0.0.1"}"#;
        let extra = r#"{"guest_ip":"10.0.0.2","guest_prefix":24,"gateway":"10.0.0.1","dns":"x"}"#;
        assert!(serde_json::from_str::<Strict<GuestPlan>>(plan).is_ok());
        let e = serde_json::from_str::<Strict<GuestPlan>>(extra).unwrap_err();
        assert!(e.to_string().contains("unknown field `dns`"), "{e}");
        assert!(e.to_string().contains("`guest_prefix`"), "{e}");
        // The stored type itself still reads a row with a field it does not know.
        assert!(serde_json::from_str::<GuestPlan>(extra).is_ok());

        #[derive(Debug, Deserialize)]
        struct Body {
            #[serde(deserialize_with = "fields")]
            keep: Keep,
            #[serde(deserialize_with = "each")]
            nics: Vec<NicConfig>,
        }
        let ok =
            r#"{"keep":{"last":3},"nics":[{"id":"net0","tap":"t0","mac":"52:54:00:00:00:01"}]}"#;
        let b: Body = serde_json::from_str(ok).unwrap();
        assert_eq!((b.keep.last, b.nics.len()), (3, 1));
        for bad in [
            r#"{"keep":{"last":3,"yearly":1},"nics":[]}"#,
            r#"{"keep":{},"nics":[{"id":"net0","tap":"t0","mac":"52:54:00:00:00:01","model":"e1000"}]}"#,
        ] {
            let e = serde_json::from_str::<Body>(bad).unwrap_err().to_string();
            assert!(e.contains("unknown field"), "{bad}: {e}");
        }
        // Missing and mistyped fields are reported as serde reports them.
        let e = serde_json::from_str::<Strict<GuestPlan>>(r#"{"guest_ip":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("invalid IP"), "{e}");
    }

    #[test]
    fn body_errors_read_as_one_line() {
        assert_eq!(
            body_error("Failed to deserialize the JSON body into the target type: unknown field `foo`, expected one of `a`, `b` at line 1 column 10"),
            "invalid request body: unknown field \"foo\", expected one of \"a\", \"b\" at line 1 column 10"
        );
        assert_eq!(
            body_error("Failed to deserialize the JSON body into the target type: unknown field `zz`, expected `name` or `qmp_socket` at line 1 column 0"),
            "invalid request body: unknown field \"zz\", expected \"name\" or \"qmp_socket\""
        );
        assert!(!body_error("a\nb").contains('\n'));
        assert_eq!(
            body_error("zz: unknown field `zz`, expected `a`"),
            "invalid request body: unknown field \"zz\", expected \"a\""
        );
        assert_eq!(
            body_error("nics[0]: unknown field `model`, expected `id`"),
            "invalid request body: nics[0]: unknown field \"model\", expected \"id\""
        );
    }
}
