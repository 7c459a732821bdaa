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
}

impl Vfsim {
    /// Starts `vfsim` (built beside `vmm`) on `disk`, with socket and log `NAME.sock` /
    /// `NAME.log` in `dir`, and waits for its socket. Panics when it cannot start.
    pub fn start(dir: &TestDir, disk: &Path, name: &str) -> Vfsim {
        let bin = vmm_binary().expect("vmm binary").with_file_name("vfsim");
        assert!(
            bin.is_file(),
            "vfsim is built beside vmm: {}",
            bin.display()
        );
        let socket = dir.join(format!("{name}.sock"));
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(&bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(disk)
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
        Vfsim { child, socket }
    }
}

impl Drop for Vfsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
