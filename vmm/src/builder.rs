//! One way to build a VM. Booting, `--restore` and `--incoming` differ only in where RAM,
//! vCPU and device state come from: a kernel loaded into fresh RAM, or a stream (a
//! snapshot file, or a live migration's connection) read into a VM built the same way.
//!
//! [`build`] makes a [`Vmm`] whose vCPUs have not run; [`Vmm::run`] starts the event loop,
//! the vCPU threads and the control API, waits for the VM's end and stops everything in
//! order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration::{StreamReader, VmConfig as StreamConfig};
use resources::memslots::{MapFlags, MappingKind, MemSlots};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::{self, cpuid, regs};
use crate::device_manager::{DeviceConfig, DeviceManager};
use crate::event_loop::ExitWatcher;
use crate::exit::{ExitReason, VmExit};
use crate::memory;
use crate::migrate::incoming::Reply;
use crate::snapshot::restore::Loaded;
use crate::state::vcpu::KvmCaps;
use crate::vcpu::{self, ExitCounters, VcpuContext};
use crate::vm::{kvm_err, open_kvm, os_err, RunStats, Start, VmConfig, VmError};

/// Where the guest's state comes from.
enum Source {
    /// A kernel (loaded once RAM exists).
    Boot,
    /// A stream: its reader past the VM config, and for a live migration the answer
    /// channel to the source.
    Stream {
        reader: StreamReader<Box<dyn std::io::Read + Send>>,
        config: StreamConfig,
        reply: Option<Reply>,
    },
}

impl Source {
    /// Opens the stream of `--restore` or `--incoming` (reading its VM config), or nothing
    /// for a boot.
    fn open(start: &Start) -> Result<Source, VmError> {
        Ok(match start {
            Start::Boot { .. } => Source::Boot,
            Start::Incoming(incoming) => {
                let (reader, config, reply) = crate::migrate::incoming::accept(incoming)
                    .map_err(crate::snapshot::SnapshotError::from)?;
                Source::Stream {
                    reader,
                    config,
                    reply: Some(reply),
                }
            }
            Start::Restore(path) => {
                let (file, _) = migration::file::open_regular(path)
                    .map_err(|e| crate::snapshot::SnapshotError::from(migration::Error::from(e)))?;
                let r: Box<dyn std::io::Read + Send> = Box::new(std::io::BufReader::new(file));
                let (reader, config) = crate::snapshot::restore::open(r)?;
                Source::Stream {
                    reader,
                    config,
                    reply: None,
                }
            }
        })
    }

    /// The VM's shape: the stream's for a restored VM, else the command line's.
    fn shape(&self, cfg: &VmConfig) -> Result<(u64, u8), VmError> {
        match self {
            Source::Boot => Ok((cfg.mem_size, cfg.cpus)),
            Source::Stream { config, .. } => {
                let cpus = u8::try_from(config.vcpus)
                    .ok()
                    .filter(|&n| (1..=32).contains(&n))
                    .ok_or_else(|| {
                        crate::snapshot::SnapshotError::Mismatch(format!(
                            "{} vCPUs in the stream",
                            config.vcpus
                        ))
                    })?;
                // The same limits as --memory: a stream asking for more RAM than the host
                // has (or an unaligned size) is refused before anything is allocated.
                memory::validate_size(
                    config.mem_size,
                    &format!("the stream's memory size ({} bytes)", config.mem_size),
                )?;
                Ok((config.mem_size, cpus))
            }
        }
    }
}

/// A built VM whose vCPUs have not run yet. Fields drop in order: the devices (their BAR
/// slots and mappings), the vCPUs, the memory slots, the VM, then guest RAM.
pub struct Vmm {
    devices: DeviceManager,
    vcpu_fds: Vec<VcpuFd>,
    memslots: Arc<MemSlots>,
    vm: Arc<VmFd>,
    caps: Option<Arc<KvmCaps>>,
    exit: Arc<VmExit>,
    cpus: u8,
    mem_size: u64,
    api_socket: Option<std::path::PathBuf>,
    /// The system-call filters, installed when the VM starts.
    seccomp: crate::seccomp::Filters,
    /// A live migration's answer channel (told "resumed" once the guest runs here).
    reply: Option<Reply>,
    /// What a restore loaded, for the resume-time log.
    restored: Option<Loaded>,
    mem: GuestMemoryMmap,
    /// The memfd behind `mem` (vfio-user servers map it).
    _memfd: std::fs::File,
}

