//! NBD wire format: constants, request encoding, and the pure, allocation-bounded
//! parser of transmission-phase replies (simple replies and structured reply chunks).
//!
//! Nothing here does I/O. The client's reader task and the `nbd_reply` fuzz target
//! drive the same [`ReplyState`], so what the fuzzer exercises is what runs against a
//! server. Everything the server sends is untrusted: every length is checked against
//! the request before anything is allocated or copied, and nothing here panics.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of NetworkBlockDevice/nbd),
//! baseline plus structured replies and block status; no extended headers.

use std::fmt;

// --- Handshake -----------------------------------------------------------------------

/// `NBDMAGIC`, first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic (not supported: no options, no structured replies).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag matching [`NBD_FLAG_FIXED_NEWSTYLE`].
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag matching [`NBD_FLAG_NO_ZEROES`].
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const NBD_OPT_ABORT: u32 = 2;
/// `NBD_OPT_GO`.
pub const NBD_OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done, success.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: an export (to `NBD_OPT_LIST`).
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one piece of export information (to `NBD_OPT_GO`/`NBD_OPT_INFO`).
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one selected metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const NBD_INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one consistent export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// --- Transmission ----------------------------------------------------------------------

/// Magic of a request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header, magic included.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header, magic included.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Structured reply flag: last chunk of this reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// Chunk type: no payload, final.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors for one metadata context.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: an error.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: an error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation`: the extent is a hole (not allocated).
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:<name>`: the extent is dirty.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// Error value `NBD_EPERM`.
pub const NBD_EPERM: u32 = 1;
/// Error value `NBD_EIO`.
pub const NBD_EIO: u32 = 5;
/// Error value `NBD_ENOMEM`.
pub const NBD_ENOMEM: u32 = 12;
/// Error value `NBD_EINVAL`.
pub const NBD_EINVAL: u32 = 22;
/// Error value `NBD_ENOSPC`.
pub const NBD_ENOSPC: u32 = 28;
/// Error value `NBD_EOVERFLOW`.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error value `NBD_ENOTSUP`.
pub const NBD_ENOTSUP: u32 = 95;
/// Error value `NBD_ESHUTDOWN`.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Longest error message the protocol allows (strings are at most 4096 bytes).
pub const MAX_MESSAGE: usize = 4096;
/// Largest error chunk payload accepted: error (4) + message length (2) + message +
/// room for the fixed trailer of known and future error chunk types.
pub const MAX_ERROR_CHUNK: u32 = 4 + 2 + MAX_MESSAGE as u32 + 64;
/// The protocol's recommended cap on descriptors in one block status chunk.
pub const MAX_EXTENTS_PER_CHUNK: u64 = 1 << 20;

/// Name of an NBD error value, for messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "operation not permitted",
        NBD_EIO => "input/output error",
        NBD_ENOMEM => "cannot allocate memory",
        NBD_EINVAL => "invalid argument",
        NBD_ENOSPC => "no space left on device",
        NBD_EOVERFLOW => "value too large",
        NBD_ENOTSUP => "operation not supported",
        NBD_ESHUTDOWN => "server is shutting down",
        _ => "unknown error",
    }
}

/// Name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// Name of an option error reply, for messages.
pub fn rep_err_name(code: u32) -> &'static str {
    match code & !NBD_REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        10 => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown option error",
    }
}

/// A server-supplied string made printable and bounded: lossy UTF-8, control
/// characters replaced, at most [`MAX_MESSAGE`] bytes.
pub fn sanitize_message(raw: &[u8]) -> String {
    let raw = &raw[..raw.len().min(MAX_MESSAGE)];
    String::from_utf8_lossy(raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// A transmission-phase command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC` (no reply).
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl Command {
    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }

    /// A lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disconnect",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write zeroes",
            Command::BlockStatus => "block status",
        }
    }
}

