//! Paths in a snapshot's file system: where a guest's source lies, with symbolic links
//! resolved by weft (see [`resolve`]) so that `ext4-view` never follows a link itself.

use ext4_view::Ext4;

use super::{file_error, BaseError};

/// The path inside the file system that holds the guest's `guest` (the guest path, or
/// it with leading directories taken off), if any.
pub(super) fn locate(fs: &Ext4, guest: &str) -> Option<String> {
    let trimmed = guest.trim_end_matches('/');
    let parts: Vec<&str> = trimmed.split('/').filter(|p| !p.is_empty()).collect();
    (0..parts.len()).find_map(|skip| {
        let p = format!("/{}", parts[skip..].join("/"));
        resolve(fs, &p).ok()?.map(|_| p)
    })
}

/// The longest symlink target ext4 stores (a block, less the terminating zero; Linux
/// refuses longer ones with `ENAMETOOLONG`).
const MAX_SYMLINK_BYTES: u64 = 4095;

/// Symlinks followed while resolving one path (Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// `path` resolved in `fs` to one without symbolic links, or `None` if it does not
/// exist.
///
/// weft resolves links itself instead of letting `ext4-view` follow them: `ext4-view`
/// reads a link's target whole into a buffer sized by the link's inode, and the guest
/// writes that inode. A "symlink" claiming terabytes made the allocation abort the
/// process (found by the `ext4_base` fuzz target). Here every link's size is checked
/// before its target is read, and the path handed back holds no link, so `ext4-view`
/// never follows one.
pub(super) fn resolve(fs: &Ext4, path: &str) -> Result<Option<String>, BaseError> {
    let split = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .rev()
            .map(str::to_string)
            .collect()
    };
    // Components still to resolve, the next on top; the resolved prefix has no link.
    let mut todo = split(path);
    let mut at: Vec<String> = Vec::new();
    let mut followed = 0;
    let joined = |at: &[String]| format!("/{}", at.join("/"));
    while let Some(c) = todo.pop() {
        if c == ".." {
            at.pop();
            continue;
        }
        at.push(c);
        let here = joined(&at);
        let meta = match fs.symlink_metadata(here.as_str()) {
            Ok(m) => m,
            Err(ext4_view::Ext4Error::NotFound | ext4_view::Ext4Error::NotADirectory) => {
                return Ok(None)
            }
            Err(source) => return Err(BaseError::File { path: here, source }),
        };
        if !meta.is_symlink() {
            if !todo.is_empty() && !meta.is_dir() {
                return Ok(None);
            }
            continue;
        }
        followed += 1;
        if followed > MAX_SYMLINKS {
            return Err(BaseError::Symlink {
                path: path.to_string(),
                why: format!("more than {MAX_SYMLINKS} symbolic links to follow"),
            });
        }
        if meta.len() > MAX_SYMLINK_BYTES {
            return Err(BaseError::Symlink {
                path: here,
                why: format!(
                    "a symbolic link whose target claims {} bytes (ext4 allows {MAX_SYMLINK_BYTES})",
                    meta.len()
                ),
            });
        }
        let target = fs.read_link(here.as_str()).map_err(file_error(&here))?;
        let Ok(target) = target.to_str() else {
            // Not UTF-8: no source path (they are UTF-8) goes through it.
            return Ok(None);
        };
        at.pop();
        if target.starts_with('/') {
            at.clear();
        }
        todo.extend(split(target));
    }
    Ok(Some(joined(&at)))
}
