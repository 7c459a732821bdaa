//! Running a command in the guest despite this platform's exec flake.

use super::client::Agent;
use crate::agent::protocol::RunOutput;

/// Runs `argv` in the guest. A fresh busybox process sometimes dies of SIGSEGV right after
/// exec on these machines, reading its locale through a TLS pointer that is NULL (fault at
/// address 0, ip 0x4a4d02 in Debian's busybox-static): a bug of the nested-KVM guest
/// platform (the syscall shim of ../shared/nested-kvm-guest.patch, presumably), seen under
/// QEMU too. Such a death, with no output, is retried at most twice, and reported on
/// stderr; any other result, or a third SIGSEGV, is returned as it is for the caller's
/// assertions. Panics if the agent cannot be reached.
pub fn run(agent: &mut Agent, argv: &[&str]) -> RunOutput {
    let mut attempt = 1;
    loop {
        let out = agent
            .run(argv)
            .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
        let segv_at_start = out.signal == Some(libc::SIGSEGV) && out.stdout.is_empty();
        if !segv_at_start || attempt == 3 {
            return out;
        }
        eprintln!("guest: {argv:?} died of SIGSEGV right after exec (attempt {attempt}); retrying");
        attempt += 1;
    }
}

/// MSI-X interrupts of the guest's virtio devices so far: the `PCI-MSI` lines of
/// `/proc/interrupts` naming `virtio`, summed over all CPUs.
pub fn virtio_msix_interrupts(agent: &mut Agent) -> u64 {
    interrupts(agent, &["PCI-MSI", "virtio"])
}

/// Interrupts so far on the lines of the guest's `/proc/interrupts` that contain every one
/// of `all_of`, summed over all CPUs.
pub fn interrupts(agent: &mut Agent, all_of: &[&str]) -> u64 {
    let out = run(agent, &["cat", "/proc/interrupts"]);
    out.stdout
        .lines()
        .filter(|l| all_of.iter().all(|w| l.contains(w)))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}
