#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, protocol tests and the guest tests (which
# boot the real guest under KVM). Installs what is missing and builds the guest image first
# (cached: the first build takes ~10 minutes, later runs seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
ensure_debs iproute2   # ip: network namespaces for the two-host tests (tests/tests/netns.rs)
step "guest image"
guest_image   # exports VMM_TEST_VMLINUX / VMM_TEST_INITRAMFS

step "third-party vfio-user servers"
peers   # exports VMM_PEER_* (tests/peers/build.sh: libvfio-user samples, QEMU's server)

step "format"
cargo fmt --all --check
step "clippy"
cargo clippy --workspace --all-targets --locked -q -- -D warnings
step "build"
cargo build --workspace --locked -q
export VMM_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/debug/vmm"

step "tests"
# Everything but vmm-tests' integration tests, one test at a time.
cargo test --workspace --locked --exclude vmm-tests -- --test-threads=1
cargo test -p vmm-tests --locked --lib --bins -- --test-threads=1
cargo test -p vmm-tests --locked --doc
step "guest tests"
# vmm-tests' integration tests start real guests (most restore a golden snapshot; a boot
# is 80-100 s of emulated kernel work here): two lanes at once, one guest test at a time
# in each, so at most two guests share the machine's two cores (scripts/lib/lanes.sh).
. scripts/lib/lanes.sh
run_guest_test_lanes
# The vfio-user backend's unit tests against QEMU's vfio-user server (ignored by a plain
# `cargo test`, which has no peers).
cargo test -p devices --locked -- --ignored qemu_server --test-threads=1
