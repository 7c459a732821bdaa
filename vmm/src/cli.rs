//! The command line.

use std::path::PathBuf;

use clap::Parser;

use crate::config::device::DeviceConfig;
use crate::config::tls::MigrationTlsConfig;
use crate::serial_config::SerialConfig;

/// Default guest command line when --cmdline is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// A KVM virtual machine monitor for Linux guests.
///
/// Boots an x86_64 Linux kernel (an uncompressed ELF vmlinux, entered at its 64-bit entry
/// point, or a bzImage through the 64-bit boot protocol) with an optional initramfs. The
/// guest gets a 16550 serial console on COM1 (ttyS0), an optional second port on COM2
/// (ttyS1), an i8042 controller whose reset line ends the VMM with status 0 (`reboot -f` in
/// the guest, with `reboot=k`), and a PCI host bridge. SIGTERM or SIGINT stop the VM.
///
/// PCI functions are passed through with --device: a vfio-user server's socket, a host
/// function bound to vfio-pci, or either with a mediator in front (vfio-mediated), which
/// can trap BAR pages at run time and migrate the device.
///
/// Examples:
///   vmm --kernel vmlinux --initramfs initramfs.cpio --memory 512M --cpus 2 \
///       --cmdline "console=ttyS0 reboot=k panic=1"
///   vfsim --socket /tmp/vf0.sock --pf-socket /tmp/vf0.pf --disk disk.img &
///   vmm --kernel vmlinux --initramfs initramfs.cpio --api-socket /tmp/vm.sock \
///       --device vfio-mediated,socket=/tmp/vf0.sock,mediator=auto,pf=/tmp/vf0.pf,id=vf0
///   # the destination of a live migration, over mutual TLS:
///   vmm --incoming tls:0.0.0.0:4444 --api-socket /tmp/vm.sock \
///       --migration-tls cert=dst.pem,key=dst.key,ca=ca.pem \
///       --device vfio-mediated,socket=/tmp/vf1.sock,mediator=auto,pf=/tmp/vf1.pf,id=vf0
///
/// A running VMM is controlled with `vmm ctl --api-socket PATH ...` (see vmm ctl --help).
#[derive(Debug, Parser)]
#[command(name = "vmm", version, verbatim_doc_comment)]
pub struct Cli {
    /// Kernel image: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "incoming"])]
    pub kernel: Option<PathBuf>,

    /// Start from a snapshot written by `vmm ctl snapshot` instead of booting: memory and
    /// vCPUs come from it; give each saved device again (same ids) with --device, since the
    /// backends (e.g. a VF on this host) are this VMM's own.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initramfs", "cmdline", "memory", "cpus"])]
    pub restore: Option<PathBuf>,

    /// Wait for a live migration (from `vmm ctl migrate` on the source) instead of
    /// booting: on tls:ADDR:PORT, mutual TLS with --migration-tls (the source must present
    /// a certificate signed by its CA); on tcp:ADDR:PORT, clear text and unauthenticated
    /// (trusted networks and tests only). Give each of the guest's devices (same ids) with
    /// --device, backed by this host's own device servers. Connections that fail before a
    /// migration starts (a refused certificate, garbage, a port scan, another stream
    /// version, nothing sent within 10 s) are logged and the wait goes on.
    #[arg(long, value_name = "tls:ADDR:PORT|tcp:ADDR:PORT", conflicts_with_all = ["kernel", "initramfs", "cmdline", "memory", "cpus", "restore"])]
    pub incoming: Option<String>,

    /// The TLS identity and trust of --incoming tls:...: `cert=PATH,key=PATH,ca=PATH`
    /// (PEM files: this VMM's certificate chain, its private key, and the CA certificates
    /// a source's certificate must be signed by).
    #[arg(long, value_name = "cert=PATH,key=PATH,ca=PATH", requires = "incoming")]
    pub migration_tls: Option<MigrationTlsConfig>,

    /// With --incoming: exit (status 1) if no source's migration started within SECS.
    /// Default: wait for ever.
    #[arg(long, value_name = "SECS", requires = "incoming", value_parser = clap::value_parser!(u64).range(1..))]
    pub incoming_timeout: Option<u64>,

    /// Initial RAM filesystem (a cpio archive; uncompressed boots fastest).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM: a number of bytes with an optional K, M, G or T suffix (binary units).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory: String,

    /// Number of vCPUs (1-32).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,

    /// COM1 (ttyS0): `stdio`, `file=PATH` (append guest output to PATH), `socket=PATH` (listen
    /// on a Unix socket; a connected client is the console) or `off`.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    pub serial: SerialConfig,

    /// COM2 (ttyS1), same modes as --serial. The test guest's agent talks on it.
    #[arg(long, value_name = "MODE", default_value = "off")]
    pub serial2: SerialConfig,

    /// A PCI function passed through to the guest (repeatable):
    /// `vfio-user,socket=PATH[,id=NAME]` (a device served by a vfio-user server) or
    /// `vfio,host=DDDD:BB:DD.F[,id=NAME]` (a host function bound to vfio-pci; needs
    /// /dev/vfio), or `vfio-mediated,socket=PATH|host=BDF,mediator=NAME|auto[,pf=PATH]
    /// [,trap=BAR:OFFSET+SIZE;...][,id=NAME]` (either, with a mediator in front:
    /// `virtio-blk-vf` for vfsim VFs, `trace` to trap and count BAR accesses). Add
    /// `mmap=off` to trap every BAR access. Devices without an id are named vfio0, vfio1, ...
    #[arg(long = "device", value_name = "SPEC")]
    pub devices: Vec<DeviceConfig>,

    /// Serve the control API on this Unix socket: JSON requests, one per line, e.g.
    /// `{"request":"device-stats"}` or `{"request":"mediator","device":"vf0","command":"trap",
    /// "args":{"bar":0,"offset":4096,"size":4096}}`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<std::path::PathBuf>,

    /// Print KVM exit counts by cause and by device to stderr when the VM stops.
    #[arg(long)]
    pub exit_stats: bool,

    /// Log filter (error, warn, info, debug, trace, or a tracing filter such as
    /// `vmm=debug,devices=trace`). RUST_LOG is used when this is not given.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// System-call filters on the VMM's threads, installed once the VM is set up: `on`
    /// (a call outside a thread's list stops the VMM, naming the thread and the call),
    /// `log` (allowed, and logged by the kernel: see dmesg) or `off`.
    #[arg(
        long,
        value_name = "MODE",
        value_enum,
        default_value = "on",
        env = "VMM_SECCOMP"
    )]
    pub seccomp: crate::seccomp::SeccompMode,
}
