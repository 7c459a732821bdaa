#!/usr/bin/env bash
# Builds the third-party vfio-user servers ("peers") the tests talk to, from the source of
# Debian's qemu package in bookworm-backports, whose orig tarball carries libvfio-user as a
# meson subproject (subprojects/libvfio-user):
#   - libvfio-user's samples/server and samples/gpio-pci-idio-16, with the fixes in
#     tests/peers/patches/libvfio-user-*.patch;
#   - qemu-system-x86_64 with the x-remote machine and the x-vfio-user-server object (QEMU's
#     own virtio-blk-pci or virtio-net-pci with a tap backend, served over vfio-user), with
#     tests/peers/qemu-devices.mak as its only devices and tests/peers/patches/qemu-*.patch.
# docs/peers.md says what each peer is, how to start it and what a client must do for it.
#
# Results are cached outside the repository, keyed by a hash of their inputs (the pinned
# source package version, the patches, the devices file, this script's section), so a second
# run with unchanged inputs only checks the installed packages:
#   $VMM_PEERS_CACHE (default ~/.cache/vmm-peers)/libvfio-user-<hash>/{server,gpio-pci-idio-16}
#   $VMM_PEERS_CACHE/qemu-<hash>/qemu-system-x86_64
# On success the last lines of stdout are `LIBVFIO_USER_SERVER=<path>`,
# `LIBVFIO_USER_GPIO=<path>` and (unless --libvfio-user-only) `QEMU_VFIO_USER=<path>`.
#
# Usage: tests/peers/build.sh [--libvfio-user-only]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${VMM_PEERS_CACHE:-$HOME/.cache/vmm-peers}
patches="$here/patches"
devices_mak="$here/qemu-devices.mak"
log() { echo "peers-build: $*" >&2; }
die() { echo "peers-build: error: $*" >&2; exit 1; }

# Checkouts (worktrees, CI's clean clones) share the cache and its fixed build directories:
# one build at a time, the others wait (a hit, once the lock is free, takes seconds).
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "waiting for another build that holds $cache/.lock"
    flock 9
fi

only_lvu=false
case "${1:-}" in
    '') ;;
    --libvfio-user-only) only_lvu=true ;;
    *) die "unknown argument '$1' (usage: $0 [--libvfio-user-only])" ;;
esac

# The qemu source package of bookworm-backports, pinned so that the cache key is stable. When
# backports moves on, `apt-cache showsrc qemu` names the new version: update both lines.
QEMU_VERSION='1:10.0.2+ds-2+deb13u1~bpo12+1'
QEMU_UPSTREAM=10.0.2

# --- Debian packages ---------------------------------------------------------------------
# QEMU 10.0 needs meson >= 1.5 and pycotap (its configure checks both before anything else);
# bookworm has meson 1.0.1 and no pycotap, bookworm-backports has both. Backports is added for
# binaries too, but at its default priority (100) nothing comes from it unless asked by name.
src_list=/etc/apt/sources.list.d/vmm-peers-src.sources
src_list_text='# Written by tests/peers/build.sh (vmm): the qemu source and meson for the vfio-user peers.
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'
need_pkgs=(build-essential pkg-config ninja-build python3-venv xz-utils patch
           libglib2.0-dev zlib1g-dev libjson-c-dev libcmocka-dev)
bpo_pkgs=(meson python3-pycotap)
meson_min=1.5.0
export DEBIAN_FRONTEND=noninteractive

apt_updated=false
apt_update() {
    $apt_updated && return 0
    log "apt-get update"
    apt-get update -q >&2 || die "apt-get update failed"
    apt_updated=true
}

