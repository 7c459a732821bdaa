//! The `--device` option: a PCI function passed through to the guest.
//!
//! ```text
//! --device vfio-user,socket=PATH[,id=NAME][,mmap=on|off]   a device served by a vfio-user server
//! --device vfio,host=DDDD:BB:DD.F[,id=NAME]     a host PCI function bound to vfio-pci
//! --device vfio-mediated,socket=PATH|host=DDDD:BB:DD.F,mediator=NAME|auto[,pf=PATH]
//!          [,trap=BAR:OFFSET+SIZE;...][,id=NAME][,mmap=on|off]
//!                                               either of the above, with a mediator
//! ```
//!
//! Parsing ([`DeviceConfig`], through [`super::keyvalue`]) checks each option alone;
//! [`resolve`] checks them together (ids unique, host addresses valid) and names the
//! devices that have no id (`vfio0`, `vfio1`, ...).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::keyvalue::{from_key_values, KeyValueError};

/// One `--device` option as given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceConfig {
    /// A device served by a vfio-user server.
    VfioUser(VfioUserConfig),
    /// A host PCI function through the kernel's VFIO.
    Vfio(VfioConfig),
    /// A vfio-user device or host function with a mediator in front of it.
    VfioMediated(VfioMediatedConfig),
}

/// `vfio-mediated,socket=PATH|host=DDDD:BB:DD.F,mediator=NAME|auto[,pf=PATH][,trap=...][,id=NAME][,mmap=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfioMediatedConfig {
    /// The vfio-user server's socket (or give `host`).
    pub socket: Option<PathBuf>,
    /// The host function (or give `socket`).
    pub host: Option<String>,
    /// The mediator's name, or `auto`: the first registered mediator that accepts.
    pub mediator: String,
    /// The device's PF-side control socket, for mediators that need it.
    pub pf: Option<PathBuf>,
    /// BAR ranges to trap from the start, `BAR:OFFSET+SIZE` separated by `;` (the `trace`
    /// mediator).
    pub trap: Option<String>,
    /// Name in logs, statistics and the control API.
    pub id: Option<String>,
    /// As [`VfioUserConfig::mmap`].
    pub mmap: Option<bool>,
}

/// `vfio-user,socket=PATH[,id=NAME][,mmap=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfioUserConfig {
    /// The server's Unix socket.
    pub socket: PathBuf,
    /// Name in logs and statistics.
    pub id: Option<String>,
    /// Map the device's mappable BAR areas into the guest (default on); off traps every
    /// BAR access.
    pub mmap: Option<bool>,
}

/// `vfio,host=DDDD:BB:DD.F[,id=NAME][,mmap=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfioConfig {
    /// The host function's address, `domain:bus:device.function`.
    pub host: String,
    /// Name in logs and statistics.
    pub id: Option<String>,
    /// As [`VfioUserConfig::mmap`].
    pub mmap: Option<bool>,
}

/// A `--device` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0}; use vfio-user,socket=PATH[,id=NAME], vfio,host=DDDD:BB:DD.F[,id=NAME] or vfio-mediated,socket=PATH|host=DDDD:BB:DD.F,mediator=NAME|auto[,pf=PATH][,id=NAME]")]
pub struct DeviceParseError(KeyValueError);

impl FromStr for DeviceConfig {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_key_values(s).map_err(DeviceParseError)
    }
}

impl DeviceConfig {
    /// Whether mappable BAR areas are mapped into the guest (`mmap=`, default on).
    pub fn mmap(&self) -> bool {
        match self {
            DeviceConfig::VfioUser(c) => c.mmap,
            DeviceConfig::Vfio(c) => c.mmap,
            DeviceConfig::VfioMediated(c) => c.mmap,
        }
        .unwrap_or(true)
    }

    /// The id given, if any.
    pub fn id(&self) -> Option<&str> {
        match self {
            DeviceConfig::VfioUser(c) => c.id.as_deref(),
            DeviceConfig::Vfio(c) => c.id.as_deref(),
            DeviceConfig::VfioMediated(c) => c.id.as_deref(),
        }
    }
}

