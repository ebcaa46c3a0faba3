//! Keys: the node's ed25519 identity (made once, kept in the state directory, never regenerated
//! while its file exists) and the key files of twins (users) that the CLI signs with.
//!
//! A key file holds the 32-byte secret seed as 64 hex digits and a newline, mode 0600. The
//! public key is shown as 64 hex digits. The same key signs registrar requests, deployments
//! and (with the TF Chain backend) chain extrinsics.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// File name of the node key inside the state directory.
pub const NODE_KEY_FILE: &str = "node.key";

/// An ed25519 key pair read from or written to a key file.
#[derive(Clone)]
pub struct KeyPair {
    signing: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({})", self.public_hex())
    }
}

impl KeyPair {
    /// A new random key from the OS's generator.
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// From a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.public().as_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// Reads a key file; refuses one that others can read.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).with_context(|| format!("key file {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "key file {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        let seed = parse_hex32(text.trim())
            .with_context(|| format!("key file {} is not 64 hex digits", path.display()))?;
        Ok(Self::from_seed(seed))
    }

    /// Writes a new key file (0600); fails if the file exists.
    pub fn save_new(&self, path: &Path) -> Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating key file {}", path.display()))?;
        writeln!(file, "{}", hex::encode(self.signing.to_bytes()))?;
        file.sync_all()?;
        Ok(())
    }
}

/// The node's key: loaded when `state_dir/node.key` exists, made (and synced to disk, with
/// the directory) on first start otherwise.
pub fn load_or_create_node_key(state_dir: &Path) -> Result<(KeyPair, bool)> {
    let path = node_key_path(state_dir);
    match fs::symlink_metadata(&path) {
        Ok(_) => Ok((KeyPair::load(&path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate();
            key.save_new(&path)?;
            if let Ok(dir) = fs::File::open(state_dir) {
                let _ = dir.sync_all();
            }
            Ok((key, true))
        }
        Err(e) => Err(e).with_context(|| format!("node key {}", path.display())),
    }
}

pub fn node_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(NODE_KEY_FILE)
}

/// 64 hex digits -> 32 bytes.
pub fn parse_hex32(text: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(text).context("not hex")?;
    bytes
        .try_into()
        .map_err(|v: Vec<u8>| anyhow::anyhow!("{} bytes, expected 32", v.len()))
}

/// A public key from 64 hex digits.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey> {
    let bytes = parse_hex32(text)?;
    VerifyingKey::from_bytes(&bytes).context("not a valid ed25519 public key")
}

/// Verifies an ed25519 signature given as bytes.
pub fn verify(public: &VerifyingKey, msg: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    public.verify_strict(msg, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (a, made) = load_or_create_node_key(dir.path()).unwrap();
        assert!(made);
        let mode = fs::metadata(node_key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, made) = load_or_create_node_key(dir.path()).unwrap();
        assert!(!made);
        assert_eq!(a.public_hex(), b.public_hex());
    }

    #[test]
    fn a_readable_or_garbled_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        KeyPair::generate().save_new(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(KeyPair::load(&path)
            .unwrap_err()
            .to_string()
            .contains("readable by others"));
        fs::write(&path, "zz\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(KeyPair::load(&path).is_err());
    }

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let k = KeyPair::generate();
        let sig = k.sign(b"m");
        assert!(verify(&k.public(), b"m", &sig));
        assert!(!verify(&k.public(), b"n", &sig));
        assert!(!verify(&KeyPair::generate().public(), b"m", &sig));
        assert!(!verify(&k.public(), b"m", &sig[..63]));
    }
}
