//! weft's guest-side data provenance agent (DPA) and the wire protocol it speaks with
//! weftd. The protocol ([`proto`]) is the one both sides link against; the guest is
//! untrusted, so everything weftd reads from it goes through [`proto::Decoder`], which
//! bounds and validates it.

pub mod capture_format;
pub mod jsonptr;
pub mod proto;

#[cfg(feature = "agent")]
pub mod agent;

pub use proto::{DataType, Entry, Error, Message, Operation, PROTOCOL_VERSION};
