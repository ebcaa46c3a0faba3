#!/usr/bin/env bash
# Installs every system package the build, the tests and the benchmarks need on a fresh
# Debian 12 machine (idempotent; needs root). Rust comes from the machine's toolchain.
set -euo pipefail

packages=(
    # guest kernel build (linux-source-6.12 is the guest kernel source)
    linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev xz-utils cpio kmod
    # the test bed: a KVM host kernel booted under QEMU's software CPU with nested SVM
    qemu-system-x86 linux-image-cloud-amd64 busybox-static
    # flist-fs: real servers and FUSE
    redis-server fuse3 libfuse3-dev pkg-config python3
    # seccomp filters, privilege drop in tests
    libseccomp-dev util-linux
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

# Garage (S3 server for the flist-fs store tests), built from crates.io once and cached outside
# the repo, keyed by its version (about 8 minutes on 2 cores the first time).
garage_version=2.5.0
garage_root="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/tools/garage-$garage_version"
if [[ ! -x "$garage_root/bin/garage" ]]; then
    echo "setup: building garage $garage_version (cached in $garage_root)" >&2
    CARGO_TARGET_DIR="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/tools/garage-build" \
        cargo install garage --locked --version "$garage_version" --root "$garage_root"
fi
