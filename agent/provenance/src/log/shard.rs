//! One VM's log as loaded: its segments (the open one and the sealed ones with their
//! sidecar indexes), appends with their fsyncs and torn-tail recovery, sealing,
//! retention and the lineage file. [`ProvenanceLog`](super::ProvenanceLog) keeps one
//! [`Shard`] per VM behind a lock and calls these.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, error, info, warn};

use super::filter::{self, Field};
use super::segment::{self, BlockMeta, SegmentIndex};
use super::{
    check_vm_name, io, min_opt, sync_dir, Bound, Candidate, Lineage, LogOptions, ProvenanceError,
    Query, RetentionReport, LINEAGE_FILE, PREALLOC,
};

/// One segment of a shard.
pub(super) struct Segment {
    first_seq: u64,
    pub(super) path: Arc<PathBuf>,
    pub(super) blocks: Vec<Arc<BlockMeta>>,
    /// Bytes of the segment file.
    pub(super) len: u64,
    /// Bytes of the file: `len` plus zeros allocated ahead (the open segment).
    alloc: u64,
    /// Bytes of its sidecar (sealed segments).
    index_len: u64,
    /// What its blocks count towards the quota: see [`charge`].
    charged: u64,
    pub(super) sealed: bool,
}

/// What a block counts towards the quota: its header and its payload decompressed (or
/// as stored, if that is larger; a written block is never stored larger).
fn charge(b: &BlockMeta) -> u64 {
    segment::BLOCK_HEADER as u64 + u64::from(b.raw_len.max(b.stored_len))
}

/// About what a block takes in memory decoded: its raw bytes and each entry's own
/// structure and allocations.
pub(super) fn decoded_bytes(b: &BlockMeta) -> u64 {
    u64::from(b.raw_len) + u64::from(b.count) * 256
}

fn charge_all(blocks: &[Arc<BlockMeta>]) -> u64 {
    blocks.iter().map(|b| charge(b)).sum()
}

impl Segment {
    /// What the segment counts towards the quota.
    pub(super) fn charged_bytes(&self) -> u64 {
        segment::SEGMENT_HEADER + self.charged + self.index_len
    }

    pub(super) fn last_seq(&self) -> u64 {
        self.blocks
            .last()
            .map_or(self.first_seq.saturating_sub(1), |b| b.last_seq)
    }

    fn max_host_us(&self) -> i64 {
        self.blocks
            .iter()
            .map(|b| b.max_host_us)
            .max()
            .unwrap_or(i64::MIN)
    }
}

/// One VM's log, as loaded.
pub(super) struct Shard {
    dir: PathBuf,
    /// Unique per loaded shard: keys its blocks in the cache.
    pub(super) generation: u64,
    pub(super) segments: Vec<Segment>,
    /// The open segment's file, opened for writing on first append.
    writer: Option<File>,
    pub(super) lineage: Option<Lineage>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// A write failed and could not be undone: reload from disk before the next use.
    pub(super) broken: bool,
}

