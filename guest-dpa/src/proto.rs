//! The DPA wire protocol: versioned, length-prefixed, checksummed frames over one
//! stream connection (virtio-vsock from the guest to the host, CID 2, port
//! [`DPA_PORT`]). `docs/provenance-protocol.md` is the reference for other
//! implementations; this module is the one both sides of weft link against.
//!
//! A frame is `len: u32 LE | kind: u8 | payload | crc: u32 LE` where `len` counts the
//! payload only, `crc` is CRC-32C over `kind | payload`, and the payload is the
//! message's fields encoded with postcard (serde, compact varints). Everything a peer
//! sends is bounded ([`MAX_PAYLOAD`], [`Limits`]) and validated before use: the guest is
//! untrusted, and garbage ends that connection with an [`Error`], nothing else.

use serde::{Deserialize, Serialize};

/// Version of the DPA wire protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;

/// The vsock port weftd listens on for DPA connections (the guest connects to CID 2).
pub const DPA_PORT: u32 = 5150;

/// Bytes of a frame header (`len` and `kind`) and trailer (`crc`).
pub const HEADER: usize = 5;
/// Bytes of the CRC-32C trailer.
pub const TRAILER: usize = 4;
/// The largest payload a frame may carry; larger lengths end the connection.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Size limits on entries (enforced by [`Entry::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries in one batch.
    pub batch_entries: usize,
    /// Longest source, collection or key, in bytes.
    pub name: usize,
    /// Longest old or new value, in bytes (JSON text).
    pub value: usize,
}

/// The limits weftd enforces and the DPA keeps to.
pub const LIMITS: Limits = Limits {
    batch_entries: 4096,
    name: 1024,
    value: 256 * 1024,
};

/// Capabilities a DPA may announce in its hello.
pub mod caps {
    /// Captures SQLite row changes through triggers.
    pub const SQLITE: &str = "sqlite";
    /// Captures JSON document changes at JSON-pointer level.
    pub const JSON: &str = "json";
    /// Captures key-value changes.
    pub const KV: &str = "kv";
    /// Accepts [`super::Message::Apply`] (state pushed in by the replay engine).
    pub const APPLY: &str = "apply";
}

/// The kind of application data a change refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// A row of a SQLite table (`collection` is the table, `key` the primary key as a
    /// JSON array, values are JSON objects of column → value).
    Sqlite,
    /// A value inside a JSON document (`source` is the file, `key` a JSON pointer,
    /// values are JSON texts).
    Json,
    /// A key of a key-value store (`source` is the file or directory, values are JSON
    /// strings).
    Kv,
}

impl DataType {
    /// The lower-case name used in the CLI, the API and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Sqlite => "sqlite",
            DataType::Json => "json",
            DataType::Kv => "kv",
        }
    }
}

/// What happened to the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// The item was created (`old` is absent).
    Insert,
    /// The item changed (`old` and `new` present).
    Update,
    /// The item was removed (`new` is absent).
    Delete,
    /// The definition of a SQLite table as the DPA found it (`new` is its
    /// `CREATE TABLE` statement as a JSON string; `key` is empty), sent before its
    /// first row change so that replay can rebuild the table.
    Schema,
}

impl Operation {
    /// The lower-case name used in the CLI, the API and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Schema => "schema",
        }
    }
}

/// One semantic change, as the guest reports it. The host adds the VM (from the
/// connection, never from the payload) and its receive time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The guest's sequence number: from 1, one more for every entry, across reboots
    /// (the DPA's spool keeps it). The host keeps each number once.
    pub seq: u64,
    /// The guest's clock when the change was captured, µs since the Unix epoch.
    pub guest_time_us: i64,
    /// sqlite, json or kv.
    pub data_type: DataType,
    /// insert, update, delete or schema.
    pub op: Operation,
    /// Where the data lives in the guest: a database file, a JSON file, a key-value
    /// file or directory (an absolute path).
    pub source: String,
    /// The table of a SQLite change; empty otherwise.
    pub collection: String,
    /// The item: a SQLite primary key (JSON array), a JSON pointer, a key.
    pub key: String,
    /// The value before the change, as JSON text.
    pub old: Option<String>,
    /// The value after the change, as JSON text.
    pub new: Option<String>,
    /// Changes made by one application transaction share this id (SQLite); absent
    /// where the source has no transactions.
    pub tx: Option<u64>,
}

