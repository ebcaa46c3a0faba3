//! The one policy wrapper in front of every virtio-fs share, whatever its backend, and in
//! front of the host directory under a writable layer. What it enforces is the share's
//! [`Policy`]:
//! - always: ENAMETOOLONG for a directory-entry name longer than NAME_MAX (Linux's VFS leaves
//!   that check to the FUSE server);
//! - read-only: every request that would change the tree (or open a file for writing) fails
//!   with EROFS, and statfs reports ST_RDONLY;
//! - host directory: guest writes never become privileged host objects. The vmm may run as
//!   root, so without this a guest could create device nodes, setuid/setgid files and
//!   `security.*`/`trusted.*` attributes on the host. Block and character devices are refused
//!   (EPERM; the overlay's 0:0 whiteout excepted), setuid and setgid are cleared on create,
//!   mknod and chmod (a directory keeps setgid, which only means group inheritance), and every
//!   guest extended attribute is stored under `user.gridnode.` on the host (as virtiofsd's
//!   xattrmap does): the guest sees only those, under its own names;
//! - merged view: a directory may only replace an empty one, asked of the merged view (an
//!   overlay's own check sees only its upper layer).
//!
//! Every other request goes to the backend unchanged.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::host_dir::run_at_root;
use super::quota::Quota;

/// The longest directory-entry name, in bytes (Linux's NAME_MAX).
const NAME_MAX: usize = 255;
/// The longest extended-attribute name (Linux's XATTR_NAME_MAX).
const XATTR_NAME_MAX: usize = 255;
/// The largest list of extended-attribute names (Linux's XATTR_LIST_MAX).
pub const XATTR_LIST_MAX: u32 = 65536;
/// The largest extended-attribute value (Linux's XATTR_SIZE_MAX).
pub const XATTR_SIZE_MAX: u32 = 65536;
/// Where guest extended attributes live on the host.
pub const GUEST_XATTR_PREFIX: &[u8] = b"user.gridnode.";

/// What a share lets the guest do; decided where the share is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Refuse every change (EROFS).
    pub readonly: bool,
    /// The backend writes into a host directory: keep guest writes unprivileged there.
    pub host_dir: bool,
    /// The backend is a merged view (an overlay) whose own rename checks only its upper layer.
    pub merged: bool,
}

impl Policy {
    /// A host directory served as is.
    pub fn dir_share(readonly: bool) -> Self {
        Self {
            readonly,
            host_dir: true,
            merged: false,
        }
    }

    /// An image without a writable layer.
    pub fn image_share() -> Self {
        Self {
            readonly: true,
            ..Self::default()
        }
    }

    /// An image under a writable layer, as the guest sees it.
    pub fn layered_share() -> Self {
        Self {
            merged: true,
            ..Self::default()
        }
    }

    /// An image under the vmm's own writable layer, as the guest sees it (the layer checks
    /// renames against its merged view itself).
    pub fn layer_share() -> Self {
        Self::default()
    }

    /// The host directory holding a writable layer, as the overlay writes it.
    pub fn layer_upper() -> Self {
        Self {
            host_dir: true,
            ..Self::default()
        }
    }
}

pub struct Guard<F> {
    inner: F,
    policy: Policy,
    /// For a host-directory backend: the directory it resolves its root against when it
    /// (re-)imports, at the guest's INIT and DESTROY.
    root: Option<Arc<OwnedFd>>,
    /// For a host-directory backend: the byte and inode budget of the tree.
    quota: Option<Arc<Quota>>,
}

impl<F> Guard<F> {
    pub fn new(inner: F, policy: Policy) -> Self {
        Self {
            inner,
            policy,
            root: None,
            quota: None,
        }
    }

    /// Keeps the tree within `quota` (EDQUOT past it).
    pub fn with_quota(self, quota: Arc<Quota>) -> Self {
        Self {
            quota: Some(quota),
            ..self
        }
    }

