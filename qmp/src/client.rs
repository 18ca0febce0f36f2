//! The async QMP client.
//!
//! # Why not `qapi::futures::QmpStreamTokio`
//!
//! qapi 0.15 ships an async stream (`QapiService` + `QapiEvents`), but it does not fit an
//! untrusted peer and a multi-task daemon:
//! - it only puts ids on commands when the server offers `oob`; otherwise it holds the write
//!   lock until the reply arrives, so concurrent callers are serialized;
//! - its line codec has no length limit;
//! - events are decoded into qapi's closed `Event` enum, so an event added by a newer QEMU
//!   fails to decode; error replies use a closed `ErrorClass` enum likewise;
//! - events go to a single consumer stream, not a broadcast.
//!
//! So this module runs a small reader task and writer task on tokio. It still uses qapi for
//! what qapi is good at: the typed commands of `qapi::qmp` ([`Qmp::execute`] serializes
//! `qapi::Execute` and decodes `Command::Ok`) and the typed events ([`Event::typed`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::message::{parse_message, Event, Greeting, Message, MAX_MESSAGE_LEN};
use crate::{BlockJobOutcome, Error};

/// How long [`Qmp::connect`] waits for the greeting and capability negotiation.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many events a slow subscriber may fall behind before it starts losing events.
const EVENT_CAPACITY: usize = 4096;

/// A QMP connection.
///
/// Cheap to clone (an `Arc` inside); all clones share one socket. Any number of tasks may
/// run commands at once: every command carries a unique id and replies are matched by id,
/// in whatever order they arrive. Events are broadcast to every subscriber.
///
/// The connection ends when the peer closes it, when it sends something that breaks the
/// framing (a line over [`MAX_MESSAGE_LEN`]), or when the last clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.inner.greeting.version)
            .field("closed", &self.is_closed())
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    write_tx: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    greeting: Greeting,
    reader: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer task ends by itself once `write_tx` is gone; the reader would wait for
        // the peer, so stop it.
        self.reader.abort();
        self.shared.close("client dropped".to_owned());
    }
}

type ReplySender = oneshot::Sender<Result<Value, Error>>;

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    closed: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, ReplySender>,
    closed: bool,
    reason: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across code that can panic in a way that leaves the
        // state inconsistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed and fails every pending command with `Error::Closed`.
    fn close(&self, reason: String) {
        let pending = {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            st.reason = Some(reason);
            std::mem::take(&mut st.pending)
        };
        for (_, tx) in pending {
            let _ = tx.send(Err(Error::Closed));
        }
        self.closed.send_replace(true);
    }

    fn dispatch(&self, line: &[u8]) {
        match parse_message(line) {
            Ok(Message::Reply(reply)) => {
                let id = reply.id.as_ref().and_then(Value::as_u64);
                let tx = id.and_then(|id| self.lock().pending.remove(&id));
                match tx {
                    Some(tx) => {
                        // The caller may have given up (dropped its future); that is fine.
                        let _ = tx.send(reply.result.map_err(Error::from));
                    }
                    None => {
                        warn!(id = ?reply.id, "dropping qmp reply that matches no pending command")
                    }
                }
            }
            Ok(Message::Event(event)) => {
                debug!(name = %event.name, "qmp event");
                // No subscribers is not an error.
                let _ = self.events.send(event);
            }
            Ok(Message::Greeting(_)) => warn!("dropping unexpected second qmp greeting"),
            Err(e) => warn!(error = %e, "dropping malformed qmp message"),
        }
    }
}

/// Reads newline-separated messages with a length bound.
pub(crate) struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(r: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::with_capacity(64 * 1024, r),
            buf: Vec::new(),
            max,
        }
    }

    /// The next line without its terminator; `None` at end of stream (a partial last line
    /// is dropped). A line longer than `max` is a protocol error: the framing cannot be
    /// trusted afterwards.
    pub(crate) async fn next_line(&mut self) -> Result<Option<&[u8]>, Error> {
        if self.buf.capacity() > 1024 * 1024 {
            // Do not keep a huge buffer around after one big message.
            self.buf = Vec::new();
        }
        self.buf.clear();
        loop {
            let avail = self.inner.fill_buf().await?;
            if avail.is_empty() {
                if !self.buf.is_empty() {
                    debug!(
                        len = self.buf.len(),
                        "dropping partial qmp line at end of stream"
                    );
                }
                return Ok(None);
            }
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            if self.buf.len() + take > self.max {
                return Err(Error::protocol(format!(
                    "message exceeds the limit of {} bytes",
                    self.max
                )));
            }
            self.buf.extend_from_slice(&avail[..take]);
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                if self.buf.last() == Some(&b'\r') {
                    self.buf.pop();
                }
                return Ok(Some(&self.buf));
            }
        }
    }
}

