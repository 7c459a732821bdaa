//! Loading and entering a Linux kernel: ELF `vmlinux` (64-bit entry) or bzImage (64-bit
//! boot protocol), the zero page with e820 map and command line, the initramfs, the MP
//! table, and the vCPU state a 64-bit kernel expects.

pub mod cpuid;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use resources::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, ZERO_PAGE_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Errors loading the kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        path: String,
        source: std::io::Error,
    },
    /// The kernel file is neither format.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' boot header); pass an uncompressed vmlinux or a bzImage")]
    NotAKernel(String),
    /// A bzImage without the 64-bit entry point.
    #[error(
        "bzImage {0} has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 is needed)"
    )]
    NotBzImage64(String),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: String,
        source: linux_loader::loader::Error,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}: {source}")]
    InitramfsFile {
        path: String,
        source: std::io::Error,
    },
    /// The initramfs does not fit.
    #[error("initramfs {path} ({size} bytes) does not fit in guest RAM above the kernel; give the guest more --memory")]
    InitramfsTooLarge { path: String, size: u64 },
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot data failed.
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
    /// The MP table could not be built.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// What kind of image the kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF vmlinux.
    Elf,
    /// A bzImage.
    BzImage,
}

/// Identifies a kernel image by its magic numbers.
pub fn detect(file: &mut File) -> std::io::Result<Option<KernelKind>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelKind::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(KernelKind::BzImage));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where the kernel was put and where to enter it.
#[derive(Debug)]
pub struct LoadedKernel {
    /// Entry point (64-bit).
    pub entry: u64,
    /// Image kind.
    pub kind: KernelKind,
}

/// Boot inputs.
pub struct BootConfig<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Optional initramfs path.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
}

/// Loads the kernel, initramfs, command line and zero page into `mem`. The MP table is the
/// caller's to write ([`mptable::setup`]) once the PCI functions, whose interrupts it
/// describes, are built.
pub fn load(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<LoadedKernel, BootError> {
    let kpath = cfg.kernel.display().to_string();
    let kerr = |source| BootError::KernelFile {
        path: kpath.clone(),
        source,
    };
    let mut kfile = File::open(cfg.kernel).map_err(kerr)?;
    let kind = detect(&mut kfile)
        .map_err(kerr)?
        .ok_or_else(|| BootError::NotAKernel(kpath.clone()))?;
    let lerr = |source| BootError::Load {
        path: kpath.clone(),
        source,
    };

    let mut params = boot_params::default();
    let (entry, kernel_end) = match kind {
        KernelKind::Elf => {
            let r = Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIGH_RAM_START)))
                .map_err(lerr)?;
            (r.kernel_load.0, r.kernel_end)
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut kfile, Some(GuestAddress(HIGH_RAM_START)))
                .map_err(lerr)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| BootError::NotBzImage64(kpath.clone()))?;
            // XLF_KERNEL_64 in xloadflags; boot protocol >= 2.12 carries it.
            if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
                return Err(BootError::NotBzImage64(kpath.clone()));
            }
            params.hdr = hdr;
            (r.kernel_load.0 + 0x200, r.kernel_end)
        }
    };

    // Command line.
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE as usize).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(cfg.cmdline).map_err(|e| {
        BootError::Cmdline(format!(
            "{e} ({} bytes given, at most {})",
            cfg.cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        ))
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Memory(e.to_string()))?;

    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cfg.cmdline.len() as u32 + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x100_0000;
    }

    if let Some(initramfs) = cfg.initramfs {
        let (addr, size) = load_initramfs(
            mem,
            initramfs,
            kernel_end,
            cfg.mem_size,
            params.hdr.initrd_addr_max,
        )?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = layout::e820_entries(cfg.mem_size);
    for (i, e) in e820.iter().enumerate() {
        params.e820_table[i].addr = e.addr;
        params.e820_table[i].size = e.size;
        params.e820_table[i].r#type = e.kind.as_raw();
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(LoadedKernel { entry, kind })
}

/// Puts the initramfs at the top of RAM below 3 GiB (and below the kernel's limit), page
/// aligned, above the kernel. Returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
    addr_max: u32,
) -> Result<(u64, u64), BootError> {
    let p = path.display().to_string();
    let ierr = |source| BootError::InitramfsFile {
        path: p.clone(),
        source,
    };
    let mut f = File::open(path).map_err(ierr)?;
    let size = f.metadata().map_err(ierr)?.len();
    let low_end = mem_size.min(layout::MMIO32_HOLE_START);
    let limit = if addr_max == 0 {
        0x7fff_ffff
    } else {
        u64::from(addr_max)
    };
    let top = low_end.min(limit + 1);
    let too_large = || BootError::InitramfsTooLarge {
        path: p.clone(),
        size,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end || size == 0 && addr == 0 {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(size as usize);
    f.read_to_end(&mut data).map_err(ierr)?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok((addr, data.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-boot-test-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn detects_kernel_kinds() {
        let elf = tmp("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(
            detect(&mut File::open(&elf).unwrap()).unwrap(),
            Some(KernelKind::Elf)
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = tmp("bz", &bz);
        assert_eq!(
            detect(&mut File::open(&bzp).unwrap()).unwrap(),
            Some(KernelKind::BzImage)
        );
        let junk = tmp("junk", b"#!/bin/sh\necho not a kernel\n");
        assert_eq!(detect(&mut File::open(&junk).unwrap()).unwrap(), None);
        let empty = tmp("empty", b"");
        assert_eq!(detect(&mut File::open(&empty).unwrap()).unwrap(), None);
        for p in [elf, bzp, junk, empty] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_a_clear_error() {
        let (mem, _fd) = crate::memory::create(32 << 20).unwrap();
        let junk = tmp("junk2", b"hello");
        let cfg = BootConfig {
            kernel: &junk,
            initramfs: None,
            cmdline: "console=ttyS0",
            mem_size: 32 << 20,
        };
        let e = load(&mem, &cfg).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel(_)), "{e}");
        assert!(e
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
        // A truncated ELF is refused by the loader with the path in the message.
        let bad = tmp("badelf", b"\x7fELF\x02\x01\x01\x00garbage");
        let cfg = BootConfig {
            kernel: &bad,
            ..cfg
        };
        let e = load(&mem, &cfg).unwrap_err();
        assert!(e.to_string().contains("badelf"), "{e}");
        let _ = std::fs::remove_file(junk);
        let _ = std::fs::remove_file(bad);
    }
}
