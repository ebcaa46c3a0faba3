//! The router: maps chunk-id ranges (first byte, inclusive) to stores. Writes go to every
//! store whose range covers the id (replication); reads try those stores in order, verify the
//! id, and fail over, reporting every store's failure when none can serve the chunk. A store
//! that fails with a connection-level error is put at the back of the read order for
//! `DOWN_FOR` (so a dead or black-holed store does not cost a timeout per chunk).

use super::{open_store, open_store_with, redact_url, EnvCredentials, Store};
use crate::chunk::{verify_stored, ChunkId};
use crate::error::{Error, Result};
use crate::meta::Route;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a store that failed at the connection level is tried last.
const DOWN_FOR: Duration = Duration::from_secs(30);

struct RouteEntry {
    start: u8,
    end: u8,
    store: Arc<dyn Store>,
    down_until: Mutex<Option<Instant>>,
}

impl RouteEntry {
    fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .map(|d| d.is_some_and(|t| Instant::now() < t))
            .unwrap_or(false)
    }

    fn mark(&self, down: bool) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = down.then(|| Instant::now() + DOWN_FOR);
        }
    }
}

pub struct Router {
    routes: Vec<RouteEntry>,
}

fn entries(routes: Vec<(u8, u8, Arc<dyn Store>)>) -> Vec<RouteEntry> {
    routes
        .into_iter()
        .map(|(start, end, store)| RouteEntry {
            start,
            end,
            store,
            down_until: Mutex::new(None),
        })
        .collect()
}

/// Parses `[SS-EE=]URL` (hex range of the id's first byte; default 00-ff).
pub fn parse_route_spec(spec: &str) -> Result<(u8, u8, String)> {
    let bytes = spec.as_bytes();
    if bytes.len() > 6 && bytes[2] == b'-' && bytes[5] == b'=' {
        let hex = |s: &str| u8::from_str_radix(s, 16);
        if let (Some(a), Some(b)) = (spec.get(0..2), spec.get(3..5)) {
            if let (Ok(start), Ok(end)) = (hex(a), hex(b)) {
                if start > end {
                    return Err(Error::BadStoreUrl {
                        url: redact_url(&spec[6..]),
                        reason: format!("empty id range {a}-{b}"),
                    });
                }
                super::check_store_url(&spec[6..])?;
                return Ok((start, end, spec[6..].to_string()));
            }
        }
    }
    super::check_store_url(spec)?;
    Ok((0, 255, spec.to_string()))
}

impl Router {
    /// A router over already opened stores.
    pub fn new(routes: Vec<(u8, u8, Arc<dyn Store>)>) -> Self {
        Router {
            routes: entries(routes),
        }
    }

    /// Opens every store of `specs` (`[SS-EE=]URL`).
    pub fn from_specs<S: AsRef<str>>(specs: &[S]) -> Result<Self> {
        let mut routes = Vec::new();
        for s in specs {
            let (a, b, url) = parse_route_spec(s.as_ref())?;
            routes.push((a, b, open_store(&url)?));
        }
        Ok(Router::new(routes))
    }

    /// Opens the stores recorded in an image, as recorded, without a policy (for one's own
    /// images): credentials from the environment only go to the store
    /// `FLIST_STORE_CREDENTIALS_FOR` names. A node uses [`super::StorePolicy::open_routes`].
    pub fn from_routes(routes: &[Route]) -> Result<Self> {
        let mut out = Vec::new();
        for r in routes {
            let env = EnvCredentials::for_image_route(&r.url);
            out.push((r.start, r.end, open_store_with(&r.url, env)?));
        }
        Ok(Router::new(out))
    }

