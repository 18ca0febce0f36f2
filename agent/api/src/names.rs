//! The names users choose for environments, weaves and compositions, checked the same way
//! by the CLI (before it sends a request) and by weftd (which refuses what the CLI would).
//! Each error names what the name was for, so that a bad weave name is not reported as a
//! bad environment name.

/// Checks an environment name: 1–32 characters from `[a-z0-9_-]`, starting with a
/// letter or digit. The error is one line for the operator.
pub fn check_env_name(name: &str) -> Result<(), String> {
    if env_rule(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid environment name {name:?}: use 1-32 characters from a-z, 0-9, '-' and '_', starting with a letter or digit"
        ))
    }
}

/// Checks a weave name: an environment name of at most 10 characters without `_`, as
/// it becomes part of a namespace name (`weft-<name>`).
pub fn check_weave_name(name: &str) -> Result<(), String> {
    if env_rule(name) && name.len() <= 10 && !name.contains('_') {
        Ok(())
    } else {
        Err(format!(
            "invalid weave name {name:?}: use 1-10 characters from a-z, 0-9 and '-', starting with a letter or digit"
        ))
    }
}

/// Checks a composition name: the rule of an environment name.
pub fn check_composition_name(name: &str) -> Result<(), String> {
    if env_rule(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid composition name {name:?}: use 1-32 characters from a-z, 0-9, '-' and '_', starting with a letter or digit"
        ))
    }
}

/// 1–32 characters from `[a-z0-9_-]`, starting with a letter or digit.
fn env_rule(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_their_rules() {
        for ok in [
            "web",
            "web-1",
            "a",
            "db_2",
            "x23456789012345678901234567890ab",
        ] {
            assert!(check_env_name(ok).is_ok(), "{ok}");
            assert!(check_composition_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "-web",
            "_web",
            "a/b",
            "web.1",
            "x23456789012345678901234567890abc",
        ] {
            assert!(check_env_name(bad).is_err(), "{bad:?}");
            assert!(check_composition_name(bad).is_err(), "{bad:?}");
        }
        for ok in ["w1", "before", "a-b", "x234567890"] {
            assert!(check_weave_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "W1", "-w", "a_b", "x2345678901", "a/b"] {
            assert!(check_weave_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_what_the_name_was_for() {
        // A name that breaks the environment rule too is still reported as a weave's.
        for bad in ["Bad!", "toolongname1", "a_b"] {
            let e = check_weave_name(bad).unwrap_err();
            assert!(e.starts_with("invalid weave name"), "{e}");
        }
        let e = check_composition_name("Bad!").unwrap_err();
        assert!(e.starts_with("invalid composition name"), "{e}");
        let e = check_env_name("Bad!").unwrap_err();
        assert!(e.starts_with("invalid environment name"), "{e}");
    }
}
