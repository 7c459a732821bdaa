//! Interop with libvfio-user (the library behind SPDK's and QEMU's vfio-user servers), as
//! bundled in Debian's QEMU 10.0 source package and built by `tests/peers/build.sh`: its
//! samples speak protocol 0.1, keep registers in I/O BARs, interrupt through INTx, send
//! their DMA as `DMA_WRITE`/`DMA_READ` messages to the client, and migrate through a v1
//! migration region with `VFIO_USER_DIRTY_PAGES`.
//!
//! `server` sample (PCI dead:beef, see docs/peers.md): BAR0 an 8-byte I/O register (the
//! absolute time at which its timer fires; reads give now minus that time), BAR1 16 KiB of
//! memory (pages 0 and 2 mapped, 1 and 3 trapped); when the timer fires it raises INTx,
//! then writes 4 KiB of 'A' to the start of the first DMA region (guest physical page 0,
//! which Linux leaves unused) and reads it back. Its migration data: BAR1, and BAR0 in
//! stop-and-copy. `gpio-pci-idio-16` (494f:0dc8): a read of its I/O BAR2 at 0 returns an
//! ever-growing counter / 3, migrated as 4 bytes.
//!
//! In the guest, `uio_pci_generic` binds the `server` sample so that its INTx has a handler
//! and counts in /proc/interrupts; the registers are reached through sysfs `resourceN`
//! files (4-byte port accesses) and `devmem` (MMIO).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use vmm_tests::harness::migration::{start_destination, start_source};
use vmm_tests::harness::peers::Peer;
use vmm_tests::harness::{
    interrupts, run, start_with_api, Agent, Device, NetnsPair, Side, TestDir, Vm,
};

/// Finds the PCI device with `vendor` and leaves its sysfs directory in $D.
fn find(vendor: &str) -> String {
    format!(
        "D=; for d in /sys/bus/pci/devices/*; do [ \"$(cat $d/vendor)\" = {vendor} ] && D=$d; done; [ -n \"$D\" ] || {{ echo no device {vendor} >&2; exit 1; }}; "
    )
}

