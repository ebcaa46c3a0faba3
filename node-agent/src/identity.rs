//! Keys: the node's identity (an ed25519 key made once, kept in the state directory, never
//! regenerated while its file exists) and the key files of twins (users) that the CLI signs with.
//!
//! A twin's key is its TF Chain account: 32 bytes that are an ed25519 or an sr25519 public key
//! ([`PublicKey`], scheme-agnostic, as the chain's `AccountId32` is). A signature names its
//! scheme ([`SignatureType`], ed25519 when it says nothing) and is checked against those 32
//! bytes with that scheme, as the chain checks a `MultiSignature` against an account: the dev
//! accounts (`//Alice`) and most grid users have sr25519 accounts, nodes have ed25519 ones.
//! sr25519 signs with Substrate's signing context (`substrate`), so a signature made by any
//! Substrate tool for the same bytes verifies here.
//!
//! A key file is one line, mode 0600:
//! - 64 hex digits, or `ed25519:` and 64 hex digits: an ed25519 secret seed (what `keygen`
//!   and the node write);
//! - `sr25519:` and a secret URI: a BIP-39 mnemonic with optional `//hard` and `/soft`
//!   derivations and a `///password`, a dev account (`//Alice`), or `0x` and a 64-hex-digit
//!   mini secret key (what `keygen --scheme sr25519` writes).
//!
//! The same key signs registrar requests, deployments and (with the TF Chain backend) chain
//! extrinsics.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use subxt_signer::sr25519;
use utoipa::ToSchema;

/// File name of the node key inside the state directory.
pub const NODE_KEY_FILE: &str = "node.key";

/// Longest key file read (a 24-word mnemonic with derivations is far shorter).
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// The signature scheme of a key (and of the signatures it makes).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SignatureType {
    #[default]
    Ed25519,
    Sr25519,
}

impl SignatureType {
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureType::Ed25519 => "ed25519",
            SignatureType::Sr25519 => "sr25519",
        }
    }

    /// Whether this is the default (left out of a deployment's JSON).
    pub fn is_default(&self) -> bool {
        *self == SignatureType::default()
    }
}

impl std::fmt::Display for SignatureType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SignatureType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ed25519" => Ok(SignatureType::Ed25519),
            "sr25519" => Ok(SignatureType::Sr25519),
            _ => bail!("signature type {s:?} is neither ed25519 nor sr25519"),
        }
    }
}

/// A twin's public key: the 32 bytes of its chain account, whatever its scheme.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_bytes(self) -> [u8; 32] {
        self.0
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

/// The secret half of a key pair.
#[derive(Clone)]
enum Secret {
    Ed25519(SigningKey),
    /// The key and the secret URI it was made from (what its key file holds).
    Sr25519(sr25519::Keypair, String),
}

/// A key pair (ed25519 or sr25519) read from or written to a key file.
#[derive(Clone)]
pub struct KeyPair {
    secret: Secret,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({} {})", self.scheme(), self.public_hex())
    }
}

impl KeyPair {
    /// A new random ed25519 key from the OS's generator.
    pub fn generate() -> Self {
        Self {
            secret: Secret::Ed25519(SigningKey::generate(&mut rand_core::OsRng)),
        }
    }

    /// A new random key of `scheme` (sr25519: a random mini secret key, kept as `0x<hex>`).
    pub fn generate_with(scheme: SignatureType) -> Self {
        match scheme {
            SignatureType::Ed25519 => Self::generate(),
            SignatureType::Sr25519 => {
                let mut seed = [0u8; 32];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
                Self::from_secret_uri(&format!("0x{}", hex::encode(seed)))
                    .expect("a 32-byte mini secret key is always valid")
            }
        }
    }

    /// An ed25519 key from a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            secret: Secret::Ed25519(SigningKey::from_bytes(&seed)),
        }
    }

    /// An sr25519 key from a secret URI (`//Alice`, a mnemonic with derivations, `0x<seed>`).
    /// The error does not repeat the URI (it is a secret).
    pub fn from_secret_uri(uri: &str) -> Result<Self> {
        let parsed = subxt_signer::SecretUri::from_str(uri)
            .map_err(|_| anyhow::anyhow!("not a secret URI (phrase/derivations///password)"))?;
        let key = sr25519::Keypair::from_uri(&parsed).map_err(|e| {
            anyhow::anyhow!(
                "the secret URI does not give an sr25519 key: {}",
                uri_error(&e)
            )
        })?;
        Ok(Self {
            secret: Secret::Sr25519(key, uri.to_string()),
        })
    }

    pub fn scheme(&self) -> SignatureType {
        match self.secret {
            Secret::Ed25519(_) => SignatureType::Ed25519,
            Secret::Sr25519(..) => SignatureType::Sr25519,
        }
    }

    /// The public key (the chain account of the twin or node this key is).
    pub fn public(&self) -> PublicKey {
        match &self.secret {
            Secret::Ed25519(k) => PublicKey(k.verifying_key().to_bytes()),
            Secret::Sr25519(k, _) => PublicKey(k.public_key().0),
        }
    }

    pub fn public_hex(&self) -> String {
        self.public().to_hex()
    }

    /// Signs `msg` with this key's scheme (sr25519 with the `substrate` signing context).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        match &self.secret {
            Secret::Ed25519(k) => k.sign(msg).to_bytes(),
            Secret::Sr25519(k, _) => k.sign(msg).0,
        }
    }

    /// The sr25519 key pair, for signers that need it (chain extrinsics).
    pub fn sr25519(&self) -> Option<&sr25519::Keypair> {
        match &self.secret {
            Secret::Sr25519(k, _) => Some(k),
            Secret::Ed25519(_) => None,
        }
    }

    /// Reads a key file (module doc); refuses one that others can read.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).with_context(|| format!("key file {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "key file {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        if meta.len() > MAX_KEY_FILE_BYTES {
            bail!(
                "key file {} is {} bytes (a key file is one line)",
                path.display(),
                meta.len()
            );
        }
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        Self::parse(text.trim()).with_context(|| format!("key file {}", path.display()))
    }

    /// A key file's content (module doc).
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(uri) = text.strip_prefix("sr25519:") {
            return Self::from_secret_uri(uri.trim());
        }
        let hex = text.strip_prefix("ed25519:").unwrap_or(text);
        let seed = parse_hex32(hex)
            .context("neither 64 hex digits (an ed25519 seed) nor `sr25519:` and a secret URI")?;
        Ok(Self::from_seed(seed))
    }

    /// What a key file holds for this key.
    fn file_text(&self) -> String {
        match &self.secret {
            Secret::Ed25519(k) => hex::encode(k.to_bytes()),
            Secret::Sr25519(_, uri) => format!("sr25519:{uri}"),
        }
    }

    /// Writes a new key file (0600); fails if the file exists.
    pub fn save_new(&self, path: &Path) -> Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating key file {}", path.display()))?;
        writeln!(file, "{}", self.file_text())?;
        file.sync_all()?;
        Ok(())
    }
}

