//! The agent protocol end to end without a VM: the built `guest-agent --stdio`, driven by the
//! harness's `Agent` client over pipes.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::agent::{pattern, workload};
use vmm_tests::harness::{
    Agent, AgentError, BlkRequest, RunRequest, TestDir, WorkloadClient, WorkloadDisk,
    WorkloadStartRequest, WorkloadStatus,
};

/// A `guest-agent --stdio` child and a client talking to it.
struct Local {
    child: Child,
    agent: Agent,
}

impl Local {
    fn start() -> Local {
        let mut child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn guest-agent --stdio");
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take().expect("piped stdin");
        let mut agent = Agent::new(stdout, stdin);
        agent.set_timeout(Duration::from_secs(30));
        Local { child, agent }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn remote_error(e: AgentError) -> String {
    match e.remote_message() {
        Some(m) => m.to_owned(),
        None => panic!("expected an error reply, got {e}"),
    }
}

#[test]
fn ping() {
    let mut l = Local::start();
    let p = l.agent.ping().unwrap();
    assert!(!p.kernel.is_empty());
    assert!(p.cpus >= 1);
    assert!(p.uptime_ms > 0);
}

#[test]
fn run_status_output_and_stdin() {
    let mut l = Local::start();
    let out = l.agent.run(&["/bin/sh", "-c", "echo hi; exit 3"]).unwrap();
    assert_eq!(out.status, Some(3));
    assert_eq!(out.signal, None);
    assert_eq!(out.stdout, "hi\n");
    assert_eq!(out.stderr, "");

    let mut req = RunRequest::new(&["/bin/sh", "-c", "tr a-z A-Z; echo oops >&2"]);
    req.stdin = Some("shout\n".into());
    let out = l.agent.run_request(&req).unwrap();
    assert!(out.success());
    assert_eq!(out.stdout, "SHOUT\n");
    assert_eq!(out.stderr, "oops\n");
}

#[test]
fn run_spawn_failure() {
    let mut l = Local::start();
    let msg = remote_error(l.agent.run(&["/no/such/program", "x"]).unwrap_err());
    assert!(msg.contains("/no/such/program"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
    // Still serving.
    l.agent.ping().unwrap();
}

#[test]
fn run_timeout() {
    let mut l = Local::start();
    let mut req = RunRequest::new(&["/bin/sh", "-c", "sleep 30"]);
    req.timeout_ms = Some(300);
    let start = Instant::now();
    let msg = remote_error(l.agent.run_request(&req).unwrap_err());
    assert!(msg.contains("timed out after 300 ms"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(15));
    l.agent.ping().unwrap();
}

#[test]
fn garbage_partial_and_long_lines_get_error_replies() {
    let mut l = Local::start();
    let wait = Duration::from_secs(10);
    // Not JSON, then an empty line (ignored), then a line cut short by a newline.
    l.agent
        .send_raw(b"\x00\xffgarbage\n\n{\"id\":5,\"op\":\"pi\n")
        .unwrap();
    for _ in 0..2 {
        let reply = l.agent.next_reply(wait).unwrap();
        assert_eq!(reply.id, None);
        assert!(reply.result.unwrap_err().contains("not valid JSON"));
    }
    // Readable id, bad op or fields: the error carries the id.
    l.agent
        .send_raw(b"{\"id\":77,\"op\":\"fly\"}\n{\"id\":78,\"op\":\"run\"}\n")
        .unwrap();
    let reply = l.agent.next_reply(wait).unwrap();
    assert_eq!(reply.id, Some(77));
    assert!(reply.result.unwrap_err().contains("unknown op"));
    let reply = l.agent.next_reply(wait).unwrap();
    assert_eq!(reply.id, Some(78));
    assert!(reply.result.unwrap_err().contains("argv"));
    // A line over 1 MiB is refused as a whole.
    let mut long = vec![b'{'; (1 << 20) + 100];
    long.push(b'\n');
    l.agent.send_raw(&long).unwrap();
    let reply = l.agent.next_reply(wait).unwrap();
    assert_eq!(reply.id, None);
    assert!(reply.result.unwrap_err().contains("longer than"));
    // And the agent keeps serving, a request in two writes included.
    l.agent.send_raw(b"{\"id\":90,\"op\":").unwrap();
    l.agent.send_raw(b"\"ping\"}\n").unwrap();
    let reply = l.agent.next_reply(wait).unwrap();
    assert_eq!(reply.id, Some(90));
    assert!(reply.result.is_ok());
    let v = l.agent.request(json!({"op": "ping"})).unwrap();
    assert!(v["cpus"].as_u64().unwrap() >= 1);
}

#[test]
fn blk_write_verify_and_corruption() {
    let mut l = Local::start();
    let dir = TestDir::new("agent-blk").unwrap();
    let path = dir.join("disk.img");
    let mut req = BlkRequest {
        path: path.to_string_lossy().into_owned(),
        offset: 4096,
        block_size: 4096,
        blocks: 300,
        seed: 11,
        direct: false,
    };
    let w = l.agent.blk_write(&req).unwrap();
    assert_eq!(w.bytes, 300 * 4096);
    let v = l.agent.blk_verify(&req).unwrap();
    assert_eq!(
        (v.bytes, v.mismatches, v.first_mismatch),
        (300 * 4096, 0, None)
    );

    // The file holds exactly the pattern, which the host can compute too.
    let data = std::fs::read(&path).unwrap();
    assert_eq!(
        &data[4096 * 2..4096 * 3],
        pattern::block(11, 2, 4096).as_slice()
    );
    let sum = l.agent.checksum(&req.path, 4096, 300 * 4096).unwrap();
    assert_eq!(sum.crc, pattern::checksum(&data[4096..]));

    // Flip one byte of absolute block 42 (at byte 42 * 4096).
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let at = 42 * 4096 + 1000;
    file.write_all_at(&[data[at] ^ 0x5a], at as u64).unwrap();
    let v = l.agent.blk_verify(&req).unwrap();
    assert_eq!((v.mismatches, v.first_mismatch), (1, Some(42)));

    // O_DIRECT: tmpfs may refuse it (EINVAL); when it works the data must verify.
    req.direct = true;
    req.seed = 12;
    match l.agent.blk_write(&req) {
        Ok(_) => {
            let v = l.agent.blk_verify(&req).unwrap();
            assert_eq!(v.mismatches, 0);
        }
        Err(e) => {
            let msg = remote_error(e);
            assert!(msg.contains("O_DIRECT"), "{msg}");
        }
    }
    req.block_size = 1000;
    let msg = remote_error(l.agent.blk_write(&req).unwrap_err());
    assert!(msg.contains("multiple"), "{msg}");
}

#[test]
fn mem_fill_and_check() {
    let mut l = Local::start();
    let msg = remote_error(l.agent.mem_check().unwrap_err());
    assert!(msg.contains("mem_fill first"), "{msg}");
    let fill = l.agent.mem_fill(8, 3).unwrap();
    assert_eq!(fill.bytes, 8 << 20);
    let check = l.agent.mem_check().unwrap();
    assert!(check.intact);
    assert_eq!((check.crc, check.expected), (fill.crc, fill.crc));
    // Deterministic: a refill with the same seed gives the same checksum, another seed not.
    assert_eq!(l.agent.mem_fill(8, 3).unwrap().crc, fill.crc);
    assert_ne!(l.agent.mem_fill(8, 4).unwrap().crc, fill.crc);
    let msg = remote_error(l.agent.mem_fill(1 << 40, 0).unwrap_err());
    assert!(msg.contains("available"), "{msg}");
}

#[test]
fn reboot_and_poke_refused_outside_pid1() {
    let mut l = Local::start();
    let msg = remote_error(l.agent.reboot().unwrap_err());
    assert!(msg.contains("only available as PID 1"), "{msg}");
    let msg = remote_error(l.agent.poke(&[0x80], &[0xfee0_0000]).unwrap_err());
    assert!(msg.contains("only available as PID 1"), "{msg}");
    l.agent.ping().unwrap();
}

#[test]
fn eof_ends_the_agent_and_the_client_sees_it() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"{\"id\":1,\"op\":\"ping\"}").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    // The last line had no newline: it is still answered.
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("{") && text.contains("\"id\":1") && text.ends_with("}\n"));
}

#[test]
fn usage_without_mode() {
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("usage: guest-agent --stdio"), "{stderr}");
}

/// Polls `workload_status` until `done` holds (20 s at most).
fn wait_status(
    l: &mut Local,
    what: &str,
    done: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = l.agent.workload_status().unwrap();
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workload_runs_verifies_and_catches_disk_corruption() {
    let mut l = Local::start();
    let dir = TestDir::new("agent-workload").unwrap();
    let path = dir.join("disk.img");
    const BLOCKS: u64 = 256;
    const FIRST: u64 = 4; // offset / block_size
    let start = l
        .agent
        .workload_start(&WorkloadStartRequest {
            mem_mib: 4,
            disk: Some(WorkloadDisk {
                path: path.to_string_lossy().into_owned(),
                offset: FIRST * 4096,
                block_size: 4096,
                blocks: BLOCKS,
                direct: None,
                readback: None,
            }),
            seed: 77,
            ..Default::default()
        })
        .unwrap();
    assert!(start.running);
    let disk = start.disk.as_ref().unwrap();
    eprintln!("disk writer: O_DIRECT {}", disk.direct);
    assert_eq!(start.mem.as_ref().unwrap().chunks, 1024);

    // Two memory passes and two disk laps.
    let s = wait_status(&mut l, "two passes and two laps", |s| {
        s.mem.as_ref().unwrap().passes >= 2 && s.disk.as_ref().unwrap().acked >= 2 * BLOCKS
    });
    let d = s.disk.unwrap();
    assert_eq!(d.errors, 0, "{:?}", d.last_error);
    assert_eq!(d.recorded_blocks, BLOCKS);
    assert!(d.readbacks >= BLOCKS);

    let v = l.agent.workload_verify().unwrap();
    assert!(v.is_clean(), "{v:?}");
    assert_eq!(v.mem_regions_checked, 1024);
    assert_eq!(v.blocks_checked, BLOCKS);
    assert!(v.readback_slots_checked > 0, "{v:?}");
    // The file holds workload blocks: header (seed, absolute index, seq).
    let data = std::fs::read(&path).unwrap();
    let (seed, index, seq) = workload::header(&data[(FIRST as usize + 3) * 4096..]);
    assert_eq!((seed, index), (77, FIRST + 3));
    assert!(
        seq > BLOCKS,
        "block 3 was rewritten in the second lap, seq {seq}"
    );

    // The writers go on after a verify.
    let before = v.status.disk.unwrap().writes;
    wait_status(&mut l, "more writes", |s| {
        s.disk.as_ref().unwrap().writes > before + 10
    });

    // Garbage in an acknowledged block half a lap ahead of the writer: found either by the
    // writer's read-back before it overwrites the block or by the verify, once.
    let s = l.agent.workload_status().unwrap();
    let victim = (s.disk.unwrap().writes + BLOCKS / 2) % BLOCKS;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xa5; 64], (FIRST + victim) * 4096 + 1000)
        .unwrap();
    drop(file);
    let v = l.agent.workload_verify().unwrap();
    assert_eq!((v.block_mismatches, v.mem_mismatches), (1, 0), "{v:?}");
    let m = v.first_block_mismatch.unwrap();
    assert_eq!(m.index, FIRST + victim);
    assert_eq!((m.found_seed, m.found_index), (77, FIRST + victim));
    assert!(m.detail.contains("acknowledged write"), "{}", m.detail);
    assert_eq!(v.status.disk.as_ref().unwrap().block_mismatches, 1);
    // Reported once; later checks are clean again.
    let v = l.agent.workload_verify().unwrap();
    assert!(v.is_clean(), "{v:?}");

