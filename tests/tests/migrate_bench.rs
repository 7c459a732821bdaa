//! The measurement behind `benches/migrate.sh` (ignored in the normal test run: a benchmark,
//! not a test). Live migration on this machine over TCP on loopback, with this VMM (the
//! guest has a `vfsim` VF with the `virtio-blk-vf` mediator, and the destination its own
//! `vfsim` over the same disk image) and with QEMU (same kernel, initramfs, command line and
//! memory; no VF), for each guest size: first idle (right after boot), then under the agent's
//! workload (this VMM: memory writer with a rate cap and disk writer; QEMU: the memory writer
//! only, having no disk). The idle migration's destination is the workload migration's source,
//! so each size boots once per VMM. Ours runs twice: over TCP (`vmm`) and over mutual TLS
//! (`tls`, certificates made with openssl; its own boot). After each migration the guest must answer on the
//! destination, and after the workload migration `workload_verify` must find no mismatch.
//!
//! Prints `migrate: <vmm|tls|qemu> <size> <idle|workload> downtime (source) X ms (until running
//! there) W ms total Y ms bytes Z iterations N` per migration as it completes, then the table
//! again, the TLS/TCP ratios of ours and the ours/QEMU ratios. Two downtimes, because QEMU measures its `downtime` on
//! the source, from the stop until its last byte is sent; ours is also measured to the
//! destination's "Resumed" (guest running there), which QEMU does not report. The ratio and
//! the "under QEMU's" aim compare like with like (source side); the 50 ms aim uses ours in
//! full.
//!
//! Env: `MIGRATE_BENCH_SIZES` (default `512M,1G`), `MIGRATE_BENCH_DOWNTIME_MS` (the downtime
//! budget given to both VMMs, default 50), `MIGRATE_BENCH_QEMU_MAX_BW` (QEMU's
//! `max-bandwidth` in bytes/s, default 0 = leave QEMU's default cap; this VMM gets no cap),
//! `MIGRATE_BENCH_TLS` (`off`: ours over TCP only).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::harness::migration::{
    follow, settle_workload, start_destination, start_source, workload,
};
use vmm_tests::harness::ports::free_port;
use vmm_tests::harness::tls::{Ca, Identity};
use vmm_tests::harness::workload::WorkloadClient;
use vmm_tests::harness::{
    Agent, AgentError, ApiClient, GuestImage, TestDir, Vfsim, Vm, DEFAULT_BOOT_TIMEOUT,
};

const DISK_SIZE: u64 = 64 << 20;
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The figures of one migration.
#[derive(Clone, Debug)]
struct Figures {
    vmm: &'static str,
    size: String,
    case: &'static str,
    /// Guest stopped until it runs on the destination (ours: until the destination's
    /// Resumed arrives; QEMU does not measure this).
    downtime_ms: f64,
    /// Guest stopped until the source has sent its last byte: QEMU's `downtime`.
    source_downtime_ms: f64,
    total_ms: f64,
    bytes: u64,
    iterations: u64,
    note: String,
}

impl Figures {
    fn line(&self) -> String {
        format!(
            "migrate: {:<4} {:<4} {:<8} downtime (source) {:>6.1} ms (until running there) {:>6} total {:>9.1} ms bytes {:>11} iterations {:>3}{}",
            self.vmm,
            self.size,
            self.case,
            self.source_downtime_ms,
            if self.downtime_ms.is_nan() {
                "-".to_string()
            } else {
                format!("{:.1} ms", self.downtime_ms)
            },
            self.total_ms,
            self.bytes,
            self.iterations,
            if self.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", self.note)
            }
        )
    }
}

fn check_verify(agent: &mut Agent, with_disk: bool, what: &str) {
    let v = agent.workload_verify().expect("workload_verify");
    eprintln!("{what}: verify on the destination: {v:?}");
    assert_eq!(
        v.mem_mismatches + v.block_mismatches + v.readback_mismatches,
        0,
        "{what}: {v:?}"
    );
    assert!(v.mem_regions_checked > 0, "{what}: {v:?}");
    if with_disk {
        assert!(v.blocks_checked > 0, "{what}: {v:?}");
    }
}

// ---------------------------------------------------------------------------------------
// This VMM.