/// Removes a pending command's entry if its caller stops waiting.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// An event subscription that also notices the connection closing, without losing events
/// that arrived before the close.
struct Subscription {
    rx: broadcast::Receiver<Event>,
    closed: watch::Receiver<bool>,
}

enum Next {
    Event(Event),
    /// The subscriber fell behind and this many events were lost.
    Lagged(u64),
}

impl Subscription {
    async fn next(&mut self) -> Result<Next, Error> {
        let Subscription { rx, closed } = self;
        tokio::select! {
            biased;
            r = rx.recv() => match r {
                Ok(e) => Ok(Next::Event(e)),
                Err(broadcast::error::RecvError::Lagged(n)) => Ok(Next::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => Err(Error::Closed),
            },
            _ = closed.wait_for(|c| *c) => match try_next(rx) {
                Some(next) => Ok(next),
                None => Err(Error::Closed),
            },
        }
    }

    /// An event already received, if any.
    fn try_next(&mut self) -> Option<Next> {
        try_next(&mut self.rx)
    }
}

fn try_next(rx: &mut broadcast::Receiver<Event>) -> Option<Next> {
    match rx.try_recv() {
        Ok(e) => Some(Next::Event(e)),
        Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Next::Lagged(n)),
        Err(_) => None,
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates
    /// capabilities, within [`DEFAULT_CONNECT_TIMEOUT`].
    pub async fn connect(path: &Path) -> Result<Qmp, Error> {
        Self::connect_timeout(path, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Like [`Qmp::connect`] with an explicit deadline for connecting, the greeting and
    /// `qmp_capabilities`. A peer that sends something other than a QMP greeting gives
    /// [`Error::NotQmp`]; one that sends nothing gives [`Error::Timeout`].
    pub async fn connect_timeout(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        match tokio::time::timeout(timeout, Self::connect_inner(path)).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(
                format!("qmp greeting on {}", path.display()),
                timeout,
            )),
        }
    }

    async fn connect_inner(path: &Path) -> Result<Qmp, Error> {
        let stream = UnixStream::connect(path).await?;
        let (rd, wr) = stream.into_split();
        Self::handshake(rd, wr).await
    }

    async fn handshake<R, W>(rd: R, wr: W) -> Result<Qmp, Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader = LineReader::new(rd, MAX_MESSAGE_LEN);
        let greeting = loop {
            let line = match reader.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    return Err(Error::NotQmp {
                        detail: "connection closed before a greeting".into(),
                    })
                }
                Err(Error::Protocol(detail)) => return Err(Error::NotQmp { detail }),
                Err(e) => return Err(e),
            };
            if line.is_empty() {
                continue;
            }
            match parse_message(line) {
                Ok(Message::Greeting(g)) => break g,
                Ok(_) => {
                    return Err(Error::NotQmp {
                        detail: "first message is not a greeting".into(),
                    })
                }
                Err(e) => {
                    let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
                    return Err(Error::NotQmp {
                        detail: format!("{e} (received {shown:?})"),
                    });
                }
            }
        };
        debug!(version = ?greeting.version, "qmp greeting");

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events,
            closed: watch::channel(false).0,
        });
        let (write_tx, write_rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_loop(wr, write_rx, shared.clone()));
        let reader = tokio::spawn(reader_loop(reader, shared.clone())).abort_handle();
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                write_tx,
                next_id: AtomicU64::new(1),
                greeting,
                reader,
            }),
        };
        qmp.execute(qapi::qmp::qmp_capabilities { enable: None })
            .await?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting, as (major, minor, micro).
    pub fn version(&self) -> (u32, u32, u32) {
        self.inner.greeting.version
    }

    /// The whole greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed
    }

    /// Why the connection ended (end of stream, an oversized message, a write error), or
    /// `None` while it is open.
    pub fn close_reason(&self) -> Option<String> {
        self.inner.shared.lock().reason.clone()
    }

    /// Resolves when the connection has ended. From then on every command fails with
    /// [`Error::Closed`].
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|c| *c).await;
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs a typed command from `qapi::qmp` and decodes its reply.
    ///
    /// A reply that does not decode into `C::Ok` (a QEMU whose schema differs from the one
    /// `qapi-qmp` was generated from) is [`Error::Protocol`]; use [`Qmp::execute_raw`] then.
    pub async fn execute<C: qapi::qmp::QmpCommand>(&self, cmd: C) -> Result<C::Ok, Error> {
        let args = serde_json::to_value(&cmd)
            .map_err(|e| Error::protocol(format!("cannot encode command {}: {e}", C::NAME)))?;
        // A command without arguments goes out without an `arguments` member: QEMU
        // parses an empty `{}` at a measurable cost per call (docs/benchmarks.md).
        let args = match args {
            Value::Null => None,
            Value::Object(m) if m.is_empty() => None,
            other => Some(other),
        };
        let value = self.execute_raw(C::NAME, args).await?;
        serde_json::from_value(value)
            .map_err(|e| Error::protocol(format!("cannot decode reply to {}: {e}", C::NAME)))
    }

    /// Runs a command by name with raw JSON arguments (an object, or `None`) and returns
    /// the raw `return` value.
    pub async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value, Error> {
        let id = self.next_id();
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(name.to_owned()));
        if let Some(args) = args {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        let line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| Error::protocol(format!("cannot encode command {name}: {e}")))?;
        self.round_trip(id, line).await
    }

    async fn round_trip(&self, id: u64, mut line: Vec<u8>) -> Result<Value, Error> {
        // serde_json escapes control characters in strings, so `line` holds no newline.
        line.push(b'\n');
        let shared = &*self.inner.shared;
        let rx = {
            let mut st = shared.lock();
            if st.closed {
                return Err(Error::Closed);
            }
            let (tx, rx) = oneshot::channel();
            st.pending.insert(id, tx);
            rx
        };
        let _guard = PendingGuard { shared, id };
        if self.inner.write_tx.send(line).is_err() {
            return Err(Error::Closed);
        }
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// A new subscription to all events received from now on.
    ///
    /// A subscriber that falls more than a few thousand events behind gets
    /// `RecvError::Lagged` and loses the oldest ones.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.events.subscribe()
    }

    fn subscription(&self) -> Subscription {
        Subscription {
            rx: self.events(),
            closed: self.inner.shared.closed.subscribe(),
        }
    }

    /// Waits up to `deadline` for an event for which `pred` is true.
    ///
    /// The subscription is made when this function is *called*, not when the future is
    /// first polled, so the race-free pattern is:
    ///
    /// ```no_run
    /// # async fn f(qmp: weft_qmp::Qmp) -> Result<(), weft_qmp::Error> {
    /// # use std::time::Duration;
    /// let stopped = qmp.wait_event(Duration::from_secs(5), |e| e.name == "STOP");
    /// qmp.execute(qapi::qmp::stop {}).await?;
    /// stopped.await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Fails with [`Error::Closed`] if the connection ends first (events that arrived before
    /// the end are still looked at), and [`Error::Timeout`] after `deadline`.
    pub fn wait_event<P>(
        &self,
        deadline: Duration,
        pred: P,
    ) -> impl Future<Output = Result<Event, Error>> + Send + 'static
    where
        P: Fn(&Event) -> bool + Send + 'static,
    {
        let mut sub = self.subscription();
        async move {
            let wait = async move {
                loop {
                    match sub.next().await? {
                        Next::Event(e) if pred(&e) => return Ok(e),
                        Next::Event(_) => {}
                        Next::Lagged(n) => warn!(lost = n, "event waiter lagged; events lost"),
                    }
                }
            };
            tokio::time::timeout(deadline, wait)
                .await
                .unwrap_or_else(|_| Err(Error::timeout("a matching qmp event", deadline)))
        }
    }

    /// Waits up to `deadline` for the job `job_id` (any `query-jobs` job, e.g. from
    /// `blockdev-create`) to end, and returns QEMU's error text as [`Error::Job`] if it
    /// failed.
    ///
    /// QEMU only keeps a job's error while the job is `concluded` and not yet dismissed,
    /// so start jobs with `auto-dismiss: false` where the command has that option
    /// (`blockdev-create` jobs are always dismissed manually); this function then
    /// dismisses the job.
    /// A job that was auto-dismissed is reported as success (its error is gone). A job
    /// that does not exist gives [`Error::NoSuchJob`].
    ///
    /// Like [`Qmp::wait_event`], this subscribes to events when called, so it may be
    /// called before the command that creates the job.
    pub fn wait_job(
        &self,
        job_id: &str,
        deadline: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let sub = self.subscription();
        let qmp = self.clone();
        let id = job_id.to_owned();
        async move {
            match tokio::time::timeout(deadline, qmp.wait_job_inner(&id, sub)).await {
                Ok(r) => r,
                Err(_) => Err(Error::timeout(format!("job {id}"), deadline)),
            }
        }
    }

    async fn wait_job_inner(&self, id: &str, mut sub: Subscription) -> Result<(), Error> {
        let is_end = |e: &Event| {
            e.name == "JOB_STATUS_CHANGE"
                && e.data_str("id") == Some(id)
                && matches!(e.data_str("status"), Some("concluded" | "null"))
        };
        let mut seen_end = false;
        loop {
            // Every event QEMU sent before this reply is already in `sub`, because events
            // and replies share the socket and the reader handles them in order.
            match self.job_state(id).await? {
                Some((status, error)) if status == "concluded" => {
                    if let Err(e) = self
                        .execute_raw("job-dismiss", Some(serde_json::json!({ "id": id })))
                        .await
                    {
                        debug!(job = id, error = %e, "job-dismiss failed");
                    }
                    return match error {
                        Some(desc) => Err(Error::Job {
                            id: id.to_owned(),
                            desc,
                        }),
                        None => Ok(()),
                    };
                }
                Some(_) => loop {
                    match sub.next().await? {
                        Next::Event(e) if is_end(&e) => {
                            seen_end = true;
                            break;
                        }
                        Next::Event(_) => {}
                        Next::Lagged(_) => break,
                    }
                },
                None => {
                    while let Some(next) = sub.try_next() {
                        if let Next::Event(e) = next {
                            seen_end |= is_end(&e);
                        }
                    }
                    return if seen_end {
                        debug!(job = id, "job was dismissed before its error could be read");
                        Ok(())
                    } else {
                        Err(Error::NoSuchJob(id.to_owned()))
                    };
                }
            }
        }
    }

    /// `(status, error)` of a job from `query-jobs`, `None` if it is not listed.
    async fn job_state(&self, id: &str) -> Result<Option<(String, Option<String>)>, Error> {
        let jobs = self.execute_raw("query-jobs", None).await?;
        let jobs = jobs
            .as_array()
            .ok_or_else(|| Error::protocol("query-jobs did not return an array"))?;
        Ok(jobs
            .iter()
            .find(|j| j.get("id").and_then(Value::as_str) == Some(id))
            .map(|j| {
                let status = j
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let error = j.get("error").and_then(Value::as_str).map(str::to_owned);
                (status, error)
            }))
    }

    /// Waits up to `deadline` for the block job on `device` (its job id, for jobs started
    /// with `job-id`) to complete, fail, be cancelled or stop on an error.
    ///
    /// A `BLOCK_JOB_ERROR` with action `report` or `ignore` does not end the wait (a
    /// `BLOCK_JOB_COMPLETED` with the error follows, or the job goes on); with action
    /// `stop` it returns [`BlockJobOutcome::Stopped`]. Subscribes when called, like
    /// [`Qmp::wait_event`]. A job that neither runs nor has ended since the call gives
    /// [`Error::NoSuchJob`].
    pub fn wait_block_job(
        &self,
        device: &str,
        deadline: Duration,
    ) -> impl Future<Output = Result<BlockJobOutcome, Error>> + Send + 'static {
        let sub = self.subscription();
        let qmp = self.clone();
        let device = device.to_owned();
        async move {
            match tokio::time::timeout(deadline, qmp.wait_block_job_inner(&device, sub)).await {
                Ok(r) => r,
                Err(_) => Err(Error::timeout(format!("block job {device}"), deadline)),
            }
        }
    }

    async fn wait_block_job_inner(
        &self,
        device: &str,
        mut sub: Subscription,
    ) -> Result<BlockJobOutcome, Error> {
        let jobs = self.execute_raw("query-block-jobs", None).await?;
        let running = jobs
            .as_array()
            .ok_or_else(|| Error::protocol("query-block-jobs did not return an array"))?
            .iter()
            .any(|j| j.get("device").and_then(Value::as_str) == Some(device));
        if !running {
            // Any end event came before the reply and is buffered already.
            while let Some(next) = sub.try_next() {
                if let Next::Event(e) = next {
                    if let Some(outcome) = block_job_outcome(&e, device) {
                        return Ok(outcome);
                    }
                }
            }
            return Err(Error::NoSuchJob(device.to_owned()));
        }
        loop {
            match sub.next().await? {
                Next::Event(e) => {
                    if let Some(outcome) = block_job_outcome(&e, device) {
                        return Ok(outcome);
                    }
                }
                Next::Lagged(n) => {
                    return Err(Error::protocol(format!(
                        "lost {n} events while waiting for block job {device}"
                    )))
                }
            }
        }
    }
}