    /// The backend resolves its root (`.`) against `root` (see `host_dir`).
    pub fn at_root(self, root: Arc<OwnedFd>) -> Self {
        Self {
            root: Some(root),
            ..self
        }
    }

    /// The host directory a host-directory backend is rooted at (O_PATH).
    pub fn root(&self) -> Option<&OwnedFd> {
        self.root.as_deref()
    }

    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// EROFS when the share is read-only. Callers check names first: Linux reports
    /// ENAMETOOLONG before EROFS.
    fn writable(&self) -> io::Result<()> {
        if self.policy.readonly {
            erofs()
        } else {
            Ok(())
        }
    }

    /// `mode` as a host directory may hold it: without setuid, and without setgid unless it is
    /// a directory's.
    fn host_mode(&self, mode: u32, is_dir: bool) -> u32 {
        if !self.policy.host_dir {
            return mode;
        }
        if is_dir {
            mode & !libc::S_ISUID
        } else {
            host_file_mode(mode)
        }
    }

    /// The host name of guest attribute `name`.
    fn host_xattr<'a>(&self, name: &'a CStr) -> io::Result<std::borrow::Cow<'a, CStr>> {
        if !self.policy.host_dir {
            return Ok(std::borrow::Cow::Borrowed(name));
        }
        host_xattr_name(name.to_bytes())
            .map(std::borrow::Cow::Owned)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ERANGE))
    }
}

/// The mode of a file (not a directory) as a host directory may hold it: without setuid and
/// setgid.
pub fn host_file_mode(mode: u32) -> u32 {
    mode & !(libc::S_ISUID | libc::S_ISGID)
}

/// The host name of guest extended attribute `name` in a host directory (under
/// [`GUEST_XATTR_PREFIX`]); `None` when it would be longer than XATTR_NAME_MAX (or holds a
/// NUL).
pub fn host_xattr_name(name: &[u8]) -> Option<CString> {
    let mut mapped = GUEST_XATTR_PREFIX.to_vec();
    mapped.extend_from_slice(name);
    if mapped.len() > XATTR_NAME_MAX {
        return None;
    }
    CString::new(mapped).ok()
}

/// The guest's view of a host attribute-name list: only names under the guest prefix, without
/// it.
fn guest_xattr_list(host: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for name in host.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if let Some(guest) = name.strip_prefix(GUEST_XATTR_PREFIX) {
            if !guest.is_empty() {
                out.extend_from_slice(guest);
                out.push(0);
            }
        }
    }
    out
}

/// Whether a node of `mode`/`rdev` is a device the guest may not create on the host: every
/// block or character device except the 0:0 character device (an overlay whiteout).
fn is_device(mode: u32, rdev: u32) -> bool {
    match mode & libc::S_IFMT {
        libc::S_IFBLK => true,
        libc::S_IFCHR => rdev != 0,
        _ => false,
    }
}

impl<F: FileSystem + Sync> Guard<F> {
    /// The attributes of `name` in `dir`, if it is there (the lookup is forgotten again).
    fn stat_entry(&self, ctx: &Context, dir: u64, name: &CStr) -> Option<stat64> {
        let entry = self.inner.lookup(ctx, F::Inode::from(dir), name).ok()?;
        if entry.inode == 0 {
            return None;
        }
        self.inner.forget(ctx, F::Inode::from(entry.inode), 1);
        Some(entry.attr)
    }

    /// UNLINK of `name` in `parent`, whose attributes the caller read just before (`gone`,
    /// what the quota gets back; the layer has them from its own look at the name): the
    /// quota asks nothing more of the backend.
    pub fn unlink_known(
        &self,
        ctx: &Context,
        parent: F::Inode,
        name: &CStr,
        gone: Option<&stat64>,
    ) -> io::Result<()> {
        check_name(name)?;
        self.writable()?;
        self.inner.unlink(ctx, parent, name)?;
        if let Some(st) = gone.filter(|_| self.quota.is_some()) {
            self.freed(st);
        }
        Ok(())
    }

