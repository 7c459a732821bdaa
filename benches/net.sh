#!/usr/bin/env bash
# NIC VF benchmark: guest TCP through vfsim's virtio-net VF behind the virtio-net-vf
# mediator (its tap in a network namespace, the peer at the tap's host end), each direction
# for NET_BENCH_SECS: (a) doorbells mapped, (b) while saving (dirty tracking on: doorbells
# trapped, rings walked), (c) doorbells trapped (mmap=off), side by side in one run; prints
# KB/s, the ratio to (a) and KVM exits per frame. Then the traffic gap of a live migration
# of a 256 MiB guest streaming both ways as fast as it can, over the two-host LAN, on the
# mediated and the native vfio-user path (the peer's longest gap between two reads, on the
# host clock, and the migration's downtime).
#
# Usage: benches/net.sh   env: NET_BENCH_SECS (per stream, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
ensure_debs iproute2
out=$(bash tests/guest/build.sh --kernel 6.1)
export VMM_TEST_VMLINUX=$(printf '%s\n' "$out" | sed -n 's/^VMLINUX=//p')
export VMM_TEST_INITRAMFS=$(printf '%s\n' "$out" | sed -n 's/^INITRAMFS=//p')
cargo build --release --locked -q -p vmm -p vfsim
export VMM_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vmm"
cargo test --release --locked -q -p vmm-tests --test net_bench -- --ignored --nocapture --test-threads=1 2>&1 |
    grep -E '^net:|test result|panicked|error'
