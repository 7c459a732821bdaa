#!/usr/bin/env bash
# Live-migration benchmark: 512 MiB and 1 GiB guests, idle and under the agent's workload,
# migrated on this machine over TCP on loopback, with this VMM (the VF, vfsim with the
# virtio-blk-vf mediator, goes along; workload: memory writer capped at 16 MiB/s over 64 MiB,
# and a disk writer on the VF) and with QEMU (Debian qemu-system-x86; same kernel, initramfs,
# command line and memory, no VF, so the memory writer only), in one run. Both get the same
# downtime budget. Prints per migration: downtime (on the source until the last byte is sent,
# QEMU's definition, and for ours also until the guest runs there), total time, bytes sent,
# iterations (ours:
# pre-copy passes; QEMU: ram.dirty-sync-count), then the ours/QEMU ratios and whether the aims
# (idle downtime under 50 ms, and under QEMU's in every case) are met. Every migration is
# checked: the guest answers on the destination, and after the workload migration the
# agent's workload_verify finds no mismatch. Ours runs twice, over TCP ("vmm") and over
# mutual TLS ("tls", certificates made with openssl), and the TLS/TCP ratios of downtime
# and total time are printed.
#
# Usage: benches/migrate.sh
#   env: MIGRATE_BENCH_SIZES (default 512M,1G), MIGRATE_BENCH_DOWNTIME_MS (default 50),
#        MIGRATE_BENCH_QEMU_MAX_BW (QEMU's max-bandwidth in bytes/s; default 10000000000,
#        i.e. uncapped on loopback like this VMM; 0 keeps QEMU's default cap),
#        MIGRATE_BENCH_ONLY (vmm or qemu: run one side only),
#        MIGRATE_BENCH_TLS (off: ours over TCP only)
# The full output (per-iteration logs of our source, QEMU's query-migrate) is kept in
# $MIGRATE_BENCH_LOG (default target/migrate-bench.log).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
ensure_debs qemu-system-x86
guest_image
cargo build --release --locked -q -p vmm -p vfsim
export VMM_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vmm"
export MIGRATE_BENCH_QEMU_MAX_BW=${MIGRATE_BENCH_QEMU_MAX_BW:-10000000000}
log=${MIGRATE_BENCH_LOG:-$(realpath "${CARGO_TARGET_DIR:-target}")/migrate-bench.log}
echo "full log: $log" >&2
cargo test --release --locked -q -p vmm-tests --test migrate_bench -- --ignored --nocapture 2>&1 \
    | tee "$log" | grep -E --line-buffered '^migrate:|test result|panicked|error'
