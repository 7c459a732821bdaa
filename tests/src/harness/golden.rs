//! Golden snapshots: a guest booted once per configuration, snapshotted at user space with the
//! agent answering, and restored for every test that declares that configuration, instead of
//! 80-100 s of emulated boot each.
//!
//! A test opts in with [`VmBuilder::golden`](super::VmBuilder::golden), naming its devices as
//! [`Device`]s and starting them with [`Device::start`] (so the devices it runs are the ones
//! the snapshot was made with). [`VmBuilder::boot`](super::VmBuilder::boot) then restores from
//! the configuration's golden snapshot, making it first if there is none. Tests whose subject
//! is booting (boot, CPUID, first contact with a device or peer) do not opt in.
//!
//! # The cache
//! `$VMM_GOLDEN_DIR` (default `$XDG_CACHE_HOME/vmm-golden`, else `~/.cache/vmm-golden`) holds
//! one directory per key: `vm.snap` and `manifest.json`. The key is a SHA-256 over everything
//! that shapes the snapshot: the layout version below, the guest kernel and initramfs
//! (contents), the command line, memory and vCPUs, each device's kind, id, mediator and disk
//! size, and the contents of the `vmm` and `vfsim` binaries and of any peer server binary (for
//! ELF files their loaded sections, see [`build_digest`]: the same sources built in another
//! clone hit the cache), so a rebuilt VMM never restores a state an older build wrote. Before each use the manifest's
//! version and key and the snapshot's size and SHA-256 are checked; an entry that fails
//! (corrupt, truncated, half-written, another layout) is removed and rebuilt, never used.
//! Making an entry happens in a staging directory renamed into place, under an exclusive
//! `flock` on `<key>.lock`; users hold a shared lock while their VMM reads the snapshot.
//! Entries unused for [`PRUNE_AFTER`] are removed when a new one is made.
//!
//! # What restores of one snapshot share
//! Each restore gets fresh device processes (vfsim given the saved VF state by the VMM's
//! restore, through its mediator or its own migration), fresh zeroed disk images of the saved
//! size, and fresh sockets and logs. The guest's RAM, kernel and agent state are the same in
//! each: the same wall clock (when the snapshot was taken) and the same kernel random state;
//! the guest's monotonic clocks continue from the snapshot's uptime. The harness's first
//! request to a restored guest is the agent's `refresh` ([`Agent::refresh`](super::Agent::refresh)):
//! it sets the wall clock to the host's and reseeds the kernel's random generator with host
//! bytes. The boot id is made at its first read, after that (nothing reads it before the
//! snapshot), so each restore has its own. Workload data is seeded by each test's own seeds,
//! so nothing else carries over. `VMM_TEST_GOLDEN=off` boots every guest cold instead.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::api::ApiClient;
use super::build_digest;
use super::image::GuestImage;
use super::peers::Peer;
use super::testdir::{TestDir, TestDirError};
use super::vfsim::{tap_name, Vfsim, Wire};
use super::vm::{VmBuilder, VmError, DEFAULT_BOOT_TIMEOUT};

/// Version of the cache layout and of what a golden snapshot is taken at; bump it when the
/// way they are made changes.
pub const LAYOUT_VERSION: u32 = 1;
/// `off`: boot every guest cold, ignoring [`VmBuilder::golden`](super::VmBuilder::golden).
pub const GOLDEN_ENV: &str = "VMM_TEST_GOLDEN";
/// Directory of the cache (see the module documentation).
pub const GOLDEN_DIR_ENV: &str = "VMM_GOLDEN_DIR";
/// Entries unused for this long are removed when a new one is made.
pub const PRUNE_AFTER: Duration = Duration::from_secs(6 * 3600);
/// How long to wait for another process making or checking the same entry.
const LOCK_WAIT: Duration = Duration::from_secs(900);

