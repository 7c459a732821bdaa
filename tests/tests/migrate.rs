//! Live migration between two "hosts": two network namespaces joined by a veth pair, each
//! with its own vfsim over one shared disk image. The guest runs a memory writer and a disk
//! writer during the migration and verifies both afterwards on the destination.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::agent::protocol::WorkloadVerifyReply;
use vmm_tests::harness::migration::{settle_workload, start_destination, start_source, workload};
use vmm_tests::harness::netns::{NetnsPair, Side};
use vmm_tests::harness::tls::{Ca, Identity};
use vmm_tests::harness::workload::WorkloadClient;
use vmm_tests::harness::{ApiClient, Device, TestDir, Vfsim, Vm};

const DISK_SIZE: u64 = 64 << 20;
const PORT: u16 = 4444;

struct Hosts {
    pair: NetnsPair,
    dir: TestDir,
    disk: std::path::PathBuf,
    n: u32,
    /// vfsim's own vfio-user migration instead of the virtio-blk-vf mediator.
    native: bool,
    /// Migrate over mutual TLS (`tls:`) instead of clear TCP.
    tls: Option<Pki>,
}

/// One CA and the two hosts' certificates it signed (B's for its address).
struct Pki {
    ca: Ca,
    src: Identity,
    dst: Identity,
}

impl Pki {
    fn new(dir: &TestDir) -> Pki {
        let ca = Ca::new(dir, "ca").expect("test CA");
        let dst = ca
            .issue(
                "host-b",
                &[&format!("IP:{}", vmm_tests::harness::netns::ADDR_B)],
            )
            .expect("B's certificate");
        let src = ca.issue("host-a", &[]).expect("A's certificate");
        Pki { ca, src, dst }
    }
}

impl Hosts {
    fn new(label: &str) -> Hosts {
        let pair = NetnsPair::create(label).expect("network namespaces");
        let dir = TestDir::new(label).expect("test dir");
        let disk = dir.disk("disk.img", DISK_SIZE);
        Hosts {
            pair,
            dir,
            disk,
            n: 0,
            native: false,
            tls: None,
        }
    }

    /// Migrations from here on go over mutual TLS.
    fn with_tls(mut self) -> Hosts {
        self.tls = Some(Pki::new(&self.dir));
        self
    }

    /// The destination's URL on `port` in B.
    fn url(&self, port: u16) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "tcp" };
        format!("{scheme}:{}:{port}", self.pair.addr(Side::B))
    }

    /// `vmm ctl migrate`'s TLS arguments (none for tcp:).
    fn ctl_tls_args(&self) -> Vec<String> {
        match &self.tls {
            Some(p) => vec!["--tls".into(), p.src.option(&p.ca)],
            None => vec![],
        }
    }

    /// The VF as the guest has it: behind the virtio-blk-vf mediator, or migrating by itself.
    fn device(&self) -> Device {
        if self.native {
            Device::native("vf0", DISK_SIZE)
        } else {
            Device::mediated("vf0", "virtio-blk-vf", DISK_SIZE)
        }
    }

    /// A vfsim on `side` over the shared image, and its --device option.
    fn vf(&mut self, side: Side) -> (Vfsim, String) {
        self.n += 1;
        let name = format!("vf{}", self.n);
        let ns = self.pair.name(side);
        self.device()
            .start_vfsim(&self.dir, &name, Some(ns), Some(&self.disk))
    }

    /// The source in A, restored from the golden snapshot of this configuration.
    fn source(&mut self) -> (Vm, Vfsim, ApiClient, vmm_tests::harness::Agent) {
        let (vf, dev) = self.vf(Side::A);
        let builder = Vm::builder()
            .netns(self.pair.name(Side::A))
            .golden(&[self.device()]);
        let (vm, api, agent) = start_source(builder, &dev, &self.dir.join("api-src.sock"));
        (vm, vf, api, agent)
    }

    /// A destination VMM waiting on `port` in B, with its own vfsim.
    fn destination(&mut self, port: u16) -> (Vm, Vfsim) {
        let (vf, dev) = self.vf(Side::B);
        let url = self.url(port);
        let mut builder = Vm::builder().netns(self.pair.name(Side::B));
        if let Some(p) = &self.tls {
            builder = builder.vmm_args(&["--migration-tls".to_string(), p.dst.option(&p.ca)]);
        }
        (
            start_destination(builder, &url, &dev, &self.dst_api(port)),
            vf,
        )
    }

    /// The API socket of the destination waiting on `port`.
    fn dst_api(&self, port: u16) -> std::path::PathBuf {
        self.dir.join(format!("api-dst-{port}.sock"))
    }
}

