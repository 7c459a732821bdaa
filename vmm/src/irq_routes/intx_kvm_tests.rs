//! INTx end to end on the real KVM: a vfio-pci function over the fake backend, wired to
//! GSI 17 through [`KvmRoutes`]; a small 32-bit guest programs the IOAPIC (pin 17: level,
//! vector 0x30) and its local APIC, and on each interrupt reports its in-service register
//! (port 0x82), then itself (port 0x81), and EOIs. The device's signal must reach the guest
//! as a level interrupt, and the guest's EOI must come back to the device as an UNMASK (KVM
//! signals the resample eventfd, the relay unmasks). Skips itself without /dev/kvm.
//!
//! On this project's machines (nested "PVM" KVM) the local APIC has already retired the
//! vector when the handler runs (its in-service bit reads 0) and KVM has acknowledged the
//! IOAPIC line at injection: the resample comes before the handler's EOI. The test then
//! checks what still holds (delivery, the unmask, the line deasserted, a second interrupt)
//! and says so; where the vector is in service, it also checks that nothing is unmasked
//! and the line stays asserted until the EOI.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::vfio::backend::IRQ_INTX;
use devices::vfio::testing::{Call, FakeBackend};
use devices::vfio::{VfioPciDevice, VfioPciParams};
use devices::Bus;
use kvm_bindings::{kvm_irqchip, kvm_segment, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::VmFd;
use resources::memslots::{MapFlags, MappingKind, MemSlots};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::cpuid;
use crate::exit::VmExit;
use crate::irq_routes::KvmRoutes;
use crate::vcpu::{self, ExitCounters, VcpuContext};

const GSI: u32 = 17;
const VECTOR: u8 = 0x30;
const GDT: u64 = 0x500;
const CODE: u64 = 0x1000;
const IDT: u64 = 0x2000;
const HANDLER: u64 = 0x3000;

/// 32-bit code at CODE: enable the local APIC, route IOAPIC pin 17 (level, active high,
/// fixed, vector 0x30, to APIC 0), report "ready" on port 0x80, then `sti; hlt` forever.
fn main_code() -> Vec<u8> {
    let mov = |addr: u32, value: u32| {
        let mut v = vec![0xc7, 0x05];
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&value.to_le_bytes());
        v
    };
    let mut code = Vec::new();
    code.extend(mov(0xfee0_00f0, 0x1ff)); // SVR: APIC on, spurious vector 0xff
    code.extend(mov(0xfee0_0080, 0)); // TPR 0
    code.extend(mov(0xfec0_0000, 0x10 + 2 * GSI)); // IOREGSEL: pin 17, low half
    code.extend(mov(0xfec0_0010, 0x8000 | u32::from(VECTOR))); // level, unmasked
    code.extend(mov(0xfec0_0000, 0x11 + 2 * GSI)); // high half
    code.extend(mov(0xfec0_0010, 0)); // destination APIC 0
    code.extend([0xe6, 0x80]); // out 0x80, al
    code.extend([0xfb]); // sti
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

/// The interrupt handler at HANDLER: report the in-service register's word for vectors
/// 32-63 on port 0x82 and itself on port 0x81, EOI, and wait for the next one.
fn handler_code() -> Vec<u8> {
    let mut code = vec![0xa1];
    code.extend(0xfee0_0110u32.to_le_bytes()); // mov eax, [ISR 32-63]
    code.extend([0xe7, 0x82]); // out 0x82, eax
    code.extend([0xe6, 0x81]); // out 0x81, al
    code.extend([0xc7, 0x05]);
    code.extend(0xfee0_00b0u32.to_le_bytes()); // local APIC EOI
    code.extend(0u32.to_le_bytes());
    // No `iret`: KVM's instruction emulator (which runs this guest's code here) only
    // emulates it in real mode. Wait for the next interrupt on this frame instead.
    code.extend([0xfb, 0xf4, 0xeb, 0xfd]); // sti; hlt; jmp hlt
    code
}

/// Ports 0x80-0x85: each write is reported with its value; a write to 0x81 (the handler,
/// before its EOI) then waits until the test lets the guest go on.
struct Probe {
    seen: Mutex<Sender<(u16, u32)>>,
    go_on: Mutex<Receiver<()>>,
}

impl DevicePio for Probe {
    fn pio_read(&self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let port = base.0 + offset;
        let mut value = [0u8; 4];
        value[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        let _ = self
            .seen
            .lock()
            .unwrap()
            .send((port, u32::from_le_bytes(value)));
        if port == 0x81 {
            let _ = self
                .go_on
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30));
        }
    }
}