/// Why a golden snapshot could not be found or made.
#[derive(Debug, Error)]
pub enum GoldenError {
    /// The cache directory or a file in it could not be used.
    #[error("golden snapshot cache: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No scratch directory for the boot that makes the snapshot.
    #[error(transparent)]
    TestDir(#[from] TestDirError),
    /// The guest booted to make the snapshot failed.
    #[error("booting the guest for a golden snapshot ({what}) failed: {source}")]
    Boot {
        /// The configuration.
        what: String,
        /// What failed.
        #[source]
        source: Box<VmError>,
    },
    /// The VMM's snapshot request failed.
    #[error("snapshot of the golden guest ({what}) failed: {reason}{context}")]
    Snapshot {
        /// The configuration.
        what: String,
        /// The API's error.
        reason: String,
        /// VM logs.
        context: String,
    },
    /// The test's VMM arguments do not match its declared devices.
    #[error(
        "the test gives {given} --device options but declares {declared} golden devices: \
         every device must be declared with VmBuilder::golden and started with Device::start"
    )]
    Devices {
        /// `--device` options in the VMM arguments.
        given: usize,
        /// Devices declared.
        declared: usize,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> GoldenError {
    let path = path.to_path_buf();
    move |source| GoldenError::Io { what, path, source }
}

/// A device of a guest made from a golden snapshot: what serves it and how the VMM attaches
/// it. All of it is part of the snapshot's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// vfsim with its PF socket, passed through as `vfio-mediated` behind `mediator`.
    MediatedVfsim {
        /// The VMM's device id.
        id: String,
        /// The mediator's name.
        mediator: String,
        /// What the VF is.
        function: Function,
    },
    /// vfsim with its own vfio-user migration (`--native-migration`), passed through as
    /// `vfio-user`.
    NativeVfsim {
        /// The VMM's device id.
        id: String,
        /// What the VF is.
        function: Function,
    },
    /// libvfio-user's `server` sample.
    LvuServer {
        /// The VMM's device id.
        id: String,
    },
    /// libvfio-user's `gpio-pci-idio-16` sample.
    LvuGpio {
        /// The VMM's device id.
        id: String,
    },
}

/// What a vfsim VF is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Function {
    /// A virtio-blk VF over a zeroed image of `disk_size` bytes (the guest reads its
    /// capacity at boot).
    Blk {
        /// The disk image's size.
        disk_size: u64,
    },
    /// A virtio-net VF with MAC `mac`, wired to a tap named by [`tap_name`] in the
    /// namespace vfsim runs in (attached to nothing: a test that wants traffic bridges it).
    Net {
        /// The MAC address the guest reads at boot.
        mac: String,
    },
}

/// A device's running process.
pub enum DeviceProcess {
    /// vfsim.
    Vfsim(Vfsim),
    /// A third-party server.
    Peer(Peer),
}

impl Device {
    /// A vfsim behind `mediator`.
    pub fn mediated(id: &str, mediator: &str, disk_size: u64) -> Device {
        Device::MediatedVfsim {
            id: id.to_owned(),
            mediator: mediator.to_owned(),
            function: Function::Blk { disk_size },
        }
    }

    /// A vfsim migrating by itself.
    pub fn native(id: &str, disk_size: u64) -> Device {
        Device::NativeVfsim {
            id: id.to_owned(),
            function: Function::Blk { disk_size },
        }
    }

    /// A vfsim virtio-net VF with `mac` behind the `virtio-net-vf` mediator.
    pub fn mediated_net(id: &str, mac: &str) -> Device {
        Device::MediatedVfsim {
            id: id.to_owned(),
            mediator: "virtio-net-vf".to_owned(),
            function: Function::Net {
                mac: mac.to_owned(),
            },
        }
    }

    /// A vfsim virtio-net VF with `mac` migrating by itself.
    pub fn native_net(id: &str, mac: &str) -> Device {
        Device::NativeVfsim {
            id: id.to_owned(),
            function: Function::Net {
                mac: mac.to_owned(),
            },
        }
    }

