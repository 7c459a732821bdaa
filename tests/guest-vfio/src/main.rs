//! `guest-vfio`: runs inside the 6.12 test guest (shipped in its initramfs, started by the
//! agent) and drives the real Linux VFIO through the `devices` crate's kernel backend and
//! migration code, the very code the VMM runs:
//!
//! - `guest-vfio pci <sysfs> <sector>`: a virtio-blk function bound to vfio-pci in no-IOMMU
//!   mode (vfsim's VF): info, regions, config space, notify page mmap, MSI-X eventfds, one
//!   write request at `sector` by DMA to locked pages, reset (`pci.rs`);
//! - `guest-vfio mtty <sysfs-a> <sysfs-b>`: two mtty mdevs in one type1 container: MAP_DMA,
//!   every migration v2 arc, PRE_COPY info, a state moved from a to b with bytes in the
//!   FIFO, DMA logging, wrong moves (`mtty.rs`).
//!
//! Prints one JSON object per step (see `report.rs`); exits 1 on the first failed step.

mod mtty;
mod pci;
mod phys;
mod report;
mod virtio;

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;

fn usage() -> ExitCode {
    eprintln!(
        "usage: guest-vfio pci <sysfs path of a virtio-blk function bound to vfio-pci> <sector>\n       \
         guest-vfio mtty <sysfs path of mdev a> <sysfs path of mdev b>"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["pci", sysfs, sector] => match sector.parse() {
            Ok(sector) => pci::run(Path::new(sysfs), sector),
            Err(_) => return usage(),
        },
        ["mtty", a, b] => mtty::run(Path::new(a), Path::new(b)),
        _ => return usage(),
    };
    match result {
        Ok(()) => {
            report::emit("done", json!({}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            report::emit("error", json!({ "error": e.to_string() }));
            ExitCode::FAILURE
        }
    }
}