fn ioapic_irr(vm: &VmFd) -> u32 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: KVM filled the `ioapic` member for chip KVM_IRQCHIP_IOAPIC.
    unsafe { chip.chip.ioapic.irr }
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Waits up to 5 s for the fake to record an INTx unmask; takes the calls.
fn unmasked(fake: &FakeBackend) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if fake
            .take_calls()
            .contains(&Call::MaskIrqs(IRQ_INTX, 0, 1, false))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn the_device_interrupts_the_guest_and_its_eoi_unmasks_the_device() {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    let (mem, _memfd) = crate::memory::create(16 << 20).unwrap();
    let memslots = Arc::new(MemSlots::new(vm.clone()));
    for r in mem.iter() {
        // SAFETY: the region is a shared mapping of the memfd owned by `mem`, which lives
        // until the end of the test, after the vCPU thread is joined and `memslots` (and
        // with it the slot) dropped.
        unsafe {
            memslots.map(
                r.start_addr().0,
                r.len(),
                r.as_ptr() as u64,
                MapFlags::default(),
                MappingKind::Ram,
            )
        }
        .unwrap();
    }
    let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
    }
    let gate_low = (HANDLER & 0xffff) as u32 | 0x08 << 16;
    let gate_high = (HANDLER & 0xffff_0000) as u32 | 0x8e00;
    let gate = u64::from(gate_high) << 32 | u64::from(gate_low);
    mem.write_obj(gate, GuestAddress(IDT + 8 * u64::from(VECTOR)))
        .unwrap();
    mem.write_slice(&main_code(), GuestAddress(CODE)).unwrap();
    mem.write_slice(&handler_code(), GuestAddress(HANDLER))
        .unwrap();

    let bus = Arc::new(Bus::new());
    let (seen_tx, seen) = mpsc::channel();
    let (go_on, go_on_rx) = mpsc::channel();
    bus.register_pio(
        "probe",
        0x80,
        6,
        Arc::new(Probe {
            seen: Mutex::new(seen_tx),
            go_on: Mutex::new(go_on_rx),
        }),
    )
    .unwrap();
    let routes = Arc::new(KvmRoutes::new(vm.clone()).unwrap());
    let fake = FakeBackend::standard().unwrap();
    let dev = VfioPciDevice::new(VfioPciParams {
        name: "vf0".into(),
        backend: fake.clone(),
        bus: bus.clone(),
        memslots: memslots.clone(),
        routes: routes.clone(),
    })
    .unwrap();
    dev.wire_intx(GSI, routes.clone()).unwrap();
    assert_eq!(dev.intx_live(), Some((true, true)));
    fake.take_calls();

    let fd = vm.create_vcpu(0).unwrap();
    let base = cpuid::supported(&kvm).unwrap();
    fd.set_cpuid2(&cpuid::for_vcpu(&base, 0, 1)).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs = flat(0x08, 0xb);
    let data = flat(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (8 * gdt.len() - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 8 * u16::from(VECTOR) + 7;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    (regs.rip, regs.rsp, regs.rflags) = (CODE, 0x8000, 0x2);
    fd.set_regs(&regs).unwrap();

    vcpu::install_kick_handler().unwrap();
    let exit = Arc::new(VmExit::new().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let thread = vcpu::spawn(
        0,
        fd,
        VcpuContext {
            bus: bus.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            counters: Arc::new(ExitCounters::default()),
            sample_rip: false,
            pause: Arc::new(crate::pause::PauseControl::default()),
            caps: None,
            // Off: a filter on a thread of the test process would outlive this test.
            seccomp: crate::seccomp::Filters::new(crate::seccomp::SeccompMode::Off).unwrap(),
        },
    )
    .unwrap();
    let next = |what: &str| {
        seen.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{what}: {e} (vCPU exit: {:?})", exit.reason()))
    };

    assert_eq!(next("the guest's ready").0, 0x80);
    for round in 0..2 {
        fake.fire(IRQ_INTX, 0).unwrap();
        let (port, isr) = next("the interrupt in the guest");
        assert_eq!(port, 0x82, "round {round}");
        assert_eq!(next("the handler").0, 0x81, "round {round}");
        let in_service = isr & 1 << (VECTOR - 32) != 0;
        if in_service {
            // The handler has not EOI'd yet: the line is held, the device still masked.
            assert_ne!(
                ioapic_irr(&vm) & 1 << GSI,
                0,
                "round {round}: line asserted"
            );
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !fake
                    .take_calls()
                    .contains(&Call::MaskIrqs(IRQ_INTX, 0, 1, false)),
                "round {round}: unmasked before the EOI"
            );
        } else {
            eprintln!(
                "round {round}: this KVM retired vector {VECTOR:#x} at injection (ISR {isr:#x}); \
                 the EOI-ordering checks do not apply here"
            );
        }
        go_on.send(()).unwrap();
        assert!(unmasked(&fake), "round {round}: no UNMASK after the EOI");
        assert_eq!(
            ioapic_irr(&vm) & 1 << GSI,
            0,
            "round {round}: line deasserted"
        );
    }

    stop.store(true, std::sync::atomic::Ordering::Release);
    thread.kick();
    thread.join();
    assert_eq!(exit.reason(), None, "the guest ran without failing");
}
