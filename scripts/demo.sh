#!/usr/bin/env bash
# Demo: installs what is missing, builds the VMM and the guest image, boots the guest and
# shows that it runs: the guest's kernel version, the time to user space and the VMM's KVM
# exit count. The guest's agent is told (agent.oneshot) to reboot as soon as user space is
# up, which ends the VMM with status 0.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
ensure_debs bc
step "guest image (cached after the first build, which takes ~10 minutes)"
guest_image
step "building the VMM"
cargo build --release --locked -q -p vmm
vmm=target/release/vmm

step "booting the guest: $vmm --kernel ... --memory 256M --cpus 1"
log=$(mktemp -d)/demo
start=$(date +%s.%N)
set +e
"$vmm" --kernel "$VMM_TEST_VMLINUX" --initramfs "$VMM_TEST_INITRAMFS" \
    --memory 256M --cpus 1 --exit-stats --serial stdio \
    --cmdline "$(guest_cmdline) agent.oneshot" </dev/null 2>"$log.stderr" |
    while IFS= read -r line; do
        printf '%s\n' "$line"
        case "$line" in
            *"vmm-guest-agent: user space up"*) echo "$(date +%s.%N)" > "$log.userspace" ;;
        esac
    done
status=${PIPESTATUS[0]}
set -e
end=$(date +%s.%N)

echo
step "result"
if [ "$status" -ne 0 ] || [ ! -f "$log.userspace" ]; then
    echo "demo FAILED: vmm exited $status; its stderr:" >&2
    cat "$log.stderr" >&2
    exit 1
fi
up=$(cat "$log.userspace")
printf 'time to user space: %.1f s (VMM start to the agent'"'"'s first line)\n' "$(echo "$up - $start" | bc)"
printf 'total run time:     %.1f s (the guest rebooted; vmm exited %d)\n' "$(echo "$end - $start" | bc)" "$status"
grep '^exit-stats: total' "$log.stderr" | sed 's/^exit-stats: /KVM exits:          /'
grep '^exit-stats: ' "$log.stderr" | grep -v total | sed 's/^exit-stats: /  /'
