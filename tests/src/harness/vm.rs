//! Booting a guest with the `vmm` binary: [`VmBuilder`] and [`Vm`].

use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::client::{deadline_after, Agent, AgentError};
use super::diag;
use super::golden::{self, Device, Golden, GoldenError};
use super::image::{GuestImage, ImageError};
use super::paths::{self, PathsError};
use super::testdir::{TestDir, TestDirError};

/// Default time for a guest to boot far enough to answer the agent (it takes 1-3 minutes on
/// the nested test hosts).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Interval between pings while waiting for the agent.
const PING_INTERVAL: Duration = Duration::from_secs(3);
/// Silence after which [`Vm::agent`] reconnects to the agent socket.
const RECONNECT_AFTER: Duration = Duration::from_secs(12);
/// Time between SIGTERM and SIGKILL when stopping the VMM.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Poll interval for process exit, socket creation and console output.
const POLL: Duration = Duration::from_millis(50);
/// Longest path a Unix socket address holds (sun_path less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why booting or driving a VM failed. Messages about a VM that misbehaved carry the tails of
/// its console.log and vmm.stderr.
#[derive(Debug, Error)]
pub enum VmError {
    /// No guest image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// No VMM binary.
    #[error(transparent)]
    Paths(#[from] PathsError),
    /// No scratch directory.
    #[error(transparent)]
    TestDir(#[from] TestDirError),
    /// A log file could not be created.
    #[error("cannot create {path}: {source}")]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent socket path does not fit a Unix socket address.
    #[error("socket path {path} is longer than {MAX_SOCKET_PATH} bytes; set TMPDIR to a shorter directory")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// The VMM could not be started.
    #[error("cannot start {vmm}: {source}")]
    Spawn {
        /// The binary.
        vmm: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited while we waited for something else.
    #[error("the vmm exited ({status}) while {doing}{context}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// What we were waiting for.
        doing: String,
        /// VM logs.
        context: String,
    },
    /// The agent socket never accepted a connection.
    #[error("cannot connect to the agent socket {path} within {timeout:?}: {source}{context}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long we tried.
        timeout: Duration,
        /// The last OS error.
        #[source]
        source: std::io::Error,
        /// VM logs.
        context: String,
    },
    /// The agent never answered a ping.
    #[error("the guest agent did not answer a ping within {timeout:?}{context}")]
    BootTimeout {
        /// How long we tried.
        timeout: Duration,
        /// VM logs.
        context: String,
    },
    /// The VMM did not exit in time.
    #[error("the vmm did not exit within {timeout:?}{context}")]
    WaitTimeout {
        /// How long we waited.
        timeout: Duration,
        /// VM logs.
        context: String,
    },
    /// Expected console output did not appear in time.
    #[error("{needle:?} did not appear on the console within {timeout:?}{context}")]
    ConsoleTimeout {
        /// What we looked for.
        needle: String,
        /// How long we waited.
        timeout: Duration,
        /// VM logs.
        context: String,
    },
    /// waitpid on the VMM failed.
    #[error("waiting for the vmm (pid {pid}) failed: {source}")]
    Wait {
        /// Its pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent connection failed while waiting for the first ping reply.
    #[error("{source}{context}")]
    AgentLost {
        /// What failed.
        source: AgentError,
        /// VM logs.
        context: String,
    },
    /// Talking to the agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// No golden snapshot to restore.
    #[error(transparent)]
    Golden(#[from] GoldenError),
}

/// Configures and boots a [`Vm`]; see [`Vm::builder`].
#[derive(Debug, Clone)]
pub struct VmBuilder {
    cpus: u32,
    memory: String,
    extra_args: Vec<String>,
    vmm_args: Vec<String>,
    image: Option<GuestImage>,
    vmm: Option<PathBuf>,
    restore: Option<PathBuf>,
    incoming: Option<String>,
    netns: Option<String>,
    golden: Option<Vec<Device>>,
}

impl Default for VmBuilder {
    fn default() -> Self {
        VmBuilder {
            cpus: 1,
            memory: "256M".to_owned(),
            extra_args: Vec::new(),
            vmm_args: Vec::new(),
            image: None,
            vmm: None,
            restore: None,
            incoming: None,
            netns: None,
            golden: None,
        }
    }
}

impl VmBuilder {
    /// Number of vCPUs (default 1).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Guest memory as the VMM's `--memory` takes it (default `"256M"`).
    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.to_owned();
        self
    }

    /// Words appended to the guest kernel command line (after [`paths::guest_cmdline`]), e.g.
    /// `agent.oneshot`.
    pub fn extra_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.extra_args
            .extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Arguments appended to the VMM's command line, e.g. a disk option.
    pub fn vmm_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.vmm_args
            .extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Boots this kernel and initramfs instead of [`GuestImage::get`]'s.
    pub fn image(mut self, image: GuestImage) -> Self {
        self.image = Some(image);
        self
    }

    /// Starts from this snapshot (`--restore`) instead of booting: no kernel, memory or
    /// vCPU options are passed.
    pub fn restore(mut self, snapshot: &Path) -> Self {
        self.restore = Some(snapshot.to_path_buf());
        self
    }

    /// Waits for a live migration (`--incoming tcp:ADDR:PORT`) instead of booting.
    pub fn incoming(mut self, url: &str) -> Self {
        self.incoming = Some(url.to_string());
        self
    }

    /// Runs the VMM inside this network namespace (`ip netns exec NAME`).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    /// Starts from the golden snapshot of this configuration (see [`golden`]) instead of
    /// booting, unless `VMM_TEST_GOLDEN=off`. `devices` are the guest's devices, each started
    /// with [`Device::start`] and given in [`vmm_args`](Self::vmm_args) as `--device`; the
    /// other VMM arguments must not shape the guest (an API socket, `--exit-stats`).
    pub fn golden(mut self, devices: &[Device]) -> Self {
        self.golden = Some(devices.to_vec());
        self
    }

    /// Runs this VMM binary instead of [`paths::vmm_binary`]'s.
    pub fn vmm_binary(mut self, vmm: &Path) -> Self {
        self.vmm = Some(vmm.to_path_buf());
        self
    }

    /// The guest kernel command line this builder passes.
    pub fn cmdline(&self) -> String {
        let mut cmdline = paths::guest_cmdline();
        for arg in &self.extra_args {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        cmdline
    }

    /// The VMM arguments added with [`vmm_args`](Self::vmm_args).
    pub fn vmm_arg_list(&self) -> &[String] {
        &self.vmm_args
    }

    /// The `--memory` this builder passes.
    pub fn memory_arg(&self) -> &str {
        &self.memory
    }

    /// The `--cpus` this builder passes.
    pub fn cpus_arg(&self) -> u32 {
        self.cpus
    }

    /// The guest image this builder boots.
    pub fn resolved_image(&self) -> Result<GuestImage, VmError> {
        Ok(match &self.image {
            Some(image) => image.clone(),
            None => GuestImage::get()?.clone(),
        })
    }

    /// The VMM binary this builder runs.
    pub fn resolved_vmm(&self) -> Result<PathBuf, VmError> {
        Ok(match &self.vmm {
            Some(vmm) => vmm.clone(),
            None => paths::vmm_binary()?,
        })
    }

    /// The same guest booted cold, here, with `vmm_args` only: how a golden snapshot is made.
    pub(super) fn for_golden(&self, vmm_args: Vec<String>) -> VmBuilder {
        VmBuilder {
            vmm_args,
            restore: None,
            incoming: None,
            netns: None,
            golden: None,
            ..self.clone()
        }
    }

    /// Starts the VMM: `--kernel --initramfs --cmdline --memory --cpus` (or `--restore` of the
    /// golden snapshot, see [`golden`](Self::golden)), COM1 to `<dir>/console.log`, COM2 on
    /// the socket `<dir>/agent.sock`, stderr to `<dir>/vmm.stderr` (stdout to
    /// `<dir>/vmm.stdout`). Returns once the process runs; see [`Vm::agent`].
    pub fn boot(mut self) -> Result<Vm, VmError> {
        let image = self.resolved_image()?;
        let vmm = self.resolved_vmm()?;
        let golden = match &self.golden {
            Some(devices)
                if golden::enabled() && self.restore.is_none() && self.incoming.is_none() =>
            {
                let g = golden::snapshot_for(&self, devices)?;
                self.restore = Some(g.snapshot.clone());
                Some(g)
            }
            _ => None,
        };
        let dir = TestDir::new("vm")?;
        let console = dir.join("console.log");
        let socket = dir.join("agent.sock");
        if socket.as_os_str().as_bytes().len() > MAX_SOCKET_PATH {
            return Err(VmError::SocketPathTooLong { path: socket });
        }
        let create = |path: PathBuf| {
            File::create(&path).map_err(|source| VmError::CreateFile { path, source })
        };
        let stderr = create(dir.join("vmm.stderr"))?;
        let stdout = create(dir.join("vmm.stdout"))?;

        let mut args: Vec<String> = match (&self.restore, &self.incoming) {
            (_, Some(url)) => vec!["--incoming".into(), url.clone()],
            (Some(snapshot), None) => vec!["--restore".into(), snapshot.display().to_string()],
            (None, None) => vec![
                "--kernel".into(),
                image.vmlinux.display().to_string(),
                "--initramfs".into(),
                image.initramfs.display().to_string(),
                "--cmdline".into(),
                self.cmdline(),
                "--memory".into(),
                self.memory.clone(),
                "--cpus".into(),
                self.cpus.to_string(),
            ],
        };
        args.extend([
            "--serial".into(),
            format!("file={}", console.display()),
            "--serial2".into(),
            format!("socket={}", socket.display()),
        ]);
        args.extend(self.vmm_args.iter().cloned());

        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&vmm);
                c
            }
            None => Command::new(&vmm),
        };
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| VmError::Spawn {
                vmm: vmm.clone(),
                source,
            })?;
        let pid = child.id();
        eprintln!(
            "vmm-tests: started {} (pid {pid}), logs in {}",
            vmm.display(),
            dir.path().display()
        );
        let mut command = vec![vmm.display().to_string()];
        command.extend(args);
        Ok(Vm {
            shared: Arc::new(Shared {
                child: Mutex::new(child),
                pid,
                dir: dir.path().to_path_buf(),
            }),
            command,
            socket,
            dir,
            refresh_pending: AtomicBool::new(golden.is_some()),
            golden,
        })
    }
}