    /// Starts the device's process in `dir` (sockets and log named after `name`), inside
    /// `netns` if given; a virtio-blk vfsim serves `disk` (which must have the declared size)
    /// or a new zeroed image `NAME.img` in `dir`, a virtio-net vfsim a tap named by
    /// [`tap_name`]. Returns the process and the VMM's `--device` option.
    pub fn start(
        &self,
        dir: &TestDir,
        name: &str,
        netns: Option<&str>,
        disk: Option<&Path>,
    ) -> (DeviceProcess, String) {
        let disk_for = |size: u64| -> PathBuf {
            match disk {
                Some(disk) => {
                    let len = fs::metadata(disk)
                        .unwrap_or_else(|e| panic!("disk image {}: {e}", disk.display()))
                        .len();
                    assert_eq!(
                        len,
                        size,
                        "disk image {} is not the size the golden snapshot was made with",
                        disk.display()
                    );
                    disk.to_path_buf()
                }
                None => dir.disk(&format!("{name}.img"), size),
            }
        };
        let tap = tap_name(dir, name);
        let vfsim = |function: &Function, native: bool| match function {
            Function::Blk { disk_size } => {
                let disk = disk_for(*disk_size);
                Vfsim::start_wired(dir, Wire::Disk(&disk), name, netns, native)
            }
            Function::Net { mac } => {
                let wire = Wire::Tap { name: &tap, mac };
                Vfsim::start_wired(dir, wire, name, netns, native)
            }
        };
        match self {
            Device::MediatedVfsim {
                id,
                mediator,
                function,
            } => {
                let v = vfsim(function, false);
                let arg = v.mediated(mediator, id);
                (DeviceProcess::Vfsim(v), arg)
            }
            Device::NativeVfsim { id, function } => {
                let v = vfsim(function, true);
                let arg = format!("vfio-user,socket={},id={id}", v.socket.display());
                (DeviceProcess::Vfsim(v), arg)
            }
            Device::LvuServer { id } => {
                let p = Peer::lvu_server(dir, name, netns);
                let arg = p.device(id, "");
                (DeviceProcess::Peer(p), arg)
            }
            Device::LvuGpio { id } => {
                let p = Peer::lvu_gpio(dir, name, netns);
                let arg = p.device(id, "");
                (DeviceProcess::Peer(p), arg)
            }
        }
    }

    /// [`start`](Self::start) for a vfsim device; panics for a peer.
    pub fn start_vfsim(
        &self,
        dir: &TestDir,
        name: &str,
        netns: Option<&str>,
        disk: Option<&Path>,
    ) -> (Vfsim, String) {
        match self.start(dir, name, netns, disk) {
            (DeviceProcess::Vfsim(v), arg) => (v, arg),
            (DeviceProcess::Peer(_), _) => panic!("{self:?} is not served by vfsim"),
        }
    }

    /// [`start`](Self::start) for a third-party server; panics for a vfsim.
    pub fn start_peer(&self, dir: &TestDir, name: &str, netns: Option<&str>) -> (Peer, String) {
        match self.start(dir, name, netns, None) {
            (DeviceProcess::Peer(p), arg) => (p, arg),
            (DeviceProcess::Vfsim(_), _) => panic!("{self:?} is not a third-party server"),
        }
    }

    /// The binary serving this device, whose contents are part of the key.
    fn server_binary(&self) -> PathBuf {
        match self {
            Device::MediatedVfsim { .. } | Device::NativeVfsim { .. } => Vfsim::binary(),
            Device::LvuServer { .. } => Peer::lvu_server_binary(),
            Device::LvuGpio { .. } => Peer::lvu_gpio_binary(),
        }
    }
}

/// Whether golden snapshots are used (`VMM_TEST_GOLDEN` is not `off`).
pub fn enabled() -> bool {
    std::env::var(GOLDEN_ENV)
        .map(|v| v != "off")
        .unwrap_or(true)
}

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(GOLDEN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("vmm-golden")
}

/// What is written beside each golden snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`LAYOUT_VERSION`] when it was made.
    pub layout: u32,
    /// The key (hex SHA-256), also the directory's name.
    pub key: String,
    /// What the key was computed over, for people.
    pub inputs: Vec<String>,
    /// Size of `vm.snap`.
    pub snapshot_bytes: u64,
    /// SHA-256 of `vm.snap` (hex).
    pub snapshot_sha256: String,
    /// How long the guest took to boot to its agent when it was made.
    pub boot_ms: u64,
}

/// A golden snapshot checked and ready: its path, and a shared lock on its entry held until
/// this is dropped (so no other process rebuilds it while a VMM reads it).
#[derive(Debug)]
pub struct Golden {
    /// The snapshot file.
    pub snapshot: PathBuf,
    /// The entry's manifest.
    pub manifest: Manifest,
    _lock: File,
}

