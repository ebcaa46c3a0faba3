#!/usr/bin/env bash
# Builds the vmm as shipped and benchmarked: release, static-pie (glibc linked in,
# position-independent for ASLR, no dynamic loader or shared libraries mapped: issue 9, a
# vmm's memory overhead is mostly its code's resident pages), functions laid out by
# vmm/link/symbol-order.txt (vmm/build.rs). Prints the binary's path on the last line of
# stdout; cargo's output goes to stderr.
#
#   scripts/build-vmm.sh               -> ${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/vmm
#   scripts/build-vmm.sh --profiling   -> ${CARGO_TARGET_DIR:-target}/vmm-profiling/x86_64-unknown-linux-gnu/release/vmm
#       the same build without seccomp filters (--cfg vmm_profiling), for valgrind runs in
#       scripts/vmm-symbol-order.py; same symbol names as the shipped build. Never ship it.
#
# The explicit --target keeps RUSTFLAGS (+crt-static) away from build scripts and proc-macros,
# which must stay dynamic; plain `cargo build -p vmm` still makes a dynamic PIE (tests use
# whichever VMM_BIN names). The static build compiles the vmm's dependencies a second time.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ws="$(cd "$here/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$ws/target}"
triple=x86_64-unknown-linux-gnu
[[ "$(uname -m)" == x86_64 ]] || { echo "build-vmm: only x86_64 hosts" >&2; exit 1; }
flags="-C target-feature=+crt-static"
case "${1:-}" in
    "") ;;
    --profiling)
        flags="$flags --cfg vmm_profiling"
        target_dir="$target_dir/vmm-profiling"
        ;;
    *) echo "usage: $0 [--profiling]" >&2; exit 2 ;;
esac
(cd "$ws" && unset CARGO_ENCODED_RUSTFLAGS && RUSTFLAGS="$flags" cargo build --release -p vmm --bin vmm \
    --target "$triple" --target-dir "$target_dir" >&2)
bin="$target_dir/$triple/release/vmm"
if ! ldd "$bin" 2>&1 | grep -q 'statically linked'; then
    echo "build-vmm: $bin is not static" >&2
    exit 1
fi
echo "$bin"