    /// The routes, credentials stripped, for recording in an image.
    pub fn routes(&self) -> Vec<Route> {
        self.routes
            .iter()
            .map(|r| Route {
                start: r.start,
                end: r.end,
                url: redact_url(r.store.url()),
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn covering_entries<'a>(&'a self, id: &ChunkId) -> impl Iterator<Item = &'a RouteEntry> + 'a {
        let p = id.prefix();
        self.routes
            .iter()
            .filter(move |r| (r.start..=r.end).contains(&p))
    }

    fn covering<'a>(&'a self, id: &ChunkId) -> impl Iterator<Item = &'a Arc<dyn Store>> + 'a {
        self.covering_entries(id).map(|r| &r.store)
    }

    /// Fetches and verifies chunk `id`, failing over between the stores covering it.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.failover(id, |store| {
            store.get(id).and_then(|b| verify_stored(id, &b).map(|_| b))
        })
    }

    /// At most `len` bytes of chunk `id` from `offset` that pass `check`, failing over between
    /// the stores covering it (a store whose bytes fail `check` counts as failed).
    pub fn get_range(
        &self,
        id: &ChunkId,
        offset: u64,
        len: u32,
        check: &dyn Fn(&[u8]) -> Result<()>,
    ) -> Result<Vec<u8>> {
        self.failover(id, |store| {
            store
                .get_range(id, offset, len)
                .and_then(|b| check(&b).map(|_| b))
        })
    }

    /// Runs `fetch` on the stores covering `id` (healthy ones first, in order) until one
    /// succeeds; reports every store's failure when none does.
    fn failover(
        &self,
        id: &ChunkId,
        fetch: impl Fn(&dyn Store) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut failures = Vec::new();
        let (up, down): (Vec<&RouteEntry>, Vec<&RouteEntry>) =
            self.covering_entries(id).partition(|r| !r.is_down());
        for entry in up.into_iter().chain(down) {
            let store = &entry.store;
            match fetch(store.as_ref()) {
                Ok(b) => {
                    entry.mark(false);
                    return Ok(b);
                }
                Err(e) => {
                    entry.mark(matches!(e, Error::Store { .. }));
                    tracing::warn!(store = store.url(), chunk = %id, error = %e, "chunk read failed, trying next store");
                    let msg = e.to_string();
                    failures.push(if msg.contains(store.url()) {
                        msg
                    } else {
                        format!("{}: {msg}", store.url())
                    });
                }
            }
        }
        if failures.is_empty() {
            return Err(Error::NoStoreForId { id: id.to_hex() });
        }
        Err(Error::AllStoresFailed {
            id: id.to_hex(),
            failures,
        })
    }

    /// Stores chunk `id` in every covering store that lacks it. Returns true when at least
    /// one store did not have it yet (a "new" chunk), false when all had it (deduplicated).
    pub fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        let mut any = false;
        let mut new = false;
        for store in self.covering(id) {
            any = true;
            if !store.exists(id)? {
                store.put(id, data)?;
                new = true;
            }
        }
        if !any {
            return Err(Error::NoStoreForId { id: id.to_hex() });
        }
        Ok(new)
    }

    /// The stores whose range covers `id`, in read order.
    pub fn stores_for(&self, id: &ChunkId) -> Vec<Arc<dyn Store>> {
        self.covering(id).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DirStore;

    fn dir_store(d: &std::path::Path) -> Arc<dyn Store> {
        Arc::new(DirStore::open(&format!("dir://{}", d.display())).unwrap())
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(
            parse_route_spec("00-7f=dir:///a").unwrap(),
            (0, 127, "dir:///a".into())
        );
        assert_eq!(
            parse_route_spec("dir:///a").unwrap(),
            (0, 255, "dir:///a".into())
        );
        assert!(parse_route_spec("80-10=dir:///a").is_err());
    }

    #[test]
    fn replicate_and_fail_over() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let r = Router::new(vec![
            (0, 255, dir_store(a.path())),
            (0, 255, dir_store(b.path())),
        ]);
        let data = b"chunk bytes";
        let id = ChunkId::of(data);
        assert!(r.put(&id, data).unwrap());
        assert!(!r.put(&id, data).unwrap());
        // Corrupt the first copy: the read fails over to the second store.
        let hex = id.to_hex();
        std::fs::write(a.path().join(&hex[..2]).join(&hex), b"garbage").unwrap();
        assert_eq!(r.get(&id).unwrap(), data);
        std::fs::remove_file(b.path().join(&hex[..2]).join(&hex)).unwrap();
        let e = r.get(&id).unwrap_err().to_string();
        assert!(
            e.contains("hash mismatch") && e.contains("not found") && e.contains(&hex),
            "{e}"
        );
    }

    #[test]
    fn ranges_split_ids() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let r = Router::new(vec![
            (0, 0x7f, dir_store(a.path())),
            (0x80, 0xff, dir_store(b.path())),
        ]);
        for i in 0..32u8 {
            let data = [i; 10];
            let id = ChunkId::of(&data);
            r.put(&id, &data).unwrap();
            let (hit, miss) = if id.prefix() < 0x80 {
                (&a, &b)
            } else {
                (&b, &a)
            };
            let hex = id.to_hex();
            assert!(hit.path().join(&hex[..2]).join(&hex).exists());
            assert!(!miss.path().join(&hex[..2]).join(&hex).exists());
        }
        let empty = Router::new(vec![(0, 0, dir_store(a.path()))]);
        let id = (0..255u8)
            .map(|i| ChunkId::of(&[i]))
            .find(|i| i.prefix() != 0)
            .unwrap();
        assert!(matches!(empty.get(&id), Err(Error::NoStoreForId { .. })));
    }

    struct Dead(std::sync::atomic::AtomicUsize);

    impl Store for Dead {
        fn url(&self) -> &str {
            "dead://x"
        }
        fn get(&self, _: &ChunkId) -> Result<Vec<u8>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(Error::store("dead://x", "connection refused"))
        }
        fn put(&self, _: &ChunkId, _: &[u8]) -> Result<()> {
            Err(Error::store("dead://x", "connection refused"))
        }
        fn exists(&self, _: &ChunkId) -> Result<bool> {
            Err(Error::store("dead://x", "connection refused"))
        }
    }

    #[test]
    fn down_store_is_tried_last() {
        let a = tempfile::tempdir().unwrap();
        let dead = Arc::new(Dead(Default::default()));
        let good = dir_store(a.path());
        let r = Router::new(vec![
            (0, 255, dead.clone() as Arc<dyn Store>),
            (0, 255, good.clone()),
        ]);
        for i in 0..5u8 {
            let id = ChunkId::of(&[i]);
            good.put(&id, &[i]).unwrap();
            assert_eq!(r.get(&id).unwrap(), vec![i]);
        }
        assert_eq!(dead.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
