//! Roles of API callers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a caller may do; each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every read (`GET`).
    Reader,
    /// The lifecycle of environments, snapshots, weaves, compositions, replay into weaves.
    Operator,
    /// Everything, including what changes the host or the whole store.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Reader, Role::Operator, Role::Admin];

    /// The name weftd.toml, the API and the OpenAPI document use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of `GET /v1/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    /// The socket peer's uid.
    pub uid: Option<u32>,
    /// Its user name (`uid N` when it has none).
    pub user: String,
    /// Its groups by name (by number when a group has no name).
    pub groups: Vec<String>,
    /// Its role; `admin`, `operator` or `reader`.
    pub role: Option<Role>,
    /// The actor audit records name (`x-weft-actor (via user)` when a client claims one).
    pub actor: String,
}
