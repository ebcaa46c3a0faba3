//! `redis://` and `zdb://` stores over RESP: `SET id bytes`, `GET id`, `GETRANGE id a b` (redis
//! only; zdb reads the whole object), `EXISTS id`, key = the raw
//! 32-byte chunk id. For `zdb://host:port/ns` the namespace is selected after connecting. A few
//! connections (a small pool, for parallel pack/verify), each re-established after an error.

use super::{EnvCredentials, Store, MAX_STORED_CHUNK};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use std::sync::Mutex;
use std::time::Duration;

/// Connections per store.
const POOL: usize = 4;

pub struct RedisStore {
    client: redis::Client,
    namespace: Option<String>,
    password: Option<String>,
    /// A 0-db server (no GETRANGE).
    zdb: bool,
    url: String,
    conns: Vec<Mutex<Option<redis::Connection>>>,
}

impl RedisStore {
    /// Opens `url`, a URL the user typed (the password may come from the environment).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, EnvCredentials::Use)
    }

    /// Opens `url`; `env` says whether a password missing from it may come from
    /// `FLIST_REDIS_PASSWORD` / `FLIST_ZDB_PASSWORD`.
    pub fn open_with(url: &str, env: EnvCredentials) -> Result<Self> {
        let shown = super::redact_url(url);
        let bad = |reason: String| Error::BadStoreUrl {
            url: shown.clone(),
            reason,
        };
        let mut u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let zdb = u.scheme() == "zdb";
        let env_pw = env.var(if zdb {
            "FLIST_ZDB_PASSWORD"
        } else {
            "FLIST_REDIS_PASSWORD"
        });
        let password = u.password().map(str::to_string).or(env_pw);
        let mut namespace = None;
        if zdb {
            let ns = u.path().trim_matches('/').to_string();
            namespace = (!ns.is_empty()).then_some(ns);
            u = url::Url::parse(&format!(
                "redis://{}:{}",
                u.host_str().ok_or_else(|| bad("missing host".into()))?,
                u.port().unwrap_or(9900)
            ))
            .map_err(|e| bad(e.to_string()))?;
        } else if let Some(pw) = &password {
            u.set_password(Some(pw))
                .map_err(|_| bad("cannot set password".into()))?;
        }
        let client = redis::Client::open(u.as_str()).map_err(|e| bad(e.to_string()))?;
        Ok(RedisStore {
            client,
            namespace,
            password: if zdb { password } else { None },
            zdb,
            url: shown,
            conns: (0..POOL).map(|_| Mutex::new(None)).collect(),
        })
    }

    fn connect(&self) -> Result<redis::Connection> {
        let err = |e: redis::RedisError| Error::store(&self.url, e);
        let mut con = self
            .client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(err)?;
        con.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(err)?;
        con.set_write_timeout(Some(Duration::from_secs(30)))
            .map_err(err)?;
        if let Some(ns) = &self.namespace {
            let mut c = redis::cmd("SELECT");
            c.arg(ns);
            if let Some(pw) = &self.password {
                c.arg(pw);
            }
            c.query::<()>(&mut con).map_err(err)?;
        }
        Ok(con)
    }

    /// Runs `f` on the shared connection, reconnecting once if the connection was broken.
    fn with_conn<T>(
        &self,
        what: &str,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        // A free connection if there is one, else wait for the first.
        let mut guard = match self.conns.iter().find_map(|c| c.try_lock().ok()) {
            Some(g) => g,
            None => self.conns[0]
                .lock()
                .map_err(|_| Error::store(&self.url, "connection lock poisoned"))?,
        };
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connect()?);
            }
            let Some(con) = guard.as_mut() else { continue };
            match f(con) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    *guard = None;
                    if attempt == 1 || !(e.is_io_error() || e.is_connection_dropped()) {
                        return Err(Error::store(&self.url, format!("{what}: {e}")));
                    }
                }
            }
        }
        Err(Error::store(
            &self.url,
            format!("{what}: connection failed"),
        ))
    }
}

impl Store for RedisStore {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let v: Option<Vec<u8>> = self.with_conn(&format!("GET chunk {id}"), |c| {
            redis::cmd("GET").arg(&id.0[..]).query(c)
        })?;
        let v = v.ok_or_else(|| Error::ChunkNotFound {
            id: id.to_hex(),
            store: self.url.clone(),
        })?;
        // The redis crate has read the whole reply already (it offers no bound): refuse it
        // here. Only operator-chosen redis/zdb stores are ever opened (see `store`).
        if v.len() > MAX_STORED_CHUNK {
            return Err(Error::store(
                &self.url,
                format!(
                    "GET chunk {id}: reply of {} bytes is larger than the largest stored chunk ({MAX_STORED_CHUNK} bytes)",
                    v.len()
                ),
            ));
        }
        Ok(v)
    }

    fn get_range(&self, id: &ChunkId, offset: u64, len: u32) -> Result<Vec<u8>> {
        if self.zdb {
            // 0-db has no GETRANGE: the whole object, cut.
            return Ok(super::cut(self.get(id)?, offset, len));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(u64::from(len) - 1);
        let v: Vec<u8> = self.with_conn(&format!("GETRANGE chunk {id}"), |c| {
            redis::cmd("GETRANGE")
                .arg(&id.0[..])
                .arg(offset)
                .arg(end)
                .query(c)
        })?;
        if v.len() > len as usize {
            return Err(Error::store(
                &self.url,
                format!(
                    "GETRANGE chunk {id}: reply of {} bytes, {len} asked for",
                    v.len()
                ),
            ));
        }
        // GETRANGE answers "" for a missing key.
        if v.is_empty() && !self.exists(id)? {
            return Err(Error::ChunkNotFound {
                id: id.to_hex(),
                store: self.url.clone(),
            });
        }
        Ok(v)
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<()> {
        self.with_conn(&format!("SET chunk {id}"), |c| {
            redis::cmd("SET").arg(&id.0[..]).arg(data).query::<()>(c)
        })
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        self.with_conn(&format!("EXISTS chunk {id}"), |c| {
            redis::cmd("EXISTS").arg(&id.0[..]).query::<bool>(c)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testsrv::FakeRedis;

    #[test]
    fn oversize_reply_is_refused() {
        let server = FakeRedis::start(vec![7u8; MAX_STORED_CHUNK + 1]);
        let store = RedisStore::open_with(
            &format!("redis://127.0.0.1:{}", server.port),
            EnvCredentials::Ignore,
        )
        .unwrap();
        let e = store.get(&ChunkId::of(b"x")).unwrap_err().to_string();
        assert!(
            e.contains("larger than the largest stored chunk")
                && e.contains(&format!("127.0.0.1:{}", server.port)),
            "{e}"
        );
        let ok = FakeRedis::start(vec![7u8; 100]);
        let store = RedisStore::open_with(
            &format!("redis://127.0.0.1:{}", ok.port),
            EnvCredentials::Ignore,
        )
        .unwrap();
        assert_eq!(store.get(&ChunkId::of(b"x")).unwrap().len(), 100);
    }
}
