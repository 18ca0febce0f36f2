//! The test guest's kernel and initramfs: built once per input, cached under the target dir.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context as _};
use nix::fcntl::{Flock, FlockArg};

use weft_rig::{target_dir, workspace_root};

/// Bumped when the harness changes how it lays out the cache.
const CACHE_FORMAT: &str = "weft-guest-assets v1";
const KERNEL: &str = "vmlinuz";
const INITRD: &str = "initramfs.img";

/// A built test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// `<dir>/vmlinuz`
    pub kernel: PathBuf,
    /// `<dir>/initramfs.img` (gzip'd newc cpio)
    pub initrd: PathBuf,
    /// The asset directory; a built one also holds `manifest.txt`.
    pub dir: PathBuf,
}

impl GuestAssets {
    fn in_dir(dir: PathBuf) -> Self {
        Self {
            kernel: dir.join(KERNEL),
            initrd: dir.join(INITRD),
            dir,
        }
    }

    fn complete(&self) -> bool {
        self.kernel.is_file() && self.initrd.is_file()
    }
}

static BUILT: Mutex<Option<GuestAssets>> = Mutex::new(None);

/// The test guest's kernel and initramfs.
///
/// With `WEFT_GUEST_ASSETS=<dir>` (holding `vmlinuz` and `initramfs.img`) that directory is
/// used as is. Otherwise the assets live in `target/guest-assets/<key>/`, where `<key>` hashes
/// `assets/build-guest.sh`, `assets/init`, `WEFT_GUEST_MODULES` and the exact kernel and
/// busybox packages apt resolves now (`build-guest.sh --resolve`). A missing directory is built
/// by the script into a temporary sibling and renamed into place, under an exclusive lock on
/// `target/guest-assets/.lock`, so parallel test processes build it once.
///
/// Blocking (it may run the build, about 5 s plus downloads); call it from
/// `tokio::task::spawn_blocking` in async code.
pub fn guest_assets() -> anyhow::Result<GuestAssets> {
    if let Some(dir) = std::env::var_os("WEFT_GUEST_ASSETS").filter(|d| !d.is_empty()) {
        let assets = GuestAssets::in_dir(PathBuf::from(dir));
        if !assets.complete() {
            bail!(
                "WEFT_GUEST_ASSETS={} does not hold {KERNEL} and {INITRD}; unset it to build the guest",
                assets.dir.display()
            );
        }
        return Ok(assets);
    }
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(assets) = built.as_ref() {
        return Ok(assets.clone());
    }
    let assets = build_cached(&target_dir().join("guest-assets"))?;
    *built = Some(assets.clone());
    Ok(assets)
}

fn assets_src() -> PathBuf {
    workspace_root().join("integration").join("assets")
}

fn build_cached(cache: &Path) -> anyhow::Result<GuestAssets> {
    let src = assets_src();
    let script = src.join("build-guest.sh");
    let key = cache_key(&script, &src.join("init"))?;
    let assets = GuestAssets::in_dir(cache.join(&key));
    if assets.complete() {
        return Ok(assets);
    }

    fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let _lock = lock(&cache.join(".lock"))?;
    if assets.complete() {
        // Another process built it while we waited for the lock.
        return Ok(assets);
    }

    let tmp = cache.join(format!(".{key}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    eprintln!(
        "weft-integration: building guest assets into {}",
        assets.dir.display()
    );
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&tmp)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        bail!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if assets.dir.exists() {
        // An incomplete leftover (a build cannot leave one, a person can).
        fs::remove_dir_all(&assets.dir)
            .with_context(|| format!("cannot remove {}", assets.dir.display()))?;
    }
    fs::rename(&tmp, &assets.dir).with_context(|| {
        format!(
            "cannot rename {} to {}",
            tmp.display(),
            assets.dir.display()
        )
    })?;
    eprintln!(
        "weft-integration: built guest assets in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if !assets.complete() {
        bail!("{} did not produce {KERNEL} and {INITRD}", script.display());
    }
    Ok(assets)
}

/// Hex FNV-1a-64 over everything that determines the build's output.
fn cache_key(script: &Path, init: &Path) -> anyhow::Result<String> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let resolved = Command::new("bash")
        .arg(script)
        .arg("--resolve")
        .output()
        .with_context(|| format!("cannot run {} --resolve", script.display()))?;
    if !resolved.status.success() {
        bail!(
            "cannot resolve the guest packages ({}): {}\n\
             hint: run `apt-get update`, or point WEFT_GUEST_ASSETS at a directory with {KERNEL} and {INITRD}",
            resolved.status,
            String::from_utf8_lossy(&resolved.stderr).trim()
        );
    }
    let modules = std::env::var("WEFT_GUEST_MODULES").unwrap_or_default();
    let parts: [&[u8]; 5] = [
        CACHE_FORMAT.as_bytes(),
        &read(script)?,
        &read(init)?,
        &resolved.stdout,
        modules.as_bytes(),
    ];
    let mut hash = Fnv64::default();
    for part in parts {
        hash.write(&(part.len() as u64).to_le_bytes());
        hash.write(part);
    }
    Ok(format!("{:016x}", hash.0))
}

fn lock(path: &Path) -> anyhow::Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(|| format!("cannot lock {}", path.display()))
}

/// FNV-1a, 64 bit: stable across Rust releases (unlike `DefaultHasher`), enough for a cache key.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_values() {
        let mut h = Fnv64::default();
        h.write(b"");
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv64::default();
        h.write(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn env_override_must_hold_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let assets = GuestAssets::in_dir(dir.path().to_path_buf());
        assert!(!assets.complete());
        fs::write(&assets.kernel, b"k").expect("write");
        fs::write(&assets.initrd, b"i").expect("write");
        assert!(assets.complete());
    }
}
