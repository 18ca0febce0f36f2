//! Where cargo put things: the target directory and workspace binaries.

use std::path::{Path, PathBuf};

/// The cargo target directory of this build.
///
/// `CARGO_TARGET_DIR` when set (a relative value is taken from the workspace root),
/// else the nearest ancestor of the running test binary holding cargo's `CACHEDIR.TAG`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
        {
            return dir.to_path_buf();
        }
        // target/<profile>/deps/<test binary> without a CACHEDIR.TAG (very old cargo).
        if let Some(dir) = profile_dir_of(&exe).and_then(|p| p.parent().map(Path::to_path_buf)) {
            return dir;
        }
    }
    workspace_root().join("target")
}

/// The workspace root (this crate is `integration/rig` in it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// `target/<profile>` for an executable in `target/<profile>/deps/` or `target/<profile>/`.
fn profile_dir_of(exe: &Path) -> Option<PathBuf> {
    let parent = exe.parent()?;
    if parent.file_name().is_some_and(|n| n == "deps") {
        parent.parent().map(Path::to_path_buf)
    } else {
        Some(parent.to_path_buf())
    }
}

/// Path of a workspace binary such as `weftd`, `weft` or `weft-blk`: from the same profile
/// as the running test or program (normally `target/debug/<name>`), else from the
/// target directory's `release`, else its `debug` profile (a benchmark built in one
/// profile may drive binaries built in another).
///
/// This is the one place the rig, the end-to-end tests, the benchmarks and the
/// reliability campaigns look binaries up.
pub fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    let own = std::env::current_exe()
        .ok()
        .and_then(|exe| profile_dir_of(&exe));
    let target = target_dir();
    let mut dirs: Vec<PathBuf> = own.into_iter().collect();
    for profile in ["release", "debug"] {
        let dir = target.join(profile);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    if let Some(path) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return Ok(path);
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    anyhow::bail!(
        "workspace binary `{name}` not found in {}: build it with `cargo build --bins` first",
        looked.join(", ")
    )
}

/// [`find_bin`] for a test, which cannot do anything useful without the binary.
///
/// # Panics
/// If the binary has not been built; the message says how to fix it.
pub fn bin_path(name: &str) -> PathBuf {
    find_bin(name).unwrap_or_else(|e| panic!("{e}"))
}

/// The top-level lines of a weftd.toml that let a test's or a benchmark's weftd take
/// images from `dirs` and from where the guest kernel and initramfs are built, and
/// write outputs (restores, replays) into `dirs`: weftd confines the host paths API
/// callers name to `image_dirs` and `export_dirs` (see docs/security.md). Put them
/// before any `[table]`.
pub fn confined_dirs_toml(dirs: &[&Path]) -> String {
    let quote = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap_or_default();
    let mut images: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    images.push(target_dir().join("guest-assets"));
    if let Some(dir) = std::env::var_os("WEFT_GUEST_ASSETS").filter(|d| !d.is_empty()) {
        images.push(PathBuf::from(dir));
    }
    let list = |ps: &mut dyn Iterator<Item = &Path>| ps.map(quote).collect::<Vec<_>>().join(", ");
    format!(
        "image_dirs = [{}]\nexport_dirs = [{}]\n",
        list(&mut images.iter().map(PathBuf::as_path)),
        list(&mut dirs.iter().copied())
    )
}
