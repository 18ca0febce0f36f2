//! The private copy-on-write layer of a served disk (one per weave and disk).
//!
//! Two files in the layer's directory (format in `docs/weft-blk.md`):
//! - `data`: a sparse file the size of the disk; block `b` lives at `b * BLOCK`.
//! - `journal`: a header, then fixed-size records, each saying that a run of blocks
//!   now holds data (in `data`) or reads as zeros. Records carry a CRC.
//!
//! Every block is *absent* (read the layers below), *data* or *zero*. Writes update an
//! in-memory map at once (so reads see them) and queue a record. A flush makes them
//! durable in this order: `fdatasync(data)`, append the records, `fdatasync(journal)`.
//! A record is therefore only ever durable after the data it describes. A crash
//! loses at most what was written since the last completed flush (the semantics of a
//! disk with a volatile write cache, which is what the device advertises); it never
//! exposes a block the journal does not vouch for. On open the journal is replayed; a
//! torn or corrupt tail record ends the replay and is cut off. The journal is
//! rewritten compactly (temp file, fsync, rename, fsync of the directory) when it has
//! grown to many times the size of the state it describes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// Block size of the layer in bytes.
pub const BLOCK: u64 = 4096;

const MAGIC: &[u8; 4] = b"WFWL";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
const RECORD_LEN: usize = 24;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
/// Blocks one record can describe.
const MAX_RUN: u64 = u32::MAX as u64;
/// The journal is compacted when it holds more records than this many times the
/// runs of the state (and at least [`COMPACT_MIN`] records).
const COMPACT_FACTOR: u64 = 4;
const COMPACT_MIN: u64 = 4096;

/// What a block of the layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Nothing: read the layers below.
    Absent,
    /// Written: read from the layer's data file.
    Data,
    /// Discarded or zeroed: reads as zeros.
    Zero,
}