/// Builds the VM of `cfg`: KVM, guest RAM, devices and vCPUs, then the state (a loaded
/// kernel, or the stream's RAM, devices and vCPUs).
pub fn build(cfg: &VmConfig) -> Result<Vmm, VmError> {
    // Compiled first: a filter that cannot be built stops the VMM before it touches KVM.
    let seccomp = crate::seccomp::Filters::new(cfg.seccomp)?;
    // A restored VM's shape comes from the stream, so its config is read first.
    let mut source = Source::open(&cfg.start)?;
    let (mem_size, cpus) = source.shape(cfg)?;
    let kvm = open_kvm()?;
    let vm = Arc::new(create_vm(&kvm)?);
    let caps = match KvmCaps::probe(&kvm, &vm) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!("KVM state cannot be saved (snapshots and migration are off): {e}");
            None
        }
    };

    let (mem, memfd) = memory::create(mem_size)?;
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

    let exit = Arc::new(VmExit::new().map_err(os_err("create the exit eventfd"))?);
    let devices = DeviceManager::new(
        &vm,
        &mem,
        &memslots,
        &DeviceConfig {
            serials: [&cfg.serial, &cfg.serial2],
            passthrough: &cfg.devices,
            mem_size,
        },
    )?;
    if entry.is_some() {
        // A restored guest has its MP table in its RAM already (the devices are given
        // again in the same order, so they get the same slots and INTx lines).
        boot::mptable::setup(&mem, cpus, &devices.mptable_intx()).map_err(boot::BootError::from)?;
    }

    let vcpu_fds = create_vcpus(&kvm, &vm, cpus, entry)?;

    let mut vmm = Vmm {
        devices,
        vcpu_fds,
        memslots,
        vm,
        caps,
        exit,
        cpus,
        mem_size,
        api_socket: cfg.api_socket.clone(),
        seccomp,
        reply: None,
        restored: None,
        mem,
        _memfd: memfd,
    };
    if let Source::Stream {
        reader,
        config,
        reply,
    } = &mut source
    {
        vmm.reply = reply.take();
        vmm.restore(reader, config)?;
    }
    Ok(vmm)
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create the VM"))?;
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
    Ok(vm)
}