    let end = l.agent.workload_stop().unwrap();
    assert!(!end.running);
    let d = end.disk.unwrap();
    assert_eq!(d.errors, 0, "{:?}", d.last_error);
    assert!(d.acked > 2 * BLOCKS);
    // Stopped means stopped: the file no longer changes.
    let after_stop = std::fs::read(&path).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(std::fs::read(&path).unwrap() == after_stop);
    assert!(!l.agent.workload_status().unwrap().running);
}

#[test]
fn workload_catches_memory_corruption() {
    let mut l = Local::start();
    // Slow (1 MiB/s over 4 MiB: a pass takes 4 s): damage half a pass ahead of the writer is
    // found by the verify.
    l.agent
        .workload_start(&WorkloadStartRequest {
            mem_mib: 4,
            mem_mib_per_s: Some(1),
            seed: 5,
            ..Default::default()
        })
        .unwrap();
    let s = wait_status(&mut l, "some chunks", |s| {
        s.mem.as_ref().unwrap().chunks_written > 10
    });
    let chunk = (s.mem.unwrap().chunks_written + 512) % 1024;
    let c = l.agent.workload_corrupt_mem(chunk, None).unwrap();
    assert_eq!((c.chunk, c.offset, c.after), (chunk, 100, !c.before));
    let v = l.agent.workload_verify().unwrap();
    assert_eq!(
        (v.mem_regions_checked, v.mem_mismatches),
        (1024, 1),
        "{v:?}"
    );
    let m = v.first_mem_mismatch.unwrap();
    assert_eq!((m.index, m.found_by.as_str()), (chunk, "verify"));
    assert!(m.detail.contains("checksum"), "{}", m.detail);
    assert!(l.agent.workload_verify().unwrap().is_clean());
    let msg = remote_error(l.agent.workload_corrupt_mem(1024, None).unwrap_err());
    assert!(msg.contains("outside the buffer"), "{msg}");
    l.agent.workload_stop().unwrap();

    // Fast (1 MiB, thousands of passes a second): the writer reaches the damage first, checks
    // the chunk before rewriting it, and the next verify reports what it found.
    l.agent
        .workload_start(&WorkloadStartRequest {
            mem_mib: 1,
            seed: 6,
            ..Default::default()
        })
        .unwrap();
    // Damage only after a first full pass, so the writer meets it on a later one (on a
    // loaded machine the corruption could otherwise land ahead of the first pass).
    wait_status(&mut l, "a first pass", |s| {
        s.mem.as_ref().unwrap().passes >= 1
    });
    l.agent.workload_corrupt_mem(17, Some(4095)).unwrap();
    let s = wait_status(&mut l, "the writer to find the damage", |s| {
        s.mem.as_ref().unwrap().mismatches == 1
    });
    assert!(s.mem.unwrap().passes >= 1);
    let v = l.agent.workload_verify().unwrap();
    assert_eq!(v.mem_mismatches, 1, "{v:?}");
    let m = v.first_mem_mismatch.unwrap();
    assert_eq!((m.index, m.found_by.as_str()), (17, "writer"));
    assert!(l.agent.workload_verify().unwrap().is_clean());
    let end = l.agent.workload_stop().unwrap();
    assert_eq!(end.mem.unwrap().mismatches, 1);
}

