//! The writable layer: an flist image (read-only, below) merged with a host directory the
//! guest's changes go to (`<layer>/upper`, above), as one `FileSystem`. It owns the merge:
//! - identity ([`inode`]): an object in the upper directory is one inode whatever its names
//!   (hard links share link count, ctime and attributes); an object only in the image keeps
//!   the image's inode number (above [`inode::LOWER_INO_BASE`]);
//! - lookups and directory listings: the upper entry wins, a whiteout hides the image's, an
//!   opaque directory shows nothing of the image, a redirected directory the image directory
//!   it names ([`whiteout`]);
//! - copy-up before any change of an image object: made whole in `work/` with the object's
//!   owner, mode, times and attributes, within the quota, then renamed in (`copy_up`); a file
//!   with other names in the image is copied once, its other names link to the copy;
//! - removals (whiteouts put in place atomically), new objects where the guest removed an
//!   image entry (made whole in `work/` and swapped with the whiteout: `make_staged`), renames
//!   ([`rename`]: files and directories, a moved image directory keeps its entries through a
//!   redirect);
//! - the check of a layer after a crash ([`check`]);
//! - requests served at once (one thread per request queue): a change of names holds the lock
//!   of the directory it changes (one of [`DIR_LOCKS`], by host inode number) under a shared
//!   tree lock that a rename takes exclusively; a copy-up holds the lock of the directory its
//!   copy goes into, so a large copy-up holds up changes in that directory only. Lookups take
//!   no lock (they wait for a copy-up only when they meet its copy half put in place).
//!
//! Everything the guest asks of the upper directory goes through the passthrough behind the
//! layer's [`Guard`] (no devices, no setuid, guest attributes under `user.gridnode.`, quota,
//! the guest's credentials for what it creates); the layer's own marks are made on the host
//! directly ([`host`]). Open files keep their host descriptor: an unlinked file stays
//! readable through it.

#[cfg(test)]
mod bench_tests;
pub mod check;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod fuse_tests;
pub(crate) mod host;
mod inode;
mod rename;
#[cfg(test)]
mod tests;
pub(crate) mod whiteout;

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use flist_fs::fs::FlistFs;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::copy_up::CopyUp;
use super::guard::Guard;
use super::quota::Quota;
use inode::{HostId, Inodes, Key, Node, NodeState, LOWER_INO_BASE};

pub use whiteout::ORIGIN_XATTR;

/// Handles of files opened in the image carry this bit (passthrough handles count up from 1,
/// image handles are image inode numbers: neither reaches it).
const LOWER_HANDLE: u64 = 1 << 63;
/// How long the guest may cache entries and attributes (as the passthrough's `Auto`).
const TIMEOUT: Duration = Duration::from_secs(1);
const WRITE_FLAGS: u32 = (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC) as u32;
/// Linux's FOPEN_NOFLUSH (FUSE 7.35, Linux 5.16; older guests ignore it): no FLUSH request
/// when the guest closes the file.
const FOPEN_NOFLUSH: u32 = 1 << 5;
/// How many locks guard the names of directories (a directory's is picked by its host inode
/// number): changes in different directories rarely wait for each other.
const DIR_LOCKS: usize = 64;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// What is at a name of a directory, in each layer.
#[derive(Default)]
struct Peek {
    /// The upper entry (host attributes), unless a whiteout.
    upper: Option<libc::stat64>,
    /// The upper entry is a whiteout.
    whiteout: bool,
    /// The image entry (inode, attributes) that shows through: none under a whiteout or in an
    /// opaque directory.
    lower: Option<(u64, stat64)>,
}

impl Peek {
    fn exists(&self) -> bool {
        self.upper.is_some() || self.lower.is_some()
    }

    fn kind(&self) -> u32 {
        match (&self.upper, &self.lower) {
            (Some(u), _) => u.st_mode & libc::S_IFMT,
            (None, Some((_, l))) => l.st_mode & libc::S_IFMT,
            _ => 0,
        }
    }
}

/// One entry of a merged directory listing.
struct Item {
    name: CString,
    type_: u32,
    ino: u64,
    /// Listed from the upper directory (else from the image only: no upper entry, whiteout
    /// included, had the name).
    upper: bool,
}

/// A directory's listing, kept from OPENDIR to RELEASEDIR.
struct Listing {
    items: Vec<Item>,
    /// The change counts when the listing was made: while they stay the same, no name of the
    /// upper directory has changed since, and an entry listed from the image only is still
    /// only there (READDIRPLUS then need not look for it on the host).
    stamp: Option<Stamp>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    slot: usize,
    changes: u64,
    renames: u64,
}

/// A directory lock held: its change count is odd while held (see [`Layer::dir_changes`]).
struct DirGuard<'a> {
    count: &'a AtomicU64,
    _lock: MutexGuard<'a, ()>,
}

impl<'a> DirGuard<'a> {
    fn new(lock: MutexGuard<'a, ()>, count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        DirGuard { count, _lock: lock }
    }
}

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        // Before the lock is released (fields drop after this).
        self.count.fetch_add(1, Ordering::AcqRel);
    }
}

/// The tree lock held by a rename: the rename count is odd while held.
struct RenameGuard<'a> {
    count: &'a AtomicU64,
    _lock: RwLockWriteGuard<'a, ()>,
}

impl Drop for RenameGuard<'_> {
    fn drop(&mut self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }
}

pub struct Layer {
    image: Arc<FlistFs>,
    upper: Guard<PassthroughFs>,
    /// `<layer>/upper` (`O_PATH`).
    root: Arc<OwnedFd>,
    /// `<layer>/work` (`O_PATH`): staging of whiteouts and removed directories.
    work: OwnedFd,
    /// `<layer>/work/index` (`O_PATH`), once there (made at the first copy-up of a file with
    /// several image names).
    index: std::sync::OnceLock<OwnedFd>,
    copy_up: CopyUp,
    quota: Option<Arc<Quota>>,
    inodes: Inodes,
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    next_dir: AtomicU64,
    /// Held shared by every change of the tree's names (copy-ups included), exclusively by a
    /// rename: a rename sees no other change under way (renames are rare, and move names
    /// between directories and nodes between parents).
    tree: RwLock<()>,
    /// A change of names in a directory (an entry made, removed, or copied up into it) holds
    /// that directory's lock, under `tree`: what it saw at the name stays so until it is done.
    /// A request holds one directory lock at a time (two, in index order, for rmdir); copy-ups
    /// of a directory's parents are made before its lock is taken.
    dir_locks: [Mutex<()>; DIR_LOCKS],
    /// How often each of `dir_locks` was taken and given back (odd: held now): a listing
    /// made with an even count that is the same later saw no change of names in between.
    dir_changes: [AtomicU64; DIR_LOCKS],
    /// The same for renames (which hold `tree` exclusively, no directory lock).
    renames: AtomicU64,
    /// Held (under a directory lock) while a copy-up of an image file with several names links
    /// its copy into the index, so two of its names copied up at once share one copy.
    index_lock: Mutex<()>,
    staged: AtomicU64,
    /// When an unexpected failure was last logged (rate limit).
    last_log: Mutex<Option<Instant>>,
    /// Tests: what runs once when a request reaches a point (see [`Point`]), as a request on
    /// another queue may run at that moment.
    #[cfg(test)]
    hooks: Mutex<Vec<(Point, Hook)>>,
    /// Tests: FLUSH requests served.
    #[cfg(test)]
    flushes: Arc<AtomicU64>,
}

/// Tests: points of a request where another request may be served meanwhile.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// A lookup found the node of the upper inode it looked up (given: the node).
    FoundUpper,
    /// A lookup saw only the image's entry at the name, and takes its node next (given: the
    /// image inode).
    LowerOnly,
    /// A new object is whole in `work/`, and is renamed in next.
    Staged,
}

#[cfg(test)]
type Hook = Box<dyn FnOnce(&Layer, u64) + Send>;

/// A new object of the guest's, as [`Layer::make_staged`] makes it in `work/`.
enum Fresh<'a> {
    Dir,
    File,
    /// A FIFO, socket or regular file made by MKNOD (its type).
    Special(u32),
    /// A symlink to the target.
    Symlink(&'a CStr),
    /// A device node (type, number): a plain empty file marked with the device.
    Device(u32, u32),
    /// Another name of the upper file `name` in `dir`, host inode `ino`.
    Link {
        dir: &'a OwnedFd,
        name: &'a CStr,
        ino: u64,
    },
}

