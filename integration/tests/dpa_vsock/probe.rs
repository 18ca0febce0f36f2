//! A guest-side probe for `dpa_vsock.rs`: connects to the host (CID 2) on the DPA
//! port over AF_VSOCK, sends the frames in the file named by its argument, reads two
//! frames back and prints them in hex on the console; again every two seconds, so
//! the test can watch a restarted weftd answer too. Built by the test with plain
//! `rustc` (no crates) as a static binary for the test guest's initramfs.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::time::Duration;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
const HOST_CID: u32 = 2;
const DPA_PORT: u32 = 5150;

/// `struct sockaddr_vm` from <linux/vm_sockets.h>.
#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn close(fd: i32) -> i32;
}

fn exchange(frames: &[u8]) -> io::Result<Vec<u8>> {
    // SAFETY: plain system call with constant arguments.
    let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port: DPA_PORT,
        cid: HOST_CID,
        flags: 0,
        zero: [0; 3],
    };
    // SAFETY: addr is a valid sockaddr_vm of the size given, fd a socket we own.
    if unsafe { connect(fd, &addr, std::mem::size_of::<SockaddrVm>() as u32) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: fd is ours and not used after this.
        unsafe { close(fd) };
        return Err(e);
    }
    // SAFETY: fd is a connected stream socket that nothing else owns. TcpStream only
    // uses read, write and SOL_SOCKET options on it, which AF_VSOCK supports.
    let mut s = unsafe { TcpStream::from_raw_fd(fd) };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(frames)?;
    let mut reply = Vec::new();
    for _ in 0..2 {
        let mut header = [0u8; 5];
        s.read_exact(&mut header)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > 1 << 20 {
            return Err(io::Error::other("oversize frame from the host"));
        }
        let mut rest = vec![0u8; len + 4];
        s.read_exact(&mut rest)?;
        reply.extend_from_slice(&header);
        reply.extend_from_slice(&rest);
    }
    Ok(reply)
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: weft-vsock-probe FRAMES");
    let frames = std::fs::read(&path).expect("frames file");
    for round in 1u64.. {
        match exchange(&frames) {
            Ok(reply) => {
                let hex: String = reply.iter().map(|b| format!("{b:02x}")).collect();
                println!("PROBE-REPLY {round} {hex}");
            }
            Err(e) => println!("PROBE-ERROR {round} {e}"),
        }
        // sleep-ok: the probe's period in the guest, not a wait in the test
        std::thread::sleep(Duration::from_secs(2));
    }
}
