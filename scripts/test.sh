#!/usr/bin/env bash
# Runs the whole test suite: builds the guest artifacts first (the guest kernel is cached
# outside the repo, keyed by its inputs), then every crate's tests, including the end-to-end
# tests that boot Linux guests on the QEMU test bed and the flist-fs tests against real
# servers (redis-server, Garage, an HTTP server, FUSE) and pjdfstest + fsx on a writable layer.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
tools="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/tools"
export FLIST_GARAGE_BIN="${FLIST_GARAGE_BIN:-$tools/garage-2.5.0/bin/garage}"
export PJDFSTEST_BIN="${PJDFSTEST_BIN:-$tools/pjdfstest-0.2.2/bin/pjdfstest}"
export FSX_BIN="${FSX_BIN:-$tools/fsx-0.3.2/bin/fsx}"
# The TF Chain tests (node-agent/tests/tfchain.rs) run the real chain from ../shared/tfchain;
# here a missing chain is a failure, not a skip.
export GRIDNODE_REQUIRE_TFCHAIN=1
bash guest-kernels/build-kernel.sh >/dev/null
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
# A short run of every fuzz target (fuzz/): any crash fails the test run.
bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
