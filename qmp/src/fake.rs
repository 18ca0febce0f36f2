//! A QEMU stand-in for tests (feature `test-util`): a QMP peer on a unix socket.
//!
//! Two levels:
//!
//! - [`FakeQemu`]: answers like a QEMU would, from rules per command. It greets,
//!   negotiates capabilities, answers each command with a canned return value
//!   ([`FakeQemu::reply`]), a canned error ([`FakeQemu::fail`]) or what a closure
//!   computes from the arguments ([`FakeQemu::on`], which may also send events before
//!   or after the reply, stay silent, or hang up), emits events at any time
//!   ([`FakeQemu::emit`]), and records every command it was sent
//!   ([`FakeQemu::executed`]). A command without a rule gets QEMU's `CommandNotFound`.
//! - [`script`]: a peer driven line by line by a test (malformed lines, replies out of
//!   order, oversized lines), for tests of the client itself.
//!
//! Test code: it panics where a test should fail (a socket that cannot be bound, a
//! client that sends something that is not JSON).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{Error, Qmp};

/// The greeting of Debian 12's QEMU 7.2, as [`FakeQemu`] and [`script`] send it.
pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u6"}, "capabilities": ["oob"]}}"#;

/// The timestamp every fake event carries.
const TIMESTAMP: (u64, u64) = (1_700_000_000, 42);

/// One command the fake was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// `execute`.
    pub name: String,
    /// `arguments`; `Value::Null` when the command had none.
    pub args: Value,
}

/// What a rule answers to one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `{"return": value}`.
    Return(Value),
    /// `{"error": {"class": class, "desc": desc}}`.
    Error {
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// The description.
        desc: String,
    },
    /// No answer at all (a QEMU whose monitor hangs).
    Silent,
    /// The connection is closed without an answer (a QEMU that dies mid-command).
    HangUp,
}

impl Answer {
    /// An empty `{"return": {}}`, what most QEMU commands answer.
    pub fn ok() -> Answer {
        Answer::Return(json!({}))
    }

    /// A `GenericError` with `desc`.
    pub fn generic_error(desc: &str) -> Answer {
        Answer::Error {
            class: "GenericError".into(),
            desc: desc.into(),
        }
    }
}

/// A command as a rule sees it: its arguments, and events to send around the answer.
#[derive(Debug)]
pub struct Call<'a> {
    /// The command's name.
    pub name: &'a str,
    /// Its arguments (`Value::Null` when none).
    pub args: &'a Value,
    before: Vec<(String, Value)>,
    after: Vec<(String, Value)>,
}

impl Call<'_> {
    /// The string argument `key`, or `""`.
    pub fn arg_str(&self, key: &str) -> &str {
        self.args.get(key).and_then(Value::as_str).unwrap_or("")
    }

    /// Sends event `name` with `data` before the answer.
    pub fn event_before(&mut self, name: &str, data: Value) {
        self.before.push((name.to_string(), data));
    }

    /// Sends event `name` with `data` after the answer (as QEMU does for a job it
    /// started: the reply first, then the job's events).
    pub fn event_after(&mut self, name: &str, data: Value) {
        self.after.push((name.to_string(), data));
    }
}

