#!/usr/bin/env bash
# Runs the whole test suite: builds the guest artifacts first (the guest kernel is cached
# outside the repo, keyed by its inputs), then every crate's tests, including the end-to-end
# tests that boot Linux guests on the QEMU test bed.
set -euo pipefail
cd "$(dirname "$0")/.."

bash guest-kernels/build-kernel.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
