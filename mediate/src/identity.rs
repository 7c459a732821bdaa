//! What a mediator is told about a device when it is offered one.

use std::fmt;
use std::path::PathBuf;

use devices::vfio::backend::CONFIG_REGION;
use devices::vfio::VfioBackend;

use crate::error::{MediateError, Result};

/// Identity of a PCI function, read from its configuration space, and where it is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// Class code (base class, subclass, programming interface).
    pub class: u32,
    /// Revision id.
    pub revision: u8,
    /// Where the device is served: `vfio-user:PATH` or `vfio:DDDD:BB:DD.F`.
    pub address: String,
}

impl DeviceIdentity {
    /// Reads the identity from the device's configuration space.
    pub fn read(backend: &dyn VfioBackend, address: &str) -> Result<Self> {
        let mut cfg = [0u8; 0x30];
        backend
            .region_read(CONFIG_REGION, 0, &mut cfg)
            .map_err(|source| MediateError::Backend {
                what: format!("reading the configuration space of {address}"),
                source,
            })?;
        let w = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
        Ok(DeviceIdentity {
            vendor: w(0),
            device: w(2),
            revision: cfg[8],
            class: u32::from_le_bytes([cfg[9], cfg[10], cfg[11], 0]),
            subsystem_vendor: w(0x2c),
            subsystem: w(0x2e),
            address: address.to_string(),
        })
    }
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:04x} (subsystem {:04x}:{:04x}, class {:06x}) at {}",
            self.vendor,
            self.device,
            self.subsystem_vendor,
            self.subsystem,
            self.class,
            self.address
        )
    }
}

/// A page range of a BAR, `bar:offset+size` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRange {
    /// BAR number.
    pub bar: usize,
    /// Offset in the BAR.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl std::str::FromStr for BarRange {
    type Err = String;

    /// Parses `BAR:OFFSET+SIZE`, numbers decimal or `0x` hexadecimal.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad =
            || format!("{s:?} is not a BAR range; write BAR:OFFSET+SIZE, e.g. 0:0x1000+0x1000");
        let (bar, rest) = s.split_once(':').ok_or_else(bad)?;
        let (offset, size) = rest.split_once('+').ok_or_else(bad)?;
        let num = |t: &str| match t.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => t.parse().ok(),
        };
        let (Some(bar), Some(offset), Some(size)) = (num(bar), num(offset), num(size)) else {
            return Err(bad());
        };
        if bar > 5 {
            return Err(format!("{s:?}: BAR {bar} does not exist (0-5)"));
        }
        Ok(BarRange {
            bar: bar as usize,
            offset,
            size,
        })
    }
}

/// Options given to the mediator with the device (`--device vfio-mediated,...`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MediatorOptions {
    /// The PF-side control socket of the device, for mediators that need it.
    pub pf: Option<PathBuf>,
    /// Ranges to trap from the start (the `trace` mediator).
    pub trap: Vec<BarRange>,
    /// Whether the mediator was named (`false`: offered under `mediator=auto`).
    pub named: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_ranges_parse_and_bad_ones_say_why() {
        assert_eq!(
            "0:0x1000+0x1000".parse::<BarRange>(),
            Ok(BarRange {
                bar: 0,
                offset: 0x1000,
                size: 0x1000
            })
        );
        assert_eq!("2:4096+8192".parse::<BarRange>().unwrap().size, 8192);
        for bad in ["", "0", "0:0x1000", "x:1+1", "0:1+zz"] {
            let e = bad.parse::<BarRange>().unwrap_err();
            assert!(e.contains("BAR:OFFSET+SIZE"), "{e}");
        }
        assert!("6:0+0x1000"
            .parse::<BarRange>()
            .unwrap_err()
            .contains("0-5"));
    }
}
