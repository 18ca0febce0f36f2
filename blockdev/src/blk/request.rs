//! virtio-blk requests (virtio 1.2, 5.2.6) from descriptor chains.
//!
//! A request is a 16-byte header the device reads (type, reserved, sector), data
//! (read by the device for writes, written for reads), then one status byte the
//! device writes. Everything in a chain comes from the guest and is checked: sizes
//! against the disk and [`MAX_REQUEST_BYTES`], sector alignment, segment counts; a
//! malformed chain gets `VIRTIO_BLK_S_IOERR` (or is dropped with no status when it
//! has no writable byte to put one in), never a panic.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemory;

use super::BlockDevice;

/// Bytes per virtio-blk sector.
pub const SECTOR: u64 = 512;
/// Largest data part of one request the device accepts.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Segments of one discard or write-zeroes request.
pub const MAX_SEGMENTS: u32 = 64;
/// Sectors of one discard or write-zeroes segment.
pub const MAX_SEGMENT_SECTORS: u32 = 1 << 22;
/// Length of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Device id.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;

/// Status: done.
pub const S_OK: u8 = 0;
/// Status: failed.
pub const S_IOERR: u8 = 1;
/// Status: not supported.
pub const S_UNSUPP: u8 = 2;

/// What happened to one request (for counters and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Request type (`u32::MAX` when the header could not be read).
    pub kind: u32,
    /// The status sent (`None`: the chain had no room for one).
    pub status: Option<u8>,
    /// Bytes the device wrote into the chain (the used length).
    pub used: u32,
}

/// Executes the request in `chain` against `dev`; returns what to put in the used ring.
pub fn process<T>(chain: DescriptorChain<T>, dev: &dyn BlockDevice) -> Outcome
where
    T: Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let mem = chain.memory();
    let (Ok(mut reader), Ok(mut writer)) = (
        Reader::new(mem, chain.clone()),
        Writer::new(mem, chain.clone()),
    ) else {
        return Outcome {
            kind: u32::MAX,
            status: None,
            used: 0,
        };
    };
    let avail = writer.available_bytes();
    if avail == 0 {
        // No room for a status byte: nothing can be reported; the chain is returned.
        return Outcome {
            kind: u32::MAX,
            status: None,
            used: 0,
        };
    }
    let Ok(mut status_w) = writer.split_at(avail - 1) else {
        return Outcome {
            kind: u32::MAX,
            status: None,
            used: 0,
        };
    };
    let mut header = [0u8; 16];
    let (kind, status, data_written) = match reader.read_exact(&mut header) {
        Err(_) => (u32::MAX, S_IOERR, 0),
        Ok(()) => {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            let (status, written) = execute(kind, sector, &mut reader, &mut writer, dev);
            (kind, status, written)
        }
    };
    let status_ok = status_w.write_all(&[status]).is_ok();
    Outcome {
        kind,
        status: status_ok.then_some(status),
        used: (data_written + usize::from(status_ok)) as u32,
    }
}

/// Runs `f` on a `len`-byte buffer of this thread, kept from one request to the next:
/// a fresh 1 MiB vector per request cost a page fault per 4 KiB. `f` must fill what it
/// hands on (a device read fills the whole buffer or fails; a guest read is exact).
fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            f(&mut buf[..len])
        }
        // Re-entered on this thread (not done today): a buffer of its own.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// The byte range of `len` bytes from `sector`, if it lies within the disk.
fn range(sector: u64, len: u64, size: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR)?;
    (offset.checked_add(len)? <= size).then_some(offset)
}

