//! `http(s)://` store (read-only): GET `<base>/<first two hex digits>/<hex id>`, the layout of
//! a `dir://` store, so any static web server can serve an image's chunks.

use super::Store;
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use std::io::Read;
use std::time::Duration;

/// Largest chunk accepted from a remote store (guards against a hostile server).
pub(crate) const MAX_CHUNK_BYTES: u64 = 64 * 1024 * 1024;

pub struct HttpStore {
    base: String,
    url: String,
    agent: ureq::Agent,
}

impl HttpStore {
    pub fn open(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| Error::BadStoreUrl {
            url: super::redact_url(url),
            reason: e.to_string(),
        })?;
        if parsed.host_str().is_none() {
            return Err(Error::BadStoreUrl {
                url: super::redact_url(url),
                reason: "missing host".into(),
            });
        }
        Ok(HttpStore {
            base: url.trim_end_matches('/').to_string(),
            url: super::redact_url(url),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout(Duration::from_secs(60))
                .max_idle_connections_per_host(16)
                .build(),
        })
    }

    fn chunk_url(&self, id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!("{}/{}/{}", self.base, &hex[..2], hex)
    }
}

impl Store for HttpStore {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        match self.agent.get(&self.chunk_url(id)).call() {
            Ok(resp) => {
                let mut buf = Vec::new();
                resp.into_reader()
                    .take(MAX_CHUNK_BYTES)
                    .read_to_end(&mut buf)
                    .map_err(|e| Error::store(&self.url, format!("reading chunk {id}: {e}")))?;
                Ok(buf)
            }
            Err(ureq::Error::Status(404, _)) => Err(Error::ChunkNotFound {
                id: id.to_hex(),
                store: self.url.clone(),
            }),
            Err(ureq::Error::Status(code, _)) => Err(Error::store(
                &self.url,
                format!("GET chunk {id}: HTTP {code}"),
            )),
            Err(e) => Err(Error::store(&self.url, format!("GET chunk {id}: {e}"))),
        }
    }

    fn put(&self, id: &ChunkId, _data: &[u8]) -> Result<()> {
        Err(Error::store(
            &self.url,
            format!("cannot store chunk {id}: http stores are read-only"),
        ))
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        match self.agent.head(&self.chunk_url(id)).call() {
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(404, _)) => Ok(false),
            Err(e) => Err(Error::store(&self.url, format!("HEAD chunk {id}: {e}"))),
        }
    }
}
