//! Signed HTTP requests, for the agent's API over TCP and for writes to a registrar.
//!
//! A request is signed by a twin (by id) or, before it has a twin, by a bare public key. Headers:
//! `X-Grid-Signer: twin:<id>` or `key:<64 hex>`, `X-Grid-Timestamp: <unix seconds>`,
//! `X-Grid-Nonce: <32 hex, random>`, `X-Grid-Signature: <128 hex>`, and
//! `X-Grid-Signature-Type: ed25519|sr25519` (the signer's scheme, see [`crate::identity`];
//! ed25519 when absent: a twin whose chain account is sr25519 signs with it). The signature covers
//! `gridnode/request/v1\n{METHOD}\n{path and query}\n{hex blake3(body)}\n{timestamp}\n{nonce}\n{signer}`,
//! so two requests with the same content are still two different requests (a retry is not a
//! replay), and an exact copy of one is.
//! A timestamp more than [`MAX_SKEW_SECS`] from the server's clock is refused, and a signature
//! seen before within that window is a replay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::identity::{self, KeyPair, PublicKey, SignatureType};
use crate::state::{Remembered, Store};

pub const H_SIGNER: &str = "x-grid-signer";
pub const H_TIMESTAMP: &str = "x-grid-timestamp";
pub const H_SIGNATURE: &str = "x-grid-signature";
pub const H_NONCE: &str = "x-grid-nonce";
pub const H_SIGNATURE_TYPE: &str = "x-grid-signature-type";

/// How far a request's timestamp may be from the server's clock.
pub const MAX_SKEW_SECS: i64 = 60;

/// Who signed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    Twin(u32),
    Key(PublicKey),
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Twin(id) => write!(f, "twin:{id}"),
            Signer::Key(k) => write!(f, "key:{}", hex::encode(k.as_bytes())),
        }
    }
}

impl std::str::FromStr for Signer {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        if let Some(id) = s.strip_prefix("twin:") {
            return id
                .parse()
                .map(Signer::Twin)
                .map_err(|_| AuthError::Malformed("signer twin id is not a u32"));
        }
        if let Some(k) = s.strip_prefix("key:") {
            return identity::parse_public_key(k)
                .map(Signer::Key)
                .map_err(|_| AuthError::Malformed("signer key is not 64 hex digits"));
        }
        Err(AuthError::Malformed(
            "signer is neither twin:<id> nor key:<hex>",
        ))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("request is not signed (missing {0} header)")]
    Unsigned(&'static str),
    #[error("malformed signature headers: {0}")]
    Malformed(&'static str),
    #[error(
        "request timestamp is {0} s from the server's clock (at most {MAX_SKEW_SECS} s allowed)"
    )]
    Skew(i64),
    #[error("unknown twin {0}")]
    UnknownTwin(u32),
    #[error("signature does not match the request and the signer's key")]
    BadSignature,
    #[error("replayed request (this signature was already used)")]
    Replay,
    #[error("cannot check for a replay: {0}")]
    Unavailable(String),
}

/// The bytes a request signature covers.
pub fn message(
    method: &str,
    path: &str,
    body: &[u8],
    timestamp: i64,
    nonce: &str,
    signer: &Signer,
) -> Vec<u8> {
    format!(
        "gridnode/request/v1\n{}\n{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path,
        blake3::hash(body).to_hex(),
        timestamp,
        nonce,
        signer
    )
    .into_bytes()
}

