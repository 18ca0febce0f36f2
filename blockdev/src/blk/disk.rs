//! The disk weft-blk serves: composed read-only layers under a private write layer,
//! with every guest read recorded to a trace.

use std::sync::Mutex;

use crate::blk::trace::Trace;
use crate::blk::{BlockDevice, DeviceError};
use crate::cow::{BlockState, WriteLayer, BLOCK};
use crate::layers::ComposedImage;

/// Composed layers + write layer + read trace.
pub struct LayeredDisk {
    lower: ComposedImage,
    upper: Option<WriteLayer>,
    trace: Option<Trace>,
    id: String,
    /// Writes (and zeroings) one at a time: a partial block is filled from below
    /// before it is written, and two writers must not fill the same block.
    writes: Mutex<()>,
}

impl LayeredDisk {
    /// A disk reading `lower`, writing into `upper` (read-only without one),
    /// recording reads to `trace`, answering GET_ID with `id`.
    pub fn new(
        lower: ComposedImage,
        upper: Option<WriteLayer>,
        trace: Option<Trace>,
        id: String,
    ) -> LayeredDisk {
        LayeredDisk {
            lower,
            upper,
            trace,
            id,
            writes: Mutex::new(()),
        }
    }

    /// The write layer, if any.
    pub fn upper(&self) -> Option<&WriteLayer> {
        self.upper.as_ref()
    }

    /// The composed layers.
    pub fn lower(&self) -> &ComposedImage {
        &self.lower
    }

    fn read_lower(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.lower
            .read_at(buf, offset)
            .map_err(|e| DeviceError::Io(e.to_string()))
    }

