//! The connection to weftd: hello/welcome, resend from the host's `acked + 1`, batches,
//! acks that trim the spool, apply requests; reconnects with backoff forever.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::spool::Spool;
use super::wake::Waker;
use super::{apply, Config, Error};
use crate::proto::{self, caps, Hello, Message, DPA_PORT, PROTOCOL_VERSION};

/// The host's CID for AF_VSOCK.
pub const HOST_CID: u32 = 2;
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where weftd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// AF_VSOCK (the guest's normal case).
    Vsock {
        /// The peer's CID (2: the host).
        cid: u32,
        /// The port.
        port: u32,
    },
    /// A unix socket (tests on the host).
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `vsock`, `vsock:CID:PORT` or `unix:/path`.
    pub fn parse(s: &str) -> Result<Endpoint, Error> {
        let bad = || {
            Error::Config(format!(
                "connect {s:?} is not `vsock`, `vsock:CID:PORT` or `unix:/absolute/path`"
            ))
        };
        if s == "vsock" {
            return Ok(Endpoint::Vsock {
                cid: HOST_CID,
                port: DPA_PORT,
            });
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            return Ok(Endpoint::Vsock {
                cid: cid.parse().map_err(|_| bad())?,
                port: port.parse().map_err(|_| bad())?,
            });
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.starts_with('/') {
                return Ok(Endpoint::Unix(PathBuf::from(path)));
            }
        }
        Err(bad())
    }

    /// Connects.
    pub fn connect(&self) -> std::io::Result<UnixStream> {
        match self {
            Endpoint::Unix(p) => UnixStream::connect(p),
            Endpoint::Vsock { cid, port } => {
                use nix::sys::socket::{
                    connect, socket, AddressFamily, SockFlag, SockType, VsockAddr,
                };
                use std::os::fd::AsRawFd;
                let fd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                connect(fd.as_raw_fd(), &VsockAddr::new(*cid, *port))?;
                // A connected stream socket of any family: `UnixStream` only uses
                // read/write/shutdown/setsockopt(SOL_SOCKET), which AF_VSOCK supports.
                Ok(UnixStream::from(fd))
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What the reader thread hands over.
enum Incoming {
    Msg(Message),
    Closed(String),
}

type Queue = Arc<Mutex<VecDeque<Incoming>>>;

/// Runs the client forever.
pub(crate) fn run(
    endpoint: Endpoint,
    spool: Arc<Spool>,
    config: Arc<RwLock<Config>>,
    waker: Waker,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let res = session(&endpoint, &spool, &config, &waker);
        if started.elapsed() > Duration::from_secs(10) {
            // A session that worked for a while starts the backoff (and the count of
            // failures in a row, whose first is a warning) over.
            backoff = BACKOFF_MIN;
            failures = 0;
        }
        if let Err(e) = res {
            let chain = error_chain(&e);
            if failures == 0 {
                tracing::warn!(endpoint = %endpoint, "connection to the host: {chain}; retrying");
            } else {
                tracing::debug!(endpoint = %endpoint, failures, "connection to the host: {chain}");
            }
            failures += 1;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Shuts the socket down when the session ends, which ends the reader thread.
struct Shutdown(UnixStream);

impl Drop for Shutdown {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

fn send(stream: &mut UnixStream, msg: &Message) -> Result<(), Error> {
    stream
        .write_all(&proto::encode(msg))
        .map_err(|e| Error::io("cannot send to the host", e))
}

/// Sends `msg` by `deadline`: a stream nobody reads any more (its transport's buffer
/// full) fails then, whatever bits of it the transport still takes (each partial write
/// would start a socket timeout over).
fn send_by(stream: &mut UnixStream, msg: &Message, deadline: Instant) -> std::io::Result<()> {
    let bytes = proto::encode(msg);
    let mut off = 0;
    while off < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
        match stream.write(&bytes[off..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Other messages keep the session's own timeout.
    stream.set_write_timeout(Some(WRITE_TIMEOUT))
}

fn reader(mut stream: UnixStream, queue: Queue, spool: Arc<Spool>) {
    let mut dec = proto::Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let push = |i: Incoming| {
        queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(i);
        spool.notify.poke();
    };
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return push(Incoming::Closed("the host closed the connection".into())),
            Ok(n) => dec.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return push(Incoming::Closed(format!("cannot read from the host: {e}"))),
        }
        loop {
            match dec.next_message() {
                Ok(Some(m)) => push(Incoming::Msg(m)),
                Ok(None) => break,
                Err(e) => return push(Incoming::Closed(format!("garbage from the host: {e}"))),
            }
        }
    }
}

fn session(
    endpoint: &Endpoint,
    spool: &Arc<Spool>,
    config: &Arc<RwLock<Config>>,
    waker: &Waker,
) -> Result<(), Error> {
    let mut stream = endpoint
        .connect()
        .map_err(|e| Error::io(format!("cannot connect to {endpoint}"), e))?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(|e| Error::io("cannot set a write timeout", e))?;
    let _guard = Shutdown(
        stream
            .try_clone()
            .map_err(|e| Error::io("cannot clone the socket", e))?,
    );
    let queue: Queue = Arc::default();
    {
        let r = stream
            .try_clone()
            .map_err(|e| Error::io("cannot clone the socket", e))?;
        let (q, s) = (queue.clone(), spool.clone());
        std::thread::Builder::new()
            .name("dpa-reader".into())
            .spawn(move || reader(r, q, s))
            .map_err(|e| Error::io("cannot start the reader thread", e))?;
    }
    send(
        &mut stream,
        &Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            capabilities: [caps::SQLITE, caps::JSON, caps::KV, caps::APPLY]
                .map(String::from)
                .to_vec(),
            agent: format!("weft-dpa {}", env!("CARGO_PKG_VERSION")),
        }),
    )?;
    let next = |deadline: Option<Instant>| -> Option<Incoming> {
        loop {
            let seen = spool.notify.current();
            if let Some(i) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() {
                return Some(i);
            }
            let wait = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => return None,
            };
            spool.notify.wait(seen, wait);
        }
    };
    let welcome = match next(Some(Instant::now() + WELCOME_TIMEOUT)) {
        Some(Incoming::Msg(Message::Welcome(w))) => w,
        Some(Incoming::Msg(Message::Goodbye { reason })) => {
            return Err(Error::Config(format!(
                "the host refused the connection: {reason}"
            )))
        }
        Some(Incoming::Msg(other)) => {
            return Err(Error::Proto(proto::Error::Invalid(format!(
                "expected welcome, got {other:?}"
            ))))
        }
        Some(Incoming::Closed(why)) => {
            return Err(Error::io(why, std::io::ErrorKind::ConnectionAborted.into()))
        }
        None => {
            return Err(Error::io(
                "no welcome from the host",
                std::io::ErrorKind::TimedOut.into(),
            ))
        }
    };
    if welcome.version == 0 || welcome.version > PROTOCOL_VERSION {
        let reason = format!("unsupported protocol version {}", welcome.version);
        let _ = send(
            &mut stream,
            &Message::Goodbye {
                reason: reason.clone(),
            },
        );
        return Err(Error::Proto(proto::Error::Version(welcome.version)));
    }
    let next_seq = spool.next_seq();
    if welcome.acked >= next_seq {
        tracing::warn!(
            host_acked = welcome.acked,
            next_seq,
            "the host holds more entries than this spool ever gave out (the spool was lost or replaced); \
             numbering continues after the host's"
        );
        spool.jump_to(welcome.acked + 1)?;
    }
    let mut acked = welcome.acked;
    spool.ack(acked)?;
    waker.wake();
    tracing::info!(endpoint = %endpoint, acked, resend_from = acked + 1, next_seq = spool.next_seq(), "connected to the host");
    let mut sent = acked;
    // When the oldest entry in flight went out, or the last ack came: a host that
    // vanished without closing the stream (a transport that lost the close) is taken
    // for dead after `ack_timeout_ms`, and the connection made again.
    let mut waiting_since = Instant::now();
    // Entries captured while no host was connected waited for the connection: only
    // those captured from now on measure the commit-to-host latency.
    let mut latency = Latency::new(spool.next_seq());
    loop {
        let seen = spool.notify.current();
        while let Some(inc) = next(None) {
            match inc {
                Incoming::Msg(Message::Ack { upto }) => {
                    let upto = upto.min(sent);
                    if upto > acked {
                        acked = upto;
                        waiting_since = Instant::now();
                        spool.ack(acked)?;
                        waker.wake();
                        latency.acked(acked);
                    }
                }
                Incoming::Msg(Message::Apply(a)) => {
                    let cfg = config.read().unwrap_or_else(|p| p.into_inner()).clone();
                    let done = apply::apply(&cfg, &a);
                    if let Some(err) = &done.error {
                        tracing::warn!(
                            id = a.id,
                            applied = done.applied,
                            "apply request failed: {err}"
                        );
                    } else {
                        tracing::info!(id = a.id, applied = done.applied, "apply request done");
                    }
                    send(&mut stream, &Message::Applied(done))?;
                }
                Incoming::Msg(Message::Goodbye { reason }) => {
                    return Err(Error::io(
                        format!("the host said goodbye: {reason}"),
                        std::io::ErrorKind::ConnectionAborted.into(),
                    ))
                }
                Incoming::Msg(other) => {
                    let reason = format!("unexpected message {}", kind(&other));
                    let _ = send(
                        &mut stream,
                        &Message::Goodbye {
                            reason: reason.clone(),
                        },
                    );
                    return Err(Error::Proto(proto::Error::Invalid(reason)));
                }
                Incoming::Closed(why) => {
                    return Err(Error::io(why, std::io::ErrorKind::ConnectionAborted.into()))
                }
            }
        }
        let (batch, window, ack_timeout) = {
            let c = config.read().unwrap_or_else(|p| p.into_inner());
            (
                c.batch_entries,
                c.max_in_flight,
                Duration::from_millis(c.ack_timeout_ms),
            )
        };
        let no_ack = |waiting_since: Instant, acked: u64, sent: u64| {
            Error::io(
                format!(
                    "no ack from the host for {}s with entries {}..={} in flight",
                    waiting_since.elapsed().as_secs(),
                    acked + 1,
                    sent
                ),
                std::io::ErrorKind::TimedOut.into(),
            )
        };
        if sent > acked && waiting_since.elapsed() > ack_timeout {
            return Err(no_ack(waiting_since, acked, sent));
        }
        if sent == acked {
            waiting_since = Instant::now();
        }
        while sent - acked < window {
            let room = (window - (sent - acked)).min(batch as u64) as usize;
            let entries = spool.read_from(sent + 1, room)?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                break;
            };
            if entries[0].seq != sent + 1 {
                return Err(Error::Spool(format!(
                    "entry {} is not in the spool (next held: {})",
                    sent + 1,
                    entries[0].seq
                )));
            }
            latency.sent(&entries);
            // A write into a stream nobody reads any more blocks once the transport's
            // buffer is full: it may block only until the ack deadline.
            let mut deadline = Instant::now() + WRITE_TIMEOUT;
            if sent > acked {
                deadline = deadline.min(waiting_since + ack_timeout);
            }
            match send_by(&mut stream, &Message::Batch(entries), deadline) {
                Ok(()) => {}
                Err(_) if sent > acked && waiting_since.elapsed() >= ack_timeout => {
                    return Err(no_ack(waiting_since, acked, sent));
                }
                Err(e) => return Err(Error::io("cannot send to the host", e)),
            }
            sent = last;
        }
        spool.notify.wait(seen, Duration::from_secs(1));
    }
}

/// Commit-to-host latency: for each SQLite entry, from its capture in the
/// application's transaction (the trigger's clock, `guest_time_us`) to the host's ack
/// saying it is durable in the provenance log, on the guest's clock. Logged as
/// percentiles every [`Latency::EVERY`] entries.
struct Latency {
    from_seq: u64,
    pending: std::collections::VecDeque<(u64, i64)>,
    samples: Vec<u64>,
}

impl Latency {
    const EVERY: usize = 2000;

    fn new(from_seq: u64) -> Self {
        Latency {
            from_seq,
            pending: std::collections::VecDeque::new(),
            samples: Vec::new(),
        }
    }

    fn sent(&mut self, entries: &[proto::Entry]) {
        for e in entries {
            if e.seq >= self.from_seq
                && e.data_type == proto::DataType::Sqlite
                && e.op != proto::Operation::Schema
            {
                self.pending.push_back((e.seq, e.guest_time_us));
            }
        }
    }

    fn acked(&mut self, upto: u64) {
        let now = now_us();
        while self.pending.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, t)) = self.pending.pop_front() {
                self.samples.push(u64::try_from(now - t).unwrap_or(0));
            }
        }
        if self.samples.len() >= Self::EVERY {
            self.samples.sort_unstable();
            let pct = |p: usize| self.samples[(self.samples.len() - 1) * p / 100] as f64 / 1e3;
            tracing::info!(
                "commit-to-host latency over {} SQLite changes: p50={:.1}ms p99={:.1}ms max={:.1}ms",
                self.samples.len(),
                pct(50),
                pct(99),
                pct(100)
            );
            self.samples.clear();
        }
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Welcome(_) => "welcome",
        Message::Batch(_) => "batch",
        Message::Ack { .. } => "ack",
        Message::Apply(_) => "apply",
        Message::Applied(_) => "applied",
        Message::Goodbye { .. } => "goodbye",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("vsock").unwrap(),
            Endpoint::Vsock {
                cid: 2,
                port: DPA_PORT
            }
        );
        assert_eq!(
            Endpoint::parse("vsock:3:99").unwrap(),
            Endpoint::Vsock { cid: 3, port: 99 }
        );
        assert_eq!(
            Endpoint::parse("unix:/run/x.sock").unwrap(),
            Endpoint::Unix("/run/x.sock".into())
        );
        for bad in ["tcp:1", "unix:rel", "vsock:2", "vsock:a:b"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
