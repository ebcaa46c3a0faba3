#!/usr/bin/env bash
# The main job: install what is needed, build the guest kernel (cached), the guest init and the
# vmm, then boot a micro-VM that runs a command and prints its output. Arguments, if any, are
# the command; --direct first runs the vmm on this host's /dev/kvm (a real KVM host) instead of
# on the test bed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash guest-kernels/build-kernel.sh >/dev/null
cargo build --release -p vmm -p flist-fs -p node-agent -p e2e-tests --bins
VMM_BIN="$PWD/target/release/vmm" target/release/demo "$@"
