//! weft's API types: what weftd's HTTP API takes and answers, shared by the daemon
//! (`weft`), the client and CLI, and the libraries that build on the same data (the VM
//! configuration that `weft-qmp` launches).
//!
//! Plain data with serde, and the pure checks that belong to the data; no I/O, no
//! async, nothing of the daemon. `docs/openapi.json` documents these types on the wire.

pub mod vm;