impl Entry {
    /// Checks sizes, the operation's shape and that values are JSON.
    pub fn validate(&self, limits: &Limits) -> Result<(), Error> {
        let bad = |why: String| Err(Error::Invalid(format!("entry {}: {why}", self.seq)));
        if self.seq == 0 {
            return bad("sequence numbers start at 1".into());
        }
        for (what, s) in [
            ("source", &self.source),
            ("collection", &self.collection),
            ("key", &self.key),
        ] {
            if s.len() > limits.name {
                return bad(format!(
                    "{what} is {} bytes (limit {})",
                    s.len(),
                    limits.name
                ));
            }
            if s.chars().any(|c| c == '\0') {
                return bad(format!("{what} contains NUL"));
            }
        }
        if self.source.is_empty() || !self.source.starts_with('/') {
            return bad("source must be an absolute path".into());
        }
        match (self.data_type, self.op, self.collection.is_empty()) {
            (DataType::Sqlite, _, true) => return bad("a SQLite change names its table".into()),
            (DataType::Json | DataType::Kv, _, false) => {
                return bad("only SQLite changes name a collection".into())
            }
            (DataType::Json | DataType::Kv, Operation::Schema, _) => {
                return bad("only SQLite sources have a schema".into())
            }
            _ => {}
        }
        let shape = match self.op {
            Operation::Insert | Operation::Schema => self.old.is_none() && self.new.is_some(),
            Operation::Update => self.old.is_some() && self.new.is_some(),
            Operation::Delete => self.old.is_some() && self.new.is_none(),
        };
        if !shape {
            return bad(format!(
                "{} with old/new present = {}/{}",
                self.op.as_str(),
                self.old.is_some(),
                self.new.is_some()
            ));
        }
        for (what, v) in [("old", &self.old), ("new", &self.new)] {
            let Some(v) = v else { continue };
            if v.len() > limits.value {
                return bad(format!(
                    "{what} is {} bytes (limit {})",
                    v.len(),
                    limits.value
                ));
            }
            if serde_json::from_str::<serde::de::IgnoredAny>(v).is_err() {
                return bad(format!("{what} is not JSON"));
            }
        }
        Ok(())
    }
}

/// The guest's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The highest protocol version the DPA speaks.
    pub version: u16,
    /// What it captures and accepts ([`caps`]).
    pub capabilities: Vec<String>,
    /// The DPA's name and version, for logs.
    pub agent: String,
}

/// The host's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides use from now on.
    pub version: u16,
    /// The highest sequence number the host holds for this VM: the DPA resends from
    /// the next one (its spool keeps everything not acknowledged).
    pub acked: u64,
}

/// One state change the replay engine asks a DPA to make (apply mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Apply {
    /// The request's id, echoed in [`Applied`].
    pub id: u64,
    /// The changes, in order; `seq` and `guest_time_us` are ignored. SQLite changes
    /// are applied in one transaction per source.
    pub changes: Vec<Entry>,
}

/// The DPA's report on an [`Apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The [`Apply::id`].
    pub id: u64,
    /// How many changes were made.
    pub applied: u64,
    /// Why the rest was not, if anything failed (what was applied stays).
    pub error: Option<String>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Guest → host, first.
    Hello(Hello),
    /// Host → guest, the answer to hello.
    Welcome(Welcome),
    /// Guest → host: entries with consecutive sequence numbers.
    Batch(Vec<Entry>),
    /// Host → guest: every entry up to and including `upto` is durable on the host
    /// (cumulative).
    Ack {
        /// The highest durable sequence number.
        upto: u64,
    },
    /// Host → guest: changes to make (replay into a weave).
    Apply(Apply),
    /// Guest → host: the result of an [`Message::Apply`].
    Applied(Applied),
    /// Either way: why the sender closes the connection.
    Goodbye {
        /// A one-line reason.
        reason: String,
    },
}

