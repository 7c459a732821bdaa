#!/usr/bin/env bash
# Demo: installs what is missing, builds the VMM, vfsim and the guest image, starts vfsim (a
# simulated virtio-blk VF in its own process) on a fresh disk image, and boots the guest with
# the VF passed through over vfio-user. Through the guest's agent (JSON lines on its second
# serial port) the guest writes a message to /dev/vda with O_DIRECT and reads it back; the
# demo then shows the message in the image file on the host. Also shown: the guest's kernel
# version, the time to user space and the VMM's KVM exit count. The guest reboots at the end,
# which ends the VMM with status 0.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

ensure_rust_tools
ensure_debs bc python3 bsdextrautils   # bc: timings; python3: agent client; hexdump
step "guest image (cached after the first build, which takes ~10 minutes)"
guest_image
step "building the VMM and vfsim"
cargo build --release --locked -q -p vmm -p vfsim
target="${CARGO_TARGET_DIR:-target}/release"
vmm=$target/vmm

work=$(mktemp -d)
log=$work/demo
disk=$work/disk.img
vfsim_pid=
cleanup() { [ -z "$vfsim_pid" ] || kill "$vfsim_pid" 2>/dev/null || true; }
trap cleanup EXIT

step "starting vfsim on a fresh 16 MiB disk image: $disk"
truncate -s 16M "$disk"
"$target/vfsim" --socket "$work/vf0.sock" --disk "$disk" 2>"$work/vfsim.log" &
vfsim_pid=$!
for _ in $(seq 100); do [ -S "$work/vf0.sock" ] && break; sleep 0.1; done
[ -S "$work/vf0.sock" ] || { echo "demo FAILED: vfsim did not start; its log:" >&2; cat "$work/vfsim.log" >&2; exit 1; }

step "booting the guest: $vmm --kernel ... --memory 256M --cpus 1 --device vfio-user,socket=$work/vf0.sock,id=vf0"
start=$(date +%s.%N)
(
    set +e
    # (sh records the VMM's pid, so that a failed guest side can stop it.)
    sh -c 'echo $$ > "$0"; exec "$@"' "$log.pid" "$vmm" --kernel "$VMM_TEST_VMLINUX" --initramfs "$VMM_TEST_INITRAMFS" \
        --memory 256M --cpus 1 --exit-stats --serial stdio --serial2 "socket=$work/agent.sock" \
        --device "vfio-user,socket=$work/vf0.sock,id=vf0" \
        --cmdline "$(guest_cmdline)" </dev/null 2>"$log.stderr" |
        while IFS= read -r line; do
            printf '%s\n' "$line"
            case "$line" in
                *"vmm-guest-agent: user space up"*) echo "$(date +%s.%N)" > "$log.userspace" ;;
            esac
        done
    echo "${PIPESTATUS[0]}" > "$log.status"
) &
vm_pipeline=$!

# The guest's side, through its agent: write a message to the passed-through disk, read it
# back, reboot. Prints what the guest read; fails (status 1) on any error.
set +e
python3 - "$work/agent.sock" "$work/guest-read.txt" <<'PY'
import json, socket, sys, time
path, out = sys.argv[1], sys.argv[2]
deadline = time.time() + 600
while True:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path); break
    except OSError:
        if time.time() > deadline: sys.exit("demo: no agent socket from the VMM")
        time.sleep(0.2)
buf = bytearray()
next_id = [100]
def readline(timeout):
    end = time.time() + timeout
    while b"\n" not in buf:
        left = end - time.time()
        if left <= 0: raise TimeoutError
        s.settimeout(left)
        try: chunk = s.recv(65536)
        except socket.timeout: raise TimeoutError
        if not chunk: raise EOFError("agent connection closed")
        buf.extend(chunk)
    i = buf.index(b"\n")
    line = bytes(buf[:i]); del buf[:i + 1]
    return line
def call(op, timeout, **fields):
    next_id[0] += 1
    rid = next_id[0]
    s.sendall((json.dumps(dict(id=rid, op=op, **fields)) + "\n").encode())
    end = time.time() + timeout
    while True:
        line = readline(end - time.time())
        try: reply = json.loads(line)
        except ValueError: continue  # noise while the guest opens its port
        if reply.get("id") == rid: return reply
# Wait for user space: ping until the agent answers.
while True:
    try:
        if call("ping", 5).get("ok"): break
    except TimeoutError: pass
    if time.time() > deadline: sys.exit("demo: the guest's agent never answered")
def run(script):
    r = call("run", 300, argv=["sh", "-c", script])
    if not r.get("ok") or r.get("status") != 0:
        sys.exit(f"demo: guest command failed: {script}\n{r}")
    return r["stdout"]
print("guest: " + run("grep -H . /sys/block/vda/size /sys/bus/pci/devices/0000:00:01.0/vendor /sys/bus/pci/devices/0000:00:01.0/device | tr '\\n' ' '"), flush=True)
msg = run("echo \"hello from the guest, written through vfsim at uptime $(cut -d' ' -f1 /proc/uptime) s\" > /tmp/msg"
          " && dd if=/tmp/msg of=/dev/vda bs=4096 conv=sync oflag=direct 2>/dev/null"
          " && dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\\0'")
print("guest wrote /dev/vda and read back with O_DIRECT: " + msg.strip(), flush=True)
open(out, "w").write(msg)
try: call("reboot", 30)
except Exception: pass
PY
guest_status=$?
set -e
if [ "$guest_status" -ne 0 ] && [ -f "$log.pid" ]; then
    kill "$(cat "$log.pid")" 2>/dev/null || true   # SIGTERM: the VMM stops cleanly
fi
wait "$vm_pipeline" || true
end=$(date +%s.%N)
status=$(cat "$log.status" 2>/dev/null || echo "?")

echo
step "result"
if [ "$guest_status" -ne 0 ] || [ "$status" != 0 ] || [ ! -f "$log.userspace" ]; then
    echo "demo FAILED: guest side exited $guest_status, vmm exited $status; the VMM's stderr:" >&2
    cat "$log.stderr" >&2
    echo "vfsim's log:" >&2
    cat "$work/vfsim.log" >&2
    exit 1
fi
read_back=$(cat "$work/guest-read.txt")
len=${#read_back}
echo "what the guest read from /dev/vda: $read_back"
echo "the disk image on the host ($disk), first $len bytes:"
hexdump -C -n "$len" "$disk"
if [ "$(head -c "$len" "$disk")" = "$read_back" ]; then
    echo "the guest's data landed in the image: match"
else
    echo "demo FAILED: the image does not hold what the guest wrote" >&2
    exit 1
fi
up=$(cat "$log.userspace")
printf 'time to user space: %.1f s (VMM start to the agent'"'"'s first line)\n' "$(echo "$up - $start" | bc)"
printf 'total run time:     %.1f s (the guest rebooted; vmm exited %d)\n' "$(echo "$end - $start" | bc)" "$status"
grep '^exit-stats: total' "$log.stderr" | sed 's/^exit-stats: /KVM exits:          /'
grep '^exit-stats: ' "$log.stderr" | grep -v total | sed 's/^exit-stats: /  /'
