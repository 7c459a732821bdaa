//! vCPU threads: run KVM_RUN, dispatch I/O and MMIO exits to the buses, count exits, and stop
//! promptly when asked (a signal plus `immediate_exit`, so a vCPU blocked in the kernel, e.g.
//! in a guest `hlt`, leaves KVM_RUN at once).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use devices::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::exit::{ExitReason, VmExit};
use crate::pause::PauseControl;
use crate::state::vcpu::KvmCaps;

/// Kinds of exits counted.
pub const EXIT_KINDS: [&str; 9] = [
    "io-in",
    "io-out",
    "mmio-read",
    "mmio-write",
    "hlt",
    "shutdown",
    "system-event",
    "interrupted",
    "other",
];

/// Exit counters of all vCPUs.
#[derive(Debug, Default)]
pub struct ExitCounters {
    counts: [AtomicU64; EXIT_KINDS.len()],
    /// Time the VMM spent handling exits of each kind (dispatch to the device and back).
    handling_ns: [AtomicU64; EXIT_KINDS.len()],
}

impl ExitCounters {
    fn bump(&self, kind: usize) {
        self.counts[kind].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an exit of `kind` and the VMM's time handling it, from `since` to now.
    fn handled(&self, kind: usize, since: Instant) {
        self.bump(kind);
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.handling_ns[kind].fetch_add(ns, Ordering::Relaxed);
    }

    /// (kind, count, total VMM handling time in ns) for every kind.
    pub fn snapshot(&self) -> Vec<(&'static str, u64, u64)> {
        EXIT_KINDS
            .iter()
            .zip(self.counts.iter().zip(&self.handling_ns))
            .map(|(k, (c, ns))| (*k, c.load(Ordering::Relaxed), ns.load(Ordering::Relaxed)))
            .collect()
    }

    /// Exits that reached the VMM, excluding signal interruptions.
    pub fn total(&self) -> u64 {
        self.snapshot()
            .iter()
            .filter(|(k, _, _)| *k != "interrupted")
            .map(|(_, c, _)| c)
            .sum()
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set before the vCPU
            // loop starts and valid until the thread's VcpuFd is dropped (after the loop, with
            // the pointer cleared first). Writing one byte of it is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), kick_handler)
}

/// Kicks one vCPU thread out of KVM_RUN, from any thread, for as long as that thread
/// runs: the thread publishes its id when it starts and withdraws it (under the same lock)
/// before it ends, so no kick can reach a finished thread whose pthread id may be reused.
/// A migration thread can therefore hold one past the vCPUs' end.
#[derive(Clone, Default)]
pub struct Kicker(Arc<Mutex<Option<libc::pthread_t>>>);

impl Kicker {
    /// Makes the thread leave KVM_RUN (no-op once it has ended).
    pub fn kick(&self) {
        let tid = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *tid {
            // SAFETY: `t` is a live thread's id: the thread clears it under this lock
            // before it returns, and the lock is held across the call. The signal's
            // handler only sets immediate_exit.
            let r = unsafe { libc::pthread_kill(t, kick_signal()) };
            if r != 0 {
                tracing::warn!("cannot signal a vCPU thread: error {r}");
            }
        }
    }

    fn set(&self, tid: Option<libc::pthread_t>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = tid;
    }
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
    kicker: Kicker,
}

impl VcpuThread {
    /// Makes the thread leave KVM_RUN (it then sees the stop flag).
    pub fn kick(&self) {
        self.kicker.kick();
    }

    /// A kicker for other threads.
    pub fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }

    /// Waits for the thread to finish.
    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

/// What a vCPU thread shares with the VM.
pub struct VcpuContext {
    /// Buses exits are dispatched to.
    pub bus: Arc<Bus>,
    /// Where the VM's end is recorded.
    pub exit: Arc<VmExit>,
    /// Set when all vCPUs must stop.
    pub stop: Arc<AtomicBool>,
    /// Shared exit counters.
    pub counters: Arc<ExitCounters>,
    /// Log where the vCPU is each time it is kicked (VMM_SAMPLE_RIP_MS, a debugging aid).
    pub sample_rip: bool,
    /// Pause handshake with the VMM.
    pub pause: Arc<PauseControl>,
    /// What KVM can save, for captures while paused.
    pub caps: Option<Arc<KvmCaps>>,
    /// The filters; the thread narrows its own to the vCPU list.
    pub seccomp: crate::seccomp::Filters,
}

/// Starts vCPU `id` on its own thread.
pub fn spawn(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuThread> {
    let kicker = Kicker::default();
    let own = kicker.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            KVM_RUN.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
            // SAFETY: pthread_self has no preconditions.
            own.set(Some(unsafe { libc::pthread_self() }));
            ctx.seccomp.narrow(crate::seccomp::ThreadKind::Vcpu);
            forbidden_call_for_tests(id);
            run_loop(id, &mut vcpu, &ctx);
            own.set(None);
            KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        })?;
    Ok(VcpuThread { handle, kicker })
}

/// Test-only switch: `VMM_TEST_FORBIDDEN_SYSCALL=vcpu` makes vCPU 0 call socket(2), which
/// its filter forbids, so that a test can see the call caught and named. No effect
/// otherwise.
fn forbidden_call_for_tests(id: u8) {
    if id == 0 && std::env::var("VMM_TEST_FORBIDDEN_SYSCALL").as_deref() == Ok("vcpu") {
        tracing::warn!("VMM_TEST_FORBIDDEN_SYSCALL=vcpu: vCPU 0 calls socket(2)");
        // SAFETY: socket has no memory arguments; the result is closed if it is a fd.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: `fd` was just opened here.
            unsafe { libc::close(fd) };
        }
    }
}

