//! `vfsim` as a child process with its vfio-user and PF sockets, killed (by its pid)
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pf_protocol::PfClient;

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vfsim-pf-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A zero-filled disk image of `size` bytes in the directory.
    pub fn disk(&self, size: u64) -> PathBuf {
        let disk = self.0.join("disk.img");
        std::fs::write(&disk, vec![0u8; size as usize]).unwrap();
        disk
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `vfsim` process.
pub struct Vfsim {
    pub child: Child,
    pub socket: PathBuf,
    pub pf_socket: PathBuf,
}

impl Vfsim {
    /// Starts `vfsim` over `disk` with sockets `<name>.sock` and `<name>.pf` in `dir`
    /// and waits until both accept connections.
    pub fn start(dir: &Path, name: &str, disk: &Path) -> Vfsim {
        Self::start_with(dir, name, disk, &[])
    }

    /// [`Vfsim::start`] with extra arguments (e.g. `--native-migration`).
    pub fn start_with(dir: &Path, name: &str, disk: &Path, extra: &[&str]) -> Vfsim {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfsim"));
        cmd.arg("--disk").arg(disk);
        Self::launch(cmd, dir, name, extra)
    }

    /// Runs `cmd` (vfsim, or a wrapper that execs it) with sockets `<name>.sock` and
    /// `<name>.pf` in `dir`, `extra` after them, and waits until both accept connections.
    pub fn launch(mut cmd: Command, dir: &Path, name: &str, extra: &[&str]) -> Vfsim {
        let socket = dir.join(format!("{name}.sock"));
        let pf_socket = dir.join(format!("{name}.pf"));
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .arg("--pf-socket")
            .arg(&pf_socket)
            .args(["--log-level", "warn"])
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let v = Vfsim {
            child,
            socket,
            pf_socket,
        };
        wait_for_sockets(&[&v.socket, &v.pf_socket]);
        v
    }

    /// A PF client with a 5 s timeout.
    pub fn pf(&self) -> PfClient {
        PfClient::connect(&self.pf_socket, Duration::from_secs(5)).unwrap()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Vfsim {
    fn drop(&mut self) {
        // Kills the child this test started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 10 s for every path in `sockets` to exist (vfsim binds the PF socket
/// first, so both existing means both accept connections).
pub fn wait_for_sockets(sockets: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sockets.iter().all(|s| s.exists()) {
        assert!(
            Instant::now() < deadline,
            "vfsim did not create its sockets"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
