//! The measurement behind `benches/mediate.sh` (ignored in the normal test run: a
//! benchmark, not a test). One guest with three vfsim VFs: `vf0` passed through with no
//! mediator, `vf1` with `virtio-blk-vf`, `vf2` with `trace`. Guest `dd` to each with direct
//! I/O, 4 KiB and 128 KiB blocks: (a) no mediator (doorbell page mapped), (b) virtio-blk-vf
//! idle, (c) virtio-blk-vf while saving (doorbells trapped, rings walked), (d) doorbells
//! trapped by trace, no tracking. Prints MB/s, the ratio to (a) and KVM exits per request.

use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::harness::{run, Agent, ApiClient, TestDir, Vfsim, Vm, DEFAULT_BOOT_TIMEOUT};

const MIB: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds of one `dd` of `count` blocks of `bs` bytes to `dev` (spawn cost subtracted),
/// and the KVM exits it took.
fn dd(
    agent: &mut Agent,
    api: &mut ApiClient,
    dev: &str,
    bs: u64,
    count: u64,
    spawn: f64,
) -> (f64, u64) {
    let exits0 = api.request(&json!({"request": "device-stats"})).unwrap()["total_exits"]
        .as_u64()
        .unwrap();
    let t = Instant::now();
    let out = run(
        agent,
        &[
            "dd",
            "if=/dev/zero",
            &format!("of={dev}"),
            &format!("bs={bs}"),
            &format!("count={count}"),
            "oflag=direct",
        ],
    );
    let secs = t.elapsed().as_secs_f64() - spawn;
    assert!(out.success(), "dd to {dev}: {out:?}");
    let exits1 = api.request(&json!({"request": "device-stats"})).unwrap()["total_exits"]
        .as_u64()
        .unwrap();
    (secs.max(1e-6), exits1 - exits0)
}

#[test]
#[ignore = "benchmark: run by benches/mediate.sh"]
fn mediated_dd_throughput() {
    let total = env_u64("MEDIATE_BENCH_MIB", 8) * MIB;
    let reps = env_u64("MEDIATE_BENCH_REPS", 3);
    let dir = TestDir::new("mediate-bench").expect("test dir");
    let mut sims = Vec::new();
    let mut args: Vec<String> = Vec::new();
    let api_path = dir.join("api.sock");
    for (i, spec) in ["", "mediator=virtio-blk-vf", "mediator=trace"]
        .iter()
        .enumerate()
    {
        let disk = dir.join(format!("disk{i}.img"));
        // Sizes differ so the guest's vdX can be matched to the VFs.
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 * MIB + i as u64 * MIB)
            .unwrap();
        let sim = Vfsim::start_with_pf(&dir, &disk, &format!("vf{i}"));
        let dev = if spec.is_empty() {
            format!("vfio-user,socket={},id=vf{i}", sim.socket.display())
        } else {
            format!(
                "vfio-mediated,socket={},{spec},pf={},id=vf{i}",
                sim.socket.display(),
                sim.pf.as_ref().unwrap().display()
            )
        };
        args.push("--device".into());
        args.push(dev);
        sims.push(sim);
    }
    args.push("--api-socket".into());
    args.push(api_path.to_str().unwrap().into());
    let vm = Vm::builder().vmm_args(&args).boot().expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));
    let mut api = ApiClient::connect(&api_path, Duration::from_secs(10)).unwrap();
    // Which vdX is which VF: by size.
    let mut names = vec![String::new(); 3];
    for d in ["vda", "vdb", "vdc"] {
        let sectors: u64 = run(&mut agent, &["cat", &format!("/sys/block/{d}/size")])
            .stdout
            .trim()
            .parse()
            .unwrap();
        let i = (sectors * 512 / MIB - 64) as usize;
        names[i] = format!("/dev/{d}");
    }
    // Spawn cost of the agent running a program, to subtract.
    let t = Instant::now();
    for _ in 0..5 {
        run(&mut agent, &["true"]);
    }
    let spawn = t.elapsed().as_secs_f64() / 5.0;

    let trap = json!({"bar": 0, "offset": 0x1000, "size": 0x1000});
    let configs = [
        "(a) no mediator",
        "(b) virtio-blk-vf idle",
        "(c) virtio-blk-vf saving",
        "(d) notify trapped",
    ];
    for bs in [4096u64, 128 * 1024] {
        let count = total / bs;
        let mut results: Vec<Vec<(f64, u64)>> = vec![Vec::new(); 4];
        for _ in 0..reps {
            for (c, res) in results.iter_mut().enumerate() {
                let dev = &names[[0, 1, 1, 2][c]];
                let migrate = |api: &mut ApiClient, op: &str| {
                    api.request(&json!({"request": "device-migration", "device": "vf1", "op": op}))
                        .unwrap()
                };
                match c {
                    2 => {
                        migrate(&mut api, "start-dirty-tracking");
                    }
                    3 => {
                        api.mediator("vf2", "trap", trap.clone()).unwrap();
                    }
                    _ => {}
                }
                res.push(dd(&mut agent, &mut api, dev, bs, count, spawn));
                match c {
                    2 => {
                        migrate(&mut api, "take-dirty-pages");
                        migrate(&mut api, "stop-dirty-tracking");
                    }
                    3 => {
                        api.mediator("vf2", "untrap", trap.clone()).unwrap();
                    }
                    _ => {}
                }
            }
        }
        let med = |v: &Vec<(f64, u64)>| {
            let mut s: Vec<f64> = v.iter().map(|r| r.0).collect();
            s.sort_by(|a, b| a.total_cmp(b));
            let exits: u64 = v.iter().map(|r| r.1).sum::<u64>() / v.len() as u64;
            (s[s.len() / 2], exits)
        };
        let base = med(&results[0]).0;
        for (c, name) in configs.iter().enumerate() {
            let (secs, exits) = med(&results[c]);
            println!(
                "mediate: bs {:>6} {name:<26} {:>8.2} MB/s  time/(a) {:>5.2}  exits/request {:>6.2}  ({count} requests, median of {reps})",
                bs,
                total as f64 / secs / 1e6,
                secs / base,
                exits as f64 / count as f64,
            );
        }
    }
    agent.reboot().expect("reboot");
    vm.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    drop(sims);
}