const KIND_HELLO: u8 = 1;
const KIND_WELCOME: u8 = 2;
const KIND_BATCH: u8 = 3;
const KIND_ACK: u8 = 4;
const KIND_APPLY: u8 = 5;
const KIND_APPLIED: u8 = 6;
const KIND_GOODBYE: u8 = 7;

#[derive(Serialize, Deserialize)]
struct AckBody {
    upto: u64,
}

#[derive(Serialize, Deserialize)]
struct GoodbyeBody {
    reason: String,
}

/// Errors of the DPA protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer speaks a protocol version this build does not understand.
    #[error("unsupported dpa protocol version {0}")]
    Version(u16),
    /// A frame announced a payload over [`MAX_PAYLOAD`].
    #[error("frame of {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// A frame's checksum does not match its content.
    #[error("frame checksum mismatch")]
    Checksum,
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The payload does not decode as its kind's message.
    #[error("malformed {kind} frame: {reason}")]
    Malformed {
        /// The frame kind's name.
        kind: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// The message decodes but breaks a rule (sizes, shapes, order).
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Encodes `msg` as one frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let (kind, payload) = match msg {
        Message::Hello(h) => (KIND_HELLO, to_vec(h)),
        Message::Welcome(w) => (KIND_WELCOME, to_vec(w)),
        Message::Batch(b) => (KIND_BATCH, to_vec(b)),
        Message::Ack { upto } => (KIND_ACK, to_vec(&AckBody { upto: *upto })),
        Message::Apply(a) => (KIND_APPLY, to_vec(a)),
        Message::Applied(a) => (KIND_APPLIED, to_vec(a)),
        Message::Goodbye { reason } => (
            KIND_GOODBYE,
            to_vec(&GoodbyeBody {
                reason: reason.clone(),
            }),
        ),
    };
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing owned, plain data into a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_HELLO => "hello",
        KIND_WELCOME => "welcome",
        KIND_BATCH => "batch",
        KIND_ACK => "ack",
        KIND_APPLY => "apply",
        KIND_APPLIED => "applied",
        KIND_GOODBYE => "goodbye",
        _ => "unknown",
    }
}

/// Decodes one frame's payload of `kind` (after the length and checksum were checked).
/// Batches and applies are validated against `limits`.
pub fn decode_payload(kind: u8, payload: &[u8], limits: &Limits) -> Result<Message, Error> {
    fn de<'a, T: Deserialize<'a>>(kind: u8, payload: &'a [u8]) -> Result<T, Error> {
        let (v, rest) = postcard::take_from_bytes(payload).map_err(|e| Error::Malformed {
            kind: kind_name(kind),
            reason: e.to_string(),
        })?;
        if !rest.is_empty() {
            return Err(Error::Malformed {
                kind: kind_name(kind),
                reason: format!("{} trailing bytes", rest.len()),
            });
        }
        Ok(v)
    }
    let check_entries = |entries: &[Entry]| -> Result<(), Error> {
        if entries.len() > limits.batch_entries {
            return Err(Error::Invalid(format!(
                "{} entries in one frame (limit {})",
                entries.len(),
                limits.batch_entries
            )));
        }
        entries.iter().try_for_each(|e| e.validate(limits))
    };
    let msg = match kind {
        KIND_HELLO => Message::Hello(de(kind, payload)?),
        KIND_WELCOME => Message::Welcome(de(kind, payload)?),
        KIND_BATCH => {
            let entries: Vec<Entry> = de(kind, payload)?;
            check_entries(&entries)?;
            // checked: a guest's seq u64::MAX must not overflow (a panic in debug builds).
            if entries
                .windows(2)
                .any(|w| w[0].seq.checked_add(1) != Some(w[1].seq))
            {
                return Err(Error::Invalid(
                    "a batch's sequence numbers are not consecutive".into(),
                ));
            }
            Message::Batch(entries)
        }
        KIND_ACK => Message::Ack {
            upto: de::<AckBody>(kind, payload)?.upto,
        },
        KIND_APPLY => {
            let a: Apply = de(kind, payload)?;
            check_entries(&a.changes)?;
            Message::Apply(a)
        }
        KIND_APPLIED => Message::Applied(de(kind, payload)?),
        KIND_GOODBYE => Message::Goodbye {
            reason: de::<GoodbyeBody>(kind, payload)?.reason,
        },
        k => return Err(Error::Kind(k)),
    };
    Ok(msg)
}

