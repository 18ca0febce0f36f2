//! The connection handler: one task per guest connection, at most one connection
//! per VM. Reads through the bounded [`Decoder`], appends batches to the VM's log
//! and acknowledges them, routes `applied` answers to [`DpaLink::apply`] callers.

use crate::error::error_chain;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use weft_dpa::proto::{
    self, caps, encode, negotiate, Applied, Apply, Decoder, Entry, Message, Welcome, HEADER,
    LIMITS, MAX_PAYLOAD, TRAILER,
};

use super::rate::VmRate;
use super::{EntrySink, LinkLimits};
use crate::log::ProvenanceError;

/// Bytes read from a socket at once.
const READ_CHUNK: usize = 64 * 1024;
/// Frames queued for a guest before the reader waits for the writer.
const OUT_QUEUE: usize = 64;
/// Most entries appended (and made durable) together when several consecutive
/// batches are already buffered.
const COALESCE_MAX: usize = 16 * 1024;
/// What opening a connection costs in the VM's byte bucket, so that a guest that
/// reconnects in a loop is slowed like one that floods.
const CONNECT_COST_BYTES: u64 = 16 * 1024;
/// At most one warning per VM in this time; the rest are counted.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long a closing connection may take to flush its last frames (a goodbye).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why [`DpaLink::apply`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// No DPA of that VM is connected (or it has not said hello yet).
    #[error("no DPA of {0:?} is connected")]
    NotConnected(String),
    /// The VM's DPA did not announce the `apply` capability.
    #[error("the DPA of {0:?} does not accept apply")]
    NotSupported(String),
    /// The changes cannot be sent as they are.
    #[error("cannot apply these changes: {0}")]
    Invalid(String),
    /// The DPA did not answer in time.
    #[error("the DPA of {vm:?} did not answer within {secs}s")]
    Timeout {
        /// The VM.
        vm: String,
        /// The timeout in seconds.
        secs: u64,
    },
    /// The connection closed before the answer came.
    #[error("the DPA of {0:?} disconnected before answering")]
    Disconnected(String),
}

/// Counters of one VM's link, since weftd started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Whether a DPA is connected and has said hello.
    pub connected: bool,
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed for a protocol violation (garbage, bad checksum, oversize,
    /// invalid entries, a gap, no hello in time).
    pub refused: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Batches received.
    pub batches: u64,
    /// Entries received (resends included).
    pub entries: u64,
    /// The highest seq acknowledged.
    pub acked: u64,
    /// Time reading was paused for the rate limit, in ms.
    pub throttled_ms: u64,
    /// Times reading paused because the log was at the VM's quota.
    pub quota_pauses: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    entries: AtomicU64,
    acked: AtomicU64,
    throttled_ms: AtomicU64,
    quota_pauses: AtomicU64,
}

/// What the link keeps per VM, across its connections.
struct Slot {
    rate: Arc<Mutex<VmRate>>,
    /// Held across each append (inside the blocking task): a replaced connection's
    /// append finishes before the next connection's.
    append: Arc<tokio::sync::Mutex<()>>,
    counters: Arc<Counters>,
    warned: Arc<Mutex<Warned>>,
    conn: Option<Conn>,
}

#[derive(Default)]
struct Warned {
    last: Option<Instant>,
    suppressed: u64,
}

