//! A jailed vmm on the test bed (a real KVM host inside QEMU): the jailer runs the vmm as
//! an unprivileged user in its own namespaces, under a cgroup v2 with limits, with only
//! /dev/kvm, the guest kernel, the flist image, its chunk store and the VM's writable
//! layer bound in; the guest boots from the flist root and runs a command.
//!
//! A second test jails `jail-probe` on the test bed (no guest): the test bed runs from its
//! initramfs, as a diskless node would (no pivot_root there), and has cgroup v2 with
//! all controllers.
//!
//! Needs `cargo build -p vmm -p jailer -p flist-fs` first (the binaries are found, not
//! built), and the guest kernel (guest-kernels/build-kernel.sh, built on first use).

use std::path::PathBuf;

use e2e_tests::{artifacts, last_lines, microvm, shared_libraries, skip_if_missing, Error, Job};

/// A workspace binary in `<target>/{debug,release}` (the newest), or `$<VAR>`.
fn workspace_binary(name: &str, var: &str) -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    ["debug", "release"]
        .iter()
        .map(|profile| artifacts::target_dir().join(profile).join(name))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| Error::Missing {
            what: format!("the {name} binary"),
            hint: format!("run `cargo build -p {name}` or set {var}"),
        })
}

/// The VM's id, uid and gid in the jail.
const ID: &str = "e2e-vm-1";
const UID: u32 = 1000;
const GID: u32 = 1000;