    fn size_of(&self, ctx: &Context, inode: u64) -> io::Result<u64> {
        let (st, _) = self.inner.getattr(ctx, F::Inode::from(inode), None)?;
        Ok(st.st_size.max(0) as u64)
    }

    /// Runs `grow`, which may make file `inode` reach `end` bytes, within the quota: the growth
    /// is reserved first and what did not happen is given back. `grow` answers how far the
    /// file now reaches.
    fn growing<T>(
        &self,
        ctx: &Context,
        inode: u64,
        end: u64,
        grow: impl FnOnce() -> io::Result<(T, u64)>,
    ) -> io::Result<T> {
        let Some(quota) = &self.quota else {
            return grow().map(|(out, _)| out);
        };
        let old = self.size_of(ctx, inode)?;
        let wanted = end.saturating_sub(old);
        quota.reserve_bytes(wanted)?;
        let result = grow();
        let grown = match &result {
            Ok((_, reached)) => reached.saturating_sub(old).min(wanted),
            Err(_) => 0,
        };
        quota.release_bytes(wanted - grown);
        result.map(|(out, _)| out)
    }

    /// Runs `make`, which creates one inode (and `bytes` of data), within the quota.
    fn creating<T>(&self, bytes: u64, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let Some(quota) = &self.quota else {
            return make();
        };
        quota.reserve_inode()?;
        if let Err(e) = quota.reserve_bytes(bytes) {
            quota.release_inode();
            return Err(e);
        }
        let result = make();
        if result.is_err() {
            quota.release_inode();
            quota.release_bytes(bytes);
        }
        result
    }

    /// Gives back what the entry `st` held, when its last link goes.
    fn freed(&self, st: &stat64) {
        if let Some(quota) = &self.quota {
            if st.st_nlink <= 1 || st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                quota.release_inode();
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    quota.release_bytes(st.st_size.max(0) as u64);
                }
            }
        }
    }

    /// Whether `name` in `dir` is a directory; `Some(true)` when it also has entries besides
    /// `.` and `..`, `None` when it is not there or not a directory. Asked through the backend's
    /// own lookup and readdir, so an overlay answers for its merged view.
    fn dir_state(&self, ctx: &Context, dir: u64, name: &CStr) -> Option<bool> {
        let entry = self.inner.lookup(ctx, F::Inode::from(dir), name).ok()?;
        if entry.inode == 0 {
            return None;
        }
        let state = (entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .then(|| self.has_entries(ctx, entry.inode));
        self.inner.forget(ctx, F::Inode::from(entry.inode), 1);
        state
    }

    fn has_entries(&self, ctx: &Context, inode: u64) -> bool {
        let opened = self
            .inner
            .opendir(ctx, F::Inode::from(inode), libc::O_RDONLY as u32);
        let Ok((handle, _)) = opened else {
            // Unreadable: let the backend decide.
            return false;
        };
        let handle: u64 = handle.map_or(0, Into::into);
        let mut found = false;
        let _ = self.inner.readdir(
            ctx,
            F::Inode::from(inode),
            F::Handle::from(handle),
            4096,
            0,
            &mut |e: DirEntry| {
                if e.name == b"." || e.name == b".." {
                    Ok(1)
                } else {
                    found = true;
                    Ok(0) // Stop: one entry is enough.
                }
            },
        );
        let _ = self
            .inner
            .releasedir(ctx, F::Inode::from(inode), 0, F::Handle::from(handle));
        found
    }
}

fn erofs<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

fn check_name(name: &CStr) -> io::Result<()> {
    if name.to_bytes().len() > NAME_MAX {
        Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG))
    } else {
        Ok(())
    }
}

const WRITE_FLAGS: u32 = (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_APPEND) as u32;

