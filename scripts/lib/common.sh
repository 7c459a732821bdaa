# Shared helpers for the project's scripts (sourced, not run).

step() { printf '\n==> %s\n' "$*" >&2; }

# Debian packages the scripts themselves need.
ensure_debs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; } ||
            # A package whose relatives already came from bookworm-backports (e.g. qemu-utils
            # 10.0 beside qemu-system-x86 7.2: "Breaks") installs from there too.
            apt-get install -y -q -t bookworm-backports "${missing[@]}" >&2
    fi
}

ensure_rust_tools() {
    command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup)" >&2; exit 1; }
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >&2 || true
}

# Builds (or finds cached) the guest kernels and initramfs and exports their paths: the 6.1
# kernel (VMM_TEST_VMLINUX, what most tests boot), the 6.12 kernel with VFIO and mtty
# (VMM_TEST_VMLINUX_612, tests/tests/guest_kernel_612.rs) and the initramfs both boot.
guest_image() {
    local out out612
    out=$(bash tests/guest/build.sh --kernel 6.1)
    out612=$(bash tests/guest/build.sh --kernel 6.12)
    VMM_TEST_VMLINUX=$(printf '%s\n' "$out" | sed -n 's/^VMLINUX=//p')
    VMM_TEST_INITRAMFS=$(printf '%s\n' "$out" | sed -n 's/^INITRAMFS=//p')
    VMM_TEST_VMLINUX_612=$(printf '%s\n' "$out612" | sed -n 's/^VMLINUX=//p')
    VMM_TEST_INITRAMFS_612=$(printf '%s\n' "$out612" | sed -n 's/^INITRAMFS=//p')
    export VMM_TEST_VMLINUX VMM_TEST_INITRAMFS VMM_TEST_VMLINUX_612 VMM_TEST_INITRAMFS_612
}

guest_cmdline() { tr -d '\n' < tests/guest/cmdline; }

# Builds (or finds cached) the third-party vfio-user servers the interop tests run against
# (tests/peers/build.sh) and exports their paths as the tests expect them.
peers() {
    local out
    out=$(bash tests/peers/build.sh)
    VMM_PEER_LIBVFIO_USER_SERVER=$(printf '%s\n' "$out" | sed -n 's/^LIBVFIO_USER_SERVER=//p')
    VMM_PEER_LIBVFIO_USER_GPIO=$(printf '%s\n' "$out" | sed -n 's/^LIBVFIO_USER_GPIO=//p')
    VMM_PEER_QEMU_VFIO_USER=$(printf '%s\n' "$out" | sed -n 's/^QEMU_VFIO_USER=//p')
    export VMM_PEER_LIBVFIO_USER_SERVER VMM_PEER_LIBVFIO_USER_GPIO VMM_PEER_QEMU_VFIO_USER
}
