//! The node's store allowlist: which stores an image's routes may lead to, and with which
//! credentials (the operator's, bound to one store URL). See the module documentation of
//! [`crate::store`] for the rules.

use super::{open_store_with, redact_url, EnvCredentials, Router, Store};
use crate::error::{Error, Result};
use crate::meta::Route;
use std::sync::Arc;

/// What identifies a store, credentials and query aside: scheme, host, port (the scheme's
/// default when absent), path (without trailing slashes). A `dir://` store is its path as
/// written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StoreKey {
    scheme: String,
    host: String,
    port: Option<u16>,
    path: String,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        "redis" => Some(6379),
        "zdb" => Some(9900),
        _ => None,
    }
}

fn store_key(url: &str) -> Option<StoreKey> {
    if let Some(path) = url.strip_prefix("dir://") {
        let trimmed = path.trim_end_matches('/');
        return (!path.is_empty()).then(|| StoreKey {
            scheme: "dir".into(),
            host: String::new(),
            port: None,
            path: if trimmed.is_empty() { "/" } else { trimmed }.to_string(),
        });
    }
    let u = url::Url::parse(url).ok()?;
    let scheme = u.scheme().to_ascii_lowercase();
    Some(StoreKey {
        host: u.host_str()?.to_ascii_lowercase(),
        port: u.port().or_else(|| default_port(&scheme)),
        path: u.path().trim_end_matches('/').to_string(),
        scheme,
    })
}

/// Whether `a` and `b` name the same store (same scheme, host, port and path; credentials
/// and query ignored). Unparseable URLs name no store.
pub fn same_store(a: &str, b: &str) -> bool {
    matches!((store_key(a), store_key(b)), (Some(x), Some(y)) if x == y)
}

#[derive(Clone)]
struct Allowed {
    key: StoreKey,
    /// As the operator wrote it, credentials included.
    url: String,
}

/// The stores a node lets images use. Cheap to clone; its `Debug` shows no credentials.
#[derive(Clone)]
pub struct StorePolicy {
    allowed: Vec<Allowed>,
    anonymous: bool,
}

impl std::fmt::Debug for StorePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.anonymous {
            return f.write_str("StorePolicy::anonymous");
        }
        f.debug_list().entries(self.stores()).finish()
    }
}

impl StorePolicy {
    /// An allowlist of store URLs, each with the credentials to use for it (if any).
    pub fn allowlist<S: AsRef<str>>(urls: &[S]) -> Result<Self> {
        let mut allowed = Vec::new();
        for url in urls {
            let url = url.as_ref();
            let key = store_key(url).ok_or_else(|| Error::BadStoreUrl {
                url: redact_url(url),
                reason: "not a store URL (expected dir://PATH or SCHEME://HOST[:PORT]/...)".into(),
            })?;
            if !matches!(
                key.scheme.as_str(),
                "dir" | "http" | "https" | "redis" | "zdb" | "s3"
            ) {
                return Err(Error::BadStoreUrl {
                    url: redact_url(url),
                    reason: "unknown scheme (expected dir, http, https, redis, zdb or s3)".into(),
                });
            }
            allowed.push(Allowed {
                key,
                url: url.to_string(),
            });
        }
        Ok(StorePolicy {
            allowed,
            anonymous: false,
        })
    }

