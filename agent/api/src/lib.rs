//! weft's API types: what weftd's HTTP API takes and answers, shared by the daemon
//! (`weft`), the client and CLI, and the libraries that build on the same data (the VM
//! configuration that `weft-qmp` launches).
//!
//! Plain data with serde, and the pure checks that belong to the data; no I/O, no
//! async, nothing of the daemon. `docs/openapi.json` documents these types on the wire.

use serde::{Deserialize, Serialize};

/// Declares a string-valued catalog enum with `as_str`/`parse`.
macro_rules! catalog_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// The catalog spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the catalog spelling.
            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

pub mod audit;
pub mod composition;
pub mod env;
pub mod job;
pub mod names;
pub mod net;
pub mod policy;
pub mod provenance;
pub mod resource;
pub mod roles;
pub mod snapshot;
pub mod store;
pub mod strict;
pub mod vm;
pub mod weave;

/// Error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line saying what was wrong and what to do.
    pub error: String,
}

/// Header a client may set to name the person or process behind a request
/// (recorded next to the socket peer's user in the audit log).
pub const ACTOR_HEADER: &str = "x-weft-actor";

/// Default directory for sockets.
pub const DEFAULT_RUN_DIR: &str = "/run/weft";

/// Name of the API socket inside the run directory.
pub const API_SOCKET_NAME: &str = "weftd.sock";
