#!/usr/bin/env python3
"""Writes vmm/link/symbol-order.txt (see vmm/build.rs): the functions a vmm runs, from
callgrind profiles of the shipped build (scripts/build-vmm.sh, static-pie).

usage: scripts/vmm-symbol-order.py [--kernel VMLINUX --initrd CPIO] > vmm/link/symbol-order.txt
       scripts/vmm-symbol-order.py --profiles VMM_BINARY CALLGRIND_OUT... > vmm/link/symbol-order.txt
       scripts/vmm-symbol-order.py --testbed VMM_BINARY BOOT_LOG... > NEW_ORDER

Needs /dev/kvm, valgrind (apt package valgrind) and gcc (the test guests). Run it after a
toolchain or dependency update: names carry hashes, and a stale list only costs memory (names
not in the binary are skipped by the linker), never correctness.

The first form builds the profiling vmm (`scripts/build-vmm.sh --profiling`: the shipped
build with `--cfg vmm_profiling`, which installs no seccomp filters because valgrind does not
implement seccomp(2); a compiler flag rather than a cargo feature, since a feature changes the
crate's metadata and so every symbol's hash, and the list must name the shipped build's
symbols) and runs it under `valgrind --tool=callgrind` on:
  - the exit0 test guest (start-up to exit),
  - the chatter test guest on the serial console, stopped by SIGTERM (graceful shutdown),
  - the idle test guest with --drive, --rng, --vsock, --fs and the control API (GET /vm,
    /metrics), stopped by SIGTERM,
  - with --kernel/--initrd, a Linux guest with the same devices (its drivers set the devices
    up; the guest's user space is not needed), stopped by SIGTERM after 20 s.
A Linux guest may stop early on a KVM that cannot emulate it (its drivers then set nothing up);
the list still gains the vmm's Linux boot path. Functions are listed in the order the profiles
name them, as the shipped build (scripts/build-vmm.sh, built too) names them. The second form
only lists the profiled names, from profiles taken with `--demangle=no`.

The third form adds what callgrind cannot see here: on this machine's /dev/kvm a Linux guest
never reaches user space, so the Linux boot above is cut short. On the test bed (a real KVM
host) run the shipped build, the one vmm/link/symbol-order.txt laid out, with
  VMM_BIN=VMM_BINARY cargo run --release -p benches --bin boot -- --text-pages \
      --runs 1 --case quiet --case devices > BOOT_LOG
(the bed's fault-around set to one page, so the resident pages of the binary are the pages it
touched, printed as `text-pages` lines). It prints the current list, then every function of
that binary that lies on a touched page and is not in the list, in address order. The first
form drops these names: run the third after it, on the build of its list.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WS = os.path.dirname(HERE)


def text_symbols(binary):
    out = subprocess.run(
        ["nm", "--defined-only", binary], capture_output=True, text=True, check=True
    ).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTWi":
            names.add(parts[2])
    return names


def profiled_functions(profile, exe_name):
    """Names of the functions of object `exe_name` (base name) that a callgrind profile
    (--demangle=no, compressed names) charges or calls, in the order it names them."""
    objects, functions = {}, {}
    ob = cob = None
    ref = re.compile(r"^\((\d+)\)(?: (.*))?$")

    def resolve(table, value):
        m = ref.match(value)
        if not m:
            return value
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1))

    for line in open(profile, errors="replace"):
        key, sep, value = line.rstrip("\n").partition("=")
        if not sep:
            continue
        if key == "ob":
            ob = resolve(objects, value)
        elif key == "cob":
            cob = resolve(objects, value)
        elif key in ("fn", "cfn"):
            name = resolve(functions, value)
            obj = ob if key == "fn" else (cob or ob)
            if key == "fn":
                cob = None
            if name and obj and os.path.basename(obj) == exe_name:
                yield name


def order(binary, profiles):
    known = text_symbols(binary)
    seen = set()
    for profile in profiles:
        for name in profiled_functions(profile, os.path.basename(binary)):
            if name in known and name not in seen:
                seen.add(name)
                yield name


def api_get(sock_path, path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(sock_path)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n".encode())
            while s.recv(65536):
                pass
    except OSError as e:
        print(f"vmm-symbol-order: GET {path}: {e}", file=sys.stderr)


def profile_run(vmm, args, out, seconds=None, api=None):
    """Runs the vmm under callgrind; stops it with SIGTERM after `seconds` (None: waits for
    its own exit). Returns the profile's path."""
    profile = f"{out}.cg"
    cmd = ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={profile}"]
    proc = subprocess.Popen(
        cmd + [vmm] + args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(f"{out}.log", "w"),
    )
    if seconds is not None:
        time.sleep(seconds)
        if api:
            api_get(api, "/vm")
            api_get(api, "/metrics")
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not os.path.exists(profile):
        sys.exit(f"vmm-symbol-order: no profile from {' '.join(args)} (see {out}.log)")
    print(f"vmm-symbol-order: {profile} (vmm exit {proc.returncode})", file=sys.stderr)
    return profile


PAGE = 4096
TEXT_PAGES = re.compile(r"boot-bench: text-pages [a-z]+: (.*)$")


def touched_pages(logs):
    """File page numbers of the `text-pages` lines of boot bench logs."""
    pages = set()
    for log in logs:
        for line in open(log, errors="replace"):
            m = TEXT_PAGES.search(line.rstrip("\n"))
            if not m:
                continue
            for item in m.group(1).split():
                first, _, last = item.partition("-")
                pages.update(range(int(first, 16), int(last or first, 16) + 1))
    if not pages:
        sys.exit(f"vmm-symbol-order: no text-pages lines in {' '.join(logs)}")
    return pages


