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
        })
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
}

/// Boots a VM with `device` (a `--device` option) and a control API socket in `dir`;
/// returns the VM, its agent (once the guest is up) and an API client.
pub fn boot_with_api(dir: &super::TestDir, device: &str) -> (super::Vm, super::Agent, ApiClient) {
    let api_path = dir.join("api.sock");
    let vm = super::Vm::builder()
        .vmm_args(&[
            "--device",
            device,
            "--api-socket",
            &api_path.display().to_string(),
        ])
        .boot()
        .expect("start vmm");
    let agent = vm
        .agent(super::DEFAULT_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest did not come up: {e}\n{}", vm.describe()));
    let api = ApiClient::connect(&api_path, Duration::from_secs(10)).expect("api socket");
    (vm, agent, api)
}
