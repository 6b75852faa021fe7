//! Secret values at rest: sealed with ChaCha20-Poly1305 under a 256-bit key that lives in
//! its own root-only file, outside the agent's database.
//!
//! A sealed blob is `nonce (12 bytes) || ciphertext || tag (16 bytes)`; the app's name is
//! the associated data, so a blob moved to another app's record does not open. The key
//! file is created once (mode 0600, temp + fsync + link) with bytes from the OS's random source; a
//! key file that is readable by others, or of the wrong length, is refused.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("secrets key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secrets key file {path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the OS random source failed")]
    Random,
    #[error("sealed secrets of app {0:?} do not open with this key (wrong key file, or the record was altered)")]
    Open(String),
    #[error("secrets encoding: {0}")]
    Encoding(String),
}

/// Seals and opens secret values with the key from one file.
pub struct Vault {
    key: LessSafeKey,
    /// Keys [`Vault::fingerprint`]: derived from the sealing key, never the same bytes.
    mac: ring::hmac::Key,
    rng: SystemRandom,
}

impl Vault {
    /// Opens the key file, creating it (0600, random key) when it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Vault, VaultError> {
        let rng = SystemRandom::new();
        let bytes = private_file(path, &rng, |key: &mut [u8; KEY_LEN]| key.to_vec())?;
        Self::from_bytes(path, &bytes, rng)
    }

    fn from_bytes(path: &Path, bytes: &[u8], rng: SystemRandom) -> Result<Vault, VaultError> {
        let bad = |reason: String| VaultError::BadKey {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() != KEY_LEN {
            return Err(bad(format!(
                "holds {} bytes, a key is {KEY_LEN}",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| bad("unusable".into()))?;
        let derived = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            b"shellwego secrets fingerprint",
        );
        Ok(Vault {
            key: LessSafeKey::new(key),
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            rng,
        })
    }

    /// A short keyed digest of an app's secret values: it changes whenever a value does,
    /// and tells nothing about the values without the key. It is part of the app's
    /// version, so new secret values replace the VMs (and app snapshots) holding old ones.
    pub fn fingerprint(
        &self,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<String, VaultError> {
        let data =
            serde_json::to_vec(&(app, values)).map_err(|e| VaultError::Encoding(e.to_string()))?;
        let tag = ring::hmac::sign(&self.mac, &data);
        Ok(hex::encode(&tag.as_ref()[..8]))
    }

    /// Seals an app's secret values.
    pub fn seal(
        &self,
        app: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, VaultError> {
        let mut data =
            serde_json::to_vec(values).map_err(|e| VaultError::Encoding(e.to_string()))?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| VaultError::Random)?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(app.as_bytes()),
                &mut data,
            )
            .map_err(|_| VaultError::Encoding("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens what `seal` made for the same app.
    pub fn open(&self, app: &str, sealed: &[u8]) -> Result<BTreeMap<String, String>, VaultError> {
        if sealed.len() < NONCE_LEN {
            return Err(VaultError::Open(app.to_string()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| VaultError::Open(app.to_string()))?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(app.as_bytes()), &mut buf)
            .map_err(|_| VaultError::Open(app.to_string()))?;
        serde_json::from_slice(plain).map_err(|e| VaultError::Encoding(e.to_string()))
    }
}

/// The agent API's bearer token from its file, created (0600, 256 random bits as hex)
/// when it does not exist.
pub fn api_token(path: &Path) -> Result<String, VaultError> {
    let bytes = private_file(path, &SystemRandom::new(), |r: &mut [u8; KEY_LEN]| {
        hex::encode(r).into_bytes()
    })?;
    let token = String::from_utf8_lossy(&bytes).trim().to_string();
    if token.len() < 16 {
        return Err(VaultError::BadKey {
            path: path.to_path_buf(),
            reason: "a token of at least 16 characters is needed".into(),
        });
    }
    Ok(token)
}

/// Reads a file that must be private to its owner, or creates it with `make` applied to
/// 32 random bytes: written to a private temp file, synced, then linked into place
/// (`link` never replaces an existing file, so two agents starting at once agree on one
/// key), and the directory synced. A crash leaves either no key or a whole one.
///
/// Deliberately not `shellwego_sys::atomic::write_file`: that one replaces whatever is
/// there (a rename), which for a key would let a second agent overwrite the key the first
/// one already sealed secrets with. Creation here must be no-clobber, and its temp file
/// is born 0600 rather than with the umask's mode.
fn private_file(
    path: &Path,
    rng: &SystemRandom,
    make: impl FnOnce(&mut [u8; KEY_LEN]) -> Vec<u8>,
) -> Result<Vec<u8>, VaultError> {
    let io = |source| VaultError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(VaultError::BadKey {
                    path: path.to_path_buf(),
                    reason: format!(
                        "mode {:o} lets others read it; run `chmod 600 {}`",
                        mode & 0o777,
                        path.display()
                    ),
                });
            }
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut random = [0u8; KEY_LEN];
            rng.fill(&mut random).map_err(|_| VaultError::Random)?;
            let bytes = make(&mut random);
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let written = (|| {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::hard_link(&tmp, path)
            })();
            let _ = std::fs::remove_file(&tmp);
            match written {
                Ok(()) => {
                    if let Some(dir) = path.parent() {
                        shellwego_sys::atomic::sync_dir(dir).map_err(io)?;
                    }
                    Ok(bytes)
                }
                // Another process made it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::read(path).map_err(io)
                }
                Err(e) => Err(io(e)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// Compares two byte strings in time that depends only on their lengths (`subtle`, whose
/// comparison the optimiser is kept from turning into an early exit).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<String, String> {
        BTreeMap::from([("SOVEREIGN_KEY".to_string(), "topsecret".to_string())])
    }

    #[test]
    fn seal_open_round_trip_and_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k/secrets.key");
        let v = Vault::open_or_create(&key).unwrap();
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = v.seal("web", &values()).unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"topsecret"));
        assert_ne!(sealed, v.seal("web", &values()).unwrap(), "fresh nonce");
        // Fingerprints: stable for the same values, different for others or another key.
        let vals = values();
        let fp = v.fingerprint("web", &vals).unwrap();
        assert_eq!(fp, v.fingerprint("web", &vals).unwrap());
        assert!(!fp.contains("topsecret") && fp.len() == 16);
        let mut changed = vals.clone();
        changed.insert("EXTRA".into(), "x".into());
        assert_ne!(fp, v.fingerprint("web", &changed).unwrap());
        assert_ne!(fp, v.fingerprint("api", &vals).unwrap());
        let other = Vault::open_or_create(&dir.path().join("other.key")).unwrap();
        assert_ne!(fp, other.fingerprint("web", &vals).unwrap());
        // The same key file opens it again, in another process's lifetime.
        let again = Vault::open_or_create(&key).unwrap();
        assert_eq!(again.open("web", &sealed).unwrap(), values());
        // Another app's record, a flipped bit, a truncated blob: refused.
        assert!(matches!(
            again.open("db", &sealed),
            Err(VaultError::Open(_))
        ));
        let mut flipped = sealed.clone();
        flipped[20] ^= 1;
        assert!(again.open("web", &flipped).is_err());
        assert!(again.open("web", &sealed[..5]).is_err());
    }

    #[test]
    fn refuses_a_readable_or_short_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secrets.key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Vault::open_or_create(&key).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(&key, [7u8; 5]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Vault::open_or_create(&key).err().unwrap().to_string();
        assert!(e.contains("5 bytes"), "{e}");
    }

    #[test]
    fn api_token_is_created_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.token");
        let t = api_token(&path).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(api_token(&path).unwrap(), t);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(constant_time_eq(t.as_bytes(), t.as_bytes()));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "api.token")
            .collect();
        assert!(leftovers.is_empty(), "no temp file left: {leftovers:?}");
        assert!(!constant_time_eq(t.as_bytes(), b"nope"));
    }
}
