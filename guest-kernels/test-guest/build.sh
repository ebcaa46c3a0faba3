#!/usr/bin/env bash
# Builds every test-guest variant as a static ELF64 linked at 1 MiB:
#   OUTDIR/test-guest-<variant>   for variant in exit0 exit42 reboot triplefault chatter idle pvh
# Usage: build.sh OUTDIR. The last line of stdout is OUTDIR (absolute).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
command -v gcc >/dev/null || { echo "build.sh: error: gcc not found (apt package build-essential)" >&2; exit 1; }
mkdir -p "$1"
out="$(cd "$1" && pwd)"

flags=(-nostdlib -static -no-pie -Wl,--build-id=none -Wl,-T,"$here/test-guest.ld")
if ld --help 2>/dev/null | grep -- --no-warn-rwx-segments >/dev/null; then
    flags+=(-Wl,--no-warn-rwx-segments)
fi
for variant in exit0 exit42 reboot triplefault chatter idle pvh; do
    gcc "${flags[@]}" -DVARIANT_"$variant" -o "$out/test-guest-$variant.tmp" "$here/test-guest.S"
    mv "$out/test-guest-$variant.tmp" "$out/test-guest-$variant"
done
echo "$out"