type Rule = Arc<dyn Fn(&mut Call<'_>) -> Answer + Send + Sync>;

#[derive(Default)]
struct State {
    rules: HashMap<String, Rule>,
    received: Vec<Command>,
    clients: Vec<mpsc::UnboundedSender<Out>>,
}

enum Out {
    Line(String),
    Close,
}

/// A scriptable QEMU on a unix socket in a temporary directory. See the module
/// documentation. Dropping it stops accepting and closes every connection.
pub struct FakeQemu {
    _dir: tempfile::TempDir,
    path: PathBuf,
    state: Arc<Mutex<State>>,
    acceptor: JoinHandle<()>,
}

impl std::fmt::Debug for FakeQemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeQemu")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.hang_up();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeQemu {
    /// Listens on a new socket; must be called inside a tokio runtime. Greets with
    /// [`GREETING`] and accepts `qmp_capabilities`; any number of clients may connect.
    pub fn start() -> FakeQemu {
        let dir = tempfile::tempdir().expect("temporary directory for the fake QEMU");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind the fake QEMU's socket");
        let state = Arc::new(Mutex::new(State::default()));
        let acceptor = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve_client(stream, state.clone()));
                }
            }
        });
        let fake = FakeQemu {
            _dir: dir,
            path,
            state,
            acceptor,
        };
        fake.reply("qmp_capabilities", json!({}));
        fake
    }

    /// The QMP socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A client connected and negotiated.
    pub async fn connect(&self) -> Qmp {
        Qmp::connect(&self.path)
            .await
            .expect("connect to the fake QEMU")
    }

    /// Answers `name` with what `rule` returns (replacing an earlier rule for it).
    pub fn on<F>(&self, name: &str, rule: F) -> &Self
    where
        F: Fn(&mut Call<'_>) -> Answer + Send + Sync + 'static,
    {
        lock(&self.state)
            .rules
            .insert(name.to_string(), Arc::new(rule));
        self
    }

    /// Answers `name` with `{"return": value}`.
    pub fn reply(&self, name: &str, value: Value) -> &Self {
        self.on(name, move |_| Answer::Return(value.clone()))
    }

    /// Answers `name` with an error of `class` and `desc`.
    pub fn fail(&self, name: &str, class: &str, desc: &str) -> &Self {
        let (class, desc) = (class.to_string(), desc.to_string());
        self.on(name, move |_| Answer::Error {
            class: class.clone(),
            desc: desc.clone(),
        })
    }

    /// Sends event `name` with `data` to every connected client.
    pub fn emit(&self, name: &str, data: Value) {
        let line = event_line(name, &data);
        lock(&self.state)
            .clients
            .retain(|c| c.send(Out::Line(line.clone())).is_ok());
    }

    /// Closes every connection (QEMU went away); new clients may still connect.
    pub fn hang_up(&self) {
        for c in lock(&self.state).clients.drain(..) {
            let _ = c.send(Out::Close);
        }
    }

    /// Every command received so far, negotiation included, in order.
    pub fn commands(&self) -> Vec<Command> {
        lock(&self.state).received.clone()
    }

    /// The names of the commands received so far, without `qmp_capabilities`.
    pub fn executed(&self) -> Vec<String> {
        lock(&self.state)
            .received
            .iter()
            .filter(|c| c.name != "qmp_capabilities")
            .map(|c| c.name.clone())
            .collect()
    }

    /// The arguments of every `name` command received so far, in order.
    pub fn args_of(&self, name: &str) -> Vec<Value> {
        lock(&self.state)
            .received
            .iter()
            .filter(|c| c.name == name)
            .map(|c| c.args.clone())
            .collect()
    }

    /// Forgets the commands received so far.
    pub fn clear(&self) {
        lock(&self.state).received.clear();
    }
}

fn event_line(name: &str, data: &Value) -> String {
    json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": TIMESTAMP.0, "microseconds": TIMESTAMP.1},
    })
    .to_string()
}