/// An incremental frame decoder over a byte stream: feed it what was read, take
/// messages out. It never holds more than one frame (≤ [`MAX_PAYLOAD`] + 9 bytes) plus
/// what was fed in one call.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    limits: Option<Limits>,
}

impl Decoder {
    /// A decoder enforcing [`LIMITS`].
    pub fn new() -> Self {
        Self::with_limits(LIMITS)
    }

    /// A decoder enforcing `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        Decoder {
            buf: Vec::new(),
            limits: Some(limits),
        }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not form a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the next frame needs (at least 1 when a frame is
    /// incomplete, 0 when one is ready), or an error for an oversize length.
    pub fn wanted(&self) -> Result<usize, Error> {
        if self.buf.len() < HEADER {
            return Ok(HEADER - self.buf.len());
        }
        let len = self.frame_len()?;
        Ok((HEADER + len + TRAILER).saturating_sub(self.buf.len()))
    }

    fn frame_len(&self) -> Result<usize, Error> {
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(Error::TooLarge(len));
        }
        Ok(len)
    }

    /// The next whole message, `None` when more bytes are needed. After an error the
    /// stream cannot be resynchronised: close the connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, Error> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = self.frame_len()?;
        let total = HEADER + len + TRAILER;
        if self.buf.len() < total {
            return Ok(None);
        }
        let kind = self.buf[4];
        let payload = &self.buf[HEADER..HEADER + len];
        let crc = u32::from_le_bytes(
            self.buf[HEADER + len..total]
                .try_into()
                .map_err(|_| Error::Checksum)?,
        );
        if crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload) != crc {
            return Err(Error::Checksum);
        }
        let limits = self.limits.unwrap_or(LIMITS);
        let msg = decode_payload(kind, payload, &limits);
        self.buf.drain(..total);
        msg.map(Some)
    }
}