/// The vCPUs with their CPUID and common registers; vCPU 0 set to enter the kernel at
/// `entry` when booting.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    cpus: u8,
    entry: Option<u64>,
) -> Result<Vec<VcpuFd>, VmError> {
    vcpu::install_kick_handler().map_err(|e| VmError::Os {
        what: "install the vCPU kick handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let base_cpuid = cpuid::supported(kvm)?;
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
    Ok(vcpu_fds)
}

fn map_guest_ram(memslots: &MemSlots, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        // SAFETY: the region is a shared mmap of the guest RAM memfd that no Rust reference
        // points into except through vm-memory's volatile accessors; it outlives the slot,
        // since the Vmm drops the memslots (and the VM) before the memory.
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

impl Vmm {
    /// Loads the stream's state (after its config) into the built VM before any vCPU
    /// runs. A live migration's source is told Ready first, each pre-copy pass applied,
    /// and why it failed if it does.
    fn restore(
        &mut self,
        reader: &mut StreamReader<Box<dyn std::io::Read + Send>>,
        config: &StreamConfig,
    ) -> Result<(), VmError> {
        let reply = &mut self.reply;
        let result = (|| {
            crate::snapshot::restore::check_devices(config, &self.devices.passthrough)?;
            let caps = self.caps.as_deref().ok_or_else(|| {
                crate::snapshot::SnapshotError::NoCaps("probing KVM's capabilities failed".into())
            })?;
            if let Some(r) = reply.as_mut() {
                r.ready()?;
            }
            crate::snapshot::restore::apply(
                reader,
                &crate::snapshot::restore::Target {
                    vm: &self.vm,
                    mem: &self.mem,
                    vcpus: &self.vcpu_fds,
                    caps,
                    devices: &self.devices.passthrough,
                    emulated: &self.devices.emulated,
                },
                |iteration| match reply.as_mut() {
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
                self.restored = Some(loaded);
                Ok(())
            }
            Err(e) => {
                if let Some(r) = reply.as_mut() {
                    r.abort(&e.to_string());
                }
                Err(e.into())
            }
        }
    }

    /// Runs the VM until it stops: the event loop first (so nothing the guest does is
    /// missed), then the vCPU threads and the control API; on the end, stops the API,
    /// the vCPUs and the devices in that order. Returns why it stopped, with exit
    /// statistics.
    pub fn run(mut self) -> Result<(ExitReason, RunStats), VmError> {
        let exit = self.exit.clone();
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
        let (inputs, reset) = self.devices.take_event_sources();
        let reset = reset.ok_or_else(|| VmError::EventLoop("the reset line is taken".into()))?;
        em.add_subscriber(Box::new(
            ExitWatcher::new(exit.clone(), reset).map_err(os_err("install signal handlers"))?,
        ));
        for input in inputs {
            em.add_subscriber(Box::new(input));
        }

        // Set-up is over: from here on every thread runs under the filters.
        self.seccomp.install()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ExitCounters::default());
        // Debugging aid: VMM_SAMPLE_RIP_MS=N kicks every vCPU every N ms and logs where it
        // is.
        let sample_ms: Option<u64> = std::env::var("VMM_SAMPLE_RIP_MS")
            .ok()
            .and_then(|v| v.parse().ok());
        let (threads, handles) = self.spawn_vcpus(&stop, &counters, sample_ms.is_some());

        let machine = Arc::new(self.machine(counters.clone(), handles));
        // The API's client threads hand requests to this thread's event loop.
        let api = match self
            .api_socket
            .as_ref()
            .map(|path| start_api(path, &machine, &mut em))
        {
            Some(Err(e)) => {
                exit.trigger(ExitReason::Error(e.to_string()));
                None
            }
            Some(Ok(api)) => Some(api),
            None => None,
        };

        self.tell_source_resumed();

        let reason = wait(&mut em, &exit, &threads, sample_ms);

        stop.store(true, Ordering::Release);
        for t in &threads {
            t.kick();
        }
        for v in &machine.vcpus {
            v.pause.wake();
        }
        // No request is answered any more: clients still waiting are told the VM is
        // shutting down, then the API's threads are stopped.
        drop(em);
        drop(api);
        for t in threads {
            t.join();
        }
        drop(machine);
        let stats = RunStats {
            exits: counters.snapshot(),
            total: counters.total(),
            bus: self.devices.bus.stats(),
            devices: self.devices.passthrough.iter().map(|d| d.stats()).collect(),
        };
        // The devices (their BAR slots and mappings, then the bus holding the PCI root),
        // then guest RAM's slots, the VM and RAM itself: the Vmm's field order.
        drop(self);
        Ok((reason, stats))
    }

    /// The running VM's shared view, for the API, snapshots and migrations.
    fn machine(
        &self,
        exits: Arc<ExitCounters>,
        vcpus: Vec<crate::machine::VcpuHandle>,
    ) -> crate::machine::Machine {
        crate::machine::Machine {
            cpus: self.cpus,
            mem_size: self.mem_size,
            vm: self.vm.clone(),
            mem: self.mem.clone(),
            memslots: self.memslots.clone(),
            caps: self.caps.clone(),
            devices: self.devices.passthrough.clone(),
            emulated: self.devices.emulated.clone(),
            exits,
            exit: self.exit.clone(),
            vcpus,
            migration: Default::default(),
            paused: Default::default(),
            seccomp: self.seccomp.clone(),
        }
    }

    /// Starts a thread per vCPU; a vCPU that cannot start ends the VM (the ones started
    /// are stopped with the rest).
    fn spawn_vcpus(
        &mut self,
        stop: &Arc<AtomicBool>,
        counters: &Arc<ExitCounters>,
        sample_rip: bool,
    ) -> (Vec<vcpu::VcpuThread>, Vec<crate::machine::VcpuHandle>) {
        let mut threads = Vec::new();
        let mut handles = Vec::new();
        for (id, fd) in std::mem::take(&mut self.vcpu_fds).into_iter().enumerate() {
            let pause = Arc::new(crate::pause::PauseControl::default());
            let ctx = VcpuContext {
                bus: self.devices.bus.clone(),
                exit: self.exit.clone(),
                stop: stop.clone(),
                counters: counters.clone(),
                sample_rip,
                pause: pause.clone(),
                caps: self.caps.clone(),
                seccomp: self.seccomp.clone(),
            };
            match vcpu::spawn(id as u8, fd, ctx) {
                Ok(t) => {
                    handles.push(crate::machine::VcpuHandle {
                        id: id as u8,
                        pause,
                        kicker: t.kicker(),
                    });
                    threads.push(t)
                }
                Err(e) => {
                    self.exit.trigger(ExitReason::Error(format!(
                        "cannot start vCPU thread {id}: {e}"
                    )));
                    break;
                }
            }
        }

        (threads, handles)
    }

    /// Tells a live migration's source that the guest runs here, and logs where the
    /// time after its last section went.
    fn tell_source_resumed(&mut self) {
        if let Some(r) = &mut self.reply {
            if let Err(e) = r.resumed() {
                // The guest runs here already; the source will see the connection close.
                tracing::warn!("{e}");
            }
            tracing::info!("migration complete: the guest runs here");
            if let Some((l, read_at)) = self.restored.as_ref().and_then(|l| Some((l, l.read_at?))) {
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
    }
}

/// Serves the control API at `path`: its requests are answered by `machine` on the event
/// loop `em` runs.
fn start_api(
    path: &std::path::Path,
    machine: &Arc<crate::machine::Machine>,
    em: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
) -> Result<crate::api::ApiServer, VmError> {
    let (to_owner, calls) =
        crate::api::owner::channel().map_err(os_err("create the API's eventfd"))?;
    em.add_subscriber(Box::new(crate::api::owner::Owner::new(
        calls,
        machine.clone(),
    )));
    Ok(crate::api::ApiServer::start(
        path,
        to_owner,
        machine.seccomp.clone(),
    )?)
}

/// Runs the event loop until the VM's end is recorded (kicking every vCPU every
/// `sample_ms` ms, if asked, so each logs where it is).
fn wait(
    em: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    exit: &VmExit,
    threads: &[vcpu::VcpuThread],
    sample_ms: Option<u64>,
) -> ExitReason {
    let mut next_sample = std::time::Instant::now();
    loop {
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
    }
}