/// Why the layer failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("write layer: {op} {path}: {source}")]
    Io {
        /// What the layer was doing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The journal is not a write-layer journal of this disk.
    #[error("write layer: {path}: {reason}")]
    BadJournal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Two bits per block: `present` and `zero` (zero implies present).
struct States {
    present: Vec<u64>,
    zero: Vec<u64>,
}

impl States {
    fn new(blocks: u64) -> States {
        let words = blocks.div_ceil(64) as usize;
        States {
            present: vec![0; words],
            zero: vec![0; words],
        }
    }

    fn get(&self, b: u64) -> BlockState {
        let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
        match (self.present[w] & bit != 0, self.zero[w] & bit != 0) {
            (false, _) => BlockState::Absent,
            (true, false) => BlockState::Data,
            (true, true) => BlockState::Zero,
        }
    }

    fn set(&mut self, first: u64, count: u64, state: BlockState) {
        for b in first..first + count {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            match state {
                BlockState::Absent => {
                    self.present[w] &= !bit;
                    self.zero[w] &= !bit;
                }
                BlockState::Data => {
                    self.present[w] |= bit;
                    self.zero[w] &= !bit;
                }
                BlockState::Zero => {
                    self.present[w] |= bit;
                    self.zero[w] |= bit;
                }
            }
        }
    }

    /// Runs of present blocks: (first, count, state), in order.
    fn runs(&self, blocks: u64) -> Vec<(u64, u64, BlockState)> {
        let mut out: Vec<(u64, u64, BlockState)> = Vec::new();
        let mut b = 0;
        while b < blocks {
            if b % 64 == 0 && self.present[(b / 64) as usize] == 0 {
                b += 64;
                continue;
            }
            let cur = b;
            b += 1;
            let s = self.get(cur);
            if s == BlockState::Absent {
                continue;
            }
            match out.last_mut() {
                Some((first, count, st))
                    if *st == s && *first + *count == cur && *count < MAX_RUN =>
                {
                    *count += 1
                }
                _ => out.push((cur, 1, s)),
            }
        }
        out
    }
}

struct Journal {
    file: File,
    len: u64,
    records: u64,
    /// Records at which compaction is considered next.
    next_check: u64,
    pending: Vec<(u64, u64, BlockState)>,
}

/// A persistent, crash-safe copy-on-write layer.
pub struct WriteLayer {
    dir: PathBuf,
    data_path: PathBuf,
    journal_path: PathBuf,
    data: File,
    disk_size: u64,
    blocks: u64,
    states: RwLock<States>,
    journal: Mutex<Journal>,
}

fn header(disk_size: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record(first: u64, count: u64, state: BlockState) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = match state {
        BlockState::Zero => KIND_ZERO,
        _ => KIND_DATA,
    };
    r[4..8].copy_from_slice(&(count as u32).to_le_bytes());
    r[8..16].copy_from_slice(&first.to_le_bytes());
    let crc = crc32fast::hash(&r[..16]);
    r[16..20].copy_from_slice(&crc.to_le_bytes());
    r
}

/// One record, or `None` for a torn or corrupt one.
fn parse_record(r: &[u8], blocks: u64) -> Option<(u64, u64, BlockState)> {
    if r.len() < RECORD_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(r[16..20].try_into().ok()?);
    if crc32fast::hash(&r[..16]) != crc {
        return None;
    }
    let state = match r[0] {
        KIND_DATA => BlockState::Data,
        KIND_ZERO => BlockState::Zero,
        _ => return None,
    };
    let count = u64::from(u32::from_le_bytes(r[4..8].try_into().ok()?));
    let first = u64::from_le_bytes(r[8..16].try_into().ok()?);
    if count == 0 || first.checked_add(count)? > blocks {
        return None;
    }
    Some((first, count, state))
}

fn fsync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

impl WriteLayer {
    /// Opens the layer in `dir` for a disk of `disk_size` bytes, creating it when the
    /// directory holds none. A journal of another disk size is refused.
    pub fn open(dir: &Path, disk_size: u64) -> Result<WriteLayer, Error> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let data_path = dir.join("data");
        let journal_path = dir.join("journal");
        let blocks = disk_size.div_ceil(BLOCK);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io_err("open", &data_path))?;
        let have = data.metadata().map_err(io_err("stat", &data_path))?.len();
        if have < blocks * BLOCK {
            data.set_len(blocks * BLOCK)
                .map_err(io_err("size", &data_path))?;
        }
        let mut states = States::new(blocks);
        let (file, len, records) = match File::open(&journal_path) {
            Ok(mut f) => {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .map_err(io_err("read", &journal_path))?;
                let bad = |reason: String| Error::BadJournal {
                    path: journal_path.clone(),
                    reason,
                };
                if bytes.len() < HEADER_LEN || &bytes[0..4] != MAGIC {
                    return Err(bad("not a weft write-layer journal".into()));
                }
                let want = header(disk_size);
                if bytes[..HEADER_LEN] != want {
                    let size = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
                    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
                    return Err(bad(if version != VERSION {
                        format!("format version {version} (this build reads {VERSION})")
                    } else if size != disk_size {
                        format!("it belongs to a disk of {size} bytes, not {disk_size}")
                    } else {
                        "bad header checksum".into()
                    }));
                }
                let mut good = HEADER_LEN;
                let mut records = 0u64;
                for r in bytes[HEADER_LEN..].chunks(RECORD_LEN) {
                    let Some((first, count, state)) = parse_record(r, blocks) else {
                        break;
                    };
                    states.set(first, count, state);
                    good += RECORD_LEN;
                    records += 1;
                }
                let file = OpenOptions::new()
                    .write(true)
                    .open(&journal_path)
                    .map_err(io_err("open", &journal_path))?;
                if good < bytes.len() {
                    tracing::warn!(
                        journal = %journal_path.display(),
                        cut = bytes.len() - good,
                        "write layer: cutting a torn journal tail (writes after the last flush)"
                    );
                    file.set_len(good as u64)
                        .and_then(|()| file.sync_data())
                        .map_err(io_err("truncate", &journal_path))?;
                }
                (file, good as u64, records)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let file = write_journal(dir, &journal_path, disk_size, &[])?;
                (file, HEADER_LEN as u64, 0)
            }
            Err(e) => return Err(io_err("open", &journal_path)(e)),
        };
        let layer = WriteLayer {
            dir: dir.to_path_buf(),
            data_path,
            journal_path,
            data,
            disk_size,
            blocks,
            states: RwLock::new(states),
            journal: Mutex::new(Journal {
                file,
                len,
                records,
                next_check: COMPACT_MIN,
                pending: Vec::new(),
            }),
        };
        let mut j = layer.lock_journal();
        layer.maybe_compact(&mut j)?;
        drop(j);
        Ok(layer)
    }

    fn lock_journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// The layer's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// State of block `b` and how many blocks from `b` on (at most `max`) share it.
    pub fn run(&self, b: u64, max: u64) -> (BlockState, u64) {
        let states = self.states.read().unwrap_or_else(|p| p.into_inner());
        let s = states.get(b);
        let end = (b + max).min(self.blocks);
        let mut n = 1;
        while b + n < end && states.get(b + n) == s {
            n += 1;
        }
        (s, n)
    }

    /// Reads whole or partial blocks that are in state `Data`.
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.data
            .read_exact_at(buf, offset)
            .map_err(io_err("read", &self.data_path))
    }

    /// Writes `buf` at `offset` into the data file and marks the blocks it covers as
    /// data. The caller makes sure that every block it only partly covers already
    /// holds its full content (state `Data`, or filled beforehand).
    pub fn write_data(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        if buf.is_empty() {
            return Ok(());
        }
        self.data
            .write_all_at(buf, offset)
            .map_err(io_err("write", &self.data_path))?;
        let first = offset / BLOCK;
        let last = (offset + buf.len() as u64 - 1) / BLOCK;
        self.mark(first, last - first + 1, BlockState::Data);
        Ok(())
    }

    /// Marks whole blocks as reading zeros and frees their space in the data file.
    pub fn zero_blocks(&self, first: u64, count: u64) -> Result<(), Error> {
        if count == 0 {
            return Ok(());
        }
        punch_hole(&self.data, first * BLOCK, count * BLOCK)
            .map_err(io_err("punch hole", &self.data_path))?;
        self.mark(first, count, BlockState::Zero);
        Ok(())
    }

    fn mark(&self, first: u64, count: u64, state: BlockState) {
        let mut j = self.lock_journal();
        self.states
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set(first, count, state);
        match j.pending.last_mut() {
            Some((f, c, s)) if *s == state && *f + *c == first && *c + count <= MAX_RUN => {
                *c += count
            }
            _ => {
                let mut left = count;
                let mut at = first;
                while left > 0 {
                    let n = left.min(MAX_RUN);
                    j.pending.push((at, n, state));
                    at += n;
                    left -= n;
                }
            }
        }
    }

    /// Makes every write and zeroing done so far durable.
    pub fn flush(&self) -> Result<(), Error> {
        let mut j = self.lock_journal();
        if j.pending.is_empty() {
            return Ok(());
        }
        self.data
            .sync_data()
            .map_err(io_err("fdatasync", &self.data_path))?;
        let mut bytes = Vec::with_capacity(j.pending.len() * RECORD_LEN);
        for &(first, count, state) in &j.pending {
            bytes.extend_from_slice(&record(first, count, state));
        }
        let at = j.len;
        let res = j
            .file
            .write_all_at(&bytes, at)
            .and_then(|()| j.file.sync_data());
        if let Err(e) = res {
            // Whatever part of the append landed is cut again on the next flush's
            // append (it writes at the same offset) or on open (torn tail).
            return Err(io_err("append", &self.journal_path)(e));
        }
        j.len += bytes.len() as u64;
        j.records += j.pending.len() as u64;
        j.pending.clear();
        self.maybe_compact(&mut j)
    }

    /// Rewrites the journal as one record per run when it has grown large. Called
    /// with nothing pending (the in-memory state is then the durable state).
    fn maybe_compact(&self, j: &mut Journal) -> Result<(), Error> {
        if !j.pending.is_empty() || j.records < j.next_check {
            return Ok(());
        }
        let runs = self
            .states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .runs(self.blocks);
        let runs_n = runs.len() as u64;
        if j.records >= COMPACT_FACTOR * runs_n {
            let file = write_journal(&self.dir, &self.journal_path, self.disk_size, &runs)?;
            j.len = (HEADER_LEN + runs.len() * RECORD_LEN) as u64;
            j.records = runs_n;
            j.file = file;
        }
        // Scanning the map costs time: look again only after as many new records.
        j.next_check = j.records + COMPACT_MIN.max(COMPACT_FACTOR * runs_n);
        Ok(())
    }

    /// Blocks in each state: (data, zero).
    pub fn counts(&self) -> (u64, u64) {
        let states = self.states.read().unwrap_or_else(|p| p.into_inner());
        let data: u64 = states
            .present
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let zero: u64 = states.zero.iter().map(|w| u64::from(w.count_ones())).sum();
        (data - zero, zero)
    }
}