#[test]
fn a_jailed_vmm_boots_a_guest_from_an_flist_root_with_a_writable_layer() -> Result<(), Error> {
    let test = "a_jailed_vmm_boots_a_guest_from_an_flist_root_with_a_writable_layer";
    let Some(testbed) = skip_if_missing(test, e2e_tests::Testbed::from_system())? else {
        return Ok(());
    };
    let Some(jailer) = skip_if_missing(test, workspace_binary("jailer", "JAILER_BIN"))? else {
        return Ok(());
    };
    let Some(kernel) = skip_if_missing(test, artifacts::guest_kernel())? else {
        return Ok(());
    };
    let vmm = artifacts::vmm_binary()?;
    let flist = workspace_binary("flist", "FLIST_BIN")?;
    let init = artifacts::guest_init()?;
    let scratch = artifacts::scratch_dir(test)?;
    let initrd = scratch.join("initrd.cpio");
    microvm::guest_initramfs(&init, std::path::Path::new("/bin/busybox"))?.write_file(&initrd)?;

    // The vmm is dynamically linked: exactly its libraries (Job::binary places them at
    // their host paths in the test bed) are bound read-only into the jail.
    let libs: String = shared_libraries(&vmm)?
        .iter()
        .map(|l| format!(" --ro {}", l.display()))
        .collect();
    let script = format!(
        "mount -t cgroup2 none /sys/fs/cgroup || echo no-cgroup2\n\
         mkdir -p /srv/rootfs/bin /srv/rootfs/etc /srv/rootfs/proc /srv/rootfs/dev /srv/rootfs/tmp /srv/layer /srv/vmcache\n\
         cp /bin/busybox /srv/rootfs/bin/busybox && ln -s busybox /srv/rootfs/bin/sh\n\
         echo image-v1 > /srv/rootfs/etc/version\n\
         /flist pack /srv/rootfs -o /srv/root.flist --store dir:///srv/store > /dev/null\n\
         chown {UID}:{GID} /srv/layer /srv/vmcache && chgrp -R {GID} /srv/root.flist /srv/store && chmod -R g+rX /srv/root.flist /srv/store\n\
         /jailer --id {ID} --exec /vmm --uid {UID} --gid {GID} --base /srv/jailer \
           --cgroup-memory 805306368 --cgroup-cpus 1.5 --cgroup-pids 128 --dev-kvm --proc \
           --ro /guest{libs} --ro /srv/root.flist --ro /srv/store --rw /srv/layer --rw /srv/vmcache:/var/cache/gridnode \
           -- --kernel /guest/vmlinux --initrd /guest/initrd --memory 128 \
           --fs tag=rootfs,image=/srv/root.flist,layer=/srv/layer --root rootfs --image-cache /var/cache/gridnode/chunks --store dir:///srv/store \
           -- /bin/sh -c 'cat /etc/version; echo from-jailed-guest > /etc/written; echo copied-up >> /etc/version; sleep 3; echo $((6*7))-jailed-done' \
           > /tmp/vm.out 2>&1 &\n\
         jp=$!\n\
         for i in $(seq 1 120); do grep -q image-v1 /tmp/vm.out && break; kill -0 $jp 2>/dev/null || break; sleep 1; done\n\
         cg=/sys/fs/cgroup/gridnode/{ID}\n\
         echo \"memory.max=$(cat $cg/memory.max) cpu.max=$(cat $cg/cpu.max) pids.max=$(cat $cg/pids.max)\"\n\
         for p in $(cat $cg/cgroup.procs); do \
           [ -n \"$(readlink /proc/$p/exe)\" ] || {{ echo \"kernel-thread-in-cgroup=$(cat /proc/$p/comm)\"; continue; }}; \
           echo \"vmm-uid=$(awk '/^Uid:/{{print $2}}' /proc/$p/status) vmm-caps=$(awk '/^CapEff:/{{print $2}}' /proc/$p/status) \
                 vmm-nnp=$(awk '/^NoNewPrivs:/{{print $2}}' /proc/$p/status)\"; \
           echo \"vmm-netns-differs=$([ \"$(readlink /proc/$p/ns/net)\" != \"$(readlink /proc/self/ns/net)\" ] && echo yes)\"; \
           echo \"vmm-root-entries=$(ls /proc/$p/root | tr '\\n' ' ')\"; \
         done\n\
         wait $jp\n\
         echo jail-status=$?\n\
         cat /tmp/vm.out\n\
         grep -rl from-jailed-guest /srv/layer > /dev/null && echo layer-written\n\
         test -e /srv/jailer/{ID} && echo per-vm-dir-left\n\
         /jailer --id {ID} --exec /vmm --uid {UID} --gid {GID} --base /srv/jailer --dev-kvm --proc \
           --ro /guest{libs} --ro /srv/root.flist --ro /srv/store --rw /srv/layer --rw /srv/vmcache:/var/cache/gridnode \
           -- --kernel /guest/vmlinux --initrd /guest/initrd --memory 128 \
           --fs tag=rootfs,image=/srv/root.flist,layer=/srv/layer --root rootfs --image-cache /var/cache/gridnode/chunks --store dir:///srv/store \
           -- /bin/sh -c 'echo second-boot-reads-$(cat /etc/written)-$(tail -n 1 /etc/version)' > /tmp/vm2.out 2>&1\n\
         echo second-jail-status=$?\n\
         grep '^second-boot-reads' /tmp/vm2.out || {{ echo '--- the end of the second boot:'; tail -n 40 /tmp/vm2.out; }}\n\
         test -e $cg && echo cgroup-left\n\
         echo done\n"
    );
    let job = Job::new(script)
        .binary("/jailer", &jailer)
        .binary("/vmm", &vmm)
        .binary("/flist", &flist)
        .file("/guest/vmlinux", &kernel.vmlinux)
        .file("/guest/initrd", &initrd);
    let out = testbed.run(&job)?;
    eprintln!("--- job output ---\n{}", out.output);
    eprintln!("--- the test bed's console ---\n{}", out.console);
    let o = &out.output;
    for needle in [
        "memory.max=805306368 cpu.max=150000 100000 pids.max=128",
        "vmm-uid=1000",
        "vmm-caps=0000000000000000",
        "vmm-nnp=1",
        "vmm-netns-differs=yes",
        "\nimage-v1",
        "42-jailed-done",
        "\njail-status=0",
        "layer-written",
        "second-jail-status=0",
        "second-boot-reads-from-jailed-guest-copied-up",
        "\ndone",
    ] {
        // The job's whole output is printed above; the message keeps to what was missing
        // and the end of the output, so that a truncated log still shows both.
        assert!(
            o.contains(needle),
            "missing {needle:?}; the job's output ends:\n{}",
            last_lines(o, 50)
        );
    }
    let root = o
        .lines()
        .find_map(|l| l.strip_prefix("vmm-root-entries="))
        .unwrap_or_default();
    let mut root: Vec<&str> = root.split_whitespace().collect();
    root.sort();
    assert_eq!(
        root,
        ["dev", "guest", "lib", "lib64", "proc", "srv", "var", "vmm"],
        "{}",
        out.console
    );
    for absent in [
        "per-vm-dir-left",
        "cgroup-left",
        "no-cgroup2",
        "no node cache key",
    ] {
        assert!(
            !o.contains(absent),
            "{absent}; the job's output ends:\n{}",
            last_lines(o, 50)
        );
    }
    Ok(())
}