#[test]
fn workload_bad_requests_get_error_replies() {
    let mut l = Local::start();
    for op in ["workload_verify", "workload_stop"] {
        let msg = remote_error(l.agent.request(json!({ "op": op })).unwrap_err());
        assert!(msg.contains("no workload is running"), "{op}: {msg}");
    }
    let msg = remote_error(l.agent.workload_corrupt_mem(0, None).unwrap_err());
    assert!(msg.contains("no workload is running"), "{msg}");
    let status = l.agent.workload_status().unwrap();
    assert!(!status.running && status.mem.is_none() && status.disk.is_none());

    let bad =
        |l: &mut Local, req: serde_json::Value| remote_error(l.agent.request(req).unwrap_err());
    let msg = bad(&mut l, json!({"op": "workload_start", "seed": 1}));
    assert!(msg.contains("nothing to do"), "{msg}");
    let msg = bad(
        &mut l,
        json!({"op": "workload_start", "mem_mib": 1u64 << 40}),
    );
    assert!(msg.contains("mem_mib"), "{msg}");
    let msg = bad(
        &mut l,
        json!({"op": "workload_start", "disk": {"path": "/nonexistent/d", "offset": 0,
               "block_size": 4096, "blocks": 1}}),
    );
    assert!(msg.contains("/nonexistent/d"), "{msg}");
    let msg = bad(
        &mut l,
        json!({"op": "workload_start", "disk": {"path": "/tmp/x", "offset": 0,
               "block_size": 100, "blocks": 1}}),
    );
    assert!(msg.contains("multiple of 512"), "{msg}");
    let msg = bad(&mut l, json!({"op": "workload_start", "mem_mib": "lots"}));
    assert!(msg.contains("bad \"workload_start\" fields"), "{msg}");

    // One workload at a time; a disk-less workload has no disk counters.
    let req = WorkloadStartRequest {
        mem_mib: 1,
        ..Default::default()
    };
    let s = l.agent.workload_start(&req).unwrap();
    assert!(s.disk.is_none());
    let msg = remote_error(l.agent.workload_start(&req).unwrap_err());
    assert!(msg.contains("already running"), "{msg}");
    let v = l.agent.workload_verify().unwrap();
    assert_eq!((v.blocks_checked, v.readback_slots_checked), (0, 0));
    l.agent.workload_stop().unwrap();
    l.agent.ping().unwrap();
}