/// State shared with the diagnostics closure of [`Agent`]s made by [`Vm::agent`].
struct Shared {
    child: Mutex<Child>,
    pid: u32,
    dir: PathBuf,
}

impl Shared {
    fn child(&self) -> MutexGuard<'_, Child> {
        // A panic while holding the lock leaves the Child usable.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn try_status(&self) -> Result<Option<ExitStatus>, VmError> {
        self.child().try_wait().map_err(|source| VmError::Wait {
            pid: self.pid,
            source,
        })
    }

    /// The VMM's state and the tails of its logs, for error messages.
    fn describe(&self) -> String {
        let state = match self.child().try_wait() {
            Ok(Some(status)) => format!("vmm (pid {}) exited: {status}", self.pid),
            Ok(None) => format!("vmm (pid {}) still running", self.pid),
            Err(e) => format!("vmm (pid {}): waitpid failed: {e}", self.pid),
        };
        format!(
            "\n{state}{}{}",
            diag::section("console.log", &self.dir.join("console.log")),
            diag::section("vmm.stderr", &self.dir.join("vmm.stderr"))
        )
    }

    /// SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL; returns the exit status.
    fn stop(&self) -> Result<ExitStatus, VmError> {
        let mut child = self.child();
        let wait_err = |source| VmError::Wait {
            pid: self.pid,
            source,
        };
        if let Some(status) = child.try_wait().map_err(wait_err)? {
            return Ok(status);
        }
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped (we hold
            // its lock and try_wait said it runs), so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().map_err(wait_err)? {
                return Ok(status);
            }
            thread::sleep(POLL);
        }
        // SIGKILL; an error means it has exited meanwhile, which wait() reports.
        let _ = child.kill();
        child.wait().map_err(wait_err)
    }
}

