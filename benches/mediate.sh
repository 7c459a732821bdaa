#!/usr/bin/env bash
# Mediator benchmark: guest `dd` (direct I/O, 4 KiB and 128 KiB blocks) to three vfsim VFs
# in one guest: (a) no mediator, notify page mapped; (b) virtio-blk-vf idle; (c)
# virtio-blk-vf while saving (doorbells trapped, dirty tracking on); (d) doorbells trapped by
# trace, no tracking. Prints MB/s, time relative to (a) and KVM exits per request.
#
# Usage: benches/mediate.sh   env: MEDIATE_BENCH_MIB (per dd, default 8), MEDIATE_BENCH_REPS (3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
guest_image
cargo build --release --locked -q -p vmm -p vfsim
export VMM_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vmm"
cargo test --release --locked -q -p vmm-tests --test mediate_bench -- --ignored --nocapture 2>&1 | grep -E '^mediate:|test result|panicked|error'
