//! Shared pieces of the agent's tests: a small host speaking the DPA protocol over a
//! unix socket (a test double of weftd's listener: it keeps each sequence number once,
//! refuses gaps and acknowledges cumulatively) and a helper that runs the real
//! `weft-dpa` binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wait_until::{Step, Wait};
use weft_dpa::proto::{self, Applied, Apply, Entry, Message, Welcome};

/// What the host received.
#[derive(Debug, Default)]
pub struct HostState {
    /// Entries by sequence number, each kept once.
    pub entries: BTreeMap<u64, Entry>,
    /// When each entry first arrived.
    pub arrived: BTreeMap<u64, Instant>,
    /// Entries received again (resends).
    pub duplicates: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Protocol errors seen (a gap, garbage): must stay empty.
    pub errors: Vec<String>,
    /// Close the next connection after this many batches, without acknowledging them.
    pub drop_after_batches: Option<usize>,
    /// Go silent on the next connection after this many batches: read and drop what
    /// comes, answer nothing, never close (a host that vanished without a word).
    pub stall_after_batches: Option<usize>,
    /// Apply requests to send.
    pub outbox: Vec<Apply>,
    /// Answers to apply requests.
    pub applied: Vec<Applied>,
    /// Whether to acknowledge at all.
    pub no_acks: bool,
}

impl HostState {
    /// The highest sequence number held (all below it are held too).
    pub fn last(&self) -> u64 {
        self.entries.keys().next_back().copied().unwrap_or(0)
    }
}

/// The test host.
pub struct Host {
    /// Its socket.
    pub path: PathBuf,
    /// What it received.
    pub state: Arc<Mutex<HostState>>,
}

impl Host {
    /// Listens on `path`.
    pub fn start(path: &Path) -> Host {
        let listener = UnixListener::bind(path).expect("bind");
        let state: Arc<Mutex<HostState>> = Arc::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, st));
            }
        });
        Host {
            path: path.to_path_buf(),
            state,
        }
    }

    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut HostState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Waits until `check` holds on the state; panics after `timeout`, or at once when
    /// the host sees a protocol error.
    pub fn wait(&self, what: &str, timeout: Duration, check: impl Fn(&HostState) -> bool) {
        let waited = Wait::new(what, timeout)
            .interval(Duration::from_millis(5))
            .until(|| {
                let s = self.state.lock().unwrap();
                if !s.errors.is_empty() {
                    return Step::Fail(format!("host saw protocol errors: {:?}", s.errors));
                }
                if check(&s) {
                    return Step::Ready(());
                }
                Step::Pending(format!("host holds {} entries", s.last()))
            });
        if let Err(e) = waited {
            panic!("{e}");
        }
    }
}

fn serve(mut conn: UnixStream, st: Arc<Mutex<HostState>>) {
    conn.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut dec = proto::Decoder::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut batches = 0usize;
    let (drop_after, stall_after) = {
        let mut s = st.lock().unwrap();
        s.connections += 1;
        (s.drop_after_batches.take(), s.stall_after_batches.take())
    };
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => dec.feed(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
        let outbox: Vec<Apply> = std::mem::take(&mut st.lock().unwrap().outbox);
        for a in outbox {
            if conn.write_all(&proto::encode(&Message::Apply(a))).is_err() {
                return;
            }
        }
        loop {
            let msg = match dec.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    st.lock().unwrap().errors.push(e.to_string());
                    return;
                }
            };
            let reply = {
                let mut s = st.lock().unwrap();
                match msg {
                    Message::Hello(h) => {
                        assert_eq!(h.version, proto::PROTOCOL_VERSION);
                        Some(Message::Welcome(Welcome {
                            version: 1,
                            acked: s.last(),
                        }))
                    }
                    Message::Batch(entries) => {
                        batches += 1;
                        if drop_after.is_some_and(|n| batches > n) {
                            return;
                        }
                        if stall_after.is_some_and(|n| batches > n) {
                            drop(s);
                            // Until the agent gives up on this connection.
                            loop {
                                match conn.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(_) => {}
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        }
                        let now = Instant::now();
                        for e in entries {
                            let last = s.last();
                            if e.seq <= last {
                                s.duplicates += 1;
                            } else if e.seq == last + 1 {
                                s.arrived.insert(e.seq, now);
                                s.entries.insert(e.seq, e);
                            } else {
                                s.errors.push(format!("gap: got {} after {last}", e.seq));
                                return;
                            }
                        }
                        (!s.no_acks).then(|| Message::Ack { upto: s.last() })
                    }
                    Message::Applied(a) => {
                        s.applied.push(a);
                        None
                    }
                    other => {
                        s.errors.push(format!("unexpected {other:?}"));
                        return;
                    }
                }
            };
            if let Some(r) = reply {
                if conn.write_all(&proto::encode(&r)).is_err() {
                    return;
                }
            }
        }
    }
}

/// A running `weft-dpa`.
pub struct Agent {
    child: Child,
    /// Its config file.
    pub config: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    spool: PathBuf,
    connect: String,
}

impl Agent {
    /// Starts the binary with `config`, the spool in `spool`, talking to `host`.
    pub fn start(config: &Path, spool: &Path, host: &Path, log: &Path) -> Agent {
        let mut a = Agent {
            child: Command::new("true").spawn().unwrap(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            spool: spool.to_path_buf(),
            connect: format!("unix:{}", host.display()),
        };
        a.child.wait().unwrap();
        a.child = a.spawn();
        a
    }

    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_weft-dpa"))
            .arg("--config")
            .arg(&self.config)
            .arg("--spool-dir")
            .arg(&self.spool)
            .arg("--connect")
            .arg(&self.connect)
            .env("WEFT_DPA_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weft-dpa")
    }

    /// SIGKILL, then start again.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.child = self.spawn();
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- weft-dpa log ----\n{}", self.log_text());
        }
    }
}

/// A test's directory with a config file pointing at its own files.
pub struct Setup {
    /// The agent (dropped first: it prints its log while the directory exists).
    pub agent: Agent,
    /// The host.
    pub host: Host,
    /// Keeps the directory.
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// `config` is written to `<dir>/dpa.toml` with `@DIR@` replaced by the directory;
    /// `before` runs before the agent starts.
    pub fn new(config: &str, before: impl FnOnce(&Path)) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let host = Host::start(&d.join("host.sock"));
        write_config(d, config);
        before(d);
        let agent = Agent::start(
            &d.join("dpa.toml"),
            &d.join("spool"),
            &d.join("host.sock"),
            &d.join("dpa.log"),
        );
        Setup { agent, host, dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `<dir>/name` as a string.
    pub fn file(&self, name: &str) -> String {
        self.path().join(name).to_string_lossy().into_owned()
    }
}

/// Writes `<dir>/dpa.toml` atomically.
pub fn write_config(dir: &Path, config: &str) {
    let text = config.replace("@DIR@", &dir.to_string_lossy());
    let tmp = dir.join(".dpa.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("dpa.toml")).unwrap();
}

/// Entries of the host for `source`, in order.
pub fn of_source(s: &HostState, source: &str) -> Vec<Entry> {
    s.entries
        .values()
        .filter(|e| e.source == source)
        .cloned()
        .collect()
}
