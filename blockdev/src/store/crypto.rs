//! Key file handling and key derivation.
//!
//! The key file holds 32 random bytes (the master key). HKDF-SHA256 with the
//! store id as salt derives independent keys from it, one per purpose (the info
//! strings are part of the format, see `docs/store-format.md`).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf, hmac};

use super::error::{Error, IoContext};

/// Master key length in bytes.
pub(crate) const KEY_LEN: usize = 32;
/// AES-GCM nonce length.
pub(crate) const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub(crate) const TAG_LEN: usize = 16;

const INFO_ID: &[u8] = b"weft-store/v1/chunk-id";
const INFO_ENC: &[u8] = b"weft-store/v1/chunk-enc";
const INFO_INDEX: &[u8] = b"weft-store/v1/index-mac";
const INFO_FINGERPRINT: &[u8] = b"weft-store/v1/fingerprint";

/// The keys of an encrypted store.
pub(crate) struct Keys {
    /// HMAC key for chunk ids.
    pub id: hmac::Key,
    /// AES-256-GCM key for chunk payloads.
    pub enc: aead::LessSafeKey,
    /// HMAC key for index checksums.
    pub index: hmac::Key,
    /// Public fingerprint that identifies the master key (16 bytes).
    pub fingerprint: [u8; 16],
}

fn expand(prk: &hkdf::Prk, info: &[u8]) -> Result<[u8; 32], Error> {
    let mut out = [0u8; 32];
    let infos = [info];
    prk.expand(&infos, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| Error::Crypto { op: "hkdf expand" })?;
    Ok(out)
}

impl Keys {
    /// Derive all keys from the master key and the store id.
    pub fn derive(master: &[u8; KEY_LEN], store_id: &[u8]) -> Result<Keys, Error> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, store_id).extract(master);
        let id = expand(&prk, INFO_ID)?;
        let enc = expand(&prk, INFO_ENC)?;
        let index = expand(&prk, INFO_INDEX)?;
        let fp = expand(&prk, INFO_FINGERPRINT)?;
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&fp[..16]);
        let unbound =
            aead::UnboundKey::new(&aead::AES_256_GCM, &enc).map_err(|_| Error::Crypto {
                op: "aes key setup",
            })?;
        Ok(Keys {
            id: hmac::Key::new(hmac::HMAC_SHA256, &id),
            enc: aead::LessSafeKey::new(unbound),
            index: hmac::Key::new(hmac::HMAC_SHA256, &index),
            fingerprint,
        })
    }
}

/// Fill a buffer from the system CSPRNG.
pub(crate) fn random_bytes(out: &mut [u8]) -> Result<(), Error> {
    SystemRandom::new()
        .fill(out)
        .map_err(|_| Error::Crypto { op: "random" })
}

/// Create a new key file (mode 0600); refuses to overwrite.
pub(crate) fn create_key_file(path: &Path) -> Result<[u8; KEY_LEN], Error> {
    let mut key = [0u8; KEY_LEN];
    random_bytes(&mut key)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::KeyFileExists {
                    path: path.to_path_buf(),
                }
            } else {
                Error::Io {
                    op: "create key file",
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    f.write_all(&key).ctx("write key file", path)?;
    f.sync_all().ctx("fsync key file", path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        super::fsutil::fsync_dir(dir)?;
    }
    Ok(key)
}

/// Read a key file: exactly 32 bytes.
pub(crate) fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN], Error> {
    let f = fs::File::open(path).ctx("open key file", path)?;
    let mut buf = Vec::with_capacity(KEY_LEN + 1);
    f.take(KEY_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .ctx("read key file", path)?;
    let key: [u8; KEY_LEN] = buf.as_slice().try_into().map_err(|_| Error::BadKeyFile {
        path: path.to_path_buf(),
        reason: format!(
            "expected exactly {KEY_LEN} bytes, found {}{}",
            buf.len().min(KEY_LEN),
            if buf.len() > KEY_LEN { " or more" } else { "" }
        ),
    })?;
    Ok(key)
}
