//! Who may call weftd's API: roles mapped from the socket peer's uid and groups.
//!
//! weftd.toml's `[roles]` names users and `@groups` per role. Names are resolved
//! once, at start ([`Roles::resolve`]); a request's peer (uid and gid from
//! `SO_PEERCRED`, plus the supplementary groups the group database gives that user)
//! gets the highest role any of them holds ([`Roles::role_of`]). Root always has
//! `admin`; a peer with no role is refused everything. The route table in `api.rs`
//! names the role each route needs, and one gate there applies it.

use std::collections::BTreeSet;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Deserialize;

use crate::error::ApiError;
pub use weft_api::roles::{Role, Whoami};

/// `[roles]` in weftd.toml: who holds each role, as user names and `@group` names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolesSettings {
    /// Users and `@groups` that may do everything.
    pub admin: Vec<String>,
    /// Users and `@groups` that may run the lifecycle, snapshots, weaves, compositions.
    pub operator: Vec<String>,
    /// Users and `@groups` that may read.
    pub reader: Vec<String>,
}

impl RolesSettings {
    /// Each role with the names that hold it.
    fn lists(&self) -> [(Role, &[String]); 3] {
        [
            (Role::Admin, &self.admin),
            (Role::Operator, &self.operator),
            (Role::Reader, &self.reader),
        ]
    }