impl Layer {
    /// The layer over `image` whose upper directory `root` is served by `upper`; `work` is
    /// the layer's work directory (same filesystem), `copy_up` its copier.
    pub fn new(
        image: Arc<FlistFs>,
        upper: Guard<PassthroughFs>,
        root: Arc<OwnedFd>,
        work: OwnedFd,
        copy_up: CopyUp,
        quota: Option<Arc<Quota>>,
    ) -> Self {
        let index = std::sync::OnceLock::new();
        if let Ok(fd) = host::open_dir(&work, whiteout::INDEX_DIR) {
            let _ = index.set(fd);
        }
        let inodes = Inodes::new(Self::root_state(&root));
        Self {
            image,
            upper,
            root,
            work,
            index,
            copy_up,
            quota,
            inodes,
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
            tree: RwLock::new(()),
            dir_locks: std::array::from_fn(|_| Mutex::new(())),
            dir_changes: std::array::from_fn(|_| AtomicU64::new(0)),
            renames: AtomicU64::new(0),
            index_lock: Mutex::new(()),
            staged: AtomicU64::new(0),
            last_log: Mutex::new(None),
            #[cfg(test)]
            hooks: Mutex::new(Vec::new()),
            #[cfg(test)]
            flushes: Arc::default(),
        }
    }

    /// Tests: runs `hook` the next time a request reaches `at`.
    #[cfg(test)]
    fn when(&self, at: Point, hook: impl FnOnce(&Layer, u64) + Send + 'static) {
        self.hooks.lock().unwrap().push((at, Box::new(hook)));
    }

    #[cfg(test)]
    fn reached(&self, at: Point, id: u64) {
        let hook = {
            let mut hooks = self.hooks.lock().unwrap();
            let i = hooks.iter().position(|(p, _)| *p == at);
            i.map(|i| hooks.remove(i).1)
        };
        if let Some(hook) = hook {
            hook(self, id);
        }
    }

    fn root_state(root: &Arc<OwnedFd>) -> NodeState {
        NodeState {
            lower: Some(ROOT_ID),
            lower_path: Vec::new(),
            upper: Some(ROOT_ID),
            upper_dir: Some(root.clone()),
            dir_ino: host::stat_fd(root).map_or(0, |st| st.st_ino),
            device: None,
            indexed: false,
            parent: ROOT_ID,
            name: CString::default(),
        }
    }