#[test]
fn the_jail_on_a_node_running_from_its_initramfs() -> Result<(), Error> {
    let test = "the_jail_on_a_node_running_from_its_initramfs";
    let Some(testbed) = skip_if_missing(test, e2e_tests::Testbed::from_system())? else {
        return Ok(());
    };
    let Some(jailer) = skip_if_missing(test, workspace_binary("jailer", "JAILER_BIN"))? else {
        return Ok(());
    };
    let probe = workspace_binary("jail-probe", "JAIL_PROBE_BIN")?;
    let libs: String = shared_libraries(&probe)?
        .iter()
        .map(|l| format!(" --ro {}", l.display()))
        .collect();
    let script = format!(
        "mount -t cgroup2 none /sys/fs/cgroup || echo no-cgroup2\n\
         mkdir -p /srv/ro /srv/rw && chown {UID}:{GID} /srv/rw\n\
         /jailer --id probe-1 --exec /jail-probe --uid {UID} --gid {GID} --base /srv/jailer \
           --cgroup-memory 67108864 --cgroup-cpus 0.5 --cgroup-pids 16 --dev-kvm{libs} \
           --ro /srv/ro --rw /srv/rw -- report --ro /srv/ro --rw /srv/rw --sleep 3 > /tmp/p.out 2>&1 &\n\
         jp=$!\n\
         for i in $(seq 1 60); do grep -q ready /tmp/p.out && break; kill -0 $jp 2>/dev/null || break; sleep 1; done\n\
         cg=/sys/fs/cgroup/gridnode/probe-1\n\
         echo \"memory.max=$(cat $cg/memory.max) cpu.max=$(cat $cg/cpu.max) pids.max=$(cat $cg/pids.max)\"\n\
         for p in $(cat $cg/cgroup.procs); do echo \"probe-cgroup=$(cat /proc/$p/cgroup)\"; done\n\
         wait $jp\n\
         echo jail-status=$?\n\
         cat /tmp/p.out\n\
         test -e /srv/jailer/probe-1 && echo per-vm-dir-left\n\
         test -e $cg && echo cgroup-left\n\
         echo done\n"
    );
    let job = Job::new(script)
        .binary("/jailer", &jailer)
        .binary("/jail-probe", &probe);
    let out = testbed.run(&job)?;
    eprintln!("--- job output ---\n{}", out.output);
    eprintln!("--- the test bed's console ---\n{}", out.console);
    let o = &out.output;
    for needle in [
        "memory.max=67108864 cpu.max=50000 100000 pids.max=16",
        "probe-cgroup=0::/gridnode/probe-1",
        "jail-status=0",
        "uid=1000,1000,1000",
        "caps=eff:0,prm:0,inh:0,bnd:0,amb:0",
        "no_new_privs=true",
        "pid=1",
        "ifaces=lo",
        "tcp 127.0.0.1:22=ENETUNREACH",
        "root_flags=ro,nosuid,nodev",
        "dev=kvm,null,urandom",
        "ro_write /srv/ro=EROFS",
        "rw_write /srv/rw=ok",
        "rw_mknod /srv/rw=EPERM",
        "\ndone",
    ] {
        assert!(
            o.contains(needle),
            "missing {needle:?}; the job's output ends:\n{}",
            last_lines(o, 50)
        );
    }
    for absent in [
        "per-vm-dir-left",
        "cgroup-left",
        "no-cgroup2",
        "jailer: error",
    ] {
        assert!(
            !o.contains(absent),
            "{absent}; the job's output ends:\n{}",
            last_lines(o, 50)
        );
    }
    Ok(())
}