/// How the block job `device` ended, if event `e` says it did.
pub(crate) fn block_job_outcome(e: &Event, device: &str) -> Option<BlockJobOutcome> {
    if e.data_str("device") != Some(device) {
        return None;
    }
    let job_type = e.data_str("type").unwrap_or_default().to_owned();
    let num = |k: &str| e.data.get(k).and_then(Value::as_u64).unwrap_or(0);
    match e.name.as_str() {
        "BLOCK_JOB_COMPLETED" => Some(match e.data_str("error") {
            Some(error) => BlockJobOutcome::Failed {
                job_type,
                error: error.to_owned(),
            },
            None => BlockJobOutcome::Completed {
                job_type,
                offset: num("offset"),
                len: num("len"),
            },
        }),
        "BLOCK_JOB_CANCELLED" => Some(BlockJobOutcome::Cancelled {
            job_type,
            offset: num("offset"),
            len: num("len"),
        }),
        "BLOCK_JOB_ERROR" if e.data_str("action") == Some("stop") => {
            Some(BlockJobOutcome::Stopped {
                operation: e.data_str("operation").unwrap_or_default().to_owned(),
            })
        }
        _ => None,
    }
}

async fn reader_loop<R: AsyncRead + Unpin>(mut reader: LineReader<R>, shared: Arc<Shared>) {
    let reason = loop {
        match reader.next_line().await {
            Ok(Some(b"")) => {}
            Ok(Some(line)) => shared.dispatch(line),
            Ok(None) => break "peer closed the connection".to_owned(),
            Err(e) => {
                warn!(error = %e, "closing qmp connection");
                break e.to_string();
            }
        }
    };
    debug!(reason, "qmp connection closed");
    shared.close(reason);
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = rx.recv().await {
        if let Err(e) = wr.write_all(&line).await {
            warn!(error = %e, "qmp write failed");
            shared.close(format!("write failed: {e}"));
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn line_reader_splits_and_bounds() {
        let data: &[u8] = b"one\r\ntwo\n\nthree-too-long\npartial";
        let mut r = LineReader::new(data, 10);
        assert_eq!(r.next_line().await.expect("ok"), Some(&b"one"[..]));
        assert_eq!(r.next_line().await.expect("ok"), Some(&b"two"[..]));
        assert_eq!(r.next_line().await.expect("ok"), Some(&b""[..]));
        assert!(matches!(r.next_line().await, Err(Error::Protocol(_))));
    }

    #[tokio::test]
    async fn line_reader_drops_partial_last_line() {
        let data: &[u8] = b"a\npartial";
        let mut r = LineReader::new(data, 100);
        assert_eq!(r.next_line().await.expect("ok"), Some(&b"a"[..]));
        assert_eq!(r.next_line().await.expect("ok"), None);
    }

    #[tokio::test]
    async fn line_reader_accepts_exactly_max() {
        let data: &[u8] = b"0123456789\n01234567890\n";
        let mut r = LineReader::new(data, 10);
        assert_eq!(r.next_line().await.expect("ok"), Some(&b"0123456789"[..]));
        assert!(matches!(r.next_line().await, Err(Error::Protocol(_))));
    }
}
