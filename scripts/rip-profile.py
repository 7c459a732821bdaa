#!/usr/bin/env python3
"""Where a guest spends its time: a histogram of the vCPU instruction pointers that
`VMM_SAMPLE_RIP_MS=N vmm ...` logs ("sample vCPU i: rip 0x..."), resolved to kernel symbols.

Usage: scripts/rip-profile.py VMLINUX VMM_STDERR_LOG [TOP]
"""
import bisect
import collections
import re
import subprocess
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    vmlinux, log = sys.argv[1], sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    syms = []
    for line in subprocess.run(["nm", "-n", vmlinux], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), parts[2]))
    addrs = [a for a, _ in syms]
    hist = collections.Counter()
    total = 0
    for line in open(log, errors="replace"):
        m = re.search(r"sample vCPU (\d+): rip (0x[0-9a-f]+) .*cr0 (0x[0-9a-f]+)", line)
        if not m:
            continue
        rip = int(m.group(2), 16)
        total += 1
        if rip < 0xffff_0000_0000_0000:
            hist["<user space or real mode>"] += 1
            continue
        i = bisect.bisect_right(addrs, rip) - 1
        hist[syms[i][1] if i >= 0 else hex(rip)] += 1
    print(f"{total} samples")
    for name, n in hist.most_common(top):
        print(f"{100.0 * n / total:5.1f}%  {n:5d}  {name}")


if __name__ == "__main__":
    main()