/// The five headers of a signed request (signed with `key`'s scheme).
pub fn sign(
    key: &KeyPair,
    signer: &Signer,
    method: &str,
    path: &str,
    body: &[u8],
    timestamp: i64,
) -> [(&'static str, String); 5] {
    let mut nonce = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let nonce = hex::encode(nonce);
    let sig = key.sign(&message(method, path, body, timestamp, &nonce, signer));
    [
        (H_SIGNER, signer.to_string()),
        (H_TIMESTAMP, timestamp.to_string()),
        (H_NONCE, nonce),
        (H_SIGNATURE, hex::encode(sig)),
        (H_SIGNATURE_TYPE, key.scheme().to_string()),
    ]
}

/// Signature headers as read from a request, before the signer's key is known.
#[derive(Debug, Clone)]
pub struct SignedHeaders {
    pub signer: Signer,
    pub timestamp: i64,
    pub nonce: String,
    pub signature: [u8; 64],
    /// The scheme the signature is checked with (ed25519 when the header is absent).
    pub signature_type: SignatureType,
}

impl SignedHeaders {
    /// Reads the headers through `get`; `Ok(None)` when the request carries none of them.
    pub fn parse<'a>(
        get: impl Fn(&'static str) -> Option<&'a str>,
    ) -> Result<Option<Self>, AuthError> {
        let (signer, ts, sig) = (get(H_SIGNER), get(H_TIMESTAMP), get(H_SIGNATURE));
        if signer.is_none() && ts.is_none() && sig.is_none() && get(H_NONCE).is_none() {
            return Ok(None);
        }
        let signer: Signer = signer.ok_or(AuthError::Unsigned(H_SIGNER))?.parse()?;
        let timestamp = ts
            .ok_or(AuthError::Unsigned(H_TIMESTAMP))?
            .parse()
            .map_err(|_| AuthError::Malformed("timestamp is not an integer"))?;
        let nonce = get(H_NONCE).ok_or(AuthError::Unsigned(H_NONCE))?;
        if nonce.is_empty() || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::Malformed("nonce is not 1-64 hex digits"));
        }
        let nonce = nonce.to_string();
        let sig = sig.ok_or(AuthError::Unsigned(H_SIGNATURE))?;
        let bytes = hex::decode(sig).map_err(|_| AuthError::Malformed("signature is not hex"))?;
        let signature = bytes
            .try_into()
            .map_err(|_| AuthError::Malformed("signature is not 64 bytes"))?;
        let signature_type = match get(H_SIGNATURE_TYPE) {
            None => SignatureType::Ed25519,
            Some(t) => t.parse().map_err(|_| {
                AuthError::Malformed("signature type is neither ed25519 nor sr25519")
            })?,
        };
        Ok(Some(Self {
            signer,
            timestamp,
            nonce,
            signature,
            signature_type,
        }))
    }

    /// Checks time, signature (with the scheme it names) and replay, given the signer's
    /// public key (its chain account).
    pub fn verify(
        &self,
        key: &PublicKey,
        method: &str,
        path: &str,
        body: &[u8],
        now: i64,
        replays: &ReplayGuard,
    ) -> Result<(), AuthError> {
        let skew = self.timestamp.saturating_sub(now);
        if skew.abs() > MAX_SKEW_SECS {
            return Err(AuthError::Skew(skew));
        }
        let msg = message(
            method,
            path,
            body,
            self.timestamp,
            &self.nonce,
            &self.signer,
        );
        if !identity::verify(key, self.signature_type, &msg, &self.signature) {
            return Err(AuthError::BadSignature);
        }
        replays.check(&self.signature, self.timestamp, now)
    }
}

/// Signatures seen within the allowed clock window (a request outside it is refused anyway):
/// in memory, or in the agent's database so that a restart of the agent (or of the
/// registrar server) does not make the last minute's requests replayable.
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<[u8; 64], i64>>,
    store: Option<Arc<Store>>,
}

/// Most remembered signatures; beyond it new requests are refused until old ones expire,
/// rather than forgetting signatures that could then be replayed.
pub const MAX_REMEMBERED: usize = 100_000;

impl ReplayGuard {
    /// A guard that remembers signatures in `store` (table `seen_requests`).
    pub fn persistent(store: Arc<Store>) -> Self {
        Self {
            seen: Mutex::default(),
            store: Some(store),
        }
    }

