//! Feeds arbitrary bytes as the server's side of one NBD request's reply (simple reply
//! or structured chunks) to the parser the client's reader uses. It must never panic or
//! allocate beyond the request, and whatever it accepts must satisfy the reply's rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_blockdev::nbd::proto::{parse_reply, Command, Expect, ReplyError, ReplyOutput};

const COOKIE: u64 = 0x0102_0304_0506_0708;

fuzz_target!(|data: &[u8]| {
    // 8 bytes of request description, then the server's bytes.
    if data.len() < 8 {
        return;
    }
    let (head, stream) = data.split_at(8);
    let cmd = match head[0] % 5 {
        0 => Command::Read,
        1 => Command::BlockStatus,
        2 => Command::Write,
        3 => Command::Flush,
        _ => Command::WriteZeroes,
    };
    let structured = head[0] & 0x80 == 0;
    let offset = u64::from(u16::from_be_bytes([head[1], head[2]])) * 512;
    // Requests up to 1 MiB (the client caps reads at 32 MiB; smaller keeps it fast).
    let len = (u32::from_be_bytes([0, head[3], head[4], head[5]]) % (1 << 20)) + 1;
    let export_size = offset + u64::from(len) + u64::from(u16::from_be_bytes([head[6], head[7]]));
    let expect = Expect {
        cmd,
        offset,
        len,
        structured,
        export_size,
        contexts: vec![1, 2],
        want_context: (cmd == Command::BlockStatus).then_some(2),
    };
    let (res, used) = parse_reply(expect, COOKIE, stream);
    assert!(used <= stream.len());
    match res {
        Ok(ReplyOutput::Data(d)) => {
            assert_eq!(cmd, Command::Read);
            assert_eq!(d.len(), len as usize);
        }
        Ok(ReplyOutput::Extents(e)) => {
            assert_eq!(cmd, Command::BlockStatus);
            assert!(!e.is_empty());
            let mut pos = offset;
            for x in &e {
                assert_eq!(x.offset, pos);
                assert!(x.length > 0);
                pos = x.end();
            }
            assert!(pos <= offset + u64::from(len));
        }
        Ok(ReplyOutput::Done) => {
            assert!(cmd != Command::Read && cmd != Command::BlockStatus);
        }
        Err(ReplyError::Server {
            errno,
            message,
            error_offset,
        }) => {
            assert!(message.chars().count() <= 4096);
            assert!(message.chars().all(|c| !c.is_control()));
            let _ = errno;
            if let Some(o) = error_offset {
                assert!(o >= offset && o < offset + u64::from(len));
            }
        }
        Err(ReplyError::Protocol(m)) => assert!(!m.is_empty()),
    }
});
