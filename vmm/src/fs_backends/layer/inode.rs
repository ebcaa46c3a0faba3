//! The layer's inodes as the guest knows them (FUSE node ids): one per object, whatever its
//! names. An object found in the upper directory is identified by its passthrough inode (so
//! the names of a hard link in the layer are one inode: one link count, one ctime, one set of
//! attributes); an object only in the image by its image inode (an image file's hard links are
//! one inode too). A copy-up moves a node from the second identity to the first, keeping its
//! node id. The table counts the guest's lookups of each node and drops it at FORGET; each
//! node holds one lookup of its passthrough inode, given back then.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::api::filesystem::ROOT_ID;

/// Inode numbers (`st_ino`) the guest sees for objects only in the image: the image's inode
/// number above this base, away from the host's inode numbers of the layer's objects.
pub const LOWER_INO_BASE: u64 = 1 << 56;

/// What a node is, in each layer.
#[derive(Clone, Debug, Default)]
pub struct NodeState {
    /// The image inode (for a directory: the image directory merged under it, unless opaque).
    pub lower: Option<u64>,
    /// The image path of `lower` (for a directory: what a redirect names when it moves).
    pub lower_path: Vec<u8>,
    /// The passthrough inode of the object in the upper directory.
    pub upper: Option<u64>,
    /// For a directory in the upper directory: an `O_PATH` descriptor of it.
    pub upper_dir: Option<Arc<OwnedFd>>,
    /// For a directory in the upper directory: its host inode number (which of the layer's
    /// directory locks guards its names).
    pub dir_ino: u64,
    /// For a device node in the upper directory (a plain empty file on the host, see
    /// `whiteout::DEVICE_XATTR`): its type (`S_IFCHR`, `S_IFBLK`) and device number.
    pub device: Option<(u32, u32)>,
    /// A copy of an image file with several names, also linked in `work/index/`: that link
    /// is not one of the guest's.
    pub indexed: bool,
    /// The directory (node) and name it was last reached by: where a copy-up puts it.
    pub parent: u64,
    pub name: CString,
}

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// `S_IFMT` bits of the object (fixed for its life).
    pub kind: u32,
    pub state: Mutex<NodeState>,
}

/// What most requests need of a node, copied out without its names.
#[derive(Clone, Copy, Debug)]
pub struct Brief {
    pub upper: Option<u64>,
    pub lower: Option<u64>,
    pub device: Option<(u32, u32)>,
    pub indexed: bool,
}

