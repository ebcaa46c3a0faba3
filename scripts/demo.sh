#!/usr/bin/env bash
# The main job: install what is needed, build the guest kernel (cached), the vmm, the node agent
# and the node image, boot the node image (its PID 1 is the agent) under QEMU with nested SVM,
# register a twin, deploy a signed workload whose root is an flist, and print its output read
# through the agent's API. Arguments, if any, are the workload's command; --direct first runs
# the agent as a process on this host's /dev/kvm (a real KVM host) instead of booting the node
# image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash guest-kernels/build-kernel.sh >/dev/null
cargo build --release -p vmm -p flist-fs -p node-agent -p e2e-tests --bins
VMM_BIN="$PWD/target/release/vmm" target/release/demo "$@"
