//! Building and running a VM: KVM set-up, guest RAM, devices, vCPUs, the event loop, and an
//! orderly stop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{SerialPort, I8042};
use devices::pci::{HostBridge, PciRoot};
use devices::trigger::EventFdTrigger;
use devices::Bus;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::Kvm;
use resources::memslots::{MapFlags, MappingKind, MemSlots};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, cpuid, regs};
use crate::config::device::DeviceSpec;
use crate::console::{self, ConsoleError};
use crate::device_setup::{self, DeviceContext, DeviceSetupError, DeviceStats};
use crate::event_loop::{ExitWatcher, SerialInput};
use crate::exit::{ExitReason, VmExit};
use crate::irq_routes::{IrqRoutesError, KvmRoutes};
use crate::memory::{self, MemoryError};
use crate::serial_config::SerialConfig;
use crate::vcpu::{self, ExitCounters, VcpuContext};

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
    /// Wait for a live migration on `tcp:ADDR:PORT` and run the guest it brings.
    Incoming(String),
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
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

/// Serial ports: COM1 at 0x3f8 (IRQ 4), COM2 at 0x2f8 (IRQ 3).
const SERIAL_PORTS: [(&str, u16, u32); 2] = [("serial0", 0x3f8, 4), ("serial1", 0x2f8, 3)];

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
    // A restored VM's shape comes from the stream, so its config is read first.
    let mut reply = None;
    let mut incoming = match &cfg.start {
        Start::Boot { .. } => None,
        Start::Incoming(url) => {
            let (reader, config, r) = crate::migrate::incoming::accept(url)?;
            reply = Some(r);
            Some((reader, config))
        }
        Start::Restore(path) => {
            let file = std::fs::File::open(path).map_err(|source| VmError::Os {
                what: "open the snapshot (--restore)",
                source,
            })?;
            let r: Box<dyn std::io::Read + Send> = Box::new(std::io::BufReader::new(file));
            Some(crate::snapshot::restore::open(r)?)
        }
    };
    let (mem_size, cpus) = match &incoming {
        Some((_, c)) => (
            c.mem_size,
            u8::try_from(c.vcpus)
                .ok()
                .filter(|&n| (1..=32).contains(&n))
                .ok_or_else(|| {
                    crate::snapshot::SnapshotError::Mismatch(format!(
                        "{} vCPUs in the stream",
                        c.vcpus
                    ))
                })?,
        ),
        None => (cfg.mem_size, cfg.cpus),
    };
    let kvm = open_kvm()?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create the VM"))?);
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(kvm_err("create the in-kernel PIT"))?;

    let caps = match crate::state::vcpu::KvmCaps::probe(&kvm, &vm) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!("KVM state cannot be saved (snapshots and migration are off): {e}");
            None
        }
    };

    let (mem, _memfd) = memory::create(mem_size)?;
    let memslots = Arc::new(MemSlots::new(vm.clone()));
    map_guest_ram(&memslots, &mem)?;

    let entry = match &cfg.start {
        Start::Boot {
            kernel,
            initramfs,
            cmdline,
        } => {
            let loaded = boot::load(
                &mem,
                &boot::BootConfig {
                    kernel,
                    initramfs: initramfs.as_deref(),
                    cmdline,
                    mem_size,
                },
            )?;
            tracing::info!("loaded {:?} kernel, entry {:#x}", loaded.kind, loaded.entry);
            regs::write_boot_structures(&mem)?;
            Some(loaded.entry)
        }
        Start::Restore(_) | Start::Incoming(_) => None,
    };

    // Devices.
    let bus = Arc::new(Bus::new());
    let exit = Arc::new(VmExit::new().map_err(os_err("create the exit eventfd"))?);
    let mut inputs = Vec::new();
    let mut serials = Vec::new();
    for ((name, base, gsi), scfg) in SERIAL_PORTS.iter().zip([&cfg.serial, &cfg.serial2]) {
        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("create a serial IRQ eventfd"))?;
        vm.register_irqfd(&irq, *gsi)
            .map_err(kvm_err("register a serial irqfd"))?;
        let (out, source) = console::connect(scfg)?;
        let port = Arc::new(
            SerialPort::new(EventFdTrigger::new(irq), out)
                .map_err(os_err("create a serial port"))?,
        );
        bus.register_pio(name, *base, 8, port.clone())?;
        serials.push(port.clone());
        inputs.push(SerialInput::new(name, port, source));
    }
    let reset = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("create the reset eventfd"))?;
    let reset_trigger = EventFdTrigger::new(
        reset
            .try_clone()
            .map_err(os_err("clone the reset eventfd"))?,
    );
    let mut i8042_irqs = Vec::new();
    for gsi in [1, 12] {
        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("create an i8042 IRQ eventfd"))?;
        vm.register_irqfd(&irq, gsi)
            .map_err(kvm_err("register an i8042 irqfd"))?;
        i8042_irqs.push(EventFdTrigger::new(irq));
    }
    let aux_irq = i8042_irqs.pop().expect("two IRQs");
    let kbd_irq = i8042_irqs.pop().expect("two IRQs");
    let i8042 = Arc::new(I8042::new(reset_trigger).with_irqs(kbd_irq, aux_irq));
    bus.register_pio("i8042", devices::legacy::i8042::DATA_PORT, 1, i8042.clone())?;
    bus.register_pio(
        "i8042",
        devices::legacy::i8042::COMMAND_PORT,
        1,
        i8042.clone(),
    )?;
    let pci = Arc::new(PciRoot::new());
    pci.add(0, 0, Arc::new(Mutex::new(HostBridge::new())))?;
    let routes = Arc::new(KvmRoutes::new(vm.clone())?);
    // Declared before the devices: a mediator outlives the devices that use it.
    let mediators = mediate::Registry::with_bundled();
    let passthrough = device_setup::add_devices(
        &cfg.devices,
        &DeviceContext {
            vm: &vm,
            bus: &bus,
            memslots: &memslots,
            routes: &routes,
            pci: &pci,
            mem: &mem,
            mem_size,
            timeout: vfio_user::DEFAULT_TIMEOUT,
            mediators: &mediators,
        },
    )?;
    bus.register_pio(
        "pci-config",
        devices::pci::root::CONFIG_ADDRESS_PORT,
        devices::pci::root::CONFIG_PORTS,
        pci,
    )?;
    if entry.is_some() {
        // A restored guest has its MP table in its RAM already (the devices are given
        // again in the same order, so they get the same slots and INTx lines).
        boot::mptable::setup(&mem, cpus, &device_setup::mptable_intx(&passthrough))
            .map_err(boot::BootError::from)?;
    }

    // vCPUs.
    vcpu::install_kick_handler().map_err(|e| VmError::Os {
        what: "install the vCPU kick handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let base_cpuid = cpuid::supported(&kvm)?;
    tracing::debug!("CPUID hides {}", cpuid::hidden_names().join(","));
    let mut vcpu_fds = Vec::new();
    for id in 0..cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create a vCPU"))?;
        fd.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, id, cpus))
            .map_err(kvm_err("set CPUID"))?;
        regs::setup_common(&fd)?;
        if let (0, Some(entry)) = (id, entry) {
            regs::setup_boot_vcpu(&fd, entry)?;
        }
        vcpu_fds.push(fd);
    }

    let mut restored = None;
    if let Some((reader, config)) = &mut incoming {
        let result = (|| {
            crate::snapshot::restore::check_devices(config, &passthrough)?;
            let caps = caps.as_deref().ok_or_else(|| {
                crate::snapshot::SnapshotError::NoCaps("probing KVM's capabilities failed".into())
            })?;
            if let Some(r) = &mut reply {
                r.ready()?;
            }
            crate::snapshot::restore::apply(
                reader,
                &crate::snapshot::restore::Target {
                    vm: &vm,
                    mem: &mem,
                    vcpus: &vcpu_fds,
                    caps,
                    devices: &passthrough,
                    serials: &serials,
                    i8042: &i8042,
                },
                |iteration| match &mut reply {
                    Some(r) => r
                        .synced(iteration)
                        .map_err(crate::snapshot::SnapshotError::from),
                    None => Ok(()),
                },
            )
        })();
        match result {
            Ok(loaded) => {
                tracing::info!(
                    "restored {} pages of RAM and {} bytes of device state",
                    loaded.pages,
                    loaded.device_bytes
                );
                restored = Some(loaded);
            }
            Err(e) => {
                if let Some(r) = &mut reply {
                    r.abort(&e.to_string());
                }
                return Err(e.into());
            }
        }
    }

    // Event loop first, so nothing the guest does is missed; then the vCPUs.
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    em.add_subscriber(Box::new(
        ExitWatcher::new(exit.clone(), reset).map_err(os_err("install signal handlers"))?,
    ));
    for input in inputs {
        em.add_subscriber(Box::new(input));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(ExitCounters::default());
    let passthrough = Arc::new(passthrough);
    // Debugging aid: VMM_SAMPLE_RIP_MS=N kicks every vCPU every N ms and logs where it is.
    let sample_ms: Option<u64> = std::env::var("VMM_SAMPLE_RIP_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut threads = Vec::new();
    let mut handles = Vec::new();
    for (id, fd) in vcpu_fds.into_iter().enumerate() {
        let pause = Arc::new(crate::pause::PauseControl::default());
        let ctx = VcpuContext {
            bus: bus.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            counters: counters.clone(),
            sample_rip: sample_ms.is_some(),
            pause: pause.clone(),
            caps: caps.clone(),
        };
        match vcpu::spawn(id as u8, fd, ctx) {
            Ok(t) => {
                handles.push(crate::machine::VcpuHandle {
                    id: id as u8,
                    pause,
                    kicker: crate::machine::Kicker(t.pthread()),
                });
                threads.push(t)
            }
            Err(e) => {
                exit.trigger(ExitReason::Error(format!(
                    "cannot start vCPU thread {id}: {e}"
                )));
                break;
            }
        }
    }

    let machine = Arc::new(crate::machine::Machine::new(
        cpus,
        mem_size,
        vm.clone(),
        mem.clone(),
        memslots.clone(),
        caps.clone(),
        passthrough.clone(),
        serials,
        i8042,
        counters.clone(),
        exit.clone(),
        handles,
    ));
    let api = cfg.api_socket.as_ref().map(|path| {
        crate::api::ApiServer::start(
            path,
            crate::api::ApiState {
                machine: machine.clone(),
            },
        )
    });
    let api = match api.transpose() {
        Ok(a) => a,
        Err(e) => {
            exit.trigger(ExitReason::Error(e.to_string()));
            None
        }
    };

    if let Some(r) = &mut reply {
        if let Err(e) = r.resumed() {
            // The guest runs here already; the source will see the connection close.
            tracing::warn!("{e}");
        }
        tracing::info!("migration complete: the guest runs here");
        if let Some((l, read_at)) = restored.as_ref().and_then(|l| Some((l, l.read_at?))) {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            let total = read_at.elapsed();
            let restoring = l.kvm_state + l.device_config + l.devices_running;
            tracing::info!(
                "resumed {:.1} ms after the source's last section: KVM state {:.1} ms, device PCI config {:.1} ms, devices running {:.1} ms, threads and API {:.1} ms",
                ms(total),
                ms(l.kvm_state),
                ms(l.device_config),
                ms(l.devices_running),
                ms(total.saturating_sub(restoring)),
            );
        }
    }

    let mut next_sample = std::time::Instant::now();
    let reason = loop {
        if let Some(r) = exit.reason() {
            break r;
        }
        if let Some(ms) = sample_ms {
            if std::time::Instant::now() >= next_sample {
                threads.iter().for_each(|t| t.kick());
                next_sample += std::time::Duration::from_millis(ms);
            }
            if let Err(e) = em.run_with_timeout(ms as i32) {
                break ExitReason::Error(format!("event loop failed: {e:?}"));
            }
            continue;
        }
        if let Err(e) = em.run() {
            break ExitReason::Error(format!("event loop failed: {e:?}"));
        }
    };

    stop.store(true, Ordering::Release);
    for t in &threads {
        t.kick();
    }
    for v in &machine.vcpus {
        v.pause.wake();
    }
    // The API may be kicking and pausing vCPUs: stop it before the threads are joined.
    drop(api);
    for t in threads {
        t.join();
    }
    drop(machine);
    let stats = RunStats {
        exits: counters.snapshot(),
        total: counters.total(),
        bus: bus.stats(),
        devices: passthrough.iter().map(|d| d.stats()).collect(),
    };
    // The API (which reads the devices) first, then the devices (their BAR slots and
    // mappings), then the bus holding the PCI root, then guest RAM's slots; `mem` itself
    // drops last, at the end of this function.
    drop(passthrough);
    drop(bus);
    drop(memslots);
    Ok((reason, stats))
}

fn map_guest_ram(memslots: &MemSlots, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        // SAFETY: the region is a shared mmap of the guest RAM memfd that no Rust reference
        // points into except through vm-memory's volatile accessors; it outlives the slot,
        // since `run` drops the memslots (and the VM) before the memory.
        unsafe {
            memslots.map(
                region.start_addr().0,
                region.len(),
                host,
                MapFlags::default(),
                MappingKind::Ram,
            )?
        };
    }
    Ok(())
}