/// Migrates with `vmm ctl migrate`, as an operator does, and returns the final status. Its
/// exit code must tell the truth: 0 exactly when the migration completed.
fn migrate(api: &mut ApiClient, url: &str, args: &[&str]) -> Value {
    let out = api.ctl_migrate(url, args);
    eprintln!("vmm ctl migrate: exit {:?}\n{}", out.code, out.stderr);
    if out.code == Some(0) {
        assert_eq!(out.status["phase"], "completed", "{out:?}");
        return out.status;
    }
    assert_eq!(out.code, Some(1), "{out:?}");
    let status = api
        .request(&json!({"request": "migration-status"}))
        .unwrap_or_else(|e| panic!("ctl said it failed but the source is gone ({e}): {out:?}"));
    assert_eq!(status["phase"], "failed", "ctl exited 1: {out:?}\n{status}");
    status
}

/// What the guest's threads are doing, its clock and interrupts (for failure reports).
fn guest_diag(agent: &mut vmm_tests::harness::Agent) -> String {
    let script = "cat /proc/uptime /proc/loadavg; grep -E 'LOC|PCI-MSI' /proc/interrupts; \
                  grep -H . /proc/1/task/*/comm /proc/1/task/*/wchan; \
                  grep -H State /proc/1/task/*/status; dmesg | tail -8";
    vmm_tests::harness::run(agent, &["sh", "-c", script]).stdout
}

/// The mediated path, over mutual TLS: the guest moves from A to B while it writes memory
/// and disk; on B every checksum and every acknowledged block verifies, and I/O goes on.
#[test]
fn live_migration_between_two_hosts() {
    live_migration(Hosts::new("mig").with_tls());
}

/// The same with the native vfio-user path: no mediator, vfsim migrates itself over
/// vfio-user's migration messages (state and DMA dirty logging).
#[test]
fn live_migration_between_two_hosts_native_vfio_user() {
    let mut h = Hosts::new("mignat");
    h.native = true;
    live_migration(h);
}

/// Pre-copy's bandwidth cap in the migration tests: the first pass then takes seconds, so
/// the guest's disk writer reads blocks back (writes by DMA, which KVM's dirty log does not
/// see) into pages already sent, and only the device's dirty tracking brings them over again.
/// Without the cap a migration here takes under half a second and whether any page goes
/// stale is luck.
const TEST_BANDWIDTH_MB_S: u64 = 40;

fn live_migration(mut h: Hosts) {
    let (dst, _vf_b, mut agent, v) = migrate_under_workload(&mut h, true);
    assert_eq!(v.mem_mismatches, 0, "{v:?}");
    assert_eq!(v.block_mismatches, 0, "{v:?}");
    assert_eq!(v.readback_mismatches, 0, "{v:?}");
    assert!(
        v.mem_regions_checked > 0 && v.blocks_checked > 0 && v.readback_slots_checked > 0,
        "{v:?}"
    );
    if !h.native {
        // The source's tracking trapped the doorbells (a local trap, not in the saved
        // state): on B they are mapped.
        let mut api =
            ApiClient::connect(&h.dst_api(PORT), Duration::from_secs(10)).expect("B's API");
        let stats = api.device_stats("vf0").expect("device stats on B");
        assert_eq!(
            stats["bars"][0]["trapped"],
            json!([]),
            "doorbells still trapped on B: {stats}"
        );
    }
    // I/O continues on B (the writers keep going; checked through their counters).
    let acked = |agent: &mut vmm_tests::harness::Agent| {
        agent
            .workload_status()
            .expect("status on B")
            .disk
            .expect("disk writer")
            .acked
    };
    let before_io = acked(&mut agent);
    std::thread::sleep(Duration::from_secs(5));
    let after_io = acked(&mut agent);
    assert!(
        after_io > before_io,
        "disk writes continue on B: {before_io} -> {after_io}\n{}",
        guest_diag(&mut agent)
    );
    agent.reboot().expect("reboot");
    let st = dst
        .wait_exit(Duration::from_secs(120))
        .expect("destination exits");
    assert_eq!(st.code(), Some(0), "{}", dst.describe());
}

