//! The `FileSystem` implementation called directly, as a virtio-fs device would (no kernel):
//! lookup, getattr, readdir/readdirplus with resumption, read at offsets, readlink, xattrs,
//! statfs, write refusal, ENOENT, and EIO for a corrupt chunk.

mod common;

use common::*;
use flist_fs::fs::FlistFs;
use flist_fs::open::OpenOptions;
use flist_fs::pack::{pack, PackOptions};
use flist_fs::store::Router;
use fuse_backend_rs::api::filesystem::{
    Context, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter,
};
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use std::ffi::CString;
use std::io;

struct Buf(Vec<u8>);

impl io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Buf {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _c: usize,
        _o: u64,
    ) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

fn name(s: &str) -> CString {
    CString::new(s).unwrap()
}

#[test]
fn filesystem_operations() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let store_dir = t.path().join("store");
    let img = t.path().join("img.flist");
    let store = format!("dir://{}", store_dir.display());
    pack(
        &src,
        &img,
        &Router::from_specs(&[store]).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();
    let fs = FlistFs::open(&img, &OpenOptions::default()).unwrap();
    let ctx = Context::new();

    let sub = fs.lookup(&ctx, 1, &name("sub")).unwrap();
    assert_eq!(sub.attr.st_mode & libc::S_IFMT, libc::S_IFDIR);
    let big = fs.lookup(&ctx, sub.inode, &name("big.bin")).unwrap();
    let expected = std::fs::read(src.join("sub/big.bin")).unwrap();
    assert_eq!(big.attr.st_size as usize, expected.len());
    assert_eq!(
        fs.getattr(&ctx, big.inode, None).unwrap().0.st_ino,
        big.inode
    );
    assert_eq!(fs.lookup(&ctx, sub.inode, &name("..")).unwrap().inode, 1);
    let e = fs.lookup(&ctx, 1, &name("missing")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));

    // Reads at arbitrary offsets, across chunk boundaries, and past EOF.
    for (off, len) in [
        (0u64, 4096u32),
        (1_000_000, 131_072),
        (expected.len() as u64 - 10, 4096),
    ] {
        let mut b = Buf(Vec::new());
        let n = fs
            .read(&ctx, big.inode, 0, &mut b, len, off, None, 0)
            .unwrap();
        let end = (off as usize + len as usize).min(expected.len());
        assert_eq!(n, end - off as usize);
        assert!(b.0 == expected[off as usize..end]);
    }
    let mut b = Buf(Vec::new());
    assert_eq!(
        fs.read(
            &ctx,
            big.inode,
            0,
            &mut b,
            10,
            expected.len() as u64 + 5,
            None,
            0
        )
        .unwrap(),
        0
    );

    // readdir: ".", "..", then sorted names; resuming from an offset continues after it.
    let mut names = Vec::new();
    fs.readdir(&ctx, sub.inode, 0, 4096, 0, &mut |d| {
        names.push((String::from_utf8_lossy(d.name).into_owned(), d.offset));
        Ok(1)
    })
    .unwrap();
    let just: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(just, [".", "..", "big.bin", "deeper", "hard", "rel-link"]);
    let mut rest = Vec::new();
    fs.readdir(&ctx, sub.inode, 0, 4096, names[2].1, &mut |d| {
        rest.push(String::from_utf8_lossy(d.name).into_owned());
        Ok(1)
    })
    .unwrap();
    assert_eq!(rest, ["deeper", "hard", "rel-link"]);
    let mut plus = Vec::new();
    fs.readdirplus(&ctx, sub.inode, 0, 4096, 0, &mut |d, e| {
        plus.push((d.ino, e.inode, e.attr.st_ino));
        Ok(1)
    })
    .unwrap();
    // Same entries as readdir (an empty list would pass an `all` check), each with its attrs.
    assert_eq!(plus.len(), names.len());
    assert!(plus.iter().all(|(a, b, c)| a == b && b == c));

    let link = fs.lookup(&ctx, sub.inode, &name("rel-link")).unwrap();
    assert_eq!(fs.readlink(&ctx, link.inode).unwrap(), b"../small.txt");
    let hard = fs.lookup(&ctx, sub.inode, &name("hard")).unwrap();
    let small = fs.lookup(&ctx, 1, &name("small.txt")).unwrap();
    assert_eq!(hard.inode, small.inode);
    assert_eq!(small.attr.st_nlink, 2);

    if xattr::get(src.join("small.txt"), "user.flist")
        .ok()
        .flatten()
        .is_some()
    {
        match fs
            .getxattr(&ctx, small.inode, &name("user.flist"), 0)
            .unwrap()
        {
            GetxattrReply::Count(n) => assert_eq!(n, 3),
            _ => panic!("expected a size"),
        }
        match fs
            .getxattr(&ctx, small.inode, &name("user.flist"), 64)
            .unwrap()
        {
            GetxattrReply::Value(v) => assert_eq!(v, b"yes"),
            _ => panic!("expected a value"),
        }
        let e = fs
            .getxattr(&ctx, small.inode, &name("user.flist"), 1)
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ERANGE));
        match fs.listxattr(&ctx, small.inode, 64).unwrap() {
            ListxattrReply::Names(n) => assert_eq!(n, b"user.flist\0"),
            _ => panic!("expected names"),
        }
    }
    let e = fs
        .getxattr(&ctx, big.inode, &name("user.none"), 64)
        .err()
        .unwrap();
    assert_eq!(e.raw_os_error(), Some(libc::ENODATA));

    let st = fs.statfs(&ctx, 1).unwrap();
    assert!(st.f_blocks > 0 && st.f_files >= 10);
    let e = fs
        .open(&ctx, big.inode, libc::O_RDWR as u32, 0)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert!(fs.open(&ctx, big.inode, libc::O_RDONLY as u32, 0).is_ok());

    // A corrupt chunk (seen by a fresh instance, without verified copies in memory): EIO,
    // never wrong bytes.
    let c = &fs.image().inode(big.inode).unwrap().chunks[2];
    let hex = c.id.to_hex();
    std::fs::write(store_dir.join(&hex[..2]).join(&hex), b"bad").unwrap();
    let fs = FlistFs::open(&img, &OpenOptions::default()).unwrap();
    let mut b = Buf(Vec::new());
    let e = fs
        .read(&ctx, big.inode, 0, &mut b, 4096, c.offset, None, 0)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(b.0.is_empty());
}