fn run_loop(id: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) {
    let c = &ctx.counters;
    while !ctx.stop.load(Ordering::Acquire) {
        if ctx.pause.wanted() {
            ctx.pause.park(id, vcpu, ctx.caps.as_deref(), &ctx.stop);
            continue;
        }
        let result = vcpu.run();
        // The VMM's own share of an I/O exit: from KVM_RUN's return to the next KVM_RUN.
        let exited = Instant::now();
        match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.bus.pio_read(port, data);
                c.handled(0, exited);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.bus.pio_write(port, data);
                c.handled(1, exited);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.bus.mmio_read(addr, data);
                c.handled(2, exited);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.bus.mmio_write(addr, data);
                c.handled(3, exited);
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel irqchip KVM handles hlt itself; reaching here means the
                // guest halted for good.
                c.bump(4);
                tracing::info!("vCPU {id} halted");
                ctx.exit.trigger(ExitReason::GuestPowerOff);
                break;
            }
            Ok(VcpuExit::Shutdown) => {
                c.bump(5);
                tracing::info!("vCPU {id}: guest shutdown (triple fault or reset)");
                ctx.exit.trigger(ExitReason::GuestReset);
                break;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                c.bump(6);
                let reason = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestPowerOff,
                    other => {
                        ExitReason::Error(format!("vCPU {id}: unexpected system event {other}"))
                    }
                };
                ctx.exit.trigger(reason);
                break;
            }
            Ok(VcpuExit::InternalError) => {
                c.bump(8);
                ctx.exit
                    .trigger(ExitReason::Error(internal_error(id, vcpu)));
                break;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                c.bump(8);
                ctx.exit.trigger(ExitReason::Error(format!(
                    "vCPU {id}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
                )));
                break;
            }
            Ok(other) => {
                c.bump(8);
                tracing::warn!("vCPU {id}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                c.bump(7);
                vcpu.set_kvm_immediate_exit(0);
                if ctx.sample_rip {
                    log_position(id, vcpu);
                }
            }
            Err(e) => {
                ctx.exit
                    .trigger(ExitReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}")));
                break;
            }
        }
    }
}

/// Logs the vCPU's instruction pointer and mode (for the RIP sampler).
fn log_position(id: u8, vcpu: &VcpuFd) {
    let mp = vcpu.get_mp_state().map(|m| m.mp_state).unwrap_or(u32::MAX);
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => {
            tracing::info!(
            "sample vCPU {id}: rip {:#x} cs {:#x} cr0 {:#x} efer {:#x} rflags {:#x} mp_state {mp}",
            r.rip, s.cs.selector, s.cr0, s.efer, r.rflags
        )
        }
        _ => tracing::info!("sample vCPU {id}: registers unavailable, mp_state {mp}"),
    }
}

/// Describes a KVM internal error, with the instruction bytes of an emulation failure.
fn internal_error(id: u8, vcpu: &mut VcpuFd) -> String {
    let rip = vcpu
        .get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|_| "?".into());
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM filled the `internal` member of the union for a KVM_EXIT_INTERNAL_ERROR.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    let what = match internal.suberror {
        1 => "emulation failure (an instruction this KVM cannot emulate in guest kernel mode)",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        _ => "internal error",
    };
    format!(
        "vCPU {id}: KVM {what}, suberror {}, rip {rip}, data [{}]",
        internal.suberror,
        data.join(", ")
    )
}