impl Shard {
    /// Loads a shard from `dir` (which need not exist): sidecars of sealed segments,
    /// a scan of the open one with its torn tail cut off.
    pub(super) fn load(dir: PathBuf, generation: u64) -> Result<Shard, ProvenanceError> {
        let mut shard = Shard {
            dir,
            generation,
            segments: Vec::new(),
            writer: None,
            lineage: None,
            compressor: None,
            broken: false,
        };
        let listing = match std::fs::read_dir(&shard.dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(shard),
            Err(e) => return Err(io("list", &shard.dir)(e)),
        };
        let mut firsts = Vec::new();
        let mut indexes = Vec::new();
        for entry in listing {
            let entry = entry.map_err(io("list", &shard.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(first) = segment::parse_segment_name(&name) {
                firsts.push(first);
            } else if name.ends_with(".tmp") {
                // An index or lineage file whose writer crashed before its rename.
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(stem) = name.strip_suffix(".idx") {
                indexes.push((stem.to_string(), entry.path()));
            }
        }
        firsts.sort_unstable();
        // A sidecar whose segment retention removed (a crash in between) goes too.
        for (stem, path) in indexes {
            if segment::parse_segment_name(&format!("{stem}.log"))
                .is_none_or(|f| !firsts.contains(&f))
            {
                let _ = std::fs::remove_file(path);
            }
        }
        let lineage_path = shard.dir.join(LINEAGE_FILE);
        match std::fs::read(&lineage_path) {
            Ok(bytes) => {
                let l: Lineage =
                    serde_json::from_slice(&bytes).map_err(|e| ProvenanceError::Corrupt {
                        path: lineage_path.clone(),
                        reason: e.to_string(),
                    })?;
                check_vm_name(&l.parent).map_err(|e| ProvenanceError::Corrupt {
                    path: lineage_path.clone(),
                    reason: e.to_string(),
                })?;
                shard.lineage = Some(l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("read", &lineage_path)(e)),
        }
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let seg = shard.load_segment(first, is_last)?;
            shard.segments.push(seg);
        }
        Ok(shard)
    }

    fn load_segment(&self, first: u64, is_last: bool) -> Result<Segment, ProvenanceError> {
        let path = segment::segment_path(&self.dir, first);
        let idx_path = segment::index_path(&self.dir, first);
        let len = std::fs::metadata(&path).map_err(io("stat", &path))?.len();
        if let Some(index) = segment::read_index(&idx_path, len) {
            let index_len = std::fs::metadata(&idx_path).map(|m| m.len()).unwrap_or(0);
            let blocks: Vec<Arc<BlockMeta>> = index.blocks.into_iter().map(Arc::new).collect();
            return Ok(Segment {
                first_seq: first,
                path: Arc::new(path),
                charged: charge_all(&blocks),
                blocks,
                len,
                alloc: len,
                index_len,
                sealed: true,
            });
        }
        if is_last && len < segment::SEGMENT_HEADER {
            // Created, then a crash before its header was durable: start it again.
            let f = File::create(&path).map_err(io("create", &path))?;
            f.write_all_at(&segment::segment_header(), 0)
                .and_then(|()| f.sync_all())
                .map_err(io("write", &path))?;
            return Ok(Segment {
                first_seq: first,
                path: Arc::new(path),
                blocks: Vec::new(),
                len: segment::SEGMENT_HEADER,
                alloc: segment::SEGMENT_HEADER,
                index_len: 0,
                charged: 0,
                sealed: false,
            });
        }
        let scan = segment::scan(&path)?;
        if let Some(reason) = &scan.stopped {
            if scan.zero_tail {
                // Space allocated ahead of appends (every open segment has some after
                // a stop or a crash): not data, cut without a word.
                debug!(path = %path.display(), cut = len - scan.valid_len, "provenance segment: space allocated ahead cut off");
            } else if !is_last {
                // Sealed segments were fsynced whole before the next one began: this
                // is damage, not a crash. Reads of it fail; nothing is cut.
                return Err(ProvenanceError::Corrupt {
                    path: path.clone(),
                    reason: reason.clone(),
                });
            } else if scan.valid_after {
                // Not a torn tail: keep the bytes for inspection before cutting.
                let keep = path.with_extension(format!("log.damaged-{}", scan.valid_len));
                let bytes = std::fs::read(&path).map_err(io("read", &path))?;
                std::fs::write(&keep, &bytes[scan.valid_len as usize..])
                    .map_err(io("write", &keep))?;
                error!(path = %path.display(), kept = %keep.display(), %reason, "provenance segment damaged in the middle; cut and kept the rest aside");
            } else {
                warn!(path = %path.display(), cut = len - scan.valid_len, %reason, "provenance segment had a torn tail; cut it off");
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io("open", &path))?;
            f.set_len(scan.valid_len)
                .and_then(|()| f.sync_all())
                .map_err(io("truncate", &path))?;
        }
        let mut seg = Segment {
            first_seq: first,
            path: Arc::new(path),
            blocks: scan.blocks.into_iter().map(Arc::new).collect(),
            len: scan.valid_len,
            alloc: scan.valid_len,
            index_len: 0,
            charged: 0,
            sealed: false,
        };
        seg.charged = charge_all(&seg.blocks);
        if !is_last {
            // A sealed segment whose sidecar was lost: write it again.
            seg.index_len = write_sidecar(&self.dir, &seg)?;
            seg.sealed = true;
        }
        Ok(seg)
    }

    pub(super) fn own_last_seq(&self) -> u64 {
        self.segments.last().map_or(0, Segment::last_seq)
    }

    pub(super) fn last_seq(&self) -> u64 {
        let lineage = self.lineage.as_ref().map_or(0, |l| l.until_seq);
        self.own_last_seq().max(lineage)
    }

    pub(super) fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len + s.index_len).sum()
    }

    pub(super) fn charged_bytes(&self) -> u64 {
        self.segments.iter().map(Segment::charged_bytes).sum()
    }

    pub(super) fn append(
        &mut self,
        vm: &str,
        host_time_us: i64,
        entries: &[weft_dpa::Entry],
        options: &LogOptions,
    ) -> Result<u64, ProvenanceError> {
        let last = self.last_seq();
        let fresh: &[weft_dpa::Entry] = match entries.iter().position(|e| e.seq > last) {
            Some(i) => &entries[i..],
            None => return Ok(last),
        };
        if fresh[0].seq != last + 1 {
            return Err(ProvenanceError::Gap {
                vm: vm.to_string(),
                last,
                got: fresh[0].seq,
            });
        }
        let needs_segment = self.segments.last().is_none_or(|s| s.sealed);
        let base = if needs_segment {
            segment::SEGMENT_HEADER
        } else {
            self.segments.last().map_or(0, |s| s.len)
        };
        let compressor = match &mut self.compressor {
            Some(c) => c,
            None => self.compressor.insert(
                zstd::bulk::Compressor::new(options.compression_level).map_err(|e| {
                    ProvenanceError::Invalid(format!(
                        "zstd level {}: {e}",
                        options.compression_level
                    ))
                })?,
            ),
        };
        let mut buf = Vec::new();
        let metas = segment::encode_blocks(fresh, host_time_us, compressor, base, &mut buf)
            .map_err(ProvenanceError::Invalid)?;
        // Counted decompressed: what replay and the API will hold, not what zstd made of
        // it (a guest's repetitive values would otherwise pass a thousandfold).
        let extra = metas.iter().map(charge).sum::<u64>()
            + if needs_segment {
                segment::SEGMENT_HEADER
            } else {
                0
            };
        if options.quota_bytes > 0 && self.charged_bytes() + extra > options.quota_bytes {
            return Err(ProvenanceError::Quota {
                vm: vm.to_string(),
                quota: options.quota_bytes,
            });
        }
        if needs_segment {
            self.start_segment(fresh[0].seq)?;
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(ProvenanceError::Invalid("no open segment".into()));
        };
        if self.writer.is_none() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(seg.path.as_ref())
                .map_err(io("open", &seg.path))?;
            self.writer = Some(f);
        }
        let Some(writer) = &self.writer else {
            return Err(ProvenanceError::Invalid("no open segment".into()));
        };
        // Zeros ahead of the data, a chunk at a time: most appends then rewrite
        // allocated blocks inside the file, and their fdatasync has no size change to
        // commit.
        let end = seg.len + buf.len() as u64;
        let mut extend = Ok(());
        if end > seg.alloc {
            let chunk = PREALLOC.min(options.segment_bytes);
            let zeros = vec![0u8; (end + chunk - seg.alloc) as usize];
            extend = writer.write_all_at(&zeros, seg.alloc);
            if extend.is_ok() {
                seg.alloc = end + chunk;
            }
        }
        let written = extend
            .and_then(|()| writer.write_all_at(&buf, seg.len))
            .and_then(|()| writer.sync_data());
        if let Err(e) = written {
            // Take back whatever part was written: the next append must start at a
            // block boundary. If even that fails, reload (and cut) from disk.
            if writer
                .set_len(seg.len)
                .and_then(|()| writer.sync_data())
                .is_err()
            {
                self.broken = true;
            }
            seg.alloc = seg.len;
            return Err(io("write", &seg.path)(e));
        }
        seg.len += buf.len() as u64;
        seg.charged += metas.iter().map(charge).sum::<u64>();
        seg.blocks.extend(metas.into_iter().map(Arc::new));
        Ok(self.last_seq())
    }

