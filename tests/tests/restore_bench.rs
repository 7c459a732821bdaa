//! The measurement behind `benches/restore.sh` (ignored in the normal test run: a benchmark,
//! not a test). For each memory size: a cold boot to the agent answering, a snapshot of that
//! guest, then `RESTORE_RUNS` restores of it, each timed from spawning `vmm --restore` to the
//! agent answering a ping. The VMM opens its API socket only after the restore is done
//! (vmm/src/vm.rs), so spawn to the first API answer is the VMM's own share.

use std::time::{Duration, Instant};

use vmm_tests::harness::{ApiClient, TestDir, Vm, DEFAULT_BOOT_TIMEOUT};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Connects to the API socket, retrying until it exists, and waits for an answer to `info`.
/// Polls every millisecond: the harness's own connect loops sleep 50-100 ms between tries,
/// too coarse for what is measured here.
fn api_answers(path: &std::path::Path) -> ApiClient {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut api = ApiClient::connect(path, Duration::from_secs(60)).expect("api socket");
    api.request(&serde_json::json!({"request": "info"}))
        .expect("info");
    api
}

struct Restored {
    /// Spawn to the API socket answering (the VMM has read the snapshot: the API thread
    /// starts after the restore).
    api_s: f64,
    /// Spawn to the guest agent answering a ping.
    agent_s: f64,
}

fn restore_once(dir: &TestDir, snap: &std::path::Path, run: usize) -> Restored {
    let api_path = dir.join(format!("restore-{run}.sock"));
    let start = Instant::now();
    let vm = Vm::builder()
        .restore(snap)
        .vmm_args(&["--api-socket", &api_path.display().to_string()])
        .boot()
        .expect("start vmm --restore");
    let _api = api_answers(&api_path);
    let api_s = start.elapsed().as_secs_f64();
    let mut agent = vm
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("restored guest did not answer: {e}"));
    agent.ping().expect("ping");
    let agent_s = start.elapsed().as_secs_f64();
    drop(agent);
    let _ = vm.kill();
    Restored { api_s, agent_s }
}

#[test]
#[ignore = "benchmark: run by benches/restore.sh"]
fn restore_versus_cold_boot() {
    let runs = env_u64("RESTORE_RUNS", 5) as usize;
    let sizes = std::env::var("RESTORE_MEMORY").unwrap_or_else(|_| "256M,1G".to_owned());
    let dir = TestDir::new("restore-bench").expect("test dir");
    let mut lines = Vec::new();
    for memory in sizes.split(',') {
        let api_path = dir.join(format!("boot-{memory}.sock"));
        let start = Instant::now();
        let vm = Vm::builder()
            .memory(memory)
            .vmm_args(&["--api-socket", &api_path.display().to_string()])
            .boot()
            .expect("start vmm");
        let mut agent = vm
            .agent(DEFAULT_BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("guest did not come up: {e}"));
        let cold_s = start.elapsed().as_secs_f64();
        let mut api = ApiClient::connect(&api_path, Duration::from_secs(10)).expect("api socket");
        let snap = dir.join(format!("{memory}.snap"));
        let snap_start = Instant::now();
        api.request(&serde_json::json!({"request": "snapshot", "path": snap}))
            .expect("snapshot");
        let snap_s = snap_start.elapsed().as_secs_f64();
        let snap_bytes = std::fs::metadata(&snap).expect("snapshot file").len();
        drop(agent.reboot());
        let _ = vm.kill();

        let restores: Vec<Restored> = (0..runs).map(|i| restore_once(&dir, &snap, i)).collect();
        let api_s = median(restores.iter().map(|r| r.api_s).collect());
        let agent_s = median(restores.iter().map(|r| r.agent_s).collect());
        let all: Vec<String> = restores
            .iter()
            .map(|r| format!("{:.3}", r.agent_s))
            .collect();
        lines.push(format!(
            "restore-bench: {memory:>5}  cold boot to agent {cold_s:>7.2} s | snapshot {snap_s:.2} s, \
             {:.1} MiB | restore to API {api_s:.3} s, to agent answering {agent_s:.3} s \
             (median of {runs}: {}) | boot/restore {:.0}x",
            snap_bytes as f64 / (1 << 20) as f64,
            all.join(" "),
            cold_s / agent_s
        ));
    }
    for l in &lines {
        println!("{l}");
    }
}
