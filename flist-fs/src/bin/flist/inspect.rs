//! Read-only inspection commands that need only the metadata (ls, stat, diff, info) plus `cat`.

use crate::ReadArgs;
use anyhow::{bail, Context, Result};
use flist_fs::meta::{diff as image_diff, read_image, ChangeKind, Image, Inode, InodeKind};
use std::io::Write;
use std::path::Path;

fn mode_string(inode: &Inode) -> String {
    let t = match inode.kind {
        InodeKind::File => '-',
        InodeKind::Dir => 'd',
        InodeKind::Symlink => 'l',
        InodeKind::CharDev => 'c',
        InodeKind::BlockDev => 'b',
        InodeKind::Fifo => 'p',
        InodeKind::Socket => 's',
    };
    let mut s = String::from(t);
    // (shift, special bit, its letter): setuid and setgid show in the owner's and group's
    // execute place, the sticky bit in others' (lower case over x, upper case without x).
    for (shift, special, letter) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (inode.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let exec = bits & 1 != 0;
        s.push(match (inode.mode & special != 0, exec) {
            (true, true) => letter,
            (true, false) => letter.to_ascii_uppercase(),
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// A device number as `major, minor` (Linux's encoding), as `ls -l` shows it.
fn device_numbers(rdev: u64) -> String {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    format!("{major}, {minor}")
}

/// What `ls -l` shows in the size column: the size, or a device's numbers.
fn size_column(inode: &Inode) -> String {
    match inode.kind {
        InodeKind::CharDev | InodeKind::BlockDev => device_numbers(inode.rdev),
        _ => inode.size.to_string(),
    }
}

fn line(image: &Image, name: &str, ino: u64, long: bool) -> String {
    let Some(i) = image.inode(ino) else {
        return name.to_string();
    };
    if !long {
        return name.to_string();
    }
    let target = if i.kind == InodeKind::Symlink {
        format!(" -> {}", String::from_utf8_lossy(&i.target))
    } else {
        String::new()
    };
    format!(
        "{} {:>3} {:>5} {:>5} {:>12} {:>11} {name}{target}",
        mode_string(i),
        image.nlink(ino),
        i.uid,
        i.gid,
        size_column(i),
        i.mtime.secs
    )
}

pub fn ls(path: &Path, inner: &str, long: bool, recursive: bool) -> Result<()> {
    let image = read_image(path)?;
    let ino = image.resolve(inner)?;
    let mut out = std::io::stdout().lock();
    if recursive {
        for (p, i) in image.walk_from(ino, inner.as_bytes()) {
            writeln!(
                out,
                "{}",
                line(&image, &String::from_utf8_lossy(&p), i, long)
            )?;
        }
        return Ok(());
    }
    let node = image.inode(ino).context("inode vanished")?;
    if node.kind != InodeKind::Dir {
        writeln!(out, "{}", line(&image, inner, ino, long))?;
        return Ok(());
    }
    for e in &node.entries {
        writeln!(
            out,
            "{}",
            line(&image, &String::from_utf8_lossy(&e.name), e.ino, long)
        )?;
    }
    Ok(())
}

pub fn stat(path: &Path, inner: &str) -> Result<()> {
    let image = read_image(path)?;
    let ino = image.resolve(inner)?;
    let i = image.inode(ino).context("inode vanished")?;
    println!("path:   {inner}");
    println!("inode:  {ino}");
    println!("type:   {}", i.kind.name());
    println!("mode:   {:04o} ({})", i.mode, mode_string(i));
    println!("links:  {}", image.nlink(ino));
    println!("owner:  {}:{}", i.uid, i.gid);
    println!("size:   {}", i.size);
    println!("mtime:  {}.{:09}", i.mtime.secs, i.mtime.nsecs);
    println!("ctime:  {}.{:09}", i.ctime.secs, i.ctime.nsecs);
    if matches!(i.kind, InodeKind::CharDev | InodeKind::BlockDev) {
        println!("device: {} (rdev {})", device_numbers(i.rdev), i.rdev);
    }
    if i.kind == InodeKind::Symlink {
        println!("target: {}", String::from_utf8_lossy(&i.target));
    }
    for x in &i.xattrs {
        println!(
            "xattr:  {} = {:?}",
            String::from_utf8_lossy(&x.name),
            String::from_utf8_lossy(&x.value)
        );
    }
    if !i.chunks.is_empty() {
        println!("chunks: {}", i.chunks.len());
        for c in &i.chunks {
            println!("  {} @{} +{}", c.id, c.offset, c.size);
        }
    }
    Ok(())
}

pub fn cat(path: &Path, inner: &str, read: &ReadArgs) -> Result<()> {
    let (image, source) = flist_fs::open::open_image(path, &read.open_options())?;
    let ino = image.resolve(inner)?;
    let i = image.inode(ino).context("inode vanished")?;
    if i.kind != InodeKind::File {
        bail!("{inner}: not a regular file (a {})", i.kind.name());
    }
    let mut out = std::io::stdout().lock();
    source
        .read_range(i, 0, i.size, &mut |b| out.write_all(b))
        .map_err(|e| e.in_file(inner))?;
    out.flush()?;
    Ok(())
}

pub fn diff(a: &Path, b: &Path) -> Result<()> {
    let (ia, ib) = (read_image(a)?, read_image(b)?);
    let mut out = std::io::stdout().lock();
    for c in image_diff(&ia, &ib) {
        match c.kind {
            ChangeKind::Added => writeln!(out, "+ {}", c.path)?,
            ChangeKind::Removed => writeln!(out, "- {}", c.path)?,
            ChangeKind::Modified(what) => writeln!(out, "M {} ({})", c.path, what.join(", "))?,
        }
    }
    Ok(())
}

pub fn info(path: &Path) -> Result<()> {
    let image = read_image(path)?;
    for (k, v) in &image.tags {
        println!("tag {k} = {v}");
    }
    for r in &image.routes {
        println!("store {:02x}-{:02x} {}", r.start, r.end, r.url);
    }
    println!("chunker {:?}", image.chunker);
    println!("encrypted {}", image.encrypted);
    println!("inodes {}", image.inodes.len());
    println!("bytes {}", image.total_file_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(kind: InodeKind, mode: u32) -> Inode {
        Inode::new(kind, mode)
    }

    #[test]
    fn special_bits_show_as_ls_shows_them() {
        assert_eq!(mode_string(&inode(InodeKind::File, 0o4755)), "-rwsr-xr-x");
        assert_eq!(mode_string(&inode(InodeKind::File, 0o4644)), "-rwSr--r--");
        assert_eq!(mode_string(&inode(InodeKind::File, 0o2755)), "-rwxr-sr-x");
        assert_eq!(mode_string(&inode(InodeKind::Dir, 0o1777)), "drwxrwxrwt");
        assert_eq!(mode_string(&inode(InodeKind::Dir, 0o1776)), "drwxrwxrwT");
        assert_eq!(mode_string(&inode(InodeKind::File, 0o644)), "-rw-r--r--");
    }

    #[test]
    fn device_numbers_are_split_as_linux_encodes_them() {
        // makedev(8, 1) and makedev(259, 70000).
        assert_eq!(device_numbers(0x801), "8, 1");
        let (major, minor) = (259u64, 70000u64);
        let rdev = ((major & 0xfff) << 8)
            | ((major & !0xfff) << 32)
            | (minor & 0xff)
            | ((minor & !0xff) << 12);
        assert_eq!(device_numbers(rdev), "259, 70000");
        let mut dev = inode(InodeKind::CharDev, 0o666);
        dev.rdev = 0x501;
        assert_eq!(size_column(&dev), "5, 1");
    }
}
