//! The NBD client against a scripted, misbehaving server on an in-memory pipe: refused
//! options, protocol violations, a peer that vanishes mid-reply, cancelled requests.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use weft_blockdev::nbd::proto::*;
use weft_blockdev::nbd::{Error, NbdClient};

const SIZE: u64 = 1 << 20;

async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let opt = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut d = vec![0; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, d)
}

async fn reply(s: &mut DuplexStream, opt: u32, kind: u32, data: &[u8]) {
    s.write_u64(OPTION_REPLY_MAGIC).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(kind).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
}

/// Plays a well-behaved server up to transmission, unless `refuse_go` is given.
async fn serve_handshake(mut s: DuplexStream, refuse_go: Option<(u32, &str)>) -> DuplexStream {
    s.write_u64(NBDMAGIC).await.unwrap();
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        .await
        .unwrap();
    let cflags = s.read_u32().await.unwrap();
    assert_eq!(cflags, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    loop {
        let (opt, data) = read_option(&mut s).await;
        match opt {
            NBD_OPT_STRUCTURED_REPLY => reply(&mut s, opt, NBD_REP_ACK, &[]).await,
            NBD_OPT_SET_META_CONTEXT => {
                // Grants base:allocation only, whatever else was asked.
                let asked = String::from_utf8_lossy(&data).contains("base:allocation");
                if asked {
                    let mut d = 5u32.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    reply(&mut s, opt, NBD_REP_META_CONTEXT, &d).await;
                }
                reply(&mut s, opt, NBD_REP_ACK, &[]).await;
            }
            NBD_OPT_GO => {
                if let Some((code, msg)) = refuse_go {
                    reply(&mut s, opt, code, msg.as_bytes()).await;
                    continue;
                }
                let mut d = NBD_INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY).to_be_bytes());
                reply(&mut s, opt, NBD_REP_INFO, &d).await;
                let mut b = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [512u32, 4096, 1 << 20] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                reply(&mut s, opt, NBD_REP_INFO, &b).await;
                reply(&mut s, opt, NBD_REP_ACK, &[]).await;
                return s;
            }
            NBD_OPT_ABORT => {
                reply(&mut s, opt, NBD_REP_ACK, &[]).await;
                return s;
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

async fn connect(contexts: &'static [&'static str]) -> (NbdClient, DuplexStream) {
    let (c, s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve_handshake(s, None));
    let client = NbdClient::connect_stream(c, "exp", contexts).await.unwrap();
    (client, server.await.unwrap())
}

/// Reads one request header: (type, cookie, offset, len).
async fn read_request(s: &mut DuplexStream) -> (u16, u64, u64, u32) {
    assert_eq!(s.read_u32().await.unwrap(), NBD_REQUEST_MAGIC);
    let _flags = s.read_u16().await.unwrap();
    let kind = s.read_u16().await.unwrap();
    (
        kind,
        s.read_u64().await.unwrap(),
        s.read_u64().await.unwrap(),
        s.read_u32().await.unwrap(),
    )
}

async fn chunk(s: &mut DuplexStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    s.write_u32(NBD_STRUCTURED_REPLY_MAGIC).await.unwrap();
    s.write_u16(flags).await.unwrap();
    s.write_u16(kind).await.unwrap();
    s.write_u64(cookie).await.unwrap();
    s.write_u32(payload.len() as u32).await.unwrap();
    s.write_all(payload).await.unwrap();
}

async fn data_chunk(s: &mut DuplexStream, done: bool, cookie: u64, offset: u64, data: &[u8]) {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    chunk(s, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &p).await;
}

fn within<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(5), f)
}

#[tokio::test]
async fn handshake_negotiates_and_reports_refusals() {
    let (c, _s) = connect(&["base:allocation"]).await;
    assert_eq!(c.size(), SIZE);
    assert!(c.is_read_only());
    assert_eq!(c.contexts(), &[(5, "base:allocation".to_string())]);
    assert_eq!(c.block_size().minimum, 512);
    assert_eq!(c.max_request(), 1 << 20);

    // A context the server does not grant.
    let (cl, s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve_handshake(s, None));
    let err = NbdClient::connect_stream(cl, "exp", &["base:allocation", "qemu:dirty-bitmap:x"])
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::ContextNotGranted(n) if n == "qemu:dirty-bitmap:x"));
    within(server).await.unwrap().unwrap(); // the client sent NBD_OPT_ABORT

    // NBD_OPT_GO refused: the server's message reaches the caller.
    let (cl, s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve_handshake(
        s,
        Some((NBD_REP_FLAG_ERROR | 2, "not for you\n")),
    ));
    let err = NbdClient::connect_stream(cl, "exp", &[]).await.unwrap_err();
    match &err {
        Error::OptionRefused {
            option,
            code,
            message,
        } => {
            assert_eq!(*option, "NBD_OPT_GO");
            assert_eq!(*code, NBD_REP_FLAG_ERROR | 2);
            assert_eq!(message, "not for you");
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("NBD_REP_ERR_POLICY"));
    within(server).await.unwrap().unwrap();

    // Not an NBD server at all.
    let (cl, mut s) = tokio::io::duplex(1 << 16);
    s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        .await
        .unwrap();
    let err = NbdClient::connect_stream(cl, "exp", &[]).await.unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err}");

    // Closed during the handshake.
    let (cl, s) = tokio::io::duplex(1 << 16);
    drop(s);
    let err = NbdClient::connect_stream(cl, "exp", &[]).await.unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err}");
}