/// A PCI address on the host: `domain:bus:device.function`, all hexadecimal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostBdf {
    /// PCI domain (segment), 0-ffff.
    pub domain: u16,
    /// Bus, 0-ff.
    pub bus: u8,
    /// Device, 0-1f.
    pub device: u8,
    /// Function, 0-7.
    pub function: u8,
}

impl fmt::Display for HostBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl HostBdf {
    /// Parses `DDDD:BB:DD.F` (exactly that form, hexadecimal, as sysfs names devices).
    pub fn parse(s: &str) -> Option<HostBdf> {
        let (domain, rest) = s.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (device, function) = rest.split_once('.')?;
        let hex = |t: &str, len: usize| {
            (t.len() == len && t.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| u16::from_str_radix(t, 16).ok())
                .flatten()
        };
        let bdf = HostBdf {
            domain: hex(domain, 4)?,
            bus: hex(bus, 2)? as u8,
            device: hex(device, 2)? as u8,
            function: hex(function, 1)? as u8,
        };
        (bdf.device < 32 && bdf.function < 8).then_some(bdf)
    }

    /// The function's directory in sysfs.
    pub fn sysfs_path(&self) -> PathBuf {
        PathBuf::from(format!("/sys/bus/pci/devices/{self}"))
    }
}

/// What serves a resolved device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A vfio-user server listening at this socket.
    VfioUser {
        /// The socket path.
        socket: PathBuf,
    },
    /// A host function through kernel VFIO.
    Vfio {
        /// Its address.
        host: HostBdf,
    },
}

/// The mediator a device asked for, with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mediation {
    /// Mediator name or `auto`.
    pub mediator: String,
    /// The PF-side control socket.
    pub pf: Option<PathBuf>,
    /// Ranges to trap from the start.
    pub trap: Vec<mediate::BarRange>,
}

/// A device ready to be built: named, with its options checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Unique name.
    pub id: String,
    /// What serves it.
    pub kind: DeviceKind,
    /// Map mappable BAR areas into the guest (false: trap every BAR access).
    pub mmap: bool,
    /// The mediator in front of it, if any.
    pub mediation: Option<Mediation>,
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.mediation.is_some() {
            "vfio-mediated,"
        } else {
            ""
        };
        match &self.kind {
            DeviceKind::VfioUser { socket } => {
                let kind = if kind.is_empty() { "vfio-user," } else { kind };
                write!(f, "{} ({kind}socket={})", self.id, socket.display())
            }
            DeviceKind::Vfio { host } => {
                let kind = if kind.is_empty() { "vfio," } else { kind };
                write!(f, "{} ({kind}host={host})", self.id)
            }
        }?;
        if let Some(m) = &self.mediation {
            write!(f, " with mediator {}", m.mediator)?;
        }
        Ok(())
    }
}

impl DeviceKind {
    /// The address a mediator is told: `vfio-user:PATH` or `vfio:DDDD:BB:DD.F`.
    pub fn address(&self) -> String {
        match self {
            DeviceKind::VfioUser { socket } => format!("vfio-user:{}", socket.display()),
            DeviceKind::Vfio { host } => format!("vfio:{host}"),
        }
    }
}