/// The golden snapshot for `builder`'s configuration with `devices`, made now if it is
/// missing or fails its checks.
pub fn snapshot_for(builder: &VmBuilder, devices: &[Device]) -> Result<Golden, GoldenError> {
    let given = builder
        .vmm_arg_list()
        .iter()
        .filter(|a| *a == "--device")
        .count();
    if given != devices.len() {
        return Err(GoldenError::Devices {
            given,
            declared: devices.len(),
        });
    }
    let image = builder.resolved_image().map_err(|e| GoldenError::Boot {
        what: "guest image".into(),
        source: Box::new(e),
    })?;
    let vmm = builder.resolved_vmm().map_err(|e| GoldenError::Boot {
        what: "vmm binary".into(),
        source: Box::new(e),
    })?;
    let inputs = key_inputs(builder, &image, &vmm, devices)?;
    let key = hex(&Sha256::digest(inputs.join("\n").as_bytes()));
    let root = cache_dir();
    fs::create_dir_all(&root).map_err(io_err("creating", &root))?;
    let entry = root.join(&key);
    let lock_path = root.join(format!("{key}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("opening", &lock_path))?;

    // Checked under a shared lock; made under an exclusive one (checked again: another process
    // may have made it meanwhile).
    flock(&lock, libc::LOCK_SH, &lock_path)?;
    match check(&entry, &key) {
        Ok(manifest) => return Ok(ready(&entry, manifest, lock)),
        Err(Check::Missing) => {}
        Err(Check::Bad(why)) => eprintln!(
            "vmm-tests: golden snapshot {} is {why}: it is rebuilt",
            entry.display()
        ),
    }
    flock(&lock, libc::LOCK_UN, &lock_path)?;
    flock(&lock, libc::LOCK_EX, &lock_path)?;
    let manifest = match check(&entry, &key) {
        Ok(manifest) => manifest,
        Err(_) => {
            prune(&root, &key);
            make(builder, devices, &root, &entry, &key, inputs)?
        }
    };
    // Downgrade to shared: other users may restore it too.
    flock(&lock, libc::LOCK_SH, &lock_path)?;
    Ok(ready(&entry, manifest, lock))
}

fn ready(entry: &Path, manifest: Manifest, lock: File) -> Golden {
    // The entry's last use, for pruning.
    let _ = File::options()
        .write(true)
        .open(entry.join("manifest.json"))
        .and_then(|f| f.set_modified(SystemTime::now()));
    Golden {
        snapshot: entry.join("vm.snap"),
        manifest,
        _lock: lock,
    }
}

/// `flock(op)`, waiting up to [`LOCK_WAIT`] for a blocking one.
fn flock(file: &File, op: libc::c_int, path: &Path) -> Result<(), GoldenError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock has no memory-safety preconditions; the fd is open.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() >= deadline {
            return Err(GoldenError::Io {
                what: "locking",
                path: path.to_path_buf(),
                source: e,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Why an entry cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// There is none.
    Missing,
    /// It is there but must not be used (the reason).
    Bad(String),
}

/// Checks the entry `dir` for `key`: manifest readable, same layout and key, snapshot of the
/// recorded size and SHA-256.
pub fn check(dir: &Path, key: &str) -> Result<Manifest, Check> {
    let text = match fs::read_to_string(dir.join("manifest.json")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => {
            return Err(Check::Missing)
        }
        Err(e) => return Err(Check::Bad(format!("without a readable manifest ({e})"))),
    };
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| Check::Bad(format!("with a manifest that does not parse ({e})")))?;
    if m.layout != LAYOUT_VERSION {
        return Err(Check::Bad(format!(
            "of layout {} (this harness makes {LAYOUT_VERSION})",
            m.layout
        )));
    }
    if m.key != key {
        return Err(Check::Bad(format!("made for key {} instead", m.key)));
    }
    let snap = dir.join("vm.snap");
    let len = fs::metadata(&snap)
        .map_err(|e| Check::Bad(format!("without its snapshot ({e})")))?
        .len();
    if len != m.snapshot_bytes {
        return Err(Check::Bad(format!(
            "{len} bytes long instead of {}",
            m.snapshot_bytes
        )));
    }
    let sha = sha256_file(&snap).map_err(|e| Check::Bad(format!("unreadable ({e})")))?;
    if sha != m.snapshot_sha256 {
        return Err(Check::Bad(format!(
            "corrupt (SHA-256 {sha}, recorded {})",
            m.snapshot_sha256
        )));
    }
    Ok(m)
}

/// Boots the configuration in a scratch directory with fresh devices, waits for the agent,
/// snapshots into a staging directory and renames it to `entry`.
fn make(
    builder: &VmBuilder,
    devices: &[Device],
    root: &Path,
    entry: &Path,
    key: &str,
    inputs: Vec<String>,
) -> Result<Manifest, GoldenError> {
    let what = format!(
        "memory {}, {} vCPUs, devices {devices:?}",
        builder.memory_arg(),
        builder.cpus_arg()
    );
    eprintln!("vmm-tests: making a golden snapshot: {what}");
    let dir = TestDir::new("golden")?;
    let mut processes = Vec::new();
    let mut args = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let (process, arg) = device.start(&dir, &format!("g{i}"), None, None);
        processes.push(process);
        args.push("--device".to_owned());
        args.push(arg);
    }
    let api_path = dir.join("api.sock");
    args.push("--api-socket".to_owned());
    args.push(api_path.display().to_string());
    let boot_err = |e: VmError| GoldenError::Boot {
        what: what.clone(),
        source: Box::new(e),
    };
    let started = Instant::now();
    let vm = builder.for_golden(args).boot().map_err(boot_err)?;
    let mut agent = vm.agent(DEFAULT_BOOT_TIMEOUT).map_err(boot_err)?;
    let boot_ms = started.elapsed().as_millis() as u64;
    agent.ping().map_err(|e| boot_err(e.into()))?;
    let snap_err = |reason: String| GoldenError::Snapshot {
        what: what.clone(),
        reason,
        context: vm.describe(),
    };
    let mut api = ApiClient::connect(&api_path, Duration::from_secs(10)).map_err(snap_err)?;
    let staging = root.join(format!("{key}.staging-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err("creating", &staging))?;
    let snap = staging.join("vm.snap");
    api.request(&serde_json::json!({"request": "snapshot", "path": snap}))
        .map_err(snap_err)?;
    drop(agent);
    let _ = vm.kill();
    drop(processes);

    let manifest = Manifest {
        layout: LAYOUT_VERSION,
        key: key.to_owned(),
        inputs,
        snapshot_bytes: fs::metadata(&snap).map_err(io_err("reading", &snap))?.len(),
        snapshot_sha256: sha256_file(&snap).map_err(io_err("reading", &snap))?,
        boot_ms,
    };
    let manifest_path = staging.join("manifest.json");
    let mut f = File::create(&manifest_path).map_err(io_err("creating", &manifest_path))?;
    f.write_all(serde_json::to_string_pretty(&manifest).unwrap().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing", &manifest_path))?;
    if entry.exists() {
        fs::remove_dir_all(entry).map_err(io_err("removing the bad entry", entry))?;
    }
    fs::rename(&staging, entry).map_err(io_err("renaming into place", &staging))?;
    eprintln!(
        "vmm-tests: golden snapshot {} made ({} bytes; the boot took {:.1} s)",
        entry.display(),
        manifest.snapshot_bytes,
        boot_ms as f64 / 1000.0
    );
    Ok(manifest)
}

/// Removes entries (and stale staging directories) unused for [`PRUNE_AFTER`] whose lock is
/// free; never `keep`.
fn prune(root: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(keep) || name.ends_with(".lock") {
            continue;
        }
        let path = e.path();
        let stamp = if path.join("manifest.json").exists() {
            path.join("manifest.json")
        } else {
            path.clone()
        };
        let old = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > PRUNE_AFTER);
        if !old {
            continue;
        }
        let key = name.split('.').next().unwrap_or(&name).to_owned();
        let lock_path = root.join(format!("{key}.lock"));
        let Ok(lock) = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
        else {
            continue;
        };
        // SAFETY: flock has no memory-safety preconditions; the fd is open.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            eprintln!(
                "vmm-tests: removing the unused golden snapshot {}",
                path.display()
            );
            let _ = fs::remove_dir_all(&path);
            let _ = fs::remove_file(&lock_path);
        }
    }
}

/// The lines hashed into the key.
fn key_inputs(
    builder: &VmBuilder,
    image: &GuestImage,
    vmm: &Path,
    devices: &[Device],
) -> Result<Vec<String>, GoldenError> {
    // Contents only, never paths: a fresh clone (CI's) builds the same binaries elsewhere.
    let file = |label: &str, path: &Path| -> Result<String, GoldenError> {
        Ok(format!(
            "{label} {}",
            digest_cached(path).map_err(io_err("hashing", path))?
        ))
    };
    let mut inputs = vec![
        format!("layout {LAYOUT_VERSION}"),
        file("kernel", &image.vmlinux)?,
        file("initramfs", &image.initramfs)?,
        format!("cmdline {}", builder.cmdline()),
        format!("memory {}", builder.memory_arg()),
        format!("cpus {}", builder.cpus_arg()),
        file("vmm", vmm)?,
    ];
    for d in devices {
        inputs.push(format!("device {d:?}"));
        inputs.push(file("server", &d.server_binary())?);
    }
    Ok(inputs)
}

/// [`build_digest::digest`] of a file, remembered per process by path, size and
/// modification time (the VMM binary and the guest image are hashed once per test binary,
/// not once per test).
fn digest_cached(path: &Path) -> io::Result<String> {
    type Seen = HashMap<PathBuf, (u64, SystemTime, String)>;
    static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
    let meta = fs::metadata(path)?;
    let stamp = (meta.len(), meta.modified()?);
    let seen = SEEN.get_or_init(Default::default);
    if let Some((len, mtime, sha)) = seen.lock().unwrap().get(path) {
        if (*len, *mtime) == stamp {
            return Ok(sha.clone());
        }
    }
    let sha = build_digest::digest(path)?;
    seen.lock()
        .unwrap()
        .insert(path.to_path_buf(), (stamp.0, stamp.1, sha.clone()));
    Ok(sha)
}

/// SHA-256 of a file's contents, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_with(snapshot: &[u8], key: &str) -> (TestDir, PathBuf) {
        let dir = TestDir::new("golden-check").unwrap();
        let entry = dir.join(key);
        fs::create_dir_all(&entry).unwrap();
        fs::write(entry.join("vm.snap"), snapshot).unwrap();
        let m = Manifest {
            layout: LAYOUT_VERSION,
            key: key.to_owned(),
            inputs: vec!["test".into()],
            snapshot_bytes: snapshot.len() as u64,
            snapshot_sha256: sha256_file(&entry.join("vm.snap")).unwrap(),
            boot_ms: 1,
        };
        fs::write(
            entry.join("manifest.json"),
            serde_json::to_string(&m).unwrap(),
        )
        .unwrap();
        (dir, entry)
    }

    #[test]
    fn a_sound_entry_passes() {
        let (_d, entry) = entry_with(b"snapshot bytes", "k1");
        let m = check(&entry, "k1").unwrap();
        assert_eq!(m.snapshot_bytes, 14);
    }

    /// The reason `result` is [`Check::Bad`]; panics on anything else.
    fn bad(result: Result<Manifest, Check>) -> String {
        match result {
            Err(Check::Bad(why)) => why,
            other => panic!("not bad: {other:?}"),
        }
    }

    #[test]
    fn a_missing_entry_is_missing() {
        let dir = TestDir::new("golden-missing").unwrap();
        assert_eq!(
            check(&dir.join("nothing"), "k").unwrap_err(),
            Check::Missing
        );
    }

    #[test]
    fn a_flipped_byte_is_corrupt() {
        let (_d, entry) = entry_with(b"snapshot bytes", "k1");
        fs::write(entry.join("vm.snap"), b"snapshot bytex").unwrap();
        let why = bad(check(&entry, "k1"));
        assert!(why.starts_with("corrupt"), "{why}");
    }

    #[test]
    fn a_truncated_snapshot_is_refused() {
        let (_d, entry) = entry_with(b"snapshot bytes", "k1");
        fs::write(entry.join("vm.snap"), b"snap").unwrap();
        let why = bad(check(&entry, "k1"));
        assert!(why.contains("4 bytes long instead of 14"), "{why}");
    }

    #[test]
    fn another_layout_or_key_is_stale() {
        let (_d, entry) = entry_with(b"x", "k1");
        let why = bad(check(&entry, "k2"));
        assert!(why.contains("made for key k1"), "{why}");
        let text = fs::read_to_string(entry.join("manifest.json")).unwrap();
        let old = text.replace(
            &format!("\"layout\":{LAYOUT_VERSION}"),
            &format!("\"layout\":{}", LAYOUT_VERSION + 1),
        );
        assert_ne!(old, text);
        fs::write(entry.join("manifest.json"), old).unwrap();
        let why = bad(check(&entry, "k1"));
        assert!(why.contains("of layout"), "{why}");
    }

    #[test]
    fn a_half_written_entry_is_refused() {
        let (_d, entry) = entry_with(b"x", "k1");
        fs::remove_file(entry.join("manifest.json")).unwrap();
        let why = bad(check(&entry, "k1"));
        assert!(why.contains("manifest"), "{why}");
    }
}
