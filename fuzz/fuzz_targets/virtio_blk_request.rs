//! A guest controls every byte of a virtio-blk request: the descriptor chain (addresses,
//! lengths, flags, indirect tables) and the memory it points at (header, segments).
//! `weft_blockdev::blk::request::process` must never panic, never write more than the
//! chain's device-writable bytes, never touch the disk outside its size, and answer
//! with a defined status whenever the chain has a writable byte for one.
//!
//! Input: up to 8 descriptors of 12 bytes (addr u32, len u32 clamped to 64 KiB,
//! flags u16, next u16), then the bytes copied into guest memory at 0x10000.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use weft_blockdev::blk::request::{process, S_IOERR, S_OK, S_UNSUPP};
use weft_blockdev::blk::{BlockDevice, DeviceError};

const MEM: usize = 1 << 20;
const DISK: usize = 256 * 1024;

struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    fn check(&self, offset: u64, len: u64) {
        assert!(
            offset + len <= DISK as u64,
            "access past the disk: {offset}+{len}"
        );
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        DISK as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.check(offset, buf.len() as u64);
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.check(offset, buf.len() as u64);
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check(offset, len);
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn id(&self) -> &str {
        "fuzz"
    }
}

fuzz_target!(|data: &[u8]| {
    let n = (data.first().copied().unwrap_or(0) % 8) as usize + 1;
    let Some(descs) = data.get(1..1 + n * 12) else {
        return;
    };
    let payload = &data[1 + n * 12..];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(
        &payload[..payload.len().min(MEM - 0x10000)],
        GuestAddress(0x10000),
    )
    .unwrap();
    let raw: Vec<RawDescriptor> = descs
        .chunks_exact(12)
        .map(|d| {
            let addr = u32::from_le_bytes(d[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(d[4..8].try_into().unwrap()) % (64 * 1024 + 1);
            let flags = u16::from_le_bytes(d[8..10].try_into().unwrap());
            let next = u16::from_le_bytes(d[10..12].try_into().unwrap());
            RawDescriptor::from(SplitDescriptor::new(u64::from(addr), len, flags, next))
        })
        .collect();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
    if vq.add_desc_chains(&raw, 0).is_err() {
        return;
    }
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return;
    };
    let Ok(mut iter) = q.iter(&mem) else {
        return;
    };
    let Some(chain) = iter.next() else {
        return;
    };
    let writable: u64 = chain
        .clone()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    let dev = MemDisk(Mutex::new(vec![0x5a; DISK]));
    let out = process(chain, &dev);
    assert!(
        u64::from(out.used) <= writable,
        "used {} > writable {writable}",
        out.used
    );
    if let Some(s) = out.status {
        assert!([S_OK, S_IOERR, S_UNSUPP].contains(&s), "status {s}");
    }
});