/// The migration of [`live_migration`]: workload on A, migrate to B (pre-copy capped at
/// [`TEST_BANDWIDTH_MB_S`], iterated to its cap of passes), the source exits 0; returns B,
/// B's vfsim (which must outlive the guest's I/O), an agent on B and the guest's
/// verification there. `device_tracking: false` switches the mediator's ring walk off (a
/// test-only switch), so the device's DMA writes are not reported.
fn migrate_under_workload(
    h: &mut Hosts,
    device_tracking: bool,
) -> (Vm, Vfsim, vmm_tests::harness::Agent, WorkloadVerifyReply) {
    let (src, _vf_a, mut api, mut agent) = h.source();
    agent.workload_start(&workload(true)).expect("workload");
    settle_workload(&mut agent);
    if !device_tracking {
        api.mediator("vf0", "skip-ring-walk", json!({"on": true}))
            .unwrap();
    }
    let before = (agent.ping().expect("ping").uptime_ms, Instant::now());
    let (dst, vf_b) = h.destination(PORT);
    let url = h.url(PORT);
    let tls_args = h.ctl_tls_args();
    let t = Instant::now();
    // A 1 ms budget keeps pre-copy iterating (to its cap of passes) after the first pass,
    // while the device keeps writing read-back buffers by DMA into pages already sent: the
    // case device dirty tracking exists for.
    let bandwidth = TEST_BANDWIDTH_MB_S.to_string();
    let mut args = vec!["--downtime-ms", "1", "--max-bandwidth-mb-s", &bandwidth];
    args.extend(tls_args.iter().map(String::as_str));
    let status = migrate(&mut api, &url, &args);
    let total = t.elapsed();
    assert_eq!(status["phase"], "completed", "{status}\n{}", src.describe());
    let st = src
        .wait_exit(Duration::from_secs(30))
        .expect("source exits");
    assert_eq!(st.code(), Some(0), "{}", src.describe());
    let log = src.vmm_stderr();
    for line in log.lines().filter(|l| l.contains("migration to")) {
        eprintln!("source: {line}");
    }
    let summary = log
        .lines()
        .find(|l| l.contains("guest resumed there; downtime"))
        .unwrap_or_else(|| panic!("no summary in the source's log\n{log}"));
    eprintln!("migration A -> B took {total:?} as seen by the API client: {summary}");
    // The cap holds: the first pass (all of RAM) went no faster than asked.
    let first_pass = log
        .lines()
        .find(|l| l.contains("iteration 0: sent"))
        .and_then(|l| l.split(" MB total at ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|r| r.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no first pass in the source's log\n{log}"));
    assert!(
        first_pass <= TEST_BANDWIDTH_MB_S as f64 * 1.05,
        "first pass at {first_pass} MB/s, capped at {TEST_BANDWIDTH_MB_S}"
    );
    drop(agent);
    let mut agent = dst
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("guest does not answer on B: {e}\n{}", dst.describe()));
    let after = (agent.ping().expect("ping on B").uptime_ms, Instant::now());
    let guest_ms = after.0 as f64 - before.0 as f64;
    let host_ms = after.1.duration_since(before.1).as_secs_f64() * 1e3;
    eprintln!("guest time across the migration: {guest_ms:.0} ms, host time {host_ms:.0} ms");
    let v = agent.workload_verify().expect("verify on B");
    eprintln!("verify on B (device dirty tracking {device_tracking}): {v:?}");
    (dst, vf_b, agent, v)
}

/// "The check can fail": the migration of [`live_migration`] with the mediator's ring walk
/// switched off. Blocks the device read back into guest pages by DMA after those pages were
/// sent are then not sent again, and the guest's verification on B finds them stale.
#[test]
fn migration_without_device_dirty_tracking_is_detected() {
    let mut h = Hosts::new("mignd");
    let (dst, _vf_b, mut agent, v) = migrate_under_workload(&mut h, false);
    assert!(
        v.readback_mismatches + v.block_mismatches + v.mem_mismatches > 0,
        "stale DMA pages must be detected: {v:?}"
    );
    let _ = agent.reboot();
    let _ = dst.wait_exit(Duration::from_secs(60));
}