ensure_backports_source() {
    if [ "$(cat "$src_list" 2>/dev/null)" != "$src_list_text" ]; then
        [ -w "$(dirname "$src_list")" ] || die "cannot write $src_list (run as root)"
        log "adding bookworm-backports (deb, deb-src) as $src_list"
        printf '%s\n' "$src_list_text" > "$src_list"
        apt_updated=false
        apt_update
    fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${need_pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get install -y -q "${missing[@]}" >&2 || { apt_update && apt-get install -y -q "${missing[@]}" >&2; } \
        || die "could not install ${missing[*]}"
fi
bpo_missing=()
installed python3-pycotap || bpo_missing+=(python3-pycotap/bookworm-backports)
if ! installed meson || ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' meson)" ge "$meson_min"; then
    bpo_missing+=(meson/bookworm-backports)
fi
if [ ${#bpo_missing[@]} -gt 0 ]; then
    ensure_backports_source
    log "installing from bookworm-backports: ${bpo_missing[*]}"
    apt-get install -y -q "${bpo_missing[@]}" >&2 || { apt_update && apt-get install -y -q "${bpo_missing[@]}" >&2; } \
        || die "could not install ${bpo_missing[*]}"
fi

mkdir -p "$cache"

# The orig tarball of the pinned qemu source package, checked against the SHA256 of the
# (signed) Sources index. Only the orig tarball is used: it is upstream's release minus the
# pre-built firmware, with subprojects/libvfio-user in it; Debian's debian/ directory (its
# packaging and patches) is not needed, and the mirror answers 404 for this version's .dsc
# and .debian.tar.xz, so a plain `apt-get source` fails.
src_tar=
fetch_qemu_source() {
    [ -n "$src_tar" ] && return 0
    ensure_backports_source
    local versions uris line uri name size sum
    versions=$(apt-cache showsrc qemu 2>/dev/null | sed -n 's/^Version: //p')
    grep -qxF "$QEMU_VERSION" <<<"$versions" || apt_update
    uris=$(apt-get source -q --print-uris "qemu=$QEMU_VERSION" 2>/dev/null) \
        || die "bookworm-backports has no qemu source $QEMU_VERSION (it has: $(apt-cache showsrc qemu 2>/dev/null | sed -n 's/^Version: //p' | tr '\n' ' ')); update QEMU_VERSION in $0"
    line=$(grep -F ".orig.tar." <<<"$uris" | head -n1)
    [ -n "$line" ] || die "apt-get source --print-uris qemu=$QEMU_VERSION names no orig tarball"
    read -r uri name size sum <<<"$line"
    uri=${uri//\'/}
    case "$sum" in SHA256:*) ;; *) die "no SHA256 for $name in the Sources index (got '$sum')" ;; esac
    mkdir -p "$cache/src"
    src_tar="$cache/src/$name"
    if ! (cd "$cache/src" && echo "${sum#SHA256:}  $name" | sha256sum -c --status 2>/dev/null); then
        log "downloading $name ($size bytes)"
        rm -f "$src_tar" "$src_tar.FAILED"
        /usr/lib/apt/apt-helper download-file "$uri" "$src_tar" "$sum" >&2 || die "download of $uri failed"
        (cd "$cache/src" && echo "${sum#SHA256:}  $name" | sha256sum -c --status) || die "$src_tar: SHA256 mismatch"
    fi
}

# --- libvfio-user --------------------------------------------------------------------------
# libvfio-user's own meson build (buildtype debug: asserts on, -v prints its debug log),
# static, building only the two samples (meson requires cmocka even then, for the tests).
lvu_hash=$( { echo "$QEMU_VERSION"; cat "$patches"/libvfio-user-*.patch; sed -n '/^# --- libvfio-user/,/^# --- end libvfio-user/p' "$0"; } | sha256sum | cut -c1-16)
lvu_dir="$cache/libvfio-user-$lvu_hash"
if [ ! -x "$lvu_dir/server" ] || [ ! -x "$lvu_dir/gpio-pci-idio-16" ]; then
    fetch_qemu_source
    start=$SECONDS
    log "building libvfio-user samples $lvu_hash (qemu source $QEMU_VERSION)"
    work="$cache/libvfio-user-build"
    rm -rf "$work" && mkdir -p "$work"
    tar -C "$work" -xJf "$src_tar" --strip-components=3 "qemu-$QEMU_UPSTREAM/subprojects/libvfio-user" \
        || die "$src_tar has no subprojects/libvfio-user"
    for p in "$patches"/libvfio-user-*.patch; do
        patch -d "$work" -p1 -s --forward < "$p" >&2 || die "patch $(basename "$p") does not apply"
    done
    meson setup -Ddefault_library=static "$work/build" "$work" >"$work/setup.log" 2>&1 \
        || { tail -n 30 "$work/setup.log" >&2; die "meson setup of libvfio-user failed (log: $work/setup.log)"; }
    ninja -C "$work/build" samples/server samples/gpio-pci-idio-16 >&2 || die "libvfio-user build failed"
    mkdir -p "$lvu_dir.tmp"
    cp "$work/build/samples/server" "$work/build/samples/gpio-pci-idio-16" "$lvu_dir.tmp/"
    rm -rf "$lvu_dir" && mv "$lvu_dir.tmp" "$lvu_dir"
    rm -rf "$work"
    log "libvfio-user samples ready in $((SECONDS - start)) s: $lvu_dir"
fi
# --- end libvfio-user

if $only_lvu; then
    echo "LIBVFIO_USER_SERVER=$lvu_dir/server"
    echo "LIBVFIO_USER_GPIO=$lvu_dir/gpio-pci-idio-16"
    exit 0
fi

# --- qemu ----------------------------------------------------------------------------------
# qemu-system-x86_64 alone: no default features or devices, KVM only (the multiprocess Kconfig
# option depends on KVM; TCG is not built), the devices of qemu-devices.mak, libvfio-user
# linked statically so that the binary can leave the build tree. /usr/bin/python3 explicitly:
# configure's venv must see Debian's meson and pycotap, which another python3 on PATH (pyenv)
# would not.
qemu_hash=$( { echo "$QEMU_VERSION"; cat "$devices_mak" "$patches"/qemu-*.patch; sed -n '/^# --- qemu/,/^# --- end qemu/p' "$0"; } | sha256sum | cut -c1-16)
qemu_dir="$cache/qemu-$qemu_hash"
if [ ! -x "$qemu_dir/qemu-system-x86_64" ]; then
    fetch_qemu_source
    start=$SECONDS
    log "building qemu-system-x86_64 $qemu_hash (qemu source $QEMU_VERSION); takes ~3 minutes on 2 cores"
    work="$cache/qemu-build"
    rm -rf "$work" && mkdir -p "$work"
    tar -C "$work" --strip-components=1 -xJf "$src_tar"
    for p in "$patches"/qemu-*.patch; do
        patch -d "$work" -p1 -s --forward < "$p" >&2 || die "patch $(basename "$p") does not apply"
    done
    cp "$devices_mak" "$work/configs/devices/x86_64-softmmu/vmm-peers.mak"
    mkdir -p "$work/build"
    (cd "$work/build" && ../configure --python=/usr/bin/python3 \
        --target-list=x86_64-softmmu --without-default-features --without-default-devices \
        --with-devices-x86_64=vmm-peers --enable-kvm --disable-tcg \
        --enable-multiprocess --enable-vfio-user-server \
        --disable-download --disable-docs --disable-install-blobs \
        -Dlibvfio-user:default_library=static) >"$work/configure.log" 2>&1 \
        || { tail -n 30 "$work/configure.log" >&2; die "QEMU configure failed (log: $work/configure.log)"; }
    ninja -C "$work/build" -j"$(nproc)" qemu-system-x86_64 >&2 || die "QEMU build failed"
    bin="$work/build/qemu-system-x86_64"
    out=$(ldd "$bin")
    grep -q libvfio-user <<<"$out" && die "$bin links libvfio-user dynamically"
    out=$("$bin" -machine help)
    grep -q '^x-remote ' <<<"$out" || die "$bin has no x-remote machine"
    out=$("$bin" -device help)
    grep -qF '"virtio-blk-pci"' <<<"$out" || die "$bin has no virtio-blk-pci"
    grep -qF '"virtio-net-pci"' <<<"$out" || die "$bin has no virtio-net-pci"
    out=$("$bin" -machine x-remote -netdev help)   # (without a machine: "no default")
    grep -qx 'tap' <<<"$out" || die "$bin has no tap netdev"
    out=$("$bin" -object help)
    grep -q '^ *x-vfio-user-server$' <<<"$out" || die "$bin has no x-vfio-user-server object"
    mkdir -p "$qemu_dir.tmp"
    cp "$bin" "$work/build/x86_64-softmmu-config-devices.mak" "$qemu_dir.tmp/"
    rm -rf "$qemu_dir" && mv "$qemu_dir.tmp" "$qemu_dir"
    rm -rf "$work"
    log "qemu-system-x86_64 ready in $((SECONDS - start)) s: $qemu_dir"
fi
# --- end qemu

echo "LIBVFIO_USER_SERVER=$lvu_dir/server"
echo "LIBVFIO_USER_GPIO=$lvu_dir/gpio-pci-idio-16"
echo "QEMU_VFIO_USER=$qemu_dir/qemu-system-x86_64"