/// Every refusal of the filesystem layer returns the exact errno a kernel caller expects.
#[test]
fn refusals_carry_the_exact_errno() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let img = t.path().join("img.flist");
    let store = format!("dir://{}", t.path().join("store").display());
    pack(
        &src,
        &img,
        &Router::from_specs(&[store]).unwrap(),
        &PackOptions::default(),
    )
    .unwrap();
    let fs = FlistFs::open(&img, &OpenOptions::default()).unwrap();
    let ctx = Context::new();
    let errno = |r: io::Result<()>| r.err().and_then(|e| e.raw_os_error());
    let sub = fs.lookup(&ctx, 1, &name("sub")).unwrap().inode;
    let file = fs.lookup(&ctx, 1, &name("small.txt")).unwrap().inode;
    let link = fs.lookup(&ctx, 1, &name("abs-link")).unwrap().inode;
    let missing = 1_000_000;

    assert_eq!(
        errno(fs.lookup(&ctx, file, &name("x")).map(drop)),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        errno(fs.lookup(&ctx, missing, &name("x")).map(drop)),
        Some(libc::ENOENT)
    );
    assert_eq!(
        errno(fs.getattr(&ctx, missing, None).map(drop)),
        Some(libc::ENOENT)
    );
    assert_eq!(errno(fs.readlink(&ctx, file).map(drop)), Some(libc::EINVAL));
    assert_eq!(
        errno(fs.readlink(&ctx, missing).map(drop)),
        Some(libc::ENOENT)
    );
    assert_eq!(fs.readlink(&ctx, link).unwrap(), b"/etc/passwd");
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(
            errno(fs.open(&ctx, file, flags as u32, 0).map(drop)),
            Some(libc::EROFS),
            "flags {flags:#o}"
        );
    }
    assert_eq!(
        errno(fs.open(&ctx, sub, libc::O_RDONLY as u32, 0).map(drop)),
        Some(libc::EISDIR)
    );
    assert_eq!(
        errno(fs.open(&ctx, missing, libc::O_RDONLY as u32, 0).map(drop)),
        Some(libc::ENOENT)
    );
    let mut b = Buf(Vec::new());
    assert_eq!(
        errno(fs.read(&ctx, sub, 0, &mut b, 10, 0, None, 0).map(drop)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(fs.read(&ctx, missing, 0, &mut b, 10, 0, None, 0).map(drop)),
        Some(libc::ENOENT)
    );
    assert_eq!(
        errno(fs.opendir(&ctx, file, 0).map(drop)),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        errno(fs.readdir(&ctx, file, 0, 4096, 0, &mut |_| Ok(1))),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        errno(fs.access(&ctx, file, libc::W_OK as u32)),
        Some(libc::EROFS)
    );
    assert_eq!(errno(fs.access(&ctx, missing, 0)), Some(libc::ENOENT));
    assert_eq!(errno(fs.access(&ctx, file, libc::R_OK as u32)), None);
    assert_eq!(
        errno(fs.getxattr(&ctx, file, &name("user.none"), 64).map(drop)),
        Some(libc::ENODATA)
    );
    assert_eq!(
        errno(fs.listxattr(&ctx, missing, 0).map(drop)),
        Some(libc::ENOENT)
    );
    if xattr::get(src.join("small.txt"), "user.flist")
        .ok()
        .flatten()
        .is_some()
    {
        assert_eq!(
            errno(fs.listxattr(&ctx, file, 1).map(drop)),
            Some(libc::ERANGE)
        );
    }
}
