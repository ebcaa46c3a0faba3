//! Chunk stores: the `Store` trait, opening a store from its URL, URL redaction (no secret
//! ever reaches an image file) and the id-range `Router`.
//!
//! URL forms:
//! * `dir:///abs/path` (or `dir://rel/path`): chunks as files `<path>/<id[0..2]>/<id>`.
//! * `http://host[:port]/base`, `https://...`: read-only, same layout as `dir://` under `base`
//!   (any static web server over a dir store works).
//! * `redis://[:password@]host:port[/db]`, `zdb://[:password@]host:port[/namespace]`:
//!   key = raw 32-byte id.
//! * `s3://[access:secret@]host[:port]/bucket[/prefix][?region=R&tls=true]`: path-style,
//!   SigV4-signed. Object key `<prefix>/<id hex>`.
//!
//! # Who decides where chunks come from, and with which credentials
//!
//! An image records its stores (routes), but whoever wrote the image chose them, so:
//!
//! * Under a [`StorePolicy`] (the node's allowlist, what the vmm uses) an image route is
//!   opened only when it names a store of the allowlist (same scheme, host, port and path;
//!   credentials and query ignored), and it is then opened with the *allowlist's* URL: the
//!   credentials are the operator's, for that store only. Other routes are skipped with a
//!   warning; an image none of whose routes is allowed cannot be opened. A `dir://` route is
//!   allowed only when the allowlist holds exactly that `dir://` URL. No environment
//!   variable is consulted. [`StorePolicy::anonymous`] (no allowlist at all) opens only an
//!   image's `http(s)://` routes, without credentials.
//! * Without a policy (the `flist` tool on one's own images) an image's routes are opened as
//!   recorded. Credentials from the environment are bound to one store: for a route read
//!   from an image they are used only when `FLIST_STORE_CREDENTIALS_FOR` names that very
//!   store (same matching as the allowlist), so an image pointing at another host never
//!   receives them. For a URL the user typed (`--store`), they are used as before. The
//!   variables: `FLIST_REDIS_PASSWORD`, `FLIST_ZDB_PASSWORD`, `FLIST_S3_ACCESS_KEY` /
//!   `AWS_ACCESS_KEY_ID`, `FLIST_S3_SECRET_KEY` / `AWS_SECRET_ACCESS_KEY`; credentials in
//!   the URL itself always win.
//!
//! Ranged reads ([`Store::get_range`], for the blocks of a blocked chunk): `dir://` reads at an
//! offset, `http(s)://` and `s3://` send a `Range` header (a server that ignores it is read
//! up to the range and cut off there), `redis://` uses `GETRANGE`; `zdb://` fetches the
//! object whole and cuts it.
//!
//! Every store: a reply larger than [`MAX_STORED_CHUNK`] (or than the range asked) is refused; HTTP and S3 never follow
//! redirects (a 3xx is an error naming the store) and have connect/read timeouts. HTTP and S3
//! bodies are read through a bounded reader, so an oversize reply costs at most the cap; the
//! redis crate reads a whole reply before returning it, so redis/zdb replies are checked after
//! reading: which is why they are only ever opened for operator-chosen stores (the allowlist,
//! or a URL typed by the user), never for an image's route under [`StorePolicy::anonymous`].

mod dir;
mod http;
mod policy;
mod redis;
mod router;
mod s3;
#[cfg(test)]
pub(crate) mod testsrv;

pub use dir::DirStore;
pub use http::{range_replies, HttpStore, RangeReplies};
pub use policy::{same_store, StorePolicy};
pub use redis::RedisStore;
pub use router::{parse_route_spec, Router};
pub use s3::S3Store;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use std::sync::Arc;

/// A place chunks live. Implementations are cheap to share between threads.
pub trait Store: Send + Sync {
    /// The store's URL without credentials (used in messages and in images).
    fn url(&self) -> &str;
    /// The stored bytes of chunk `id`; `Error::ChunkNotFound` when absent. The caller verifies.
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>>;
    /// At most `len` stored bytes of chunk `id` from `offset` (fewer when the chunk ends
    /// first); `Error::ChunkNotFound` when absent. The caller verifies. Stores that cannot
    /// read part of an object (zdb) fetch it whole and cut it: the default.
    fn get_range(&self, id: &ChunkId, offset: u64, len: u32) -> Result<Vec<u8>> {
        let all = self.get(id)?;
        Ok(cut(all, offset, len))
    }
    /// Stores `data` under `id` (idempotent).
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<()>;
    /// Whether `id` is present.
    fn exists(&self, id: &ChunkId) -> Result<bool>;
}

/// `[offset, offset + len)` of `bytes`, clamped to its end.
pub(crate) fn cut(mut bytes: Vec<u8>, offset: u64, len: u32) -> Vec<u8> {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let end = start.saturating_add(len as usize).min(bytes.len());
    bytes.truncate(end);
    bytes.drain(..start);
    bytes
}

/// Largest stored chunk (compressed, possibly encrypted) any store may return: a longer
/// reply is refused, whoever sent it.
pub const MAX_STORED_CHUNK: usize = 64 << 20;

/// Environment variable naming the one store the credential variables are for, when the
/// store's URL comes from an image (see the module documentation).
pub const CREDENTIALS_FOR_VAR: &str = "FLIST_STORE_CREDENTIALS_FOR";

