//! Starting `vfsim` (the simulated VF) for a test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::paths::vmm_binary;
use super::testdir::TestDir;

/// A running vfsim, killed on drop.
pub struct Vfsim {
    child: Child,
    /// The vfio-user socket it listens on.
    pub socket: PathBuf,
    /// Its PF-side control socket, if started with one.
    pub pf: Option<PathBuf>,
    /// The tap a virtio-net VF is wired to (in the namespace it runs in).
    pub tap: Option<String>,
}

/// What a vfsim serves: a virtio-blk VF over a disk image, or a virtio-net VF whose wire is
/// a tap device.
#[derive(Debug, Clone, Copy)]
pub enum Wire<'a> {
    /// `--disk PATH`.
    Disk(&'a Path),
    /// `--net-tap NAME --mac MAC`.
    Tap {
        /// The tap's name (at most 15 bytes; see [`tap_name`]).
        name: &'a str,
        /// The VF's MAC address, `xx:xx:xx:xx:xx:xx`.
        mac: &'a str,
    },
}

/// A tap name for vfsim `name` of test directory `dir`: unique across the tests running at
/// once (interface names are per namespace, and golden snapshots are made in the
/// machine's own), and within the kernel's 15 bytes.
pub fn tap_name(dir: &TestDir, name: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.path().hash(&mut h);
    name.hash(&mut h);
    format!("vt{:012x}", h.finish() & 0xffff_ffff_ffff)
}

impl Vfsim {
    /// Starts `vfsim` (built beside `vmm`) on `disk`, with socket and log `NAME.sock` /
    /// `NAME.log` in `dir`, and waits for its socket. Panics when it cannot start.
    pub fn start(dir: &TestDir, disk: &Path, name: &str) -> Vfsim {
        Self::spawn(dir, Wire::Disk(disk), name, false, None, &[])
    }

    /// As [`start`](Self::start), with a PF-side control socket `NAME.pf` in `dir`.
    pub fn start_with_pf(dir: &TestDir, disk: &Path, name: &str) -> Vfsim {
        Self::spawn(dir, Wire::Disk(disk), name, true, None, &[])
    }

    /// As [`start_with_pf`](Self::start_with_pf), inside network namespace `netns` (a
    /// device of another "host"; its Unix sockets are still files in `dir`).
    pub fn start_in(dir: &TestDir, disk: &Path, name: &str, netns: &str) -> Vfsim {
        Self::spawn(dir, Wire::Disk(disk), name, true, Some(netns), &[])
    }

    /// As [`start_in`](Self::start_in), with vfsim's own vfio-user migration
    /// (`--native-migration`).
    pub fn start_native_in(dir: &TestDir, disk: &Path, name: &str, netns: &str) -> Vfsim {
        Self::start_native(dir, disk, name, Some(netns))
    }

    /// vfsim with its PF socket and its own vfio-user migration (`--native-migration`),
    /// inside `netns` if given.
    pub fn start_native(dir: &TestDir, disk: &Path, name: &str, netns: Option<&str>) -> Vfsim {
        Self::spawn(
            dir,
            Wire::Disk(disk),
            name,
            true,
            netns,
            &["--native-migration"],
        )
    }

    /// vfsim serving `wire`, with its PF socket, inside `netns` if given, with vfsim's own
    /// vfio-user migration if `native`.
    pub fn start_wired(
        dir: &TestDir,
        wire: Wire<'_>,
        name: &str,
        netns: Option<&str>,
        native: bool,
    ) -> Vfsim {
        let extra: &[&str] = if native { &["--native-migration"] } else { &[] };
        Self::spawn(dir, wire, name, true, netns, extra)
    }

    /// The vfsim binary (built beside `vmm`).
    pub fn binary() -> PathBuf {
        vmm_binary().expect("vmm binary").with_file_name("vfsim")
    }

    fn spawn(
        dir: &TestDir,
        wire: Wire<'_>,
        name: &str,
        with_pf: bool,
        netns: Option<&str>,
        extra: &[&str],
    ) -> Vfsim {
        let bin = Self::binary();
        assert!(
            bin.is_file(),
            "vfsim is built beside vmm: {}",
            bin.display()
        );
        let socket = dir.join(format!("{name}.sock"));
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let pf = with_pf.then(|| dir.join(format!("{name}.pf")));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("--socket").arg(&socket);
        let tap = match wire {
            Wire::Disk(disk) => {
                cmd.arg("--disk").arg(disk);
                None
            }
            Wire::Tap { name, mac } => {
                cmd.args(["--net-tap", name, "--mac", mac]);
                Some(name.to_owned())
            }
        };
        if let Some(pf) = &pf {
            cmd.arg("--pf-socket").arg(pf);
        }
        cmd.args(extra);
        let child = cmd
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vfsim");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "vfsim did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Vfsim {
            child,
            socket,
            pf,
            tap,
        }
    }
}

impl Vfsim {
    /// A client of its PF-side control socket (counters, state, its DMA write log).
    /// Panics when it has none or it does not answer.
    pub fn pf_client(&self) -> pf_protocol::PfClient {
        let path = self
            .pf
            .as_ref()
            .expect("vfsim was started without a PF socket");
        pf_protocol::PfClient::connect(path, std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("vfsim's PF socket {}: {e}", path.display()))
    }

    /// Kills vfsim with SIGKILL (no chance to clean up, as in a crash) and reaps it.
    pub fn kill(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.kill()?;
        self.child.wait()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Vfsim {
    /// The `--device` option passing this VF through with `mediator` in front (its PF
    /// socket given when it has one), as device `id`.
    pub fn mediated(&self, mediator: &str, id: &str) -> String {
        let pf = self
            .pf
            .as_ref()
            .map(|p| format!(",pf={}", p.display()))
            .unwrap_or_default();
        format!(
            "vfio-mediated,socket={},mediator={mediator}{pf},id={id}",
            self.socket.display()
        )
    }
}

impl Drop for Vfsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
