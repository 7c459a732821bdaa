//! Guest tests: boot the real guest (tests/guest/build.sh) under KVM with the `vmm` binary,
//! run commands through the in-guest agent, and reboot.
//!
//! A boot takes a minute or more on these machines (the guest kernel is emulated), so each
//! test shares one booted guest across several checks.

use std::time::Duration;

use vmm_tests::harness::{run, Agent, Vm, DEFAULT_BOOT_TIMEOUT};

const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Ports nothing is registered at (the VMM's devices: 0x2f8, 0x3f8, 0x60, 0x64, 0xcf8-0xcff;
/// KVM's own: PIC, PIT, 0x61). MMIO in the PCI hole and in the HPET range, unassigned here.
const UNASSIGNED_PORTS: [u16; 4] = [0x110, 0x510, 0x2e8, 0xe0];
const UNASSIGNED_MMIO: [u64; 2] = [0xd000_0000, 0xfed0_0000];

/// The guest's /proc/cpuinfo: (processor count, flags of the first CPU).
fn cpuinfo(agent: &mut Agent) -> (usize, Vec<String>) {
    let out = run(agent, &["cat", "/proc/cpuinfo"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    let cpus = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let flags = out
        .stdout
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().skip(2).map(str::to_string).collect())
        .unwrap_or_default();
    (cpus, flags)
}

fn run_commands_and_reboot(cpus: u32, poke: bool) {
    let vm = Vm::builder()
        .cpus(cpus)
        .memory("256M")
        .boot()
        .expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));

    let ping = agent.ping().expect("ping");
    let uname = run(&mut agent, &["uname", "-r"]);
    assert_eq!(uname.status, Some(0), "{uname:?}");
    assert_eq!(
        uname.stdout.trim(),
        ping.kernel,
        "uname -r and the agent agree on the kernel"
    );
    assert!(
        uname.stdout.starts_with("6.1."),
        "the guest runs the 6.1 kernel we built: {uname:?}"
    );

    let failing = run(
        &mut agent,
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"],
    );
    assert_eq!(failing.status, Some(7), "{failing:?}");
    assert_eq!(failing.stdout, "to-stdout\n");
    assert_eq!(failing.stderr, "to-stderr\n");

    // New processes keep working, one after another.
    for i in 0..10 {
        let out = run(&mut agent, &["uname", "-m"]);
        assert_eq!(
            (out.status, out.stdout.as_str()),
            (Some(0), "x86_64\n"),
            "spawn {i}: {out:?}"
        );
    }

    let (seen, flags) = cpuinfo(&mut agent);
    assert_eq!(seen, cpus as usize, "the guest sees {cpus} CPU(s)");
    // The VMM's CPUID filtering reaches the guest: cx16 and xsave are hidden by CPUID alone
    // (the command line's clearcpuid= names neither), and the hypervisor bit is set.
    assert!(flags.iter().any(|f| f == "hypervisor"), "flags: {flags:?}");
    for hidden in ["cx16", "xsave"] {
        assert!(
            !flags.iter().any(|f| f == hidden),
            "{hidden} must be hidden; flags: {flags:?}"
        );
    }
    assert!(
        vm.console().contains("vmm-guest-agent: user space up"),
        "console:\n{}",
        vm.console()
    );

    if poke {
        // A guest poking unassigned ports and MMIO gets all ones back and the VMM lives on.
        let reply = agent
            .poke(&UNASSIGNED_PORTS, &UNASSIGNED_MMIO)
            .expect("poke");
        for (port, before, after) in &reply.ports {
            assert_eq!((*before, *after), (0xff, 0xff), "port {port:#x}");
        }
        for (addr, before, after) in &reply.mmio {
            assert_eq!((*before, *after), (u32::MAX, u32::MAX), "mmio {addr:#x}");
        }
        assert!(
            vm.try_exit_status().unwrap().is_none(),
            "vmm died after the pokes: {}",
            vm.describe()
        );
        let again = run(&mut agent, &["uname", "-r"]);
        assert_eq!(again.status, Some(0));
    }

    agent.reboot().expect("reboot");
    let status = vm
        .wait_exit(EXIT_TIMEOUT)
        .expect("vmm exits after the guest reboots");
    assert_eq!(
        status.code(),
        Some(0),
        "vmm exit status after reboot; {}",
        vm.describe()
    );
    assert!(!vm.vmm_stderr().contains("panicked"), "{}", vm.vmm_stderr());
}

#[test]
fn one_cpu_runs_commands_survives_pokes_and_reboots() {
    run_commands_and_reboot(1, true);
}

#[test]
fn two_cpus_run_commands_and_reboot() {
    run_commands_and_reboot(2, false);
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let vm = Vm::builder().boot().expect("start vmm");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        vm.try_exit_status().unwrap().is_none(),
        "vmm exited early: {}",
        vm.describe()
    );
    // SAFETY: kill(2) on the child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    let status = vm
        .wait_exit(Duration::from_secs(10))
        .expect("vmm stops on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
    assert!(
        vm.vmm_stderr().contains("stopped by signal 15"),
        "{}",
        vm.vmm_stderr()
    );
}

/// The same kernel as a bzImage (LZ4-compressed, beside the vmlinux in the image cache),
/// entered through the 64-bit boot protocol: its decompressor runs, then the kernel reaches
/// user space.
#[test]
fn bzimage_boots_to_user_space() {
    let image = vmm_tests::harness::GuestImage::get().expect("guest image");
    let bzimage = image.vmlinux.with_file_name("bzImage");
    assert!(
        bzimage.is_file(),
        "tests/guest/build.sh puts bzImage beside vmlinux: {}",
        bzimage.display()
    );
    let image = vmm_tests::harness::GuestImage {
        vmlinux: bzimage,
        initramfs: image.initramfs.clone(),
    };
    let vm = Vm::builder().image(image).boot().expect("start vmm");
    let mut agent = vm
        .agent(DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("bzImage guest did not come up: {e}\n{}", vm.describe()));
    let uname = run(&mut agent, &["uname", "-r"]);
    assert_eq!(uname.status, Some(0), "{uname:?}");
    assert!(
        vm.vmm_stderr().contains("loaded BzImage kernel"),
        "{}",
        vm.vmm_stderr()
    );
    agent.reboot().expect("reboot");
    let status = vm
        .wait_exit(EXIT_TIMEOUT)
        .expect("vmm exits after the guest reboots");
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
}
