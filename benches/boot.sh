#!/usr/bin/env bash
# Boot benchmark: boots the same kernel and initramfs to user space with this VMM and with
# QEMU (Debian's qemu-system-x86, with the CPU flags that work on this nested KVM: the same
# features hidden as this VMM hides, see vmm/src/boot/cpuid.rs), same command line and
# memory, RUNS times each, interleaved, in one run. Prints the median time
# from process start to the guest agent's "user space up" line for both, the ratio, and
# this VMM's KVM exit counts by cause (from --exit-stats).
#
# Usage: benches/boot.sh [RUNS (default 3)]   env: MEMORY (default 256M)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

runs=${1:-3}
memory=${MEMORY:-256M}
ensure_rust_tools
ensure_debs qemu-system-x86 bc
guest_image
cargo build --release --locked -q -p vmm
vmm=$PWD/target/release/vmm
cmdline="$(guest_cmdline) agent.oneshot"
out=$(mktemp -d)

# Runs "$@" and prints the seconds until the marker line appears on its stdout.
time_to_userspace() {
    local log=$1; shift
    local start now
    start=$(date +%s.%N)
    # A guest that hits an instruction the emulator cannot run hangs QEMU (it stops the VM
    # and waits); bound every run.
    timeout "${RUN_TIMEOUT:-900}" "$@" </dev/null 2>"$log.stderr" | while IFS= read -r line; do
        case "$line" in *"vmm-guest-agent: user space up"*) date +%s.%N > "$log.up" ;; esac
    done
    [ -f "$log.up" ] || { echo "no user space marker; stderr in $log.stderr" >&2; return 1; }
    now=$(cat "$log.up")
    echo "$now - $start" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

ours=(); qemus=()
for i in $(seq 1 "$runs"); do
    t=$(time_to_userspace "$out/vmm$i" "$vmm" --kernel "$VMM_TEST_VMLINUX" --initramfs "$VMM_TEST_INITRAMFS" \
        --memory "$memory" --cpus 1 --serial stdio --exit-stats --cmdline "$cmdline")
    ours+=("$t"); echo "run $i: vmm  $t s" >&2
    t=$(time_to_userspace "$out/qemu$i" qemu-system-x86_64 -enable-kvm -M pc \
        -cpu host,-arch-capabilities,-xsave,-avx,-cx16,-kvm-pv-ipi,-kvm-pv-unhalt,-kvm-pv-sched-yield \
        -m "$memory" -smp 1 -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$VMM_TEST_VMLINUX" -initrd "$VMM_TEST_INITRAMFS" -append "$cmdline")
    qemus+=("$t"); echo "run $i: qemu $t s" >&2
done

m_ours=$(printf '%s\n' "${ours[@]}" | median)
m_qemu=$(printf '%s\n' "${qemus[@]}" | median)
echo
echo "boot to user space, median of $runs, memory $memory, 1 vCPU"
printf '  %-6s %8.2f s   (runs: %s)\n' vmm "$m_ours" "${ours[*]}"
printf '  %-6s %8.2f s   (runs: %s)\n' qemu "$m_qemu" "${qemus[*]}"
printf '  ratio vmm/qemu: %.2f\n' "$(echo "$m_ours / $m_qemu" | bc -l)"
echo "this VMM's KVM exits in run 1 (whole run, boot to reboot):"
grep '^exit-stats:' "$out/vmm1.stderr" | sed 's/^exit-stats: /  /'
