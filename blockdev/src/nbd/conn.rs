//! The connection's two tasks and the state they share: the writer serializes requests
//! onto the socket, the reader dispatches replies to pending requests by cookie and
//! fails them all when the connection goes down.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, Notify};

use super::proto::*;
use super::Error;

/// Why the connection is unusable.
#[derive(Clone, Debug)]
pub(super) enum Closed {
    Disconnected,
    Protocol(String),
}

impl Closed {
    pub(super) fn error(&self) -> Error {
        match self {
            Closed::Disconnected => Error::Disconnected,
            Closed::Protocol(m) => Error::Protocol(format!(
                "connection dropped after an earlier violation: {m}"
            )),
        }
    }
}

pub(super) struct Pending {
    pub(super) state: ReplyState,
    pub(super) tx: oneshot::Sender<Result<ReplyOutput, Error>>,
}

#[derive(Default)]
pub(super) struct ConnState {
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) closed: Option<Closed>,
}

#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<ConnState>,
    /// Tells the writer to stop after the reader gave up on the connection.
    stop_writer: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, ConnState> {
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

pub(super) struct Outgoing {
    pub(super) header: [u8; REQUEST_LEN],
    pub(super) data: Option<Vec<u8>>,
    /// For `NBD_CMD_DISC`: told once the request is on the wire.
    pub(super) flushed: Option<oneshot::Sender<()>>,
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
pub(super) async fn writer<W: AsyncWrite + Unpin>(
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

pub(super) async fn reader<R: AsyncRead + Unpin>(mut r: BufReader<R>, shared: Arc<Shared>) {
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
