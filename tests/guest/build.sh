#!/usr/bin/env bash
# Builds the test guest: an uncompressed ELF vmlinux from one of Debian's linux-source packages
# with the project's config fragment and nested-KVM patch, and an uncompressed initramfs holding
# busybox-static and the in-guest agent as /init.
#
# Kernels (--kernel, or $VMM_GUEST_KERNEL; default 6.1):
#   6.1   linux-source-6.1 + tests/guest/linux.config + ../shared/nested-kvm-guest.patch
#   6.12  linux-source-6.12 + tests/guest/linux.config merged with tests/guest/linux-6.12.config
#         (VFIO, no-IOMMU, mdev and the mtty sample) + tests/guest/patches/nested-kvm-guest-6.12.patch
# The initramfs does not depend on the kernel (it is built with the kernel tree's gen_init_cpio).
#
# Results are cached outside the repository, keyed by a hash of their inputs, so a second run
# with unchanged inputs only checks hashes:
#   $VMM_GUEST_CACHE (default ~/.cache/vmm-guest)/kernel-<hash>/vmlinux        (6.1)
#   $VMM_GUEST_CACHE/kernel-6.12-<hash>/vmlinux                                 (6.12)
#   $VMM_GUEST_CACHE/initramfs-<hash>/initramfs.cpio
# On success the last three lines of stdout are `BZIMAGE=<path>`, `VMLINUX=<path>` and
# `INITRAMFS=<path>` (only the first two with --kernel-only).
#
# Usage: tests/guest/build.sh [--kernel 6.1|6.12] [--kernel-only]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${VMM_SHARED_DIR:-$(cd "$repo/.." && pwd)/shared}
cache=${VMM_GUEST_CACHE:-$HOME/.cache/vmm-guest}
log() { echo "guest-build: $*" >&2; }
die() { echo "guest-build: error: $*" >&2; exit 1; }

# Checkouts (worktrees, CI's clean clones) share the cache and its fixed build directories:
# one build at a time, the others wait (a hit, once the lock is free, takes seconds).
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "waiting for another build that holds $cache/.lock"
    flock 9
fi

kver=${VMM_GUEST_KERNEL:-6.1}
kernel_only=
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) [ $# -ge 2 ] || die "--kernel needs a version (6.1 or 6.12)"; kver=$2; shift 2 ;;
        --kernel=*) kver=${1#--kernel=}; shift ;;
        --kernel-only) kernel_only=1; shift ;;
        *) die "unknown argument '$1' (usage: build.sh [--kernel 6.1|6.12] [--kernel-only])" ;;
    esac
done
case "$kver" in
    6.1)
        patch_file="$shared/nested-kvm-guest.patch"
        config_fragment="$here/linux.config"
        [ -f "$patch_file" ] || die "missing $patch_file (the shared/ folder must sit beside the checkout, or set VMM_SHARED_DIR)"
        ;;
    6.12)
        patch_file="$here/patches/nested-kvm-guest-6.12.patch"
        config_fragment=  # merged below, once the cache directory exists
        ;;
    *) die "unknown kernel '$kver' (known: 6.1, 6.12)" ;;
esac

# --- Debian packages ---------------------------------------------------------------------
need_pkgs=(linux-source-$kver build-essential flex bison bc libelf-dev busybox-static xz-utils lz4)
missing=()
for p in "${need_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; }
fi
# The package's own file list: a glob like linux-source-6.1* would also match 6.12's tarball.
src_tar=$(dpkg-query -L "linux-source-$kver" | grep -E "^/usr/src/linux-source-.*\.tar\.xz$" | head -n1)
[ -n "$src_tar" ] && [ -f "$src_tar" ] || die "linux-source-$kver is installed but its /usr/src tarball is missing"
src_version=$(dpkg-query -W -f='${Version}' "linux-source-$kver")

mkdir -p "$cache"

if [ "$kver" = 6.12 ]; then
    # One fragment for the build: linux.config, then linux-6.12.config; a setting in the later
    # file replaces the earlier file's setting of the same option.
    config_fragment=$(mktemp "$cache/linux-6.12.config.XXXXXX")
    trap 'rm -f "$config_fragment"' EXIT
    awk 'FNR == 1 { f++ }
         { line[++n] = $0; file[n] = f }
         /^CONFIG_[A-Za-z0-9_]*=/ { k = $0; sub(/=.*/, "", k); key[n] = k; last[k] = f }
         END { for (i = 1; i <= n; i++) if (!(i in key) || last[key[i]] == file[i]) print line[i] }' \
        "$here/linux.config" "$here/linux-6.12.config" > "$config_fragment"
fi

