//! Parsing of the lines a QMP peer sends: greeting, replies and events.
//!
//! The peer is untrusted. Everything here works on raw JSON (`serde_json::Value`) rather
//! than on qapi's typed message enums, for two reasons: qapi's `Event` enum and
//! `ErrorClass` enum are closed, so an event or error class added by a newer QEMU would
//! make a whole line unparsable; and the typed forms hide the reply id we need for
//! matching concurrent commands. Typed decoding happens later, per command
//! ([`crate::Qmp::execute`]) or per event ([`Event::parse`]).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::Error;

/// The longest line (one JSON message) accepted from a peer, in bytes.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

/// One message received from a QMP peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting a QMP server sends when a client connects.
    Greeting(Greeting),
    /// A reply to a command.
    Reply(Reply),
    /// An asynchronous event.
    Event(Event),
}

/// The QMP greeting: `{"QMP": {"version": {...}, "capabilities": [...]}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version as (major, minor, micro).
    pub version: (u32, u32, u32),
    /// QEMU's package string (e.g. `Debian 1:7.2+dfsg-7`), empty if absent.
    pub package: String,
    /// Capabilities the server offers (e.g. `oob`).
    pub capabilities: Vec<String>,
}

/// A reply to a command: its id (if any) and either the return value or QEMU's error.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The id the command carried; `None` if the reply had none.
    pub id: Option<Value>,
    /// The `return` value, or the `error` member's class and description.
    pub result: Result<Value, QmpError>,
}

/// The `error` member of a QMP error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// QEMU's error class, kept as a string so unknown classes survive.
    pub class: String,
    /// QEMU's description.
    pub desc: String,
}

impl From<QmpError> for Error {
    fn from(e: QmpError) -> Self {
        Error::Qmp {
            class: e.class,
            desc: e.desc,
        }
    }
}

/// An asynchronous QMP event, kept as raw JSON so that events unknown to this crate
/// (from a newer QEMU) never break parsing.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `STOP` or `JOB_STATUS_CHANGE`.
    pub name: String,
    /// The event's `data` member; an empty object if the event had none.
    pub data: Value,
    /// QEMU's timestamp as (seconds, microseconds) since the epoch.
    pub timestamp: (u64, u64),
}

impl Event {
    /// Decodes the event's `data` into `T` (e.g. one of `qapi::qmp`'s event structs).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.data)
            .map_err(|e| Error::protocol(format!("cannot decode data of event {}: {e}", self.name)))
    }

    /// Decodes the event as the typed qapi event `E` if its name is `E::NAME`.
    pub fn typed<E: qapi::Event>(&self) -> Option<Result<E, Error>> {
        (self.name == E::NAME).then(|| self.parse())
    }

    /// A string member of `data`, if present.
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// Parses one line sent by a QMP peer (without or with its trailing newline).
///
/// Never panics; anything that is not a greeting, a reply or an event is
/// [`Error::Protocol`].
pub fn parse_message(line: &[u8]) -> Result<Message, Error> {
    if line.len() > MAX_MESSAGE_LEN {
        return Err(Error::protocol(format!(
            "message of {} bytes exceeds the limit of {MAX_MESSAGE_LEN} bytes",
            line.len()
        )));
    }
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| Error::protocol(format!("malformed json: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(Error::protocol("message is not a json object"));
    };

    if let Some(qmp) = obj.remove("QMP") {
        return parse_greeting(qmp).map(Message::Greeting);
    }
    if let Some(name) = obj.get("event") {
        let name = name
            .as_str()
            .ok_or_else(|| Error::protocol("event name is not a string"))?
            .to_owned();
        let data = match obj.remove("data") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(d) => d,
        };
        let timestamp = obj.get("timestamp").map(parse_timestamp).unwrap_or((0, 0));
        return Ok(Message::Event(Event {
            name,
            data,
            timestamp,
        }));
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(Message::Reply(Reply {
            id,
            result: Ok(ret),
        }));
    }
    if let Some(err) = obj.get("error") {
        let class = err.get("class").and_then(Value::as_str);
        let desc = err.get("desc").and_then(Value::as_str);
        let (Some(class), Some(desc)) = (class, desc) else {
            return Err(Error::protocol("error reply lacks a string class or desc"));
        };
        return Ok(Message::Reply(Reply {
            id,
            result: Err(QmpError {
                class: class.to_owned(),
                desc: desc.to_owned(),
            }),
        }));
    }
    Err(Error::protocol(
        "message is neither a greeting, a reply nor an event",
    ))
}

