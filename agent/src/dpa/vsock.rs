//! AF_VSOCK for the kernel's vhost-vsock: a non-blocking listener on a port and
//! its accepted streams as tokio `AsyncRead`/`AsyncWrite`. The peer's CID, which the
//! kernel sets and the guest cannot forge, tells which VM is talking.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::sys::socket::{
    accept4, bind, getpeername, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `VMADDR_CID_ANY`: listen on every CID of this host.
const CID_ANY: u32 = u32::MAX;

/// A listening AF_VSOCK stream socket.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` for connections to any CID of this host.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, port))?;
        listen(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
        // SAFETY: the OwnedFd is a valid, open socket that the AsyncFd owns from here
        // on; it stays open and is the same descriptor until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(VsockListener { fd })
    }

    /// The next connection and its peer's CID.
    pub async fn accept(&self) -> io::Result<(VsockStream, u32)> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|fd| {
                accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            let raw = match accepted {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            let peer: VsockAddr = getpeername(owned.as_raw_fd())?;
            return Ok((VsockStream::new(owned)?, peer.cid()));
        }
    }
}

/// A connected AF_VSOCK stream. Reads and writes go through the descriptor as a
/// `File` (plain read(2)/write(2), which stream sockets support).
pub struct VsockStream {
    fd: AsyncFd<File>,
}

impl VsockStream {
    fn new(fd: OwnedFd) -> io::Result<VsockStream> {
        // SAFETY: the File owns the accepted socket's descriptor and moves into the
        // AsyncFd, which keeps it open and unchanged until it is dropped.
        let fd = unsafe { AsyncFd::register(File::from(fd)) }.map_err(|e| e.into_parts().1)?;
        Ok(VsockStream { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = nix::sys::socket::shutdown(
            self.fd.get_ref().as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        );
        Poll::Ready(r.map_err(io::Error::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_is_held_by_one_listener() {
        let port = 0x7fff_0000 + std::process::id() % 0xffff;
        let first = match VsockListener::bind(port) {
            Ok(l) => l,
            // A host without AF_VSOCK at all: the kernel mode is not available there.
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return,
            Err(e) => panic!("bind vsock port {port}: {e}"),
        };
        let again = VsockListener::bind(port)
            .err()
            .and_then(|e| e.raw_os_error());
        assert_eq!(again, Some(libc::EADDRINUSE));
        drop(first);
        VsockListener::bind(port).expect("the port is free again");
    }
}
