//! Strict request bodies: see [`weft_api::strict`].

pub use weft_api::strict::*;
