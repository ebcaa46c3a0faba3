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

    fn get_range(&self, id: &ChunkId, offset: u64, len: u32) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let p = self.chunk_path(id);
        let file = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ChunkNotFound {
                    id: id.to_hex(),
                    store: self.url.clone(),
                })
            }
            Err(e) => return Err(self.io(&p, e)),
        };
        let mut buf = vec![0u8; len as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(&p, e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
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
        let id2 = ChunkId::of(b"0123456789");
        s.put(&id2, b"0123456789").unwrap();
        assert_eq!(s.get_range(&id2, 3, 4).unwrap(), b"3456");
        assert_eq!(s.get_range(&id2, 8, 4).unwrap(), b"89");
        assert!(s
            .get_range(&ChunkId::of(b"y"), 0, 1)
            .unwrap_err()
            .is_not_found());
        assert!(s.exists(&id).unwrap());
        assert!(DirStore::open("dir://").is_err());
    }
}