struct Ours {
    dir: TestDir,
    disk: PathBuf,
    n: u32,
    /// Migrate over mutual TLS: the CA, the source's and the destinations' certificates.
    tls: Option<(Ca, Identity, Identity)>,
}

impl Ours {
    fn new(tls: bool) -> Ours {
        let dir = TestDir::new("migbench").expect("test dir");
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(DISK_SIZE)
            .unwrap();
        let tls = tls.then(|| {
            let ca = Ca::new(&dir, "ca").expect("test CA");
            let src = ca.issue("src", &[]).expect("source certificate");
            let dst = ca
                .issue("dst", &["IP:127.0.0.1"])
                .expect("destination certificate");
            (ca, src, dst)
        });
        Ours {
            dir,
            disk,
            n: 0,
            tls,
        }
    }

    /// The destination's URL on `port`.
    fn url(&self, port: u16) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "tcp" };
        format!("{scheme}:127.0.0.1:{port}")
    }

    /// The migrate request's `tls` (null for tcp:).
    fn request_tls(&self) -> Value {
        match &self.tls {
            Some((ca, src, _)) => json!({"cert": src.cert, "key": src.key, "ca": ca.id.cert}),
            None => Value::Null,
        }
    }

    /// A vfsim with a PF socket over the shared image, its --device option, and a fresh API
    /// socket path.
    fn vf(&mut self) -> (Vfsim, String, PathBuf) {
        self.n += 1;
        let v = Vfsim::start_with_pf(&self.dir, &self.disk, &format!("vf{}", self.n));
        let dev = format!(
            "vfio-mediated,socket={},mediator=virtio-blk-vf,pf={},id=vf0",
            v.socket.display(),
            v.pf.as_ref().unwrap().display()
        );
        let api = self.dir.join(format!("api{}.sock", self.n));
        (v, dev, api)
    }

    fn source(&mut self, memory: &str) -> (Vm, Vfsim, ApiClient, Agent) {
        let (vf, dev, api) = self.vf();
        let (vm, api, agent) = start_source(Vm::builder().memory(memory), &dev, &api);
        (vm, vf, api, agent)
    }

    /// A destination waiting on `port`, with its own vfsim and API socket.
    fn destination(&mut self, port: u16) -> (Vm, Vfsim, PathBuf) {
        let (vf, dev, api) = self.vf();
        let url = self.url(port);
        let mut builder = Vm::builder();
        if let Some((ca, _, dst)) = &self.tls {
            builder = builder.vmm_args(&["--migration-tls".to_string(), dst.option(ca)]);
        }
        let vm = start_destination(builder, &url, &dev, &api);
        (vm, vf, api)
    }
}

/// Migrates `src` (driven through `api`) to `port`; the figures from the API's final status,
/// else from the source's summary line.
fn migrate_ours(
    h: &Ours,
    src: &Vm,
    api: &mut ApiClient,
    port: u16,
    downtime_ms: u64,
    size: &str,
    case: &'static str,
) -> Figures {
    let url = h.url(port);
    api.request(
        &json!({"request": "migrate", "url": url, "downtime_ms": downtime_ms,
                        "tls": h.request_tls(), "follow": true}),
    )
    .expect("migrate");
    let status = follow(api, MIGRATION_TIMEOUT);
    assert_eq!(status["phase"], "completed", "{status}\n{}", src.describe());
    // Seen completed through the API (not only by the source's exit): the exact figures.
    let final_status = status.get("last").is_none().then_some(status);
    let st = src
        .wait_exit(Duration::from_secs(60))
        .expect("source exits");
    assert_eq!(st.code(), Some(0), "{}", src.describe());
    let log = src.vmm_stderr();
    for line in log.lines().filter(|l| l.contains("migration to")) {
        eprintln!("source ({size} {case}): {line}");
    }
    let summary = log
        .lines()
        .find(|l| l.contains("guest resumed there; downtime"))
        .unwrap_or_else(|| panic!("no summary in the source's log\n{log}"));
    // "... downtime X ms, total Y ms, Z MB sent in N iterations"
    let after = |key: &str| -> f64 {
        summary
            .split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("cannot read {key:?} in {summary:?}"))
    };
    let mb = summary
        .split("ms, ")
        .last()
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let mut f = Figures {
        vmm: if h.tls.is_some() { "tls" } else { "vmm" },
        size: size.to_string(),
        case,
        downtime_ms: after("downtime "),
        source_downtime_ms: f64::NAN,
        total_ms: after("total "),
        bytes: (mb * 1e6) as u64,
        iterations: after("sent in ") as u64,
        note: String::new(),
    };
    if let Some(s) = final_status {
        f.downtime_ms = s["downtime_ms"].as_f64().unwrap_or(f.downtime_ms);
        f.source_downtime_ms = s["stop_and_copy"]["sent_ms"].as_f64().unwrap_or(f64::NAN);
        f.total_ms = s["total_ms"].as_f64().unwrap_or(f.total_ms);
        f.bytes = s["bytes"].as_u64().unwrap_or(f.bytes);
    }
    f
}