/// Why the `--device` options cannot be used together.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceConfigError {
    /// Two devices have the same id.
    #[error("--device: id '{0}' is used by more than one device")]
    DuplicateId(String),
    /// An id is empty or has characters that would break logs and statistics.
    #[error("--device: id '{0}' is not valid; use letters, digits, '-' and '_'")]
    BadId(String),
    /// `host=` is not a PCI address.
    #[error("--device vfio,host={0}: not a PCI address; use DDDD:BB:DD.F in hexadecimal, e.g. 0000:01:00.0")]
    BadHost(String),
    /// `socket=` is empty.
    #[error("--device vfio-user: socket= needs a path")]
    EmptySocket,
    /// `vfio-mediated` needs exactly one of `socket=` and `host=`.
    #[error("--device vfio-mediated: give either socket=PATH (a vfio-user server) or host=DDDD:BB:DD.F (a host function), not {0}")]
    MediatedBackend(&'static str),
    /// `trap=` does not parse.
    #[error("--device vfio-mediated: trap={value}: {reason}; separate several ranges with ';'")]
    BadTrap {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// Checks the devices together and names those without an id: each gets the lowest
/// `vfioN` not taken by an explicit id.
pub fn resolve(devices: &[DeviceConfig]) -> Result<Vec<DeviceSpec>, DeviceConfigError> {
    let mut explicit: Vec<&str> = Vec::new();
    for id in devices.iter().filter_map(DeviceConfig::id) {
        let ok = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(DeviceConfigError::BadId(id.to_string()));
        }
        if explicit.contains(&id) {
            return Err(DeviceConfigError::DuplicateId(id.to_string()));
        }
        explicit.push(id);
    }
    let mut next = 0usize;
    let mut specs = Vec::with_capacity(devices.len());
    for d in devices {
        let id = match d.id() {
            Some(id) => id.to_string(),
            None => loop {
                let candidate = format!("vfio{next}");
                next += 1;
                if !explicit.contains(&candidate.as_str()) {
                    break candidate;
                }
            },
        };
        let kind = match d {
            DeviceConfig::VfioUser(c) => {
                if c.socket.as_os_str().is_empty() {
                    return Err(DeviceConfigError::EmptySocket);
                }
                DeviceKind::VfioUser {
                    socket: c.socket.clone(),
                }
            }
            DeviceConfig::Vfio(c) => vfio_kind(&c.host)?,
            DeviceConfig::VfioMediated(c) => match (&c.socket, &c.host) {
                (Some(s), None) if s.as_os_str().is_empty() => {
                    return Err(DeviceConfigError::EmptySocket)
                }
                (Some(s), None) => DeviceKind::VfioUser { socket: s.clone() },
                (None, Some(h)) => vfio_kind(h)?,
                (Some(_), Some(_)) => return Err(DeviceConfigError::MediatedBackend("both")),
                (None, None) => return Err(DeviceConfigError::MediatedBackend("neither")),
            },
        };
        let mediation = match d {
            DeviceConfig::VfioMediated(c) => Some(Mediation {
                mediator: c.mediator.clone(),
                pf: c.pf.clone(),
                trap: parse_traps(c.trap.as_deref().unwrap_or(""))?,
            }),
            _ => None,
        };
        specs.push(DeviceSpec {
            id,
            kind,
            mmap: d.mmap(),
            mediation,
        });
    }
    Ok(specs)
}

fn vfio_kind(host: &str) -> Result<DeviceKind, DeviceConfigError> {
    Ok(DeviceKind::Vfio {
        host: HostBdf::parse(host).ok_or_else(|| DeviceConfigError::BadHost(host.to_string()))?,
    })
}

/// `BAR:OFFSET+SIZE;...` (empty: none).
fn parse_traps(value: &str) -> Result<Vec<mediate::BarRange>, DeviceConfigError> {
    value
        .split(';')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|reason| DeviceConfigError::BadTrap {
                value: value.to_string(),
                reason,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mediated_devices_parse_and_are_checked() {
        let specs = resolve(&[
            parse("vfio-mediated,socket=/a,mediator=virtio-blk-vf,pf=/a.pf,id=vf0"),
            parse("vfio-mediated,host=0000:01:00.1,mediator=trace,trap=0:0x1000+0x1000;2:0+4096"),
        ])
        .unwrap();
        assert_eq!(specs[0].kind.address(), "vfio-user:/a");
        let m = specs[0].mediation.as_ref().unwrap();
        assert_eq!(
            (m.mediator.as_str(), m.pf.as_deref()),
            ("virtio-blk-vf", Some(std::path::Path::new("/a.pf")))
        );
        assert_eq!(
            specs[0].to_string(),
            "vf0 (vfio-mediated,socket=/a) with mediator virtio-blk-vf"
        );
        assert_eq!(specs[1].kind.address(), "vfio:0000:01:00.1");
        assert_eq!(specs[1].mediation.as_ref().unwrap().trap.len(), 2);
        assert!(resolve(&[parse("vfio-user,socket=/a")]).unwrap()[0]
            .mediation
            .is_none());
        let e = resolve(&[parse(
            "vfio-mediated,socket=/a,host=0000:01:00.0,mediator=auto",
        )])
        .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let e = resolve(&[parse("vfio-mediated,mediator=auto")]).unwrap_err();
        assert!(e.to_string().contains("not neither"), "{e}");
        let e = resolve(&[parse(
            "vfio-mediated,socket=/a,mediator=trace,trap=0:0x1000",
        )])
        .unwrap_err();
        assert!(e.to_string().contains("write BAR:OFFSET+SIZE"), "{e}");
        let e = "vfio-mediated,socket=/a"
            .parse::<DeviceConfig>()
            .unwrap_err();
        assert!(e.to_string().starts_with("missing field `mediator`"), "{e}");
    }

    fn parse(s: &str) -> DeviceConfig {
        s.parse().unwrap()
    }

    #[test]
    fn both_device_types_parse() {
        assert_eq!(
            parse("vfio-user,socket=/run/d.sock"),
            DeviceConfig::VfioUser(VfioUserConfig {
                socket: "/run/d.sock".into(),
                id: None,
                mmap: None,
            })
        );
        assert_eq!(
            parse("vfio,host=0000:01:00.1,id=nic"),
            DeviceConfig::Vfio(VfioConfig {
                host: "0000:01:00.1".into(),
                id: Some("nic".into()),
                mmap: None,
            })
        );
    }

    #[test]
    fn mmap_defaults_to_on_and_can_be_switched_off() {
        let specs = resolve(&[
            parse("vfio-user,socket=/a"),
            parse("vfio-user,socket=/b,mmap=off"),
            parse("vfio-user,socket=/c,mmap=on"),
        ])
        .unwrap();
        let mmap: Vec<bool> = specs.iter().map(|s| s.mmap).collect();
        assert_eq!(mmap, [true, false, true]);
        assert!("vfio-user,socket=/a,mmap=maybe"
            .parse::<DeviceConfig>()
            .is_err());
    }

    #[test]
    fn parse_errors_say_what_and_how() {
        let e = "vfio-user,sock=/x".parse::<DeviceConfig>().unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("unknown field `sock`"), "{e}");
        assert!(e.contains("use vfio-user,socket=PATH"), "{e}");
        let e = "vfio-user,id=a".parse::<DeviceConfig>().unwrap_err();
        assert!(e.to_string().starts_with("missing field `socket`"), "{e}");
        let e = "virtio-net".parse::<DeviceConfig>().unwrap_err();
        assert!(
            e.to_string().starts_with("unknown variant `virtio-net`"),
            "{e}"
        );
    }

    #[test]
    fn ids_default_and_must_be_unique() {
        let specs = resolve(&[
            parse("vfio-user,socket=/a"),
            parse("vfio-user,socket=/b,id=vfio1"),
            parse("vfio-user,socket=/c"),
        ])
        .unwrap();
        let ids: Vec<_> = specs.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["vfio0", "vfio1", "vfio2"]);
        assert_eq!(
            specs[0].to_string(),
            "vfio0 (vfio-user,socket=/a)".to_string()
        );
        let e = resolve(&[
            parse("vfio-user,socket=/a,id=x"),
            parse("vfio,host=0000:00:01.0,id=x"),
        ])
        .unwrap_err();
        assert_eq!(e, DeviceConfigError::DuplicateId("x".into()));
        assert_eq!(
            e.to_string(),
            "--device: id 'x' is used by more than one device"
        );
        let e = resolve(&[parse("vfio-user,socket=/a,id=a b")]).unwrap_err();
        assert_eq!(e, DeviceConfigError::BadId("a b".into()));
    }

    #[test]
    fn host_addresses_are_checked() {
        let bdf = HostBdf::parse("0000:3b:1f.7").unwrap();
        assert_eq!((bdf.bus, bdf.device, bdf.function), (0x3b, 0x1f, 7));
        assert_eq!(bdf.to_string(), "0000:3b:1f.7");
        assert_eq!(
            bdf.sysfs_path(),
            PathBuf::from("/sys/bus/pci/devices/0000:3b:1f.7")
        );
        for bad in [
            "01:00.0",
            "0000:01:00",
            "0000:01:20.0",
            "0000:01:00.8",
            "000g:01:00.0",
            "0000:1:00.0",
            "0000:01:00.0x",
            "+000:01:00.0",
        ] {
            assert_eq!(HostBdf::parse(bad), None, "{bad}");
        }
        let e = resolve(&[parse("vfio,host=01:00.0")]).unwrap_err();
        assert!(e.to_string().contains("use DDDD:BB:DD.F"), "{e}");
    }
}
