//! How weftd forms file, socket and store names from the names users choose.
//!
//! Environment, weave and disk names are made of `a-z`, `0-9`, `-` and `_` and start
//! with a letter or digit ([`crate::names::check_name`], QEMU's disk name check). So:
//! - parts of one file name are joined with [`SEP`], which no name contains: `a-b` +
//!   `c` and `a` + `b-c` never give the same file;
//! - what weft itself names in a namespace that user names also fill starts with `_`,
//!   which no name starts with: no environment can be called like it.

/// Checks an environment name: see [`weft_api::names::check_env_name`].
pub fn check_name(name: &str) -> Result<(), crate::error::ApiError> {
    weft_api::names::check_env_name(name).map_err(crate::error::ApiError::BadRequest)
}

/// Joins the parts of a file or socket name.
pub const SEP: &str = ".";

/// The store prefix of block maps a weave owns (merges it serves live); environments'
/// own block maps live under `<env>/`.
pub const WEAVE_INDEXES: &str = "_weaves";

/// The store prefix weaves' block maps had before [`WEAVE_INDEXES`]; an environment
/// could be called like it, so it is only cleaned while none is.
pub const OLD_WEAVE_INDEXES: &str = "weaves";

/// `parts` joined with [`SEP`].
pub fn join(parts: &[&str]) -> String {
    parts.join(SEP)
}

/// The store prefix (ending in `/`) of the block maps weave `weave` owns.
pub fn weave_index_prefix(weave: &str) -> String {
    format!("{WEAVE_INDEXES}/{weave}/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::check_name;

    #[test]
    fn joined_names_are_unambiguous() {
        assert!(check_name(&format!("a{SEP}b")).is_err());
        assert_ne!(join(&["a-b", "c"]), join(&["a", "b-c"]));
        assert_ne!(join(&["a_b", "c"]), join(&["a", "b_c"]));
    }

    #[test]
    fn no_environment_is_called_like_weft_s_own_store_prefix() {
        assert!(check_name(WEAVE_INDEXES).is_err());
        // An environment `weaves` is valid: it must not share the weaves' prefix.
        assert!(check_name(OLD_WEAVE_INDEXES).is_ok());
        assert!(!weave_index_prefix("w1").starts_with(&format!("{OLD_WEAVE_INDEXES}/")));
    }
}