/// Picks the version both sides speak, or refuses.
pub fn negotiate(theirs: u16) -> Result<u16, Error> {
    if theirs == 0 {
        return Err(Error::Version(theirs));
    }
    Ok(theirs.min(PROTOCOL_VERSION))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            guest_time_us: 1_700_000_000_000_000,
            data_type: DataType::Sqlite,
            op: Operation::Update,
            source: "/data/app.db".into(),
            collection: "customers".into(),
            key: "[123]".into(),
            old: Some(r#"{"customer_name":"Alice"}"#.into()),
            new: Some(r#"{"customer_name":"Bob"}"#.into()),
            tx: Some(7),
        }
    }

    fn roundtrip(msg: Message) {
        let mut d = Decoder::new();
        let bytes = encode(&msg);
        // Byte by byte: frames split anywhere decode the same.
        for (i, b) in bytes.iter().enumerate() {
            d.feed(std::slice::from_ref(b));
            let got = d.next_message().unwrap();
            if i + 1 < bytes.len() {
                assert!(got.is_none());
            } else {
                assert_eq!(got, Some(msg.clone()));
            }
        }
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Hello(Hello {
            version: 1,
            capabilities: vec![caps::SQLITE.into(), caps::APPLY.into()],
            agent: "weft-dpa 0.1.0".into(),
        }));
        roundtrip(Message::Welcome(Welcome {
            version: 1,
            acked: 42,
        }));
        roundtrip(Message::Batch(vec![entry(5), entry(6), entry(7)]));
        roundtrip(Message::Ack { upto: u64::MAX });
        roundtrip(Message::Apply(Apply {
            id: 3,
            changes: vec![entry(1)],
        }));
        roundtrip(Message::Applied(Applied {
            id: 3,
            applied: 1,
            error: Some("no such table".into()),
        }));
        roundtrip(Message::Goodbye {
            reason: "bye".into(),
        });
    }

    #[test]
    fn two_frames_in_one_read_come_out_in_order() {
        let mut bytes = encode(&Message::Ack { upto: 1 });
        bytes.extend(encode(&Message::Ack { upto: 2 }));
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(d.next_message().unwrap(), Some(Message::Ack { upto: 1 }));
        assert_eq!(d.next_message().unwrap(), Some(Message::Ack { upto: 2 }));
        assert_eq!(d.next_message().unwrap(), None);
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let mut bytes = encode(&Message::Batch(vec![entry(1)]));
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert!(matches!(d.next_message(), Err(Error::Checksum)));
    }

    #[test]
    fn an_oversize_length_is_refused_before_reading_the_payload() {
        let mut d = Decoder::new();
        d.feed(&((MAX_PAYLOAD as u32 + 1).to_le_bytes()));
        d.feed(&[KIND_BATCH]);
        assert!(matches!(d.wanted(), Err(Error::TooLarge(_))));
        assert!(matches!(d.next_message(), Err(Error::TooLarge(_))));
    }

    #[test]
    fn unknown_kinds_and_trailing_bytes_are_refused() {
        let frame = |kind: u8, payload: &[u8]| {
            let mut out = (payload.len() as u32).to_le_bytes().to_vec();
            out.push(kind);
            out.extend_from_slice(payload);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
            out.extend_from_slice(&crc.to_le_bytes());
            out
        };
        let mut d = Decoder::new();
        d.feed(&frame(99, &[]));
        assert!(matches!(d.next_message(), Err(Error::Kind(99))));
        let mut payload = postcard::to_allocvec(&AckBody { upto: 1 }).unwrap();
        payload.push(0);
        let mut d = Decoder::new();
        d.feed(&frame(KIND_ACK, &payload));
        assert!(matches!(d.next_message(), Err(Error::Malformed { .. })));
    }

    #[test]
    fn entries_are_validated() {
        let limits = LIMITS;
        assert!(entry(1).validate(&limits).is_ok());
        let mut e = entry(0);
        assert!(e.validate(&limits).is_err());
        e = entry(1);
        e.new = Some("not json".into());
        assert!(e.validate(&limits).is_err());
        e = entry(1);
        e.old = None;
        assert!(e.validate(&limits).is_err(), "an update has an old value");
        e = entry(1);
        e.key = "k".repeat(limits.name + 1);
        assert!(e.validate(&limits).is_err());
        e = entry(1);
        e.collection.clear();
        assert!(e.validate(&limits).is_err(), "SQLite changes name a table");
        e = entry(1);
        e.source = "relative/app.db".into();
        assert!(e.validate(&limits).is_err());
        e = entry(1);
        e.new = Some(format!("\"{}\"", "x".repeat(limits.value)));
        assert!(e.validate(&limits).is_err());
    }

    #[test]
    fn a_batch_with_a_gap_is_refused() {
        let mut d = Decoder::new();
        d.feed(&encode(&Message::Batch(vec![entry(1), entry(3)])));
        assert!(matches!(d.next_message(), Err(Error::Invalid(_))));
    }

    #[test]
    fn an_oversize_batch_is_refused() {
        let limits = Limits {
            batch_entries: 2,
            ..LIMITS
        };
        let mut d = Decoder::with_limits(limits);
        d.feed(&encode(&Message::Batch(vec![entry(1), entry(2), entry(3)])));
        assert!(matches!(d.next_message(), Err(Error::Invalid(_))));
    }

    #[test]
    fn versions_negotiate_down() {
        assert_eq!(negotiate(1).unwrap(), 1);
        assert_eq!(negotiate(9).unwrap(), PROTOCOL_VERSION);
        assert!(negotiate(0).is_err());
    }
}
