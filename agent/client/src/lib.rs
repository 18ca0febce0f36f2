//! weft's client side: [`Client`], the HTTP client of weftd's API over its unix socket,
//! and [`cli`], the `weft` command line built on it.
//!
//! It depends on the API types (`weft-api`) and nothing of the daemon: `weft` is a thin
//! client, and anything that speaks to weftd can use [`Client`].

pub mod cli;
pub mod client;

pub use client::{Client, ClientError};