/// Writes a journal holding `runs` to a temp file, fsyncs it and renames it over
/// `path`, then fsyncs the directory. Returns the new journal opened for appending.
fn write_journal(
    dir: &Path,
    path: &Path,
    disk_size: u64,
    runs: &[(u64, u64, BlockState)],
) -> Result<File, Error> {
    let tmp = dir.join("journal.tmp");
    let mut bytes = header(disk_size).to_vec();
    for &(first, count, state) in runs {
        bytes.extend_from_slice(&record(first, count, state));
    }
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    fsync_dir(dir)?;
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    use std::os::fd::AsRawFd;
    match fallocate(file.as_raw_fd(), flags, offset as i64, len as i64) {
        Ok(()) => Ok(()),
        // A file system without hole punching: write zeros instead.
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let zeros = vec![0u8; 1 << 20];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_durable_after_a_flush_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * BLOCK;
        {
            let l = WriteLayer::open(dir.path(), size).unwrap();
            l.write_data(&[7u8; 2 * BLOCK as usize], 3 * BLOCK).unwrap();
            l.zero_blocks(10, 4).unwrap();
            assert_eq!(l.run(3, 64), (BlockState::Data, 2));
            l.flush().unwrap();
            // Not flushed: lost on reopen.
            l.write_data(&[9u8; BLOCK as usize], 20 * BLOCK).unwrap();
            assert_eq!(l.run(20, 1).0, BlockState::Data);
        }
        let l = WriteLayer::open(dir.path(), size).unwrap();
        assert_eq!(l.run(0, 64), (BlockState::Absent, 3));
        assert_eq!(l.run(3, 64), (BlockState::Data, 2));
        assert_eq!(l.run(10, 64), (BlockState::Zero, 4));
        assert_eq!(l.run(20, 1).0, BlockState::Absent);
        let mut buf = vec![0u8; BLOCK as usize];
        l.read_data(&mut buf, 4 * BLOCK).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert_eq!(l.counts(), (2, 4));
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * BLOCK;
        {
            let l = WriteLayer::open(dir.path(), size).unwrap();
            l.write_data(&[1u8; BLOCK as usize], 0).unwrap();
            l.flush().unwrap();
            l.write_data(&[2u8; BLOCK as usize], BLOCK).unwrap();
            l.flush().unwrap();
        }
        let jpath = dir.path().join("journal");
        let mut bytes = std::fs::read(&jpath).unwrap();
        // Corrupt the second record and add half a record.
        let second = HEADER_LEN + RECORD_LEN;
        bytes[second + 8] ^= 0xff;
        bytes.extend_from_slice(&[0xab; RECORD_LEN / 2]);
        std::fs::write(&jpath, &bytes).unwrap();
        let l = WriteLayer::open(dir.path(), size).unwrap();
        assert_eq!(l.run(0, 16), (BlockState::Data, 1));
        assert_eq!(l.run(1, 16).0, BlockState::Absent);
        assert_eq!(
            std::fs::metadata(&jpath).unwrap().len(),
            (HEADER_LEN + RECORD_LEN) as u64
        );
        // Appends continue after the cut.
        l.write_data(&[3u8; BLOCK as usize], 5 * BLOCK).unwrap();
        l.flush().unwrap();
        drop(l);
        let l = WriteLayer::open(dir.path(), size).unwrap();
        assert_eq!(l.run(5, 1).0, BlockState::Data);
    }

    #[test]
    fn a_journal_of_another_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        WriteLayer::open(dir.path(), 16 * BLOCK).unwrap();
        let e = WriteLayer::open(dir.path(), 32 * BLOCK).err().unwrap();
        assert!(e.to_string().contains("belongs to a disk of"), "{e}");
        std::fs::write(dir.path().join("journal"), b"garbage").unwrap();
        let e = WriteLayer::open(dir.path(), 16 * BLOCK).err().unwrap();
        assert!(
            e.to_string().contains("not a weft write-layer journal"),
            "{e}"
        );
    }

    #[test]
    fn a_long_journal_is_compacted_to_its_runs() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * BLOCK;
        let l = WriteLayer::open(dir.path(), size).unwrap();
        for i in 0..(COMPACT_MIN + 10) {
            l.write_data(&[i as u8; BLOCK as usize], (i % 4) * BLOCK)
                .unwrap();
            l.flush().unwrap();
        }
        let len = std::fs::metadata(dir.path().join("journal")).unwrap().len();
        assert!(
            len < (HEADER_LEN + 64 * RECORD_LEN) as u64,
            "journal {len} bytes"
        );
        l.zero_blocks(2, 1).unwrap();
        l.flush().unwrap();
        drop(l);
        let l = WriteLayer::open(dir.path(), size).unwrap();
        assert_eq!(l.run(0, 8), (BlockState::Data, 2));
        assert_eq!(l.run(2, 8), (BlockState::Zero, 1));
        assert_eq!(l.run(3, 8), (BlockState::Data, 1));
        assert_eq!(l.run(4, 8), (BlockState::Absent, 4));
    }
}
