#!/usr/bin/env bash
# Guest kernel benchmark: boots the 6.1 and the 6.12 guest kernel (tests/guest/build.sh
# --kernel 6.1 / 6.12) with this VMM, same initramfs, command line, memory and 1 vCPU, RUNS
# times each, alternating, in one run. Prints each boot's time from process start to the
# guest agent's "user space up" line (the agent is PID 1), the medians and the ratio
# 6.12/6.1.
#
# Usage: benches/guest_kernels.sh [RUNS (default 3)]
#   env: MEMORY (default 256M); VMM_BIN (a vmm binary to use instead of a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

runs=${1:-3}
memory=${MEMORY:-256M}
ensure_rust_tools
ensure_debs bc
guest_image   # exports VMM_TEST_VMLINUX (6.1), VMM_TEST_VMLINUX_612, VMM_TEST_INITRAMFS
if [ -n "${VMM_BIN:-}" ]; then
    vmm=$VMM_BIN
else
    cargo build --release --locked -q -p vmm
    vmm="$(realpath "${CARGO_TARGET_DIR:-target}")/release/vmm"
fi
cmdline="$(guest_cmdline) agent.oneshot"
out=$(mktemp -d)

# Boots kernel $2 and prints the seconds until the agent's banner appears on the console;
# logs go to $1.*.
time_to_agent() {
    local log=$1 kernel=$2
    local start now
    start=$(date +%s.%N)
    timeout "${RUN_TIMEOUT:-900}" "$vmm" --kernel "$kernel" --initramfs "$VMM_TEST_INITRAMFS" \
        --memory "$memory" --cpus 1 --serial stdio --cmdline "$cmdline" \
        </dev/null 2>"$log.stderr" | while IFS= read -r line; do
        case "$line" in *"vmm-guest-agent: user space up"*) date +%s.%N > "$log.up" ;; esac
    done
    [ -f "$log.up" ] || { echo "no agent banner; stderr in $log.stderr" >&2; return 1; }
    now=$(cat "$log.up")
    echo "$now - $start" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

k61=(); k612=()
for i in $(seq 1 "$runs"); do
    t=$(time_to_agent "$out/k61-$i" "$VMM_TEST_VMLINUX")
    k61+=("$t"); echo "run $i: 6.1  $t s" >&2
    t=$(time_to_agent "$out/k612-$i" "$VMM_TEST_VMLINUX_612")
    k612+=("$t"); echo "run $i: 6.12 $t s" >&2
done

m61=$(printf '%s\n' "${k61[@]}" | median)
m612=$(printf '%s\n' "${k612[@]}" | median)
echo
echo "boot to the guest agent, median of $runs, memory $memory, 1 vCPU, $vmm"
printf '  %-5s %8.2f s   (runs: %s)\n' 6.1 "$m61" "${k61[*]}"
printf '  %-5s %8.2f s   (runs: %s)\n' 6.12 "$m612" "${k612[*]}"
printf '  ratio 6.12/6.1: %.2f\n' "$(echo "$m612 / $m61" | bc -l)"
rm -rf "$out"
