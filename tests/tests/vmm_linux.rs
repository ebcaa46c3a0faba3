//! The vmm booting the project's Linux guest kernel and init on the test bed (a real KVM host
//! inside QEMU): ELF (PVH and 64-bit Linux entry) and bzImage boots, 1 and several vCPUs, the
//! entrypoint's status as the vmm's, guest reboot, virtio-fs shares, and bad input.

use std::path::PathBuf;

use e2e_tests::{artifacts, conformance, microvm, skip_if_missing, Error, Job, JobOutput, Testbed};

struct Bed {
    testbed: Testbed,
    vmm: PathBuf,
    vmlinux: PathBuf,
    bz_image: PathBuf,
    initrd: PathBuf,
}

fn bed(test: &str) -> Result<Option<Bed>, Error> {
    let Some(testbed) = skip_if_missing(test, Testbed::from_system())? else {
        return Ok(None);
    };
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(None);
    };
    let init = artifacts::guest_init()?;
    let scratch = artifacts::scratch_dir(test)?;
    let initrd = scratch.join("initrd.cpio");
    microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?.write_file(&initrd)?;
    Ok(Some(Bed {
        testbed,
        vmm: artifacts::vmm_binary()?,
        vmlinux: kernel.vmlinux,
        bz_image: kernel.bz_image,
        initrd,
    }))
}

impl Bed {
    /// Runs `script` on the test bed with the vmm at /vmm, the guest kernels at /guest/vmlinux
    /// and /guest/bzImage and the guest initramfs at /guest/initrd.
    fn run(&self, script: &str) -> Result<JobOutput, Error> {
        let job = Job::new(script)
            .binary("/vmm", &self.vmm)
            .file("/guest/vmlinux", &self.vmlinux)
            .file("/guest/bzImage", &self.bz_image)
            .file("/guest/initrd", &self.initrd);
        let out = self.testbed.run(&job)?;
        eprintln!("--- job output ---\n{}", out.output);
        Ok(out)
    }
}

const VMM: &str = "/vmm --initrd /guest/initrd --memory 128";

#[test]
fn elf_pvh_boot_runs_the_entrypoint_and_returns_its_status() -> Result<(), Error> {
    let Some(bed) = bed("elf_pvh_boot_runs_the_entrypoint_and_returns_its_status")? else {
        return Ok(());
    };
    let out = bed.run(&format!(
        "{VMM} --kernel /guest/vmlinux --env GREETING='hello there' -- /bin/sh -c 'echo \"guest says $GREETING\" 100%; exit 7'\n\
         echo vmm-status=$?\n"
    ))?;
    assert!(
        out.output.contains("\nguest says hello there 100%"),
        "{}",
        out.console
    );
    assert!(out.output.contains("vmm-status=7"), "{}", out.console);
    assert!(
        out.output.contains("vmm: guest booted in"),
        "{}",
        out.console
    );
    Ok(())
}

#[test]
fn linux_64bit_entry_and_bzimage_boot() -> Result<(), Error> {
    let Some(bed) = bed("linux_64bit_entry_and_bzimage_boot")? else {
        return Ok(());
    };
    let out = bed.run(&format!(
        "{VMM} --kernel /guest/vmlinux --boot-protocol linux -- /bin/sh -c 'echo $((6*7))-via-elf-linux-entry'\n\
         echo elf-status=$?\n\
         {VMM} --kernel /guest/bzImage -- /bin/sh -c 'echo $((6*7))-via-bzimage'\n\
         echo bz-status=$?\n"
    ))?;
    for needle in [
        "42-via-elf-linux-entry",
        "elf-status=0",
        "42-via-bzimage",
        "bz-status=0",
    ] {
        assert!(
            out.output.contains(needle),
            "missing {needle}: {}",
            out.console
        );
    }
    Ok(())
}

