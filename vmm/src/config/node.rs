//! Node configuration: what the node's operator decides for every VM, as opposed to the
//! per-VM spec (which comes with the workload, as do the images it names).
//!
//! `vmm --node-config /etc/gridnode/node.json`, a JSON object (unknown fields are refused):
//!
//! ```json
//! {
//!   "fetcher": "/run/gridnode/fetcher.sock",
//!   "image_cache": "/var/cache/gridnode/chunks",
//!   "image_cache_max_bytes": 10737418240,
//!   "stores": [
//!     "zdb://:NAMESPACE-PASSWORD@10.0.0.5:9900/images",
//!     "https://hub.example.org/chunks",
//!     "s3://ACCESS:SECRET@s3.example.org/bucket/chunks?region=garage&tls=true"
//!   ]
//! }
//! ```
//!
//! With `fetcher` (or `--fetcher SOCK`), images' chunks are asked of the node's chunk
//! fetcher (`chunk-fetcher`, see `flist_fs::fetcher`) on that unix socket: the fetcher owns
//! the cache, the allowlist and the credentials, and the vmm needs none of them (no network,
//! no cache writes); the vmm connects its sockets when it starts. `chunk-fetcher --config`
//! reads this same file. Without it, the vmm fetches chunks itself as described below.
//!
//! Every field is optional. Since `stores` may carry credentials, the file must not be
//! readable or writable by other users (mode `0600` or `0640`): the vmm refuses it otherwise.
//!
//! The stores an image records are written by whoever built the image, so the vmm never
//! simply connects where an image says: an image's store is used only when it is in the
//! node's allowlist (`stores` here, plus any `--store URL` flags), compared by scheme, host,
//! port and path (credentials and query ignored), and it is then opened with the
//! allowlist's URL, so the credentials written here go to that store and nowhere else.
//! Stores of the image outside the allowlist are skipped with a warning; an image none of
//! whose stores is allowed cannot be served. A `dir://` store is used only when the allowlist
//! names exactly that directory (`dir:///srv/store`).
//!
//! Without any allowlist (no `stores`, no `--store`; development use), an image's `http://`
//! and `https://` stores are used without credentials, and its `dir://`, `redis://`,
//! `zdb://` and `s3://` stores are not: a node serving other people's images must have an
//! allowlist.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flist_fs::store::StorePolicy;
use serde::Deserialize;

/// Where image chunks are cached when neither the node configuration nor the spec says.
pub use crate::fs_backends::DEFAULT_IMAGE_CACHE;