fn parse_greeting(qmp: Value) -> Result<Greeting, Error> {
    let version = qmp
        .get("version")
        .ok_or_else(|| Error::protocol("greeting lacks a version"))?;
    let q = version.get("qemu");
    let part = |k: &str| -> Result<u32, Error> {
        q.and_then(|q| q.get(k))
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::protocol(format!("greeting version lacks a valid qemu.{k}")))
    };
    let v = (part("major")?, part("minor")?, part("micro")?);
    let package = version
        .get("package")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let capabilities = match qmp.get("capabilities") {
        Some(Value::Array(caps)) => caps
            .iter()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect(),
        None => Vec::new(),
        Some(_) => return Err(Error::protocol("greeting capabilities is not an array")),
    };
    Ok(Greeting {
        version: v,
        package,
        capabilities,
    })
}

fn parse_timestamp(ts: &Value) -> (u64, u64) {
    let field = |k: &str| ts.get(k).and_then(Value::as_u64).unwrap_or(0);
    (field("seconds"), field("microseconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn greeting_from_qemu_7_2() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;
        let Message::Greeting(g) = parse_message(line).expect("parses") else {
            panic!("not a greeting")
        };
        assert_eq!(g.version, (7, 2, 0));
        assert_eq!(g.package, "Debian 1:7.2+dfsg-7");
        assert_eq!(g.capabilities, vec!["oob".to_owned()]);
    }

    #[test]
    fn greeting_without_version_is_rejected() {
        assert!(matches!(
            parse_message(br#"{"QMP": {"capabilities": []}}"#),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            parse_message(
                br#"{"QMP": {"version": {"qemu": {"major": -1, "minor": 0, "micro": 0}}}}"#
            ),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn reply_with_return_and_id() {
        let m = parse_message(br#"{"return": {"running": true}, "id": 7}"#).expect("parses");
        assert_eq!(
            m,
            Message::Reply(Reply {
                id: Some(json!(7)),
                result: Ok(json!({"running": true}))
            })
        );
    }

    #[test]
    fn error_reply_keeps_unknown_class() {
        let m = parse_message(
            br#"{"error": {"class": "SomeFutureClass", "desc": "it broke"}, "id": "x"}"#,
        )
        .expect("parses");
        let Message::Reply(r) = m else {
            panic!("not a reply")
        };
        assert_eq!(r.id, Some(json!("x")));
        assert_eq!(
            r.result,
            Err(QmpError {
                class: "SomeFutureClass".into(),
                desc: "it broke".into()
            })
        );
    }

    #[test]
    fn error_reply_without_desc_is_protocol_error() {
        assert!(matches!(
            parse_message(br#"{"error": {"class": "GenericError"}}"#),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn unknown_event_is_kept_raw() {
        let m = parse_message(
            br#"{"event": "FROM_THE_FUTURE", "data": {"a": [1]}, "timestamp": {"seconds": 5, "microseconds": 6}}"#,
        )
        .expect("parses");
        let Message::Event(e) = m else {
            panic!("not an event")
        };
        assert_eq!(e.name, "FROM_THE_FUTURE");
        assert_eq!(e.data, json!({"a": [1]}));
        assert_eq!(e.timestamp, (5, 6));
    }

    #[test]
    fn event_without_data_gets_empty_object() {
        let Message::Event(e) = parse_message(br#"{"event": "STOP"}"#).expect("parses") else {
            panic!("not an event")
        };
        assert_eq!(e.data, json!({}));
        assert_eq!(e.timestamp, (0, 0));
    }

    #[test]
    fn typed_event_decoding() {
        let Message::Event(e) = parse_message(
            br#"{"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "concluded"}}"#,
        )
        .expect("parses") else {
            panic!("not an event")
        };
        let typed = e
            .typed::<qapi::qmp::JOB_STATUS_CHANGE>()
            .expect("name matches")
            .expect("decodes");
        assert_eq!(typed.id, "j1");
        assert!(e.typed::<qapi::qmp::STOP>().is_none());
        assert_eq!(e.data_str("status"), Some("concluded"));
    }

    #[test]
    fn garbage_is_protocol_error() {
        for line in [
            &b"not json"[..],
            b"[1,2,3]",
            b"42",
            b"{\"foo\": 1}",
            b"{\"event\": 5}",
            b"\xff\xfe",
            b"",
        ] {
            assert!(
                matches!(parse_message(line), Err(Error::Protocol(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let line = vec![b'['; 100_000];
        assert!(matches!(parse_message(&line), Err(Error::Protocol(_))));
    }
}
