//! Network isolation for weaves: a namespace per weave, veth/tap links and
//! addresses through rtnetlink, nftables tables, chains and rules through nftnl,
//! port routes and the atomic switch-over used by `weave activate`.
//!
//! Only the naming rules exist so far; links and rules arrive with weaves (F7).

/// Errors raised by namespace and firewall operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name cannot be used for a namespace.
    #[error("invalid namespace name {0:?}: use 1-15 characters from [a-z0-9-]")]
    InvalidName(String),
}

/// Name of the network namespace that holds a weave (`weft-<weave>`).
///
/// Interface names in Linux are limited to 15 bytes, and the namespace name is
/// reused as a prefix for links, so the weave part is kept short and plain.
pub fn namespace_name(weave: &str) -> Result<String, Error> {
    let ok = !weave.is_empty()
        && weave.len() <= 10
        && weave
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(format!("weft-{weave}"))
    } else {
        Err(Error::InvalidName(weave.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_bounded_and_plain() {
        assert_eq!(namespace_name("ab-1").unwrap(), "weft-ab-1");
        assert!(namespace_name("").is_err());
        assert!(namespace_name("UPPER").is_err());
        assert!(namespace_name("much-too-long-name").is_err());
        assert!(namespace_name("a/b").is_err());
    }
}
