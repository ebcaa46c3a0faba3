#!/usr/bin/env bash
# Installs every system package the build, the tests and the benchmarks need on a fresh
# Debian 12 machine (idempotent; needs root). Rust comes from the machine's toolchain.
# `--bench` also builds what the benchmarks compare with (virtiofsd).
set -euo pipefail

packages=(
    # guest kernel build (linux-source-6.12 is the guest kernel source)
    linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev xz-utils cpio kmod
    # the test bed: a KVM host kernel booted under QEMU's software CPU with nested SVM
    qemu-system-x86 linux-image-cloud-amd64 busybox-static
    # flist-fs: real servers and FUSE
    redis-server nginx-light fuse3 libfuse3-dev pkg-config python3
    # seccomp filters, privilege drop in tests; setfattr/getfattr for the end-to-end tests
    libseccomp-dev util-linux attr
    # virtiofsd (benchmark peer) builds against libcap-ng
    libcap-ng-dev
    # virtio-blk: mkfs/fsck in the guest (e2e), fio in the guest (benchmark)
    e2fsprogs fio
    # virtio-net and private networks (benchmark): iperf3 and ping, in the guest and on the bed
    iperf3 iputils-ping
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The TF Chain tests run the real runtime under chopsticks (../shared/tfchain/start.sh), which
# needs node and npm to install itself (node 22 then comes from npm).
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "setup: installing nodejs npm" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends nodejs npm
fi

# Tools built from crates.io once and cached outside the repo, keyed by their versions:
# Garage (S3 server for the flist-fs store tests; about 8 minutes on 2 cores the first time),
# pjdfstest and fsx (filesystem conformance on a writable layer, run by the end-to-end tests),
# cargo-fuzz (the fuzz targets, scripts/fuzz.sh).
tools="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/tools"
cargo_tool() { # crate version binary
    local root="$tools/$1-$2"
    if [[ ! -x "$root/bin/$3" ]]; then
        echo "setup: building $1 $2 (cached in $root)" >&2
        CARGO_TARGET_DIR="$tools/$1-build" cargo install "$1" --locked --version "$2" --root "$root"
        rm -rf "$tools/$1-build"
    fi
}
cargo_tool garage 2.5.0 garage
cargo_tool pjdfstest 0.2.2 pjdfstest
cargo_tool fsx 0.3.2 fsx
# cargo-fuzz (scripts/fuzz.sh; the fuzz build itself needs a nightly toolchain).
cargo_tool cargo-fuzz 0.13.2 cargo-fuzz
if [[ "${1:-}" == --bench ]]; then
    cargo_tool virtiofsd 1.14.0 virtiofsd
fi