/// Encodes a request header (the payload of a write follows it on the wire).
pub fn encode_request(
    flags: u16,
    cmd: Command,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.code().to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The header of a structured reply chunk (after its magic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`NBD_REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`NBD_REPLY_TYPE_*`).
    pub kind: u16,
    /// The cookie of the request this answers.
    pub cookie: u64,
    /// Payload length in bytes.
    pub length: u32,
}

impl ChunkHeader {
    /// Parses the 16 bytes that follow the structured reply magic.
    pub fn parse(b: &[u8; CHUNK_HEADER_LEN - 4]) -> ChunkHeader {
        ChunkHeader {
            flags: be16(b, 0),
            kind: be16(b, 2),
            cookie: be64(b, 4),
            length: be32(b, 12),
        }
    }

    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

/// A simple reply header (after its magic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleHeader {
    /// Error value, 0 for success.
    pub error: u32,
    /// The cookie of the request this answers.
    pub cookie: u64,
}

impl SimpleHeader {
    /// Parses the 12 bytes that follow the simple reply magic.
    pub fn parse(b: &[u8; SIMPLE_REPLY_LEN - 4]) -> SimpleHeader {
        SimpleHeader {
            error: be32(b, 0),
            cookie: be64(b, 4),
        }
    }
}

/// One block status extent, absolute in the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
    /// Context-defined flags (`NBD_STATE_*`).
    pub flags: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// What a request expects from its reply: enough to validate every chunk.
#[derive(Clone, Debug)]
pub struct Expect {
    /// The command sent.
    pub cmd: Command,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Export size (block status extents must not go past it).
    pub export_size: u64,
    /// Metadata context ids negotiated on this connection.
    pub contexts: Vec<u32>,
    /// For block status: the context whose extents the caller wants.
    pub want_context: Option<u32>,
}

/// How a reply ended in failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// The server reported an error for this request.
    Server {
        /// NBD error value.
        errno: u32,
        /// The server's message (sanitized; may be empty).
        message: String,
        /// Offset of `NBD_REPLY_TYPE_ERROR_OFFSET`, if that was the first error.
        error_offset: Option<u64>,
    },
    /// The server broke the protocol; the connection cannot be trusted any more.
    Protocol(String),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Server { errno, message, .. } => {
                write!(
                    f,
                    "server error {errno} ({}): {message}",
                    errno_name(*errno)
                )
            }
            ReplyError::Protocol(m) => f.write_str(m),
        }
    }
}

/// The successful result of a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyOutput {
    /// Data of a read, exactly the request's length.
    Data(Vec<u8>),
    /// Extents of a block status for the wanted context, contiguous from the
    /// request's offset, clamped to the request's end.
    Extents(Vec<Extent>),
    /// Any other command succeeded.
    Done,
}

/// What the reader must do after seeing a chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkPlan {
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: read the 8-byte offset with
    /// [`ReplyState::data_target`], then `length - 8` bytes straight into the slice it
    /// returns.
    OffsetData,
    /// Read the whole payload (bounded by [`ReplyState::check_chunk`]) and pass it to
    /// [`ReplyState::apply_chunk`].
    Payload,
}

/// Which bytes of a read have been delivered; one bit per byte, so its memory is
/// bounded by an eighth of the request however the server fragments its reply.
#[derive(Debug)]
struct Coverage {
    bits: Vec<u64>,
    covered: u64,
}

impl Coverage {
    fn new(len: u32) -> Coverage {
        Coverage {
            bits: vec![0; (len as usize).div_ceil(64)],
            covered: 0,
        }
    }

    /// Marks `[start, start + len)`; fails, changing nothing, if any byte is marked.
    fn mark(&mut self, start: usize, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let end = start + len;
        if !self.for_each_word(start, end, |w, m| *w & m == 0) {
            return false;
        }
        self.for_each_word(start, end, |w, m| {
            *w |= m;
            true
        });
        self.covered += len as u64;
        true
    }

    fn for_each_word(
        &mut self,
        start: usize,
        end: usize,
        mut f: impl FnMut(&mut u64, u64) -> bool,
    ) -> bool {
        let mut pos = start;
        while pos < end {
            let word = pos / 64;
            let bit = pos % 64;
            let n = (64 - bit).min(end - pos);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let Some(w) = self.bits.get_mut(word) else {
                return false;
            };
            if !f(w, mask) {
                return false;
            }
            pos += n;
        }
        true
    }
}

/// The state of one outstanding request's reply. Feed it every chunk that carries the
/// request's cookie, in order; when a chunk returns `true` (done), call
/// [`ReplyState::finish`].
#[derive(Debug)]
pub struct ReplyState {
    expect: Expect,
    data: Vec<u8>,
    coverage: Option<Coverage>,
    extents: Option<Vec<Extent>>,
    seen_contexts: Vec<u32>,
    error: Option<ReplyError>,
    done: bool,
}

fn proto(expect: &Expect, what: impl fmt::Display) -> ReplyError {
    ReplyError::Protocol(format!(
        "{} at offset {} length {}: {what}",
        expect.cmd.name(),
        expect.offset,
        expect.len
    ))
}

impl ReplyState {
    /// Starts waiting for the reply to a request. A read allocates its buffer (the
    /// request's length; the client bounds that by the negotiated maximum).
    pub fn new(expect: Expect) -> ReplyState {
        let (data, coverage) = if expect.cmd == Command::Read {
            (
                vec![0u8; expect.len as usize],
                Some(Coverage::new(expect.len)),
            )
        } else {
            (Vec::new(), None)
        };
        ReplyState {
            expect,
            data,
            coverage,
            extents: None,
            seen_contexts: Vec::new(),
            error: None,
            done: false,
        }
    }

    /// The request this reply answers.
    pub fn expect(&self) -> &Expect {
        &self.expect
    }

    /// Whether the final chunk has been seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn fail(&self, what: impl fmt::Display) -> ReplyError {
        proto(&self.expect, what)
    }

    /// A simple reply arrived. Returns how many payload bytes follow it on the wire
    /// (a successful read without structured replies); read them into
    /// [`ReplyState::simple_data_target`]. The reply is then done.
    pub fn apply_simple(&mut self, h: &SimpleHeader) -> Result<usize, ReplyError> {
        if self.done {
            return Err(self.fail("simple reply after the final chunk"));
        }
        self.done = true;
        if h.error != 0 {
            self.error = Some(ReplyError::Server {
                errno: h.error,
                message: String::new(),
                error_offset: None,
            });
            return Ok(0);
        }
        match self.expect.cmd {
            Command::Read if self.expect.structured => Err(self.fail(
                "successful simple reply to a read after structured replies were negotiated",
            )),
            Command::Read => Ok(self.expect.len as usize),
            Command::BlockStatus => Err(self.fail("simple reply to a block status request")),
            _ => Ok(0),
        }
    }

    /// Where the payload of a successful simple read reply goes (the whole buffer).
    pub fn simple_data_target(&mut self) -> &mut [u8] {
        if let Some(c) = self.coverage.as_mut() {
            c.covered = u64::from(self.expect.len);
        }
        &mut self.data
    }

    /// Validates a chunk header before any of its payload is read: type valid for the
    /// request, length within what that type and request allow.
    pub fn check_chunk(&self, h: &ChunkHeader) -> Result<ChunkPlan, ReplyError> {
        if !self.expect.structured {
            return Err(self.fail("structured reply chunk without negotiation"));
        }
        if self.done {
            return Err(self.fail("chunk after the final chunk"));
        }
        let len = h.length;
        let req = self.expect.len;
        match h.kind {
            NBD_REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(self.fail(format!("none chunk with length {len}")));
                }
                if !h.done() {
                    return Err(self.fail("none chunk without the done flag"));
                }
                Ok(ChunkPlan::Payload)
            }
            NBD_REPLY_TYPE_OFFSET_DATA => {
                if self.expect.cmd != Command::Read {
                    return Err(self.fail("data chunk in reply to a non-read"));
                }
                if len < 9 || u64::from(len) - 8 > u64::from(req) {
                    return Err(self.fail(format!("data chunk with length {len}")));
                }
                Ok(ChunkPlan::OffsetData)
            }
            NBD_REPLY_TYPE_OFFSET_HOLE => {
                if self.expect.cmd != Command::Read {
                    return Err(self.fail("hole chunk in reply to a non-read"));
                }
                if len != 12 {
                    return Err(self.fail(format!("hole chunk with length {len}")));
                }
                Ok(ChunkPlan::Payload)
            }
            NBD_REPLY_TYPE_BLOCK_STATUS => {
                if self.expect.cmd != Command::BlockStatus {
                    return Err(self.fail("block status chunk in reply to another command"));
                }
                // Each descriptor covers at least one byte and all but the last must
                // start inside the request, so at most req + 1 of them (and the
                // protocol caps a chunk at 2^20).
                let max_desc = (u64::from(req) + 1).min(MAX_EXTENTS_PER_CHUNK);
                let l = u64::from(len);
                if l < 12 || !(l - 4).is_multiple_of(8) || (l - 4) / 8 > max_desc {
                    return Err(self.fail(format!("block status chunk with length {len}")));
                }
                Ok(ChunkPlan::Payload)
            }
            k if k & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
                let min = if k == NBD_REPLY_TYPE_ERROR_OFFSET {
                    14
                } else {
                    6
                };
                if len < min || len > MAX_ERROR_CHUNK {
                    return Err(self.fail(format!("error chunk type {k:#x} with length {len}")));
                }
                Ok(ChunkPlan::Payload)
            }
            k => Err(self.fail(format!("unknown chunk type {k}"))),
        }
    }

    /// For an `NBD_REPLY_TYPE_OFFSET_DATA` chunk whose header passed
    /// [`ReplyState::check_chunk`]: validates its offset and marks the range received,
    /// and returns the part of the read buffer its `data_len` bytes go to.
    pub fn data_target(&mut self, offset: u64, data_len: u32) -> Result<&mut [u8], ReplyError> {
        let start = offset.checked_sub(self.expect.offset);
        let ok_range = match start {
            Some(s) => s
                .checked_add(u64::from(data_len))
                .is_some_and(|e| e <= u64::from(self.expect.len)),
            None => false,
        };
        if data_len == 0 || !ok_range || self.expect.cmd != Command::Read {
            return Err(self.fail(format!(
                "data chunk at offset {offset} length {data_len} outside the request"
            )));
        }
        let start = start.unwrap_or(0) as usize;
        let n = data_len as usize;
        let marked = match self.coverage.as_mut() {
            Some(c) => c.mark(start, n),
            None => false,
        };
        if !marked {
            return Err(self.fail(format!(
                "data chunk at offset {offset} length {data_len} overlaps an earlier chunk"
            )));
        }
        match self.data.get_mut(start..start + n) {
            Some(s) => Ok(s),
            None => Err(proto(&self.expect, "read buffer shorter than the request")),
        }
    }

    /// Applies a chunk that passed [`ReplyState::check_chunk`] with
    /// [`ChunkPlan::Payload`] (or, for `OFFSET_DATA`, the whole payload: offset and
    /// data). Returns whether the reply is complete.
    pub fn apply_chunk(&mut self, h: &ChunkHeader, payload: &[u8]) -> Result<bool, ReplyError> {
        if payload.len() != h.length as usize {
            return Err(self.fail("chunk payload length differs from its header"));
        }
        match self.check_chunk(h)? {
            ChunkPlan::OffsetData => {
                let offset = be64(payload, 0);
                let data = &payload[8..];
                let target = self.data_target(offset, data.len() as u32)?;
                target.copy_from_slice(data);
            }
            ChunkPlan::Payload => self.apply_payload(h, payload)?,
        }
        Ok(self.end_chunk(h))
    }

    /// Records the done flag of a chunk whose payload has been consumed; returns it.
    pub fn end_chunk(&mut self, h: &ChunkHeader) -> bool {
        if h.done() {
            self.done = true;
        }
        self.done
    }

    fn apply_payload(&mut self, h: &ChunkHeader, p: &[u8]) -> Result<(), ReplyError> {
        match h.kind {
            NBD_REPLY_TYPE_NONE => Ok(()),
            NBD_REPLY_TYPE_OFFSET_HOLE => {
                let offset = be64(p, 0);
                let size = be32(p, 8);
                if size == 0 {
                    return Err(self.fail(format!("empty hole chunk at offset {offset}")));
                }
                // The buffer starts zeroed; a hole only has to be in range and new.
                self.data_target(offset, size).map(|_| ()).map_err(|_| {
                    self.fail(format!(
                        "hole chunk at offset {offset} length {size} outside the request or overlapping"
                    ))
                })
            }
            NBD_REPLY_TYPE_BLOCK_STATUS => self.apply_block_status(p),
            k => {
                // Error chunks (known or unknown types with the error bit set).
                let errno = be32(p, 0);
                let mlen = be16(p, 4) as usize;
                let fixed = if k == NBD_REPLY_TYPE_ERROR_OFFSET {
                    8
                } else {
                    0
                };
                if mlen > MAX_MESSAGE {
                    return Err(self.fail(format!("error message of {mlen} bytes")));
                }
                if 6 + mlen + fixed > p.len() {
                    return Err(self.fail("error message longer than its chunk"));
                }
                if k == NBD_REPLY_TYPE_ERROR && 6 + mlen != p.len() {
                    return Err(self.fail("error chunk with trailing bytes"));
                }
                if errno == 0 {
                    return Err(self.fail("error chunk with error value 0"));
                }
                let message = sanitize_message(&p[6..6 + mlen]);
                let error_offset = if k == NBD_REPLY_TYPE_ERROR_OFFSET {
                    let off = be64(p, 6 + mlen);
                    let inside = off
                        .checked_sub(self.expect.offset)
                        .is_some_and(|d| d < u64::from(self.expect.len));
                    if !inside {
                        return Err(self.fail(format!("error offset {off} outside the request")));
                    }
                    Some(off)
                } else {
                    None
                };
                let message = if k == NBD_REPLY_TYPE_ERROR || k == NBD_REPLY_TYPE_ERROR_OFFSET {
                    message
                } else if message.is_empty() {
                    format!("(unknown error chunk type {k:#x})")
                } else {
                    format!("{message} (unknown error chunk type {k:#x})")
                };
                if self.error.is_none() {
                    self.error = Some(ReplyError::Server {
                        errno,
                        message,
                        error_offset,
                    });
                }
                Ok(())
            }
        }
    }

    fn apply_block_status(&mut self, p: &[u8]) -> Result<(), ReplyError> {
        let ctx = be32(p, 0);
        if !self.expect.contexts.contains(&ctx) {
            return Err(self.fail(format!("block status for unnegotiated context id {ctx}")));
        }
        if self.seen_contexts.contains(&ctx) {
            return Err(self.fail(format!("second block status chunk for context id {ctx}")));
        }
        self.seen_contexts.push(ctx);
        if self.expect.want_context != Some(ctx) {
            return Ok(());
        }
        let req_end = self
            .expect
            .offset
            .saturating_add(u64::from(self.expect.len));
        let mut extents = Vec::with_capacity((p.len() - 4) / 8);
        let mut pos = self.expect.offset;
        for d in p[4..].chunks_exact(8) {
            let length = u64::from(be32(d, 0));
            let flags = be32(d, 4);
            if length == 0 {
                return Err(self.fail(format!("empty extent at offset {pos}")));
            }
            if pos >= req_end {
                return Err(self.fail(format!("extent at offset {pos} after the request's end")));
            }
            let end = pos + length;
            if end > self.expect.export_size {
                return Err(self.fail(format!(
                    "extent at offset {pos} length {length} past the export's end {}",
                    self.expect.export_size
                )));
            }
            // The last extent may run past the request; keep what was asked for.
            let clamped = end.min(req_end);
            extents.push(Extent {
                offset: pos,
                length: clamped - pos,
                flags,
            });
            pos = end;
        }
        self.extents = Some(extents);
        Ok(())
    }

    /// Ends the reply: the first server error if any chunk carried one, else the data
    /// (fully covered), the wanted extents, or `Done`.
    pub fn finish(self) -> Result<ReplyOutput, ReplyError> {
        if !self.done {
            return Err(self.fail("reply ended before its final chunk"));
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.expect.cmd {
            Command::Read => {
                let covered = self.coverage.as_ref().map_or(0, |c| c.covered);
                if covered != u64::from(self.expect.len) {
                    return Err(proto(
                        &self.expect,
                        format!("reply done after {covered} of {} bytes", self.expect.len),
                    ));
                }
                Ok(ReplyOutput::Data(self.data))
            }
            Command::BlockStatus => match self.extents {
                Some(e) => Ok(ReplyOutput::Extents(e)),
                None => Err(proto(
                    &self.expect,
                    "no block status for the requested context",
                )),
            },
            _ => Ok(ReplyOutput::Done),
        }
    }
}

/// Parses a whole reply to one request from a byte stream, exactly as the client's
/// reader does: headers, cookie check, bounds, payloads, until the final chunk. The
/// entry point of the `nbd_reply` fuzz target. Returns the outcome and the number of
/// bytes consumed.
pub fn parse_reply(
    expect: Expect,
    cookie: u64,
    stream: &[u8],
) -> (Result<ReplyOutput, ReplyError>, usize) {
    let mut st = ReplyState::new(expect);
    let mut pos = 0usize;
    let short = |st: &ReplyState| proto(st.expect(), "stream ended inside a reply");
    loop {
        let Some(magic) = stream.get(pos..pos + 4) else {
            return (Err(short(&st)), pos);
        };
        let magic = be32(magic, 0);
        pos += 4;
        match magic {
            NBD_SIMPLE_REPLY_MAGIC => {
                let Some(b) = stream.get(pos..pos + SIMPLE_REPLY_LEN - 4) else {
                    return (Err(short(&st)), pos);
                };
                let mut a = [0u8; SIMPLE_REPLY_LEN - 4];
                a.copy_from_slice(b);
                pos += a.len();
                let h = SimpleHeader::parse(&a);
                if h.cookie != cookie {
                    return (Err(proto(st.expect(), "reply for an unknown cookie")), pos);
                }
                match st.apply_simple(&h) {
                    Ok(0) => {}
                    Ok(n) => {
                        let Some(b) = stream.get(pos..pos + n) else {
                            return (Err(short(&st)), pos);
                        };
                        st.simple_data_target().copy_from_slice(b);
                        pos += n;
                    }
                    Err(e) => return (Err(e), pos),
                }
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let Some(b) = stream.get(pos..pos + CHUNK_HEADER_LEN - 4) else {
                    return (Err(short(&st)), pos);
                };
                let mut a = [0u8; CHUNK_HEADER_LEN - 4];
                a.copy_from_slice(b);
                pos += a.len();
                let h = ChunkHeader::parse(&a);
                if h.cookie != cookie {
                    return (Err(proto(st.expect(), "reply for an unknown cookie")), pos);
                }
                if let Err(e) = st.check_chunk(&h) {
                    return (Err(e), pos);
                }
                let Some(p) = stream.get(pos..pos + h.length as usize) else {
                    return (Err(short(&st)), pos);
                };
                pos += p.len();
                if let Err(e) = st.apply_chunk(&h, p) {
                    return (Err(e), pos);
                }
            }
            m => {
                return (
                    Err(proto(st.expect(), format!("bad reply magic {m:#010x}"))),
                    pos,
                )
            }
        }
        if st.is_done() {
            return (st.finish(), pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOKIE: u64 = 7;

    fn read_expect(offset: u64, len: u32) -> Expect {
        Expect {
            cmd: Command::Read,
            offset,
            len,
            structured: true,
            export_size: 1 << 30,
            contexts: vec![],
            want_context: None,
        }
    }

    fn bs_expect(offset: u64, len: u32) -> Expect {
        Expect {
            cmd: Command::BlockStatus,
            offset,
            len,
            structured: true,
            export_size: 1 << 20,
            contexts: vec![1, 2],
            want_context: Some(2),
        }
    }

    fn chunk(flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&COOKIE.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn data(flags: u16, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        chunk(flags, NBD_REPLY_TYPE_OFFSET_DATA, &p)
    }

    fn hole(flags: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        chunk(flags, NBD_REPLY_TYPE_OFFSET_HOLE, &p)
    }

    fn error(kind: u16, errno: u32, msg: &[u8], trailer: &[u8]) -> Vec<u8> {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        p.extend_from_slice(trailer);
        chunk(NBD_REPLY_FLAG_DONE, kind, &p)
    }

    fn status(flags: u16, ctx: u32, desc: &[(u32, u32)]) -> Vec<u8> {
        let mut p = ctx.to_be_bytes().to_vec();
        for (l, f) in desc {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        chunk(flags, NBD_REPLY_TYPE_BLOCK_STATUS, &p)
    }

    fn run(e: Expect, parts: &[Vec<u8>]) -> Result<ReplyOutput, ReplyError> {
        let stream: Vec<u8> = parts.concat();
        let (r, used) = parse_reply(e, COOKIE, &stream);
        if r.is_ok() {
            assert_eq!(used, stream.len());
        }
        r
    }

    fn protocol(r: Result<ReplyOutput, ReplyError>, needle: &str) {
        match r {
            Err(ReplyError::Protocol(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("expected a protocol error with {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn read_assembles_data_and_holes_out_of_order() {
        let r = run(
            read_expect(1000, 12),
            &[
                data(0, 1008, b"wxyz"),
                hole(0, 1004, 4),
                data(NBD_REPLY_FLAG_DONE, 1000, b"abcd"),
            ],
        );
        assert_eq!(r, Ok(ReplyOutput::Data(b"abcd\0\0\0\0wxyz".to_vec())));
    }

    #[test]
    fn read_with_none_chunk_last() {
        let r = run(
            read_expect(0, 3),
            &[data(0, 0, b"abc"), chunk(NBD_REPLY_FLAG_DONE, 0, &[])],
        );
        assert_eq!(r, Ok(ReplyOutput::Data(b"abc".to_vec())));
    }

    #[test]
    fn overlapping_chunks_are_rejected() {
        protocol(
            run(
                read_expect(0, 8),
                &[data(0, 0, b"abcde"), data(NBD_REPLY_FLAG_DONE, 4, b"EFGH")],
            ),
            "overlaps",
        );
        protocol(
            run(
                read_expect(0, 8),
                &[hole(0, 2, 2), data(NBD_REPLY_FLAG_DONE, 0, b"abcdefgh")],
            ),
            "overlaps",
        );
        protocol(
            run(
                read_expect(0, 8),
                &[data(0, 0, b"abcd"), hole(NBD_REPLY_FLAG_DONE, 3, 5)],
            ),
            "overlapping",
        );
    }

    #[test]
    fn chunk_outside_the_request_is_rejected() {
        protocol(
            run(
                read_expect(100, 8),
                &[data(NBD_REPLY_FLAG_DONE, 96, b"abcdefgh")],
            ),
            "outside",
        );
        protocol(
            run(
                read_expect(100, 8),
                &[data(NBD_REPLY_FLAG_DONE, 104, b"abcdefgh")],
            ),
            "outside",
        );
        protocol(
            run(
                read_expect(100, 8),
                &[hole(NBD_REPLY_FLAG_DONE, u64::MAX - 1, 4)],
            ),
            "outside",
        );
    }

    #[test]
    fn incomplete_coverage_at_done_is_rejected() {
        protocol(
            run(read_expect(0, 8), &[data(NBD_REPLY_FLAG_DONE, 0, b"abcd")]),
            "after 4 of 8 bytes",
        );
    }

    #[test]
    fn short_payload_and_short_stream_are_rejected() {
        // Header says 12 bytes of payload; the stream ends after 6.
        let mut c = data(NBD_REPLY_FLAG_DONE, 0, b"abcd");
        c.truncate(c.len() - 6);
        protocol(run(read_expect(0, 4), &[c]), "stream ended");
        // A hole chunk whose header length is not 12.
        protocol(
            run(
                read_expect(0, 4),
                &[chunk(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_HOLE,
                    &[0; 8],
                )],
            ),
            "hole chunk with length 8",
        );
        // A data chunk with no data.
        protocol(
            run(
                read_expect(0, 4),
                &[chunk(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    &[0; 8],
                )],
            ),
            "data chunk with length 8",
        );
    }

    #[test]
    fn huge_lengths_are_rejected_before_reading() {
        let st = ReplyState::new(read_expect(0, 4096));
        let h = |kind, length| ChunkHeader {
            flags: 0,
            kind,
            cookie: COOKIE,
            length,
        };
        assert!(st
            .check_chunk(&h(NBD_REPLY_TYPE_OFFSET_DATA, 4096 + 8))
            .is_ok());
        assert!(st
            .check_chunk(&h(NBD_REPLY_TYPE_OFFSET_DATA, 4096 + 9))
            .is_err());
        assert!(st
            .check_chunk(&h(NBD_REPLY_TYPE_OFFSET_DATA, u32::MAX))
            .is_err());
        assert!(st.check_chunk(&h(NBD_REPLY_TYPE_ERROR, u32::MAX)).is_err());
        assert!(st.check_chunk(&h(0x8123, MAX_ERROR_CHUNK + 1)).is_err());
        let bs = ReplyState::new(bs_expect(0, 16));
        // 17 descriptors at most for a 16-byte request.
        assert!(bs
            .check_chunk(&h(NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 8 * 17))
            .is_ok());
        assert!(bs
            .check_chunk(&h(NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 8 * 18))
            .is_err());
        assert!(bs
            .check_chunk(&h(NBD_REPLY_TYPE_BLOCK_STATUS, u32::MAX - 3))
            .is_err());
        assert!(bs
            .check_chunk(&h(NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 7))
            .is_err());
    }

    #[test]
    fn unknown_types_with_and_without_error_bit() {
        // Without the error bit: protocol error, hard disconnect.
        protocol(
            run(read_expect(0, 4), &[chunk(NBD_REPLY_FLAG_DONE, 77, &[])]),
            "unknown chunk type 77",
        );
        // With it: the request fails with the server's error, the stream stays usable.
        let r = run(read_expect(0, 4), &[error(0x8077, 5, b"weird", b"xx")]);
        match r {
            Err(ReplyError::Server { errno, message, .. }) => {
                assert_eq!(errno, 5);
                assert!(message.contains("weird") && message.contains("0x8077"));
            }
            other => panic!("{other:?}"),
        }
        // Error bit but a message that does not fit: protocol error.
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&100u16.to_be_bytes());
        p.extend_from_slice(b"short");
        protocol(
            run(read_expect(0, 4), &[chunk(NBD_REPLY_FLAG_DONE, 0x8077, &p)]),
            "longer than its chunk",
        );
    }

    #[test]
    fn error_chunks() {
        let r = run(
            read_expect(0, 4),
            &[error(
                NBD_REPLY_TYPE_ERROR,
                NBD_EIO,
                b"disk\x07 on fire",
                &[],
            )],
        );
        assert_eq!(
            r,
            Err(ReplyError::Server {
                errno: NBD_EIO,
                message: "disk  on fire".into(),
                error_offset: None
            })
        );
        let r = run(
            read_expect(512, 1024),
            &[error(
                NBD_REPLY_TYPE_ERROR_OFFSET,
                NBD_EIO,
                b"bad",
                &1000u64.to_be_bytes(),
            )],
        );
        assert_eq!(
            r,
            Err(ReplyError::Server {
                errno: NBD_EIO,
                message: "bad".into(),
                error_offset: Some(1000)
            })
        );
        protocol(
            run(
                read_expect(512, 1024),
                &[error(
                    NBD_REPLY_TYPE_ERROR_OFFSET,
                    NBD_EIO,
                    b"",
                    &9999u64.to_be_bytes(),
                )],
            ),
            "outside the request",
        );
        protocol(
            run(
                read_expect(0, 4),
                &[error(NBD_REPLY_TYPE_ERROR, 0, b"", &[])],
            ),
            "error value 0",
        );
    }

    #[test]
    fn error_message_too_long_is_rejected() {
        let msg = vec![b'x'; MAX_MESSAGE + 1];
        protocol(
            run(
                read_expect(0, 4),
                &[error(NBD_REPLY_TYPE_ERROR, 5, &msg, &[])],
            ),
            "error message of 4097 bytes",
        );
        // A chunk far longer than any message is refused from its header alone.
        let msg = vec![b'x'; MAX_ERROR_CHUNK as usize];
        protocol(
            run(
                read_expect(0, 4),
                &[error(NBD_REPLY_TYPE_ERROR, 5, &msg, &[])],
            ),
            "error chunk type",
        );
        // At the limit it is accepted.
        let msg = vec![b'x'; MAX_MESSAGE];
        match run(
            read_expect(0, 4),
            &[error(NBD_REPLY_TYPE_ERROR, 5, &msg, &[])],
        ) {
            Err(ReplyError::Server { message, .. }) => assert_eq!(message.len(), MAX_MESSAGE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunks_after_done_and_wrong_cookie() {
        let mut st = ReplyState::new(read_expect(0, 1));
        let h = ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            kind: NBD_REPLY_TYPE_OFFSET_DATA,
            cookie: COOKIE,
            length: 9,
        };
        let mut p = 0u64.to_be_bytes().to_vec();
        p.push(b'z');
        assert_eq!(st.apply_chunk(&h, &p), Ok(true));
        assert!(st.apply_chunk(&h, &p).is_err());
        let mut c = data(NBD_REPLY_FLAG_DONE, 0, b"a");
        c[8..16].copy_from_slice(&99u64.to_be_bytes());
        protocol(run(read_expect(0, 1), &[c]), "unknown cookie");
        protocol(
            run(read_expect(0, 1), &[vec![1, 2, 3, 4]]),
            "bad reply magic",
        );
    }

    #[test]
    fn simple_replies() {
        let simple = |err: u32| {
            let mut v = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&err.to_be_bytes());
            v.extend_from_slice(&COOKIE.to_be_bytes());
            v
        };
        let mut e = read_expect(0, 3);
        e.structured = false;
        assert_eq!(
            run(e, &[simple(0), b"xyz".to_vec()]),
            Ok(ReplyOutput::Data(b"xyz".to_vec()))
        );
        protocol(
            run(read_expect(0, 3), &[simple(0)]),
            "simple reply to a read",
        );
        assert!(matches!(
            run(read_expect(0, 3), &[simple(22)]),
            Err(ReplyError::Server { errno: 22, .. })
        ));
        let mut w = read_expect(0, 3);
        w.cmd = Command::Flush;
        assert_eq!(run(w, &[simple(0)]), Ok(ReplyOutput::Done));
        protocol(
            run(bs_expect(0, 3), &[simple(0)]),
            "simple reply to a block status",
        );
        // A structured chunk where none were negotiated.
        let mut e = read_expect(0, 1);
        e.structured = false;
        protocol(
            run(e, &[data(NBD_REPLY_FLAG_DONE, 0, b"a")]),
            "without negotiation",
        );
    }

    #[test]
    fn block_status_keeps_the_wanted_context() {
        let r = run(
            bs_expect(4096, 8192),
            &[
                status(0, 1, &[(100, 3)]),
                status(NBD_REPLY_FLAG_DONE, 2, &[(4096, 0), (65536, 1)]),
            ],
        );
        assert_eq!(
            r,
            Ok(ReplyOutput::Extents(vec![
                Extent {
                    offset: 4096,
                    length: 4096,
                    flags: 0
                },
                // Clamped to the request's end.
                Extent {
                    offset: 8192,
                    length: 4096,
                    flags: 1
                },
            ]))
        );
    }

    #[test]
    fn block_status_malformed() {
        protocol(
            run(
                bs_expect(0, 100),
                &[status(NBD_REPLY_FLAG_DONE, 2, &[(0, 0)])],
            ),
            "empty extent",
        );
        protocol(
            run(
                bs_expect(0, 100),
                &[status(NBD_REPLY_FLAG_DONE, 2, &[(100, 0), (5, 0)])],
            ),
            "after the request's end",
        );
        protocol(
            run(
                bs_expect(0, 100),
                &[status(NBD_REPLY_FLAG_DONE, 2, &[(2 << 20, 0)])],
            ),
            "past the export's end",
        );
        protocol(
            run(
                bs_expect(0, 100),
                &[status(NBD_REPLY_FLAG_DONE, 9, &[(10, 0)])],
            ),
            "unnegotiated context",
        );
        protocol(
            run(
                bs_expect(0, 100),
                &[
                    status(0, 2, &[(10, 0)]),
                    status(NBD_REPLY_FLAG_DONE, 2, &[(10, 0)]),
                ],
            ),
            "second block status",
        );
        protocol(
            run(
                bs_expect(0, 100),
                &[status(NBD_REPLY_FLAG_DONE, 1, &[(10, 0)])],
            ),
            "no block status for the requested context",
        );
        protocol(
            run(bs_expect(0, 100), &[data(NBD_REPLY_FLAG_DONE, 0, b"a")]),
            "non-read",
        );
    }

    #[test]
    fn coverage_bits_across_words() {
        let mut c = Coverage::new(200);
        assert!(c.mark(3, 130));
        assert!(!c.mark(132, 1));
        assert!(c.mark(133, 67));
        assert!(!c.mark(0, 4));
        assert!(c.mark(0, 3));
        assert_eq!(c.covered, 200);
        assert!(!c.mark(199, 2));
    }

    #[test]
    fn request_encoding() {
        let b = encode_request(0, Command::BlockStatus, 0x0102, 0x0a0b, 0x10);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[6..8], &[0, 7]);
        assert_eq!(be64(&b, 8), 0x0102);
        assert_eq!(be64(&b, 16), 0x0a0b);
        assert_eq!(be32(&b, 24), 0x10);
    }
}
