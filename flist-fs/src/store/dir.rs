//! `dir://` store: one file per chunk under `<root>/<first two hex digits>/<hex id>`, written
//! through a temp file and rename so a concurrent reader never sees a partial chunk.

use super::Store;
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct DirStore {
    root: PathBuf,
    url: String,
}

impl DirStore {
    /// Opens (creating if needed on first put) the store at `dir://PATH`.
    pub fn open(url: &str) -> Result<Self> {
        let path = url
            .strip_prefix("dir://")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::BadStoreUrl {
                url: url.to_string(),
                reason: "expected dir://PATH".into(),
            })?;
        Ok(DirStore {
            root: PathBuf::from(path),
            url: url.to_string(),
        })
    }

    /// Where chunk `id` lives.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    fn io(&self, path: &Path, e: std::io::Error) -> Error {
        Error::store(&self.url, format!("{}: {e}", path.display()))
    }
}

impl Store for DirStore {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let p = self.chunk_path(id);
        match std::fs::read(&p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::ChunkNotFound {
                id: id.to_hex(),
                store: self.url.clone(),
            }),
            Err(e) => Err(self.io(&p, e)),
        }
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<()> {
        let p = self.chunk_path(id);
        let dir = p.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(|e| self.io(dir, e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(|e| self.io(dir, e))?;
        tmp.write_all(data).map_err(|e| self.io(&p, e))?;
        tmp.as_file().sync_data().map_err(|e| self.io(&p, e))?;
        tmp.persist(&p).map_err(|e| self.io(&p, e.error))?;
        Ok(())
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.chunk_path(id).is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_missing() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(&format!("dir://{}", d.path().display())).unwrap();
        let id = ChunkId::of(b"x");
        assert!(s.get(&id).unwrap_err().is_not_found());
        assert!(!s.exists(&id).unwrap());
        s.put(&id, b"x").unwrap();
        assert_eq!(s.get(&id).unwrap(), b"x");
        assert!(s.exists(&id).unwrap());
        assert!(DirStore::open("dir://").is_err());
    }
}