    /// The tree lock, shared: held by a request that changes names (not a rename), taken
    /// first and once.
    fn changing(&self) -> RwLockReadGuard<'_, ()> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The tree lock, exclusive: held by a rename.
    fn renaming(&self) -> RenameGuard<'_> {
        let lock = self.tree.write().unwrap_or_else(|p| p.into_inner());
        self.renames.fetch_add(1, Ordering::AcqRel);
        RenameGuard {
            count: &self.renames,
            _lock: lock,
        }
    }

    fn dir_lock_index(dir_ino: u64) -> usize {
        (dir_ino % DIR_LOCKS as u64) as usize
    }

    /// The lock of the upper directory whose state is `dir` (see `dir_locks`).
    fn dir_lock(&self, dir: &NodeState) -> DirGuard<'_> {
        self.dir_lock_at(Self::dir_lock_index(dir.dir_ino))
    }

    fn dir_lock_at(&self, k: usize) -> DirGuard<'_> {
        let lock = self.dir_locks[k].lock().unwrap_or_else(|p| p.into_inner());
        DirGuard::new(lock, &self.dir_changes[k])
    }

    /// The change counts of the directory whose state is `dir`, when no change is under way.
    fn stamp(&self, dir: &NodeState) -> Option<Stamp> {
        dir.upper_dir.as_ref()?;
        let slot = Self::dir_lock_index(dir.dir_ino);
        let stamp = Stamp {
            slot,
            changes: self.dir_changes[slot].load(Ordering::Acquire),
            renames: self.renames.load(Ordering::Acquire),
        };
        (stamp.changes.is_multiple_of(2) && stamp.renames.is_multiple_of(2)).then_some(stamp)
    }

    /// Whether no change of names has happened since `stamp` was taken.
    fn unchanged_since(&self, stamp: Stamp) -> bool {
        self.dir_changes[stamp.slot].load(Ordering::Acquire) == stamp.changes
            && self.renames.load(Ordering::Acquire) == stamp.renames
    }

    /// The locks of the upper directories with host inode numbers `a` and `b`, taken in index
    /// order (one lock when both are guarded by the same).
    fn dir_locks_of(&self, a: u64, b: u64) -> (DirGuard<'_>, Option<DirGuard<'_>>) {
        let (i, j) = (Self::dir_lock_index(a), Self::dir_lock_index(b));
        let lock = |k: usize| self.dir_lock_at(k);
        match i.cmp(&j) {
            std::cmp::Ordering::Equal => (lock(i), None),
            std::cmp::Ordering::Less => {
                let first = lock(i);
                (first, Some(lock(j)))
            }
            std::cmp::Ordering::Greater => {
                let first = lock(j);
                (first, Some(lock(i)))
            }
        }
    }

    /// Logs an unexpected failure (at most one a second); the guest gets its errno.
    fn logged<T>(&self, what: &str, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let expected = matches!(
                e.raw_os_error(),
                Some(
                    libc::ENOENT
                        | libc::EEXIST
                        | libc::ENOTEMPTY
                        | libc::ENOTDIR
                        | libc::EISDIR
                        | libc::EACCES
                        | libc::EPERM
                        | libc::EDQUOT
                        | libc::ENODATA
                        | libc::ERANGE
                        | libc::EINVAL
                        | libc::ENAMETOOLONG
                        | libc::ENOSYS
                        | libc::ENOTTY
                        | libc::EXDEV
                        | libc::ELOOP
                )
            );
            if !expected {
                let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    *last = Some(Instant::now());
                    tracing::warn!("writable layer: {what}: {e}");
                }
            }
        }
        r
    }

    fn node(&self, id: u64) -> io::Result<Arc<Node>> {
        self.inodes.get(id).ok_or_else(|| errno(libc::ESTALE))
    }

    fn staging_name(&self) -> CString {
        // Digits and dashes: never a NUL.
        CString::new(format!(
            "layer-{}-{}",
            std::process::id(),
            self.staged.fetch_add(1, Ordering::Relaxed)
        ))
        .unwrap_or_default()
    }

    /// The attributes of an image object as the guest sees them.
    fn lower_attr(mut st: stat64) -> stat64 {
        st.st_ino = st.st_ino.wrapping_add(LOWER_INO_BASE);
        st
    }

    fn entry(id: u64, attr: stat64) -> Entry {
        Entry {
            inode: id,
            generation: 0,
            attr,
            attr_flags: 0,
            attr_timeout: TIMEOUT,
            entry_timeout: TIMEOUT,
        }
    }

    /// The image entry `name` in image directory `dir`, if any.
    fn lower_child(
        &self,
        ctx: &Context,
        dir: u64,
        name: &CStr,
    ) -> io::Result<Option<(u64, stat64)>> {
        match self.image.lookup(ctx, dir, name) {
            Ok(e) if e.inode != 0 => Ok(Some((e.inode, e.attr))),
            Ok(_) => Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The image directory at absolute image path `path` (a redirect's value).
    fn lower_at_path(&self, ctx: &Context, path: &[u8]) -> io::Result<Option<(u64, Vec<u8>)>> {
        let mut ino = ROOT_ID;
        let mut parts = Vec::new();
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            if part == b".." || part == b"." {
                return Ok(None);
            }
            let name = CString::new(part).map_err(|_| errno(libc::EIO))?;
            match self.lower_child(ctx, ino, &name)? {
                Some((child, st)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => ino = child,
                _ => return Ok(None),
            }
            parts.push(part);
        }
        Ok(Some((ino, parts.join(&b'/'))))
    }

    fn join(dir: &[u8], name: &CStr) -> Vec<u8> {
        if dir.is_empty() {
            name.to_bytes().to_vec()
        } else {
            [dir, b"/", name.to_bytes()].concat()
        }
    }

    /// What is at `name` in directory `dir`.
    fn peek(&self, ctx: &Context, dir: &NodeState, name: &CStr) -> io::Result<Peek> {
        let mut peek = Peek::default();
        if let Some(fd) = &dir.upper_dir {
            match host::stat_at(fd, name)? {
                Some(st) if whiteout::is_whiteout(&st) => peek.whiteout = true,
                other => peek.upper = other,
            }
        }
        if !peek.whiteout {
            if let Some(lower) = dir.lower {
                peek.lower = self.lower_child(ctx, lower, name)?;
            }
        }
        Ok(peek)
    }

    /// The state of the upper directory `name` in `dir` (upper attributes `st`, passthrough
    /// inode `upper`): its descriptor and the image directory it shows.
    fn upper_dir_state(
        &self,
        ctx: &Context,
        dir: &NodeState,
        name: &CStr,
        peek: &Peek,
        upper: u64,
        st: &libc::stat64,
    ) -> io::Result<NodeState> {
        let parent_fd = dir.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let fd = host::open_dir(parent_fd, name)?;
        let found = host::stat_fd(&fd)?;
        if found.st_ino != st.st_ino || found.st_dev != st.st_dev {
            // Replaced on the host between the two looks.
            return Err(errno(libc::ESTALE));
        }
        let (lower, lower_path) = if whiteout::is_opaque(&fd)? {
            (None, Vec::new())
        } else if let Some(path) = whiteout::redirect(&fd)? {
            match self.lower_at_path(ctx, &path)? {
                Some((ino, path)) => (Some(ino), path),
                None => (None, Vec::new()),
            }
        } else {
            match &peek.lower {
                Some((ino, lst)) if lst.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    (Some(*ino), Self::join(&dir.lower_path, name))
                }
                _ => (None, Vec::new()),
            }
        };
        Ok(NodeState {
            lower,
            lower_path,
            upper: Some(upper),
            upper_dir: Some(Arc::new(fd)),
            dir_ino: found.st_ino,
            device: None,
            indexed: false,
            parent: 0,
            name: name.to_owned(),
        })
    }

    /// The node of the upper object the passthrough entry `e` names (`name` in `parent`):
    /// found or made, holding one more lookup.
    fn upper_node(
        &self,
        ctx: &Context,
        parent: &Node,
        name: &CStr,
        e: Entry,
        peek: Option<&Peek>,
        fresh: bool,
    ) -> io::Result<(Arc<Node>, stat64)> {
        let mut kind = e.attr.st_mode & libc::S_IFMT;
        if let Some(node) = self.inodes.find_and_ref(Key::Upper(e.inode)) {
            #[cfg(test)]
            self.reached(Point::FoundUpper, node.id);
            self.upper.forget(ctx, e.inode, 1);
            let attr = Self::present(&node.state(), e.attr);
            return Ok((node, attr));
        }
        let pst = parent.state().clone();
        let device = match &pst.upper_dir {
            Some(dir) if kind == libc::S_IFREG && !fresh => whiteout::device_of(dir, name, &e.attr)
                .unwrap_or_else(|err| {
                    tracing::debug!("layer: device mark unreadable: {err}");
                    None
                }),
            _ => None,
        };
        if let Some((dev_kind, _)) = device {
            kind = dev_kind;
        }
        let indexed = kind == libc::S_IFREG && e.attr.st_nlink > 1 && {
            match &pst.upper_dir {
                Some(dir) => self.is_indexed(dir, name, &e.attr),
                None => false,
            }
        };
        let mut state = if kind == libc::S_IFDIR {
            let fresh;
            let peek = match peek {
                Some(p) => p,
                None => {
                    fresh = self.peek(ctx, &pst, name)?;
                    &fresh
                }
            };
            match self.upper_dir_state(ctx, &pst, name, peek, e.inode, &e.attr) {
                Ok(s) => s,
                Err(err) => {
                    self.upper.forget(ctx, e.inode, 1);
                    return Err(err);
                }
            }
        } else {
            NodeState {
                upper: Some(e.inode),
                name: name.to_owned(),
                device,
                indexed,
                ..Default::default()
            }
        };
        state.parent = parent.id;
        let (node, existed) = self
            .inodes
            .lookup_or_insert(Key::Upper(e.inode), kind, || state);
        if existed {
            self.upper.forget(ctx, e.inode, 1);
        } else {
            self.inodes.set_host(node.id, HostId::of(&e.attr));
        }
        let st = node.state().clone();
        let mut attr = Self::present(&st, e.attr);
        if let (Some(lower), Some(fd)) = (st.lower, &st.upper_dir) {
            attr.st_nlink += self.lower_only_subdirs(ctx, lower, fd).unwrap_or(0);
        }
        Ok((node, attr))
    }

    /// Looks `name` up in directory `parent`: its node (one more lookup) and attributes.
    /// `locked`: the caller holds the tree lock (then neither waits for a copy-up nor links
    /// an image file's other name to its copy).
    fn lookup_node(
        &self,
        ctx: &Context,
        parent: &Node,
        name: &CStr,
        locked: bool,
    ) -> io::Result<(Arc<Node>, stat64)> {
        self.lookup_node_as(ctx, parent, name, locked, false)
    }

    /// [`Self::lookup_node`]; `image_only`: the caller knows the upper directory has no entry
    /// (not even a whiteout) at `name`, which is then looked for in the image only.
    fn lookup_node_as(
        &self,
        ctx: &Context,
        parent: &Node,
        name: &CStr,
        locked: bool,
        image_only: bool,
    ) -> io::Result<(Arc<Node>, stat64)> {
        if !parent.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let pst = parent.state().clone();
        let peek = match (image_only, pst.lower) {
            (true, Some(lower)) => Peek {
                lower: self.lower_child(ctx, lower, name)?,
                ..Peek::default()
            },
            _ => self.peek(ctx, &pst, name)?,
        };
        if peek.upper.is_some() {
            if let (Some((lino, _)), false) = (&peek.lower, locked) {
                let copying = self
                    .inodes
                    .find(Key::Lower(*lino))
                    .is_some_and(|n| n.state().upper.is_none());
                if copying {
                    // The image object's copy may be in place with its node not yet moved
                    // to it: the copy-up (under the directory's lock) ends first, so both are
                    // one node.
                    let _tree = self.changing();
                    drop(self.dir_lock(&pst));
                }
            }
            if let Some(found) = peek
                .upper
                .and_then(|st| Some((self.inodes.find_host_and_ref(HostId::of(&st))?, st)))
            {
                // Known already: its attributes are the ones just read, no passthrough lookup.
                #[cfg(test)]
                self.reached(Point::FoundUpper, found.0.id);
                let attr = Self::present(&found.0.state(), found.1);
                return Ok((found.0, attr));
            }
            let upper = pst.upper.ok_or_else(|| errno(libc::EIO))?;
            let e = self.upper.lookup(ctx, upper, name)?;
            return self.upper_node(ctx, parent, name, e, Some(&peek), false);
        }
        let Some((lino, lst)) = peek.lower else {
            return Err(errno(libc::ENOENT));
        };
        let kind = lst.st_mode & libc::S_IFMT;
        #[cfg(test)]
        self.reached(Point::LowerOnly, lino);
        if kind == libc::S_IFREG && lst.st_nlink > 1 && !locked && self.indexed(lino) {
            // Another name of this image file was copied up: this one links to the copy.
            let _tree = self.changing();
            let linked = self.link_alias(ctx, parent, name, lino);
            drop(_tree);
            if let Some(found) = linked? {
                return Ok(found);
            }
        }
        let (node, _) = self
            .inodes
            .lookup_or_insert(Key::Lower(lino), kind, || NodeState {
                lower: Some(lino),
                lower_path: Self::join(&pst.lower_path, name),
                upper: None,
                upper_dir: None,
                dir_ino: 0,
                device: None,
                indexed: false,
                parent: parent.id,
                name: name.to_owned(),
            });
        Ok((node, Self::lower_attr(lst)))
    }

    /// Whether the upper file `name` in `dir` (attributes `st`) is a copy linked in the index.
    fn is_indexed(&self, dir: &OwnedFd, name: &CStr, st: &stat64) -> bool {
        let Some(index) = self.index(false) else {
            return false;
        };
        let origin =
            host::open_path(dir, name).and_then(|fd| host::get_xattr(&fd, whiteout::ORIGIN_XATTR));
        let Ok(Some(origin)) = origin else {
            return false;
        };
        let Some(ino) = std::str::from_utf8(&origin)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return false;
        };
        matches!(
            host::stat_at(index, &whiteout::index_name(ino)),
            Ok(Some(found)) if found.st_ino == st.st_ino && found.st_dev == st.st_dev
        )
    }

    /// The index directory, made when `create` and not there yet.
    fn index(&self, create: bool) -> Option<&OwnedFd> {
        if let Some(index) = self.index.get() {
            return Some(index);
        }
        if !create {
            return None;
        }
        let made = match host::mkdir_at(&self.work, whiteout::INDEX_DIR, 0o700) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(e),
            _ => host::open_dir(&self.work, whiteout::INDEX_DIR),
        };
        match made {
            Ok(fd) => {
                let _ = self.index.set(fd);
                self.index.get()
            }
            Err(e) => {
                tracing::warn!("layer: no index directory, image hard links copy apart: {e}");
                None
            }
        }
    }

    fn indexed(&self, lino: u64) -> bool {
        self.index(false).is_some_and(|index| {
            matches!(
                host::stat_at(index, &whiteout::index_name(lino)),
                Ok(Some(_))
            )
        })
    }

    /// Links image file `lino`'s copy (in the index) as `name` in `parent`; `None` when
    /// there is nothing to link (any more).
    fn link_alias(
        &self,
        ctx: &Context,
        parent: &Node,
        name: &CStr,
        lino: u64,
    ) -> io::Result<Option<(Arc<Node>, stat64)>> {
        let Some(index) = self.index(false) else {
            return Ok(None);
        };
        let pst = self.ensure_upper(ctx, parent)?;
        let _dir = self.dir_lock(&pst);
        let dir = pst.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let peek = self.peek(ctx, &pst, name)?;
        if peek.upper.is_some() || peek.whiteout || peek.lower.map(|(i, _)| i) != Some(lino) {
            return Ok(None);
        }
        match host::link_at(index, &whiteout::index_name(lino), dir, name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        let upper = pst.upper.ok_or_else(|| errno(libc::EIO))?;
        let e = self.upper.lookup(ctx, upper, name)?;
        self.upper_node(ctx, parent, name, e, None, false).map(Some)
    }

    /// Makes sure `node` is in the upper directory (copying it up, and its directories first);
    /// its state after. The caller holds the tree lock and no directory lock: each copy-up
    /// holds the lock of the directory it puts its copy in.
    fn ensure_upper(&self, ctx: &Context, node: &Node) -> io::Result<NodeState> {
        let st = node.state().clone();
        if st.upper.is_some() {
            return Ok(st);
        }
        let parent = self.node(st.parent)?;
        let pst = self.ensure_upper(ctx, &parent)?;
        let _dir = self.dir_lock(&pst);
        // Copied up meanwhile by another request?
        let st = node.state().clone();
        if st.upper.is_some() {
            return Ok(st);
        }
        let lower = st.lower.ok_or_else(|| errno(libc::EIO))?;
        let dir = pst.upper_dir.clone().ok_or_else(|| errno(libc::EIO))?;
        let pupper = pst.upper.ok_or_else(|| errno(libc::EIO))?;
        // The name must still be this image object's, or its copy's.
        let peek = self.peek(ctx, &pst, &st.name)?;
        if peek.whiteout {
            return Err(errno(libc::ESTALE));
        }
        let (lst, _) = self.image.getattr(ctx, lower, None)?;
        let kind = lst.st_mode & libc::S_IFMT;
        let index = if kind == libc::S_IFREG && lst.st_nlink > 1 {
            self.index(true)
        } else {
            None
        };
        let _index = index.map(|_| self.index_lock.lock().unwrap_or_else(|p| p.into_inner()));
        let linked = match (index, &peek.upper) {
            (_, Some(found)) => {
                // Copied up already under another node of this image object (a lookup made
                // this node while the copy went in, or linked another name of a hard-linked
                // image file to its copy): this node is that copy too.
                if !self.is_copy_of(ctx, pupper, &st.name, found, lower, index)? {
                    return Err(errno(libc::ESTALE));
                }
                true
            }
            (Some(index), None) => {
                match host::link_at(index, &whiteout::index_name(lower), &dir, &st.name) {
                    Ok(()) => true,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
                    Err(e) => return Err(e),
                }
            }
            (None, None) => false,
        };
        if !linked {
            self.copy_up.place(ctx, lower, &lst, &dir, &st.name)?;
            if let Some(index) = index {
                if let Err(e) = host::link_at(&dir, &st.name, index, &whiteout::index_name(lower)) {
                    tracing::debug!("layer: copy of a hard-linked image file not indexed: {e}");
                }
            }
        }
        let e = self.upper.lookup(ctx, pupper, &st.name)?;
        let upper_dir = if kind == libc::S_IFDIR {
            Some(Arc::new(host::open_dir(&dir, &st.name)?))
        } else {
            None
        };
        let dir_ino = if upper_dir.is_some() {
            e.attr.st_ino
        } else {
            0
        };
        let existing = self.inodes.find(Key::Upper(e.inode));
        {
            let mut s = node.state();
            s.upper = Some(e.inode);
            s.upper_dir = upper_dir;
            s.dir_ino = dir_ino;
            if matches!(kind, libc::S_IFCHR | libc::S_IFBLK) {
                s.device = Some((kind, lst.st_rdev as u32));
            }
            s.indexed = index.is_some_and(|index| {
                matches!(
                    (host::stat_at(index, &whiteout::index_name(lower)), host::stat_at(&dir, &st.name)),
                    (Ok(Some(a)), Ok(Some(b))) if a.st_ino == b.st_ino && a.st_dev == b.st_dev
                )
            });
        }
        match existing {
            // Another node already stands for this upper inode (an alias linked at lookup):
            // this node keeps its own passthrough lookup.
            Some(other) if other.id != node.id => {}
            _ => {
                self.inodes.rekey(node.id, Some(lower), e.inode);
                self.inodes.set_host(node.id, HostId::of(&e.attr));
            }
        }
        Ok(node.state().clone())
    }

    /// Whether the upper entry `name` (host attributes `found`) of the upper directory with
    /// passthrough inode `pupper` is the copy of image object `lower`: a node of the copy came
    /// from that object, or (a file with several image names) the index holds it as the copy.
    fn is_copy_of(
        &self,
        ctx: &Context,
        pupper: u64,
        name: &CStr,
        found: &libc::stat64,
        lower: u64,
        index: Option<&OwnedFd>,
    ) -> io::Result<bool> {
        if let Some(index) = index {
            if let Ok(Some(copy)) = host::stat_at(index, &whiteout::index_name(lower)) {
                if copy.st_ino == found.st_ino && copy.st_dev == found.st_dev {
                    return Ok(true);
                }
            }
        }
        let e = self.upper.lookup(ctx, pupper, name)?;
        let same = self
            .inodes
            .find(Key::Upper(e.inode))
            .is_some_and(|n| n.state().lower == Some(lower));
        self.upper.forget(ctx, e.inode, 1);
        Ok(same)
    }

    /// [`Self::ensure_upper`] under the tree lock, when not in the upper directory yet.
    fn copied_up(&self, ctx: &Context, node: &Node) -> io::Result<NodeState> {
        let st = node.state().clone();
        if st.upper.is_some() {
            return Ok(st);
        }
        let _tree = self.changing();
        self.logged("copy-up", self.ensure_upper(ctx, node))
    }

    /// The merged entries of a directory (without `.` and `..`).
    fn merged(&self, ctx: &Context, dir: &NodeState) -> io::Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut hidden: HashSet<CString> = HashSet::new();
        if let Some(fd) = &dir.upper_dir {
            for (name, dt, ino) in host::list_dir(fd)? {
                if dt == libc::DT_CHR {
                    if let Some(st) = host::stat_at(fd, &name)? {
                        if whiteout::is_whiteout(&st) {
                            hidden.insert(name);
                            continue;
                        }
                    }
                }
                hidden.insert(name.clone());
                items.push(Item {
                    name,
                    type_: u32::from(dt),
                    ino,
                    upper: true,
                });
            }
        }
        if let Some(lower) = dir.lower {
            let mut lower_items = Vec::new();
            self.image
                .readdir(ctx, lower, lower, u32::MAX, 0, &mut |e: DirEntry| {
                    if e.name != b"." && e.name != b".." {
                        lower_items.push((e.name.to_vec(), e.type_, e.ino));
                    }
                    Ok(1)
                })?;
            for (name, type_, ino) in lower_items {
                let name = CString::new(name).map_err(|_| errno(libc::EIO))?;
                if !hidden.contains(&name) {
                    items.push(Item {
                        name,
                        type_,
                        ino: ino.wrapping_add(LOWER_INO_BASE),
                        upper: false,
                    });
                }
            }
        }
        Ok(items)
    }

    /// How many subdirectories of image directory `lower` show in the merged directory whose
    /// upper directory is `upper` (those with no upper entry of their name).
    fn lower_only_subdirs(&self, ctx: &Context, lower: u64, upper: &OwnedFd) -> io::Result<u64> {
        let mut dirs = Vec::new();
        self.image
            .readdir(ctx, lower, lower, u32::MAX, 0, &mut |e: DirEntry| {
                if e.type_ == u32::from(libc::DT_DIR) && e.name != b"." && e.name != b".." {
                    dirs.push(e.name.to_vec());
                }
                Ok(1)
            })?;
        let mut n = 0;
        for d in dirs {
            let name = CString::new(d).map_err(|_| errno(libc::EIO))?;
            if host::stat_at(upper, &name)?.is_none() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether the directory `name` in `dir` shows no entry (whiteouts aside).
    fn is_empty_dir(
        &self,
        ctx: &Context,
        dir: &NodeState,
        name: &CStr,
        peek: &Peek,
    ) -> io::Result<bool> {
        let state = match (&peek.upper, &peek.lower) {
            (Some(st), _) => {
                let fd = dir.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
                let sub = host::open_dir(fd, name)?;
                let (lower, _) = if whiteout::is_opaque(&sub)? {
                    (None, ())
                } else if let Some(path) = whiteout::redirect(&sub)? {
                    (self.lower_at_path(ctx, &path)?.map(|(i, _)| i), ())
                } else {
                    (
                        peek.lower
                            .filter(|(_, l)| l.st_mode & libc::S_IFMT == libc::S_IFDIR)
                            .map(|(i, _)| i),
                        (),
                    )
                };
                let _ = st;
                NodeState {
                    lower,
                    upper_dir: Some(Arc::new(sub)),
                    ..Default::default()
                }
            }
            (None, Some((ino, _))) => NodeState {
                lower: Some(*ino),
                ..Default::default()
            },
            (None, None) => return Err(errno(libc::ENOENT)),
        };
        Ok(self.merged(ctx, &state)?.is_empty())
    }

    /// Puts a whiteout in place of the upper entry `name` of `dir` in one step (the entry,
    /// a file or an emptied directory, ends in `work/` and is removed there).
    fn whiteout_over(&self, dir: &OwnedFd, name: &CStr, is_dir: bool) -> io::Result<()> {
        let tmp = self.staging_name();
        host::mknod_whiteout(&self.work, &tmp)?;
        let flags = if is_dir { libc::RENAME_EXCHANGE } else { 0 };
        if let Err(e) = host::rename_at(&self.work, &tmp, dir, name, flags) {
            let _ = host::unlink_at(&self.work, &tmp, false);
            return Err(e);
        }
        if is_dir {
            whiteout::remove_all(&self.work, &tmp)?;
        }
        Ok(())
    }

    /// Gives the quota back for the upper entry `st` that is gone now.
    fn freed(&self, st: &libc::stat64) {
        if let Some(quota) = &self.quota {
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            if st.st_nlink <= 1 || is_dir {
                quota.release_inode();
                if !is_dir {
                    quota.release_bytes(st.st_size.max(0) as u64);
                }
            }
        }
    }

    /// The state of directory `parent`, with its upper directory made (copying it up, and its
    /// parents, when not there yet) for a change of `name`. When a copy-up is needed, `check`
    /// is asked first about what is at the name, so a change that fails copies nothing up.
    /// The caller holds the tree lock and no directory lock; it takes the directory's lock
    /// next and looks at the name again under it.
    fn dir_for_change(
        &self,
        ctx: &Context,
        parent: &Node,
        name: &CStr,
        check: impl Fn(&Peek) -> io::Result<()>,
    ) -> io::Result<NodeState> {
        if !parent.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let pst = parent.state().clone();
        if pst.upper.is_some() {
            return Ok(pst);
        }
        check(&self.peek(ctx, &pst, name)?)?;
        self.logged("copy-up", self.ensure_upper(ctx, parent))
    }

    /// A new object's name: free in the merged view.
    fn nothing_at(peek: &Peek) -> io::Result<()> {
        if peek.exists() {
            Err(errno(libc::EEXIST))
        } else {
            Ok(())
        }
    }

    /// Whether `name` in upper directory `pst` (whose lock the caller holds) is free for a new
    /// object: EEXIST when the merged view shows one there; `true` when a whiteout holds the
    /// name (the new object then takes its place in one step: [`Self::make_staged`]).
    fn free_name(&self, ctx: &Context, pst: &NodeState, name: &CStr) -> io::Result<bool> {
        let peek = self.peek(ctx, pst, name)?;
        Self::nothing_at(&peek)?;
        Ok(peek.whiteout)
    }

    /// The entry of `name` in `parent` just made (`fresh`: by the passthrough, so not a device
    /// node kept as a file).
    fn created(
        &self,
        ctx: &Context,
        parent: &Node,
        name: &CStr,
        e: Entry,
        fresh: bool,
    ) -> io::Result<Entry> {
        let (node, attr) = self.upper_node(ctx, parent, name, e, None, fresh)?;
        Ok(Self::entry(node.id, attr))
    }

    /// Upper attributes `attr` of the node in `st` as the guest sees them (a device node kept
    /// as a plain file shows as the device).
    fn present(st: &NodeState, attr: stat64) -> stat64 {
        Self::present_with(st.device, st.indexed, attr)
    }

    fn present_with(device: Option<(u32, u32)>, indexed: bool, mut attr: stat64) -> stat64 {
        if indexed {
            attr.st_nlink = attr.st_nlink.saturating_sub(1);
        }
        if let Some((kind, rdev)) = device {
            attr.st_mode = (attr.st_mode & !libc::S_IFMT) | kind;
            attr.st_rdev = u64::from(rdev);
        }
        attr
    }

    /// Makes the guest's new object `name` in upper directory `pst` (whose lock the caller
    /// holds) in one step: made whole in `work/` (owned by the caller, or with the directory's
    /// group when it is setgid; `mode` less `umask` as the host may hold it; a directory made
    /// opaque) and renamed in, in place of the whiteout at the name when `over_whiteout`: the
    /// two swap and the whiteout is removed in `work/`. A crash leaves the whiteout or the
    /// object at the name, never neither, so a removed image entry never shows again; what it
    /// leaves in `work/` goes at the next start.
    #[allow(clippy::too_many_arguments)]
    fn make_staged(
        &self,
        ctx: &Context,
        pst: &NodeState,
        name: &CStr,
        fresh: Fresh<'_>,
        mode: u32,
        umask: u32,
        over_whiteout: bool,
    ) -> io::Result<()> {
        let dir = pst.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let parent = host::stat_fd(dir)?;
        let setgid_dir = parent.st_mode & libc::S_ISGID != 0;
        let gid = if setgid_dir { parent.st_gid } else { ctx.gid };
        let perms = mode & 0o7777 & !umask;
        let file_perms = super::guard::host_file_mode(perms);
        let (inodes, bytes) = match fresh {
            Fresh::Link { .. } => (0, 0),
            Fresh::Symlink(target) => (1, target.to_bytes().len() as u64),
            _ => (1, 0),
        };
        if let Some(quota) = &self.quota {
            if inodes > 0 {
                quota.reserve_inode()?;
            }
            if let Err(e) = quota.reserve_bytes(bytes) {
                if inodes > 0 {
                    quota.release_inode();
                }
                return Err(e);
            }
        }
        let tmp = self.staging_name();
        let work = &self.work;
        let staged = (|| match fresh {
            Fresh::Dir => {
                host::mkdir_at(work, &tmp, 0o700)?;
                host::chown_at(work, &tmp, ctx.uid, gid)?;
                // The image's directory of that name (removed) must not show through.
                whiteout::set_opaque(&host::open_dir(work, &tmp)?)?;
                let setgid = if setgid_dir { libc::S_ISGID } else { 0 };
                host::chmod_at(work, &tmp, (perms & !libc::S_ISUID) | setgid)
            }
            Fresh::File => {
                host::mknod_at(work, &tmp, libc::S_IFREG | 0o600)?;
                host::chown_at(work, &tmp, ctx.uid, gid)?;
                // Its owner opens it next, whatever mode it asked for (the caller sets that
                // mode after).
                host::chmod_at(work, &tmp, file_perms | libc::S_IRUSR | libc::S_IWUSR)
            }
            Fresh::Special(kind) => {
                host::mknod_at(work, &tmp, kind | 0o600)?;
                host::chown_at(work, &tmp, ctx.uid, gid)?;
                host::chmod_at(work, &tmp, file_perms)
            }
            Fresh::Symlink(target) => {
                host::symlink_at(target.to_bytes(), work, &tmp)?;
                host::chown_at(work, &tmp, ctx.uid, gid)
            }
            Fresh::Device(kind, rdev) => {
                // A guest's device node never becomes a host device, nor a whiteout.
                host::mknod_at(work, &tmp, libc::S_IFREG | 0o600)?;
                host::chown_at(work, &tmp, ctx.uid, gid)?;
                let fd = host::open_path(work, &tmp)?;
                host::set_xattr(
                    &fd,
                    whiteout::DEVICE_XATTR,
                    &whiteout::device_value(kind, rdev),
                )?;
                host::chmod_at(work, &tmp, file_perms)
            }
            Fresh::Link { dir, name, ino } => {
                host::link_at(dir, name, work, &tmp)?;
                match host::stat_at(work, &tmp)? {
                    Some(st) if st.st_ino == ino => Ok(()),
                    // That name is another file's now.
                    _ => Err(errno(libc::ESTALE)),
                }
            }
        })();
        #[cfg(test)]
        if staged.is_ok() {
            self.reached(Point::Staged, 0);
        }
        let placed = staged.and_then(|()| self.put_in_place(&tmp, dir, name, over_whiteout));
        if placed.is_err() {
            if let Err(e) = whiteout::remove_all(work, &tmp) {
                tracing::debug!("layer: staged object not removed (the next start does): {e}");
            }
            if let Some(quota) = &self.quota {
                if inodes > 0 {
                    quota.release_inode();
                }
                quota.release_bytes(bytes);
            }
        }
        placed
    }

    /// Renames the object staged as `tmp` in `work/` to `name` in `dir`: into a free name, or
    /// in place of the whiteout there (swapped; what comes out must be that whiteout, else the
    /// two swap back: EEXIST).
    fn put_in_place(
        &self,
        tmp: &CStr,
        dir: &OwnedFd,
        name: &CStr,
        over_whiteout: bool,
    ) -> io::Result<()> {
        if !over_whiteout {
            return host::rename_at(&self.work, tmp, dir, name, libc::RENAME_NOREPLACE);
        }
        host::rename_at(&self.work, tmp, dir, name, libc::RENAME_EXCHANGE)?;
        match host::stat_at(&self.work, tmp)? {
            Some(st) if whiteout::is_whiteout(&st) => {
                if let Err(e) = host::unlink_at(&self.work, tmp, false) {
                    tracing::debug!(
                        "layer: replaced whiteout not removed (the next start does): {e}"
                    );
                }
                Ok(())
            }
            _ => {
                host::rename_at(&self.work, tmp, dir, name, libc::RENAME_EXCHANGE)?;
                Err(errno(libc::EEXIST))
            }
        }
    }

    /// The upper inode behind a request on an open `handle` of `inode`, or `None` when the
    /// handle is one of the image's (a file opened before any copy-up).
    fn upper_for_handle(&self, inode: u64, handle: u64) -> io::Result<Option<u64>> {
        if handle & LOWER_HANDLE != 0 {
            return Ok(None);
        }
        let node = self.node(inode)?;
        let upper = Self::upper_of(&node.state())?;
        Ok(Some(upper))
    }

    /// The listing made at OPENDIR for `handle`.
    fn listing(&self, handle: u64) -> io::Result<Arc<Listing>> {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&handle)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    fn upper_of(st: &NodeState) -> io::Result<u64> {
        st.upper.ok_or_else(|| errno(libc::EIO))
    }

    /// The options of every file the layer opens: `opts` and no FLUSH at close. A FLUSH would
    /// do nothing here: an image file has nothing to flush, an upper file's writes reach the
    /// host at each WRITE (no writeback cache is offered), the guest keeps its locks itself
    /// (the layer answers no lock request), and the passthrough's FLUSH only duplicates and
    /// closes the host descriptor. Each close then costs the guest one request less: a
    /// round trip per file read, created or changed (fuse-backend-rs's overlay gets the same
    /// by answering the first FLUSH with ENOSYS, which stops them for the whole mount).
    fn no_flush(opts: OpenOptions) -> OpenOptions {
        // SAFETY: `from_bits_unchecked` is unsafe only because the bit is not one of the
        // type's named flags; any bits are a valid value, sent to the guest as they are.
        unsafe { OpenOptions::from_bits_unchecked(opts.bits() | FOPEN_NOFLUSH) }
    }
}

impl FileSystem for Layer {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let opts = self.upper.init(capable)?;
        self.image.init(capable)?;
        self.inodes.reset(Self::root_state(&self.root));
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // Listings may carry each entry's node and attributes (READDIRPLUS, as the overlay
        // and the passthrough offer it): the guest then spares a LOOKUP per entry. Each
        // entry with a node is one lookup of it, given back by a FORGET (`readdirplus`).
        Ok(opts | FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO)
    }

    fn destroy(&self) {
        self.upper.destroy();
        self.inodes.reset(Self::root_state(&self.root));
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let parent = self.node(parent)?;
        let (node, attr) = self.logged("lookup", self.lookup_node(ctx, &parent, name, false))?;
        Ok(Self::entry(node.id, attr))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        if let Some(dropped) = self.inodes.forget(inode, count) {
            if let Some(upper) = dropped.upper {
                self.upper.forget(ctx, upper, 1);
            }
        }
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let node = self.node(inode)?;
        let st = node.brief();
        match (st.upper, st.lower) {
            (Some(upper), _) => {
                let handle = handle.filter(|h| h & LOWER_HANDLE == 0);
                let (attr, _) = self.upper.getattr(ctx, upper, handle)?;
                let mut attr = Self::present_with(st.device, st.indexed, attr);
                if let (Some(lower), true) = (st.lower, node.is_dir()) {
                    // A merged directory: its image subdirectories count as links too.
                    if let Some(fd) = node.state().upper_dir.clone() {
                        attr.st_nlink += self.lower_only_subdirs(ctx, lower, &fd)?;
                    }
                }
                Ok((attr, TIMEOUT))
            }
            (None, Some(lower)) => {
                let (attr, _) = self.image.getattr(ctx, lower, None)?;
                Ok((Self::lower_attr(attr), TIMEOUT))
            }
            (None, None) => Err(errno(libc::ESTALE)),
        }
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let node = self.node(inode)?;
        let st = self.copied_up(ctx, &node)?;
        let handle = handle.filter(|h| h & LOWER_HANDLE == 0);
        let (attr, _) = self
            .upper
            .setattr(ctx, Self::upper_of(&st)?, attr, handle, valid)?;
        Ok((Self::present(&st, attr), TIMEOUT))
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let node = self.node(inode)?;
        let st = node.brief();
        match (st.upper, st.lower) {
            (Some(upper), _) => self.upper.readlink(ctx, upper),
            (None, Some(lower)) => self.image.readlink(ctx, lower),
            (None, None) => Err(errno(libc::ESTALE)),
        }
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let parent = self.node(parent)?;
        let _tree = self.changing();
        let pst = self.dir_for_change(ctx, &parent, name, Self::nothing_at)?;
        let _dir = self.dir_lock(&pst);
        let upper = Self::upper_of(&pst)?;
        let e = if self.free_name(ctx, &pst, name)? {
            let made = self.make_staged(ctx, &pst, name, Fresh::Symlink(linkname), 0, 0, true);
            self.logged("symlink", made)?;
            self.upper.lookup(ctx, upper, name)?
        } else {
            self.upper.symlink(ctx, linkname, upper, name)?
        };
        self.created(ctx, &parent, name, e, true)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let parent = self.node(parent)?;
        let _tree = self.changing();
        let pst = self.dir_for_change(ctx, &parent, name, Self::nothing_at)?;
        let _dir = self.dir_lock(&pst);
        let over_whiteout = self.free_name(ctx, &pst, name)?;
        let upper = Self::upper_of(&pst)?;
        let kind = mode & libc::S_IFMT;
        let device = matches!(kind, libc::S_IFCHR | libc::S_IFBLK);
        let e = if device || over_whiteout {
            let fresh = if device {
                Fresh::Device(kind, rdev)
            } else {
                Fresh::Special(kind)
            };
            let made = self.make_staged(ctx, &pst, name, fresh, mode, umask, over_whiteout);
            self.logged("mknod", made)?;
            self.upper.lookup(ctx, upper, name)?
        } else {
            self.upper.mknod(ctx, upper, name, mode, rdev, umask)?
        };
        self.created(ctx, &parent, name, e, !device)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let parent = self.node(parent)?;
        let _tree = self.changing();
        let pst = self.dir_for_change(ctx, &parent, name, Self::nothing_at)?;
        let _dir = self.dir_lock(&pst);
        let upper = Self::upper_of(&pst)?;
        let e = if self.free_name(ctx, &pst, name)? {
            // An opaque directory in place of the whiteout, in one step.
            let made = self.make_staged(ctx, &pst, name, Fresh::Dir, mode, umask, true);
            self.logged("mkdir", made)?;
            self.upper.lookup(ctx, upper, name)?
        } else {
            self.upper.mkdir(ctx, upper, name, mode, umask)?
        };
        self.created(ctx, &parent, name, e, true)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let parent = self.node(parent)?;
        let check = |peek: &Peek| {
            if !peek.exists() {
                Err(errno(libc::ENOENT))
            } else if peek.kind() == libc::S_IFDIR {
                Err(errno(libc::EISDIR))
            } else {
                Ok(())
            }
        };
        let _tree = self.changing();
        let pst = self.dir_for_change(ctx, &parent, name, check)?;
        let _dir = self.dir_lock(&pst);
        let peek = self.peek(ctx, &pst, name)?;
        check(&peek)?;
        let dir = pst.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let r = match (&peek.upper, &peek.lower) {
            (Some(st), Some(_)) => self
                .whiteout_over(dir, name, false)
                .map(|()| self.freed(st)),
            (None, Some(_)) => host::mknod_whiteout(dir, name),
            (upper, None) => {
                self.upper
                    .unlink_known(ctx, Self::upper_of(&pst)?, name, upper.as_ref())
            }
        };
        self.logged("unlink", r)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let parent = self.node(parent)?;
        let check = |peek: &Peek| {
            if !peek.exists() {
                Err(errno(libc::ENOENT))
            } else if peek.kind() != libc::S_IFDIR {
                Err(errno(libc::ENOTDIR))
            } else {
                Ok(())
            }
        };
        let _tree = self.changing();
        let pst = self.dir_for_change(ctx, &parent, name, check)?;
        // The directory removed is locked too: nothing is made in it while it goes.
        let mut tries = 0;
        let (peek, _locks) = loop {
            let seen = self.peek(ctx, &pst, name)?;
            check(&seen)?;
            let victim = seen.upper.map_or(pst.dir_ino, |st| st.st_ino);
            let locks = self.dir_locks_of(pst.dir_ino, victim);
            let peek = self.peek(ctx, &pst, name)?;
            check(&peek)?;
            if peek.upper.map(|st| st.st_ino) == seen.upper.map(|st| st.st_ino) {
                break (peek, locks);
            }
            // Replaced between the two looks (the guest's own race): look again.
            tries += 1;
            if tries == 8 {
                return Err(errno(libc::EBUSY));
            }
        };
        if !self.is_empty_dir(ctx, &pst, name, &peek)? {
            return Err(errno(libc::ENOTEMPTY));
        }
        let dir = pst.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let r = match (&peek.upper, &peek.lower) {
            (Some(st), Some(_)) => self.whiteout_over(dir, name, true).map(|()| self.freed(st)),
            (None, Some(_)) => host::mknod_whiteout(dir, name),
            (Some(st), None) => {
                // Moved into `work/` in one step, then emptied of its whiteouts there.
                let tmp = self.staging_name();
                host::rename_at(dir, name, &self.work, &tmp, libc::RENAME_NOREPLACE)
                    .and_then(|()| whiteout::remove_all(&self.work, &tmp))
                    .map(|()| self.freed(st))
            }
            (None, None) => Err(errno(libc::ENOENT)),
        };
        self.logged("rmdir", r)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let r = self.rename_entry(ctx, olddir, oldname, newdir, newname, flags);
        self.logged("rename", r)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let node = self.node(inode)?;
        if node.is_dir() {
            return Err(errno(libc::EPERM));
        }
        let parent = self.node(newparent)?;
        let _tree = self.changing();
        if node.state().upper.is_none() {
            // A link that fails copies nothing up.
            if !parent.is_dir() {
                return Err(errno(libc::ENOTDIR));
            }
            Self::nothing_at(&self.peek(ctx, &parent.state().clone(), newname)?)?;
        }
        let st = self.logged("copy-up", self.ensure_upper(ctx, &node))?;
        let pst = self.dir_for_change(ctx, &parent, newname, Self::nothing_at)?;
        let _dir = self.dir_lock(&pst);
        let upper = Self::upper_of(&st)?;
        let e = if self.free_name(ctx, &pst, newname)? {
            // The other name is linked in `work/` from the one the node was reached by, then
            // swapped in for the whiteout.
            let from = self.node(st.parent)?.state().clone();
            let from_dir = from.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
            let (attr, _) = self.upper.getattr(ctx, upper, None)?;
            let fresh = Fresh::Link {
                dir: from_dir,
                name: &st.name,
                ino: attr.st_ino,
            };
            let made = self.make_staged(ctx, &pst, newname, fresh, 0, 0, true);
            self.logged("link", made)?;
            self.upper.lookup(ctx, Self::upper_of(&pst)?, newname)?
        } else {
            self.upper
                .link(ctx, upper, Self::upper_of(&pst)?, newname)?
        };
        self.upper.forget(ctx, e.inode, 1);
        self.inodes.add_ref(node.id);
        Ok(Self::entry(node.id, Self::present(&st, e.attr)))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let node = self.node(inode)?;
        let st = if flags & WRITE_FLAGS != 0 {
            self.copied_up(ctx, &node)?;
            node.brief()
        } else {
            node.brief()
        };
        match (st.upper, st.lower) {
            (Some(upper), _) => {
                let (h, opts, x) = self.upper.open(ctx, upper, flags, fuse_flags)?;
                Ok((h, Self::no_flush(opts), x))
            }
            (None, Some(lower)) => {
                let (h, opts, x) = self.image.open(ctx, lower, flags, fuse_flags)?;
                Ok((
                    Some(h.unwrap_or(lower) | LOWER_HANDLE),
                    Self::no_flush(opts),
                    x,
                ))
            }
            (None, None) => Err(errno(libc::ESTALE)),
        }
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let pnode = self.node(parent)?;
        // An image object at the name: only a file opened without O_EXCL is (copied up and)
        // opened. Anything in the upper directory: the passthrough opens it as the host would
        // (O_EXCL, O_NOFOLLOW and O_TRUNC apply).
        let check = |peek: &Peek| match (&peek.upper, &peek.lower) {
            (None, Some((_, lst))) => {
                if args.flags & libc::O_EXCL as u32 != 0 {
                    return Err(errno(libc::EEXIST));
                }
                match lst.st_mode & libc::S_IFMT {
                    libc::S_IFREG => Ok(()),
                    libc::S_IFDIR => Err(errno(libc::EISDIR)),
                    libc::S_IFLNK => Err(errno(libc::ELOOP)),
                    _ => Err(errno(libc::EEXIST)),
                }
            }
            _ => Ok(()),
        };
        let _tree = self.changing();
        let pst = self.dir_for_change(ctx, &pnode, name, check)?;
        let dir = self.dir_lock(&pst);
        let peek = self.peek(ctx, &pst, name)?;
        check(&peek)?;
        let fresh = !peek.exists();
        if peek.upper.is_none() && peek.lower.is_some() {
            // An image file opened by CREATE: copied up (the copy-up takes the directory's
            // lock itself), then opened in the layer.
            drop(dir);
            let (node, _) = self.lookup_node(ctx, &pnode, name, true)?;
            let copied = self.logged("copy-up", self.ensure_upper(ctx, &node));
            FileSystem::forget(self, ctx, node.id, 1);
            copied?;
            let (e, h, opts, x) = self.upper.create(ctx, Self::upper_of(&pst)?, name, args)?;
            let entry = self.created(ctx, &pnode, name, e, false)?;
            return Ok((entry, h, Self::no_flush(opts), x));
        }
        let upper = Self::upper_of(&pst)?;
        let (e, h, opts, x) = if peek.whiteout {
            // The file in place of the whiteout in one step, then opened (it is there now:
            // no O_EXCL), then given its mode (made open to its owner).
            let made = self.make_staged(ctx, &pst, name, Fresh::File, args.mode, args.umask, true);
            self.logged("create", made)?;
            let open = CreateIn {
                flags: args.flags & !(libc::O_EXCL as u32),
                ..args
            };
            let (mut e, h, opts, x) = self.upper.create(ctx, upper, name, open)?;
            let perms = super::guard::host_file_mode(args.mode & 0o7777 & !args.umask);
            if perms & (libc::S_IRUSR | libc::S_IWUSR) != libc::S_IRUSR | libc::S_IWUSR {
                let moded = pst
                    .upper_dir
                    .as_ref()
                    .ok_or_else(|| errno(libc::EIO))
                    .and_then(|fd| host::chmod_at(fd, name, perms))
                    .and_then(|()| self.upper.getattr(ctx, e.inode, None));
                match moded {
                    Ok((attr, _)) => e.attr = attr,
                    Err(err) => {
                        if let Some(h) = h {
                            let _ = self.upper.release(ctx, e.inode, 0, h, false, false, None);
                        }
                        self.upper.forget(ctx, e.inode, 1);
                        return self.logged("create: mode", Err(err));
                    }
                }
            }
            (e, h, opts, x)
        } else {
            self.upper.create(ctx, upper, name, args)?
        };
        let entry = self.created(ctx, &pnode, name, e, fresh)?;
        drop(dir);
        Ok((entry, h, Self::no_flush(opts), x))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let node = self.node(inode)?;
        let st = node.brief();
        if handle & LOWER_HANDLE != 0 {
            let lower = st.lower.ok_or_else(|| errno(libc::EBADF))?;
            return self.image.read(
                ctx,
                lower,
                handle & !LOWER_HANDLE,
                w,
                size,
                offset,
                lock_owner,
                flags,
            );
        }
        self.upper.read(
            ctx,
            st.upper.ok_or_else(|| errno(libc::EIO))?,
            handle,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Err(errno(libc::EBADF));
        };
        self.upper.write(
            ctx,
            upper,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        #[cfg(test)]
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Ok(());
        };
        self.upper.flush(ctx, upper, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Ok(());
        };
        self.upper.fsync(ctx, upper, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Err(errno(libc::EBADF));
        };
        self.upper
            .fallocate(ctx, upper, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Ok(());
        };
        self.upper
            .release(ctx, upper, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        self.upper.statfs(ctx, ROOT_ID)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let node = self.node(inode)?;
        let st = self.copied_up(ctx, &node)?;
        self.upper
            .setxattr(ctx, Self::upper_of(&st)?, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let node = self.node(inode)?;
        let st = node.brief();
        match (st.upper, st.lower) {
            (Some(upper), _) => self.upper.getxattr(ctx, upper, name, size),
            (None, Some(lower)) => self.image.getxattr(ctx, lower, name, size),
            (None, None) => Err(errno(libc::ESTALE)),
        }
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let node = self.node(inode)?;
        let st = node.brief();
        match (st.upper, st.lower) {
            (Some(upper), _) => self.upper.listxattr(ctx, upper, size),
            (None, Some(lower)) => self.image.listxattr(ctx, lower, size),
            (None, None) => Err(errno(libc::ESTALE)),
        }
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        let node = self.node(inode)?;
        let st = self.copied_up(ctx, &node)?;
        self.upper.removexattr(ctx, Self::upper_of(&st)?, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let node = self.node(inode)?;
        if !node.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let st = node.state().clone();
        // Taken before the directory is read: a change meanwhile shows as a new count.
        let stamp = self.stamp(&st);
        let mut items = vec![
            Item {
                name: c".".to_owned(),
                type_: libc::DT_DIR.into(),
                ino: inode,
                upper: false,
            },
            Item {
                name: c"..".to_owned(),
                type_: libc::DT_DIR.into(),
                ino: st.parent,
                upper: false,
            },
        ];
        items.extend(self.logged("readdir", self.merged(ctx, &st))?);
        let handle = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle, Arc::new(Listing { items, stamp }));
        Ok((Some(handle), OpenOptions::empty()))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        _inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let listing = self.listing(handle)?;
        for (i, item) in listing.items.iter().enumerate().skip(offset as usize) {
            let entry = DirEntry {
                ino: item.ino,
                offset: i as u64 + 1,
                type_: item.type_,
                name: item.name.to_bytes(),
            };
            if add_entry(entry)? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// The listing of `readdir` with each entry's node and attributes, as a LOOKUP of its
    /// name gives them now (the same path: whiteouts, opaque and redirected directories,
    /// nodes). Each entry given with a node is one lookup of it the guest gives back by a
    /// FORGET; `.` and `..` and the entries the lookup no longer finds are given without a
    /// node (the guest links nothing for them), and an entry the reply has no room for gives
    /// its lookup back at once.
    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let listing = self.listing(handle)?;
        // The listing's `.` is the directory it was opened for: the names are looked up there.
        if listing.items.first().map(|i| i.ino) != Some(inode) {
            return Err(errno(libc::EBADF));
        }
        let dir = self.node(inode)?;
        let mut added = false;
        for (i, item) in listing.items.iter().enumerate().skip(offset as usize) {
            let mut entry = DirEntry {
                ino: item.ino,
                offset: i as u64 + 1,
                type_: item.type_,
                name: item.name.to_bytes(),
            };
            let dots = i < 2;
            let found = if dots {
                None
            } else {
                // Listed from the image only, and no name changed since: not on the host.
                let image_only = !item.upper
                    && listing
                        .stamp
                        .is_some_and(|stamp| self.unchanged_since(stamp));
                match self.lookup_node_as(ctx, &dir, &item.name, false, image_only) {
                    Ok(found) => Some(found),
                    // Gone since the listing was made (or unreadable now): given as READDIR
                    // gives it; a LOOKUP of the name answers for it.
                    Err(e) => {
                        let _ = self.logged("readdirplus", Err::<(), _>(e));
                        None
                    }
                }
            };
            let reply = match &found {
                Some((node, attr)) => {
                    entry.ino = attr.st_ino;
                    entry.type_ = (attr.st_mode & libc::S_IFMT) >> 12;
                    Self::entry(node.id, *attr)
                }
                None => Entry {
                    inode: 0,
                    generation: 0,
                    // SAFETY: a plain C struct of integers, for which all zeroes is valid.
                    attr: unsafe { std::mem::zeroed() },
                    attr_flags: 0,
                    attr_timeout: Duration::ZERO,
                    entry_timeout: Duration::ZERO,
                },
            };
            let r = add_entry(entry, reply);
            let fits = matches!(r, Ok(n) if n > 0);
            if !fits {
                // Not in the reply: the guest will not count this lookup.
                if let Some((node, _)) = found {
                    self.forget(ctx, node.id, 1);
                }
            }
            match r {
                Ok(0) => break,
                Ok(_) => added = true,
                // The entries added before are in the reply (and counted by the guest).
                Err(_) if added => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn fsyncdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _datasync: bool,
        _handle: u64,
    ) -> io::Result<()> {
        let node = self.node(inode)?;
        let fd = node.state().upper_dir.clone();
        match fd {
            Some(fd) => host::reopen_dir(&fd)?.sync_all(),
            None => Ok(()),
        }
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let node = self.node(inode)?;
        let st = node.brief();
        match (st.upper, st.lower) {
            (Some(upper), _) => self.upper.access(ctx, upper, mask),
            // Writing an image object copies it up first.
            (None, Some(lower)) => self.image.access(ctx, lower, mask & !(libc::W_OK as u32)),
            (None, None) => Err(errno(libc::ESTALE)),
        }
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let node = self.node(inode)?;
        let st = node.brief();
        if handle & LOWER_HANDLE != 0 {
            let lower = st.lower.ok_or_else(|| errno(libc::EBADF))?;
            return self
                .image
                .lseek(ctx, lower, handle & !LOWER_HANDLE, offset, whence);
        }
        self.upper.lseek(
            ctx,
            st.upper.ok_or_else(|| errno(libc::EIO))?,
            handle,
            offset,
            whence,
        )
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Err(errno(libc::ENOSYS));
        };
        self.upper.getlk(ctx, upper, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Err(errno(libc::ENOSYS));
        };
        self.upper.setlk(ctx, upper, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Err(errno(libc::ENOSYS));
        };
        self.upper.setlkw(ctx, upper, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        let Some(upper) = self.upper_for_handle(inode, handle)? else {
            return Err(errno(libc::ENOTTY));
        };
        self.upper
            .ioctl(ctx, upper, handle, flags, cmd, data, out_size)
    }
}
