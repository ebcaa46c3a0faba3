#!/usr/bin/env bash
# Builds the vmm, the flist CLI and the benchmarks in release mode and runs one of them (on
# the test bed by default; pass --direct on a real KVM host):
#   bash scripts/bench.sh boot [--runs N]             boot time + VMM memory vs QEMU microvm
#     (and Firecracker with FIRECRACKER_BIN=PATH, another vmm build with VMM_BASELINE_BIN=PATH)
#   bash scripts/bench.sh fs [--runs N] [--file-mib M] [--workload read,layer] [--dirs D --files-per-dir F]
#                                     in-guest virtio-fs vs virtiofsd + QEMU (the vmm also
#     through the chunk fetcher; another vmm build with VMM_BASELINE_BIN=PATH); layer: writable
#     shares (the vmm's layer, fuse-backend-rs's overlay, virtiofsd on a copy)
#   bash scripts/bench.sh blk [--runs N] [--seconds S]  in-guest fio on virtio-blk vs QEMU microvm
#     (and another vmm build with --vmm-baseline PATH or VMM_BASELINE_BIN=PATH)
#   bash scripts/bench.sh vsock [--mib M] [--repeat N] vsock throughput + round trip vs QEMU vhost-vsock
#     and a unix socket
#   bash scripts/bench.sh net [--mib M] [--repeat N]   TCP through virtio-net (tap) vs QEMU
#     virtio-net with vhost=off and vhost=on
#   bash scripts/bench.sh privnet [--seconds S] [--repeat N]  iperf3 and ping over a private
#     network: VM to VM across two nodes (WireGuard), on one node, and the namespaces alone
#   bash scripts/bench.sh agent [--deploys N] [--vms N] [--density N]
#                                     the node image: boot to registered, deploy latency and its
#                                     parts, agent/vmm memory with N VMs, VMs held until refused
#   bash scripts/bench.sh flist [pack|dedup|read|fetcher|all] [--mb N]   flist-fs pack, dedup, reads
#   RFS_BIN=$(bash benches/peers/build-rfs.sh) bash scripts/bench.sh flist mount [--mb N] [--reads N] [--runs N]
#                                     4 KiB random reads through FUSE mounts, cold and warm, vs rfs
#   VMM_BASELINE_BIN=PATH bash scripts/bench.sh before-after [--boot-runs N] [--fs-runs N] [--boot-case C] [--block-kib K]
#                                                     boot and fs with this vmm and PATH, one run
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-boot}"
case "$which" in
    boot | fs | blk | vsock | net | privnet | agent) shift || true ;;
    before-after) shift || true; which=before_after ;;
    flist) shift || true; which=flist_bench ;;
    -*) which=boot ;;
    *) echo "bench: unknown benchmark $which (boot, fs, blk, vsock, net, privnet, agent, flist or before-after)" >&2; exit 2 ;;
esac
bash scripts/setup.sh --bench
bash guest-kernels/build-kernel.sh >/dev/null
cargo build --release -p vmm -p flist-fs -p node-agent -p benches --bins
# The vmm measured is the shipped one (static-pie, scripts/build-vmm.sh); the benchmarks take
# it from VMM_BIN.
VMM_BIN="$(bash scripts/build-vmm.sh | tail -n1)"
export VMM_BIN
"${CARGO_TARGET_DIR:-target}"/release/"$which" "$@"