/// An sr25519 key error without the secret in it.
fn uri_error(e: &sr25519::Error) -> &'static str {
    match e {
        sr25519::Error::Phrase(_) => "the phrase is not a BIP-39 mnemonic",
        sr25519::Error::Hex(_) => "the 0x seed is not 64 hex digits",
        _ => "invalid seed",
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

/// A public key from 64 hex digits (any 32 bytes: whether they are a key of a scheme shows
/// when a signature is checked).
pub fn parse_public_key(text: &str) -> Result<PublicKey> {
    parse_hex32(text).map(PublicKey)
}

/// Verifies a `scheme` signature given as bytes (false for bytes that are no signature, or a
/// key that is no point of that scheme).
pub fn verify(public: &PublicKey, scheme: SignatureType, msg: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    match scheme {
        SignatureType::Ed25519 => {
            let Ok(key) = VerifyingKey::from_bytes(&public.0) else {
                return false;
            };
            key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
                .is_ok()
        }
        SignatureType::Sr25519 => {
            sr25519::verify(&sr25519::Signature(sig), msg, &sr25519::PublicKey(public.0))
        }
    }
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
    fn signatures_verify_only_for_their_message_key_and_scheme() {
        for scheme in [SignatureType::Ed25519, SignatureType::Sr25519] {
            let k = KeyPair::generate_with(scheme);
            assert_eq!(k.scheme(), scheme);
            let sig = k.sign(b"m");
            assert!(verify(&k.public(), scheme, b"m", &sig), "{scheme}");
            assert!(!verify(&k.public(), scheme, b"n", &sig));
            let other = KeyPair::generate_with(scheme);
            assert!(!verify(&other.public(), scheme, b"m", &sig));
            assert!(!verify(&k.public(), scheme, b"m", &sig[..63]));
        }
        // A signature checked with the other scheme fails, both ways.
        let ed = KeyPair::generate();
        let sr = KeyPair::generate_with(SignatureType::Sr25519);
        assert!(!verify(
            &ed.public(),
            SignatureType::Sr25519,
            b"m",
            &ed.sign(b"m")
        ));
        assert!(!verify(
            &sr.public(),
            SignatureType::Ed25519,
            b"m",
            &sr.sign(b"m")
        ));
    }

    /// The dev accounts' public keys, as every Substrate tool derives them (`subkey inspect
    /// //Alice`): the chain accounts a key file `sr25519://Alice` signs for.
    #[test]
    fn sr25519_key_files_give_the_substrate_accounts() {
        let alice = "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d";
        let bob = "8eaf04151687736326c9fea17e25fc5287613693c912909cb226aa4794f26a48";
        assert_eq!(
            KeyPair::parse("sr25519://Alice").unwrap().public_hex(),
            alice
        );
        assert_eq!(KeyPair::parse("sr25519: //Bob").unwrap().public_hex(), bob);
        // The dev phrase spelled out, with the derivation: the same account.
        let phrase = "bottom drive obey lake curtain smoke basket hold race lonely fit walk";
        let k = KeyPair::parse(&format!("sr25519:{phrase}//Alice")).unwrap();
        assert_eq!(k.public_hex(), alice);
        assert_eq!(k.scheme(), SignatureType::Sr25519);
        // A signature Alice makes verifies as subxt's (the chain's) sr25519 does.
        let dev = subxt_signer::sr25519::dev::alice();
        assert!(verify(
            &k.public(),
            SignatureType::Sr25519,
            b"x",
            &dev.sign(b"x").0
        ));

        // Written and read back (0600), the same key; garbage is refused without echoing it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let made = KeyPair::generate_with(SignatureType::Sr25519);
        made.save_new(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("sr25519:0x"), "{text}");
        assert_eq!(KeyPair::load(&path).unwrap().public(), made.public());
        for bad in [
            "sr25519:not a mnemonic at all",
            "sr25519:0x12",
            "ed25519:zz",
        ] {
            let err = format!("{:#}", KeyPair::parse(bad).unwrap_err());
            assert!(!err.contains("mnemonic at all"), "{err}");
        }
        // The old format (64 hex digits) and its explicit spelling are ed25519.
        let ed = KeyPair::from_seed([5; 32]);
        for text in [
            hex::encode([5u8; 32]),
            format!("ed25519:{}", hex::encode([5u8; 32])),
        ] {
            let k = KeyPair::parse(&text).unwrap();
            assert_eq!(
                (k.scheme(), k.public()),
                (SignatureType::Ed25519, ed.public())
            );
        }
    }
}