#[test]
fn all_vcpus_come_up() -> Result<(), Error> {
    let Some(bed) = bed("all_vcpus_come_up")? else {
        return Ok(());
    };
    let out = bed.run(&format!(
        "{VMM} --kernel /guest/vmlinux --vcpus 1 -- /bin/busybox nproc\n\
         {VMM} --kernel /guest/vmlinux --vcpus 4 -- /bin/busybox nproc\n\
         {VMM} --kernel /guest/bzImage --vcpus 3 -- /bin/busybox nproc\n"
    ))?;
    let counts: Vec<&str> = out
        .output
        .lines()
        .filter(|l| l.trim().chars().all(|c| c.is_ascii_digit()) && !l.trim().is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(counts, ["1", "4", "3"], "{}", out.console);
    Ok(())
}

#[test]
fn guest_reboot_ends_the_vm() -> Result<(), Error> {
    let Some(bed) = bed("guest_reboot_ends_the_vm")? else {
        return Ok(());
    };
    let out = bed.run(&format!(
        "{VMM} --kernel /guest/vmlinux -- /bin/busybox reboot -f\n\
         echo reboot-status=$?\n"
    ))?;
    assert!(out.output.contains("reboot-status=0"), "{}", out.console);
    Ok(())
}

#[test]
fn virtio_fs_shares_a_host_directory() -> Result<(), Error> {
    let Some(bed) = bed("virtio_fs_shares_a_host_directory")? else {
        return Ok(());
    };
    let out = bed.run(&format!(
        "mkdir -p /srv/data /srv/ro && echo from-host > /srv/data/hello && echo keep > /srv/ro/file\n\
         {VMM} --kernel /guest/vmlinux --fs tag=data,dir=/srv/data --fs tag=ro,dir=/srv/ro,readonly -- /bin/sh -c '\
            mkdir -p /mnt/data /mnt/ro && mount -t virtiofs data /mnt/data && mount -t virtiofs ro /mnt/ro && \
            cat /mnt/data/hello && echo from-guest > /mnt/data/written && \
            if echo x > /mnt/ro/new 2>/tmp/err; then echo ro-write-$((6*7)); else cat /tmp/err; fi; \
            cat /mnt/ro/file'\n\
         echo fs-status=$?\n\
         cat /srv/data/written\n\
         test -e /srv/ro/new && echo ro-file-created\n"
    ))?;
    let o = &out.output;
    assert!(o.contains("from-host"), "{}", out.console);
    assert!(o.contains("fs-status=0"), "{}", out.console);
    assert!(
        o.contains("from-guest"),
        "written file not on the host: {}",
        out.console
    );
    assert!(o.contains("Read-only file system"), "{}", out.console);
    assert!(
        !o.contains("ro-write-42") && !o.contains("ro-file-created"),
        "{}",
        out.console
    );
    assert!(o.contains("keep"), "{}", out.console);
    Ok(())
}

#[test]
fn root_on_virtio_fs_runs_the_entrypoint_from_the_share() -> Result<(), Error> {
    let Some(bed) = bed("root_on_virtio_fs_runs_the_entrypoint_from_the_share")? else {
        return Ok(());
    };
    let out = bed.run(&format!(
        "mkdir -p /srv/root/bin /srv/root/etc /srv/root/proc /srv/root/dev\n\
         cp /bin/busybox /srv/root/bin/busybox && ln -s busybox /srv/root/bin/sh\n\
         echo root-from-share > /srv/root/etc/marker\n\
         {VMM} --kernel /guest/vmlinux --fs tag=rootfs,dir=/srv/root --root rootfs -- /bin/sh -c \
           'cat /etc/marker; test -e /init || echo no-initramfs; test -c /dev/null && echo dev-ok; \
            grep -q \" / virtiofs \" /proc/mounts && echo root-is-virtiofs; echo written > /etc/new'\n\
         echo root-status=$?\n\
         cat /srv/root/etc/new\n"
    ))?;
    for needle in [
        "root-from-share",
        "no-initramfs",
        "dev-ok",
        "root-is-virtiofs",
        "root-status=0",
        "\nwritten",
    ] {
        assert!(
            out.output.contains(needle),
            "missing {needle:?}: {}",
            out.console
        );
    }
    Ok(())
}

/// Packs a root tree (busybox) and a data tree into flist images inside the test bed, with
/// their chunks in a dir:// store. `FLIST` is the flist binary in the job.
const PACK_IMAGES: &str = "mkdir -p /srv/rootfs/bin /srv/rootfs/etc /srv/rootfs/proc /srv/rootfs/dev /srv/rootfs/tmp /srv/rootfs/mnt /srv/data\n\
     cp /bin/busybox /srv/rootfs/bin/busybox && ln -s busybox /srv/rootfs/bin/sh\n\
     echo image-v1 > /srv/rootfs/etc/version && echo doomed > /srv/rootfs/etc/doomed\n\
     head -c 3000000 /dev/urandom > /srv/data/big.bin && echo small > /srv/data/small.txt\n\
     /flist pack /srv/rootfs -o /srv/root.flist --store dir:///srv/store > /dev/null\n\
     /flist pack /srv/data -o /srv/data.flist --store dir:///srv/datastore > /dev/null\n";

impl Bed {
    fn run_with_flist(&self, script: &str) -> Result<JobOutput, Error> {
        let flist = artifacts::target_dir().join("debug/flist");
        let job = Job::new(format!("{PACK_IMAGES}{script}"))
            .binary("/vmm", &self.vmm)
            .binary("/flist", &flist)
            .file("/guest/vmlinux", &self.vmlinux)
            .file("/guest/initrd", &self.initrd);
        let out = self.testbed.run(&job)?;
        eprintln!("--- job output ---\n{}", out.output);
        Ok(out)
    }
}

#[test]
fn root_on_an_flist_image_with_a_persistent_writable_layer() -> Result<(), Error> {
    let Some(bed) = bed("root_on_an_flist_image_with_a_persistent_writable_layer")? else {
        return Ok(());
    };
    let root = "--fs tag=rootfs,image=/srv/root.flist,layer=/srv/layer --root rootfs --image-cache /srv/cache --store dir:///srv/store";
    let out = bed.run_with_flist(&format!(
        "{VMM} --kernel /guest/vmlinux {root} -- /bin/sh -c \
           'cat /etc/version; echo first-boot > /etc/written; rm /etc/doomed; mkdir /etc/newdir; \
            mv /etc/version /etc/renamed; echo $((6*7))-first-done'\n\
         echo first-status=$?\n\
         {VMM} --kernel /guest/vmlinux {root} -- /bin/sh -c \
           'cat /etc/written /etc/renamed; test -e /etc/doomed || echo doomed-$((1+1))-gone; \
            test -d /etc/newdir && echo newdir-$((2+2)); test -e /etc/version || echo version-renamed'\n\
         echo second-status=$?\n\
         {VMM} --kernel /guest/vmlinux --fs tag=rootfs,image=/srv/root.flist --root rootfs --image-cache /srv/cache --store dir:///srv/store -- \
           /bin/sh -c 'cat /etc/version; if echo x > /etc/x; then echo ro-$((3*3)); fi; true'\n\
         echo ro-status=$?\n"
    ))?;
    let o = &out.output;
    for needle in [
        "\nimage-v1",
        "42-first-done",
        "first-status=0",
        "\nfirst-boot",
        "doomed-2-gone",
        "newdir-4",
        "version-renamed",
        "second-status=0",
        "Read-only file system",
        "ro-status=0",
    ] {
        assert!(o.contains(needle), "missing {needle:?}: {}", out.console);
    }
    assert!(!o.contains("ro-9"), "{}", out.console);
    Ok(())
}

#[test]
fn a_corrupt_chunk_is_eio_in_the_guest_and_the_vm_keeps_running() -> Result<(), Error> {
    let Some(bed) = bed("a_corrupt_chunk_is_eio_in_the_guest_and_the_vm_keeps_running")? else {
        return Ok(());
    };
    // Garbage in the middle of every stored chunk: a blocked chunk's table comes with the
    // image, so a read fetches only its blocks and never the table at the chunk's start.
    let out = bed.run_with_flist(&format!(
        "for f in $(find /srv/datastore -type f); do printf 'garbage' | dd of=$f bs=1 seek=$(($(stat -c %s $f) / 2)) conv=notrunc 2>/dev/null; done\n\
         VMM_LOG=warn {VMM} --kernel /guest/vmlinux --fs tag=data,image=/srv/data.flist --image-cache /srv/cache --store dir:///srv/datastore -- /bin/sh -c \
           'mkdir -p /mnt/data && mount -t virtiofs data /mnt/data && \
            if cat /mnt/data/big.bin > /dev/null 2>/tmp/e; then echo read-$((5*5)); else cat /tmp/e; fi; \
            ls /mnt/data; echo still-$((7*7))-running'\n\
         echo eio-status=$?\n"
    ))?;
    let o = &out.output;
    assert!(o.contains("Input/output error"), "{}", out.console);
    assert!(!o.contains("read-25"), "{}", out.console);
    assert!(
        o.contains("big.bin") && o.contains("still-49-running"),
        "{}",
        out.console
    );
    assert!(o.contains("eio-status=0"), "{}", out.console);
    assert!(
        o.to_lowercase().contains("chunk"),
        "no host-side error naming the chunk: {}",
        out.console
    );
    Ok(())
}

#[test]
fn bad_input_on_the_kvm_host_gets_one_clear_line() -> Result<(), Error> {
    let Some(bed) = bed("bad_input_on_the_kvm_host_gets_one_clear_line")? else {
        return Ok(());
    };
    let out = bed.run(
        "r() { /vmm \"$@\" > /tmp/out 2>&1; echo \"status=$? lines=$(wc -l < /tmp/out) $(head -c 160 /tmp/out)\"; }\n\
         echo '#!/bin/sh' > /tmp/not-a-kernel\n\
         head -c 4096 /guest/vmlinux > /tmp/truncated\n\
         head -c 300000000 /dev/zero > /tmp/huge-initrd\n\
         r --kernel /tmp/not-a-kernel\n\
         r --kernel /tmp/truncated\n\
         r --kernel /guest/vmlinux --initrd /tmp/huge-initrd --memory 128\n\
         r --kernel /guest/vmlinux --vcpus 33\n\
         r --kernel /guest/vmlinux --memory 99999999\n\
         r --kernel /guest/vmlinux --initrd /nonexistent\n\
         r --kernel /guest/vmlinux --kvm-device /nonexistent/kvm\n",
    )?;
    let lines: Vec<&str> = out
        .output
        .lines()
        .filter(|l| l.starts_with("status="))
        .collect();
    let expected = [
        "neither an ELF vmlinux nor a bzImage",
        "cannot load ELF kernel",
        "does not fit in guest memory",
        "vcpus must be between 1 and 32",
        "more than this host has",
        "cannot read initrd /nonexistent",
        "/nonexistent/kvm does not exist",
    ];
    assert_eq!(lines.len(), expected.len(), "{}", out.console);
    for (line, needle) in lines.iter().zip(expected) {
        assert!(line.starts_with("status=2 lines=1 vmm: error:"), "{line}");
        assert!(line.contains(needle), "expected {needle:?} in {line}");
    }
    Ok(())
}

/// Runs pjdfstest and fsx (`e2e_tests::conformance`) inside a guest whose root is an flist
/// image with a writable layer. About 5 to 9 minutes on the test bed (fsx with 100,000
/// operations did not finish in 50 minutes there under TCG: 10,000 here; the vmm's
/// `layer::fuse_tests` run 100,000 on the same layer through the host's FUSE).
#[test]
fn pjdfstest_and_fsx_on_a_writable_layer() -> Result<(), Error> {
    let test = "pjdfstest_and_fsx_on_a_writable_layer";
    let (Some(pjdfstest), Some(fsx)) = (
        skip_if_missing(test, conformance::tool("PJDFSTEST_BIN"))?,
        skip_if_missing(test, conformance::tool("FSX_BIN"))?,
    ) else {
        return Ok(());
    };
    let Some(bed) = bed(test)? else {
        return Ok(());
    };
    let script = "mkdir -p /srv/rootfs/bin /srv/rootfs/usr/bin /srv/rootfs/etc /srv/rootfs/proc /srv/rootfs/dev /srv/rootfs/tmp \
           /srv/rootfs/lib/x86_64-linux-gnu /srv/rootfs/lib64\n\
         cp /bin/busybox /srv/rootfs/bin/ && for t in sh which sleep mount umount; do ln -s busybox /srv/rootfs/bin/$t; done && cp /pjdfstest /fsx /srv/rootfs/usr/bin/\n\
         for l in libc.so.6 libm.so.6 libgcc_s.so.1; do cp /lib/x86_64-linux-gnu/$l /srv/rootfs/lib/x86_64-linux-gnu/; done\n\
         cp /lib64/ld-linux-x86-64.so.2 /srv/rootfs/lib64/\n\
         printf 'root:x:0:0::/:/bin/sh\\nnobody:x:65534:65534::/:/bin/sh\\ntests:x:1000:1000::/:/bin/sh\\n' > /srv/rootfs/etc/passwd\n\
         printf 'root:x:0:\\nnogroup:x:65534:\\ntests:x:1000:tests\\n' > /srv/rootfs/etc/group\n\
         /flist pack /srv/rootfs -o /srv/root.flist --store dir:///srv/store > /dev/null\n\
         /vmm --kernel /guest/vmlinux --initrd /guest/initrd --memory 512 --cmdline quiet \
           --fs tag=rootfs,image=/srv/root.flist,layer=/srv/layer --root rootfs --image-cache /srv/cache --store dir:///srv/store -- /bin/sh -c \
           'mkdir -p /pjd /fsx && /usr/bin/pjdfstest -p /pjd > /tmp/pjd.out 2>&1; \
            sed \"s/^/PJDOUT /\" /tmp/pjd.out; \
            cd /fsx && /usr/bin/fsx -N 10000 -S 7 -q /fsx/file > /tmp/fsx.out 2>&1; echo FSX status=$?; tail -3 /tmp/fsx.out'\n\
         echo vmm-status=$?\n";
    let job = Job::new(script)
        .binary("/vmm", &bed.vmm)
        .binary("/flist", artifacts::target_dir().join("debug/flist"))
        .binary("/pjdfstest", &pjdfstest)
        .binary("/fsx", &fsx)
        .file("/guest/vmlinux", &bed.vmlinux)
        .file("/guest/initrd", &bed.initrd)
        .timeout(std::time::Duration::from_secs(1800));
    let mut out = bed.testbed.run(&job)?;
    // Seen once in a full run under load: the vmm ended (status 1) after about 100 s with
    // none of the guest's output, neither pjdfstest's nor fsx's, and passed on every run since.
    // Such a run has no result to judge: it is shown whole and run once more.
    let no_result = |o: &str| !o.contains("FSX status=") && !o.contains("PJDOUT ");
    if no_result(&out.output) {
        eprintln!(
            "pjdfstest/fsx: the guest's output is missing; running the job again. The job's output:\n{}\n--- console:\n{}",
            out.output, out.console
        );
        out = bed.testbed.run(&job)?;
    }
    let o = &out.output;
    // The guest kernel echoes its command line, which holds the script's words: only lines
    // that start with a prefix are the tools'.
    let fsx_status = o
        .lines()
        .find_map(|l| l.strip_prefix("FSX status="))
        .and_then(|v| v.trim().parse().ok());
    let fsx_output: String = o
        .lines()
        .skip_while(|l| !l.starts_with("FSX status="))
        .collect::<Vec<_>>()
        .join("\n");
    let pjd_output: String = o
        .lines()
        .filter_map(|l| l.strip_prefix("PJDOUT "))
        .collect::<Vec<_>>()
        .join("\n");
    let pjd = conformance::pjdfstest_summary(&pjd_output);
    eprintln!(
        "--- job output ---\n{fsx_output}\npjdfstest: {} ok, failed: {:?}",
        pjd.passed, pjd.failed
    );
    if let Err(e) = conformance::check_fsx(fsx_status, &fsx_output) {
        panic!("{e}\n--- the whole job output ---\n{o}\n{}", out.console);
    }
    if let Err(e) = pjd.check() {
        panic!("{e}\n--- the whole job output ---\n{o}\n{}", out.console);
    }
    for (known, reason) in pjd.known_passing() {
        eprintln!(
            "note: known pjdfstest failure {known} ({reason}) passes now: drop it from the list"
        );
    }
    Ok(())
}

/// Whether a line of the job's output starts with `prefix` (the guest kernel echoes its
/// command line, which holds the script's words, so a bare `contains` could match that).
fn has_line(output: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_start_matches('\n');
    output.lines().any(|l| l.starts_with(prefix))
}

/// A guest under a writable layer tries to make privileged objects on the host: a block and a
/// character device, a setuid root file, a `security.capability` attribute. None becomes one
/// on the host (the guest sees its attribute under its own name, the host only under
/// `user.gridnode.`), and the guest has no network interface but loopback.
#[test]
fn guest_writes_never_become_privileged_host_objects() -> Result<(), Error> {
    let test = "guest_writes_never_become_privileged_host_objects";
    let Some(bed) = bed(test)? else {
        return Ok(());
    };
    let tool = |name: &str| -> Result<Option<PathBuf>, Error> {
        let path = PathBuf::from("/usr/bin").join(name);
        skip_if_missing(
            test,
            path.exists().then_some(path.clone()).ok_or(Error::Missing {
                what: name.to_owned(),
                hint: "Debian's attr package (scripts/setup.sh installs it)".into(),
            }),
        )
    };
    let (Some(setfattr), Some(getfattr)) = (tool("setfattr")?, tool("getfattr")?) else {
        return Ok(());
    };
    let script = format!(
        "mkdir -p /srv/rootfs/bin /srv/rootfs/usr/bin /srv/rootfs/etc /srv/rootfs/proc /srv/rootfs/dev /srv/rootfs/tmp \
           /srv/rootfs/sys /srv/rootfs/lib/x86_64-linux-gnu /srv/rootfs/lib64\n\
         cp /bin/busybox /srv/rootfs/bin/ && ln -s busybox /srv/rootfs/bin/sh && cp /setfattr /getfattr /srv/rootfs/usr/bin/\n\
         cp /lib/x86_64-linux-gnu/libc.so.6 /srv/rootfs/lib/x86_64-linux-gnu/ && cp /lib64/ld-linux-x86-64.so.2 /srv/rootfs/lib64/\n\
         /flist pack /srv/rootfs -o /srv/root.flist --store dir:///srv/store > /dev/null\n\
         {VMM} --kernel /guest/vmlinux --fs tag=rootfs,image=/srv/root.flist,layer=/srv/layer --root rootfs \
           --image-cache /srv/cache --store dir:///srv/store -- /bin/sh -c \
           'mkdir /w; \
            mknod /w/blk b 8 0 && echo guest-blk-made || echo guest-blk-refused; \
            mknod /w/chr c 1 3 && echo guest-chr-made || echo guest-chr-refused; \
            test -b /w/blk && test -c /w/chr && echo guest-sees-devices; \
            mknod /w/fifo p && echo guest-fifo-made; \
            echo x > /w/suid && chmod 4755 /w/suid && echo guest-chmod-done; \
            setfattr -n security.capability -v 0x0100000200200000000000000000000000000000 /w/suid && echo guest-setcap-done; \
            getfattr -n security.capability -e hex /w/suid 2>&1 | grep -q 0x01000002 && echo guest-sees-its-cap; \
            for i in /sys/class/net/*; do test -e $i/device && echo guest-nic: $i; done; echo guest-net-checked'\n\
         echo vmm-status=$?\n\
         test -b /srv/layer/upper/w/blk && echo host-has-blk || echo host-no-blk\n\
         test -c /srv/layer/upper/w/chr && echo host-has-chr || echo host-no-chr\n\
         test -f /srv/layer/upper/w/blk && test -f /srv/layer/upper/w/chr && echo host-has-plain-files\n\
         test -p /srv/layer/upper/w/fifo && echo host-has-fifo\n\
         echo host-suid-mode=$(stat -c %a /srv/layer/upper/w/suid)\n\
         /setfattr -n user.probe -v 1 /srv/layer/work && echo host-has-user-xattrs\n\
         /getfattr -d -m - -e hex /srv/layer/upper/w/suid 2>/dev/null | sed 's/^/host-xattr /'\n\
         echo host-layer-mode=$(stat -c %a /srv/layer /srv/layer/upper /srv/layer/work)\n"
    );
    let job = Job::new(script)
        .binary("/vmm", &bed.vmm)
        .binary("/flist", artifacts::target_dir().join("debug/flist"))
        .binary("/setfattr", &setfattr)
        .binary("/getfattr", &getfattr)
        .file("/guest/vmlinux", &bed.vmlinux)
        .file("/guest/initrd", &bed.initrd);
    let out = bed.testbed.run(&job)?;
    eprintln!("--- job output ---\n{}", out.output);
    let o = &out.output;
    for needle in [
        "guest-blk-made",
        "guest-chr-made",
        "guest-sees-devices",
        "host-has-plain-files",
        "guest-fifo-made",
        "guest-chmod-done",
        "guest-net-checked",
        "vmm-status=0",
        "host-no-blk",
        "host-no-chr",
        "host-has-fifo",
        "host-suid-mode=755",
        "host-layer-mode=700 755 700",
    ] {
        assert!(has_line(o, needle), "missing {needle:?}: {}", out.console);
    }
    assert!(
        !o.lines()
            .any(|l| l.starts_with("host-xattr security.") || l.starts_with("host-xattr trusted.")),
        "{o}"
    );
    // Guest attributes live under user.gridnode. on the host; where the layer's filesystem has
    // no user.* attributes (the test bed's initramfs tmpfs on Linux 6.1), the guest's
    // setfattr fails instead, and still nothing privileged reaches the host.
    if has_line(o, "host-has-user-xattrs") {
        for needle in [
            "guest-setcap-done",
            "guest-sees-its-cap",
            "host-xattr user.gridnode.security.capability=0x01000002",
        ] {
            assert!(has_line(o, needle), "missing {needle:?}: {}", out.console);
        }
    } else {
        assert!(!has_line(o, "guest-setcap-done"), "{}", out.console);
    }
    // No network device: the vmm gives the guest none (only virtual ones like lo exist).
    assert!(!has_line(o, "guest-nic:"), "{}", out.console);
    Ok(())
}

/// An image whose first recorded store is elsewhere (an HTTP server the test watches) is
/// served only from the node's allowed store: the server sees no request.
#[test]
fn an_image_is_served_only_from_allowed_stores() -> Result<(), Error> {
    let Some(bed) = bed("an_image_is_served_only_from_allowed_stores")? else {
        return Ok(());
    };
    let out = bed.run_with_flist(&format!(
        "ip link set lo up\n\
         mkdir -p /srv/evil && cp -r /srv/store/. /srv/evil/\n\
         /flist set-stores /srv/root.flist --store http://127.0.0.1:8080 --store dir:///srv/store > /dev/null && echo routes-set\n\
         /bin/busybox httpd -f -v -p 127.0.0.1:8080 -h /srv/evil 2> /tmp/httpd.log &\n\
         sleep 1\n\
         {VMM} --kernel /guest/vmlinux --fs tag=rootfs,image=/srv/root.flist --root rootfs --image-cache /srv/cache \
           --store dir:///srv/store -- /bin/sh -c 'cat /etc/version; cat /bin/busybox > /dev/null && echo read-all'\n\
         echo vmm-status=$?\n\
         echo evil-requests=$(grep -c response: /tmp/httpd.log)\n\
         /bin/busybox wget -q -O /dev/null http://127.0.0.1:8080/nothing-here; sleep 0.2\n\
         echo control-requests=$(grep -c response: /tmp/httpd.log)\n\
         rm -rf /srv/cache\n\
         {VMM} --kernel /guest/vmlinux --fs tag=rootfs,image=/srv/root.flist --root rootfs --image-cache /srv/cache \
           --store dir:///srv/elsewhere -- /bin/sh -c 'echo should-not-boot' 2>&1 | grep -o 'may be used on this node' | head -1\n\
         echo refused-status=$?\n"
    ))?;
    let o = &out.output;
    for needle in [
        "routes-set",
        "\nimage-v1",
        "read-all",
        "vmm-status=0",
        "evil-requests=0",
        "control-requests=1",
        "may be used on this node",
    ] {
        assert!(has_line(o, needle), "missing {needle:?}: {}", out.console);
    }
    assert!(!o.contains("should-not-boot"), "{}", out.console);
    Ok(())
}

/// SIGTERM to the vmm presses Ctrl-Alt-Del; the guest init turns it into SIGTERM for the
/// entrypoint, whose status ends the VM. An entrypoint that ignores SIGTERM is killed after
/// the grace period. The exit record tells both.
#[test]
fn sigterm_stops_the_entrypoint_gracefully_then_forcibly() -> Result<(), Error> {
    let Some(bed) = bed("sigterm_stops_the_entrypoint_gracefully_then_forcibly")? else {
        return Ok(());
    };
    let run = |n: u32, grace: u32, script: &str| {
        format!(
            "{VMM} --kernel /guest/vmlinux --serial file:/tmp/c{n}.log --exit-record /tmp/exit{n}.json \
             --shutdown-grace {grace} -- /bin/sh -c '{script}' &\n\
             pid=$!\n\
             for i in $(seq 300); do grep -q '^ready' /tmp/c{n}.log 2>/dev/null && break; sleep 0.1; done\n\
             kill -TERM $pid; wait $pid; echo vmm{n}-status=$?\n\
             grep -E '^(got-term|init: shutdown requested|init: grace period over)' /tmp/c{n}.log\n\
             echo; cat /tmp/exit{n}.json; echo\n\
             echo '--- the end of console {n}:'; tail -n 6 /tmp/c{n}.log\n"
        )
    };
    let out =
        bed.run(&format!(
        "{}{}",
        run(
            1,
            10,
            "trap \"echo got-term; exit 3\" TERM; echo ready; while :; do sleep 1 & wait $!; done"
        ),
        run(2, 1, "trap \"\" TERM; echo ready; while :; do sleep 1; done"),
    ))?;
    let has_line = |needle: &str| out.output.lines().any(|l| l.starts_with(needle));
    assert!(has_line("got-term"), "{}", out.output);
    assert!(has_line("init: shutdown requested"), "{}", out.output);
    assert!(has_line("vmm1-status=3"), "{}", out.output);
    assert!(out
        .output
        .contains("\"reason\": \"the guest exited with status 3\""));
    assert!(has_line("init: grace period over"), "{}", out.output);
    assert!(has_line("vmm2-status=137"), "{}", out.output);
    assert!(
        out.output
            .contains("\"reason\": \"the guest exited with status 137\""),
        "the guest init, not the vmm's deadline, ended the second VM: {}",
        out.output
    );
    Ok(())
}

/// A guest whose kernel panics (here: no init it can run) ends the vmm with status 3 and says
/// why, instead of looking like a clean reset.
#[test]
fn a_guest_kernel_panic_is_not_a_clean_exit() -> Result<(), Error> {
    let Some(bed) = bed("a_guest_kernel_panic_is_not_a_clean_exit")? else {
        return Ok(());
    };
    let out = bed.run(&format!(
        "{VMM} --kernel /guest/vmlinux --exit-record /tmp/panic.json \
         --cmdline 'rdinit=/no-such-init init=/no-such-init'\n\
         echo vmm-status=$?\n\
         cat /tmp/panic.json; echo\n"
    ))?;
    assert!(
        out.output.lines().any(|l| l.starts_with("vmm-status=3")),
        "{}",
        out.output
    );
    assert!(
        out.output.contains("vmm: guest kernel panic: "),
        "{}",
        out.output
    );
    assert!(
        out.output.contains("\"kind\": \"guest_panic\""),
        "{}",
        out.output
    );
    Ok(())
}
