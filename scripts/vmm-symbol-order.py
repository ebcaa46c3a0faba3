#!/usr/bin/env python3
"""Writes vmm/link/symbol-order.txt (see vmm/build.rs) from callgrind profiles of a vmm.

usage: vmm-symbol-order.py VMM_BINARY CALLGRIND_OUT... > vmm/link/symbol-order.txt

VMM_BINARY: a release vmm built as usual (`cargo build --release -p vmm`, non-PIE through
vmm/build.rs, so callgrind's addresses are the binary's), with VMM_NO_SYMBOL_ORDER=1 and with
`seccomp::apply_to_current_thread` ignoring apply_filter's error for the profiling run only
(valgrind does not implement seccomp(2)). CALLGRIND_OUT: profiles taken with
`valgrind --tool=callgrind --dump-instr=yes` and dumped with `callgrind_control -d PID` while
the guest runs: the test guest idling, the chatter guest, and one boot with --drive, --rng,
--vsock and --fs. Functions are listed in the order the profiles first ran them.
"""
import bisect
import subprocess
import sys


def symbols(binary):
    out = subprocess.run(
        ["nm", "-n", "-S", "--defined-only", binary], capture_output=True, text=True, check=True
    ).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tTWi":
            syms.append((int(parts[0], 16), int(parts[1], 16), parts[3]))
    return syms


def addresses(profile):
    """Instruction addresses of a callgrind profile (positions: instr line)."""
    last = 0
    for line in open(profile):
        if not line or line[0] not in "0123456789+-*":
            continue
        tok = line.split()[0]
        if tok.startswith("0x"):
            last = int(tok, 16)
        elif tok.startswith("+"):
            last += int(tok[1:], 0)
        elif tok.startswith("-"):
            last -= int(tok[1:], 0)
        elif tok != "*":
            try:
                last = int(tok, 0)
            except ValueError:
                continue
        yield last


def main():
    syms = symbols(sys.argv[1])
    starts = [s[0] for s in syms]
    seen = set()
    for profile in sys.argv[2:]:
        for addr in addresses(profile):
            i = bisect.bisect_right(starts, addr) - 1
            if i < 0:
                continue
            start, size, name = syms[i]
            if start <= addr < start + max(size, 1) and name not in seen:
                seen.add(name)
                print(name)


main()