/// A running VMM process and its scratch directory. Dropping it stops the VMM (SIGTERM, then
/// SIGKILL after 2 s) and removes the directory unless `$VMM_TEST_KEEP` is set.
pub struct Vm {
    shared: Arc<Shared>,
    command: Vec<String>,
    socket: PathBuf,
    dir: TestDir,
    /// The golden snapshot it was restored from (its shared lock held while the VM lives).
    golden: Option<Golden>,
    /// Restored from a golden snapshot and not yet sent the agent's `refresh`.
    refresh_pending: AtomicBool,
}

impl Vm {
    /// A builder with 1 vCPU and 256M of memory.
    pub fn builder() -> VmBuilder {
        VmBuilder::default()
    }

    /// Connects to the guest agent and waits until it answers a ping: retries connecting until
    /// the VMM has created the socket, then pings every 3 s (bytes sent before the guest opens
    /// its port are lost), reconnecting after 12 s of silence. Fails early, with the logs, if
    /// the VMM exits.
    ///
    /// The reconnection works around serial backends whose input stalls when bytes arrive
    /// while the guest opens the port (seen with QEMU 7.2: the socket is never read again on
    /// that connection).
    pub fn agent(&self, timeout: Duration) -> Result<Agent, VmError> {
        let deadline = deadline_after(timeout);
        loop {
            let mut agent = self.connect_agent(timeout, deadline)?;
            let connected = Instant::now();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(VmError::BootTimeout {
                        timeout,
                        context: self.shared.describe(),
                    });
                }
                match agent.ping_timeout(left.min(PING_INTERVAL)) {
                    Ok(_) => {
                        // Diagnostics are attached only now: reading the logs on every ping
                        // timeout would be wasted work.
                        let shared = Arc::clone(&self.shared);
                        let mut agent = agent.with_context(move || shared.describe());
                        if self.refresh_pending.swap(false, Ordering::SeqCst) {
                            let r = agent.refresh()?;
                            eprintln!(
                                "vmm-tests: restored from the golden snapshot; guest clock moved \
                                 {} ms, kernel RNG reseeded (now draws {}), boot id {}",
                                r.clock_step_ms, r.random, r.boot_id
                            );
                        }
                        return Ok(agent);
                    }
                    // A timeout, or an error reply to a ping garbled while the guest opened
                    // its port: try again.
                    Err(AgentError::Timeout { .. } | AgentError::Remote { .. }) => {
                        if let Some(status) = self.shared.try_status()? {
                            return Err(self.exited(status, "waiting for the agent to answer"));
                        }
                    }
                    Err(e) => {
                        return Err(VmError::AgentLost {
                            source: e,
                            context: self.shared.describe(),
                        })
                    }
                }
                if connected.elapsed() >= RECONNECT_AFTER {
                    break;
                }
            }
        }
    }

    /// Connects to the agent socket, retrying until `deadline` while the VMM runs.
    fn connect_agent(&self, timeout: Duration, deadline: Instant) -> Result<Agent, VmError> {
        loop {
            if let Some(status) = self.shared.try_status()? {
                return Err(self.exited(status, "connecting to the agent socket"));
            }
            match UnixStream::connect(&self.socket) {
                Ok(stream) => return Ok(Agent::from_unix_stream(stream)?),
                Err(source) if Instant::now() >= deadline => {
                    return Err(VmError::Connect {
                        path: self.socket.clone(),
                        timeout,
                        source,
                        context: self.shared.describe(),
                    })
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// Waits up to `timeout` for a console line containing `needle`; returns that line.
    pub fn wait_console(&self, needle: &str, timeout: Duration) -> Result<String, VmError> {
        let deadline = deadline_after(timeout);
        loop {
            // Read the status first so output written just before exiting is not missed.
            let status = self.shared.try_status()?;
            if let Some(line) = self.console().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = status {
                return Err(self.exited(status, &format!("waiting for {needle:?} on the console")));
            }
            if Instant::now() >= deadline {
                return Err(VmError::ConsoleTimeout {
                    needle: needle.to_owned(),
                    timeout,
                    context: self.shared.describe(),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` for the VMM to exit (e.g. after a guest reboot or power-off).
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, VmError> {
        let deadline = deadline_after(timeout);
        loop {
            if let Some(status) = self.shared.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(VmError::WaitTimeout {
                    timeout,
                    context: self.shared.describe(),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// The VMM's exit status if it has exited.
    pub fn try_exit_status(&self) -> Result<Option<ExitStatus>, VmError> {
        self.shared.try_status()
    }

    /// Stops the VMM now (SIGTERM, SIGKILL after 2 s) and returns its exit status.
    pub fn kill(&self) -> Result<ExitStatus, VmError> {
        self.shared.stop()
    }

    /// Everything the guest wrote to its console (COM1) so far.
    pub fn console(&self) -> String {
        read_lossy(&self.dir.join("console.log"))
    }

    /// Everything the VMM wrote to stderr so far.
    pub fn vmm_stderr(&self) -> String {
        read_lossy(&self.dir.join("vmm.stderr"))
    }

    /// The VMM's state and the tails of its logs, as appended to error messages.
    pub fn describe(&self) -> String {
        self.shared.describe()
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The VM's scratch directory (logs, socket; a good place for disk images).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent socket (the VMM's COM2).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The golden snapshot this VM was restored from, if it was.
    pub fn golden(&self) -> Option<&Golden> {
        self.golden.as_ref()
    }

    /// The VMM command line, binary first.
    pub fn command(&self) -> &[String] {
        &self.command
    }

    fn exited(&self, status: ExitStatus, doing: &str) -> VmError {
        VmError::Exited {
            status,
            doing: doing.to_owned(),
            context: self.shared.describe(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.shared.stop() {
            eprintln!("vmm-tests: stopping the vmm failed: {e}");
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_cmdline() {
        let b = Vm::builder()
            .cpus(2)
            .memory("128M")
            .extra_args(&["agent.oneshot"]);
        assert!(b.cmdline().starts_with(&paths::guest_cmdline()));
        assert!(b.cmdline().ends_with(" agent.oneshot"));
        assert_eq!(b.cpus, 2);
        assert_eq!(b.memory, "128M");
    }

    /// A fake VMM (a shell script) exercises process handling without KVM.
    fn fake_vm(script: &str) -> (TestDir, Vm) {
        let bin_dir = TestDir::new("fakevmm").unwrap();
        let bin = bin_dir.join("vmm");
        fs::write(&bin, format!("#!/bin/sh\n{script}\n")).unwrap();
        let status = Command::new("chmod").arg("+x").arg(&bin).status().unwrap();
        assert!(status.success());
        let image = GuestImage {
            vmlinux: bin.clone(),
            initramfs: bin.clone(),
        };
        let vm = Vm::builder().image(image).vmm_binary(&bin).boot().unwrap();
        (bin_dir, vm)
    }

    #[test]
    fn early_exit_is_reported_with_logs() {
        let (_bin, vm) = fake_vm("echo booting; echo 'bad option' >&2; exit 3");
        let e = vm.agent(Duration::from_secs(20)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, VmError::Exited { .. }), "{msg}");
        assert!(msg.contains("bad option"), "{msg}");
        assert_eq!(
            vm.wait_exit(Duration::from_secs(5)).unwrap().code(),
            Some(3)
        );
    }

    #[test]
    fn console_wait_and_kill() {
        // The script writes its arguments' --serial file=PATH target, then hangs.
        let (_bin, vm) = fake_vm(
            "while [ $# -gt 0 ]; do if [ \"$1\" = --serial ]; then f=${2#file=}; fi; shift; done\n\
             echo 'vmm-guest-agent: user space up, kernel x' > \"$f\"\nexec sleep 60",
        );
        let line = vm
            .wait_console("user space up", Duration::from_secs(20))
            .unwrap();
        assert!(line.ends_with("kernel x"));
        assert!(vm.console().contains("user space up"));
        let e = vm.wait_exit(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, VmError::WaitTimeout { .. }));
        let e = vm
            .wait_console("never", Duration::from_millis(100))
            .unwrap_err();
        assert!(e.to_string().contains("user space up"), "{e}");
        let status = vm.kill().unwrap();
        assert!(!status.success());
        assert_eq!(vm.try_exit_status().unwrap(), Some(status));
    }
}
