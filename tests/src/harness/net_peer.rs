//! Running the traffic peer (`net-peer`, see [`crate::agent::net_peer`]) from a test.

use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub use crate::agent::net_peer::*;
use crate::agent::netstream::DuplexReport;

/// A `net-peer` process started by a test.
pub struct RunningPeer {
    child: Child,
    addr: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl RunningPeer {
    /// Starts `cmd` (the `net-peer` binary, e.g. wrapped by `Lan::command`) with `args`,
    /// and waits up to `timeout` until it listens.
    pub fn spawn(mut cmd: Command, args: &PeerArgs, timeout: Duration) -> io::Result<Self> {
        cmd.args(args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix(LISTENING) {
                        if let Ok(addr) = addr.trim().parse() {
                            return Ok(RunningPeer {
                                child,
                                addr,
                                stderr: rx,
                            });
                        }
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io::Error::other(format!(
                        "net-peer did not listen within {} ms; stderr: {}",
                        timeout.as_millis(),
                        seen.join(" | ")
                    )));
                }
            }
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for it to exit: its report and exit status (killed on timeout:
    /// an error).
    pub fn wait(mut self, timeout: Duration) -> io::Result<(DuplexReport, ExitStatus)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "net-peer still running after {} ms: killed",
                        timeout.as_millis()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        let line = out.lines().last().unwrap_or("");
        let report = serde_json::from_str(line).map_err(|e| {
            let stderr: Vec<String> = self.stderr.try_iter().collect();
            io::Error::other(format!(
                "net-peer ({status}) printed no report ({e}): stdout {out:?}, stderr {stderr:?}"
            ))
        })?;
        Ok((report, status))
    }
}

impl Drop for RunningPeer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
