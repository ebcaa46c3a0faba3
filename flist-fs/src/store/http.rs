//! `http(s)://` store (read-only): GET `<base>/<first two hex digits>/<hex id>`, the layout of
//! a `dir://` store, so any static web server can serve an image's chunks. Redirects are
//! never followed (a 3xx is an error naming the store: a store must not steer the node to
//! another address) and a body longer than [`MAX_STORED_CHUNK`] is refused. Ranged reads send
//! a `Range` header; see [`read_range_body`]. How servers answer them is counted
//! ([`range_replies`]): a server that ignores ranges still works, at the cost of whole chunks,
//! and is named once in the log.

use super::{Store, MAX_STORED_CHUNK};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

static RANGES_ANSWERED: AtomicU64 = AtomicU64::new(0);
static RANGES_IGNORED: AtomicU64 = AtomicU64::new(0);
static IGNORED_LOGGED: AtomicBool = AtomicBool::new(false);

/// How HTTP and S3 servers answered this process's ranged reads so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RangeReplies {
    /// Partial answers (206) carrying exactly the range asked for.
    pub answered: u64,
    /// Whole-object answers (200): the server ignored the range, the chunk was read up to the
    /// end of the range and cut.
    pub ignored: u64,
}

/// The process-wide counts of [`RangeReplies`].
pub fn range_replies() -> RangeReplies {
    RangeReplies {
        answered: RANGES_ANSWERED.load(Ordering::Relaxed),
        ignored: RANGES_IGNORED.load(Ordering::Relaxed),
    }
}

/// Checks a 206's `Content-Range` (`bytes START-END/TOTAL`, TOTAL may be `*`) against the
/// range asked for: it must start at `offset` and end within `len` bytes. Returns the length
/// of the body it announces.
fn check_content_range(
    store: &str,
    id: &ChunkId,
    header: Option<&str>,
    offset: u64,
    len: u32,
) -> Result<u64> {
    let bad = |why: &str| {
        Error::store(
            store,
            format!(
                "chunk {id}: partial reply for bytes {offset}..{}: {why}",
                offset + u64::from(len)
            ),
        )
    };
    let header = header.ok_or_else(|| bad("no Content-Range"))?;
    let spec = header
        .trim()
        .strip_prefix("bytes ")
        .ok_or_else(|| bad(&format!("Content-Range {header:?} is not a byte range")))?;
    let (range, _total) = spec
        .split_once('/')
        .ok_or_else(|| bad(&format!("Content-Range {header:?} has no total")))?;
    let (start, end) = range
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
        .ok_or_else(|| bad(&format!("Content-Range {header:?} is malformed")))?;
    if start != offset || end < start || end - start >= u64::from(len.max(1)) {
        return Err(bad(&format!(
            "the server sent bytes {start}..={end} (Content-Range {header:?})"
        )));
    }
    Ok(end - start + 1)
}

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

/// The `Range` header asking for `len` bytes from `offset`.
pub(crate) fn range_header(offset: u64, len: u32) -> String {
    format!("bytes={offset}-{}", offset + u64::from(len.max(1)) - 1)
}

/// Up to `len` bytes from `offset` of chunk `id` in an answer to a `Range` request: a 206's
/// body (at most `len` bytes, else refused), or, from a server that ignored the range (200),
/// the body read up to the end of the range (never past [`MAX_STORED_CHUNK`]) and cut.
pub(crate) fn read_range_body(
    store: &str,
    id: &ChunkId,
    resp: ureq::Response,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>> {
    let status = resp.status();
    if status >= 300 {
        return Err(redirect_error(store, id, &resp));
    }
    let partial = status == 206;
    let announced = if partial {
        RANGES_ANSWERED.fetch_add(1, Ordering::Relaxed);
        Some(check_content_range(
            store,
            id,
            resp.header("content-range"),
            offset,
            len,
        )?)
    } else {
        RANGES_IGNORED.fetch_add(1, Ordering::Relaxed);
        if !IGNORED_LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "store {store} ignores HTTP ranges: each block read downloads its chunk up to the block"
            );
        }
        None
    };
    let mut reader = resp.into_reader();
    if !partial {
        if offset + u64::from(len) > MAX_STORED_CHUNK as u64 {
            return Err(Error::store(
                store,
                format!("chunk {id}: range past the largest stored chunk"),
            ));
        }
        std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
            .map_err(|e| Error::store(store, format!("reading chunk {id}: {e}")))?;
    }
    let mut buf = Vec::with_capacity(len as usize);
    reader
        .take(u64::from(len) + u64::from(partial))
        .read_to_end(&mut buf)
        .map_err(|e| Error::store(store, format!("reading chunk {id}: {e}")))?;
    if buf.len() > len as usize {
        return Err(Error::store(
            store,
            format!("chunk {id}: reply longer than the {len} bytes asked for"),
        ));
    }
    if let Some(announced) = announced {
        if buf.len() as u64 != announced {
            return Err(Error::store(
                store,
                format!(
                    "chunk {id}: partial reply of {} bytes, its Content-Range announced {announced}",
                    buf.len()
                ),
            ));
        }
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

    /// Sends a GET for chunk `id`: 404 is `ChunkNotFound`, other failures name the store.
    fn call(&self, id: &ChunkId, req: ureq::Request) -> Result<ureq::Response> {
        match req.call() {
            Ok(resp) => Ok(resp),
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
        let resp = self.call(id, self.agent.get(&self.chunk_url(id)))?;
        read_body(&self.url, id, resp)
    }

    fn get_range(&self, id: &ChunkId, offset: u64, len: u32) -> Result<Vec<u8>> {
        let req = self
            .agent
            .get(&self.chunk_url(id))
            .set("range", &range_header(offset, len));
        let resp = self.call(id, req)?;
        read_range_body(&self.url, id, resp, offset, len)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(header: Option<&str>, offset: u64, len: u32) -> std::result::Result<u64, String> {
        check_content_range("http://s", &ChunkId([7; 32]), header, offset, len)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_partial_reply_must_carry_the_range_asked_for() {
        assert_eq!(check(Some("bytes 100-199/5000"), 100, 100), Ok(100));
        assert_eq!(check(Some("bytes 100-149/150"), 100, 100), Ok(50));
        assert_eq!(check(Some("bytes 0-0/*"), 0, 1), Ok(1));
        for (header, why) in [
            (None, "no Content-Range"),
            (Some("items 100-199/5000"), "not a byte range"),
            (Some("bytes 100-199"), "no total"),
            (Some("bytes x-199/5000"), "malformed"),
            (Some("bytes 0-99/5000"), "sent bytes 0..=99"),
            (Some("bytes 100-200/5000"), "sent bytes 100..=200"),
            (Some("bytes 150-120/5000"), "sent bytes 150..=120"),
        ] {
            let err = check(header, 100, 100).unwrap_err();
            assert!(err.contains(why), "{header:?}: {err}");
            assert!(err.contains("bytes 100..200"), "{err}");
        }
    }
}