    /// Creates the segment that starts at `first` (durably) and makes it the open one.
    fn start_segment(&mut self, first: u64) -> Result<(), ProvenanceError> {
        let new_dir = !self.dir.exists();
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        if new_dir {
            if let Some(root) = self.dir.parent() {
                sync_dir(root)?;
            }
        }
        let path = segment::segment_path(&self.dir, first);
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("create", &path))?;
        f.write_all_at(&segment::segment_header(), 0)
            .and_then(|()| f.sync_all())
            .map_err(io("write", &path))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            first_seq: first,
            path: Arc::new(path),
            blocks: Vec::new(),
            len: segment::SEGMENT_HEADER,
            alloc: segment::SEGMENT_HEADER,
            index_len: 0,
            charged: 0,
            sealed: false,
        });
        self.writer = Some(f);
        Ok(())
    }

    /// Seals the open segment: its sidecar is written and it never changes again.
    pub(super) fn seal(&mut self) -> Result<(), ProvenanceError> {
        let Some(seg) = self.segments.last_mut().filter(|s| !s.sealed) else {
            return Ok(());
        };
        if seg.alloc > seg.len {
            // Sealed segments hold their blocks and nothing else.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(seg.path.as_ref())
                .map_err(io("open", &seg.path))?;
            f.set_len(seg.len)
                .and_then(|()| f.sync_all())
                .map_err(io("truncate", &seg.path))?;
            seg.alloc = seg.len;
        }
        seg.index_len = write_sidecar(&self.dir, seg)?;
        seg.sealed = true;
        self.writer = None;
        Ok(())
    }

    /// Drops sealed segments past the retention rules (never the newest segment).
    pub(super) fn retain(
        &mut self,
        options: &LogOptions,
        now: i64,
    ) -> Result<RetentionReport, ProvenanceError> {
        let mut report = RetentionReport::default();
        let mut total = self.bytes();
        while self.segments.len() > 1 && self.segments[0].sealed {
            let oldest = &self.segments[0];
            let too_old = options
                .retain_us
                .is_some_and(|age| oldest.max_host_us() < now.saturating_sub(age));
            let too_big = options.retain_bytes > 0 && total > options.retain_bytes;
            if !too_old && !too_big {
                break;
            }
            let freed = oldest.len + oldest.index_len;
            std::fs::remove_file(oldest.path.as_ref()).map_err(io("remove", &oldest.path))?;
            let idx = segment::index_path(&self.dir, oldest.first_seq);
            if let Err(e) = std::fs::remove_file(&idx) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io("remove", &idx)(e));
                }
            }
            info!(segment = %oldest.path.display(), last_seq = oldest.last_seq(), "provenance retention dropped a segment");
            total -= freed;
            report.segments += 1;
            report.bytes += freed;
            self.segments.remove(0);
        }
        if report.segments > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(report)
    }

    pub(super) fn write_lineage(&self, lineage: &Lineage) -> Result<(), ProvenanceError> {
        let new_dir = !self.dir.exists();
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        if new_dir {
            if let Some(root) = self.dir.parent() {
                sync_dir(root)?;
            }
        }
        let path = self.dir.join(LINEAGE_FILE);
        let tmp = self.dir.join(format!("{LINEAGE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(lineage)
            .map_err(|e| ProvenanceError::Branch(e.to_string()))?;
        let f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all_at(&bytes, 0)
            .and_then(|()| f.sync_all())
            .map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        sync_dir(&self.dir)
    }

    /// The blocks that may hold matches of `q` within `bound`, in seq order.
    pub(super) fn candidates(&self, q: &Query, bound: Bound) -> Vec<Candidate> {
        let after = q.after_seq.unwrap_or(0);
        let max_time = min_opt(q.to_us, bound.max_time);
        let row = match (&q.collection, &q.key) {
            (Some(c), Some(k)) if !c.is_empty() => Some(filter::hash_row(c, k)),
            _ => None,
        };
        let mut out = Vec::new();
        // Segments and blocks are in seq order: skip to the first that ends after `after`.
        let start = self.segments.partition_point(|s| s.last_seq() <= after);
        for seg in &self.segments[start..] {
            if bound.max_seq.is_some_and(|m| seg.first_seq > m) {
                break;
            }
            let from = seg.blocks.partition_point(|b| b.last_seq <= after);
            for b in &seg.blocks[from..] {
                if bound.max_seq.is_some_and(|m| b.first_seq > m) {
                    break;
                }
                let in_time = q.from_us.is_none_or(|t| b.max_guest_us >= t)
                    && max_time.is_none_or(|t| b.min_guest_us <= t);
                let may_hold = row.is_none_or(|h| b.filter.may_contain_hash(h))
                    && q.key
                        .as_deref()
                        .is_none_or(|k| b.filter.may_contain(Field::Key, k))
                    && q.collection
                        .as_deref()
                        .is_none_or(|c| b.filter.may_contain(Field::Collection, c))
                    && q.source
                        .as_deref()
                        .is_none_or(|s| b.filter.may_contain(Field::Source, s));
                if in_time && may_hold {
                    out.push(Candidate {
                        segment_first: seg.first_seq,
                        path: seg.path.clone(),
                        meta: b.clone(),
                    });
                }
            }
        }
        out
    }
}

/// Writes a segment's sidecar durably; returns its size.
fn write_sidecar(dir: &Path, seg: &Segment) -> Result<u64, ProvenanceError> {
    let index = SegmentIndex {
        segment_len: seg.len,
        blocks: seg.blocks.iter().map(|b| (**b).clone()).collect(),
    };
    let path = segment::index_path(dir, seg.first_seq);
    segment::write_index(&path, &index)?;
    sync_dir(dir)?;
    Ok(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0))
}