impl Node {
    pub fn state(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn brief(&self) -> Brief {
        let st = self.state();
        Brief {
            upper: st.upper,
            lower: st.lower,
            device: st.device,
            indexed: st.indexed,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Upper(u64),
    Lower(u64),
}

/// An upper object's identity on the host (`st_dev`, `st_ino`). While a node holds its
/// passthrough inode, that inode holds the object open, so no other object takes the number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostId {
    dev: u64,
    ino: u64,
}

impl HostId {
    pub fn of(st: &libc::stat64) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

#[derive(Default)]
struct Tables {
    nodes: HashMap<u64, (Arc<Node>, u64)>,
    by_key: HashMap<Key, u64>,
    /// Upper nodes by their host object: a lookup that has the host's attributes of a name
    /// finds the node without asking the passthrough.
    by_host: HashMap<HostId, u64>,
    host_of: HashMap<u64, HostId>,
    next: u64,
}

/// The node table.
pub struct Inodes {
    tables: Mutex<Tables>,
}

/// What a node given up at FORGET held, for the caller to release.
pub struct Dropped {
    pub upper: Option<u64>,
}

impl Inodes {
    pub fn new(root: NodeState) -> Self {
        let inodes = Self {
            tables: Mutex::new(Tables {
                next: ROOT_ID + 1,
                ..Default::default()
            }),
        };
        inodes.reset(root);
        inodes
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets every node but a new root (the guest's DESTROY, or INIT again).
    pub fn reset(&self, root: NodeState) {
        let mut t = self.tables();
        t.nodes.clear();
        t.by_key.clear();
        t.by_host.clear();
        t.host_of.clear();
        if let Some(upper) = root.upper {
            t.by_key.insert(Key::Upper(upper), ROOT_ID);
        }
        let node = Arc::new(Node {
            id: ROOT_ID,
            kind: libc::S_IFDIR,
            state: Mutex::new(root),
        });
        // The root is never forgotten: it holds one lookup more than the guest's.
        t.nodes.insert(ROOT_ID, (node, 1));
    }

    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.tables().nodes.get(&id).map(|(n, _)| n.clone())
    }

    /// The node of `key`, given one more lookup, or a new one made of `make()` (with `kind`).
    /// The second value says whether it existed (then the caller gives back the passthrough
    /// lookup it got for it: the node holds one already).
    pub fn lookup_or_insert(
        &self,
        key: Key,
        kind: u32,
        make: impl FnOnce() -> NodeState,
    ) -> (Arc<Node>, bool) {
        let mut t = self.tables();
        if let Some(id) = t.by_key.get(&key).copied() {
            if let Some((node, refs)) = t.nodes.get_mut(&id) {
                *refs += 1;
                return (node.clone(), true);
            }
        }
        let id = t.next;
        t.next += 1;
        let node = Arc::new(Node {
            id,
            kind,
            state: Mutex::new(make()),
        });
        t.nodes.insert(id, (node.clone(), 1));
        t.by_key.insert(key, id);
        (node, false)
    }

    /// One more lookup of an existing node (a hard link made to it).
    pub fn add_ref(&self, id: u64) {
        if let Some((_, refs)) = self.tables().nodes.get_mut(&id) {
            *refs += 1;
        }
    }

    /// The node of `key`, if the guest knows one, given one more lookup: in one step, so a
    /// FORGET served meanwhile on another queue cannot drop the node in between.
    pub fn find_and_ref(&self, key: Key) -> Option<Arc<Node>> {
        let mut t = self.tables();
        let id = *t.by_key.get(&key)?;
        let (node, refs) = t.nodes.get_mut(&id)?;
        *refs += 1;
        Some(node.clone())
    }

    /// Node `id` stands for host object `host` (its upper object, found or made): the first
    /// node of an object keeps it (a later alias node is found through the passthrough).
    pub fn set_host(&self, id: u64, host: HostId) {
        let mut t = self.tables();
        if !t.nodes.contains_key(&id) || t.host_of.contains_key(&id) {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(v) = t.by_host.entry(host) {
            v.insert(id);
            t.host_of.insert(id, host);
        }
    }

    /// The upper node of host object `host`, if the guest knows one, given one more lookup
    /// (in one step, as [`Self::find_and_ref`]).
    pub fn find_host_and_ref(&self, host: HostId) -> Option<Arc<Node>> {
        let mut t = self.tables();
        let id = *t.by_host.get(&host)?;
        let (node, refs) = t.nodes.get_mut(&id)?;
        *refs += 1;
        Some(node.clone())
    }

    /// The node of `key`, if the guest knows one.
    pub fn find(&self, key: Key) -> Option<Arc<Node>> {
        let t = self.tables();
        let id = t.by_key.get(&key)?;
        t.nodes.get(id).map(|(n, _)| n.clone())
    }

    /// Node `id` is now known by its upper inode `upper` (a copy-up): re-keyed.
    pub fn rekey(&self, id: u64, lower: Option<u64>, upper: u64) {
        let mut t = self.tables();
        if let Some(lower) = lower {
            if t.by_key.get(&Key::Lower(lower)) == Some(&id) {
                t.by_key.remove(&Key::Lower(lower));
            }
        }
        t.by_key.insert(Key::Upper(upper), id);
    }

    /// `count` lookups of node `id` given back; what a node dropped now held.
    pub fn forget(&self, id: u64, count: u64) -> Option<Dropped> {
        let mut t = self.tables();
        let (node, refs) = t.nodes.get_mut(&id)?;
        *refs = refs.saturating_sub(count);
        if *refs > 0 || id == ROOT_ID {
            return None;
        }
        let node = node.clone();
        t.nodes.remove(&id);
        if let Some(host) = t.host_of.remove(&id) {
            if t.by_host.get(&host) == Some(&id) {
                t.by_host.remove(&host);
            }
        }
        let st = node.state().clone();
        if let Some(upper) = st.upper {
            if t.by_key.get(&Key::Upper(upper)) == Some(&id) {
                t.by_key.remove(&Key::Upper(upper));
            }
        }
        if let Some(lower) = st.lower {
            if t.by_key.get(&Key::Lower(lower)) == Some(&id) {
                t.by_key.remove(&Key::Lower(lower));
            }
        }
        Some(Dropped { upper: st.upper })
    }
}