/// The live connection of a VM.
struct Conn {
    id: u64,
    task: AbortHandle,
    out: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    /// Set once the guest said hello: its capabilities.
    hello: Arc<Mutex<Option<Vec<String>>>>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Applied>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain update: a panic cannot leave it torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves guests' DPA connections and forwards apply requests to them. Cheap to
/// clone; clones share everything.
#[derive(Clone)]
pub struct DpaLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DpaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpaLink")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

struct Inner {
    sink: Arc<dyn EntrySink>,
    limits: LinkLimits,
    vms: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
}

impl DpaLink {
    /// A link writing into `sink` under `limits`.
    pub fn new(sink: Arc<dyn EntrySink>, limits: LinkLimits) -> DpaLink {
        DpaLink {
            inner: Arc::new(Inner {
                sink,
                limits,
                vms: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> LinkLimits {
        self.inner.limits
    }

    /// Serves a new connection of `vm` (known from the listener that accepted it) in
    /// its own task. A connection the VM already has is closed: one per VM.
    pub fn accept<S>(&self, vm: &str, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let pending: Pending = Arc::default();
        let hello = Arc::new(Mutex::new(None));
        let mut vms = lock(&self.inner.vms);
        let slot = vms.entry(vm.to_string()).or_insert_with(|| Slot {
            rate: Arc::new(Mutex::new(VmRate::new(
                self.inner.limits.entries_per_sec,
                self.inner.limits.bytes_per_sec,
            ))),
            append: Arc::default(),
            counters: Arc::default(),
            warned: Arc::default(),
            conn: None,
        });
        slot.counters.connections.fetch_add(1, Ordering::Relaxed);
        let ctx = ConnCtx {
            link: self.clone(),
            vm: vm.to_string(),
            id,
            rate: slot.rate.clone(),
            append: slot.append.clone(),
            counters: slot.counters.clone(),
            warned: slot.warned.clone(),
            out: out.clone(),
            pending: pending.clone(),
            hello: hello.clone(),
        };
        let task = tokio::spawn(ctx.run(stream, out_rx)).abort_handle();
        let old = slot.conn.replace(Conn {
            id,
            task,
            out,
            pending,
            hello,
        });
        drop(vms);
        if let Some(old) = old {
            info!(
                vm,
                old = old.id,
                new = id,
                "dpa connection replaced by a new one"
            );
            old.task.abort();
        }
        debug!(vm, conn = id, "dpa connection accepted");
    }

    /// Closes `vm`'s connection, if any (its VM stopped).
    pub fn disconnect(&self, vm: &str) {
        let conn = lock(&self.inner.vms)
            .get_mut(vm)
            .and_then(|slot| slot.conn.take());
        if let Some(conn) = conn {
            conn.task.abort();
        }
    }

    /// Forgets everything of `vm` (it was deleted): its connection, counters and rate.
    pub fn forget(&self, vm: &str) {
        self.disconnect(vm);
        lock(&self.inner.vms).remove(vm);
    }

    /// Counters of `vm`'s link, if it ever connected.
    pub fn stats(&self, vm: &str) -> Option<VmStats> {
        let vms = lock(&self.inner.vms);
        let slot = vms.get(vm)?;
        let c = &slot.counters;
        Some(VmStats {
            connected: slot
                .conn
                .as_ref()
                .is_some_and(|conn| lock(&conn.hello).is_some()),
            connections: c.connections.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            entries: c.entries.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            throttled_ms: c.throttled_ms.load(Ordering::Relaxed),
            quota_pauses: c.quota_pauses.load(Ordering::Relaxed),
        })
    }

    /// Asks `vm`'s connected DPA to make `changes` (replay into a weave) and waits for
    /// its answer. Changes are validated as the DPA will (`seq` from 1; the DPA
    /// ignores `seq` and `guest_time_us`); at most 4096 in one call, and they must fit
    /// in one frame.
    pub async fn apply(&self, vm: &str, changes: Vec<Entry>) -> Result<Applied, ApplyError> {
        if changes.len() > LIMITS.batch_entries {
            return Err(ApplyError::Invalid(format!(
                "{} changes in one apply (limit {}); split them",
                changes.len(),
                LIMITS.batch_entries
            )));
        }
        for c in &changes {
            c.validate(&LIMITS)
                .map_err(|e| ApplyError::Invalid(e.to_string()))?;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&Message::Apply(Apply { id, changes }));
        if frame.len() > HEADER + MAX_PAYLOAD + TRAILER {
            return Err(ApplyError::Invalid(format!(
                "the changes encode to {} bytes, over the frame limit of {MAX_PAYLOAD}; split them",
                frame.len() - HEADER - TRAILER
            )));
        }
        let (out, pending) = {
            let vms = lock(&self.inner.vms);
            let conn = vms
                .get(vm)
                .and_then(|s| s.conn.as_ref())
                .ok_or_else(|| ApplyError::NotConnected(vm.to_string()))?;
            match lock(&conn.hello).as_ref() {
                None => return Err(ApplyError::NotConnected(vm.to_string())),
                Some(caps) if !caps.iter().any(|c| c == caps::APPLY) => {
                    return Err(ApplyError::NotSupported(vm.to_string()))
                }
                Some(_) => {}
            }
            (conn.out.clone(), conn.pending.clone())
        };
        let (tx, rx) = oneshot::channel();
        lock(&pending).insert(id, tx);
        let timeout = self.inner.limits.apply_timeout;
        let timed_out = || ApplyError::Timeout {
            vm: vm.to_string(),
            secs: timeout.as_secs(),
        };
        let deadline = Instant::now() + timeout;
        let result = match tokio::time::timeout_at(deadline, out.send(frame)).await {
            Err(_) => Err(timed_out()),
            Ok(Err(_)) => Err(ApplyError::Disconnected(vm.to_string())),
            Ok(Ok(())) => match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => Err(timed_out()),
                Ok(Err(_)) => Err(ApplyError::Disconnected(vm.to_string())),
                Ok(Ok(applied)) => return Ok(applied),
            },
        };
        lock(&pending).remove(&id);
        result
    }

    /// Listens on the unix socket `path` (removed first if it exists) for `vm`'s
    /// connections (with vhost-user vsock, `<uds-path>_5150`, where the VM's device
    /// process connects for each guest connection) and serves them until the
    /// returned task is aborted. Only peers of weftd's own user are served.
    pub fn listen_unix(&self, vm: &str, path: &Path) -> std::io::Result<AbortHandle> {
        self.listen_unix_for(vm, path, nix::unistd::geteuid().as_raw())
    }

    /// [`DpaLink::listen_unix`] serving only peers of the user `peer_uid` (the uid
    /// the VM's device process runs as) or of weftd's own user.
    pub fn listen_unix_for(
        &self,
        vm: &str,
        path: &Path,
        peer_uid: u32,
    ) -> std::io::Result<AbortHandle> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let link = self.clone();
        let vm = vm.to_string();
        let me = nix::unistd::geteuid().as_raw();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => match stream.peer_cred() {
                        Ok(cred) if cred.uid() == me || cred.uid() == peer_uid => {
                            link.accept(&vm, stream)
                        }
                        Ok(cred) => {
                            warn!(
                                vm,
                                uid = cred.uid(),
                                "dpa socket connection from another user refused"
                            )
                        }
                        Err(e) => debug!(vm, error = %e, "no peer credentials; refused"),
                    },
                    Err(e) => {
                        // Out of descriptors and the like: wait instead of spinning.
                        warn!(vm, error = %e, "accept on the dpa socket failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Ok(task.abort_handle())
    }

    fn deregister(&self, vm: &str, id: u64) {
        let mut vms = lock(&self.inner.vms);
        if let Some(slot) = vms.get_mut(vm) {
            if slot.conn.as_ref().is_some_and(|c| c.id == id) {
                slot.conn = None;
            }
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Proto(#[from] proto::Error),
    #[error("no hello within {0}s")]
    HelloTimeout(u64),
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    #[error("connection closed inside a frame ({0} bytes pending)")]
    Truncated(usize),
    #[error("batch starting at {got} leaves a gap after the last durable entry {last}")]
    Gap { last: u64, got: u64 },
    #[error("provenance log: {0}")]
    Log(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    /// A violation by the guest (counted, warned about, answered with goodbye).
    fn is_violation(&self) -> bool {
        !matches!(self, ConnError::Io(_) | ConnError::Log(_))
    }
}

/// One connection's task state.
struct ConnCtx {
    link: DpaLink,
    vm: String,
    id: u64,
    rate: Arc<Mutex<VmRate>>,
    append: Arc<tokio::sync::Mutex<()>>,
    counters: Arc<Counters>,
    warned: Arc<Mutex<Warned>>,
    out: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    hello: Arc<Mutex<Option<Vec<String>>>>,
}

/// Aborts a task when dropped (the writer, if the connection task is aborted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = rx.recv().await {
        if wr.write_all(&frame).await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

struct FrameReader<R> {
    rd: R,
    dec: Decoder,
    buf: Vec<u8>,
}

impl ConnCtx {
    async fn run<S>(self, stream: S, out_rx: mpsc::Receiver<Vec<u8>>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let writer = AbortOnDrop(tokio::spawn(write_frames(wr, out_rx)));
        let result = self.serve(rd).await;
        match &result {
            Ok(()) => debug!(vm = %self.vm, conn = self.id, "dpa connection closed"),
            Err(e) if e.is_violation() => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                self.warn(&format!("closing the dpa connection: {e}"));
                let reason: String = e.to_string().chars().take(200).collect();
                let _ = self.out.try_send(encode(&Message::Goodbye { reason }));
            }
            Err(ConnError::Log(e)) => {
                warn!(vm = %self.vm, conn = self.id, error = %e, "closing the dpa connection: cannot append");
                let _ = self.out.try_send(encode(&Message::Goodbye {
                    reason: "host error; try again later".into(),
                }));
            }
            Err(e) => debug!(vm = %self.vm, conn = self.id, error = %e, "dpa connection ended"),
        }
        self.link.deregister(&self.vm, self.id);
        let ConnCtx { out, pending, .. } = self;
        drop(out);
        // Callers of apply learn that the connection is gone.
        lock(&pending).clear();
        let mut writer = writer;
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, &mut writer.0).await;
    }

    /// A warning line, at most one per VM every [`WARN_EVERY`].
    fn warn(&self, what: &str) {
        let mut w = lock(&self.warned);
        let now = Instant::now();
        if w.last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            w.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut w.suppressed);
        w.last = Some(now);
        drop(w);
        warn!(vm = %self.vm, conn = self.id, suppressed, "{what}");
    }

    async fn pause(&self, wait: Duration) {
        if wait.is_zero() {
            return;
        }
        self.counters
            .throttled_ms
            .fetch_add(wait.as_millis() as u64, Ordering::Relaxed);
        debug!(vm = %self.vm, ms = wait.as_millis() as u64, "over the dpa rate limit: reading paused");
        tokio::time::sleep(wait).await;
    }

    /// The next message: decodes what is buffered, else reads more (after paying
    /// off the VM's byte debt). `None` at a clean end of stream.
    async fn next<R: AsyncRead + Unpin>(
        &self,
        r: &mut FrameReader<R>,
    ) -> Result<Option<Message>, ConnError> {
        loop {
            if let Some(msg) = r.dec.next_message()? {
                return Ok(Some(msg));
            }
            let debt = lock(&self.rate).bytes.debt(Instant::now());
            self.pause(debt).await;
            let n = r.rd.read(&mut r.buf).await?;
            if n == 0 {
                return match r.dec.pending() {
                    0 => Ok(None),
                    p => Err(ConnError::Truncated(p)),
                };
            }
            self.counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
            lock(&self.rate).bytes.charge(n as u64, Instant::now());
            r.dec.feed(&r.buf[..n]);
        }
    }

    async fn send(&self, msg: &Message) -> Result<(), ConnError> {
        self.out
            .send(encode(msg))
            .await
            .map_err(|_| ConnError::Io(std::io::ErrorKind::BrokenPipe.into()))
    }

    async fn serve<R: AsyncRead + Unpin>(&self, rd: R) -> Result<(), ConnError> {
        let connect_debt = lock(&self.rate)
            .bytes
            .charge(CONNECT_COST_BYTES, Instant::now());
        self.pause(connect_debt).await;
        let mut r = FrameReader {
            rd,
            dec: Decoder::new(),
            buf: vec![0; READ_CHUNK],
        };
        let limits = self.link.inner.limits;
        let hello = match tokio::time::timeout(limits.hello_timeout, self.next(&mut r)).await {
            Err(_) => return Err(ConnError::HelloTimeout(limits.hello_timeout.as_secs())),
            Ok(r) => r?,
        };
        let hello = match hello {
            None => return Ok(()),
            Some(Message::Hello(h)) => h,
            Some(other) => return Err(ConnError::Unexpected(kind(&other))),
        };
        let version = negotiate(hello.version)?;
        let acked = self.last_seq().await?;
        self.counters.acked.store(acked, Ordering::Relaxed);
        self.send(&Message::Welcome(Welcome { version, acked }))
            .await?;
        let agent: String = hello.agent.chars().take(80).collect();
        info!(vm = %self.vm, conn = self.id, agent, version, acked, "dpa connected");
        *lock(&self.hello) = Some(hello.capabilities);

        let mut carried: Option<Message> = None;
        loop {
            let msg = match carried.take() {
                Some(m) => m,
                None => match self.next(&mut r).await? {
                    Some(m) => m,
                    None => return Ok(()),
                },
            };
            match msg {
                Message::Batch(mut entries) => {
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    // Consecutive batches already buffered are made durable together.
                    while entries.len() < COALESCE_MAX {
                        match r.dec.next_message()? {
                            None => break,
                            Some(Message::Batch(more))
                                if follows(&entries, &more)
                                    && entries.len() + more.len() <= COALESCE_MAX =>
                            {
                                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                                entries.extend(more);
                            }
                            Some(other) => {
                                carried = Some(other);
                                break;
                            }
                        }
                    }
                    self.store(entries).await?;
                }
                Message::Applied(a) => match lock(&self.pending).remove(&a.id) {
                    Some(tx) => {
                        let _ = tx.send(a);
                    }
                    None => {
                        debug!(vm = %self.vm, id = a.id, "applied for no pending apply; ignored")
                    }
                },
                Message::Goodbye { reason } => {
                    let reason: String = reason.chars().take(200).collect();
                    info!(vm = %self.vm, conn = self.id, reason, "dpa said goodbye");
                    return Ok(());
                }
                other => return Err(ConnError::Unexpected(kind(&other))),
            }
        }
    }

    async fn last_seq(&self) -> Result<u64, ConnError> {
        let _guard = self.append.clone().lock_owned().await;
        let sink = self.link.inner.sink.clone();
        let vm = self.vm.clone();
        tokio::task::spawn_blocking(move || sink.last_seq(&vm))
            .await
            .map_err(|e| ConnError::Log(e.to_string()))?
            .map_err(|e| ConnError::Log(error_chain(&e)))
    }

    /// Appends `entries` (after the VM's rate allows them) and acknowledges them.
    /// At the VM's quota, waits and tries again: the guest keeps them meanwhile.
    async fn store(&self, mut entries: Vec<Entry>) -> Result<(), ConnError> {
        if entries.is_empty() {
            let acked = self.counters.acked.load(Ordering::Relaxed);
            return self.send(&Message::Ack { upto: acked }).await;
        }
        self.counters
            .entries
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        let wait = lock(&self.rate)
            .entries
            .charge(entries.len() as u64, Instant::now());
        self.pause(wait).await;
        loop {
            // The guard moves into the blocking task: if this connection is aborted
            // mid-append, the next one still waits for the append to finish.
            let guard = self.append.clone().lock_owned().await;
            let sink = self.link.inner.sink.clone();
            let vm = self.vm.clone();
            let received = now_us();
            let (back, result) = tokio::task::spawn_blocking(move || {
                let _guard = guard;
                let r = sink.append(&vm, received, &entries);
                (entries, r)
            })
            .await
            .map_err(|e| ConnError::Log(e.to_string()))?;
            entries = back;
            match result {
                Ok(upto) => {
                    self.counters.acked.store(upto, Ordering::Relaxed);
                    return self.send(&Message::Ack { upto }).await;
                }
                Err(ProvenanceError::Gap { last, got, .. }) => {
                    return Err(ConnError::Gap { last, got })
                }
                Err(e @ ProvenanceError::Quota { .. }) => {
                    self.counters.quota_pauses.fetch_add(1, Ordering::Relaxed);
                    let pause = self.link.inner.limits.quota_pause;
                    self.warn(&format!(
                        "{e}; reading this VM pauses for {}s (its DPA keeps the entries)",
                        pause.as_secs()
                    ));
                    tokio::time::sleep(pause.max(Duration::from_millis(100))).await;
                }
                // With its cause: "cannot write <segment>: No space left on device".
                Err(e) => return Err(ConnError::Log(error_chain(&e))),
            }
        }
    }
}

/// Whether `more` starts right after `entries` ends.
fn follows(entries: &[Entry], more: &[Entry]) -> bool {
    match (entries.last(), more.first()) {
        (Some(a), Some(b)) => a.seq.checked_add(1) == Some(b.seq),
        _ => false,
    }
}

fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Hello(_) => "hello",
        Message::Welcome(_) => "welcome",
        Message::Batch(_) => "batch",
        Message::Ack { .. } => "ack",
        Message::Apply(_) => "apply",
        Message::Applied(_) => "applied",
        Message::Goodbye { .. } => "goodbye",
    }
}
