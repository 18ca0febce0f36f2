//! Feeds arbitrary bytes to the DPA frame decoder as a guest would send them (split
//! into reads of a size the input chooses), and each frame kind's payload decoder
//! directly. Nothing may panic, the decoder must stay bounded, and whatever it
//! accepts must re-encode to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_dpa::proto::{
    decode_payload, encode, Decoder, Message, HEADER, LIMITS, MAX_PAYLOAD, TRAILER,
};

fn roundtrip(msg: &Message) {
    let mut d = Decoder::new();
    d.feed(&encode(msg));
    let again = d
        .next_message()
        .expect("an accepted message re-encodes to a valid frame");
    assert_eq!(again.as_ref(), Some(msg));
    assert_eq!(d.pending(), 0);
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    // The stream, in reads of 1 to 256 bytes.
    let read = usize::from(first) + 1;
    let mut d = Decoder::new();
    'stream: for chunk in body.chunks(read) {
        d.feed(chunk);
        loop {
            match d.next_message() {
                Ok(Some(msg)) => roundtrip(&msg),
                Ok(None) => break,
                // The connection would close here: nothing is resynchronised.
                Err(_) => break 'stream,
            }
        }
        // At most one incomplete frame plus one read is held.
        assert!(d.pending() <= HEADER + MAX_PAYLOAD + TRAILER + read);
        if let Ok(wanted) = d.wanted() {
            assert!(wanted <= HEADER + MAX_PAYLOAD + TRAILER);
        }
    }
    // Each kind's payload decoder (known kinds and a few unknown ones).
    for kind in 0..=8u8 {
        if let Ok(msg) = decode_payload(kind, body, &LIMITS) {
            roundtrip(&msg);
        }
    }
});
