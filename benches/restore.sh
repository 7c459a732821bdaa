#!/usr/bin/env bash
# Restore benchmark: for a 256 MiB and a 1 GiB guest (release build), a cold boot to the
# guest agent answering, a snapshot of that guest, then RUNS restores of it (`vmm --restore`),
# each timed from spawning the VMM to its API answering (the restore itself) and to the
# guest agent answering a ping (a running guest); medians and the boot/restore ratio, in one
# run. The measurement is tests/tests/restore_bench.rs.
#
# Usage: benches/restore.sh [RUNS (default 5)]   env: RESTORE_MEMORY (default 256M,1G)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
guest_image
cargo build --release --locked -q -p vmm
export VMM_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vmm"
RESTORE_RUNS=${1:-5} cargo test --release --locked -q -p vmm-tests --test restore_bench -- \
    --ignored --nocapture 2>&1 | grep -E '^restore-bench:|test result|panicked|error'