/// Ours over TCP ("vmm"), or over mutual TLS ("tls").
fn bench_ours(size: &str, downtime_ms: u64, tls: bool, out: &mut Vec<Figures>) {
    let mut h = Ours::new(tls);
    let (src, _vf_a, mut api, agent) = h.source(size);
    drop(agent);

    // Idle, right after boot.
    let port = free_port();
    let (mid, _vf_b, mid_api) = h.destination(port);
    let f = migrate_ours(&h, &src, &mut api, port, downtime_ms, size, "idle");
    println!("{}", f.line());
    out.push(f);
    drop(api);
    let mut agent = mid.agent(Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "guest does not answer after the idle migration: {e}\n{}",
            mid.describe()
        )
    });
    agent.ping().expect("ping");

    // Under the workload, from the idle migration's destination.
    let mut api = ApiClient::connect(&mid_api, Duration::from_secs(10)).unwrap();
    agent.workload_start(&workload(true)).expect("workload");
    settle_workload(&mut agent);
    let port = free_port();
    let (dst, _vf_c, _) = h.destination(port);
    let f = migrate_ours(&h, &mid, &mut api, port, downtime_ms, size, "workload");
    println!("{}", f.line());
    out.push(f);
    drop(agent);
    let mut agent = dst.agent(Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "guest does not answer after the workload migration: {e}\n{}",
            dst.describe()
        )
    });
    check_verify(&mut agent, true, &format!("vmm {size} workload"));
    let _ = agent.workload_stop();
    let _ = agent.reboot();
    let _ = dst.wait_exit(Duration::from_secs(60));
}

// ---------------------------------------------------------------------------------------
// QEMU.

/// A QEMU process with its agent socket (COM2) and QMP socket; killed on drop.
struct Qemu {
    child: Child,
    name: String,
    dir: PathBuf,
    agent: PathBuf,
    qmp: PathBuf,
}

impl Qemu {
    fn start(dir: &TestDir, name: &str, memory: &str, incoming: Option<u16>) -> Qemu {
        let image = GuestImage::get().expect("guest image");
        let cmdline = Vm::builder().cmdline();
        let agent = dir.join(format!("{name}-agent.sock"));
        let qmp = dir.join(format!("{name}-qmp.sock"));
        let console = dir.join(format!("{name}-console.log"));
        let stderr = std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-enable-kvm", "-M", "pc"])
            .args([
                "-cpu",
                "host,-arch-capabilities,-xsave,-avx,-cx16,-kvm-pv-ipi,-kvm-pv-unhalt,-kvm-pv-sched-yield",
            ])
            .args(["-m", memory, "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", agent.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&image.vmlinux)
            .arg("-initrd")
            .arg(&image.initramfs)
            .arg("-append")
            .arg(&cmdline);
        if let Some(port) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start qemu-system-x86_64");
        eprintln!(
            "migrate-bench: started qemu {name} (pid {}), logs in {}",
            child.id(),
            dir.path().display()
        );
        Qemu {
            child,
            name: name.to_string(),
            dir: dir.path().to_path_buf(),
            agent,
            qmp,
        }
    }

    fn describe(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(s)) => format!("qemu exited: {s}"),
            _ => "qemu still running".into(),
        };
        let stderr = std::fs::read_to_string(self.dir.join(format!("{}.stderr", self.name)))
            .unwrap_or_default();
        format!("\n{state}\nstderr:\n{stderr}")
    }

    /// Connects to the agent and waits for a ping answer, reconnecting after 12 s of silence
    /// (QEMU 7.2's socket backend can stall input that arrives while the guest opens the
    /// port; see the harness's `Vm::agent`).
    fn agent(&mut self, timeout: Duration) -> Agent {
        let deadline = Instant::now() + timeout;
        loop {
            assert!(
                Instant::now() < deadline,
                "the agent did not answer within {timeout:?}{}",
                self.describe()
            );
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({s}) while waiting for the agent{}",
                    self.describe()
                );
            }
            let stream = match UnixStream::connect(&self.agent) {
                Ok(s) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let mut agent = Agent::from_unix_stream(stream).expect("agent");
            let connected = Instant::now();
            while connected.elapsed() < Duration::from_secs(12) && Instant::now() < deadline {
                match agent.ping_timeout(Duration::from_secs(3)) {
                    Ok(_) => return agent,
                    Err(AgentError::Timeout { .. } | AgentError::Remote { .. }) => {}
                    Err(e) => panic!("agent: {e}{}", self.describe()),
                }
            }
        }
    }

    fn qmp(&mut self) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(&self.qmp) {
                Ok(s) => return Qmp::new(s),
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot connect to QMP: {e}{}",
                        self.describe()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection, capabilities negotiated.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn new(s: UnixStream) -> Qmp {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let w = s.try_clone().unwrap();
        let mut q = Qmp {
            r: BufReader::new(s),
            w,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("reading QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs `cmd`; its `return` value (events in between are skipped).
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.w, "{msg}").expect("writing QMP");
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {cmd}: {e}");
            }
        }
    }
}

