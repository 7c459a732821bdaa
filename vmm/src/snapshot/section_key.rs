//! Whose state a device section of the stream carries.
//!
//! A section's id is a string on the wire (`migration::DeviceState::id`). The passed-through
//! devices' own states use the `--device` id as it is; everything the VMM adds has a `/` in
//! it, which a `--device` id cannot contain (letters, digits, `-` and `_`, see
//! `config/device.rs`). So no id a user picks, `i8042` or `serial0` included, can be taken
//! for the VMM's own state (before stream format 4 the legacy devices were `serial0`,
//! `serial1` and `i8042`, and a device given one of those ids had its state swallowed).

/// The owner of a device section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionKey {
    /// A passed-through device's own state (its `DeviceMigration`): `ID`.
    Passthrough(String),
    /// A passed-through device's virtualized PCI configuration: `pci/ID`.
    PciConfig(String),
    /// A legacy serial port, by index: `legacy/serialN`.
    Serial(usize),
    /// The i8042 controller: `legacy/i8042`.
    I8042,
    /// The PCI configuration mechanism's address latch (port 0xCF8): `legacy/pci-config`.
    PciRoot,
    /// The host bridge's configuration space: `legacy/host-bridge`.
    HostBridge,
}

impl SectionKey {
    /// The id written on the wire.
    pub fn encode(&self) -> String {
        match self {
            SectionKey::Passthrough(id) => id.clone(),
            SectionKey::PciConfig(id) => format!("pci/{id}"),
            SectionKey::Serial(n) => format!("legacy/serial{n}"),
            SectionKey::I8042 => "legacy/i8042".to_owned(),
            SectionKey::PciRoot => "legacy/pci-config".to_owned(),
            SectionKey::HostBridge => "legacy/host-bridge".to_owned(),
        }
    }

    /// The key of a wire id; `None` for an id with a `/` that names nothing of ours.
    pub fn parse(wire: &str) -> Option<SectionKey> {
        if let Some(id) = wire.strip_prefix("pci/") {
            return (!id.is_empty() && !id.contains('/')).then(|| SectionKey::PciConfig(id.into()));
        }
        if let Some(name) = wire.strip_prefix("legacy/") {
            if name == "i8042" {
                return Some(SectionKey::I8042);
            }
            if name == "pci-config" {
                return Some(SectionKey::PciRoot);
            }
            if name == "host-bridge" {
                return Some(SectionKey::HostBridge);
            }
            let n = name.strip_prefix("serial")?;
            // Digits only, no sign or leading zero: one spelling per port.
            if n.is_empty()
                || !n.bytes().all(|b| b.is_ascii_digit())
                || (n.len() > 1 && n.starts_with('0'))
            {
                return None;
            }
            return n.parse().ok().map(SectionKey::Serial);
        }
        (!wire.contains('/')).then(|| SectionKey::Passthrough(wire.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_round_trips() {
        for key in [
            SectionKey::Passthrough("vf0".into()),
            SectionKey::Passthrough("i8042".into()),
            SectionKey::Passthrough("serial0".into()),
            SectionKey::Passthrough("legacy".into()),
            SectionKey::Passthrough("pci".into()),
            SectionKey::PciConfig("vf0".into()),
            SectionKey::PciConfig("i8042".into()),
            SectionKey::Serial(0),
            SectionKey::Serial(1),
            SectionKey::Serial(12),
            SectionKey::I8042,
            SectionKey::HostBridge,
            SectionKey::PciRoot,
        ] {
            assert_eq!(
                SectionKey::parse(&key.encode()),
                Some(key.clone()),
                "{key:?}"
            );
        }
    }

    #[test]
    fn user_ids_named_like_legacy_devices_stay_passthrough_devices() {
        // Ids `--device` accepts, including the legacy devices' old wire ids.
        for id in ["i8042", "serial0", "serial1", "legacy", "pci", "vf-0_a"] {
            assert_eq!(
                SectionKey::parse(id),
                Some(SectionKey::Passthrough(id.into()))
            );
            assert_ne!(
                SectionKey::PciConfig(id.into()).encode(),
                SectionKey::I8042.encode()
            );
        }
    }

    #[test]
    fn unknown_namespaced_ids_are_not_ours() {
        for wire in [
            "legacy/serial",
            "legacy/serial-1",
            "legacy/serial01",
            "legacy/serial+1",
            "legacy/serial99999999999999999999999",
            "legacy/rtc",
            "pci/",
            "pci/a/b",
            "vf0/pci",
            "other/x",
        ] {
            assert_eq!(SectionKey::parse(wire), None, "{wire}");
        }
    }
}
