#!/usr/bin/env bash
# Builds guest-init (PID 1 of Linux guests), or the workspace package named by the first
# argument (a program that runs inside guests, e.g. guest-fsbench), as a static x86_64 binary. Uses
# $CARGO_TARGET_DIR when set. The last line of stdout is the path of the binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
workspace="$(cd "$here/.." && pwd)"
package="${1:-guest-init}"
target="x86_64-unknown-linux-gnu"
target_dir="${CARGO_TARGET_DIR:-$workspace/target}"

command -v cargo >/dev/null || { echo "build-init: error: cargo not found" >&2; exit 1; }
cd "$workspace"
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release -p "$package" --target "$target" --target-dir "$target_dir" >&2

bin="$target_dir/$target/release/$package"
if ! file "$bin" 2>/dev/null | grep -q 'statically linked\|static-pie linked'; then
    if command -v file >/dev/null; then
        echo "build-init: error: $bin is not statically linked" >&2
        exit 1
    fi
fi
echo "$bin"