    pub fn check(&self, signature: &[u8; 64], timestamp: i64, now: i64) -> Result<(), AuthError> {
        if let Some(store) = &self.store {
            return match store.remember_request(signature, timestamp, now) {
                Ok(Remembered::New) => Ok(()),
                Ok(Remembered::Seen) => Err(AuthError::Replay),
                Ok(Remembered::Full) => Err(AuthError::Malformed(
                    "too many signed requests in the last minute",
                )),
                Err(e) => Err(AuthError::Unavailable(format!("{e:#}"))),
            };
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_REMEMBERED / 2 {
            seen.retain(|_, ts| (now - *ts).abs() <= MAX_SKEW_SECS);
        }
        if seen.contains_key(signature) {
            return Err(AuthError::Replay);
        }
        if seen.len() >= MAX_REMEMBERED {
            return Err(AuthError::Malformed(
                "too many signed requests in the last minute",
            ));
        }
        seen.insert(*signature, timestamp);
        Ok(())
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(h: &[(&'static str, String)]) -> SignedHeaders {
        SignedHeaders::parse(|name| h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str()))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_signed_request_verifies_once() {
        let key = KeyPair::generate();
        let signer = Signer::Twin(7);
        let h = sign(&key, &signer, "post", "/deployments", b"{}", 1000);
        let parsed = headers(&h);
        assert_eq!(parsed.signer, signer);
        let guard = ReplayGuard::default();
        parsed
            .verify(&key.public(), "POST", "/deployments", b"{}", 1010, &guard)
            .unwrap();
        assert_eq!(
            parsed.verify(&key.public(), "POST", "/deployments", b"{}", 1010, &guard),
            Err(AuthError::Replay)
        );
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let key = KeyPair::generate();
        let signer = Signer::Key(key.public());
        let h = headers(&sign(&key, &signer, "PUT", "/a?b=1", b"body", 50));
        let g = ReplayGuard::default();
        for (m, p, b) in [
            ("GET", "/a?b=1", &b"body"[..]),
            ("PUT", "/a?b=2", b"body"),
            ("PUT", "/a?b=1", b"bodz"),
        ] {
            assert_eq!(
                h.verify(&key.public(), m, p, b, 50, &g),
                Err(AuthError::BadSignature)
            );
        }
        let other = KeyPair::generate();
        assert_eq!(
            h.verify(&other.public(), "PUT", "/a?b=1", b"body", 50, &g),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn the_same_request_signed_twice_is_not_a_replay() {
        let key = KeyPair::generate();
        let g = ReplayGuard::default();
        for _ in 0..2 {
            let h = headers(&sign(&key, &Signer::Twin(1), "POST", "/x", b"b", 10));
            h.verify(&key.public(), "POST", "/x", b"b", 10, &g).unwrap();
        }
    }

    #[test]
    fn a_persistent_guard_remembers_across_reopening_and_forgets_expired() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let key = KeyPair::generate();
        let h = headers(&sign(&key, &Signer::Twin(1), "GET", "/", b"", 1000));
        let old = headers(&sign(&key, &Signer::Twin(1), "GET", "/", b"", 900));
        {
            let g = ReplayGuard::persistent(Arc::new(Store::open(&db).unwrap()));
            h.verify(&key.public(), "GET", "/", b"", 1000, &g).unwrap();
            g.check(&old.signature, 900, 950).unwrap();
        }
        // As after a restart of the agent.
        let store = Arc::new(Store::open(&db).unwrap());
        let g = ReplayGuard::persistent(store.clone());
        assert_eq!(
            h.verify(&key.public(), "GET", "/", b"", 1030, &g),
            Err(AuthError::Replay)
        );
        // A signature whose timestamp left the window is forgotten (it is refused as stale).
        let count = || {
            store
                .with_conn(|c| {
                    c.query_row("SELECT COUNT(*) FROM seen_requests", [], |r| {
                        r.get::<_, i64>(0)
                    })
                })
                .unwrap()
        };
        assert_eq!(count(), 1);
        assert_eq!(
            h.verify(&key.public(), "GET", "/", b"", 1061, &g),
            Err(AuthError::Skew(-61))
        );
    }

    #[test]
    fn stale_or_future_timestamps_are_refused() {
        let key = KeyPair::generate();
        let h = headers(&sign(&key, &Signer::Twin(1), "GET", "/", b"", 1000));
        let g = ReplayGuard::default();
        assert_eq!(
            h.verify(&key.public(), "GET", "/", b"", 1061, &g),
            Err(AuthError::Skew(-61))
        );
        assert_eq!(
            h.verify(&key.public(), "GET", "/", b"", 939, &g),
            Err(AuthError::Skew(61))
        );
    }

    #[test]
    fn partial_or_garbled_headers_are_named() {
        let none = SignedHeaders::parse(|_| None).unwrap();
        assert!(none.is_none());
        let err = SignedHeaders::parse(|n| (n == H_SIGNER).then_some("twin:1")).unwrap_err();
        assert_eq!(err, AuthError::Unsigned(H_TIMESTAMP));
        let err = SignedHeaders::parse(|n| match n {
            H_SIGNER => Some("user:1"),
            _ => Some("1"),
        })
        .unwrap_err();
        assert!(matches!(err, AuthError::Malformed(_)));
    }

    #[test]
    fn a_request_signed_with_sr25519_verifies_with_the_scheme_it_names() {
        let bob = KeyPair::parse("sr25519://Bob").unwrap();
        let g = ReplayGuard::default();
        let h = sign(&bob, &Signer::Twin(2), "GET", "/node", b"", 100);
        assert!(h.contains(&(H_SIGNATURE_TYPE, "sr25519".to_string())));
        let parsed = headers(&h);
        assert_eq!(parsed.signature_type, SignatureType::Sr25519);
        parsed
            .verify(&bob.public(), "GET", "/node", b"", 100, &g)
            .unwrap();
        // The same signature announced as ed25519 (or with no type) does not verify.
        let untyped: Vec<_> = h
            .iter()
            .filter(|(n, _)| *n != H_SIGNATURE_TYPE)
            .cloned()
            .collect();
        assert_eq!(
            headers(&untyped).verify(&bob.public(), "GET", "/node", b"", 100, &g),
            Err(AuthError::BadSignature)
        );
        // An unknown type is named.
        let mut odd = h.to_vec();
        odd.retain(|(n, _)| *n != H_SIGNATURE_TYPE);
        odd.push((H_SIGNATURE_TYPE, "ecdsa".into()));
        let err = SignedHeaders::parse(|name| {
            odd.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        })
        .unwrap_err();
        assert!(matches!(err, AuthError::Malformed(m) if m.contains("signature type")));
    }
}
