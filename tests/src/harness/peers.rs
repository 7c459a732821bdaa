//! Third-party vfio-user servers for the interop tests: libvfio-user's samples (`server`,
//! `gpio-pci-idio-16`) and QEMU's `x-vfio-user-server`, built from Debian's QEMU source
//! package by `tests/peers/build.sh` (which `scripts/test.sh` runs and whose paths it
//! exports). A test that needs a peer fails with a clear message when it is not built:
//! the interop tests never pass by skipping.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::testdir::TestDir;

/// Environment variables naming the peers' binaries (set by `scripts/test.sh` from the
/// output of `tests/peers/build.sh`).
pub const LVU_SERVER_ENV: &str = "VMM_PEER_LIBVFIO_USER_SERVER";
/// See [`LVU_SERVER_ENV`].
pub const LVU_GPIO_ENV: &str = "VMM_PEER_LIBVFIO_USER_GPIO";
/// See [`LVU_SERVER_ENV`].
pub const QEMU_ENV: &str = "VMM_PEER_QEMU_VFIO_USER";

fn peer_binary(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: build the third-party vfio-user servers with \
             `bash tests/peers/build.sh` and export its KEY=path lines as {var} \
             (scripts/test.sh does both)"
        )
    });
    assert!(path.is_file(), "{var}={} is not a file", path.display());
    path
}

/// A running third-party device server, killed on drop.
pub struct Peer {
    child: Child,
    /// Its vfio-user socket.
    pub socket: PathBuf,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

impl Peer {
    /// libvfio-user's `server` sample (`-v`, socket `NAME.sock` in `dir`), in `netns` if
    /// given.
    pub fn lvu_server(dir: &TestDir, name: &str, netns: Option<&str>) -> Peer {
        Self::lvu_sample(LVU_SERVER_ENV, dir, name, netns)
    }

    /// libvfio-user's `gpio-pci-idio-16` sample, as [`Self::lvu_server`].
    pub fn lvu_gpio(dir: &TestDir, name: &str, netns: Option<&str>) -> Peer {
        Self::lvu_sample(LVU_GPIO_ENV, dir, name, netns)
    }

    /// The `server` sample's binary.
    pub fn lvu_server_binary() -> PathBuf {
        peer_binary(LVU_SERVER_ENV)
    }

    /// The `gpio-pci-idio-16` sample's binary.
    pub fn lvu_gpio_binary() -> PathBuf {
        peer_binary(LVU_GPIO_ENV)
    }

    /// A libvfio-user sample (binary named by `env`): `-v SOCKET`, socket `NAME.sock`.
    fn lvu_sample(env: &str, dir: &TestDir, name: &str, netns: Option<&str>) -> Peer {
        let socket = dir.join(format!("{name}.sock"));
        let bin = peer_binary(env);
        let args = ["-v".as_ref(), socket.as_os_str()];
        Self::spawn(dir, name, netns, &bin, &args, socket.clone())
    }

    /// QEMU's `x-vfio-user-server` exporting a modern-only virtio-blk-pci over `disk` (raw).
    pub fn qemu_blk(dir: &TestDir, name: &str, disk: &Path) -> Peer {
        let drive = format!(
            "driver=file,filename={},node-name=disk0,cache.direct=off",
            disk.display()
        );
        Self::qemu(
            dir,
            name,
            None,
            &["-blockdev", &drive],
            "virtio-blk-pci,drive=disk0",
        )
    }

    /// QEMU's `x-vfio-user-server` exporting a modern-only virtio-net-pci with MAC `mac`
    /// whose wire is tap `tap` (`-netdev tap,script=no`), run in `netns` if given. QEMU
    /// makes the tap itself (TUNSETIFF creates a missing one; a persistent one of that name
    /// is opened instead) before its socket appears, holds it open and leaves it down and
    /// unbridged: [`super::lan::Lan::attach_tap`] it once this returns.
    pub fn qemu_net(dir: &TestDir, name: &str, tap: &str, mac: &str, netns: Option<&str>) -> Peer {
        let netdev = format!("tap,id=wire0,ifname={tap},script=no,downscript=no");
        Self::qemu(
            dir,
            name,
            netns,
            &["-netdev", &netdev],
            // `romfile=`: its default option ROM, efi-virtio.rom, is one of the firmware
            // blobs Debian's source tarball leaves out (and no guest here boots from it).
            &format!("virtio-net-pci,netdev=wire0,mac={mac},romfile="),
        )
    }

    /// QEMU's `x-vfio-user-server` (socket `NAME.sock`) exporting `device` (a `-device`
    /// value without `id`) over the backend options `backend`, modern-only and behind the
    /// remote IOMMU (`iommu_platform=on`: docs/peers.md says why).
    fn qemu(
        dir: &TestDir,
        name: &str,
        netns: Option<&str>,
        backend: &[&str],
        device: &str,
    ) -> Peer {
        let socket = dir.join(format!("{name}.sock"));
        let bin = peer_binary(QEMU_ENV);
        let device = format!("{device},id=dev0,disable-legacy=on,iommu_platform=on");
        // QEMU 10.0 takes this object's nested socket address only in JSON form.
        let server = serde_json::json!({
            "qom-type": "x-vfio-user-server",
            "id": "vfu0",
            "socket": {"type": "unix", "path": socket},
            "device": "dev0",
        })
        .to_string();
        let mut args: Vec<&str> = vec![
            "-machine",
            "x-remote,vfio-user=on",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
        ];
        args.extend_from_slice(backend);
        args.extend_from_slice(&["-device", &device, "-object", &server]);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        Self::spawn(dir, name, netns, &bin, &args, socket)
    }

    fn spawn(
        dir: &TestDir,
        name: &str,
        netns: Option<&str>,
        bin: &Path,
        args: &[&std::ffi::OsStr],
        socket: PathBuf,
    ) -> Peer {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited ({status}) before creating {}:\n{}",
                    bin.display(),
                    socket.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not create {}",
                bin.display(),
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Peer { child, socket, log }
    }

    /// The `--device` option passing this server's function through as `id`, plus
    /// `extra` options (e.g. `mmap=off`).
    pub fn device(&self, id: &str, extra: &str) -> String {
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(",{extra}")
        };
        format!("vfio-user,socket={},id={id}{extra}", self.socket.display())
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}