def executable_segments(binary):
    """(file offset, virtual address, file size) of the binary's executable LOAD segments."""
    out = subprocess.run(
        ["readelf", "-lW", binary], capture_output=True, text=True, check=True
    ).stdout
    segments = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD" and "E" in parts[6:-1]:
            segments.append((int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)))
    return segments


def touched_functions(binary, pages, listed):
    """Names of the binary's functions that overlap a touched page past the functions
    `listed` (which the binary lays out first: a page there is touched by them or by a
    neighbour in their section), in address order."""
    ranges = []
    for page in pages:
        lo, hi = page * PAGE, (page + 1) * PAGE
        for offset, vaddr, size in executable_segments(binary):
            start, end = max(lo, offset), min(hi, offset + size)
            if start < end:
                ranges.append((start - offset + vaddr, end - offset + vaddr))
    ranges.sort()
    out = subprocess.run(
        ["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True
    ).stdout
    functions = []
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tTWi":
            functions.append((int(parts[0], 16), max(int(parts[1], 16), 1), parts[3]))
    functions.sort()
    listed_end = max((a + s for a, s, n in functions if n in listed), default=0)
    names, i = [], 0
    for addr, size, name in functions:
        if addr < listed_end:
            continue
        while i < len(ranges) and ranges[i][1] <= addr:
            i += 1
        if i < len(ranges) and ranges[i][0] < addr + size and name not in names:
            names.append(name)
    return names


def main():
    argv = sys.argv[1:]
    if argv and argv[0] == "--profiles":
        for name in order(argv[1], argv[2:]):
            print(name)
        return
    if len(argv) >= 3 and argv[0] == "--testbed":
        binary, logs = argv[1], argv[2:]
        listed = [line.strip() for line in open(os.path.join(WS, "vmm/link/symbol-order.txt"))]
        known = set(listed)
        added = [n for n in touched_functions(binary, touched_pages(logs), known) if n not in known]
        print(
            f"vmm-symbol-order: {len(added)} functions on touched pages added to the "
            f"{len(listed)} listed",
            file=sys.stderr,
        )
        for name in listed + added:
            print(name)
        return
    kernel = initrd = None
    while argv:
        if argv[0] == "--kernel" and len(argv) > 1:
            kernel, argv = argv[1], argv[2:]
        elif argv[0] == "--initrd" and len(argv) > 1:
            initrd, argv = argv[1], argv[2:]
        else:
            sys.exit(__doc__)
    vmm = subprocess.run(
        ["bash", os.path.join(HERE, "build-vmm.sh"), "--profiling"],
        stdout=subprocess.PIPE, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    work = tempfile.mkdtemp(prefix="vmm-symbol-order.")
    guests = os.path.join(work, "guests")
    subprocess.run(
        ["bash", os.path.join(WS, "guest-kernels/test-guest/build.sh"), guests],
        stdout=subprocess.DEVNULL, check=True,
    )
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    share = os.path.join(work, "share")
    os.mkdir(share)

    def devices(name):
        return [
            "--drive", f"id=disk,path={disk}", "--rng",
            "--vsock", f"cid=3,uds={work}/{name}.vsock",
            "--fs", f"tag=share,dir={share}",
            "--api-sock", f"{work}/{name}.api",
            "--exit-record", f"{work}/{name}.exit.json",
        ]

    guest = lambda v: ["--kernel", os.path.join(guests, f"test-guest-{v}"), "--memory", "256"]
    profiles = [
        profile_run(vmm, guest("exit0") + ["--serial", "stdout"], f"{work}/exit0"),
        profile_run(vmm, guest("chatter") + ["--serial", "stdout"], f"{work}/chatter", seconds=5),
        profile_run(vmm, guest("idle") + devices("idle"), f"{work}/idle-devices", seconds=8,
                    api=f"{work}/idle.api"),
    ]
    if kernel:
        args = ["--kernel", kernel, "--memory", "256", "--serial", "stdout"] + devices("linux")
        if initrd:
            args += ["--initrd", initrd]
        profiles.append(profile_run(vmm, args + ["--", "/bin/sh"], f"{work}/linux", seconds=20,
                                    api=f"{work}/linux.api"))
    names = list(order(vmm, profiles))
    shipped = subprocess.run(
        ["bash", os.path.join(HERE, "build-vmm.sh")], stdout=subprocess.PIPE, text=True, check=True
    ).stdout.strip().splitlines()[-1]
    listed = list(to_shipped(names, text_symbols(shipped)))
    print(
        f"vmm-symbol-order: {len(names)} functions run, {len(listed)} of them named in {shipped} "
        f"(others inlined there); profiles in {work}",
        file=sys.stderr,
    )
    for name in listed:
        print(name)


def to_shipped(names, shipped):
    """The profiled names as the shipped build spells them. Both builds have the same symbol
    hashes, but ThinLTO's suffix of promoted local symbols (`.llvm.N`, a hash of the module)
    differs where the profiling switch changed a module; the few functions that one build
    inlines and the other does not have no counterpart."""
    by_base = {}
    for name in shipped:
        by_base.setdefault(re.sub(r"\.llvm\.\d+$", "", name), []).append(name)
    for name in names:
        if name in shipped:
            yield name
            continue
        same = by_base.get(re.sub(r"\.llvm\.\d+$", "", name), [])
        if len(same) == 1:
            yield same[0]


main()
