//! `weft-blkread`: a guest-side read benchmark for block devices (the guest has only
//! busybox). Reads with `O_DIRECT`, so the guest's page cache is out of the way:
//!
//! - `seq`: the whole device (or `--bytes`) front to back in `--bs` reads;
//! - `rand`: `--count` reads of `--bs` at uniformly random aligned offsets (xorshift,
//!   `--seed`), `--depth` threads in parallel.
//!
//! Prints one line: `weft-blkread: mode=M bs=B bytes=N secs=S mib_s=X iops=Y`.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "weft-blkread")]
struct Args {
    /// The block device (e.g. /dev/vdb).
    device: String,
    /// seq or rand.
    #[arg(long, default_value = "seq")]
    mode: String,
    /// Read size in bytes (a multiple of 4096).
    #[arg(long, default_value_t = 1 << 20)]
    bs: usize,
    /// seq: bytes to read (default: the whole device).
    #[arg(long)]
    bytes: Option<u64>,
    /// rand: number of reads.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// rand: reads in flight (threads).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// rand: seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Aligned { buf, off, len }
    }
    fn slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

fn device_size(f: &File) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    Ok(f.seek(SeekFrom::End(0))?)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.bs == 0 || a.bs % 4096 != 0 {
        bail!("--bs must be a positive multiple of 4096");
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_direct())
        .open(&a.device)
        .with_context(|| format!("open {} with O_DIRECT", a.device))?;
    let size = device_size(&f)?;
    let bs = a.bs as u64;
    let t = Instant::now();
    let bytes = match a.mode.as_str() {
        "seq" => {
            let total = a.bytes.unwrap_or(size).min(size) / bs * bs;
            let mut buf = Aligned::new(a.bs);
            let mut at = 0;
            while at < total {
                f.read_exact_at(buf.slice(), at)
                    .with_context(|| format!("read at {at}"))?;
                at += bs;
            }
            total
        }
        "rand" => {
            let blocks = size / bs;
            if blocks == 0 {
                bail!("the device is smaller than one read");
            }
            let per = a.count / a.depth.max(1) as u64;
            std::thread::scope(|s| -> anyhow::Result<()> {
                let mut handles = Vec::new();
                for th in 0..a.depth.max(1) {
                    let f = &f;
                    let seed = a.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (th as u64 + 1);
                    handles.push(s.spawn(move || -> anyhow::Result<()> {
                        let mut x = seed | 1;
                        let mut buf = Aligned::new(bs as usize);
                        for _ in 0..per {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let at = (x % blocks) * bs;
                            f.read_exact_at(buf.slice(), at)
                                .with_context(|| format!("read at {at}"))?;
                        }
                        Ok(())
                    }));
                }
                for h in handles {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
                }
                Ok(())
            })?;
            per * a.depth.max(1) as u64 * bs
        }
        other => bail!("--mode {other}: use seq or rand"),
    };
    let secs = t.elapsed().as_secs_f64();
    println!(
        "weft-blkread: mode={} bs={} bytes={} secs={:.3} mib_s={:.1} iops={:.0}",
        a.mode,
        a.bs,
        bytes,
        secs,
        bytes as f64 / secs / (1 << 20) as f64,
        (bytes / bs) as f64 / secs
    );
    Ok(())
}

/// `O_DIRECT` on x86_64 Linux (the guest is x86_64; no libc crate in this package).
fn libc_o_direct() -> i32 {
    0o40000
}
