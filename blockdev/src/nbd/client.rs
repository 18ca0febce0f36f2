//! The connection: handshake, the writer and reader tasks, and the request API.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::proto::*;
use super::{Error, MAX_REQUEST};

/// Largest option reply payload accepted during the handshake. Replies are small
/// (an info item, a context name of at most 4 KiB, an error message); anything bigger
/// is a broken or hostile server.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest block status request length: a multiple of every legal minimum block size.
const MAX_STATUS_REQUEST: u64 = 1 << 31;

/// The server's block size constraints (`NBD_INFO_BLOCK_SIZE`, or the protocol's
/// defaults when the server sent none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Requests must be aligned to this (a power of two, at most 64 KiB).
    pub minimum: u32,
    /// Requests of this size and alignment are efficient.
    pub preferred: u32,
    /// Largest payload of a read or write.
    pub maximum: u32,
}

/// A connection to one NBD export. Cheap to clone: clones share the connection, and
/// any number of requests may be in flight at once. Dropping the last clone sends
/// `NBD_CMD_DISC` and closes the socket.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.inner.export)
            .field("size", &self.inner.size)
            .field("flags", &self.inner.flags)
            .field("contexts", &self.inner.contexts)
            .finish()
    }
}

struct Inner {
    export: String,
    size: u64,
    flags: u16,
    block: BlockSize,
    structured: bool,
    contexts: Vec<(u32, String)>,
    max_request: u32,
    next_cookie: AtomicU64,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Outgoing>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No request can be waiting (each holds a clone); the writer sees its channel
        // close, sends NBD_CMD_DISC and shuts the socket down.
        self.reader.abort();
    }
}

/// Why the connection is unusable.
#[derive(Clone, Debug)]
enum Closed {
    Disconnected,
    Protocol(String),
}

impl Closed {
    fn error(&self) -> Error {
        match self {
            Closed::Disconnected => Error::Disconnected,
            Closed::Protocol(m) => Error::Protocol(format!(
                "connection dropped after an earlier violation: {m}"
            )),
        }
    }
}

struct Pending {
    state: ReplyState,
    tx: oneshot::Sender<Result<ReplyOutput, Error>>,
}

#[derive(Default)]
struct ConnState {
    pending: HashMap<u64, Pending>,
    closed: Option<Closed>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<ConnState>,
    /// Tells the writer to stop after the reader gave up on the connection.
    stop_writer: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead and fails every pending request.
    fn close(&self, why: Closed) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(why);
            }
            std::mem::take(&mut st.pending)
        };
        let why = self.lock().closed.clone().unwrap_or(Closed::Disconnected);
        for (_, p) in pending {
            let _ = p.tx.send(Err(why.error()));
        }
        self.stop_writer.notify_one();
    }
}

struct Outgoing {
    header: [u8; REQUEST_LEN],
    data: Option<Vec<u8>>,
    /// For `NBD_CMD_DISC`: told once the request is on the wire.
    flushed: Option<oneshot::Sender<()>>,
}

/// What the handshake learnt.
struct Negotiated {
    size: u64,
    flags: u16,
    block: Option<BlockSize>,
    structured: bool,
    contexts: Vec<(u32, String)>,
}

fn reply_error(e: &Expect, r: ReplyError) -> Error {
    match r {
        ReplyError::Server {
            errno,
            message,
            error_offset,
        } => Error::Server {
            op: e.cmd.name(),
            offset: e.offset,
            len: u64::from(e.len),
            errno,
            message: match error_offset {
                Some(o) => format!("{message} (at offset {o})"),
                None => message,
            },
        },
        ReplyError::Protocol(m) => Error::Protocol(m),
    }
}

