#!/usr/bin/env bash
# Builds a Unikraft "Hello world!" unikernel for Unikraft's Firecracker platform (plat-kvm with
# the Firecracker VMM option: an ELF with the Linux 64-bit boot entry, console on COM1, exit
# through the i8042 reset line), outside this repository, with plain `make` (no kraftkit, no
# network): the e2e test tests/tests/unikernel.rs boots it with the vmm unchanged.
#
#   bash guest-kernels/unikernel/build-unikraft.sh [UNIKRAFT_SOURCE] [APP_SOURCE]
#
# UNIKRAFT_SOURCE, APP_SOURCE: git URLs or local clones (bare ones too) of Unikraft and of its
# helloworld application (defaults: their public repositories). Revisions: UNIKRAFT_REV and
# APP_REV (defaults below: the ones this was tested with). The configuration is the
# application's own `defconfigs/fc-x86_64` with one line added: no libukrandom, whose start
# needs RDSEED, which the test bed's CPU (QEMU's software CPU) lacks. Unikraft then ends its
# boot as a crash before main (on real hosts, and under Firecracker there, it has RDSEED).
# Two images are built: `helloworld` (the application as published) and `crash` (the same
# configuration, its main replaced by one that prints a line and then executes an undefined
# instruction, so Unikraft's trap handler crashes the unikernel: the e2e test checks that
# this does not look like a clean exit).
# Output: ${GRIDNODE_CACHE:-~/.cache/gridnode}/unikernels/unikraft-fc-<key>/{helloworld,crash},
# key = sha256 of (the revisions, this script, the gcc version); a cached build is reused at
# once. The last line of stdout is that directory.
# Needs: git, make, gcc, python3 (Unikraft's kconfiglib), flex, bison (Debian packages only).
# Exit status 3: a source could not be had (so callers can tell "sources missing" from a
# failed build).
set -euo pipefail

unikraft_source="${1:-https://github.com/unikraft/unikraft}"
app_source="${2:-https://github.com/unikraft/app-helloworld}"
unikraft_rev="${UNIKRAFT_REV:-eaf6fda1d420ee079b3b612f0130ea2761cf1c56}"
app_rev="${APP_REV:-1add85d53193c5cfc8d9285cbd6905a85ffcc309}"

die() { echo "build-unikraft: error: $*" >&2; exit 1; }
log() { echo "build-unikraft: $*" >&2; }

for tool in git make gcc python3 flex bison sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt packages: git build-essential python3 flex bison)"
done

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
key="$( { echo "unikraft=$unikraft_rev app=$app_rev"; cat "$script"; gcc --version | head -1; } | sha256sum | cut -c1-16)"
cache="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}/unikernels"
out="$cache/unikraft-fc-$key"
if [[ -f "$out/helloworld" && -f "$out/crash" ]]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/.build-$key.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# A checkout of `rev` from `source` into `dir` (git archive works from bare clones too).
checkout() { # source rev dir
    log "taking $2 from $1"
    if ! git clone --quiet --no-checkout "$1" "$3.git" >&2; then
        echo "build-unikraft: error: cannot clone $1 (pass a local clone as an argument)" >&2
        exit 3
    fi
    mkdir -p "$3"
    git -C "$3.git" archive --format=tar "$2" | tar -x -C "$3"
    rm -rf "$3.git"
}
checkout "$unikraft_source" "$unikraft_rev" "$work/unikraft"
checkout "$app_source" "$app_rev" "$work/app"

# Builds the application in `app` with its fc-x86_64 defconfig; the image is `build/<name>`.
build_app() { # app build
    local uk=(make -C "$work/unikraft" A="$1" L= O="$2")
    [[ -f "$1/defconfigs/fc-x86_64" ]] || die "the application has no defconfigs/fc-x86_64"
    log "configuring $1 with its defconfigs/fc-x86_64, without libukrandom"
    { cat "$1/defconfigs/fc-x86_64"; echo '# CONFIG_LIBUKRANDOM is not set'; } >"$2.defconfig"
    "${uk[@]}" UK_DEFCONFIG="$2.defconfig" defconfig >&2
    grep -qx 'CONFIG_KVM_VMM_FIRECRACKER=y' "$1/.config" \
        || die "the configuration lost CONFIG_KVM_VMM_FIRECRACKER"
    ! grep -qx 'CONFIG_LIBUKRANDOM=y' "$1/.config" || die "libukrandom is still selected"
    log "building $1 (about a minute on 2 cores)"
    "${uk[@]}" -j"${BUILD_JOBS:-2}" >&2
    [[ -f "$2/helloworld_fc-x86_64" ]] || die "the build made no $2/helloworld_fc-x86_64"
}

stage="$work/out"
mkdir -p "$stage"
build_app "$work/app" "$work/build"
cp "$work/build/helloworld_fc-x86_64" "$stage/helloworld"
cp "$work/app/.config" "$stage/config"

cp -r "$work/app" "$work/crash-app"
rm -f "$work/crash-app/.config"
cat >"$work/crash-app/main.c" <<'CRASH'
#include <stdio.h>

int main(int argc, char *argv[])
{
	(void)argc;
	(void)argv;
	printf("about to crash\n");
	__builtin_trap();
	return 0;
}
CRASH
build_app "$work/crash-app" "$work/crash-build"
cp "$work/crash-build/helloworld_fc-x86_64" "$stage/crash"

# Another build of the same key may have finished meanwhile: either result is the same.
rm -rf "$out"
mv "$stage" "$out" 2>/dev/null || [[ -f "$out/helloworld" && -f "$out/crash" ]]
echo "$out"
