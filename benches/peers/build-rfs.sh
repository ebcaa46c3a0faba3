#!/usr/bin/env bash
# Builds rfs (ThreeFold's flist tool, the peer of the flist read benchmark) outside this
# repository, from its public repository, and prints the binary's path on its last line:
#   RFS_BIN=$(bash benches/peers/build-rfs.sh [SOURCE] [REV]) ... flist_bench rfs
# SOURCE: a git URL or local clone (default https://github.com/threefoldtech/rfs); REV: a tag
# or commit (default v2.0.0: the first release that packs, with dir:// and zdb:// stores; the
# mount's read path (src/fs, src/cache, the block store) is the same up to the newest commit,
# whose added web server and vendored OpenSSL do not touch mount reads). The build is cached in
# ${GRIDNODE_CACHE:-~/.cache/gridnode}/peers/rfs-<REV>; nothing enters this repo. Built with
# the installed stable toolchain, rfs's own release profile (LTO, one codegen unit).
# Its git dependencies (polyfuse, tokio-worker-pool) are cloned at the revisions its Cargo.lock
# pins, from POLYFUSE_SOURCE and WORKERS_SOURCE (default their GitHub URLs; local clones where
# GitHub is out of reach), and patched in by path.
set -euo pipefail
source="${1:-https://github.com/threefoldtech/rfs}"
rev="${2:-v2.0.0}"
cache="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/peers"
dir="$cache/rfs-$rev"
bin="$dir/target/release/rfs"
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
clone() { # URL REV DIR
    if [[ ! -d "$3/.git" ]]; then
        rm -rf "$3.tmp"
        git clone --quiet --no-checkout "$1" "$3.tmp"
        git -C "$3.tmp" checkout --quiet "$2"
        mv "$3.tmp" "$3"
    fi
}
clone "$source" "$rev" "$dir"
cd "$dir"
git checkout --quiet -- Cargo.lock
locked() { grep -o "$1[^\"]*#[0-9a-f]*" Cargo.lock | head -1 | cut -d'#' -f2; }
poly_rev="$(locked 'muhamadazmy/polyfuse')"
workers_rev="$(locked 'threefoldtech/tokio-worker-pool')"
poly_dir="$cache/polyfuse-$poly_rev"
workers_dir="$cache/tokio-worker-pool-$workers_rev"
clone "${POLYFUSE_SOURCE:-https://github.com/muhamadazmy/polyfuse}" "$poly_rev" "$poly_dir"
clone "${WORKERS_SOURCE:-https://github.com/threefoldtech/tokio-worker-pool}" "$workers_rev" "$workers_dir"
patches=(
    --config "patch.'https://github.com/muhamadazmy/polyfuse'.polyfuse.path='$poly_dir/crates/polyfuse'"
    --config "patch.'https://github.com/muhamadazmy/polyfuse'.polyfuse-kernel.path='$poly_dir/crates/polyfuse-kernel'"
    --config "patch.'https://github.com/threefoldtech/tokio-worker-pool.git'.workers.path='$workers_dir'"
)
export RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-stable}" CARGO_TARGET_DIR="$dir/target"
# The one change to the lock file: time 0.3.29 does not compile with Rust 1.80 and later.
cargo update --quiet "${patches[@]}" -p time --precise 0.3.36 >&2
echo "build-rfs: building $rev in $dir (about 10 minutes on 2 cores)" >&2
# Lints that newer compilers deny (never-type fallback in its zdb store) only warn.
RUSTFLAGS="--cap-lints=warn" cargo build --release --features build-binary --bin rfs "${patches[@]}" >&2
echo "$bin"