async fn serve_client(stream: tokio::net::UnixStream, state: Arc<Mutex<State>>) {
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&state).clients.push(tx.clone());
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Line(line) => {
                    if wr.write_all(line.as_bytes()).await.is_err()
                        || wr.write_all(b"\n").await.is_err()
                    {
                        return;
                    }
                }
                Out::Close => return,
            }
        }
    });
    let _ = tx.send(Out::Line(GREETING.to_string()));
    let mut lines = BufReader::new(rd).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let cmd: Value = serde_json::from_str(&line).expect("the client sends JSON");
        let name = cmd["execute"].as_str().unwrap_or_default().to_string();
        let args = cmd.get("arguments").cloned().unwrap_or(Value::Null);
        let rule = {
            let mut st = lock(&state);
            st.received.push(Command {
                name: name.clone(),
                args: args.clone(),
            });
            st.rules.get(&name).cloned()
        };
        let mut call = Call {
            name: &name,
            args: &args,
            before: Vec::new(),
            after: Vec::new(),
        };
        let answer = match rule {
            Some(rule) => rule(&mut call),
            None => Answer::Error {
                class: "CommandNotFound".into(),
                desc: format!("The command {name} has not been found"),
            },
        };
        for (event, data) in &call.before {
            let _ = tx.send(Out::Line(event_line(event, data)));
        }
        let id = cmd.get("id").cloned().unwrap_or(Value::Null);
        let reply = match answer {
            Answer::Return(v) => json!({"return": v, "id": id}),
            Answer::Error { class, desc } => {
                json!({"error": {"class": class, "desc": desc}, "id": id})
            }
            Answer::Silent => continue,
            Answer::HangUp => {
                let _ = tx.send(Out::Close);
                break;
            }
        };
        let _ = tx.send(Out::Line(reply.to_string()));
        for (event, data) in &call.after {
            let _ = tx.send(Out::Line(event_line(event, data)));
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Whether `e` is an error reply of class `class`.
pub fn is_qemu_error(e: &Error, class: &str) -> bool {
    matches!(e, Error::Qmp { class: c, .. } if c == class)
}

pub mod script {
    //! A QMP peer driven line by line by the test: [`serve`] runs a script against
    //! the first client that connects; [`serve_qmp`] greets and negotiates first.

    use std::future::Future;
    use std::path::PathBuf;
    use std::time::Duration;

    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::UnixListener;
    use tokio::task::JoinHandle;

    use super::{event_line, GREETING};

    /// How long [`Server::finish`] waits for the script to end.
    const FINISH: Duration = Duration::from_secs(5);

    /// The server side of one connection.
    #[derive(Debug)]
    pub struct Conn {
        lines: Lines<BufReader<OwnedReadHalf>>,
        wr: OwnedWriteHalf,
    }

    impl Conn {
        /// Sends `line` and a newline.
        pub async fn send(&mut self, line: &str) {
            self.wr
                .write_all(line.as_bytes())
                .await
                .expect("server write");
            self.wr.write_all(b"\n").await.expect("server write");
        }

        /// Sends raw bytes; fails if the client hung up meanwhile.
        pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.wr.write_all(bytes).await
        }

        /// Sends `v` as one line.
        pub async fn send_json(&mut self, v: Value) {
            self.send(&v.to_string()).await;
        }

        /// The next command from the client.
        pub async fn recv(&mut self) -> Value {
            let line = self
                .lines
                .next_line()
                .await
                .expect("server read")
                .expect("client closed early");
            serde_json::from_str(&line).expect("client sent json")
        }

        /// The next command, checking its name; returns its id and arguments.
        pub async fn expect(&mut self, name: &str) -> (Value, Value) {
            let cmd = self.recv().await;
            assert_eq!(cmd["execute"], name, "{cmd}");
            (
                cmd["id"].clone(),
                cmd.get("arguments").cloned().unwrap_or(Value::Null),
            )
        }

        /// Answers command `id` with `ret`.
        pub async fn reply(&mut self, id: &Value, ret: Value) {
            self.send_json(json!({"return": ret, "id": id})).await;
        }

        /// Answers command `id` with an error.
        pub async fn error(&mut self, id: &Value, class: &str, desc: &str) {
            self.send_json(json!({"error": {"class": class, "desc": desc}, "id": id}))
                .await;
        }

        /// Sends event `name`.
        pub async fn event(&mut self, name: &str, data: Value) {
            self.send(&event_line(name, &data)).await;
        }

        /// Greets and answers `qmp_capabilities`.
        pub async fn greet_and_negotiate(&mut self) {
            self.send(GREETING).await;
            let (id, _) = self.expect("qmp_capabilities").await;
            self.reply(&id, json!({})).await;
        }

        /// Waits until the client closes its side.
        pub async fn until_eof(&mut self) {
            while let Ok(Some(_)) = self.lines.next_line().await {}
        }
    }

    /// A scripted server: its socket and the task running the script.
    #[derive(Debug)]
    pub struct Server {
        _dir: tempfile::TempDir,
        /// The socket to connect to.
        pub path: PathBuf,
        task: JoinHandle<()>,
    }

    impl Server {
        /// Checks that the script ran to its end without a failed assertion.
        pub async fn finish(self) {
            tokio::time::timeout(FINISH, self.task)
                .await
                .expect("server script finished")
                .expect("server script succeeded");
        }
    }

    /// Runs `script` against the first client (nothing sent before it runs).
    pub fn serve<F, Fut>(script: F) -> Server
    where
        F: FnOnce(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (rd, wr) = stream.into_split();
            script(Conn {
                lines: BufReader::new(rd).lines(),
                wr,
            })
            .await;
        });
        Server {
            _dir: dir,
            path,
            task,
        }
    }

    /// Greets, negotiates and then runs `script`.
    pub fn serve_qmp<F, Fut>(script: F) -> Server
    where
        F: FnOnce(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        serve(|mut c| async move {
            c.greet_and_negotiate().await;
            script(c).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn rules_answer_record_and_emit() {
        let fake = FakeQemu::start();
        fake.reply("query-balloon", json!({"actual": 1024}))
            .fail(
                "balloon",
                "DeviceNotActive",
                "No balloon device has been activated",
            )
            .on("block-commit", |call| {
                let job = call.arg_str("job-id").to_string();
                call.event_before("JOB_STATUS_CHANGE", json!({"id": job, "status": "created"}));
                call.event_after("BLOCK_JOB_READY", json!({"device": job}));
                Answer::ok()
            });
        let qmp = fake.connect().await;
        assert_eq!(
            qmp.execute_raw("query-balloon", None).await.expect("reply"),
            json!({"actual": 1024})
        );
        let err = qmp
            .execute_raw("balloon", Some(json!({"value": 1})))
            .await
            .expect_err("fails");
        assert!(is_qemu_error(&err, "DeviceNotActive"), "{err}");
        let err = qmp.execute_raw("nope", None).await.expect_err("unknown");
        assert!(is_qemu_error(&err, "CommandNotFound"), "{err}");
        let created = qmp.wait_event(T, |e| e.name == "JOB_STATUS_CHANGE");
        let ready = qmp.wait_event(T, |e| e.name == "BLOCK_JOB_READY");
        qmp.execute_raw("block-commit", Some(json!({"job-id": "j"})))
            .await
            .expect("commit");
        assert_eq!(created.await.expect("created").data["id"], "j");
        assert_eq!(ready.await.expect("ready").data["device"], "j");
        let stopped = qmp.wait_event(T, |e| e.name == "STOP");
        fake.emit("STOP", json!({}));
        assert_eq!(stopped.await.expect("stop").timestamp, TIMESTAMP);
        assert_eq!(
            fake.executed(),
            ["query-balloon", "balloon", "nope", "block-commit"]
        );
        assert_eq!(fake.args_of("balloon"), [json!({"value": 1})]);
        assert_eq!(fake.commands()[0].name, "qmp_capabilities");
        assert_eq!(fake.args_of("query-balloon"), [Value::Null]);
        fake.clear();
        assert!(fake.executed().is_empty());
    }

    #[tokio::test]
    async fn silence_and_hang_up() {
        let fake = FakeQemu::start();
        fake.on("quit", |_| Answer::Silent)
            .on("cont", |_| Answer::HangUp);
        let qmp = fake.connect().await;
        let silent =
            tokio::time::timeout(Duration::from_millis(100), qmp.execute_raw("quit", None)).await;
        assert!(silent.is_err(), "quit is never answered");
        let err = qmp.execute_raw("cont", None).await.expect_err("hung up");
        assert!(matches!(err, Error::Closed), "{err:?}");
        // A second client is served after the first one is gone.
        let again = fake.connect().await;
        fake.hang_up();
        tokio::time::timeout(T, again.closed())
            .await
            .expect("hang_up closes every connection");
        assert_eq!(fake.executed(), ["quit", "cont"]);
    }
}
