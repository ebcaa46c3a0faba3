//! Chunk stores: the `Store` trait, opening a store from its URL, URL redaction (no secret
//! ever reaches an image file) and the id-range `Router`.
//!
//! URL forms:
//! * `dir:///abs/path` (or `dir://rel/path`): chunks as files `<path>/<id[0..2]>/<id>`.
//! * `http://host[:port]/base`, `https://...`: read-only, same layout as `dir://` under `base`
//!   (any static web server over a dir store works).
//! * `redis://[:password@]host:port[/db]`, `zdb://host:port[/namespace]`: key = raw 32-byte id.
//!   The password may also come from `FLIST_REDIS_PASSWORD` / `FLIST_ZDB_PASSWORD`.
//! * `s3://[access:secret@]host[:port]/bucket[/prefix][?region=R&tls=true]`: path-style,
//!   SigV4-signed; credentials may come from `FLIST_S3_ACCESS_KEY`/`FLIST_S3_SECRET_KEY` or
//!   `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`. Object key `<prefix>/<id hex>`.

mod dir;
mod http;
mod redis;
mod router;
mod s3;

pub use dir::DirStore;
pub use http::HttpStore;
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
    /// Stores `data` under `id` (idempotent).
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<()>;
    /// Whether `id` is present.
    fn exists(&self, id: &ChunkId) -> Result<bool>;
}

/// Opens the store named by `url`.
pub fn open_store(url: &str) -> Result<Arc<dyn Store>> {
    let scheme = url.split("://").next().unwrap_or("");
    let store: Arc<dyn Store> = match scheme {
        "dir" => Arc::new(DirStore::open(url)?),
        "http" | "https" => Arc::new(HttpStore::open(url)?),
        "redis" | "zdb" => Arc::new(RedisStore::open(url)?),
        "s3" => Arc::new(S3Store::open(url)?),
        _ => {
            return Err(Error::BadStoreUrl {
                url: redact_url(url),
                reason: "unknown scheme (expected dir, http, https, redis, zdb or s3)".into(),
            })
        }
    };
    Ok(store)
}

/// `url` without userinfo and without secret-looking query parameters.
pub fn redact_url(url: &str) -> String {
    if url.starts_with("dir://") {
        return url.to_string();
    }
    let Ok(mut u) = url::Url::parse(url) else {
        return "<unparseable store URL>".to_string();
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
        assert!(open_store("ftp://x")
            .err()
            .unwrap()
            .to_string()
            .contains("ftp://x"));
    }
}