fn sh(agent: &mut Agent, script: &str) -> String {
    let out = run(agent, &["sh", "-c", script]);
    assert!(out.success(), "guest script failed: {script}\n{out:?}");
    out.stdout
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Writes the 8-byte BAR0 register of the `server` sample as two 4-byte port writes.
fn write_bar0(agent: &mut Agent, value: u64) {
    let octal = |v: u32| -> String {
        v.to_le_bytes()
            .iter()
            .map(|b| format!("\\{b:03o}"))
            .collect()
    };
    let script = format!(
        "{find} printf '{lo}' | dd of=$D/resource0 bs=4 count=1 seek=0 conv=notrunc 2>/dev/null && \
         printf '{hi}' | dd of=$D/resource0 bs=4 count=1 seek=1 conv=notrunc 2>/dev/null",
        find = find("0xdead"),
        lo = octal(value as u32),
        hi = octal((value >> 32) as u32),
    );
    sh(agent, &script);
}

/// Reads BAR0 (now minus the register's time) as two 4-byte port reads.
fn read_bar0(agent: &mut Agent) -> i64 {
    let script = format!(
        "{} for i in 0 1; do dd if=$D/resource0 bs=4 count=1 skip=$i 2>/dev/null | od -An -tu4; done",
        find("0xdead")
    );
    let out = sh(agent, &script);
    let halves: Vec<u64> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
    assert_eq!(halves.len(), 2, "{out}");
    (halves[0] | (halves[1] << 32)) as i64
}

/// BAR1's physical address.
fn bar1(agent: &mut Agent) -> u64 {
    let out = sh(agent, &format!("{} sed -n 2p $D/resource", find("0xdead")));
    let start = out.split_whitespace().next().unwrap();
    u64::from_str_radix(start.trim_start_matches("0x"), 16).unwrap()
}

/// devmem reads of 32-bit words at `addrs`.
fn peek(agent: &mut Agent, addrs: &[u64]) -> Vec<u32> {
    let script: String = addrs
        .iter()
        .map(|a| format!("devmem {a:#x} 32; "))
        .collect();
    sh(agent, &script)
        .split_whitespace()
        .map(|w| u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap())
        .collect()
}

fn poke(agent: &mut Agent, writes: &[(u64, u32)]) {
    let script: String = writes
        .iter()
        .map(|(a, v)| format!("devmem {a:#x} 32 {v:#x}; "))
        .collect();
    sh(agent, &script);
}

/// INTx interrupts the guest took for the device uio_pci_generic drives.
fn uio_irqs(agent: &mut Agent) -> u64 {
    interrupts(agent, &["uio_pci_generic"])
}

/// Words written into BAR1: two in its mapped page 0, two in its trapped page 1 and one
/// in its trapped page 3.
fn bar1_words(base: u64, seed: u32) -> Vec<(u64, u32)> {
    [0x0, 0x7fc, 0x1000, 0x1ffc, 0x3010]
        .iter()
        .enumerate()
        .map(|(i, off)| {
            (
                base + off,
                seed.wrapping_mul(0x9e37_79b9).wrapping_add(i as u32),
            )
        })
        .collect()
}

fn bind_uio(agent: &mut Agent) {
    sh(
        agent,
        "echo 'dead beef' > /sys/bus/pci/drivers/uio_pci_generic/new_id; sleep 1; ls /dev/uio0",
    );
}

/// How far ahead the timer is armed: a guest shell pipeline takes seconds here (each
/// process start is emulated kernel work), and a time already past disarms the timer.
const ARM_AHEAD: u64 = 20;

/// Arms the timer [`ARM_AHEAD`] s ahead and waits until the guest took the INTx and the
/// server's DMA write landed in guest page 0.
fn timer_fires(agent: &mut Agent, peer: &Peer) {
    let irqs = uio_irqs(agent);
    poke(agent, &[(0, 0), (0xffc, 0)]);
    write_bar0(agent, now() + ARM_AHEAD);
    let delta = read_bar0(agent);
    assert!(
        (-(ARM_AHEAD as i64)..=0).contains(&delta),
        "BAR0 reads now - the time written: {delta}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let after = uio_irqs(agent);
        let page0 = peek(agent, &[0, 0xffc]);
        if after > irqs && page0 == [0x4141_4141; 2] {
            eprintln!("INTx taken ({irqs} -> {after}), the server's DMA write is in page 0");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no INTx or DMA from the server: irqs {irqs} -> {after}, page 0 {page0:x?}\n{}",
            peer.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn libvfio_user_server_io_bar_intx_dma_snapshot_and_restore() {
    let dir = TestDir::new("peer-lvu").expect("test dir");
    let mut lvu = Peer::lvu_server(&dir, "lvu0", None);
    let (vm, mut agent, mut api) =
        start_with_api(Vm::builder(), &dir, &[lvu.device("lvu0", "")], || {
            lvu.log_text()
        });
    bind_uio(&mut agent);

    // I/O BAR0 written and read; INTx and the server's DMA when its timer fires.
    timer_fires(&mut agent, &lvu);
    // BAR1 (memory), mapped and trapped pages.
    let base = bar1(&mut agent);
    let words = bar1_words(base, 1);
    poke(&mut agent, &words);
    let addrs: Vec<u64> = words.iter().map(|w| w.0).collect();
    let values: Vec<u32> = words.iter().map(|w| w.1).collect();
    assert_eq!(peek(&mut agent, &addrs), values, "BAR1 reads back");
    let mark = now();
    write_bar0(&mut agent, mark);

    // Snapshot, kill the VMM and the server, restore into a fresh server.
    let snap = dir.join("vm.snap");
    let r = api
        .request(&json!({"request": "snapshot", "path": snap}))
        .unwrap_or_else(|e| panic!("snapshot: {e}\n{}\n{}", vm.describe(), lvu.log_text()));
    eprintln!("snapshot: {r}");
    assert!(r["bytes"].as_u64().unwrap() > 0);
    vm.kill().unwrap();
    lvu.kill();
    drop(agent);
    let lvu2 = Peer::lvu_server(&dir, "lvu1", None);
    let vm2 = Vm::builder()
        .restore(&snap)
        .vmm_args(&["--device", &lvu2.device("lvu0", "")])
        .boot()
        .expect("start the restored vmm");
    let mut agent = vm2.agent(Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "restored guest does not answer: {e}\n{}\n{}",
            vm2.describe(),
            lvu2.log_text()
        )
    });
    // The fresh server holds the saved state: BAR1's words and BAR0's time (a reset
    // device would read BAR1 as zeros and BAR0 as the whole UNIX time).
    assert_eq!(peek(&mut agent, &addrs), values, "BAR1 after the restore");
    let delta = read_bar0(&mut agent);
    let since = (now() - mark) as i64;
    assert!(
        (0..=since + 2).contains(&delta),
        "BAR0 after the restore: {delta} (written {since} s ago)"
    );
    // And it runs: its timer, INTx and DMA work on the restored VM.
    timer_fires(&mut agent, &lvu2);
    agent.reboot().expect("reboot");
    let status = vm2.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", vm2.describe());
}

/// Reads the gpio sample's counter (BAR2 offset 0, one byte) `n` times.
fn gpio_reads(agent: &mut Agent, n: usize) -> Vec<u8> {
    let script = format!(
        "{} for i in $(seq {n}); do dd if=$D/resource2 bs=1 count=1 2>/dev/null | od -An -tu1; done",
        find("0x494f")
    );
    sh(agent, &script)
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect()
}

#[test]
fn libvfio_user_samples_live_migrate_between_two_hosts() {
    let pair = NetnsPair::create("lvum").expect("network namespaces");
    let dir = TestDir::new("peer-lvu-mig").expect("test dir");
    // The source starts from a golden snapshot made with both samples (the first contact
    // with them, a boot, is the test above).
    let lvu_spec = Device::LvuServer { id: "lvu0".into() };
    let gpio_spec = Device::LvuGpio { id: "gpio0".into() };
    let (src_lvu, src_lvu_dev) = lvu_spec.start_peer(&dir, "lvuA", Some(pair.name(Side::A)));
    let (_src_gpio, src_gpio_dev) = gpio_spec.start_peer(&dir, "gpioA", Some(pair.name(Side::A)));
    let builder = Vm::builder()
        .netns(pair.name(Side::A))
        .vmm_args(&["--device", &src_gpio_dev])
        .golden(&[gpio_spec, lvu_spec]);
    let (src, mut api, mut agent) = start_source(builder, &src_lvu_dev, &dir.join("api-src.sock"));
    bind_uio(&mut agent);

    // gpio: its I/O BAR counts up as the guest reads it.
    let seen = gpio_reads(&mut agent, 9);
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]) && seen[8] > seen[0],
        "{seen:?}"
    );
    let last = *seen.last().unwrap();
    // server: BAR1 words, and BAR0's time.
    let base = bar1(&mut agent);
    let words = bar1_words(base, 2);
    poke(&mut agent, &words);
    let addrs: Vec<u64> = words.iter().map(|w| w.0).collect();
    let values: Vec<u32> = words.iter().map(|w| w.1).collect();
    // Page 0 cleared, and the timer armed to fire while pre-copy runs (capped at 1 MB/s,
    // the first pass takes several seconds): the server's DMA write into page 0 then
    // comes after page 0 was sent, and only dirty tracking brings it to B.
    poke(&mut agent, &[(0, 0), (0xffc, 0)]);
    let dst_lvu = Peer::lvu_server(&dir, "lvuB", Some(pair.name(Side::B)));
    let dst_gpio = Peer::lvu_gpio(&dir, "gpioB", Some(pair.name(Side::B)));
    let url = format!("tcp:{}:4600", pair.addr(Side::B));
    let dst = start_destination(
        Vm::builder()
            .netns(pair.name(Side::B))
            .vmm_args(&["--device", &dst_gpio.device("gpio0", "")]),
        &url,
        &dst_lvu.device("lvu0", ""),
        &dir.join("api-dst.sock"),
    );
    // Armed so that it fires a few seconds into pre-copy, after page 0 went out first.
    let armed = now() + ARM_AHEAD;
    write_bar0(&mut agent, armed);
    assert_eq!(
        peek(&mut agent, &[0, 0xffc]),
        [0, 0],
        "the timer fired before the migration began: the check below would prove nothing"
    );
    let out = api.ctl_migrate(&url, &["--max-bandwidth-mb-s", "1"]);
    eprintln!("vmm ctl migrate: {:?}\n{}", out.code, out.stderr);
    assert_eq!(
        out.code,
        Some(0),
        "{out:?}\n{}\n{}\n{}",
        src.describe(),
        dst.describe(),
        src_lvu.log_text()
    );
    assert_eq!(out.status["phase"], "completed", "{out:?}");
    let st = src
        .wait_exit(Duration::from_secs(30))
        .expect("source exits");
    assert_eq!(st.code(), Some(0), "{}", src.describe());
    drop(agent);
    let mut agent = dst
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("guest on B: {e}\n{}", dst.describe()));

    // On B, through B's servers: the state came along.
    assert_eq!(peek(&mut agent, &addrs), values, "BAR1 on B");
    let delta = read_bar0(&mut agent);
    assert!(
        delta >= 0 && delta <= (now() - armed) as i64 + 2,
        "BAR0 on B: {delta}"
    );
    let after = gpio_reads(&mut agent, 3);
    assert!(
        after[0] >= last,
        "gpio counter on B {after:?} went back from {last}"
    );
    // The DMA write made on A during pre-copy reached B: A's server wrote (its log says
    // so), B's did not (its timer came over already past), and page 0 on B holds it.
    assert!(
        src_lvu.log_text().contains("do_dma_io: WRITE"),
        "the timer did not fire on A during the migration:\n{}",
        src_lvu.log_text()
    );
    assert!(
        !dst_lvu.log_text().contains("do_dma_io: WRITE"),
        "B's server wrote page 0 itself: the check would prove nothing\n{}",
        dst_lvu.log_text()
    );
    let page0 = peek(&mut agent, &[0, 0xffc]);
    eprintln!("page 0 on B: {page0:x?}; source log:\n{}", src.vmm_stderr());
    assert_eq!(
        page0, [0x4141_4141; 2],
        "the server's DMA write on A is on B"
    );
    agent.reboot().expect("reboot");
    let status = dst.wait_exit(Duration::from_secs(120)).expect("vmm exits");
    assert_eq!(status.code(), Some(0), "{}", dst.describe());
}
