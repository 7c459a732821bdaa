//! A VM's configuration, its errors, and [`run`]: build it ([`crate::builder`]), run it
//! until it stops, stop it in order.

use std::path::PathBuf;

use kvm_ioctls::Kvm;

use crate::boot::{self, cpuid, regs};
use crate::config::device::DeviceSpec;
use crate::console::ConsoleError;
use crate::device_manager::setup::DeviceSetupError;
use crate::device_manager::DeviceStats;
use crate::exit::ExitReason;
use crate::irq_routes::IrqRoutesError;
use crate::memory::MemoryError;
use crate::serial_config::SerialConfig;

/// How the guest starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// Boot a kernel.
    Boot {
        /// Kernel image.
        kernel: PathBuf,
        /// Optional initramfs.
        initramfs: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// Restore a snapshot file (memory size and vCPU count come from it).
    Restore(PathBuf),
    /// Wait for a live migration (`--incoming`) and run the guest it brings.
    Incoming(crate::migrate::incoming::IncomingConfig),
}

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// How the guest starts.
    pub start: Start,
    /// Guest RAM in bytes (validated; a restored VM takes the saved size).
    pub mem_size: u64,
    /// vCPU count.
    pub cpus: u8,
    /// COM1.
    pub serial: SerialConfig,
    /// COM2.
    pub serial2: SerialConfig,
    /// PCI functions passed through (`--device`), checked and named.
    pub devices: Vec<DeviceSpec>,
    /// Where to serve the control API, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// System-call filters.
    pub seccomp: crate::seccomp::SeccompMode,
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(String),
    /// A KVM ioctl failed during set-up.
    #[error("KVM: cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A snapshot could not be read or applied.
    #[error("restoring: {0}")]
    Restore(#[from] crate::snapshot::SnapshotError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Registering guest RAM with KVM.
    #[error("cannot map guest RAM into KVM: {0}")]
    MemSlot(#[from] resources::memslots::MemSlotsError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU register set-up.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Serial host side.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Bus registration.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    /// PCI.
    #[error(transparent)]
    Pci(#[from] devices::pci::root::PciError),
    /// An OS resource (eventfd, thread, epoll) could not be created.
    #[error("cannot {what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    /// Interrupt routing.
    #[error(transparent)]
    Routes(#[from] IrqRoutesError),
    /// A `--device`.
    #[error(transparent)]
    Device(#[from] DeviceSetupError),
    /// The control API socket could not be set up.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// The system-call filters.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub(crate) fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

/// Opens /dev/kvm with an error that says what to do.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| {
        let hint = match e.errno() {
            libc::EACCES | libc::EPERM => {
                "permission denied; run as root or add your user to the group owning /dev/kvm"
            }
            libc::ENOENT => {
                "it does not exist; KVM is not available on this host (is the kvm module loaded?)"
            }
            _ => "",
        };
        VmError::KvmOpen(if hint.is_empty() {
            e.to_string()
        } else {
            format!("{e}: {hint}")
        })
    })
}

/// Exit statistics of a finished run.
pub struct RunStats {
    /// Exits by cause: (kind, count, VMM handling time in ns).
    pub exits: Vec<(&'static str, u64, u64)>,
    /// Total exits.
    pub total: u64,
    /// Bus accesses by device.
    pub bus: Vec<devices::BusStats>,
    /// Per-BAR accesses of the `--device` functions.
    pub devices: Vec<DeviceStats>,
}

/// Builds the VM, runs it until it stops, and returns why, with exit statistics.
pub fn run(cfg: &VmConfig) -> Result<(ExitReason, RunStats), VmError> {
    crate::builder::build(cfg)?.run()
}
