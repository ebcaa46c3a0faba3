#!/usr/bin/env bash
# Runs the whole test suite: builds the guest artifacts first (the guest kernel is cached
# outside the repo, keyed by its inputs), then every crate's tests, including the end-to-end
# tests that boot Linux guests on the QEMU test bed and the flist-fs tests against real
# servers (redis-server, Garage, an HTTP server, FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export FLIST_GARAGE_BIN="${FLIST_GARAGE_BIN:-${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/tools/garage-2.5.0/bin/garage}"
bash guest-kernels/build-kernel.sh >/dev/null
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
