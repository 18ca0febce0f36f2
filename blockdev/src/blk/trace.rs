//! The read trace of a served disk: when the guest read what.
//!
//! Format (documented in `docs/weft-blk.md`): a 16-byte header (`WFTR`, version u16,
//! 2 reserved bytes, start time as u64 microseconds since the Unix epoch), then
//! 16-byte records: milliseconds since the start (u32), length in 512-byte sectors
//! (u32), offset in sectors (u64), all little-endian. Records are buffered and written
//! in batches (on a full buffer, a guest flush, a disconnect and at exit): the trace is
//! advisory, so a crash may lose the last batch, and a reader ignores a partial
//! record at the end. A trace that would outgrow its size limit stops recording.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 4] = b"WFTR";
const VERSION: u16 = 1;
/// Header and record size in bytes.
pub const RECORD_LEN: usize = 16;
const BATCH: usize = 4096;
/// A segment covers at most this many milliseconds (about 12 days), so a record's
/// time field never reaches the value of the magic (a new segment header starts).
const SEGMENT_MS: u128 = 1 << 30;

/// One recorded read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// Microseconds since the Unix epoch (millisecond resolution).
    pub time_us: u64,
    /// Disk offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

struct Inner {
    start: Instant,
    file: File,
    buf: Vec<u8>,
    written: u64,
}

/// An append-only read trace.
pub struct Trace {
    limit: u64,
    inner: Mutex<Inner>,
}

impl Trace {
    /// Opens (appending) or creates the trace at `path`, keeping it under `limit` bytes.
    /// A trace from an earlier run is continued as a new file segment: its header is
    /// rewritten only when the file is new or unreadable.
    pub fn open(path: &Path, limit: u64) -> io::Result<Trace> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut head = [0u8; RECORD_LEN];
        let len = file.metadata()?.len();
        let reusable = len >= RECORD_LEN as u64
            && file.read_exact(&mut head).is_ok()
            && &head[0..4] == MAGIC
            && u16::from_le_bytes([head[4], head[5]]) == VERSION;
        // Each run starts a new segment: a header record with the run's start time.
        // (A reader treats a record starting with the magic as a segment header.)
        if !reusable {
            file.set_len(0)?;
        } else if len % RECORD_LEN as u64 != 0 {
            // A torn record from a crash: drop it.
            file.set_len(len - len % RECORD_LEN as u64)?;
        }
        file.write_all(&segment_header())?;
        let written = file.metadata()?.len();
        Ok(Trace {
            limit,
            inner: Mutex::new(Inner {
                start: Instant::now(),
                file,
                buf: Vec::with_capacity(BATCH * RECORD_LEN),
                written,
            }),
        })
    }

    /// Records a read of `len` bytes at `offset`.
    pub fn record(&self, offset: u64, len: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.written + (inner.buf.len() + 2 * RECORD_LEN) as u64 > self.limit {
            return;
        }
        let mut ms = inner.start.elapsed().as_millis();
        if ms >= SEGMENT_MS {
            inner.start = Instant::now();
            inner.buf.extend_from_slice(&segment_header());
            ms = 0;
        }
        let mut r = [0u8; RECORD_LEN];
        r[0..4].copy_from_slice(&(ms as u32).to_le_bytes());
        r[4..8].copy_from_slice(&((len / 512).min(u64::from(u32::MAX)) as u32).to_le_bytes());
        r[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        inner.buf.extend_from_slice(&r);
        if inner.buf.len() >= BATCH * RECORD_LEN {
            write_out(&mut inner);
        }
    }

    /// Writes the buffered records to the file.
    pub fn flush(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        write_out(&mut inner);
    }
}

/// A segment header: magic, version, the current time in microseconds.
fn segment_header() -> [u8; RECORD_LEN] {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let mut header = [0u8; RECORD_LEN];
    header[0..4].copy_from_slice(MAGIC);
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&now_us.to_le_bytes());
    header
}

fn write_out(inner: &mut Inner) {
    if inner.buf.is_empty() {
        return;
    }
    let buf = std::mem::take(&mut inner.buf);
    match inner.file.write_all(&buf) {
        Ok(()) => inner.written += buf.len() as u64,
        Err(e) => tracing::warn!(
            "read trace: dropping {} records: {e}",
            buf.len() / RECORD_LEN
        ),
    }
    inner.buf = buf;
    inner.buf.clear();
}

/// Reads a trace file: every record of every segment, with absolute times.
pub fn read_trace(path: &Path) -> io::Result<Vec<TraceRecord>> {
    let bytes = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut base_us: Option<u64> = None;
    for r in bytes.chunks_exact(RECORD_LEN) {
        if &r[0..4] == MAGIC {
            base_us = Some(u64::from_le_bytes(r[8..16].try_into().unwrap_or([0; 8])));
            continue;
        }
        let Some(base) = base_us else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a weft read trace", path.display()),
            ));
        };
        let field = |a: usize, b: usize| -> u64 {
            let mut w = [0u8; 8];
            w[..b - a].copy_from_slice(&r[a..b]);
            u64::from_le_bytes(w)
        };
        out.push(TraceRecord {
            time_us: base + field(0, 4) * 1000,
            len: field(4, 8) * 512,
            offset: field(8, 16) * 512,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        let t = Trace::open(&path, 1 << 20).unwrap();
        t.record(4096, 8192);
        t.record(0, 512);
        t.flush();
        drop(t);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        let t = Trace::open(&path, 1 << 20).unwrap();
        t.record(1 << 30, 1 << 20);
        t.flush();
        let recs = read_trace(&path).unwrap();
        let got: Vec<(u64, u64)> = recs.iter().map(|r| (r.offset, r.len)).collect();
        assert_eq!(got, vec![(4096, 8192), (0, 512), (1 << 30, 1 << 20)]);
        assert!(recs[2].time_us >= recs[0].time_us);
    }

    #[test]
    fn recording_stops_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        let t = Trace::open(&path, 4 * RECORD_LEN as u64).unwrap();
        for i in 0..100 {
            t.record(i * 512, 512);
        }
        t.flush();
        // The header and two records: one slot is kept for a segment header.
        assert_eq!(read_trace(&path).unwrap().len(), 2);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            3 * RECORD_LEN as u64
        );
    }
}
