//! The names users choose for environments and weaves, checked the same way by the
//! CLI (before it sends a request) and by weftd (which refuses what the CLI would).

/// Checks an environment name: 1–32 characters from `[a-z0-9_-]`, starting with a
/// letter or digit. The error is one line for the operator.
pub fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
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
    check_env_name(name)?;
    if name.len() > 10 || name.contains('_') {
        return Err(format!(
            "invalid weave name {name:?}: use 1-10 characters from a-z, 0-9 and '-'"
        ));
    }
    Ok(())
}
