//! Per-chunk access statistics for tiering: an append-only log of fixed-size,
//! individually checksummed records in `<root>/access.log`, compacted by
//! `tier()`. The log is advisory: a lost, torn or damaged log only makes
//! tiering decisions less informed (missing stats fall back to the chunk
//! file's mtime); it never causes a chunk to be removed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use ring::digest;

use super::error::Error;
use super::fsutil::{self, unix_secs};
use super::ChunkId;

/// File header: magic, then the format version (u32 LE), then zeros up to 64 bytes.
const MAGIC: &[u8; 8] = b"WFACCESS";
const VERSION: u32 = 1;
pub(crate) const RECORD_LEN: usize = 64;

/// What happened to a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Written or deduplicated by `put`.
    Put = 1,
    /// Read from the hot tier.
    HotRead = 2,
    /// Read from the cold tier.
    ColdRead = 3,
    /// Compacted totals (`count` reads, `cold` cold reads, `time` last access).
    Summary = 4,
    /// Moved between tiers: read counters restart.
    Moved = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Put,
            2 => Kind::HotRead,
            3 => Kind::ColdRead,
            4 => Kind::Summary,
            5 => Kind::Moved,
            _ => return None,
        })
    }
}

/// Aggregated access statistics of one chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Last put or read, Unix seconds (0 = unknown).
    pub last: u64,
    /// Reads since the chunk last changed tier.
    pub reads: u32,
    /// Cold reads since the chunk last changed tier.
    pub cold_reads: u32,
}

impl Stat {
    fn apply(&mut self, kind: Kind, time: u64, count: u32, cold: u32) {
        match kind {
            Kind::Put => self.last = self.last.max(time),
            Kind::HotRead => {
                self.last = self.last.max(time);
                self.reads = self.reads.saturating_add(1);
            }
            Kind::ColdRead => {
                self.last = self.last.max(time);
                self.reads = self.reads.saturating_add(1);
                self.cold_reads = self.cold_reads.saturating_add(1);
            }
            Kind::Summary => {
                self.last = self.last.max(time);
                self.reads = self.reads.saturating_add(count);
                self.cold_reads = self.cold_reads.saturating_add(cold);
            }
            Kind::Moved => {
                self.reads = 0;
                self.cold_reads = 0;
            }
        }
    }
}

fn record(id: &ChunkId, kind: Kind, time: u64, count: u32, cold: u32) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..32].copy_from_slice(id.as_bytes());
    r[32..40].copy_from_slice(&time.to_le_bytes());
    r[40] = kind as u8;
    r[44..48].copy_from_slice(&count.to_le_bytes());
    r[48..52].copy_from_slice(&cold.to_le_bytes());
    let d = digest::digest(&digest::SHA256, &r[..56]);
    r[56..].copy_from_slice(&d.as_ref()[..8]);
    r
}