#[tokio::test]
async fn protocol_violation_fails_every_pending_request() {
    let (c, mut s) = connect(&[]).await;
    let a = tokio::spawn({
        let c = c.clone();
        async move { c.read(0, 512).await.map(|d| d.len()) }
    });
    let b = tokio::spawn({
        let c = c.clone();
        async move { c.read(4096, 512).await.map(|d| d.len()) }
    });
    let (_, k1, _, _) = read_request(&mut s).await;
    let (_, _k2, _, _) = read_request(&mut s).await;
    // A chunk type without the error bit that no one negotiated.
    chunk(&mut s, NBD_REPLY_FLAG_DONE, 42, k1, &[]).await;
    let (ra, rb) = (
        within(a).await.unwrap().unwrap(),
        within(b).await.unwrap().unwrap(),
    );
    let msgs: Vec<String> = [ra, rb]
        .into_iter()
        .map(|r| match r {
            Err(Error::Protocol(m)) => m,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        msgs.iter().any(|m| m.contains("unknown chunk type 42")),
        "{msgs:?}"
    );
    // The connection is closed for good.
    assert!(matches!(c.read(0, 512).await, Err(Error::Protocol(_))));
    // And the client closed its side.
    let mut rest = Vec::new();
    within(s.read_to_end(&mut rest)).await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_chunk_is_refused_before_reading_it() {
    let (c, mut s) = connect(&[]).await;
    let r = tokio::spawn(async move { c.read(0, 512).await.map(|d| d.len()) });
    let (_, k, _, _) = read_request(&mut s).await;
    // Claims a 4 GiB payload for a 512-byte read, and sends none of it.
    s.write_u32(NBD_STRUCTURED_REPLY_MAGIC).await.unwrap();
    s.write_u16(NBD_REPLY_FLAG_DONE).await.unwrap();
    s.write_u16(NBD_REPLY_TYPE_OFFSET_DATA).await.unwrap();
    s.write_u64(k).await.unwrap();
    s.write_u32(u32::MAX).await.unwrap();
    match within(r).await.unwrap().unwrap() {
        Err(Error::Protocol(m)) => assert!(m.contains("data chunk with length"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn peer_closing_mid_reply_is_disconnected() {
    let (c, mut s) = connect(&[]).await;
    let r = tokio::spawn({
        let c = c.clone();
        async move { c.read(0, 4096).await.map(|d| d.len()) }
    });
    let (_, k, _, _) = read_request(&mut s).await;
    // Half of a data chunk, then gone.
    s.write_u32(NBD_STRUCTURED_REPLY_MAGIC).await.unwrap();
    s.write_u16(NBD_REPLY_FLAG_DONE).await.unwrap();
    s.write_u16(NBD_REPLY_TYPE_OFFSET_DATA).await.unwrap();
    s.write_u64(k).await.unwrap();
    s.write_u32(8 + 4096).await.unwrap();
    s.write_u64(0).await.unwrap();
    s.write_all(&[1; 100]).await.unwrap();
    drop(s);
    assert!(matches!(
        within(r).await.unwrap().unwrap(),
        Err(Error::Disconnected)
    ));
    assert!(matches!(c.read(0, 512).await, Err(Error::Disconnected)));
}

#[tokio::test]
async fn server_errors_keep_the_connection_and_cancelled_reads_do_not_desync() {
    let (c, mut s) = connect(&["base:allocation"]).await;

    // A read whose caller gives up before the reply arrives.
    let fut = c.read(0, 512);
    let cancelled = tokio::time::timeout(Duration::from_millis(50), fut).await;
    assert!(cancelled.is_err());
    let (_, k1, _, _) = read_request(&mut s).await;

    let r = tokio::spawn({
        let c = c.clone();
        async move { c.read(1024, 1024).await }
    });
    let (_, k2, _, _) = read_request(&mut s).await;
    // Reply to the live request first, in two chunks, then to the abandoned one.
    data_chunk(&mut s, false, k2, 1536, &[2; 512]).await;
    data_chunk(&mut s, true, k2, 1024, &[1; 512]).await;
    data_chunk(&mut s, true, k1, 0, &[9; 512]).await;
    let got = within(r).await.unwrap().unwrap().unwrap();
    assert_eq!(&got[..512], &[1; 512][..]);
    assert_eq!(&got[512..], &[2; 512][..]);

    // An error chunk fails that request only.
    let r = tokio::spawn({
        let c = c.clone();
        async move { c.block_status(0, 4096, "base:allocation").await }
    });
    let (kind, k3, _, _) = read_request(&mut s).await;
    assert_eq!(kind, 7);
    let mut p = NBD_EIO.to_be_bytes().to_vec();
    p.extend_from_slice(&5u16.to_be_bytes());
    p.extend_from_slice(b"oops!");
    chunk(&mut s, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, k3, &p).await;
    match within(r).await.unwrap().unwrap() {
        Err(Error::Server {
            op,
            errno,
            message,
            offset,
            len,
        }) => {
            assert_eq!((op, errno, offset, len), ("block status", NBD_EIO, 0, 4096));
            assert_eq!(message, "oops!");
        }
        other => panic!("{other:?}"),
    }

    // Still usable: a block status reply with extents.
    let r = tokio::spawn({
        let c = c.clone();
        async move { c.block_status(0, 8192, "base:allocation").await }
    });
    let (_, k4, _, _) = read_request(&mut s).await;
    let mut p = 5u32.to_be_bytes().to_vec();
    for (l, f) in [(4096u32, 0u32), (65536, 3)] {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    chunk(
        &mut s,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        k4,
        &p,
    )
    .await;
    let ext = within(r).await.unwrap().unwrap().unwrap();
    assert_eq!(ext.len(), 2);
    assert_eq!(
        (ext[1].offset, ext[1].length, ext[1].flags),
        (4096, 4096, 3)
    );
}