fn execute<B: vm_memory::bitmap::BitmapSlice>(
    kind: u32,
    sector: u64,
    reader: &mut Reader<'_, B>,
    writer: &mut Writer<'_, B>,
    dev: &dyn BlockDevice,
) -> (u8, usize) {
    match kind {
        T_IN => {
            let len = writer.available_bytes();
            if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR) {
                return (S_IOERR, 0);
            }
            let Some(offset) = range(sector, len as u64, dev.size()) else {
                return (S_IOERR, 0);
            };
            with_buffer(len, |buf| {
                if dev.read_at(buf, offset).is_err() {
                    return (S_IOERR, 0);
                }
                match writer.write_all(buf) {
                    Ok(()) => (S_OK, len),
                    Err(_) => (S_IOERR, writer.bytes_written()),
                }
            })
        }
        T_OUT => {
            if dev.read_only() {
                return (S_IOERR, 0);
            }
            let len = reader.available_bytes();
            if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR) {
                return (S_IOERR, 0);
            }
            let Some(offset) = range(sector, len as u64, dev.size()) else {
                return (S_IOERR, 0);
            };
            with_buffer(len, |buf| {
                if reader.read_exact(buf).is_err() {
                    return (S_IOERR, 0);
                }
                (status_of(dev.write_at(buf, offset)), 0)
            })
        }
        T_FLUSH => (status_of(dev.flush()), 0),
        T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let bytes = dev.id().as_bytes();
            let n = bytes.len().min(ID_BYTES);
            id[..n].copy_from_slice(&bytes[..n]);
            let n = writer.available_bytes().min(ID_BYTES);
            match writer.write_all(&id[..n]) {
                Ok(()) => (S_OK, n),
                Err(_) => (S_IOERR, 0),
            }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if dev.read_only() {
                return (S_IOERR, 0);
            }
            let len = reader.available_bytes();
            let segments = len / 16;
            if !len.is_multiple_of(16) || segments == 0 || segments > MAX_SEGMENTS as usize {
                return (S_IOERR, 0);
            }
            for _ in 0..segments {
                let mut seg = [0u8; 16];
                if reader.read_exact(&mut seg).is_err() {
                    return (S_IOERR, 0);
                }
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
                // Only the unmap flag (bit 0, write-zeroes) is defined.
                if flags & !1 != 0 || sectors > MAX_SEGMENT_SECTORS {
                    return (S_UNSUPP, 0);
                }
                let len = u64::from(sectors) * SECTOR;
                let Some(offset) = range(sector, len, dev.size()) else {
                    return (S_IOERR, 0);
                };
                let res = if kind == T_DISCARD {
                    dev.discard(offset, len)
                } else {
                    dev.write_zeroes(offset, len)
                };
                if res.is_err() {
                    return (S_IOERR, 0);
                }
            }
            (S_OK, 0)
        }
        _ => (S_UNSUPP, 0),
    }
}

