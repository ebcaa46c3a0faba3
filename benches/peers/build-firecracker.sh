#!/usr/bin/env bash
# Builds Firecracker (a peer for the boot benchmark) outside this repository, from its public
# repository, and prints the binary's path on its last line:
#   FIRECRACKER_BIN=$(bash benches/peers/build-firecracker.sh [SOURCE] [REV]) bash scripts/bench.sh boot
# SOURCE: a git URL or local clone (default https://github.com/firecracker-microvm/firecracker);
# REV: a tag or commit (default v1.9.1). The build is cached in
# ${GRIDNODE_CACHE:-~/.cache/gridnode}/peers/firecracker-<REV>; nothing enters this repo.
# Built with the installed stable toolchain (not the repo's pinned one), release profile.
# Its git dependency micro-http is cloned at the revision its Cargo.lock pins, from
# MICRO_HTTP_SOURCE (default its GitHub URL; a local clone where GitHub is out of reach).
set -euo pipefail
command -v cmake >/dev/null && command -v clang >/dev/null || { echo "build-firecracker: cmake and clang are needed (apt-get install cmake clang libclang-dev)" >&2; exit 1; }
source="${1:-https://github.com/firecracker-microvm/firecracker}"
rev="${2:-v1.9.1}"
cache="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/peers"
dir="$cache/firecracker-$rev"
bin="$dir/target/release/firecracker"
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
if [[ ! -d "$dir/.git" ]]; then
    rm -rf "$dir.tmp"
    git clone --quiet --no-checkout "$source" "$dir.tmp"
    git -C "$dir.tmp" checkout --quiet "$rev"
    mv "$dir.tmp" "$dir"
fi
cd "$dir"
# The lock file as released (an earlier patched build rewrites it).
git checkout --quiet -- Cargo.lock
micro_rev="$(grep -o 'micro-http#[0-9a-f]*' Cargo.lock | head -1 | cut -d'#' -f2 || true)"
micro_dir="$cache/micro-http-$micro_rev"
if [[ -n "$micro_rev" && ! -d "$micro_dir" ]]; then
    rm -rf "$micro_dir.tmp"
    git clone --quiet --no-checkout \
        "${MICRO_HTTP_SOURCE:-https://github.com/firecracker-microvm/micro-http}" "$micro_dir.tmp"
    git -C "$micro_dir.tmp" checkout --quiet "$micro_rev"
    mv "$micro_dir.tmp" "$micro_dir"
fi
patch=()
if [[ -n "$micro_rev" ]]; then
    patch=(--config "patch.'https://github.com/firecracker-microvm/micro-http'.micro_http.path='$micro_dir'")
fi
echo "build-firecracker: building $rev in $dir (about 10 minutes on 2 cores)" >&2
RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-stable}" CARGO_TARGET_DIR="$dir/target" \
    cargo build --release -p firecracker "${patch[@]}" >&2
echo "$bin"
