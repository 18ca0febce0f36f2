//! Wake-ups between the agent's threads.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::Error;

/// Wakes the capture loop out of `poll(2)`: a socket pair whose read end the loop polls
/// next to inotify. Also the target of the SIGHUP handler (see `capture`).
#[derive(Clone, Debug)]
pub(crate) struct Waker {
    tx: Arc<UnixStream>,
    rx: Arc<UnixStream>,
}

impl Waker {
    pub(crate) fn new() -> Result<Self, Error> {
        let (tx, rx) = UnixStream::pair().map_err(|e| Error::io("cannot make a socket pair", e))?;
        for s in [&tx, &rx] {
            s.set_nonblocking(true)
                .map_err(|e| Error::io("cannot make a socket pair non-blocking", e))?;
        }
        Ok(Waker {
            tx: Arc::new(tx),
            rx: Arc::new(rx),
        })
    }

    /// Wakes the loop; a full socket already means "wake up", so errors are ignored.
    pub(crate) fn wake(&self) {
        let _ = (&*self.tx).write(&[1]);
    }

    /// The write end, for the signal handler.
    pub(crate) fn sender(&self) -> &UnixStream {
        &self.tx
    }

    /// The read end, for `poll(2)`.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Empties the read end after a wake-up.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 256];
        while matches!((&*self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// A counter with a condition variable: the client thread sleeps on it until the spool
/// grows or a frame arrives.
#[derive(Debug, Default)]
pub struct Notify {
    count: Mutex<u64>,
    cond: Condvar,
}

impl Notify {
    /// Wakes every waiter.
    pub fn poke(&self) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *c = c.wrapping_add(1);
        self.cond.notify_all();
    }

    /// The current count, to wait on.
    pub fn current(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the count differs from `seen` or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .cond
            .wait_timeout_while(c, timeout, |c| *c == seen)
            .unwrap_or_else(|p| p.into_inner());
    }
}
