#!/usr/bin/env bash
# Builds the micro-VM guest kernel (vmlinux with the PVH note, and bzImage) from Debian's
# linux-source-6.12 and guest-kernels/config/microvm.config, reproducibly, into a cache dir
# outside the repository:
#   ${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/kernels/<key>/{vmlinux,bzImage,config}
# key = sha256 of (the config fragment, this script, the linux-source-6.12 package version).
# A cached build is reused at once. The last line of stdout is the output directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/config/microvm.config"
script="$here/$(basename "${BASH_SOURCE[0]}")"
src_pkg="linux-source-6.12"
src_tar="/usr/src/linux-source-6.12.tar.xz"

die() { echo "build-kernel: error: $*" >&2; exit 1; }
log() { echo "build-kernel: $*" >&2; }

[[ -f "$fragment" ]] || die "config fragment $fragment is missing"
pkg_version="$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null || true)"
if [[ -z "$pkg_version" || ! -f "$src_tar" ]]; then
    die "kernel source $src_tar not found: install it with 'apt-get install $src_pkg'"
fi
for tool in make gcc flex bison bc xz readelf sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt packages: build-essential flex bison bc xz-utils binutils)"
done

key="$( { cat "$fragment"; cat "$script"; echo "$src_pkg=$pkg_version"; } | sha256sum | cut -d' ' -f1)"
kernels="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/kernels"
out="$kernels/$key"
if [[ -f "$out/vmlinux" && -f "$out/bzImage" ]]; then
    echo "$out"
    exit 0
fi

mkdir -p "$kernels"
work="$(mktemp -d "$kernels/.build-$key.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="$work/src"
mkdir -p "$src"

log "extracting $src_tar ($src_pkg $pkg_version) into $work"
tar -xJf "$src_tar" -C "$src" --strip-components=1

export ARCH=x86_64
export KBUILD_BUILD_TIMESTAMP="1970-01-01 00:00:00 UTC"
export KBUILD_BUILD_USER="gridnode"
export KBUILD_BUILD_HOST="gridnode"
export KBUILD_BUILD_VERSION="1"
export SOURCE_DATE_EPOCH=0
cd "$src"

log "configuring: tinyconfig + $(basename "$fragment")"
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$fragment" >&2
make -s olddefconfig >&2

# Every option the fragment sets must have survived olddefconfig (a missing dependency
# silently drops an option otherwise).
missing=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF "$line" .config || missing+=("$line")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        if grep -qE "^${BASH_REMATCH[1]}=" .config; then missing+=("$line"); fi
    fi
done < "$fragment"
if (( ${#missing[@]} > 0 )); then
    die "these options of $fragment did not survive olddefconfig (missing dependency?): ${missing[*]}"
fi

log "building vmlinux and bzImage with -j$(nproc)"
make -j"$(nproc)" vmlinux bzImage >&2

# The VMM uses the PVH entry when vmlinux carries XEN_ELFNOTE_PHYS32_ENTRY (owner "Xen", type 18).
notes="$(readelf -n vmlinux)"
if ! grep -E '^\s+Xen\s' <<<"$notes" | grep -E '0x00000012|PHYS32_ENTRY' >/dev/null; then
    die "vmlinux has no Xen PHYS32_ENTRY (PVH) ELF note; is CONFIG_PVH=y effective?"
fi

staged="$work/out"
mkdir -p "$staged"
cp vmlinux "$staged/vmlinux"
cp arch/x86/boot/bzImage "$staged/bzImage"
cp .config "$staged/config"
# Atomic publish: rename the finished directory into place; if a concurrent build won, keep it.
if ! mv -T "$staged" "$out" 2>/dev/null; then
    [[ -f "$out/vmlinux" && -f "$out/bzImage" ]] || die "could not move the build into $out"
fi
log "done; removing the build tree"
cd /
rm -rf "$work"
echo "$out"
