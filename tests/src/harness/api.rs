//! A client of the VMM's control API (`--api-socket`): JSON requests, one per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A connection to a VMM's control API.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: std::path::PathBuf,
}

impl ApiClient {
    /// Connects to the socket at `path`, waiting up to `timeout` for it to appear.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        Ok(ApiClient {
            reader: BufReader::new(stream),
            writer,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `vmm ctl --api-socket PATH migrate URL ARGS...` to its end, as an operator
    /// would. The API serves one client at a time, so this client's connection is closed
    /// meanwhile and opened again afterwards if the VMM still listens.
    pub fn ctl_migrate(&mut self, url: &str, args: &[&str]) -> CtlOutcome {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        let bin = super::vmm_binary().expect("vmm binary");
        let child = std::process::Command::new(bin)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.path)
            .arg("migrate")
            .arg(url)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run vmm ctl");
        // Bounded: a ctl that never ends fails the test instead of hanging it.
        let pid = child.id();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(CTL_MIGRATE_LIMIT).is_err() {
                // SAFETY: kill(2) only sends a signal. The pid is our child's; it is reaped
                // by wait_with_output, which can race with this only if ctl ends exactly at
                // the limit (then the signal may hit nothing or, unlikely, a reused pid).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
        let out = child.wait_with_output().expect("wait for vmm ctl");
        let _ = done_tx.send(());
        let _ = watchdog.join();
        if let Ok(again) = ApiClient::connect(&self.path, Duration::from_millis(300)) {
            *self = again;
        }
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        CtlOutcome {
            code: out.status.code(),
            status: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// Sends `request` and returns the whole response object.
    pub fn raw(&mut self, request: &Value) -> Result<Value, String> {
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("sending {request}: {e}"))?;
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .map_err(|e| format!("reading the answer to {request}: {e}"))?;
        serde_json::from_str(&reply).map_err(|e| format!("bad answer {reply:?}: {e}"))
    }

    /// Sends `request`; its `result` on success, its `error` text on failure.
    pub fn request(&mut self, request: &Value) -> Result<Value, String> {
        let r = self.raw(request)?;
        if r["ok"] == Value::Bool(true) {
            Ok(r["result"].clone())
        } else {
            Err(r["error"].as_str().unwrap_or("no error text").to_string())
        }
    }

    /// A request to the mediator of device `device`.
    pub fn mediator(&mut self, device: &str, command: &str, args: Value) -> Result<Value, String> {
        self.request(&serde_json::json!({
            "request": "mediator", "device": device, "command": command, "args": args,
        }))
    }

    /// The device statistics of device `id` (BAR counters, mapped and trapped ranges,
    /// mediator statistics).
    pub fn device_stats(&mut self, id: &str) -> Result<Value, String> {
        let all = self.request(&serde_json::json!({"request": "device-stats"}))?;
        all["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == id))
            .cloned()
            .ok_or_else(|| format!("no device {id} in {all}"))
    }

    /// A `device-migration` request `op` (e.g. `start-dirty-tracking`,
    /// `take-dirty-pages`) to device `id`.
    pub fn device_migration(&mut self, id: &str, op: &str) -> Result<Value, String> {
        self.request(&serde_json::json!({"request": "device-migration", "device": id, "op": op}))
    }

    /// The pages of a `take-dirty-pages` answer.
    pub fn dirty_pages(&mut self, id: &str) -> Result<std::collections::BTreeSet<u64>, String> {
        let v = self.device_migration(id, "take-dirty-pages")?;
        v["pages"]
            .as_array()
            .ok_or_else(|| format!("no pages in {v}"))?
            .iter()
            .map(|p| {
                p.as_u64()
                    .ok_or_else(|| format!("a page that is no number in {v}"))
            })
            .collect()
    }
}

/// The longest a `vmm ctl migrate` may take in a test before it is killed.
const CTL_MIGRATE_LIMIT: Duration = Duration::from_secs(300);

/// What `vmm ctl migrate` did.
#[derive(Debug)]
pub struct CtlOutcome {
    /// Its exit code.
    pub code: Option<i32>,
    /// The final status it printed (JSON), or null.
    pub status: Value,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error (progress lines, the error).
    pub stderr: String,
}

/// Boots a VM with `device` (a `--device` option) and a control API socket in `dir`;
/// returns the VM, its agent (once the guest is up) and an API client.
pub fn boot_with_api(dir: &super::TestDir, device: &str) -> (super::Vm, super::Agent, ApiClient) {
    start_with_api(super::Vm::builder(), dir, &[device], String::new)
}

/// As [`boot_with_api`], restored from the golden snapshot made with `spec` (which started
/// the device whose option `device` is).
pub fn golden_with_api(
    dir: &super::TestDir,
    spec: &super::Device,
    device: &str,
) -> (super::Vm, super::Agent, ApiClient) {
    start_with_api(
        super::Vm::builder().golden(std::slice::from_ref(spec)),
        dir,
        &[device],
        String::new,
    )
}

/// Starts `builder`'s VM with these `--device` options and a control API socket in `dir`;
/// returns the VM, its agent (once the guest is up) and an API client. If the guest does not
/// come up the panic quotes `context()` too (e.g. a device server's log).
pub fn start_with_api<S: AsRef<str>>(
    builder: super::VmBuilder,
    dir: &super::TestDir,
    devices: &[S],
    context: impl Fn() -> String,
) -> (super::Vm, super::Agent, ApiClient) {
    let api_path = dir.join("api.sock");
    let mut args = Vec::new();
    for d in devices {
        args.extend(["--device".to_string(), d.as_ref().to_string()]);
    }
    args.extend(["--api-socket".to_string(), api_path.display().to_string()]);
    let vm = builder.vmm_args(&args).boot().expect("start vmm");
    let agent = vm.agent(super::DEFAULT_BOOT_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "guest did not come up: {e}\n{}\n{}",
            vm.describe(),
            context()
        )
    });
    let api = ApiClient::connect(&api_path, Duration::from_secs(10)).expect("api socket");
    (vm, agent, api)
}

/// Asserts that a VM holding device `id`, whose vfio-user server offers no migration,
/// can be neither snapshotted nor migrated: both refused at once naming the device and
/// why, no snapshot file made, and the VM still running (not paused).
pub fn assert_migration_refused(api: &mut ApiClient, dir: &super::TestDir, id: &str) {
    let cannot = format!("device {id} cannot migrate");
    let snap = dir.join("refused.snap");
    let e = api
        .request(&serde_json::json!({"request": "snapshot", "path": snap}))
        .expect_err("a snapshot of a VM holding a device without migration");
    assert!(e.contains(&cannot), "{e}");
    assert!(e.contains("vfio-user server offers no migration"), "{e}");
    assert!(!snap.exists(), "the refused snapshot left a file");
    let out = api.ctl_migrate("tcp:127.0.0.1:9", &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&cannot), "{out:?}");
    let info = api
        .request(&serde_json::json!({"request": "info"}))
        .unwrap();
    assert_eq!(info["paused"], false, "{info}");
}