/// What every share offers the guest whatever its backend, because the FUSE server, not the
/// backend, carries it out: requests of up to 1 MiB (MAX_PAGES, BIG_WRITES; the kernel's
/// default is 128 KiB) and reads and directory operations in flight together (ASYNC_READ lets
/// the guest's read-ahead overlap, PARALLEL_DIROPS lookups in one directory). virtiofsd
/// offers the same.
const TRANSPORT_OPTIONS: FsOptions = FsOptions::MAX_PAGES
    .union(FsOptions::BIG_WRITES)
    .union(FsOptions::ASYNC_READ)
    .union(FsOptions::PARALLEL_DIROPS);

impl<F: FileSystem + Sync> FileSystem for Guard<F> {
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let opts = match &self.root {
            Some(root) => run_at_root(root, || self.inner.init(capable))?,
            None => self.inner.init(capable)?,
        };
        let opts = opts | (capable & TRANSPORT_OPTIONS);
        Ok(if self.policy.readonly {
            opts - FsOptions::WRITEBACK_CACHE
        } else {
            opts
        })
    }

    fn destroy(&self) {
        match &self.root {
            Some(root) => {
                if let Err(e) = run_at_root(root, || {
                    self.inner.destroy();
                    Ok(())
                }) {
                    tracing::warn!("virtio-fs: cannot reset the share after DESTROY: {e}");
                }
            }
            None => self.inner.destroy(),
        }
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        let mut attr = attr;
        let ino: u64 = inode.into();
        if valid.contains(SetattrValid::MODE) {
            let is_dir = match attr.st_mode & libc::S_IFMT {
                // Only permission bits given: ask what the inode is when it matters.
                0 if attr.st_mode & libc::S_ISGID != 0 && self.policy.host_dir => {
                    let (now, _) = self.inner.getattr(ctx, F::Inode::from(ino), None)?;
                    now.st_mode & libc::S_IFMT == libc::S_IFDIR
                }
                kind => kind == libc::S_IFDIR,
            };
            attr.st_mode = self.host_mode(attr.st_mode, is_dir);
        }
        if valid.contains(SetattrValid::SIZE) && self.quota.is_some() {
            let old = self.size_of(ctx, ino)?;
            let new = attr.st_size.max(0) as u64;
            let result = self.growing(ctx, ino, new, || {
                let out = self
                    .inner
                    .setattr(ctx, F::Inode::from(ino), attr, handle, valid)?;
                Ok((out, new))
            });
            if result.is_ok() && new < old {
                if let Some(quota) = &self.quota {
                    quota.release_bytes(old - new);
                }
            }
            return result;
        }
        self.inner
            .setattr(ctx, F::Inode::from(ino), attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    /// `linkname` is the link's target, a path rather than a name: only `name` is checked.
    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.writable()?;
        let target = linkname.to_bytes().len() as u64;
        self.creating(target, || self.inner.symlink(ctx, linkname, parent, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.writable()?;
        if self.policy.host_dir && is_device(mode, rdev) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mode = self.host_mode(mode, false);
        self.creating(0, || self.inner.mknod(ctx, parent, name, mode, rdev, umask))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.writable()?;
        let mode = self.host_mode(mode, true);
        self.creating(0, || self.inner.mkdir(ctx, parent, name, mode, umask))
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        let dir: u64 = parent.into();
        let gone = self
            .quota
            .as_ref()
            .and_then(|_| self.stat_entry(ctx, dir, name));
        self.unlink_known(ctx, F::Inode::from(dir), name, gone.as_ref())
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.writable()?;
        self.inner.rmdir(ctx, parent, name)?;
        if let Some(quota) = &self.quota {
            quota.release_inode();
        }
        Ok(())
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_name(oldname)?;
        check_name(newname)?;
        self.writable()?;
        // A directory may only replace an empty one. fuse-backend-rs's overlay checks only its
        // upper layer, so a target whose entries are in the image would be replaced.
        let (olddir, newdir): (u64, u64) = (olddir.into(), newdir.into());
        if self.policy.merged
            && flags & libc::RENAME_EXCHANGE == 0
            && self.dir_state(ctx, newdir, newname) == Some(true)
            && self.dir_state(ctx, olddir, oldname).is_some()
        {
            return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
        }
        // What a replaced target held is given back to the quota.
        let replaced = match &self.quota {
            Some(_) if flags & libc::RENAME_EXCHANGE == 0 => self.stat_entry(ctx, newdir, newname),
            _ => None,
        };
        self.inner.rename(
            ctx,
            F::Inode::from(olddir),
            oldname,
            F::Inode::from(newdir),
            newname,
            flags,
        )?;
        if let Some(st) = replaced {
            self.freed(&st);
        }
        Ok(())
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        check_name(newname)?;
        self.writable()?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        if flags & WRITE_FLAGS != 0 {
            self.writable()?;
        }
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        check_name(name)?;
        self.writable()?;
        let args = CreateIn {
            mode: self.host_mode(args.mode, false),
            ..args
        };
        if self.quota.is_none() {
            return self.inner.create(ctx, parent, name, args);
        }
        // O_CREAT of an existing file creates nothing.
        let dir: u64 = parent.into();
        if self.stat_entry(ctx, dir, name).is_some() {
            return self.inner.create(ctx, F::Inode::from(dir), name, args);
        }
        self.creating(0, || {
            self.inner.create(ctx, F::Inode::from(dir), name, args)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        let ino: u64 = inode.into();
        let end = offset.saturating_add(u64::from(size));
        self.growing(ctx, ino, end, || {
            let written = self.inner.write(
                ctx,
                F::Inode::from(ino),
                handle,
                r,
                size,
                offset,
                lock_owner,
                delayed_write,
                flags,
                fuse_flags,
            )?;
            Ok((written, offset.saturating_add(written as u64)))
        })
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        let ino: u64 = inode.into();
        let keeps_size =
            mode as i32 & (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) != 0;
        let end = if keeps_size {
            0
        } else {
            offset.saturating_add(length)
        };
        self.growing(ctx, ino, end, || {
            self.inner
                .fallocate(ctx, F::Inode::from(ino), handle, mode, offset, length)?;
            Ok(((), end))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.policy.readonly {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        let name = self.host_xattr(name)?;
        self.inner.setxattr(ctx, inode, &name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let name = self.host_xattr(name)?;
        // No value is larger than XATTR_SIZE_MAX, and Linux's getxattr clamps the size the
        // same way: passed on as is, the guest's size (up to 4 GiB) is what the backend
        // allocates for the value (fuzz finding: virtio_fs_requests, GETXATTR size 3.3 GB).
        self.inner
            .getxattr(ctx, inode, &name, size.min(XATTR_SIZE_MAX))
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        if !self.policy.host_dir {
            // As getxattr: never more than a list can be (the backend allocates `size`).
            return self.inner.listxattr(ctx, inode, size.min(XATTR_LIST_MAX));
        }
        let host = match self.inner.listxattr(ctx, inode, XATTR_LIST_MAX)? {
            ListxattrReply::Names(names) => names,
            ListxattrReply::Count(_) => Vec::new(),
        };
        let guest = guest_xattr_list(&host);
        if size == 0 {
            Ok(ListxattrReply::Count(guest.len() as u32))
        } else if guest.len() > size as usize {
            Err(io::Error::from_raw_os_error(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(guest))
        }
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        let name = self.host_xattr(name)?;
        self.inner.removexattr(ctx, inode, &name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        // A DAX mapping may be writable; a read-only share offers none (nor does the device
        // offer a DAX window today).
        self.writable()?;
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        if self.policy.readonly {
            // The trait's default: "no ioctl number is supported".
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}
