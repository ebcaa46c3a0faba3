//! virtio-blk and virtio-rng with the guest's real Linux drivers, on the test bed (a real KVM
//! host inside QEMU): an ext4 filesystem made, written, checked and found again after a second
//! boot on the same raw image; a read-only drive refusing writes; /dev/hwrng giving bytes, at
//! the rate its limiter allows. And, without the test bed, the vmm refusing at start a disk
//! image that is missing or too small, naming it.
//!
//! The guest's mkfs and fsck are the host's e2fsprogs (`mke2fs`, `e2fsck`) copied into the
//! guest initramfs with the shared libraries `ldd` lists (busybox has no ext4 mkfs or fsck).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e_tests::cpio::Contents;
use e2e_tests::{
    artifacts, microvm, shared_libraries, skip_if_missing, Error, Job, JobOutput, Testbed,
};

const E2FSPROGS: &[&str] = &["/usr/sbin/mke2fs", "/usr/sbin/e2fsck"];

struct Bed {
    testbed: Testbed,
    vmm: PathBuf,
    vmlinux: PathBuf,
    initrd: PathBuf,
}

/// The guest initramfs: guest-init, busybox, and e2fsprogs with their libraries.
fn guest_initrd(test: &str) -> Result<PathBuf, Error> {
    let init = artifacts::guest_init()?;
    let mut archive = microvm::guest_initramfs(&init, Path::new("/bin/busybox"))?;
    for tool in E2FSPROGS {
        let tool = Path::new(tool);
        if !tool.is_file() {
            return Err(Error::Missing {
                what: tool.display().to_string(),
                hint: "apt-get install e2fsprogs".into(),
            });
        }
        archive.file(
            &tool.to_string_lossy(),
            0o755,
            Contents::HostFile(tool.to_owned()),
        )?;
        for lib in shared_libraries(tool)? {
            archive.file(
                &lib.to_string_lossy(),
                0o755,
                Contents::HostFile(lib.clone()),
            )?;
        }
    }
    let scratch = artifacts::scratch_dir(test)?;
    let initrd = scratch.join("initrd.cpio");
    archive.write_file(&initrd)?;
    Ok(initrd)
}

fn bed(test: &str) -> Result<Option<Bed>, Error> {
    let Some(testbed) = skip_if_missing(test, Testbed::from_system())? else {
        return Ok(None);
    };
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(None);
    };
    let Some(initrd) = skip_if_missing(test, guest_initrd(test))? else {
        return Ok(None);
    };
    Ok(Some(Bed {
        testbed,
        vmm: artifacts::vmm_binary()?,
        vmlinux: kernel.vmlinux,
        initrd,
    }))
}

impl Bed {
    fn run(&self, script: &str) -> Result<JobOutput, Error> {
        // Up to four boots with mkfs and fsck in one job: more than the default deadline
        // under nested TCG on a loaded host.
        let job = Job::new(script)
            .timeout(Duration::from_secs(480))
            .binary("/vmm", &self.vmm)
            .file("/guest/vmlinux", &self.vmlinux)
            .file("/guest/initrd", &self.initrd);
        let out = self.testbed.run(&job)?;
        eprintln!("--- job output ---\n{}", out.output);
        Ok(out)
    }
}

const VMM: &str = "/vmm --kernel /guest/vmlinux --initrd /guest/initrd --memory 256";

/// Whether a line of the job's output starts with `needle` (the guest kernel echoes its
/// command line, which holds the script's words: never match inside a line).
fn has_line(out: &JobOutput, needle: &str) -> bool {
    out.output
        .lines()
        .any(|l| l.trim_start().starts_with(needle))
}

