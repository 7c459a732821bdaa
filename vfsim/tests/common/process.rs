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
        let socket = dir.join(format!("{name}.sock"));
        let pf_socket = dir.join(format!("{name}.pf"));
        let child = Command::new(env!("CARGO_BIN_EXE_vfsim"))
            .arg("--socket")
            .arg(&socket)
            .arg("--pf-socket")
            .arg(&pf_socket)
            .arg("--disk")
            .arg(disk)
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(v.socket.exists() && v.pf_socket.exists()) {
            assert!(
                Instant::now() < deadline,
                "vfsim did not create its sockets"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
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
