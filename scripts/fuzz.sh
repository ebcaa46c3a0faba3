#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz on nightly) for SECONDS each (default 600), one
# after another on one core, and prints executions, executions/s, coverage and crashes per
# target. Exits non-zero when a target crashes (a panic, a failed invariant, an ASan report, a
# timeout or going past the memory limits); the reproducer is kept in the artifacts directory.
#
#   bash scripts/fuzz.sh [SECONDS]
#
# Corpora are kept outside the repo, in $GRIDNODE_CACHE/fuzz-corpus/<target> (seeded from
# fuzz/seeds/<target>), artifacts in $GRIDNODE_CACHE/fuzz-artifacts/<target>.
# FUZZ_TARGETS="a b" runs only those; FUZZ_TARGET_DIR is the cargo target directory of the
# fuzz build (default $GRIDNODE_CACHE/fuzz-target); cargo-fuzz comes from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-600}"
cache="${GRIDNODE_CACHE:-$HOME/.cache/gridnode}"
cargo_fuzz_version=0.13.2
export PATH="$cache/tools/cargo-fuzz-$cargo_fuzz_version/bin:$PATH"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$cache/fuzz-target}"
targets=(${FUZZ_TARGETS:-mmio_transport virtio_fs_requests flist_meta chunk_decode api_request})

command -v cargo-fuzz >/dev/null || {
    echo "fuzz: cargo-fuzz $cargo_fuzz_version missing (run scripts/setup.sh)" >&2
    exit 1
}
cargo +nightly --version >/dev/null 2>&1 || {
    echo "fuzz: a nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 1
}

# AddressSanitizer build, or none where ASan does not build.
sanitizer=address
if ! (cd fuzz && cargo +nightly fuzz build -O -s address >&2); then
    echo "fuzz: the ASan build failed, building without a sanitizer" >&2
    sanitizer=none
    (cd fuzz && cargo +nightly fuzz build -O -s none >&2)
fi

# Per-target libFuzzer options. chunk_decode: no single allocation may approach what an
# unbounded zstd bomb would take (the decoder allocates at most the claimed 16 MiB).
extra_args() {
    case "$1" in
        chunk_decode) echo "-malloc_limit_mb=64" ;;
        *) ;;
    esac
}

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus="$cache/fuzz-corpus/$t"
    artifacts="$cache/fuzz-artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [[ -d fuzz/seeds/$t ]] && seeds=("$PWD/fuzz/seeds/$t")
    log="$artifacts/last-run.log"
    echo "fuzz: $t for ${secs}s ($sanitizer)" >&2
    rc=0
    # shellcheck disable=SC2046 # extra_args is split on purpose
    (cd fuzz && cargo +nightly fuzz run -O -s "$sanitizer" "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" $(extra_args "$t")) >"$log" 2>&1 || rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
    if ((rc != 0)); then
        failed+=("$t")
        crash=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -1 || true)
        echo "fuzz: $t FAILED (exit $rc): ${crash:-see $log}" >&2
        grep -m5 -E "panicked at|ERROR: |SUMMARY" "$log" >&2 || true
    fi
    summary+=("$(printf '%-20s execs %-10s exec/s %-7s %-22s crashes %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-cov ?}" "$((rc != 0))")")
done
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "fuzz: crashes in ${failed[*]} (reproducers in $cache/fuzz-artifacts)" >&2
    exit 1
fi
