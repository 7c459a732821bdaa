# Runs the vmm-tests integration test binaries (the guest tests) in two lanes at once. A
# lane runs its binaries one after another, each one test at a time, so at most two guests
# run at once: one per core of these 2-core machines (a guest has one vCPU; a booting guest
# keeps one core busy, a restored one mostly waits). Lane A takes the binaries named in
# LANE_A; lane B every other one, so a new test file is never left out. Each lane's output
# goes to its own log, printed when both are done, with one line per binary and its time.
#
# Usage (from the workspace root, after the test binaries are built): run_guest_test_lanes
# Sourced by scripts/test.sh.

# Balanced by their times in a clean-clone CI run with cold golden snapshots (s, both lanes
# running, 2026-12-06): lane A guest_boot 328 (three boots), net_migrate 357 (three NIC
# migrations), peer_libvfio_user 349 (a boot, a capped live migration), mediated 237 (a
# boot), passthrough 91 (a boot): 1362; lane B migrate 465, peer_qemu_net 126 (a boot, 20 s
# of TCP through QEMU's NIC), vfsim_death 122, guest_vfio 122 and guest_kernel_612 113 (a
# 6.12 boot each), golden 111, peer_qemu 91 (a boot), snapshot 40, guest_net 38 and the
# quick ones: about 1250. (With mediated in lane B it was 1125 against 1480.)
LANE_A=(guest_boot peer_libvfio_user passthrough net_migrate mediated)

# The integration test executables of vmm-tests, as "name path" lines.
guest_test_executables() {
    cargo test -p vmm-tests --locked --tests --no-run 2>&1 |
        sed -n 's|^ *Executable tests/\([a-z0-9_]*\)\.rs (\(.*\))$|\1 \2|p'
}

# Runs the executables "$@" (name path pairs, flattened) one after another into log $1;
# fails if any failed, after running them all.
run_lane() {
    local log=$1 rc=0 name exe start
    shift
    : >"$log"
    while [ $# -ge 2 ]; do
        name=$1 exe=$2
        shift 2
        start=$(date +%s)
        exe=$(realpath "$exe")
        # Cargo runs a test binary in its package's directory.
        if (cd tests && "$exe" --test-threads=1) >>"$log" 2>&1; then
            echo "lane: $name ok ($(( $(date +%s) - start )) s)" >>"$log"
        else
            echo "lane: $name FAILED ($(( $(date +%s) - start )) s)" >>"$log"
            rc=1
        fi
    done
    return $rc
}

run_guest_test_lanes() {
    local a=() b=() name exe logs rc_a=0 rc_b=0 pid
    while read -r name exe; do
        if [[ " ${LANE_A[*]} " == *" $name "* ]]; then a+=("$name" "$exe"); else b+=("$name" "$exe"); fi
    done < <(guest_test_executables)
    [ ${#a[@]} -gt 0 ] && [ ${#b[@]} -gt 0 ] || {
        echo "lanes: found no vmm-tests test binaries (cargo test --no-run printed no Executable lines)" >&2
        return 1
    }
    logs=$(mktemp -d)
    run_lane "$logs/a.log" "${a[@]}" &
    pid=$!
    run_lane "$logs/b.log" "${b[@]}" || rc_b=$?
    wait "$pid" || rc_a=$?
    for lane in a b; do
        echo "---- lane ${lane^^} ----"
        cat "$logs/$lane.log"
    done
    grep -h '^lane: ' "$logs"/*.log
    rm -rf "$logs"
    [ "$rc_a" -eq 0 ] && [ "$rc_b" -eq 0 ]
}