fn status_of(r: Result<(), super::DeviceError>) -> u8 {
    match r {
        Ok(()) => S_OK,
        Err(e) => {
            tracing::warn!("weft-blk: request failed: {e}");
            S_IOERR
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::blk::DeviceError;

    /// An in-memory disk (a test double of the device, to test request parsing).
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        flushes: Mutex<u32>,
        ro: bool,
    }

    impl MemDisk {
        fn new(size: usize) -> MemDisk {
            MemDisk {
                data: Mutex::new((0..size).map(|i| (i % 251) as u8).collect()),
                flushes: Mutex::new(0),
                ro: false,
            }
        }
    }

    impl BlockDevice for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
            self.write_zeroes(offset, len)
        }
        fn flush(&self) -> Result<(), DeviceError> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
        fn id(&self) -> &str {
            "weft-test-disk-id-that-is-long"
        }
    }

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Builds a chain of (addr, len, device-writable) descriptors on a mock queue,
    /// runs `process`, and returns the outcome and what the used ring says.
    fn run(
        m: &GuestMemoryMmap,
        dev: &dyn BlockDevice,
        descs: &[(u64, u32, bool)],
    ) -> (Outcome, u32) {
        let vq = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(m).unwrap().next().unwrap();
        let head = chain.head_index();
        let out = process(chain, dev);
        q.add_used(m, head, out.used).unwrap();
        let used_len: u32 = m.read_obj(vq.used_addr().unchecked_add(4 + 4)).unwrap();
        (out, used_len)
    }

    fn status(m: &GuestMemoryMmap) -> u8 {
        m.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn read_spans_descriptors_and_reports_its_length() {
        let m = mem();
        let dev = MemDisk::new(1 << 20);
        header(&m, T_IN, 8);
        let (out, used) = run(
            &m,
            &dev,
            &[
                (HDR, 16, false),
                (DATA, 512, true),
                (DATA + 0x1000, 1024, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!((out.status, used), (Some(S_OK), 1537));
        let mut got = vec![0u8; 1536];
        m.read_slice(&mut got[..512], GuestAddress(DATA)).unwrap();
        m.read_slice(&mut got[512..], GuestAddress(DATA + 0x1000))
            .unwrap();
        let want: Vec<u8> = (4096..4096 + 1536).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn write_then_flush_reach_the_device() {
        let m = mem();
        let dev = MemDisk::new(1 << 20);
        m.write_slice(&[0xaa; 1024], GuestAddress(DATA)).unwrap();
        header(&m, T_OUT, 2);
        let (out, used) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
        );
        assert_eq!((out.status, used), (Some(S_OK), 1));
        assert!(dev.data.lock().unwrap()[1024..2048]
            .iter()
            .all(|&b| b == 0xaa));
        header(&m, T_FLUSH, 0);
        let (out, _) = run(&m, &dev, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(out.status, Some(S_OK));
        assert_eq!(*dev.flushes.lock().unwrap(), 1);
    }

    #[test]
    fn requests_past_the_end_unaligned_or_too_big_fail() {
        let m = mem();
        let dev = MemDisk::new(1 << 20);
        // Past the end.
        header(&m, T_IN, (1 << 20) / 512);
        let (out, used) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        assert_eq!((out.status, used), (Some(S_IOERR), 1));
        assert_eq!(status(&m), S_IOERR);
        // Sector number overflows.
        header(&m, T_OUT, u64::MAX);
        let (out, _) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(out.status, Some(S_IOERR));
        // Not a whole number of sectors.
        header(&m, T_IN, 0);
        let (out, _) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)],
        );
        assert_eq!(out.status, Some(S_IOERR));
        // Short header.
        let (out, _) = run(&m, &dev, &[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!(out.status, Some(S_IOERR));
        // Unknown type.
        header(&m, 99, 0);
        let (out, _) = run(&m, &dev, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(out.status, Some(S_UNSUPP));
        // No writable byte for a status: nothing written, nothing panics.
        header(&m, T_IN, 0);
        let (out, used) = run(&m, &dev, &[(HDR, 16, false)]);
        assert_eq!((out.status, used), (None, 0));
        // A descriptor outside guest memory.
        let (out, _) = run(
            &m,
            &dev,
            &[
                (HDR, 16, false),
                (0x1_0000_0000, 512, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(out.status, None);
    }

    #[test]
    fn read_only_devices_refuse_writes() {
        let m = mem();
        let mut dev = MemDisk::new(1 << 20);
        dev.ro = true;
        header(&m, T_OUT, 0);
        let (out, _) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(out.status, Some(S_IOERR));
        assert_eq!(dev.data.lock().unwrap()[0], 0);
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let m = mem();
        let dev = MemDisk::new(1 << 20);
        header(&m, T_GET_ID, 0);
        let (out, used) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
        );
        assert_eq!((out.status, used), (Some(S_OK), 21));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"weft-test-disk-id-th");

        let seg = |sector: u64, n: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&n.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            s
        };
        let mut segs = seg(1, 2, 0).to_vec();
        segs.extend_from_slice(&seg(10, 1, 1));
        m.write_slice(&segs, GuestAddress(DATA)).unwrap();
        header(&m, T_WRITE_ZEROES, 0);
        let (out, _) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)],
        );
        assert_eq!(out.status, Some(S_OK));
        {
            let d = dev.data.lock().unwrap();
            assert!(d[512..1536].iter().all(|&b| b == 0));
            assert!(d[5120..5632].iter().all(|&b| b == 0));
            assert_ne!(d[1536], 0);
        }
        // Unknown flags, a segment past the end, a partial segment.
        m.write_slice(&seg(0, 1, 2), GuestAddress(DATA)).unwrap();
        header(&m, T_DISCARD, 0);
        let (out, _) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
        );
        assert_eq!(out.status, Some(S_UNSUPP));
        m.write_slice(&seg(2047, 2, 0), GuestAddress(DATA)).unwrap();
        let (out, _) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
        );
        assert_eq!(out.status, Some(S_IOERR));
        let (out, _) = run(
            &m,
            &dev,
            &[(HDR, 16, false), (DATA, 10, false), (STATUS, 1, true)],
        );
        assert_eq!(out.status, Some(S_IOERR));
    }
}