    /// Reads `buf` at `offset` without tracing it.
    fn read_untraced(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let Some(upper) = &self.upper else {
            return self.read_lower(buf, offset);
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / BLOCK;
            let left = (buf.len() - done) as u64;
            let blocks_left = (pos % BLOCK + left).div_ceil(BLOCK);
            let (state, run) = upper.run(b, blocks_left);
            let end = ((b + run) * BLOCK).min(offset + buf.len() as u64);
            let n = (end - pos) as usize;
            let out = &mut buf[done..done + n];
            match state {
                BlockState::Data => upper
                    .read_data(out, pos)
                    .map_err(|e| DeviceError::Io(e.to_string()))?,
                BlockState::Zero => out.fill(0),
                BlockState::Absent => self.read_lower(out, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (callers hold `writes`).
    fn write_locked(&self, upper: &WriteLayer, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let io = |e: crate::cow::Error| DeviceError::Io(e.to_string());
        let end = offset + buf.len() as u64;
        // A head or tail block the write covers only partly, and that the layer does
        // not hold yet, is written whole: what it reads as now, patched with the
        // write. The rest of the write goes in as it is.
        let head = offset / BLOCK;
        let tail = (end - 1) / BLOCK;
        let (mut rest_from, mut rest_to) = (offset, end);
        for b in [head, tail] {
            let (start, stop) = (b * BLOCK, (b + 1) * BLOCK);
            let partial = offset > start || end < stop;
            if partial && upper.run(b, 1).0 != BlockState::Data {
                let mut block = vec![0u8; BLOCK as usize];
                self.read_untraced(&mut block, start)?;
                let from = offset.max(start);
                let to = end.min(stop);
                block[(from - start) as usize..(to - start) as usize]
                    .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
                upper.write_data(&block, start).map_err(io)?;
                if b == head {
                    rest_from = to;
                }
                if b == tail {
                    rest_to = rest_to.min(from);
                }
            }
            if head == tail {
                break;
            }
        }
        if rest_from < rest_to {
            let part = &buf[(rest_from - offset) as usize..(rest_to - offset) as usize];
            upper.write_data(part, rest_from).map_err(io)?;
        }
        Ok(())
    }

    fn zero_locked(&self, upper: &WriteLayer, offset: u64, len: u64) -> Result<(), DeviceError> {
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK);
        let end_full = end / BLOCK;
        if first_full >= end_full {
            return self.write_locked(upper, &vec![0u8; len as usize], offset);
        }
        if offset < first_full * BLOCK {
            let n = first_full * BLOCK - offset;
            self.write_locked(upper, &vec![0u8; n as usize], offset)?;
        }
        upper
            .zero_blocks(first_full, end_full - first_full)
            .map_err(|e| DeviceError::Io(e.to_string()))?;
        if end > end_full * BLOCK {
            let n = end - end_full * BLOCK;
            self.write_locked(upper, &vec![0u8; n as usize], end_full * BLOCK)?;
        }
        Ok(())
    }

    fn upper_or_ro(&self) -> Result<&WriteLayer, DeviceError> {
        self.upper.as_ref().ok_or(DeviceError::ReadOnly)
    }

    /// Flushes the trace (reads recorded so far reach its file).
    pub fn flush_trace(&self) {
        if let Some(t) = &self.trace {
            t.flush();
        }
    }
}

impl BlockDevice for LayeredDisk {
    fn size(&self) -> u64 {
        self.lower.size()
    }

    fn read_only(&self) -> bool {
        self.upper.is_none()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        if let Some(t) = &self.trace {
            t.record(offset, buf.len() as u64);
        }
        self.read_untraced(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let upper = self.upper_or_ro()?;
        if buf.is_empty() {
            return Ok(());
        }
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        self.write_locked(upper, buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let upper = self.upper_or_ro()?;
        if len == 0 {
            return Ok(());
        }
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        self.zero_locked(upper, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        // Discarded ranges read as zeros afterwards (the device says so in its
        // config: write_zeroes_may_unmap), which keeps the guest's view exact.
        self.write_zeroes(offset, len)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.flush_trace();
        match &self.upper {
            Some(u) => u.flush().map_err(|e| DeviceError::Io(e.to_string())),
            None => Ok(()),
        }
    }

    fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{compose, ChunkCache};
    use crate::store::{BlockMap, ChunkStore, Slot, StoreConfig};

    const CHUNK: usize = 64 * 1024;
    const SIZE: usize = 16 * CHUNK + 3 * 512; // a short last chunk, not a whole block

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn lower(dir: &std::path::Path, image: &[u8]) -> (BlockMap, ChunkStore) {
        let store = ChunkStore::create(
            &dir.join("store"),
            None,
            &StoreConfig::with_chunk_size(CHUNK as u32),
            None,
        )
        .unwrap();
        let mut map = BlockMap::new(image.len() as u64, CHUNK as u32);
        for (i, c) in image.chunks(CHUNK).enumerate() {
            if i % 5 != 3 {
                map.slots[i] = Slot::Data(store.put(c).unwrap().id);
            }
        }
        (compose(&[("base", &map, None)]).unwrap(), store)
    }

    fn image_of((map, store): &(BlockMap, ChunkStore)) -> ComposedImage {
        ComposedImage::new(
            map.clone(),
            ChunkCache::new(store.clone(), 4 * CHUNK as u64),
        )
    }

    /// Random reads, writes (aligned or not, within a block or across many), zeroings
    /// and discards against a plain byte array; flushes and reopens of the write layer
    /// in between keep every flushed write.
    #[test]
    fn matches_a_byte_array_model_through_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = vec![0u8; SIZE];
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for b in image.iter_mut() {
            *b = rng.next() as u8;
        }
        let mut model = image.clone();
        // Slots the lower map leaves zero read as zeros.
        for (i, c) in model.chunks_mut(CHUNK).enumerate() {
            if i % 5 == 3 {
                c.fill(0);
            }
        }
        let cow = dir.path().join("cow");
        let base = lower(dir.path(), &image);
        let open = || {
            LayeredDisk::new(
                image_of(&base),
                Some(WriteLayer::open(&cow, SIZE as u64).unwrap()),
                None,
                "t".into(),
            )
        };
        let mut disk = open();
        for round in 0..600 {
            let off = rng.below(SIZE as u64);
            let max = (SIZE as u64 - off).min(3 * BLOCK + 700);
            let len = 1 + rng.below(max);
            match rng.below(10) {
                0..=3 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    disk.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                4 => {
                    disk.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                5 => {
                    disk.discard(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    let mut buf = vec![0u8; len as usize];
                    disk.read_at(&mut buf, off).unwrap();
                    assert_eq!(
                        buf,
                        &model[off as usize..(off + len) as usize],
                        "round {round}"
                    );
                }
            }
            if round % 97 == 96 {
                disk.flush().unwrap();
                drop(disk);
                disk = open();
            }
        }
        let mut all = vec![0u8; SIZE];
        disk.read_at(&mut all, 0).unwrap();
        assert!(all == model, "whole disk differs from the model");
    }

    #[test]
    fn a_disk_without_a_write_layer_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let image = vec![5u8; SIZE];
        let base = lower(dir.path(), &image);
        let disk = LayeredDisk::new(image_of(&base), None, None, "ro".into());
        assert!(disk.read_only());
        assert_eq!(disk.write_at(&[1; 512], 0), Err(DeviceError::ReadOnly));
        assert_eq!(disk.discard(0, 512), Err(DeviceError::ReadOnly));
        let mut buf = vec![0u8; 512];
        disk.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![5u8; 512]);
    }
}
