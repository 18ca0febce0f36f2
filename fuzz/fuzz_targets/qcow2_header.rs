//! The start of an image a caller hands to weftd → `weft_blockdev::qcow2::parse_header`
//! (what weftd reads before it lets QEMU open a qcow2: backing file, backing format,
//! external data file, feature bits). Never a panic; what it accepts keeps within its
//! bounds: a backing name of at most 1023 bytes that lies in the input, a cluster size
//! QEMU accepts; bytes past the first `MAX_HEADER_BYTES` change nothing; the answers
//! weftd builds from a header (refusal, backing path, format) never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use weft_blockdev::qcow2::{
    parse_header, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_HEADER_BYTES, MIN_CLUSTER_BITS,
};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = parse_header(data) else {
        return;
    };
    assert!(h.version == 2 || h.version == 3);
    assert!((MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits));
    if let Some(b) = &h.backing_file {
        assert!(!b.is_empty() && b.len() <= MAX_BACKING_NAME);
        assert!(b.len() <= data.len());
    }
    for name in [&h.backing_format, &h.data_file].into_iter().flatten() {
        assert!(name.len() < 1 << MAX_CLUSTER_BITS);
    }
    let _ = h.refusal();
    let _ = h.backing_name();
    let _ = h.backing_format_name();
    if let Some(p) = h.backing_path(Path::new("/images/disk.qcow2")) {
        assert!(p.is_absolute());
    }
    if data.len() > MAX_HEADER_BYTES {
        assert_eq!(parse_header(&data[..MAX_HEADER_BYTES]), Ok(h));
    }
});