    /// Checks the names' shape (whether they exist is checked at start).
    pub fn check(&self) -> Result<(), String> {
        for (role, names) in self.lists() {
            for name in names {
                let bare = name.strip_prefix('@').unwrap_or(name);
                if bare.is_empty()
                    || bare.len() > 64
                    || bare.starts_with('@')
                    || bare
                        .chars()
                        .any(|c| c.is_whitespace() || c == ':' || c == '/')
                {
                    return Err(format!(
                        "roles.{role}: {name:?} is not a user or @group name"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The host's user and group database, as roles need it.
pub trait Accounts: Send + Sync {
    /// The uid of a user name.
    fn uid(&self, user: &str) -> Result<Option<u32>, String>;
    /// The gid of a group name.
    fn gid(&self, group: &str) -> Result<Option<u32>, String>;
    /// The name of a uid.
    fn user_name(&self, uid: u32) -> Option<String>;
    /// The name of a gid.
    fn group_name(&self, gid: u32) -> Option<String>;
    /// Every group `user` belongs to, `gid` included (`getgrouplist`).
    fn groups(&self, user: &str, gid: u32) -> Vec<u32>;
}

/// The host's own database (`/etc/passwd`, `/etc/group` or whatever NSS is set to).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn uid(&self, user: &str) -> Result<Option<u32>, String> {
        nix::unistd::User::from_name(user)
            .map(|u| u.map(|u| u.uid.as_raw()))
            .map_err(|e| format!("cannot look up user {user:?}: {e}"))
    }

    fn gid(&self, group: &str) -> Result<Option<u32>, String> {
        nix::unistd::Group::from_name(group)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| format!("cannot look up group {group:?}: {e}"))
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        nix::unistd::Group::from_gid(gid.into())
            .ok()
            .flatten()
            .map(|g| g.name)
    }

    fn groups(&self, user: &str, gid: u32) -> Vec<u32> {
        let Ok(name) = std::ffi::CString::new(user) else {
            return vec![gid];
        };
        match nix::unistd::getgrouplist(&name, gid.into()) {
            Ok(groups) => groups.into_iter().map(|g| g.as_raw()).collect(),
            Err(_) => vec![gid],
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Members {
    users: BTreeSet<u32>,
    groups: BTreeSet<u32>,
}

/// `[roles]` resolved to uids and gids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roles {
    /// Highest role first.
    grants: Vec<(Role, Members)>,
}

impl Roles {
    /// Resolves every name; a name the host does not know is an error, so that a typo
    /// in an access list is seen at start, not when someone is refused.
    pub fn resolve(settings: &RolesSettings, accounts: &dyn Accounts) -> Result<Roles, String> {
        settings.check()?;
        let mut grants = Vec::new();
        for (role, names) in settings.lists() {
            let mut members = Members::default();
            for name in names {
                match name.strip_prefix('@') {
                    Some(group) => match accounts.gid(group)? {
                        Some(gid) => members.groups.insert(gid),
                        None => {
                            return Err(format!(
                                "roles.{role} in weftd.toml names group {group:?}, which is not a group on this host: create it or remove it"
                            ))
                        }
                    },
                    None => match accounts.uid(name)? {
                        Some(uid) => members.users.insert(uid),
                        None => {
                            return Err(format!(
                                "roles.{role} in weftd.toml names user {name:?}, who is not a user on this host: create it, or write @{name} for a group"
                            ))
                        }
                    },
                };
            }
            grants.push((role, members));
        }
        Ok(Roles { grants })
    }

    /// The highest role `uid` holds by itself or through one of `groups`; root is
    /// always `admin`.
    pub fn role_of(&self, uid: u32, groups: &[u32]) -> Option<Role> {
        if uid == 0 {
            return Some(Role::Admin);
        }
        self.grants
            .iter()
            .filter(|(_, m)| m.users.contains(&uid) || groups.iter().any(|g| m.groups.contains(g)))
            .map(|(role, _)| *role)
            .max()
    }

    /// Who is on the other end of the socket, and the role they hold.
    pub fn identify(
        &self,
        accounts: &dyn Accounts,
        cred: Option<(u32, u32)>,
        claimed: Option<&str>,
    ) -> Actor {
        let claimed = claimed.and_then(sanitize_claim);
        let Some((uid, gid)) = cred else {
            return Actor::unknown(claimed);
        };
        let name = accounts.user_name(uid);
        let mut groups = match &name {
            Some(n) => accounts.groups(n, gid),
            None => Vec::new(),
        };
        if !groups.contains(&gid) {
            groups.insert(0, gid);
        }
        Actor {
            uid: Some(uid),
            gid: Some(gid),
            role: self.role_of(uid, &groups),
            groups,
            user: name.unwrap_or_else(|| format!("uid {uid}")),
            claimed,
        }
    }
}

/// Only plain characters: a claim cannot forge the "(via user)" part of an audit record.
fn sanitize_claim(s: &str) -> Option<String> {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._@:-".contains(*c))
        .take(64)
        .collect();
    (!s.is_empty()).then_some(s)
}

/// The caller of one request: the socket peer, its role, and who it says it acts for
/// (`x-weft-actor`). weftd's gate puts it in the request before any handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The peer's uid (`SO_PEERCRED`); none when the kernel did not say.
    pub uid: Option<u32>,
    /// The peer's gid (`SO_PEERCRED`).
    pub gid: Option<u32>,
    /// The gid and the supplementary groups of the peer's user.
    pub groups: Vec<u32>,
    /// The peer's user name (`uid N` when it has none).
    pub user: String,
    /// The highest role the peer holds.
    pub role: Option<Role>,
    /// Who the client says acts (sanitised).
    pub claimed: Option<String>,
}

impl Actor {
    /// A peer the kernel did not name: it holds no role.
    pub fn unknown(claimed: Option<String>) -> Actor {
        Actor {
            uid: None,
            gid: None,
            groups: Vec::new(),
            user: "unknown".into(),
            role: None,
            claimed,
        }
    }

    /// The actor of audit records: the user, or `claim (via user)`.
    pub fn name(&self) -> String {
        match &self.claimed {
            Some(c) if *c != self.user => format!("{c} (via {})", self.user),
            _ => self.user.clone(),
        }
    }

    /// `uid 1001 (bob)`, for messages.
    pub fn peer(&self) -> String {
        match self.uid {
            Some(uid) if self.user != format!("uid {uid}") => format!("uid {uid} ({})", self.user),
            Some(uid) => format!("uid {uid}"),
            None => "an unknown peer".into(),
        }
    }

    /// Refuses `what` unless the caller holds `need` (or more). The refusal is one
    /// line, answered with HTTP 403 and written to the audit log by weftd's gate,
    /// whether a route or a handler (for a body that needs more) refuses.
    pub fn require(&self, need: Role, what: &str) -> Result<(), ApiError> {
        if self.role.is_some_and(|r| r >= need) {
            return Ok(());
        }
        let has = match self.role {
            Some(r) => r.to_string(),
            None => "no role (roles are granted in weftd.toml's [roles])".into(),
        };
        Err(ApiError::Forbidden(format!(
            "forbidden: {what} needs role {need}; {} has {has}",
            self.peer()
        )))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Only the gate inserts an Actor: a route without one is refused, not served.
        parts
            .extensions
            .get::<Actor>()
            .cloned()
            .ok_or_else(|| ApiError::Forbidden("forbidden: this route has no role check".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A user database: name → (uid, primary gid), group name → (gid, members).
    #[derive(Default)]
    struct Fake {
        users: BTreeMap<&'static str, (u32, u32)>,
        groups: BTreeMap<&'static str, (u32, Vec<&'static str>)>,
    }

    impl Accounts for Fake {
        fn uid(&self, user: &str) -> Result<Option<u32>, String> {
            Ok(self.users.get(user).map(|u| u.0))
        }
        fn gid(&self, group: &str) -> Result<Option<u32>, String> {
            Ok(self.groups.get(group).map(|g| g.0))
        }
        fn user_name(&self, uid: u32) -> Option<String> {
            self.users
                .iter()
                .find(|(_, u)| u.0 == uid)
                .map(|(n, _)| n.to_string())
        }
        fn group_name(&self, gid: u32) -> Option<String> {
            self.groups
                .iter()
                .find(|(_, g)| g.0 == gid)
                .map(|(n, _)| n.to_string())
        }
        fn groups(&self, user: &str, gid: u32) -> Vec<u32> {
            let mut out = vec![gid];
            out.extend(
                self.groups
                    .values()
                    .filter(|(_, members)| members.contains(&user))
                    .map(|(g, _)| *g),
            );
            out
        }
    }

    fn host() -> Fake {
        let mut f = Fake::default();
        f.users.insert("root", (0, 0));
        f.users.insert("alice", (1000, 1000));
        f.users.insert("bob", (1001, 1001));
        f.users.insert("carol", (1002, 1002));
        f.users.insert("dave", (1003, 1003));
        f.users.insert("eve", (1004, 1004));
        f.groups.insert("wheel", (10, vec!["alice"]));
        f.groups.insert("weft-operators", (500, vec!["carol"]));
        f.groups.insert("weft", (501, vec!["bob", "carol", "eve"]));
        f.groups.insert("dave", (1003, vec![]));
        f
    }

    fn settings(text: &str) -> RolesSettings {
        toml::from_str(text).unwrap()
    }

    fn role(roles: &Roles, accounts: &Fake, user: &str) -> Option<Role> {
        let (uid, gid) = accounts.users[user];
        roles.identify(accounts, Some((uid, gid)), None).role
    }

    #[test]
    fn users_groups_and_supplementary_groups_map_to_roles() {
        let host = host();
        let roles = Roles::resolve(
            &settings(
                r#"
                admin = ["@wheel"]
                operator = ["@weft-operators", "dave"]
                reader = ["@weft"]
                "#,
            ),
            &host,
        )
        .unwrap();
        // alice through her supplementary group wheel, dave by name, bob through weft.
        assert_eq!(role(&roles, &host, "alice"), Some(Role::Admin));
        assert_eq!(role(&roles, &host, "dave"), Some(Role::Operator));
        assert_eq!(role(&roles, &host, "bob"), Some(Role::Reader));
        // carol is in weft (reader) and weft-operators (operator): the highest wins.
        assert_eq!(role(&roles, &host, "carol"), Some(Role::Operator));
        // eve is only in weft: reader; a uid nobody named has nothing.
        assert_eq!(role(&roles, &host, "eve"), Some(Role::Reader));
        assert_eq!(roles.role_of(4242, &[4242]), None);
        // The peer's own gid counts even when the database does not list it.
        assert_eq!(roles.role_of(4242, &[4242, 10]), Some(Role::Admin));
        let a = roles.identify(&host, Some((4242, 10)), None);
        assert_eq!((a.role, a.user.as_str()), (Some(Role::Admin), "uid 4242"));
    }

    #[test]
    fn root_is_always_admin_and_no_roles_means_only_root() {
        let host = host();
        let none = Roles::resolve(&RolesSettings::default(), &host).unwrap();
        assert_eq!(role(&none, &host, "root"), Some(Role::Admin));
        assert_eq!(role(&none, &host, "alice"), None);
        let readers = Roles::resolve(&settings(r#"reader = ["root"]"#), &host).unwrap();
        assert_eq!(role(&readers, &host, "root"), Some(Role::Admin));
    }

    #[test]
    fn unknown_names_are_one_line_errors_at_start() {
        let host = host();
        let e = Roles::resolve(&settings(r#"operator = ["bbo"]"#), &host).unwrap_err();
        assert!(e.contains("roles.operator") && e.contains("\"bbo\""), "{e}");
        let e = Roles::resolve(&settings(r#"admin = ["@wheeel"]"#), &host).unwrap_err();
        assert!(
            e.contains("roles.admin") && e.contains("group \"wheeel\""),
            "{e}"
        );
        for bad in ["\"\"", "\"@\"", "\"@@x\"", "\"a b\""] {
            let e = Roles::resolve(&settings(&format!("reader = [{bad}]")), &host).unwrap_err();
            assert!(e.contains("not a user or @group name"), "{bad}: {e}");
        }
        assert!(toml::from_str::<RolesSettings>("readers = [\"bob\"]").is_err());
    }

    #[test]
    fn require_names_what_who_and_roles() {
        let host = host();
        let roles = Roles::resolve(&settings(r#"reader = ["bob"]"#), &host).unwrap();
        let bob = roles.identify(&host, Some((1001, 1001)), None);
        assert!(bob.require(Role::Reader, "env list").is_ok());
        let e = bob.require(Role::Operator, "env delete").unwrap_err();
        assert_eq!(
            e.to_string(),
            "forbidden: env delete needs role operator; uid 1001 (bob) has reader"
        );
        let eve = roles.identify(&host, Some((1004, 1004)), None);
        let e = eve
            .require(Role::Reader, "env list")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("forbidden: env list needs role reader; uid 1004 (eve) has no role"),
            "{e}"
        );
        let nobody = roles.identify(&host, None, None);
        assert!(nobody.require(Role::Reader, "status").is_err());
        let ghost = roles.identify(&host, Some((4242, 4242)), None);
        let e = ghost
            .require(Role::Reader, "status")
            .unwrap_err()
            .to_string();
        assert!(e.contains("; uid 4242 has no role"), "{e}");
    }

    #[test]
    fn actor_combines_peer_and_claim() {
        let host = host();
        let roles = Roles::default();
        let root = |claim: Option<&str>| roles.identify(&host, Some((0, 0)), claim).name();
        assert_eq!(root(None), "root");
        assert_eq!(root(Some("ci-bot")), "ci-bot (via root)");
        assert_eq!(root(Some("root")), "root");
        assert_eq!(root(Some("eve (via root)")), "eveviaroot (via root)");
        assert_eq!(root(Some(" ()")), "root");
    }
}
