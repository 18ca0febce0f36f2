//! Indexes: a snapshot's block map stored under a name such as
//! `env-web/disk-vda/0001`, written only once its chunks are in the store; and the rule
//! for index names.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::{Error, IoContext};
use super::fsutil::{self, ensure_dir, write_durable, Publish};
use super::{BlockMap, ChunkStore, INDEX_SUFFIX};

impl ChunkStore {
    /// Write a block map as index `name` (e.g. `env-web/disk-vda/0001`),
    /// atomically replacing an index of the same name. Every referenced chunk
    /// must already be in the store ([`Error::Missing`] otherwise): indexes
    /// are written only after all their chunks are durable.
    pub fn write_index(&self, name: &str, map: &BlockMap) -> Result<(), Error> {
        let path = self.index_path(name)?;
        map.check()
            .map_err(|reason| Error::BadBlockMap { reason })?;
        if map.chunk_size != self.inner.chunk_size {
            return Err(Error::BadBlockMap {
                reason: format!(
                    "chunk size {} differs from the store's {}",
                    map.chunk_size, self.inner.chunk_size
                ),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for id in map.data_ids() {
            if seen.insert(*id) && !self.contains_settled(id) {
                return Err(self.not_found(id));
            }
        }
        let bytes = map.encode(self.inner.keys.as_ref().map(|k| &k.index));
        let dir = path.parent().unwrap_or(&self.inner.indexes).to_path_buf();
        // A concurrent remove_index may prune the (empty) directory between
        // ensure_dir and the write: retry a few times.
        let mut last = None;
        for _ in 0..4 {
            ensure_dir(&self.inner.indexes, &dir)?;
            match write_durable(
                &self.inner.hot.tmp,
                "index",
                &path,
                &[&bytes],
                Publish::Replace,
            ) {
                Ok(_) => return Ok(()),
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    last = Some(source)
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Io {
            op: "write index",
            path,
            source: last.unwrap_or_else(|| io::Error::other("directory kept vanishing")),
        })
    }

    /// Read and verify index `name`.
    pub fn read_index(&self, name: &str) -> Result<BlockMap, Error> {
        let path = self.index_path(name)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::IndexNotFound {
                    name: name.to_string(),
                    root: self.inner.root.clone(),
                })
            }
            Err(e) => return Err(e).ctx("read index", &path),
        };
        let corrupt = |reason: String| Error::CorruptIndex {
            name: name.to_string(),
            path: path.clone(),
            reason,
        };
        let map = BlockMap::decode(&bytes, self.inner.keys.as_ref().map(|k| &k.index))
            .map_err(corrupt)?;
        if map.chunk_size != self.inner.chunk_size {
            return Err(corrupt(format!(
                "chunk size {} differs from the store's {}",
                map.chunk_size, self.inner.chunk_size
            )));
        }
        Ok(map)
    }

    /// All index names, sorted.
    pub fn list_indexes(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let mut stack = vec![(self.inner.indexes.clone(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for e in fsutil::read_dir_or_empty(&dir)? {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let ft = e.file_type().ctx("stat", &e.path())?;
                if ft.is_dir() {
                    stack.push((e.path(), format!("{prefix}{name}/")));
                } else if let Some(stem) = name.strip_suffix(INDEX_SUFFIX) {
                    out.push(format!("{prefix}{stem}"));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Remove index `name` (its chunks go at the next gc). Empty parent
    /// directories are pruned.
    pub fn remove_index(&self, name: &str) -> Result<(), Error> {
        let path = self.index_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::IndexNotFound {
                    name: name.to_string(),
                    root: self.inner.root.clone(),
                })
            }
            Err(e) => return Err(e).ctx("remove index", &path),
        }
        let mut dir = path.parent().map(Path::to_path_buf);
        if let Some(d) = &dir {
            fsutil::fsync_dir(d)?;
        }
        while let Some(d) = dir {
            if d == self.inner.indexes || fs::remove_dir(&d).is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    fn index_path(&self, name: &str) -> Result<PathBuf, Error> {
        validate_index_name(name)?;
        Ok(self.inner.indexes.join(format!("{name}{INDEX_SUFFIX}")))
    }
}

/// Check an index name: `/`-separated segments of `[A-Za-z0-9._+@-]`, none
/// empty, none starting with `.`, at most 16 segments and 255 bytes.
pub fn validate_index_name(name: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::InvalidIndexName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if name.starts_with('/') {
        return bad("absolute (starts with '/')");
    }
    let segments: Vec<&str> = name.split('/').collect();
    if segments.len() > 16 {
        return bad("more than 16 segments");
    }
    for s in segments {
        if s.is_empty() {
            return bad("empty segment ('//' or trailing '/')");
        }
        if s == "." || s == ".." {
            return bad("'.' and '..' segments are not allowed");
        }
        if s.starts_with('.') {
            return bad("a segment starts with '.'");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'@'))
        {
            return bad("only ASCII letters, digits and . _ - + @ are allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names() {
        for ok in ["a", "env-web/disk-vda/0001", "x.y_z+1@2"] {
            assert!(validate_index_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/abs", "a/../b", "..", "a//b", "a/", ".hidden", "a/.b", "a b", "a\\b", "é",
        ] {
            assert!(validate_index_name(bad).is_err(), "{bad:?}");
        }
    }
}