/// A TCP proxy in B between the source and the destination that forwards the source's
/// stream section by section and lets the test break it.
enum Fault {
    /// Flip one byte of the stream at this offset.
    CorruptByte(u64),
    /// Rewrite the header's format version.
    Version(u32),
    /// Kill the destination (this pid) when the source says stop-and-copy begins.
    KillAtStopAndCopy(u32),
}

fn proxy(h: &Hosts, listen_port: u16, dest_port: u16, fault: Fault) -> std::thread::JoinHandle<()> {
    let b = h.pair.addr(Side::B);
    let listener = h
        .pair
        .within(Side::B, move || TcpListener::bind((b, listen_port)))
        .unwrap()
        .expect("proxy listen");
    let connect = {
        // Connect from inside B when the source arrives.
        let name = h.pair.name(Side::B).to_string();
        move || -> TcpStream {
            let path = format!("/var/run/netns/{name}");
            let f = std::fs::File::open(path).expect("netns handle");
            std::thread::scope(|s| {
                s.spawn(|| {
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on an open namespace fd changes this thread's network
                    // namespace only.
                    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                    TcpStream::connect((b, dest_port)).expect("proxy connect")
                })
                .join()
                .unwrap()
            })
        }
    };
    std::thread::spawn(move || {
        let (from_src, _) = listener.accept().expect("proxy accept");
        let to_dst = connect();
        // Answers from the destination go back unchanged.
        let (mut back_r, mut back_w) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_r, &mut back_w);
            let _ = back_w.shutdown(std::net::Shutdown::Both);
        });
        forward(from_src, to_dst, fault);
    })
}

fn forward(mut from: TcpStream, mut to: TcpStream, fault: Fault) {
    use std::io::{Read, Write};
    match fault {
        Fault::CorruptByte(_) | Fault::Version(_) => {
            let mut off = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    let pos = off + i as u64;
                    match fault {
                        Fault::CorruptByte(at) if pos == at => *b ^= 0x40,
                        Fault::Version(v) if (8..12).contains(&pos) => {
                            *b = v.to_le_bytes()[(pos - 8) as usize]
                        }
                        _ => {}
                    }
                }
                off += n as u64;
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
        Fault::KillAtStopAndCopy(pid) => {
            let mut r = migration::StreamReader::read_header(from).expect("source header");
            let mut w = migration::StreamWriter::write_header(to, r.flags()).expect("dest header");
            while let Ok(s) = r.next_section() {
                if s == migration::Section::Control(migration::Control::StopAndCopy) {
                    // SAFETY: kill(2) with a pid this test started; no memory involved.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    return;
                }
                if s == migration::Section::End || w.write(&s).is_err() {
                    break;
                }
                let _ = w.flush();
            }
        }
    }
}