impl NbdClient {
    /// Connects to a unix socket and negotiates `export` with the given metadata
    /// contexts (e.g. `base:allocation`, `qemu:dirty-bitmap:b0`); a context the server
    /// does not grant is [`Error::ContextNotGranted`].
    pub async fn connect_unix(
        path: &Path,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient, Error> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(format!("connect to {}", path.display()), e))?;
        Self::connect_stream(s, export, meta_contexts).await
    }

    /// Connects over TCP; otherwise as [`NbdClient::connect_unix`].
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient, Error> {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::io("tcp connect", e))?;
        s.set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        Self::connect_stream(s, export, meta_contexts).await
    }

    /// Negotiates over an already connected byte stream (a socket, or an in-memory
    /// pipe in tests), then starts the reader and writer tasks. Needs a tokio runtime.
    pub async fn connect_stream<S>(
        mut stream: S,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let n = match handshake(&mut stream, export, meta_contexts).await {
            Ok(n) => n,
            Err(e) => {
                if matches!(e, Error::OptionRefused { .. } | Error::ContextNotGranted(_)) {
                    abort(&mut stream).await;
                }
                return Err(e);
            }
        };
        let block = n.block.unwrap_or(BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_REQUEST,
        });
        let max_request = block.maximum.min(MAX_REQUEST) / block.minimum * block.minimum;
        let (r, w) = tokio::io::split(stream);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(
            BufWriter::with_capacity(256 * 1024, w),
            rx,
            shared.clone(),
        ));
        let reader = tokio::spawn(reader(
            BufReader::with_capacity(256 * 1024, r),
            shared.clone(),
        ));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                export: export.to_string(),
                size: n.size,
                flags: n.flags,
                block,
                structured: n.structured,
                contexts: n.contexts,
                max_request,
                next_cookie: AtomicU64::new(1),
                shared,
                tx,
                reader,
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The export name this connection negotiated.
    pub fn export(&self) -> &str {
        &self.inner.export
    }

    /// Transmission flags (`NBD_FLAG_*` in [`super::proto`]).
    pub fn flags(&self) -> u16 {
        self.inner.flags
    }

    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.flags & NBD_FLAG_READ_ONLY != 0
    }

    /// Block size constraints; every request is aligned to `minimum`.
    pub fn block_size(&self) -> BlockSize {
        self.inner.block
    }

    /// Whether structured replies were negotiated (always, with QEMU).
    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }

    /// The metadata contexts granted: (id, name).
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.inner.contexts
    }

    /// Largest read or write: the server's maximum payload, at most 32 MiB.
    pub fn max_request(&self) -> u32 {
        self.inner.max_request
    }

    /// How many requests await their reply (sent, or queued for the writer).
    pub fn in_flight(&self) -> usize {
        self.inner.shared.lock().pending.len()
    }

    /// Reads `len` bytes at `offset` (`len` at most [`NbdClient::max_request`]).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        self.check(Command::Read, offset, u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        match self.submit(Command::Read, offset, len, None, None).await? {
            ReplyOutput::Data(d) => Ok(d),
            _ => Err(Error::Protocol("read reply without data".into())),
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`, in requests of at most
    /// [`NbdClient::max_request`] bytes.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check(Command::Read, offset, buf.len() as u64)?;
        let step = self.inner.max_request as usize;
        for (i, part) in buf.chunks_mut(step).enumerate() {
            let off = offset + (i * step) as u64;
            let data = self.read(off, part.len() as u32).await?;
            part.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Block status of `[offset, offset + len)` in the negotiated context `context`.
    /// The extents are contiguous from `offset`, non-empty and end at or before
    /// `offset + len`; the server may describe less than asked (call again from the
    /// end of the last extent, or use [`NbdClient::block_status_all`]).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        context: &str,
    ) -> Result<Vec<Extent>, Error> {
        self.check(Command::BlockStatus, offset, u64::from(len))?;
        let id = self
            .context_id(context)
            .ok_or_else(|| Error::InvalidRequest {
                op: Command::BlockStatus.name(),
                offset,
                len: u64::from(len),
                reason: format!("meta context {context:?} was not negotiated on this connection"),
            })?;
        match self
            .submit(Command::BlockStatus, offset, len, None, Some(id))
            .await?
        {
            ReplyOutput::Extents(e) => Ok(e),
            _ => Err(Error::Protocol("block status reply without extents".into())),
        }
    }

    /// Block status of the whole export in `context`, adjacent extents with equal
    /// flags merged.
    pub async fn block_status_all(&self, context: &str) -> Result<Vec<Extent>, Error> {
        let mut out: Vec<Extent> = Vec::new();
        let mut offset = 0u64;
        while offset < self.inner.size {
            let len = (self.inner.size - offset).min(MAX_STATUS_REQUEST) as u32;
            let extents = self.block_status(offset, len, context).await?;
            for e in extents {
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.end() == e.offset => {
                        last.length += e.length;
                    }
                    _ => out.push(e),
                }
            }
            // Extents are non-empty and contiguous from `offset`, so this advances.
            offset = out.last().map_or(offset, Extent::end);
        }
        Ok(out)
    }

    /// The id the server gave a negotiated context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.inner
            .contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    /// Writes `data` at `offset` (at most [`NbdClient::max_request`] bytes).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.check(Command::Write, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.submit(
            Command::Write,
            offset,
            data.len() as u32,
            Some(data.to_vec()),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Zeroes `len` bytes at `offset` (needs `NBD_FLAG_SEND_WRITE_ZEROES`).
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), Error> {
        self.check(Command::WriteZeroes, offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        self.submit(Command::WriteZeroes, offset, len, None, None)
            .await
            .map(|_| ())
    }

    /// Makes completed writes durable (needs `NBD_FLAG_SEND_FLUSH`).
    pub async fn flush(&self) -> Result<(), Error> {
        self.check(Command::Flush, 0, 0)?;
        self.submit(Command::Flush, 0, 0, None, None)
            .await
            .map(|_| ())
    }

    /// Sends `NBD_CMD_DISC` and closes the sending side. Requests already sent (from
    /// other clones) still get their replies; new ones fail with
    /// [`Error::Disconnected`].
    pub async fn disconnect(self) -> Result<(), Error> {
        {
            let mut st = self.inner.shared.lock();
            if st.closed.is_some() {
                return Ok(());
            }
            st.closed = Some(Closed::Disconnected);
        }
        let (tx, rx) = oneshot::channel();
        let msg = Outgoing {
            header: encode_request(0, Command::Disc, 0, 0, 0),
            data: None,
            flushed: Some(tx),
        };
        if self.inner.tx.send(msg).is_err() {
            return Ok(());
        }
        let _ = rx.await;
        Ok(())
    }

    fn check(&self, cmd: Command, offset: u64, len: u64) -> Result<(), Error> {
        let bad = |reason: String| Error::InvalidRequest {
            op: cmd.name(),
            offset,
            len,
            reason,
        };
        let f = self.inner.flags;
        match cmd {
            Command::Write | Command::WriteZeroes | Command::Trim
                if f & NBD_FLAG_READ_ONLY != 0 =>
            {
                return Err(bad("the export is read-only".into()));
            }
            Command::WriteZeroes if f & NBD_FLAG_SEND_WRITE_ZEROES == 0 => {
                return Err(bad("the server does not support write zeroes".into()));
            }
            Command::Flush if f & NBD_FLAG_SEND_FLUSH == 0 => {
                return Err(bad("the server does not support flush".into()));
            }
            Command::Flush => return Ok(()),
            Command::BlockStatus if !self.inner.structured || self.inner.contexts.is_empty() => {
                return Err(bad("no meta context was negotiated".into()));
            }
            Command::BlockStatus if len == 0 => return Err(bad("empty range".into())),
            Command::Read | Command::Write if len > u64::from(self.inner.max_request) => {
                return Err(bad(format!(
                    "longer than the largest request, {} bytes",
                    self.inner.max_request
                )));
            }
            _ => {}
        }
        let size = self.inner.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(bad(format!("beyond the export's end ({size} bytes)")));
        }
        let min = u64::from(self.inner.block.minimum);
        if !offset.is_multiple_of(min) || (!len.is_multiple_of(min) && offset + len != size) {
            return Err(bad(format!(
                "not aligned to the server's minimum block size {min}"
            )));
        }
        Ok(())
    }

    async fn submit(
        &self,
        cmd: Command,
        offset: u64,
        len: u32,
        data: Option<Vec<u8>>,
        want_context: Option<u32>,
    ) -> Result<ReplyOutput, Error> {
        let inner = &self.inner;
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let expect = Expect {
            cmd,
            offset,
            len,
            structured: inner.structured,
            export_size: inner.size,
            contexts: inner.contexts.iter().map(|(id, _)| *id).collect(),
            want_context,
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.shared.lock();
            if let Some(why) = &st.closed {
                return Err(why.error());
            }
            st.pending.insert(
                cookie,
                Pending {
                    state: ReplyState::new(expect),
                    tx,
                },
            );
        }
        let msg = Outgoing {
            header: encode_request(0, cmd, cookie, offset, len),
            data,
            flushed: None,
        };
        if inner.tx.send(msg).is_err() {
            inner.shared.lock().pending.remove(&cookie);
            return Err(Error::Disconnected);
        }
        // If this future is dropped, the reply is still read and discarded; the
        // writer task owns the request bytes, so the stream never desynchronizes.
        rx.await.unwrap_or(Err(Error::Disconnected))
    }
}

async fn writer<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = shared.stop_writer.notified() => {
                let _ = w.shutdown().await;
                return;
            }
        };
        let Some(mut msg) = first else {
            // Every handle is gone: say goodbye.
            let disc = encode_request(0, Command::Disc, 0, 0, 0);
            let _ = w.write_all(&disc).await;
            let _ = w.shutdown().await;
            return;
        };
        loop {
            let res = write_one(&mut w, &msg).await;
            let is_disc = msg.flushed.is_some();
            if is_disc || res.is_err() {
                let _ = w.shutdown().await;
                if let Some(t) = msg.flushed.take() {
                    let _ = t.send(());
                }
                if res.is_err() {
                    shared.close(Closed::Disconnected);
                }
                return;
            }
            // Batch whatever else is queued into the same flush.
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        if w.flush().await.is_err() {
            shared.close(Closed::Disconnected);
            return;
        }
    }
}

async fn write_one<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, msg: &Outgoing) -> io::Result<()> {
    w.write_all(&msg.header).await?;
    if let Some(d) = &msg.data {
        w.write_all(d).await?;
    }
    Ok(())
}

async fn reader<R: AsyncRead + Unpin>(mut r: BufReader<R>, shared: Arc<Shared>) {
    let why = loop {
        match read_reply(&mut r, &shared).await {
            Ok(()) => {}
            Err(why) => break why,
        }
    };
    shared.close(why);
}

/// Reads one simple reply or structured chunk and applies it to its request.
async fn read_reply<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    shared: &Shared,
) -> Result<(), Closed> {
    let eof = |_e: io::Error| Closed::Disconnected;
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).await.map_err(eof)?;
    match u32::from_be_bytes(magic) {
        NBD_SIMPLE_REPLY_MAGIC => {
            let mut b = [0u8; SIMPLE_REPLY_LEN - 4];
            r.read_exact(&mut b).await.map_err(eof)?;
            let h = SimpleHeader::parse(&b);
            let mut p = take_pending(shared, h.cookie)?;
            match p.state.apply_simple(&h) {
                Ok(0) => {}
                Ok(_) => {
                    let target = p.state.simple_data_target();
                    r.read_exact(target).await.map_err(eof)?;
                }
                Err(e) => return Err(fail(p, e)),
            }
            finish(p)
        }
        NBD_STRUCTURED_REPLY_MAGIC => {
            let mut b = [0u8; CHUNK_HEADER_LEN - 4];
            r.read_exact(&mut b).await.map_err(eof)?;
            let h = ChunkHeader::parse(&b);
            let mut p = take_pending(shared, h.cookie)?;
            let plan = match p.state.check_chunk(&h) {
                Ok(plan) => plan,
                Err(e) => return Err(fail(p, e)),
            };
            match plan {
                ChunkPlan::OffsetData => {
                    let mut off = [0u8; 8];
                    r.read_exact(&mut off).await.map_err(eof)?;
                    let offset = u64::from_be_bytes(off);
                    match p.state.data_target(offset, h.length - 8) {
                        Ok(target) => r.read_exact(target).await.map_err(eof)?,
                        Err(e) => return Err(fail(p, e)),
                    };
                    p.state.end_chunk(&h);
                }
                ChunkPlan::Payload => {
                    // Bounded by check_chunk: error chunks ≤ 4 KiB + slack, block
                    // status ≤ 8 * (request length + 1), at most 8 MiB.
                    let mut payload = vec![0u8; h.length as usize];
                    r.read_exact(&mut payload).await.map_err(eof)?;
                    if let Err(e) = p.state.apply_chunk(&h, &payload) {
                        return Err(fail(p, e));
                    }
                }
            }
            if p.state.is_done() {
                finish(p)
            } else {
                // Back in the map until the next chunk; if the connection failed
                // meanwhile, the reader's own close drains it again.
                shared.lock().pending.insert(h.cookie, p);
                Ok(())
            }
        }
        m => Err(Closed::Protocol(format!("bad reply magic {m:#010x}"))),
    }
}

fn take_pending(shared: &Shared, cookie: u64) -> Result<Pending, Closed> {
    shared
        .lock()
        .pending
        .remove(&cookie)
        .ok_or_else(|| Closed::Protocol(format!("reply with unknown cookie {cookie}")))
}

/// Fails a request with a protocol error; the connection goes down with it.
fn fail(p: Pending, e: ReplyError) -> Closed {
    let why = Closed::Protocol(e.to_string());
    let _ = p.tx.send(Err(reply_error(p.state.expect(), e)));
    why
}

/// Delivers a complete reply. A protocol error in it (e.g. incomplete coverage) also
/// brings the connection down.
fn finish(p: Pending) -> Result<(), Closed> {
    let expect = p.state.expect().clone();
    match p.state.finish() {
        Ok(out) => {
            let _ = p.tx.send(Ok(out));
            Ok(())
        }
        Err(e @ ReplyError::Server { .. }) => {
            let _ = p.tx.send(Err(reply_error(&expect, e)));
            Ok(())
        }
        Err(e) => {
            let why = Closed::Protocol(e.to_string());
            let _ = p.tx.send(Err(reply_error(&expect, e)));
            Err(why)
        }
    }
}

// --- Handshake -------------------------------------------------------------------------

fn hs_io(step: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Handshake(format!("server closed the connection {step}"))
        } else {
            Error::io(format!("handshake: {step}"), e)
        }
    }
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), Error> {
    let step = format!("sending {}", option_name(option));
    let len = u32::try_from(data.len())
        .map_err(|_| Error::Handshake(format!("{} data too long", option_name(option))))?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.map_err(hs_io(&step))?;
    s.flush().await.map_err(hs_io(&step))
}

struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<OptReply, Error> {
    let step = format!("reading the reply to {}", option_name(option));
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.map_err(hs_io(&step))?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if magic != OPTION_REPLY_MAGIC {
        return Err(Error::Handshake(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    if opt != option {
        return Err(Error::Handshake(format!(
            "reply to option {opt} while waiting for {}",
            option_name(option)
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(Error::Handshake(format!(
            "reply to {} of {len} bytes",
            option_name(option)
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.map_err(hs_io(&step))?;
    if kind & NBD_REP_FLAG_ERROR != 0 {
        let message = sanitize_message(&data);
        return Err(Error::OptionRefused {
            option: option_name(option),
            code: kind,
            message: if message.is_empty() {
                "no message".into()
            } else {
                message
            },
        });
    }
    Ok(OptReply { kind, data })
}

fn put_str(b: &mut Vec<u8>, s: &str) -> Result<(), Error> {
    if s.len() > MAX_MESSAGE {
        return Err(Error::Handshake(format!(
            "string of {} bytes is longer than the protocol's 4096",
            s.len()
        )));
    }
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    Ok(())
}

async fn handshake<S>(s: &mut S, export: &str, meta_contexts: &[&str]) -> Result<Negotiated, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = [0u8; 18];
    s.read_exact(&mut h[..16])
        .await
        .map_err(hs_io("reading the greeting"))?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    let second = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(Error::Handshake(format!(
            "not an nbd server (greeting magic {magic:#x})"
        )));
    }
    if second == CLISERV_MAGIC {
        return Err(Error::Handshake(
            "server uses oldstyle negotiation, which has no options".into(),
        ));
    }
    if second != IHAVEOPT {
        return Err(Error::Handshake(format!("bad newstyle magic {second:#x}")));
    }
    s.read_exact(&mut h[16..18])
        .await
        .map_err(hs_io("reading the handshake flags"))?;
    let hflags = u16::from_be_bytes([h[16], h[17]]);
    if hflags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Handshake(
            "server does not support fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = hflags & NBD_FLAG_NO_ZEROES != 0;
    let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= NBD_FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(hs_io("sending client flags"))?;

    // Structured replies: required for block status, preferred for reads.
    send_option(s, NBD_OPT_STRUCTURED_REPLY, &[]).await?;
    let structured = match read_option_reply(s, NBD_OPT_STRUCTURED_REPLY).await {
        Ok(r) if r.kind == NBD_REP_ACK => true,
        Ok(r) => {
            return Err(Error::Handshake(format!(
                "unexpected reply {} to NBD_OPT_STRUCTURED_REPLY",
                r.kind
            )))
        }
        Err(Error::OptionRefused { code, .. })
            if code == (NBD_REP_FLAG_ERROR | 1) && meta_contexts.is_empty() =>
        {
            false
        }
        Err(e) => return Err(e),
    };

    let mut contexts = Vec::new();
    if !meta_contexts.is_empty() {
        let mut d = Vec::new();
        put_str(&mut d, export)?;
        d.extend_from_slice(&(meta_contexts.len() as u32).to_be_bytes());
        for c in meta_contexts {
            put_str(&mut d, c)?;
        }
        send_option(s, NBD_OPT_SET_META_CONTEXT, &d).await?;
        loop {
            let r = read_option_reply(s, NBD_OPT_SET_META_CONTEXT).await?;
            match r.kind {
                NBD_REP_ACK => break,
                NBD_REP_META_CONTEXT if r.data.len() >= 4 => {
                    let id = u32::from_be_bytes(r.data[0..4].try_into().unwrap_or_default());
                    let name = String::from_utf8(r.data[4..].to_vec())
                        .map_err(|_| Error::Handshake("meta context name is not utf-8".into()))?;
                    if contexts.iter().any(|(i, _)| *i == id) {
                        return Err(Error::Handshake(format!(
                            "meta context id {id} given twice"
                        )));
                    }
                    if contexts.len() >= meta_contexts.len() {
                        return Err(Error::Handshake(
                            "more meta contexts granted than requested".into(),
                        ));
                    }
                    contexts.push((id, name));
                }
                k => {
                    return Err(Error::Handshake(format!(
                        "unexpected reply {k} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
        for want in meta_contexts {
            if !contexts.iter().any(|(_, n)| n == want) {
                return Err(Error::ContextNotGranted((*want).to_string()));
            }
        }
    }

    // NBD_OPT_GO, asking for block size constraints.
    let mut d = Vec::new();
    put_str(&mut d, export)?;
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, NBD_OPT_GO, &d).await?;
    let mut export_info = None;
    let mut block = None;
    loop {
        let r = match read_option_reply(s, NBD_OPT_GO).await {
            Ok(r) => r,
            Err(Error::OptionRefused { code, .. }) if code == (NBD_REP_FLAG_ERROR | 1) => {
                // A server older than NBD_OPT_GO: the protocol says fall back.
                let (size, flags) = export_name_fallback(s, export, no_zeroes).await?;
                return Ok(Negotiated {
                    size,
                    flags,
                    block: None,
                    structured,
                    contexts,
                });
            }
            Err(Error::OptionRefused {
                option,
                code,
                message,
            }) if code == (NBD_REP_FLAG_ERROR | 6) => {
                return Err(Error::OptionRefused {
                    option,
                    code,
                    message: format!("export {export:?}: {message}"),
                });
            }
            Err(e) => return Err(e),
        };
        match r.kind {
            NBD_REP_ACK => break,
            NBD_REP_INFO => {
                if r.data.len() < 2 {
                    return Err(Error::Handshake("NBD_REP_INFO shorter than 2 bytes".into()));
                }
                let d = &r.data;
                match u16::from_be_bytes([d[0], d[1]]) {
                    NBD_INFO_EXPORT => {
                        if d.len() != 12 {
                            return Err(Error::Handshake(format!(
                                "NBD_INFO_EXPORT of {} bytes",
                                d.len()
                            )));
                        }
                        let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                        let flags = u16::from_be_bytes([d[10], d[11]]);
                        export_info = Some((size, flags));
                    }
                    NBD_INFO_BLOCK_SIZE => {
                        if d.len() != 14 {
                            return Err(Error::Handshake(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes",
                                d.len()
                            )));
                        }
                        let v = |i: usize| {
                            u32::from_be_bytes(d[i..i + 4].try_into().unwrap_or_default())
                        };
                        block = Some(check_block_size(BlockSize {
                            minimum: v(2),
                            preferred: v(6),
                            maximum: v(10),
                        })?);
                    }
                    _ => {} // NBD_INFO_NAME, NBD_INFO_DESCRIPTION, future ones: ignored.
                }
            }
            k => {
                return Err(Error::Handshake(format!(
                    "unexpected reply {k} to NBD_OPT_GO"
                )))
            }
        }
    }
    let (size, flags) = export_info
        .ok_or_else(|| Error::Handshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()))?;
    Ok(Negotiated {
        size,
        flags,
        block,
        structured,
        contexts,
    })
}

/// Ends option haggling politely after a refusal: `NBD_OPT_ABORT`, then wait briefly
/// for the server's acknowledgement (or its close) so it does not log a broken pipe.
async fn abort<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    if send_option(s, NBD_OPT_ABORT, &[]).await.is_ok() {
        let wait = read_option_reply(s, NBD_OPT_ABORT);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), wait).await;
    }
    let _ = s.shutdown().await;
}

fn check_block_size(b: BlockSize) -> Result<BlockSize, Error> {
    let ok = b.minimum.is_power_of_two()
        && b.minimum <= 64 * 1024
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum
        && b.maximum >= b.minimum;
    if ok {
        Ok(b)
    } else {
        Err(Error::Handshake(format!(
            "invalid block size constraints: minimum {}, preferred {}, maximum {}",
            b.minimum, b.preferred, b.maximum
        )))
    }
}

async fn export_name_fallback<S>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, NBD_OPT_EXPORT_NAME, export.as_bytes()).await?;
    let step = "reading the reply to NBD_OPT_EXPORT_NAME";
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { b.len() };
    s.read_exact(&mut b[..n]).await.map_err(hs_io(step))?;
    let size = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
    let flags = u16::from_be_bytes([b[8], b[9]]);
    Ok((size, flags))
}
