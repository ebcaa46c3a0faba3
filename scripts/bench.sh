#!/usr/bin/env bash
# Builds the vmm and the benchmarks in release mode and runs them (on the test bed by default;
# pass --direct on a real KVM host). Extra arguments go to the boot benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash guest-kernels/build-kernel.sh >/dev/null
cargo build --release -p vmm -p benches --bins
target/release/boot "$@"
