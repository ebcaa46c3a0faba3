//! `http(s)://` store (read-only): GET `<base>/<first two hex digits>/<hex id>`, the layout of
//! a `dir://` store, so any static web server can serve an image's chunks. Redirects are
//! never followed (a 3xx is an error naming the store: a store must not steer the node to
//! another address) and a body longer than [`MAX_STORED_CHUNK`] is refused.

use super::{Store, MAX_STORED_CHUNK};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use std::io::Read;
use std::time::Duration;

/// The error for a 3xx answer (redirects are not followed), naming the store and where it
/// pointed.
pub(crate) fn redirect_error(store: &str, id: &ChunkId, resp: &ureq::Response) -> Error {
    let to = resp
        .header("location")
        .map(super::redact_url)
        .unwrap_or_else(|| "nowhere".into());
    Error::store(
        store,
        format!(
            "chunk {id}: HTTP {} redirect to {to} refused (stores must answer directly)",
            resp.status()
        ),
    )
}

/// The body of a successful answer for chunk `id`, at most [`MAX_STORED_CHUNK`] bytes.
pub(crate) fn read_body(store: &str, id: &ChunkId, resp: ureq::Response) -> Result<Vec<u8>> {
    if resp.status() >= 300 {
        return Err(redirect_error(store, id, &resp));
    }
    let mut buf = Vec::new();
    resp.into_reader()
        .take(MAX_STORED_CHUNK as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::store(store, format!("reading chunk {id}: {e}")))?;
    if buf.len() > MAX_STORED_CHUNK {
        return Err(Error::store(
            store,
            format!(
                "chunk {id}: reply larger than the largest stored chunk ({MAX_STORED_CHUNK} bytes)"
            ),
        ));
    }
    Ok(buf)
}

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
                .timeout_read(Duration::from_secs(30))
                .timeout(Duration::from_secs(60))
                .redirects(0)
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
            Ok(resp) => read_body(&self.url, id, resp),
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
            Ok(resp) if resp.status() >= 300 => Err(redirect_error(&self.url, id, &resp)),
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(404, _)) => Ok(false),
            Err(e) => Err(Error::store(&self.url, format!("HEAD chunk {id}: {e}"))),
        }
    }
}