/// Faults during a migration leave the source running with its guest's data intact: a
/// corrupted byte, a version mismatch, the destination killed during stop-and-copy, the
/// link cut during pre-copy (over TCP, then over TLS). Each time the destination (if alive)
/// names the cause: it exits non-zero once it accepted the stream's start, and refuses a
/// stream of another version at its start and waits on for the real source; the source's
/// workload verifies.
#[test]
fn migration_faults_leave_the_source_running() {
    let mut h = Hosts::new("migf");
    let (src, _vf_a, mut api, mut agent) = h.source();
    agent.workload_start(&workload(true)).expect("workload");
    settle_workload(&mut agent);
    let b = h.pair.addr(Side::B);
    type MakeFault = Box<dyn Fn(u32) -> Fault>;
    // (what, port, fault, the destination's cause, whether the destination waits on)
    let cases: Vec<(&str, u16, MakeFault, &str, bool)> = vec![
        (
            "corrupted byte",
            4501,
            Box::new(|_| Fault::CorruptByte(300_000)),
            "CRC mismatch",
            false,
        ),
        (
            "version mismatch",
            4502,
            Box::new(|_| Fault::Version(99)),
            "version 99",
            true,
        ),
        (
            "destination killed at stop-and-copy",
            4503,
            Box::new(Fault::KillAtStopAndCopy),
            "",
            false,
        ),
    ];
    for (what, port, fault, cause, survives) in cases {
        let (dst, _vf_b) = h.destination(port);
        let _p = proxy(&h, port + 100, port, fault(dst.pid()));
        let status = migrate(&mut api, &format!("tcp:{b}:{}", port + 100), &[]);
        eprintln!("{what}: source status {status}");
        assert_eq!(status["phase"], "failed", "{what}: {status}");
        if survives {
            assert!(
                status["error"].as_str().unwrap_or("").contains(cause),
                "{what}: the source hears why: {status}"
            );
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                dst.try_exit_status().unwrap().is_none(),
                "{what}: the destination must wait on for the real source\n{}",
                dst.describe()
            );
            assert!(
                dst.vmm_stderr().contains(cause) && dst.vmm_stderr().contains("refused"),
                "{what}: the destination logs the refusal\n{}",
                dst.vmm_stderr()
            );
            drop(dst);
        } else {
            let st = dst
                .wait_exit(Duration::from_secs(90))
                .expect("destination exits");
            assert_ne!(
                st.code(),
                Some(0),
                "{what}: destination must fail\n{}",
                dst.describe()
            );
            if !cause.is_empty() {
                assert!(
                    dst.vmm_stderr().contains(cause),
                    "{what}: the destination names the cause ({cause})\n{}",
                    dst.vmm_stderr()
                );
            }
        }
        let v = agent.workload_verify().expect("verify on the source");
        assert_eq!(
            v.mem_mismatches + v.block_mismatches + v.readback_mismatches,
            0,
            "{what}: {v:?}"
        );
        let stats = api.device_stats("vf0").unwrap();
        assert_eq!(
            stats["bars"][0]["trapped"],
            json!([]),
            "{what}: untrapped again"
        );
        assert_eq!(stats["migration_state"], "running", "{what}: {stats}");
    }
    // The link cut during pre-copy: the source gives up after its I/O timeout (30 s), over
    // clear TCP and over TLS alike. (Through rustls's own stream writer a TLS source took
    // over two minutes: it dropped the first error and waited out a receive timeout on
    // every blocked write; `migrate/tls` writes the records itself now.)
    let mut dsts = Vec::new();
    for (tls, port) in [(false, PORT), (true, PORT + 1)] {
        if tls {
            h.tls = Some(Pki::new(&h.dir));
        }
        let (dst, vf_b) = h.destination(port);
        let mut req = json!({"request": "migrate", "url": h.url(port)});
        if let Some(p) = &h.tls {
            req["tls"] = json!({"cert": p.src.cert, "key": p.src.key, "ca": p.ca.id.cert});
        }
        api.request(&req).unwrap();
        let t = Instant::now();
        loop {
            let s = api
                .request(&json!({"request": "migration-status"}))
                .unwrap();
            // Cut as soon as pre-copy runs (its first pass over RAM takes about a second).
            if s["phase"] == "pre-copy" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no pre-copy: {s}");
            std::thread::sleep(Duration::from_millis(5));
        }
        h.pair.link_down().unwrap();
        let cut = Instant::now();
        let status = loop {
            let s = api
                .request(&json!({"request": "migration-status"}))
                .unwrap();
            if s["phase"] == "failed" || s["phase"] == "completed" {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(150),
                "source stuck: {s}\nthe source's threads:{}\n{}",
                vmm_tests::harness::diag::threads(src.pid()),
                src.describe()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        h.pair.link_up().unwrap();
        let over = if tls { "TLS" } else { "TCP" };
        eprintln!(
            "link cut over {over}: source gave up {:?} after the cut: {status}",
            cut.elapsed()
        );
        assert_eq!(status["phase"], "failed", "{over}: {status}");
        // One 30 s I/O timeout, not one per write that found a little room, nor more for
        // the Abort (the poll above adds up to 0.5 s).
        assert!(
            cut.elapsed() < Duration::from_secs(45),
            "{over}: the source gave up {:?} after the cut: {status}",
            cut.elapsed()
        );
        dsts.push((dst, vf_b));
    }
    let v = agent.workload_verify().expect("verify on the source");
    assert_eq!(
        v.mem_mismatches + v.block_mismatches + v.readback_mismatches,
        0,
        "{v:?}"
    );
    for (dst, _vf_b) in &dsts {
        let st = dst
            .wait_exit(Duration::from_secs(120))
            .expect("destination exits");
        assert_ne!(st.code(), Some(0), "{}", dst.describe());
    }
    // (No workload_stop: with both writers saturating the guest's one vCPU the agent's
    // 30 s stop timeout is sometimes exceeded; the reboot ends them anyway.)
    agent.reboot().expect("reboot");
    assert_eq!(
        src.wait_exit(Duration::from_secs(120)).unwrap().code(),
        Some(0)
    );
}
