//! The handshake: fixed newstyle negotiation, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_GO` (with the `NBD_OPT_EXPORT_NAME` fallback),
//! and the block size constraints the server announces.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;
use super::Error;

/// Largest option reply payload accepted during the handshake. Replies are small
/// (an info item, a context name of at most 4 KiB, an error message); anything bigger
/// is a broken or hostile server.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// The server's block size constraints (`NBD_INFO_BLOCK_SIZE`, or the protocol's
/// defaults when the server sent none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Requests must be aligned to this (a power of two, at most 64 KiB).
    pub minimum: u32,
    /// Requests of this size and alignment are efficient.
    pub preferred: u32,
    /// Largest payload of a read or write.
    pub maximum: u32,
}
/// What the handshake learnt.
pub(super) struct Negotiated {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) block: Option<BlockSize>,
    pub(super) structured: bool,
    pub(super) contexts: Vec<(u32, String)>,
}
fn hs_io(step: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Handshake(format!("server closed the connection {step}"))
        } else {
            Error::io(format!("handshake: {step}"), e)
        }
    }
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), Error> {
    let step = format!("sending {}", option_name(option));
    let len = u32::try_from(data.len())
        .map_err(|_| Error::Handshake(format!("{} data too long", option_name(option))))?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.map_err(hs_io(&step))?;
    s.flush().await.map_err(hs_io(&step))
}

struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<OptReply, Error> {
    let step = format!("reading the reply to {}", option_name(option));
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.map_err(hs_io(&step))?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if magic != OPTION_REPLY_MAGIC {
        return Err(Error::Handshake(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    if opt != option {
        return Err(Error::Handshake(format!(
            "reply to option {opt} while waiting for {}",
            option_name(option)
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(Error::Handshake(format!(
            "reply to {} of {len} bytes",
            option_name(option)
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.map_err(hs_io(&step))?;
    if kind & NBD_REP_FLAG_ERROR != 0 {
        let message = sanitize_message(&data);
        return Err(Error::OptionRefused {
            option: option_name(option),
            code: kind,
            message: if message.is_empty() {
                "no message".into()
            } else {
                message
            },
        });
    }
    Ok(OptReply { kind, data })
}

fn put_str(b: &mut Vec<u8>, s: &str) -> Result<(), Error> {
    if s.len() > MAX_MESSAGE {
        return Err(Error::Handshake(format!(
            "string of {} bytes is longer than the protocol's 4096",
            s.len()
        )));
    }
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    Ok(())
}

pub(super) async fn handshake<S>(
    s: &mut S,
    export: &str,
    meta_contexts: &[&str],
) -> Result<Negotiated, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = [0u8; 18];
    s.read_exact(&mut h[..16])
        .await
        .map_err(hs_io("reading the greeting"))?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    let second = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(Error::Handshake(format!(
            "not an nbd server (greeting magic {magic:#x})"
        )));
    }
    if second == CLISERV_MAGIC {
        return Err(Error::Handshake(
            "server uses oldstyle negotiation, which has no options".into(),
        ));
    }
    if second != IHAVEOPT {
        return Err(Error::Handshake(format!("bad newstyle magic {second:#x}")));
    }
    s.read_exact(&mut h[16..18])
        .await
        .map_err(hs_io("reading the handshake flags"))?;
    let hflags = u16::from_be_bytes([h[16], h[17]]);
    if hflags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Handshake(
            "server does not support fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = hflags & NBD_FLAG_NO_ZEROES != 0;
    let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= NBD_FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(hs_io("sending client flags"))?;

    // Structured replies: required for block status, preferred for reads.
    send_option(s, NBD_OPT_STRUCTURED_REPLY, &[]).await?;
    let structured = match read_option_reply(s, NBD_OPT_STRUCTURED_REPLY).await {
        Ok(r) if r.kind == NBD_REP_ACK => true,
        Ok(r) => {
            return Err(Error::Handshake(format!(
                "unexpected reply {} to NBD_OPT_STRUCTURED_REPLY",
                r.kind
            )))
        }
        Err(Error::OptionRefused { code, .. })
            if code == (NBD_REP_FLAG_ERROR | 1) && meta_contexts.is_empty() =>
        {
            false
        }
        Err(e) => return Err(e),
    };

    let mut contexts = Vec::new();
    if !meta_contexts.is_empty() {
        let mut d = Vec::new();
        put_str(&mut d, export)?;
        d.extend_from_slice(&(meta_contexts.len() as u32).to_be_bytes());
        for c in meta_contexts {
            put_str(&mut d, c)?;
        }
        send_option(s, NBD_OPT_SET_META_CONTEXT, &d).await?;
        loop {
            let r = read_option_reply(s, NBD_OPT_SET_META_CONTEXT).await?;
            match r.kind {
                NBD_REP_ACK => break,
                NBD_REP_META_CONTEXT if r.data.len() >= 4 => {
                    let id = u32::from_be_bytes(r.data[0..4].try_into().unwrap_or_default());
                    let name = String::from_utf8(r.data[4..].to_vec())
                        .map_err(|_| Error::Handshake("meta context name is not utf-8".into()))?;
                    if contexts.iter().any(|(i, _)| *i == id) {
                        return Err(Error::Handshake(format!(
                            "meta context id {id} given twice"
                        )));
                    }
                    if contexts.len() >= meta_contexts.len() {
                        return Err(Error::Handshake(
                            "more meta contexts granted than requested".into(),
                        ));
                    }
                    contexts.push((id, name));
                }
                k => {
                    return Err(Error::Handshake(format!(
                        "unexpected reply {k} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
        for want in meta_contexts {
            if !contexts.iter().any(|(_, n)| n == want) {
                return Err(Error::ContextNotGranted((*want).to_string()));
            }
        }
    }

    // NBD_OPT_GO, asking for block size constraints.
    let mut d = Vec::new();
    put_str(&mut d, export)?;
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, NBD_OPT_GO, &d).await?;
    let mut export_info = None;
    let mut block = None;
    loop {
        let r = match read_option_reply(s, NBD_OPT_GO).await {
            Ok(r) => r,
            Err(Error::OptionRefused { code, .. }) if code == (NBD_REP_FLAG_ERROR | 1) => {
                // A server older than NBD_OPT_GO: the protocol says fall back.
                let (size, flags) = export_name_fallback(s, export, no_zeroes).await?;
                return Ok(Negotiated {
                    size,
                    flags,
                    block: None,
                    structured,
                    contexts,
                });
            }
            Err(Error::OptionRefused {
                option,
                code,
                message,
            }) if code == (NBD_REP_FLAG_ERROR | 6) => {
                return Err(Error::OptionRefused {
                    option,
                    code,
                    message: format!("export {export:?}: {message}"),
                });
            }
            Err(e) => return Err(e),
        };
        match r.kind {
            NBD_REP_ACK => break,
            NBD_REP_INFO => {
                if r.data.len() < 2 {
                    return Err(Error::Handshake("NBD_REP_INFO shorter than 2 bytes".into()));
                }
                let d = &r.data;
                match u16::from_be_bytes([d[0], d[1]]) {
                    NBD_INFO_EXPORT => {
                        if d.len() != 12 {
                            return Err(Error::Handshake(format!(
                                "NBD_INFO_EXPORT of {} bytes",
                                d.len()
                            )));
                        }
                        let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                        let flags = u16::from_be_bytes([d[10], d[11]]);
                        export_info = Some((size, flags));
                    }
                    NBD_INFO_BLOCK_SIZE => {
                        if d.len() != 14 {
                            return Err(Error::Handshake(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes",
                                d.len()
                            )));
                        }
                        let v = |i: usize| {
                            u32::from_be_bytes(d[i..i + 4].try_into().unwrap_or_default())
                        };
                        block = Some(check_block_size(BlockSize {
                            minimum: v(2),
                            preferred: v(6),
                            maximum: v(10),
                        })?);
                    }
                    _ => {} // NBD_INFO_NAME, NBD_INFO_DESCRIPTION, future ones: ignored.
                }
            }
            k => {
                return Err(Error::Handshake(format!(
                    "unexpected reply {k} to NBD_OPT_GO"
                )))
            }
        }
    }
    let (size, flags) = export_info
        .ok_or_else(|| Error::Handshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()))?;
    Ok(Negotiated {
        size,
        flags,
        block,
        structured,
        contexts,
    })
}

/// Ends option haggling politely after a refusal: `NBD_OPT_ABORT`, then wait briefly
/// for the server's acknowledgement (or its close) so it does not log a broken pipe.
pub(super) async fn abort<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    if send_option(s, NBD_OPT_ABORT, &[]).await.is_ok() {
        let wait = read_option_reply(s, NBD_OPT_ABORT);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), wait).await;
    }
    let _ = s.shutdown().await;
}

fn check_block_size(b: BlockSize) -> Result<BlockSize, Error> {
    let ok = b.minimum.is_power_of_two()
        && b.minimum <= 64 * 1024
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum
        && b.maximum >= b.minimum;
    if ok {
        Ok(b)
    } else {
        Err(Error::Handshake(format!(
            "invalid block size constraints: minimum {}, preferred {}, maximum {}",
            b.minimum, b.preferred, b.maximum
        )))
    }
}

async fn export_name_fallback<S>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, NBD_OPT_EXPORT_NAME, export.as_bytes()).await?;
    let step = "reading the reply to NBD_OPT_EXPORT_NAME";
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { b.len() };
    s.read_exact(&mut b[..n]).await.map_err(hs_io(step))?;
    let size = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
    let flags = u16::from_be_bytes([b[8], b[9]]);
    Ok((size, flags))
}
