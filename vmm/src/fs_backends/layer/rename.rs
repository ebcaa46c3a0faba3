//! RENAME in the writable layer: both ends copied up (with their original metadata), then one
//! host `renameat2` that also leaves the whiteout where an image name must stay hidden
//! (`RENAME_WHITEOUT`, or `RENAME_EXCHANGE` with a staged whiteout where the kernel does not
//! offer it to the vmm). A moving directory that shows an image directory gets a redirect to
//! it; one that shows none is made opaque where it lands, so no image entries appear under it.
//! Link counts, `..` included, are the host's.

use std::ffi::CStr;
use std::io;
use std::os::fd::OwnedFd;

use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::inode::NodeState;
use super::{errno, host, whiteout, Layer};

const SUPPORTED: u32 = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;

impl Layer {
    pub(super) fn rename_entry(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        if flags & !SUPPORTED != 0 || flags & SUPPORTED == SUPPORTED {
            return Err(errno(libc::EINVAL));
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let op = self.node(olddir)?;
        let np = self.node(newdir)?;
        if !op.is_dir() || !np.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let _tree = self.renaming();
        let (src, _) = self.lookup_node(ctx, &op, oldname, true)?;
        let dst = match self.lookup_node(ctx, &np, newname, true) {
            Ok((node, _)) => Some(node),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => {
                FileSystem::forget(self, ctx, src.id, 1);
                return Err(e);
            }
        };
        let result = self.rename_nodes(
            ctx,
            &op,
            oldname,
            &np,
            newname,
            flags,
            exchange,
            &src,
            dst.as_deref(),
        );
        FileSystem::forget(self, ctx, src.id, 1);
        if let Some(dst) = &dst {
            FileSystem::forget(self, ctx, dst.id, 1);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_nodes(
        &self,
        ctx: &Context,
        op: &super::Node,
        oldname: &CStr,
        np: &super::Node,
        newname: &CStr,
        flags: u32,
        exchange: bool,
        src: &super::Node,
        dst: Option<&super::Node>,
    ) -> io::Result<()> {
        if let Some(dst) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(errno(libc::EEXIST));
            }
            if dst.id == src.id {
                // Two names of one object (or one name): nothing to do.
                return Ok(());
            }
            if !exchange {
                match (src.is_dir(), dst.is_dir()) {
                    (true, false) => return Err(errno(libc::ENOTDIR)),
                    (false, true) => return Err(errno(libc::EISDIR)),
                    _ => {}
                }
            }
        } else if exchange {
            return Err(errno(libc::ENOENT));
        }
        if src.is_dir() && self.is_ancestor(src.id, np.id) {
            return Err(errno(libc::EINVAL));
        }
        if let (Some(dst), false) = (dst, exchange) {
            if dst.is_dir() {
                let pst = np.state().clone();
                let peek = self.peek(ctx, &pst, newname)?;
                if !self.is_empty_dir(ctx, &pst, newname, &peek)? {
                    return Err(errno(libc::ENOTEMPTY));
                }
            }
        }
        let ops = self.ensure_upper(ctx, op)?;
        let nps = self.ensure_upper(ctx, np)?;
        let sst = self.ensure_upper(ctx, src)?;
        let dstate = match (dst, exchange) {
            (Some(dst), true) => Some(self.ensure_upper(ctx, dst)?),
            _ => None,
        };
        let odir = ops.upper_dir.clone().ok_or_else(|| errno(libc::EIO))?;
        let ndir = nps.upper_dir.clone().ok_or_else(|| errno(libc::EIO))?;
        // The image entries at both names, whiteouts or not.
        let lower_at = |dir: &NodeState, name: &CStr| -> io::Result<bool> {
            match dir.lower {
                Some(l) => Ok(self.lower_child(ctx, l, name)?.is_some()),
                None => Ok(false),
            }
        };
        let lower_at_old = lower_at(&ops, oldname)?;
        let lower_at_new = lower_at(&nps, newname)?;
        if src.is_dir() {
            Self::mark_moving(&sst, lower_at_new)?;
        }
        if let (Some(dst), Some(dstate)) = (dst, &dstate) {
            if dst.is_dir() {
                Self::mark_moving(dstate, lower_at_old)?;
            }
        }
        if exchange {
            host::rename_at(&odir, oldname, &ndir, newname, libc::RENAME_EXCHANGE)?;
        } else {
            self.move_over(
                ctx,
                &odir,
                oldname,
                &ndir,
                newname,
                src.is_dir(),
                lower_at_old,
            )?;
        }
        {
            let mut s = src.state();
            s.parent = np.id;
            s.name = newname.to_owned();
        }
        if let (Some(dst), true) = (dst, exchange) {
            let mut s = dst.state();
            s.parent = op.id;
            s.name = oldname.to_owned();
        }
        Ok(())
    }

    /// Whether directory node `ancestor` is `node` or above it.
    fn is_ancestor(&self, ancestor: u64, mut node: u64) -> bool {
        for _ in 0..4096 {
            if node == ancestor {
                return true;
            }
            let Ok(n) = self.node(node) else {
                return false;
            };
            let parent = n.state().parent;
            if parent == node {
                return false;
            }
            node = parent;
        }
        false
    }

    /// Marks directory `st`, about to move, so that it shows the same entries where it lands:
    /// a redirect to the image directory it shows, or opaque when it shows none and an image
    /// entry is at the new name. A host that refuses the mark refuses the move (EXDEV: the
    /// guest copies instead).
    fn mark_moving(st: &NodeState, lower_at_new: bool) -> io::Result<()> {
        let fd = st.upper_dir.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let marked = if st.lower.is_some() {
            whiteout::set_redirect(fd, &st.lower_path)
        } else if lower_at_new {
            whiteout::set_opaque(fd)
        } else {
            return Ok(());
        };
        marked.map_err(|e| {
            tracing::debug!("layer: cannot mark a moving directory: {e}");
            errno(libc::EXDEV)
        })
    }

    /// Moves the upper entry `from` (in `odir`) to `to` (in `ndir`), replacing what is there,
    /// and leaves a whiteout at `from` when `whiteout_old`, all in one host rename where the
    /// host allows.
    #[allow(clippy::too_many_arguments)]
    fn move_over(
        &self,
        _ctx: &Context,
        odir: &OwnedFd,
        from: &CStr,
        ndir: &OwnedFd,
        to: &CStr,
        is_dir: bool,
        whiteout_old: bool,
    ) -> io::Result<()> {
        let target = host::stat_at(ndir, to)?;
        let target_whiteout = target.as_ref().is_some_and(whiteout::is_whiteout);
        if let Some(t) = &target {
            if t.st_mode & libc::S_IFMT == libc::S_IFDIR {
                // An empty directory as the guest sees it: only whiteouts are left in it.
                let sub = host::open_dir(ndir, to)?;
                for (name, _, _) in host::list_dir(&sub)? {
                    whiteout::remove_all(&sub, &name)?;
                }
            }
        }
        if is_dir && target_whiteout {
            // A directory cannot replace a whiteout: the two swap, and the whiteout stays at
            // the old name when one is needed there.
            host::rename_at(odir, from, ndir, to, libc::RENAME_EXCHANGE)?;
            if !whiteout_old {
                host::unlink_at(odir, from, false)?;
            }
            return Ok(());
        }
        if whiteout_old {
            match host::rename_at(odir, from, ndir, to, libc::RENAME_WHITEOUT) {
                Ok(()) => {
                    self.replaced(target.as_ref(), target_whiteout);
                    return Ok(());
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM)) => {}
                Err(e) => return Err(e),
            }
            // No RENAME_WHITEOUT for this vmm or filesystem: a staged whiteout is swapped in
            // at the old name once the entry is at the new one.
            let tmp = self.staging_name();
            host::mknod_whiteout(&self.work, &tmp)?;
            if let Err(e) = host::rename_at(odir, from, ndir, to, 0) {
                let _ = host::unlink_at(&self.work, &tmp, false);
                return Err(e);
            }
            self.replaced(target.as_ref(), target_whiteout);
            return host::rename_at(&self.work, &tmp, odir, from, libc::RENAME_NOREPLACE);
        }
        host::rename_at(odir, from, ndir, to, 0)?;
        self.replaced(target.as_ref(), target_whiteout);
        Ok(())
    }

    fn replaced(&self, target: Option<&libc::stat64>, whiteout: bool) {
        if let (Some(t), false) = (target, whiteout) {
            self.freed(t);
        }
    }
}