/// Migrates the QEMU behind `qmp` to `port`; the figures from `query-migrate`.
fn migrate_qemu(
    qmp: &mut Qmp,
    port: u16,
    downtime_ms: u64,
    max_bw: u64,
    size: &str,
    case: &'static str,
) -> Figures {
    let mut params = json!({"downtime-limit": downtime_ms});
    if max_bw > 0 {
        params["max-bandwidth"] = json!(max_bw);
    }
    qmp.execute("migrate-set-parameters", params);
    let p = qmp.execute("query-migrate-parameters", json!({}));
    eprintln!(
        "qemu ({size} {case}): downtime-limit {} ms, max-bandwidth {} B/s",
        p["downtime-limit"], p["max-bandwidth"]
    );
    qmp.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let s = loop {
        assert!(Instant::now() < deadline, "QEMU migration did not end");
        let s = qmp.execute("query-migrate", json!({}));
        match s["status"].as_str() {
            Some("completed") => break s,
            Some("failed") | Some("cancelled") => panic!("QEMU migration failed: {s}"),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("qemu ({size} {case}): query-migrate: {s}");
    let ram = &s["ram"];
    Figures {
        vmm: "qemu",
        size: size.to_string(),
        case,
        downtime_ms: f64::NAN,
        source_downtime_ms: s["downtime"].as_f64().unwrap_or(f64::NAN),
        total_ms: s["total-time"].as_f64().unwrap_or(f64::NAN),
        bytes: ram["total-transferred"]
            .as_u64()
            .or(ram["transferred"].as_u64())
            .unwrap_or(0),
        iterations: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        note: format!(
            "ram.total {} normal pages {} zero pages {}",
            ram["total"], ram["normal"], ram["duplicate"]
        ),
    }
}

fn bench_qemu(size: &str, downtime_ms: u64, max_bw: u64, out: &mut Vec<Figures>) {
    let dir = TestDir::new("migbench-qemu").expect("test dir");
    let mut src = Qemu::start(&dir, "q1", size, None);
    let mut qmp = src.qmp();
    let agent = src.agent(DEFAULT_BOOT_TIMEOUT);
    drop(agent);

    // Idle, right after boot.
    let port = free_port();
    let mut mid = Qemu::start(&dir, "q2", size, Some(port));
    let mut mid_qmp = mid.qmp();
    let f = migrate_qemu(&mut qmp, port, downtime_ms, max_bw, size, "idle");
    println!("{}", f.line());
    out.push(f);
    drop(qmp);
    drop(src);
    let st = mid_qmp.execute("query-status", json!({}));
    assert_eq!(
        st["status"], "running",
        "destination after the idle migration: {st}"
    );
    let mut agent = mid.agent(Duration::from_secs(60));
    agent.ping().expect("ping");

    // Under the workload (memory writer only), from the idle migration's destination.
    agent.workload_start(&workload(false)).expect("workload");
    settle_workload(&mut agent);
    let port = free_port();
    let mut dst = Qemu::start(&dir, "q3", size, Some(port));
    let mut dst_qmp = dst.qmp();
    let f = migrate_qemu(&mut mid_qmp, port, downtime_ms, max_bw, size, "workload");
    println!("{}", f.line());
    out.push(f);
    drop(agent);
    drop(mid_qmp);
    drop(mid);
    let st = dst_qmp.execute("query-status", json!({}));
    assert_eq!(
        st["status"], "running",
        "destination after the workload migration: {st}"
    );
    let mut agent = dst.agent(Duration::from_secs(60));
    check_verify(&mut agent, false, &format!("qemu {size} workload"));
    let _ = agent.workload_stop();
}

#[test]
#[ignore = "benchmark: run by benches/migrate.sh"]
fn migration_vmm_vs_qemu() {
    let sizes = env_str("MIGRATE_BENCH_SIZES", "512M,1G");
    let downtime_ms = env_u64("MIGRATE_BENCH_DOWNTIME_MS", 50);
    let max_bw = env_u64("MIGRATE_BENCH_QEMU_MAX_BW", 0);
    let only = env_str("MIGRATE_BENCH_ONLY", "");
    let tls = env_str("MIGRATE_BENCH_TLS", "on") != "off";
    let mut out = Vec::new();
    for size in sizes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if only != "qemu" {
            bench_ours(size, downtime_ms, false, &mut out);
            if tls {
                bench_ours(size, downtime_ms, true, &mut out);
            }
        }
        if only != "vmm" {
            bench_qemu(size, downtime_ms, max_bw, &mut out);
        }
    }

    println!("migrate: downtime budget {downtime_ms} ms for both; loopback TCP; 1 vCPU; QEMU without a VF and with the memory writer only");
    for f in &out {
        println!("{}", f.line());
    }
    for f in out.iter().filter(|f| f.vmm == "vmm") {
        let Some(q) = out
            .iter()
            .find(|q| q.vmm == "qemu" && q.size == f.size && q.case == f.case)
        else {
            continue;
        };
        println!(
            "migrate: ratio vmm/qemu {:<4} {:<8} downtime (source, like for like) {:.2} total {:.2} bytes {:.2} iterations {:.2}",
            f.size,
            f.case,
            f.source_downtime_ms / q.source_downtime_ms,
            f.total_ms / q.total_ms,
            f.bytes as f64 / q.bytes as f64,
            f.iterations as f64 / q.iterations as f64
        );
    }
    for t in out.iter().filter(|f| f.vmm == "tls") {
        let Some(f) = out
            .iter()
            .find(|f| f.vmm == "vmm" && f.size == t.size && f.case == t.case)
        else {
            continue;
        };
        println!(
            "migrate: ratio tls/tcp  {:<4} {:<8} downtime {:.2} downtime (source) {:.2} total {:.2} bytes {:.2} iterations {:.2}",
            t.size,
            t.case,
            t.downtime_ms / f.downtime_ms,
            t.source_downtime_ms / f.source_downtime_ms,
            t.total_ms / f.total_ms,
            t.bytes as f64 / f.bytes as f64,
            t.iterations as f64 / f.iterations as f64
        );
    }
    for f in out.iter().filter(|f| f.vmm == "vmm") {
        let q = out
            .iter()
            .find(|q| q.vmm == "qemu" && q.size == f.size && q.case == f.case);
        // The 50 ms aim holds for the whole downtime (until the guest runs there); the
        // comparison with QEMU uses its definition (until the source has sent everything).
        let under_50 = f.case != "idle" || f.downtime_ms < 50.0;
        let under_qemu = q.is_none_or(|q| f.source_downtime_ms < q.source_downtime_ms);
        println!(
            "migrate: aim {:<4} {:<8} {}{}",
            f.size,
            f.case,
            if f.case == "idle" {
                format!(
                    "downtime < 50 ms: {} ",
                    if under_50 { "met" } else { "NOT met" }
                )
            } else {
                String::new()
            },
            match q {
                Some(_) => format!(
                    "downtime (source) < QEMU's: {}",
                    if under_qemu { "met" } else { "NOT met" }
                ),
                None => String::new(),
            }
        );
    }
}