# The 6.1 kernel's section below is kept byte-identical: its text is part of the 6.1 kernel's
# cache hash. Kernels other than 6.1 use the section after it.
if [ "$kver" = 6.1 ]; then
# --- kernel --------------------------------------------------------------------------------
kernel_hash=$( { echo "$src_version"; cat "$config_fragment" "$patch_file"; sed -n '/^# --- kernel/,/^# --- end kernel/p' "$0"; } | sha256sum | cut -c1-16)
kernel_dir="$cache/kernel-$kernel_hash"
if [ ! -f "$kernel_dir/vmlinux" ]; then
    log "building kernel $kernel_hash (linux-source $src_version); takes ~5 minutes on 2 cores"
    work="$cache/linux-build"
    rm -rf "$work" && mkdir -p "$work"
    tar -C "$work" --strip-components=1 -xf "$src_tar"
    (cd "$work" && patch -p1 -s < "$patch_file")
    (cd "$work" && make -s tinyconfig >&2 \
        && ./scripts/kconfig/merge_config.sh -m .config "$config_fragment" >/dev/null \
        && make -s olddefconfig >&2)
    # Every option of the fragment must have survived olddefconfig, or the guest is not the one
    # the tests expect.
    while IFS= read -r line; do
        case "$line" in ''|'#'*) continue ;; esac
        key=${line%%=*}; val=${line#*=}
        if [ "$val" = n ]; then
            grep -qx "$key=y" "$work/.config" && die "kernel config: $key is still set (wanted n)"
        else
            grep -qx "$line" "$work/.config" || die "kernel config: $line did not apply (dependency missing?)"
        fi
    done < "$config_fragment"
    # bzImage builds vmlinux too; both are kept (the bzImage tests the 64-bit boot protocol).
    (cd "$work" && make -s -j"$(nproc)" bzImage >&2)
    gcc -O2 -o "$work/gen_init_cpio" "$work/usr/gen_init_cpio.c"
    mkdir -p "$kernel_dir.tmp"
    cp "$work/vmlinux" "$work/arch/x86/boot/bzImage" "$work/.config" "$work/gen_init_cpio" "$kernel_dir.tmp/"
    rm -rf "$kernel_dir" && mv "$kernel_dir.tmp" "$kernel_dir"
    rm -rf "$work"
    log "kernel ready: $kernel_dir/vmlinux"
fi
# --- end kernel
fi

if [ "$kver" != 6.1 ]; then
# === kernel, any version but 6.1 ===========================================================
# The steps of the 6.1 section above for kernel $kver, into kernel-$kver-<hash>. (Moving 6.1
# onto this section too would cost one rebuild of the 6.1 kernel: its hash would change.)
kernel_hash=$( { echo "$src_version"; cat "$config_fragment" "$patch_file"; sed -n '/^# === kernel/,/^# === end kernel/p' "$0"; } | sha256sum | cut -c1-16)
kernel_dir="$cache/kernel-$kver-$kernel_hash"
if [ ! -f "$kernel_dir/vmlinux" ]; then
    log "building kernel $kver-$kernel_hash (linux-source $src_version); takes ~10 minutes on 2 cores"
    work="$cache/linux-build-$kver"
    rm -rf "$work" && mkdir -p "$work"
    tar -C "$work" --strip-components=1 -xf "$src_tar"
    (cd "$work" && patch -p1 -s < "$patch_file")
    (cd "$work" && make -s tinyconfig >&2 \
        && ./scripts/kconfig/merge_config.sh -m .config "$config_fragment" >/dev/null \
        && make -s olddefconfig >&2)
    # Every option of the fragment must have survived olddefconfig, or the guest is not the one
    # the tests expect.
    while IFS= read -r line; do
        case "$line" in ''|'#'*) continue ;; esac
        key=${line%%=*}; val=${line#*=}
        if [ "$val" = n ]; then
            grep -qx "$key=y" "$work/.config" && die "kernel config: $key is still set (wanted n)"
        else
            grep -qx "$line" "$work/.config" || die "kernel config: $line did not apply (dependency missing?)"
        fi
    done < "$config_fragment"
    # bzImage builds vmlinux too; both are kept (the bzImage tests the 64-bit boot protocol).
    (cd "$work" && make -s -j"$(nproc)" bzImage >&2)
    gcc -O2 -o "$work/gen_init_cpio" "$work/usr/gen_init_cpio.c"
    mkdir -p "$kernel_dir.tmp"
    cp "$work/vmlinux" "$work/arch/x86/boot/bzImage" "$work/.config" "$work/gen_init_cpio" "$kernel_dir.tmp/"
    rm -rf "$kernel_dir" && mv "$kernel_dir.tmp" "$kernel_dir"
    rm -rf "$work"
    log "kernel ready: $kernel_dir/vmlinux"
fi
# === end kernel
fi

if [ -n "$kernel_only" ]; then
    echo "BZIMAGE=$kernel_dir/bzImage"
    echo "VMLINUX=$kernel_dir/vmlinux"
    exit 0
fi

# --- agent and initramfs -------------------------------------------------------------------
# The agent is a static (glibc crt-static) binary: the initramfs has no shared libraries.
agent_target="$repo/target/guest"
agent_inputs=$(cd "$repo" && find Cargo.toml Cargo.lock tests/Cargo.toml tests/src/agent tests/src/bin/guest-agent.rs -type f 2>/dev/null | sort)
initramfs_hash=$( { cd "$repo" && cat $agent_inputs; dpkg-query -W -f='${Version}' busybox-static; sed -n '/^# --- agent and initramfs/,$p' "$0"; } | sha256sum | cut -c1-16)
initramfs_dir="$cache/initramfs-$initramfs_hash"
if [ ! -f "$initramfs_dir/initramfs.cpio" ]; then
    log "building agent and initramfs $initramfs_hash"
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" CARGO_TARGET_DIR="$agent_target" \
        cargo build -q --release --locked --target x86_64-unknown-linux-gnu -p vmm-tests --bin guest-agent >&2)
    agent_bin="$agent_target/x86_64-unknown-linux-gnu/release/guest-agent"
    file -L "$agent_bin" 2>/dev/null | grep -q "dynamically linked" && die "agent is not static: $agent_bin"
    mkdir -p "$initramfs_dir.tmp"
    spec="$initramfs_dir.tmp/initramfs.list"
    {
        echo "dir /dev 755 0 0"
        echo "nod /dev/console 600 0 0 c 5 1"
        for d in /proc /sys /tmp /bin /sbin /usr /usr/bin /usr/sbin /mnt; do echo "dir $d 755 0 0"; done
        echo "file /init $agent_bin 755 0 0"
        echo "file /bin/busybox /bin/busybox 755 0 0"
        for applet in $(/bin/busybox --list-full); do
            [ "$applet" = bin/busybox ] && continue
            echo "slink /$applet /bin/busybox 777 0 0"
        done
    } > "$spec"
    "$kernel_dir/gen_init_cpio" "$spec" > "$initramfs_dir.tmp/initramfs.cpio"
    rm -rf "$initramfs_dir" && mv "$initramfs_dir.tmp" "$initramfs_dir"
    log "initramfs ready: $initramfs_dir/initramfs.cpio"
fi

# --- 6.12: the same initramfs plus guest-vfio -----------------------------------------------
# The 6.12 guest also carries tests/guest-vfio (the devices crate's kernel VFIO backend, run
# against the guest's real VFIO); kept out of the 6.1 initramfs so that changes to `devices`
# do not invalidate the 6.1 guests' golden snapshots.
if [ "$kver" = 6.12 ]; then
    vfio_inputs=$(cd "$repo" && find Cargo.toml Cargo.lock tests/guest-vfio devices resources vfio-user -type f \( -name '*.rs' -o -name Cargo.toml \) 2>/dev/null | sort)
    vfio_hash=$( { echo "$initramfs_hash"; cd "$repo" && cat $vfio_inputs; sed -n '/^# --- 6.12: the same initramfs/,$p' "$0"; } | sha256sum | cut -c1-16)
    vfio_dir="$cache/initramfs-6.12-$vfio_hash"
    if [ ! -f "$vfio_dir/initramfs.cpio" ]; then
        log "building guest-vfio and the 6.12 initramfs $vfio_hash"
        (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" CARGO_TARGET_DIR="$agent_target" \
            cargo build -q --release --locked --target x86_64-unknown-linux-gnu -p guest-vfio >&2)
        vfio_bin="$agent_target/x86_64-unknown-linux-gnu/release/guest-vfio"
        file -L "$vfio_bin" 2>/dev/null | grep -q "dynamically linked" && die "guest-vfio is not static: $vfio_bin"
        mkdir -p "$vfio_dir.tmp"
        { cat "$initramfs_dir/initramfs.list"; echo "file /bin/guest-vfio $vfio_bin 755 0 0"; } > "$vfio_dir.tmp/initramfs.list"
        "$kernel_dir/gen_init_cpio" "$vfio_dir.tmp/initramfs.list" > "$vfio_dir.tmp/initramfs.cpio"
        rm -rf "$vfio_dir" && mv "$vfio_dir.tmp" "$vfio_dir"
        log "6.12 initramfs ready: $vfio_dir/initramfs.cpio"
    fi
    initramfs_dir=$vfio_dir
fi
echo "BZIMAGE=$kernel_dir/bzImage"
echo "VMLINUX=$kernel_dir/vmlinux"
echo "INITRAMFS=$initramfs_dir/initramfs.cpio"
