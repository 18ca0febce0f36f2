//! The serving side: one thread per weave inside its namespace, on the guest's tap.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use dhcproto::v4::CLIENT_PORT;

use super::{answer, Lease, MAX_PACKET, PACKETS_PER_SEC};
use crate::{Error, Result, DHCP_SERVER_PORT};

/// How often the serving thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);
/// How long [`Servers::start`] waits for the thread to bind its socket.
const READY: Duration = Duration::from_secs(10);

/// One running server.
struct Server {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The DHCP servers of the weaves, one thread each, by weave name.
///
/// Calls block (`start` until the socket is bound, `stop` until the thread has left
/// the namespace); from async code use `spawn_blocking`.
#[derive(Default)]
pub struct Servers {
    running: Mutex<HashMap<String, Server>>,
}

impl Servers {
    /// No servers yet.
    pub fn new() -> Servers {
        Servers::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Server>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the server of `weave` runs.
    pub fn is_running(&self, weave: &str) -> bool {
        self.lock()
            .get(weave)
            .is_some_and(|s| !s.thread.is_finished())
    }

    /// Starts serving `lease` on `tap` in the network namespace bound at `netns`
    /// (which must exist), as the server of `weave`. A server of `weave` that runs
    /// already is kept. Returns once the socket is bound, or why it could not be.
    pub fn start(&self, weave: &str, netns: &Path, tap: &str, lease: Lease) -> Result<()> {
        let mut running = self.lock();
        if let Some(s) = running.get(weave) {
            if !s.thread.is_finished() {
                return Ok(());
            }
        }
        if let Some(old) = running.remove(weave) {
            let _ = old.thread.join();
        }
        let ns = File::open(netns)
            .map_err(|e| Error::os(format!("open network namespace {}", netns.display()), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let (weave, path, tap) = (weave.to_string(), netns.to_path_buf(), tap.to_string());
            std::thread::Builder::new()
                .name("weft-dhcp".into())
                .spawn(move || run(ns, &path, &weave, &tap, lease, &stop, ready_tx))
                .map_err(|e| Error::os("start the DHCP thread", e))?
        };
        let ready = ready_rx.recv_timeout(READY).unwrap_or_else(|_| {
            Err(Error::os(
                format!("start the DHCP server on {tap}"),
                io::Error::new(io::ErrorKind::TimedOut, "its thread did not start"),
            ))
        });
        match ready {
            Ok(()) => {
                info!(weave, tap, address = %lease.address, "DHCP server started");
                running.insert(weave.to_string(), Server { stop, thread });
                Ok(())
            }
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Stops the server of `weave` (if any) and waits until its thread has left the
    /// namespace, so the namespace can go.
    pub fn stop(&self, weave: &str) {
        let Some(server) = self.lock().remove(weave) else {
            return;
        };
        server.stop.store(true, Ordering::SeqCst);
        if server.thread.join().is_err() {
            warn!(weave, "the DHCP thread ended abnormally");
        } else {
            info!(weave, "DHCP server stopped");
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for s in self.lock().values() {
            s.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// The serving thread: enter the namespace, bind, report, serve until stopped.
fn run(
    ns: File,
    path: &Path,
    weave: &str,
    tap: &str,
    lease: Lease,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<()>>,
) {
    if let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
        let _ = ready.send(Err(Error::os(
            format!("enter network namespace {}", path.display()),
            e.into(),
        )));
        return;
    }
    drop(ns);
    let socket = match open_socket(tap) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(Error::os(
                format!("listen for DHCP on {tap} in {}", path.display()),
                e,
            )));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    serve(&socket, weave, &lease, stop);
}

/// UDP port 67 ([`DHCP_SERVER_PORT`], the port the weave's filter lets through) on
/// `tap` only, allowed to broadcast, with a read timeout of [`POLL`].
fn open_socket(tap: &str) -> io::Result<UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Bound to the tap before the port, so nothing from another link is ever queued.
    setsockopt(&fd, sockopt::BindToDevice, &OsString::from(tap))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Broadcast, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::new(0, 0, 0, 0, DHCP_SERVER_PORT),
    )?;
    let socket = UdpSocket::from(fd);
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Answers datagrams until `stop` is set, at most [`PACKETS_PER_SEC`] a second.
fn serve(socket: &UdpSocket, weave: &str, lease: &Lease, stop: &AtomicBool) {
    // One byte more than the limit: a longer datagram fills it and is dropped.
    let mut buf = vec![0u8; MAX_PACKET + 1];
    let mut window = Instant::now();
    let mut handled = 0u32;
    let mut failures = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now.duration_since(window) >= Duration::from_secs(1) {
            window = now;
            handled = 0;
        }
        if handled >= PACKETS_PER_SEC {
            // Over budget: leave the rest to the socket buffer (the kernel drops the
            // excess) until the next second.
            let left = Duration::from_secs(1).saturating_sub(now.duration_since(window));
            std::thread::sleep(left.min(POLL));
            continue;
        }
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(100) {
                    warn!(weave, error = %e, failures, "DHCP receive failed");
                }
                std::thread::sleep(POLL);
                continue;
            }
        };
        handled += 1;
        let packet = buf.get(..n).unwrap_or_default();
        match answer(packet, lease) {
            Ok(a) => {
                let to = SocketAddrV4::new(a.to, CLIENT_PORT);
                match socket.send_to(&a.bytes, to) {
                    Ok(_) => debug!(weave, %from, %to, kind = ?a.kind, "DHCP answered"),
                    Err(e) => debug!(weave, %to, error = %e, "DHCP answer not sent"),
                }
            }
            Err(why) => debug!(weave, %from, %why, "DHCP datagram ignored"),
        }
    }
}
