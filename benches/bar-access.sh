#!/usr/bin/env bash
# BAR access benchmark: from guest user space (mmap of the VF's sysfs resource0), the cost of
# a 32-bit write to a BAR page mapped into the guest (a KVM memslot), to a trapped BAR page
# (an MMIO exit to the VMM, forwarded to vfsim over vfio-user) and to guest RAM, in one run;
# per-access cost, the ratios, and the VMM's own share of a trapped write.
#
# Usage: benches/bar-access.sh   env: BAR_MAPPED_WRITES, BAR_TRAPPED_WRITES
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
guest_image
cargo build --release --locked -q -p vmm -p vfsim
export VMM_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vmm"
cargo test --release --locked -q -p vmm-tests --test bar_access -- --ignored --nocapture 2>&1 | grep -E '^bar-access:|test result|panicked|error'