#[test]
fn ext4_on_a_raw_drive_survives_a_second_boot_and_a_read_only_drive_refuses_writes(
) -> Result<(), Error> {
    let test = "ext4_on_a_raw_drive_survives_a_second_boot_and_a_read_only_drive_refuses_writes";
    let Some(bed) = bed(test)? else {
        return Ok(());
    };
    let drive = "--drive id=data,path=/srv/data.img,serial=SN-DATA-1";
    let out = bed.run(&format!(
        "mkdir -p /srv && dd if=/dev/zero of=/srv/data.img bs=1M count=0 seek=64 2>/dev/null\n\
         {VMM} {drive} -- /bin/sh -c '\
            echo serial=$(cat /sys/block/vda/serial); echo ro=$(cat /sys/block/vda/ro); \
            echo size=$(cat /sys/block/vda/size); \
            /usr/sbin/mke2fs -q -F -t ext4 /dev/vda && echo mkfs-ok; \
            mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo mounted-rw; \
            echo hello-from-block > /mnt/file && dd if=/dev/urandom of=/mnt/big bs=64k count=64 2>/dev/null; \
            md5sum /mnt/big > /mnt/big.md5; sync; umount /mnt && echo unmounted; \
            /usr/sbin/e2fsck -f -n /dev/vda >/tmp/fsck 2>&1; echo fsck1=$?'\n\
         echo vmm1=$?\n\
         {VMM} {drive} -- /bin/sh -c '\
            mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo content=$(cat /mnt/file); \
            cd /mnt && md5sum -c big.md5 && echo md5-ok; cd /; umount /mnt; \
            /usr/sbin/e2fsck -f -n /dev/vda >/tmp/fsck 2>&1; echo fsck2=$?'\n\
         echo vmm2=$?\n\
         {VMM} --drive id=data,path=/srv/data.img,readonly -- /bin/sh -c '\
            echo ro=$(cat /sys/block/vda/ro); \
            dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/tmp/dd; echo dd-status=$?; \
            sed -n \"s/^/dd: /p\" /tmp/dd; \
            mkdir -p /mnt; mount -t ext4 /dev/vda /mnt 2>/tmp/mnt; echo mount-status=$?; \
            sed -n \"s/^/mount: /p\" /tmp/mnt; \
            grep -q \"^/dev/vda /mnt ext4 ro\" /proc/mounts && echo mounted-ro; \
            echo ro-content=$(cat /mnt/file); \
            (echo x > /mnt/new) 2>/tmp/w; echo write-status=$?; sed -n \"s/^/write: /p\" /tmp/w'\n\
         echo vmm3=$?\n\
         {VMM} {drive} -- /bin/sh -c '/usr/sbin/e2fsck -f -n /dev/vda >/dev/null 2>&1; echo fsck3=$?'\n"
    ))?;
    for needle in [
        "serial=SN-DATA-1",
        "ro=0",
        "size=131072",
        "mkfs-ok",
        "mounted-rw",
        "unmounted",
        "fsck1=0",
        "vmm1=0",
        "content=hello-from-block",
        "md5-ok",
        "fsck2=0",
        "vmm2=0",
        "ro=1",
        "mounted-ro",
        "ro-content=hello-from-block",
        "vmm3=0",
        "fsck3=0",
    ] {
        assert!(has_line(&out, needle), "missing {needle}: {}", out.console);
    }
    // The read-only drive: raw writes fail, a mount is read-only, and file writes fail.
    assert!(!has_line(&out, "dd-status=0"), "{}", out.output);
    assert!(!has_line(&out, "write-status=0"), "{}", out.output);
    assert!(
        out.output.contains("Read-only file system"),
        "a write on the read-only mount gives EROFS: {}",
        out.output
    );
    Ok(())
}

#[test]
fn hwrng_gives_bytes_at_the_rate_its_limiter_allows() -> Result<(), Error> {
    let test = "hwrng_gives_bytes_at_the_rate_its_limiter_allows";
    let Some(bed) = bed(test)? else {
        return Ok(());
    };
    let spec = r#"{"kernel": "/guest/vmlinux", "initrd": "/guest/initrd", "memory_mib": 256, "rng": {"rate_limiter": {"bandwidth": {"size": 1024, "refill_time_ms": 1000}}}}"#;
    let out = bed.run(&format!(
        "{VMM} --rng -- /bin/sh -c '\
            echo current=$(cat /sys/class/misc/hw_random/rng_current); \
            echo count=$(head -c 4096 /dev/hwrng | wc -c); \
            head -c 4096 /dev/hwrng | od -An -v -tx1 | tr -s \" \" \"\\n\" | sort -u | wc -l | sed \"s/^/distinct=/\"'\n\
         echo vmm1=$?\n\
         echo '{spec}' > /srv-spec.json\n\
         /vmm --config /srv-spec.json -- /bin/sh -c '\
            start=$(date +%s); head -c 4096 /dev/hwrng | wc -c | sed \"s/^/limited-count=/\"; \
            echo limited-secs=$(( $(date +%s) - start ))'\n\
         echo vmm2=$?\n"
    ))?;
    for needle in [
        "current=virtio_rng",
        "count=4096",
        "vmm1=0",
        "limited-count=4096",
        "vmm2=0",
    ] {
        assert!(has_line(&out, needle), "missing {needle}: {}", out.console);
    }
    let value = |key: &str| -> Option<u64> {
        out.output
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    // 4096 random bytes take almost every byte value; zeros or a pattern would not.
    let distinct = value("distinct=").expect("distinct count");
    assert!(distinct > 200, "{distinct} distinct byte values");
    // 4096 bytes at 1024 bytes/s (a full bucket to start): at least 3 s, give or take the
    // clock's whole seconds.
    let secs = value("limited-secs=").expect("elapsed seconds");
    assert!(secs >= 2, "the limiter let 4096 bytes through in {secs} s");
    Ok(())
}

/// Runs the vmm on this host (no guest runs: the drive is checked before any vCPU starts).
#[test]
fn a_missing_or_too_small_image_stops_the_vmm_at_start_naming_it() -> Result<(), Error> {
    let test = "a_missing_or_too_small_image_stops_the_vmm_at_start_naming_it";
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(());
    };
    let vmm = artifacts::vmm_binary()?;
    let dir = artifacts::scratch_dir(test)?;
    let small = dir.join("small.img");
    std::fs::write(&small, [0u8; 100]).map_err(|source| Error::Io {
        context: "writing the small image".into(),
        source,
    })?;
    let missing = dir.join("missing.img");
    let _ = std::fs::remove_file(&missing);
    for (image, why) in [
        (&missing, "No such file"),
        (&small, "must be a non-empty multiple of 512 bytes"),
        (&dir, "directory"),
    ] {
        let out = Command::new(&vmm)
            .arg("--kernel")
            .arg(&kernel.vmlinux)
            .arg("--serial")
            .arg("off")
            .arg("--drive")
            .arg(format!("id=d,path={}", image.display()))
            .output()
            .map_err(|source| Error::Io {
                context: format!("running {}", vmm.display()),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&image.display().to_string()) && stderr.contains(why),
            "{stderr}"
        );
    }
    Ok(())
}
