//! The connection handle: [`NbdClient`], its connect functions and its request API
//! (argument checks against the negotiated limits, submission by cookie).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::conn::{reader, writer, Closed, Outgoing, Pending, Shared};
use super::handshake::{abort, handshake, BlockSize};
use super::proto::*;
use super::{Error, MAX_REQUEST};

/// Largest block status request length: a multiple of every legal minimum block size.
const MAX_STATUS_REQUEST: u64 = 1 << 31;

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