    /// No allowlist: an image's `http(s)://` routes are used, without any credentials (and
    /// without following redirects); its `dir://`, `redis://`, `zdb://` and `s3://` routes
    /// are not.
    pub fn anonymous() -> Self {
        StorePolicy {
            allowed: Vec::new(),
            anonymous: true,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// The allowed stores' URLs, without credentials.
    pub fn stores(&self) -> Vec<String> {
        self.allowed.iter().map(|a| redact_url(&a.url)).collect()
    }

    /// The index in the allowlist of the store `url` names.
    fn find(&self, url: &str) -> Option<usize> {
        let key = store_key(url)?;
        self.allowed.iter().position(|a| a.key == key)
    }

    /// The URL to open for an image's route `url`: the allowlist's own URL (with the
    /// operator's credentials) for an allowed store; `url` without credentials for an
    /// `http(s)` route under [`StorePolicy::anonymous`]; `None` when the route is refused.
    pub fn url_for(&self, url: &str) -> Option<String> {
        if self.anonymous {
            let scheme = store_key(url)?.scheme;
            return matches!(scheme.as_str(), "http" | "https").then(|| redact_url(url));
        }
        self.find(url).map(|i| self.allowed[i].url.clone())
    }

    /// A router over every allowed store (whole id range each, in allowlist order: reads
    /// fail over from one to the next), opened with the allowlist's credentials only. What
    /// the node's chunk fetcher reads from. Fails on an anonymous policy (no stores).
    pub fn open_all(&self) -> Result<Router> {
        if self.allowed.is_empty() {
            return Err(Error::BadStoreUrl {
                url: String::new(),
                reason: "the store allowlist is empty".into(),
            });
        }
        let mut out = Vec::new();
        for a in &self.allowed {
            out.push((0, 255, open_store_with(&a.url, EnvCredentials::Ignore)?));
        }
        Ok(Router::new(out))
    }

    /// Fails, as [`StorePolicy::open_routes`] would, when `routes` exist but none is
    /// allowed; opens nothing.
    pub fn check_routes(&self, routes: &[Route]) -> Result<()> {
        let refused: Vec<String> = routes
            .iter()
            .filter(|r| self.url_for(&r.url).is_none())
            .map(|r| redact_url(&r.url))
            .collect();
        if !routes.is_empty() && refused.len() == routes.len() {
            return Err(Error::StoresNotAllowed {
                stores: refused,
                allowed: if self.anonymous {
                    "there is no store allowlist, so only http(s) stores are used".into()
                } else {
                    format!("the allowlist is: {}", self.stores().join(", "))
                },
            });
        }
        Ok(())
    }

    /// Opens the stores of an image's `routes` that this policy allows (see
    /// [`StorePolicy::url_for`]); the others are skipped with a warning. Fails when routes
    /// exist but none is allowed, naming them.
    pub fn open_routes(&self, routes: &[Route]) -> Result<Router> {
        let mut opened: Vec<(String, Arc<dyn Store>)> = Vec::new();
        let mut out = Vec::new();
        let mut refused = Vec::new();
        for r in routes {
            let Some(url) = self.url_for(&r.url) else {
                tracing::warn!(
                    store = %redact_url(&r.url),
                    "the image names a store this node does not allow: not used"
                );
                refused.push(redact_url(&r.url));
                continue;
            };
            let store = match opened.iter().find(|(u, _)| *u == url) {
                Some((_, s)) => s.clone(),
                None => {
                    let s = open_store_with(&url, EnvCredentials::Ignore)?;
                    opened.push((url, s.clone()));
                    s
                }
            };
            out.push((r.start, r.end, store));
        }
        if out.is_empty() && !refused.is_empty() {
            return Err(Error::StoresNotAllowed {
                stores: refused,
                allowed: if self.anonymous {
                    "there is no store allowlist, so only http(s) stores are used".into()
                } else {
                    format!("the allowlist is: {}", self.stores().join(", "))
                },
            });
        }
        Ok(Router::new(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkId;
    use crate::store::testsrv::FakeRedis;

    fn route(url: &str) -> Route {
        Route {
            start: 0,
            end: 255,
            url: url.into(),
        }
    }

    #[test]
    fn matching_ignores_credentials_query_default_port_and_case() {
        assert!(same_store(
            "redis://:pw@Host.example:6379/0",
            "redis://host.example/0"
        ));
        assert!(same_store(
            "s3://ak:sk@h:3900/bkt/pre?region=x",
            "s3://h:3900/bkt/pre/"
        ));
        assert!(same_store("http://h/base/", "http://h:80/base"));
        assert!(!same_store("http://h/base", "https://h/base"));
        assert!(!same_store("http://h/base", "http://h/other"));
        assert!(!same_store("zdb://h:9900/ns", "zdb://h:9901/ns"));
        assert!(!same_store("zdb://h/ns", "zdb://evil/ns"));
        assert!(same_store("dir:///srv/store/", "dir:///srv/store"));
        assert!(!same_store("dir:///srv/store", "dir:///srv/store/../etc"));
        assert!(!same_store("garbage", "garbage"));
    }

    #[test]
    fn bad_allowlist_entries_are_refused() {
        assert!(StorePolicy::allowlist(&["ftp://h/x"]).is_err());
        assert!(StorePolicy::allowlist(&["not a url"]).is_err());
        let p = StorePolicy::allowlist(&["redis://:secret@h:1/0"]).unwrap();
        assert!(!format!("{p:?}").contains("secret"));
    }

    #[test]
    fn route_not_in_allowlist_is_refused_and_named() {
        let p = StorePolicy::allowlist(&["http://mirror:8080/chunks"]).unwrap();
        let e = p
            .open_routes(&[route("http://elsewhere:8080/chunks"), route("dir:///etc")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("http://elsewhere:8080/chunks")
                && e.contains("dir:///etc")
                && e.contains("allowlist")
                && e.contains("http://mirror:8080/chunks"),
            "{e}"
        );
        // One allowed route is enough; the other is skipped.
        let r = p
            .open_routes(&[
                route("http://elsewhere/x"),
                route("http://mirror:8080/chunks/"),
            ])
            .unwrap();
        assert_eq!(r.routes().len(), 1);
        assert_eq!(r.routes()[0].url, "http://mirror:8080/chunks");
        // An image without routes opens (it has no chunks to fetch).
        assert!(p.open_routes(&[]).unwrap().is_empty());
    }

    #[test]
    fn dir_routes_need_exactly_that_dir_in_the_allowlist() {
        let d = tempfile::tempdir().unwrap();
        let dir = format!("dir://{}", d.path().display());
        let data = b"a chunk";
        let id = ChunkId::of(data);
        crate::store::open_store(&dir)
            .unwrap()
            .put(&id, data)
            .unwrap();
        let other = StorePolicy::allowlist(&["dir:///srv/elsewhere"]).unwrap();
        assert!(other.open_routes(&[route(&dir)]).is_err());
        assert!(StorePolicy::anonymous()
            .open_routes(&[route(&dir)])
            .err()
            .unwrap()
            .to_string()
            .contains(&dir));
        let allowed = StorePolicy::allowlist(&[dir.as_str()]).unwrap();
        let r = allowed.open_routes(&[route(&dir)]).unwrap();
        assert!(r.get(&id).is_ok());
    }

    #[test]
    fn anonymous_opens_only_http_without_credentials() {
        let p = StorePolicy::anonymous();
        assert_eq!(
            p.url_for("http://u:pw@h:1/c?token=x").as_deref(),
            Some("http://h:1/c")
        );
        for url in ["redis://h:1", "zdb://h:1/ns", "s3://h:1/b", "dir:///x"] {
            assert_eq!(p.url_for(url), None, "{url}");
        }
    }

    #[test]
    fn allowed_route_gets_the_allowlists_credentials_and_no_other_store_does() {
        let node = FakeRedis::start(b"chunk".to_vec());
        let attacker = FakeRedis::start(b"chunk".to_vec());
        std::env::set_var("FLIST_ZDB_PASSWORD", "env-secret");
        let p = StorePolicy::allowlist(&[format!("zdb://:node-secret@127.0.0.1:{}/ns", node.port)])
            .unwrap();
        // The image's route carries its own (attacker's) password, and a second route points
        // at the attacker's server.
        let r = p
            .open_routes(&[
                route(&format!("zdb://:image-pw@127.0.0.1:{}/ns", node.port)),
                route(&format!("zdb://127.0.0.1:{}/ns", attacker.port)),
            ])
            .unwrap();
        let id = ChunkId::of(b"chunk");
        let _ = r.stores_for(&id)[0].exists(&id);
        let seen = node.received_text();
        assert!(
            seen.contains("SELECT ns node-secret") && !seen.contains("image-pw"),
            "{seen}"
        );
        assert!(!seen.contains("env-secret"), "{seen}");
        assert!(attacker.received().is_empty());

        // Without a policy, an image's routes get the environment's password only for the
        // store FLIST_STORE_CREDENTIALS_FOR names: never the attacker's.
        std::env::set_var(
            crate::store::CREDENTIALS_FOR_VAR,
            format!("zdb://127.0.0.1:{}/ns", node.port),
        );
        let r = Router::from_routes(&[
            route(&format!("zdb://127.0.0.1:{}/ns", attacker.port)),
            route(&format!("zdb://127.0.0.1:{}/ns/", node.port)),
        ])
        .unwrap();
        for store in r.stores_for(&id) {
            let _ = store.exists(&id);
        }
        std::env::remove_var(crate::store::CREDENTIALS_FOR_VAR);
        std::env::remove_var("FLIST_ZDB_PASSWORD");
        let seen = attacker.received_text();
        assert!(
            seen.contains("SELECT ns") && !seen.contains("secret"),
            "{seen}"
        );
        assert!(node.received_text().contains("SELECT ns env-secret"));
    }
}