/// Whether a store may take credentials missing from its URL from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvCredentials {
    /// Yes: the URL was typed by the user.
    Use,
    /// No: only credentials inside the URL are used.
    Ignore,
}

impl EnvCredentials {
    /// The rule for a URL read from an image: the environment's credentials only when
    /// `FLIST_STORE_CREDENTIALS_FOR` names this store.
    pub fn for_image_route(url: &str) -> Self {
        match std::env::var(CREDENTIALS_FOR_VAR) {
            Ok(bound) if same_store(&bound, url) => EnvCredentials::Use,
            _ => EnvCredentials::Ignore,
        }
    }

    /// `var`'s value, when allowed.
    pub(crate) fn var(self, var: &str) -> Option<String> {
        match self {
            EnvCredentials::Use => std::env::var(var).ok(),
            EnvCredentials::Ignore => None,
        }
    }
}

/// Opens the store named by `url`, a URL the user typed (credentials missing from it may come
/// from the environment).
pub fn open_store(url: &str) -> Result<Arc<dyn Store>> {
    open_store_with(url, EnvCredentials::Use)
}

/// Opens the store named by `url`; `env` says whether credentials may come from the
/// environment.
pub fn open_store_with(url: &str, env: EnvCredentials) -> Result<Arc<dyn Store>> {
    let scheme = url.split("://").next().unwrap_or("");
    let store: Arc<dyn Store> = match scheme {
        "dir" => Arc::new(DirStore::open(url)?),
        "http" | "https" => Arc::new(HttpStore::open(url)?),
        "redis" | "zdb" => Arc::new(RedisStore::open_with(url, env)?),
        "s3" => Arc::new(S3Store::open_with(url, env)?),
        _ => {
            return Err(Error::BadStoreUrl {
                url: redact_url(url),
                reason: "unknown scheme (expected dir, http, https, redis, zdb or s3)".into(),
            })
        }
    };
    Ok(store)
}

/// The schemes a store URL may have.
pub const STORE_SCHEMES: &[&str] = &["dir", "http", "https", "redis", "zdb", "s3"];

/// Checks that `url` names a store this build can open, without opening it: a known scheme,
/// and a host (or, for `dir://`, a path). Every place that accepts a store URL checks it, so a
/// typo is refused where it is typed instead of being written into an image.
pub fn check_store_url(url: &str) -> Result<()> {
    let bad = |reason: String| Error::BadStoreUrl {
        url: redact_url(url),
        reason,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        let hint = if url.starts_with('/') {
            format!("; a local directory store is written dir://{url}")
        } else {
            String::new()
        };
        return Err(bad(format!(
            "no scheme (expected one of {}){hint}",
            STORE_SCHEMES.join(", ")
        )));
    };
    if !STORE_SCHEMES.contains(&scheme) {
        return Err(bad(format!(
            "unknown scheme {scheme:?} (expected one of {})",
            STORE_SCHEMES.join(", ")
        )));
    }
    if scheme == "dir" {
        if rest.is_empty() {
            return Err(bad("a dir:// store needs a path".into()));
        }
        return Ok(());
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a valid URL: {e}")))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad(format!("a {scheme}:// store needs a host")));
    }
    Ok(())
}

/// `url` without userinfo and without secret-looking query parameters.
pub fn redact_url(url: &str) -> String {
    if url.starts_with("dir://") {
        return url.to_string();
    }
    let parsed = url
        .contains("://")
        .then(|| url::Url::parse(url).ok())
        .flatten();
    let Some(mut u) = parsed else {
        // Not a URL (a bare path, say): shown as written, but never what precedes an `@`.
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("<redacted>@{host}"),
            None => url.to_string(),
        };
    };
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            ![
                "secret",
                "password",
                "token",
                "key",
                "signature",
                "credential",
            ]
            .iter()
            .any(|s| k.contains(s))
        })
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        u.set_query(None);
    } else {
        u.query_pairs_mut().clear().extend_pairs(kept);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_checked_where_they_are_typed() {
        for good in [
            "dir:///tmp/x",
            "dir://relative",
            "http://h:8080/chunks",
            "https://h/",
            "redis://:pw@127.0.0.1:6379/0",
            "zdb://h:9900/ns",
            "s3://h:3900/bucket?region=garage",
        ] {
            check_store_url(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let refused = |url: &str, words: &[&str]| {
            let e = check_store_url(url).unwrap_err().to_string();
            for w in words {
                assert!(e.contains(w), "{url}: {e:?} lacks {w:?}");
            }
        };
        refused("dri://x", &["\"dri\"", "unknown scheme", "dir, http"]);
        refused("/tmp/store", &["no scheme", "dir:///tmp/store"]);
        refused("dir://", &["needs a path"]);
        refused("http://", &["http://"]);
        refused("redis:///0", &["needs a host"]);
        refused("s3://a:secret@/b", &["host"]);
        assert!(!check_store_url("s3://a:secret@/b")
            .unwrap_err()
            .to_string()
            .contains("secret"));
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("s3://a:b@h:1/bkt?region=x&secret_key=y"),
            "s3://h:1/bkt?region=x"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("dir:///tmp/x"), "dir:///tmp/x");
        assert_eq!(redact_url("/tmp/store"), "/tmp/store");
        assert_eq!(redact_url("user:pw@host/x"), "<redacted>@host/x");
        assert!(open_store("ftp://x")
            .err()
            .unwrap()
            .to_string()
            .contains("ftp://x"));
    }
}