fn header() -> [u8; RECORD_LEN] {
    let mut h = [0u8; RECORD_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Fold a log's bytes into per-chunk stats; bad records are skipped.
pub(crate) fn parse(bytes: &[u8]) -> HashMap<ChunkId, Stat> {
    let mut out: HashMap<ChunkId, Stat> = HashMap::new();
    if bytes.len() < RECORD_LEN || bytes[..RECORD_LEN] != header() {
        return out;
    }
    for r in bytes[RECORD_LEN..].chunks_exact(RECORD_LEN) {
        let d = digest::digest(&digest::SHA256, &r[..56]);
        if d.as_ref()[..8] != r[56..] {
            continue;
        }
        let Some(kind) = Kind::from_u8(r[40]) else {
            continue;
        };
        let mut id = [0u8; 32];
        id.copy_from_slice(&r[..32]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&r[32..40]);
        let count = u32::from_le_bytes([r[44], r[45], r[46], r[47]]);
        let cold = u32::from_le_bytes([r[48], r[49], r[50], r[51]]);
        out.entry(ChunkId(id))
            .or_default()
            .apply(kind, u64::from_le_bytes(t), count, cold);
    }
    out
}

/// The access log of a store.
pub(crate) struct AccessLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl AccessLog {
    pub fn new(path: PathBuf) -> AccessLog {
        AccessLog {
            path,
            file: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<File>> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_append(path: &Path) -> io::Result<File> {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let len = f.metadata()?.len();
        if len == 0 {
            f.write_all(&header())?;
        } else if len % RECORD_LEN as u64 != 0 {
            // A torn record from a crash: pad it into one (invalid) record so
            // that new records stay aligned.
            let pad = RECORD_LEN - (len % RECORD_LEN as u64) as usize;
            f.write_all(&[0u8; RECORD_LEN][..pad])?;
        }
        Ok(f)
    }

    /// Record an event now. Best effort: a failure only loses statistics.
    pub fn note(&self, id: &ChunkId, kind: Kind) {
        self.note_at(id, kind, unix_secs(SystemTime::now()));
    }

    /// Record an event at `time` (Unix seconds). Best effort.
    pub fn note_at(&self, id: &ChunkId, kind: Kind, time: u64) {
        let rec = record(id, kind, time, 1, 0);
        let mut guard = self.lock();
        if guard.is_none() {
            *guard = Self::open_append(&self.path).ok();
        }
        if let Some(f) = guard.as_mut() {
            // One write of a whole record with O_APPEND: concurrent writers
            // (threads or processes) never interleave inside a record.
            if f.write_all(&rec).is_err() {
                *guard = None;
            }
        }
    }

    /// Current statistics.
    pub fn load(&self) -> HashMap<ChunkId, Stat> {
        let _guard = self.lock();
        fs::read(&self.path).map(|b| parse(&b)).unwrap_or_default()
    }

    /// Rewrite the log as one summary record per chunk for which `keep` is
    /// true (crash-safe: temp file, fsync, rename).
    pub fn compact(&self, tmp_dir: &Path, keep: impl Fn(&ChunkId) -> bool) -> Result<usize, Error> {
        let mut guard = self.lock();
        let stats = fs::read(&self.path).map(|b| parse(&b)).unwrap_or_default();
        let mut out = Vec::with_capacity(RECORD_LEN * (stats.len() + 1));
        out.extend_from_slice(&header());
        let mut kept = 0;
        for (id, s) in &stats {
            if keep(id) {
                out.extend_from_slice(&record(id, Kind::Summary, s.last, s.reads, s.cold_reads));
                kept += 1;
            }
        }
        fsutil::write_durable(
            tmp_dir,
            "access",
            &self.path,
            &[&out],
            fsutil::Publish::Replace,
        )?;
        // Appends go to the new file from now on.
        *guard = None;
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_and_damage() {
        let a = ChunkId([1; 32]);
        let b = ChunkId([2; 32]);
        let mut log = header().to_vec();
        log.extend_from_slice(&record(&a, Kind::Put, 10, 1, 0));
        log.extend_from_slice(&record(&a, Kind::ColdRead, 20, 1, 0));
        log.extend_from_slice(&record(&a, Kind::ColdRead, 30, 1, 0));
        log.extend_from_slice(&record(&b, Kind::HotRead, 5, 1, 0));
        let mut bad = record(&b, Kind::HotRead, 99, 1, 0);
        bad[33] ^= 1;
        log.extend_from_slice(&bad);
        let mut torn = log.clone();
        torn.extend_from_slice(&[7; 20]); // torn tail
        let s = parse(&torn);
        assert_eq!(
            s[&a],
            Stat {
                last: 30,
                reads: 2,
                cold_reads: 2
            }
        );
        assert_eq!(
            s[&b],
            Stat {
                last: 5,
                reads: 1,
                cold_reads: 0
            }
        );
        log.extend_from_slice(&record(&a, Kind::Moved, 40, 1, 0));
        assert_eq!(
            parse(&log)[&a],
            Stat {
                last: 30,
                reads: 0,
                cold_reads: 0
            }
        );
        assert!(parse(b"garbage").is_empty());
    }
}