/// The node operator's settings (see the module documentation for the file format).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The local chunk cache shared by every image (default: /var/cache/gridnode/chunks).
    /// Takes precedence over the spec's `image_cache` and `--image-cache`.
    #[serde(default)]
    pub image_cache: Option<PathBuf>,
    /// Bound of the chunk cache in bytes (default: 10 GiB).
    #[serde(default)]
    pub image_cache_max_bytes: Option<u64>,
    /// The store allowlist: the only stores images may be read from, each with the
    /// credentials to use for it (`redis://:PASSWORD@host:port/db`,
    /// `zdb://:PASSWORD@host:port/namespace`, `s3://ACCESS:SECRET@host/bucket/prefix`,
    /// `http(s)://[user:password@]host/base`, `dir:///path`).
    #[serde(default)]
    pub stores: Vec<String>,
    /// The node's chunk fetcher socket: when set, images' chunks are asked of it instead of
    /// fetched by the vmm (which then needs no network, credentials or cache writes).
    #[serde(default)]
    pub fetcher: Option<PathBuf>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stores: Vec<String> = self
            .stores
            .iter()
            .map(|s| flist_fs::store::redact_url(s))
            .collect();
        f.debug_struct("NodeConfig")
            .field("image_cache", &self.image_cache)
            .field("image_cache_max_bytes", &self.image_cache_max_bytes)
            .field("stores", &stores)
            .field("fetcher", &self.fetcher)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("cannot read node configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid node configuration {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("node configuration {path} has mode {mode:04o}: it may hold store credentials, so other users must not read or write it (chmod 600)")]
    Exposed { path: String, mode: u32 },
    #[error("store allowlist: {0}")]
    Store(#[source] flist_fs::Error),
}

impl NodeConfig {
    /// Reads and checks the file at `path` (JSON, not accessible to other users).
    pub fn load(path: &Path) -> Result<Self, NodeConfigError> {
        let shown = path.display().to_string();
        let read_err = |source| NodeConfigError::Read {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mode = file.metadata().map_err(read_err)?.mode() & 0o7777;
        if mode & 0o006 != 0 {
            return Err(NodeConfigError::Exposed { path: shown, mode });
        }
        let config: NodeConfig =
            serde_json::from_reader(std::io::BufReader::new(file)).map_err(|source| {
                NodeConfigError::Parse {
                    path: shown.clone(),
                    source,
                }
            })?;
        Ok(config)
    }

    /// How this node opens images: the cache (the node's, else `spec_cache`, else the
    /// default) and the store policy (`stores` plus `extra_stores`, the `--store` flags; no
    /// allowlist at all gives [`StorePolicy::anonymous`]).
    pub fn image_settings(
        &self,
        extra_stores: &[String],
        spec_cache: Option<&Path>,
    ) -> Result<ImageSettings, NodeConfigError> {
        let stores: Vec<&String> = self.stores.iter().chain(extra_stores).collect();
        let policy = if stores.is_empty() {
            StorePolicy::anonymous()
        } else {
            StorePolicy::allowlist(&stores).map_err(NodeConfigError::Store)?
        };
        Ok(ImageSettings {
            cache: self
                .image_cache
                .clone()
                .or_else(|| spec_cache.map(Path::to_path_buf)),
            cache_max_bytes: self.image_cache_max_bytes,
            policy: Some(policy),
            fetcher: self.fetcher.clone(),
        })
    }
}

/// What opening an image needs from the node: the chunk cache and the store policy. Built
/// by [`NodeConfig::image_settings`]; a policy is always present outside unit tests.
#[derive(Clone, Debug)]
pub struct ImageSettings {
    cache: Option<PathBuf>,
    cache_max_bytes: Option<u64>,
    policy: Option<StorePolicy>,
    fetcher: Option<PathBuf>,
}

impl ImageSettings {
    /// Chunks asked of the node's chunk fetcher at `socket` (`--fetcher`).
    pub fn with_fetcher(mut self, socket: PathBuf) -> Self {
        self.fetcher = Some(socket);
        self
    }

    /// The node's chunk fetcher socket, when images are read through it.
    pub fn fetcher(&self) -> Option<&Path> {
        self.fetcher.as_deref()
    }

    /// The cache directory (`None`: the default one).
    pub fn cache(&self) -> Option<&Path> {
        self.cache.as_deref()
    }

    /// The cache bound in bytes (`None`: the default one).
    pub fn cache_max_bytes(&self) -> Option<u64> {
        self.cache_max_bytes
    }

    /// The store policy images are opened under.
    pub fn policy(&self) -> Option<&StorePolicy> {
        self.policy.as_ref()
    }

    /// Whether opening images may fetch chunks over the network from this process (no chunk
    /// fetcher, and a store the policy allows is not a `dir://` one): the virtio-fs workers'
    /// seccomp filter then allows network calls.
    pub fn fetches_over_network(&self) -> bool {
        if self.fetcher.is_some() {
            return false;
        }
        match &self.policy {
            None => true,
            Some(policy) => {
                policy.is_anonymous() || policy.stores().iter().any(|u| !u.starts_with("dir://"))
            }
        }
    }
}

impl From<&ImageSettings> for ImageSettings {
    fn from(settings: &ImageSettings) -> Self {
        settings.clone()
    }
}

/// Unit tests only: a cache directory alone, images' stores used as recorded (the tests'
/// own images, in their own `dir://` stores).
#[cfg(test)]
impl From<&PathBuf> for ImageSettings {
    fn from(cache: &PathBuf) -> Self {
        ImageSettings {
            cache: Some(cache.clone()),
            cache_max_bytes: None,
            policy: None,
            fetcher: None,
        }
    }
}

#[cfg(test)]
impl From<Option<&PathBuf>> for ImageSettings {
    fn from(cache: Option<&PathBuf>) -> Self {
        ImageSettings {
            cache: cache.cloned(),
            cache_max_bytes: None,
            policy: None,
            fetcher: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("node.json");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn loads_and_builds_the_allowlist() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            r#"{"image_cache": "/c", "image_cache_max_bytes": 5, "stores": ["zdb://:pw@10.0.0.5:9900/ns"], "fetcher": "/run/f.sock"}"#,
            0o600,
        );
        let node = NodeConfig::load(&p).unwrap();
        assert!(!format!("{node:?}").contains("pw"));
        let s = node
            .image_settings(&["dir:///srv/store".into()], Some(Path::new("/spec")))
            .unwrap();
        assert_eq!(s.cache(), Some(Path::new("/c")));
        assert_eq!(s.cache_max_bytes(), Some(5));
        assert_eq!(s.fetcher(), Some(Path::new("/run/f.sock")));
        let policy = s.policy().unwrap();
        assert!(!policy.is_anonymous());
        assert_eq!(
            policy.url_for("zdb://10.0.0.5/ns").as_deref(),
            Some("zdb://:pw@10.0.0.5:9900/ns")
        );
        assert_eq!(policy.url_for("zdb://10.0.0.6/ns"), None);
        assert!(policy.url_for("dir:///srv/store").is_some());
        assert_eq!(policy.url_for("dir:///etc"), None);
    }

    #[test]
    fn without_an_allowlist_images_get_no_credentials_and_no_dir() {
        let s = NodeConfig::default()
            .image_settings(&[], Some(Path::new("/spec")))
            .unwrap();
        assert_eq!(s.cache(), Some(Path::new("/spec")));
        let policy = s.policy().unwrap();
        assert!(policy.is_anonymous());
        assert_eq!(policy.url_for("dir:///srv/store"), None);
        assert_eq!(
            policy.url_for("http://u:p@h/c").as_deref(),
            Some("http://h/c")
        );
    }

    #[test]
    fn the_vmm_serves_an_image_only_from_allowlisted_stores() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"content").unwrap();
        let store = format!("dir://{}", d.path().join("store").display());
        let img = d.path().join("img.flist");
        let router = flist_fs::store::Router::from_specs(std::slice::from_ref(&store)).unwrap();
        let opts = flist_fs::pack::PackOptions::default();
        flist_fs::pack::pack(&src, &img, &router, &opts).unwrap();
        let share = crate::config::FsSpec::image("t", img);
        let cache = Some(d.path().join("cache"));
        let node = NodeConfig {
            image_cache: cache.clone(),
            ..NodeConfig::default()
        };
        // No allowlist, or one without this directory: the image's dir:// store is refused.
        for extra in [vec![], vec!["dir:///srv/other".to_string()]] {
            let settings = node.image_settings(&extra, None).unwrap();
            let e = crate::fs_backends::device_for(&share, &settings)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(&store) && e.contains("may be used"), "{e}");
        }
        let settings = node.image_settings(&[store], None).unwrap();
        assert!(crate::fs_backends::device_for(&share, &settings).is_ok());
    }

    #[test]
    fn exposed_unknown_or_bad_configs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), r#"{"stores": []}"#, 0o644);
        let e = NodeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("node.json"), "{e}");
        let p = write(d.path(), r#"{"stores": []}"#, 0o602);
        assert!(NodeConfig::load(&p).is_err());
        let p = write(d.path(), r#"{"store": []}"#, 0o600);
        let e = NodeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `store`"), "{e}");
        let p = write(d.path(), r#"{"stores": ["ftp://:secret@h/x"]}"#, 0o640);
        let e = NodeConfig::load(&p)
            .unwrap()
            .image_settings(&[], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp://h/x") && !e.contains("secret"), "{e}");
    }
}
