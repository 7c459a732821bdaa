//! `vmm ctl`: a client of a running VMM's control API (`--api-socket`).
//!
//! ```text
//! vmm ctl --api-socket /run/vm0.sock info
//! vmm ctl --api-socket /run/vm0.sock device-stats
//! vmm ctl --api-socket /run/vm0.sock mediator vf0 trap '{"bar":0,"offset":4096,"size":4096}'
//! vmm ctl --api-socket /run/vm0.sock device-migration vf0 save --path /tmp/vf0.state
//! ```
//! Prints the result as JSON on stdout; an error response is printed on stderr with exit
//! status 1.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::config::tls::MigrationTlsConfig;

/// Talks to a running vmm through its control API socket.
#[derive(Debug, Parser)]
#[command(name = "vmm ctl", version)]
pub struct CtlCli {
    /// The VMM's API socket (its --api-socket).
    #[arg(long, short = 's', value_name = "PATH")]
    api_socket: PathBuf,
    /// How long to wait for the answer, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Debug, Subcommand)]
enum CtlRequest {
    /// The VM's configuration and devices.
    Info,
    /// KVM exit counts and per-device BAR counters, mapped and trapped ranges, mediator
    /// statistics.
    DeviceStats,
    /// Stops the guest's vCPUs.
    Pause,
    /// Lets them run again.
    Resume,
    /// Writes the VM to a snapshot file (restore it with `vmm --restore PATH`); the VM
    /// runs on afterwards unless --paused.
    Snapshot {
        /// The file.
        path: PathBuf,
        /// Stay paused afterwards.
        #[arg(long)]
        paused: bool,
    },
    /// Live-migrates the VM to a `vmm --incoming tls:ADDR:PORT` (or tcp:) and shows its
    /// progress until it completes or fails (the source exits when the destination runs
    /// the guest).
    ///
    /// Example: vmm ctl -s /run/vm0.sock migrate tls:10.0.0.2:4444 --tls cert=src.pem,key=src.key,ca=ca.pem
    Migrate {
        /// The destination: tls:HOST:PORT (mutual TLS, needs --tls) or tcp:HOST:PORT
        /// (clear text, unauthenticated: trusted networks only).
        url: String,
        /// For tls:, the source VMM's certificate chain, its key and the CA the
        /// destination's certificate must be signed by (PEM files, read by the VMM; relative
        /// paths are made absolute here). The destination's certificate must be issued for
        /// HOST (a DNS name or IP address in its subject alternative names) or for
        /// server-name=NAME.
        #[arg(long, value_name = "cert=PATH,key=PATH,ca=PATH[,server-name=NAME]")]
        tls: Option<MigrationTlsConfig>,
        /// Downtime budget in ms.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Cap pre-copy's bandwidth at this many MB/s, so the migration leaves room on the
        /// link for the guests' traffic (stop-and-copy is not capped: it is downtime).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_bandwidth_mb_s: Option<u64>,
        /// Return at once instead of following the progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Progress of the current or last migration.
    MigrationStatus,
    /// A request to a device's mediator, e.g. `mediator vf0 trap '{"bar":0,"offset":4096,"size":4096}'`
    /// (trace: trap, untrap, trapped, stats; virtio-blk-vf, virtio-net-vf: status, skip-ring-walk, skip-queue).
    Mediator {
        /// The device's id.
        device: String,
        /// The mediator's command.
        command: String,
        /// Its arguments as JSON.
        #[arg(default_value = "{}")]
        args: String,
    },
    /// A device-migration step: state, start-dirty-tracking, stop-dirty-tracking,
    /// take-dirty-pages, save (--path), restore (--path).
    DeviceMigration {
        /// The device's id.
        device: String,
        /// The step.
        op: String,
        /// The state file of save and restore.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Sends a raw JSON request line.
    Raw {
        /// The request, e.g. '{"request":"info"}'.
        json: String,
    },
}

/// Runs `vmm ctl` with `args` (after `ctl`); returns the exit status.
pub fn main(args: impl Iterator<Item = std::ffi::OsString>) -> u8 {
    let cli = match CtlCli::try_parse_from(std::iter::once("vmm ctl".into()).chain(args)) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(&cli) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Err(e) => {
            eprintln!("vmm ctl: error: {e}");
            1
        }
    }
}

/// Why a `vmm ctl` request failed (each message says what and why; the cause is kept).
#[derive(Debug, thiserror::Error)]
enum CtlError {
    /// The snapshot path cannot be made absolute.
    #[error("snapshot path {path}: {source}")]
    SnapshotPath {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A TLS file's path cannot be made absolute.
    #[error("--tls: {path}: {source}")]
    TlsPath {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// `mediator`'s arguments are not JSON.
    #[error("the arguments {text:?} are not JSON: {source}")]
    ArgsNotJson {
        text: String,
        source: serde_json::Error,
    },
    /// `raw`'s request is not JSON.
    #[error("{text:?} is not JSON: {source}")]
    RawNotJson {
        text: String,
        source: serde_json::Error,
    },
    /// No connection to the API socket.
    #[error("cannot connect to {}: {source} (is the vmm running with --api-socket {0}?)", .path.display())]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Talking to the VMM failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// The VMM hung up without an answer.
    #[error("the vmm closed the connection without answering")]
    NoAnswer,
    /// The answer is not the API's JSON.
    #[error("bad answer {answer:?}: {source}")]
    BadAnswer {
        answer: String,
        source: serde_json::Error,
    },
    /// The VMM refused the request.
    #[error("{0}")]
    Refused(String),
    /// The source VMM went away while migrating.
    #[error("lost the source VMM during stop-and-copy ({source}): the migration may have completed; check the destination before restarting the source (two guests on one disk lose data); last status {last}")]
    LostInStopAndCopy { source: Box<CtlError>, last: Value },
    /// The source VMM went away earlier in the migration.
    #[error("lost the source VMM during the migration: {source}; last status {last}")]
    Lost { source: Box<CtlError>, last: Value },
    /// The migration failed; the source runs the guest on.
    #[error("migration failed, the guest runs on at the source: {0}")]
    MigrationFailed(String),
}

fn request_of(r: &CtlRequest) -> Result<Value, CtlError> {
    Ok(match r {
        CtlRequest::Info => json!({"request": "info"}),
        CtlRequest::DeviceStats => json!({"request": "device-stats"}),
        CtlRequest::Pause => json!({"request": "pause"}),
        CtlRequest::Migrate {
            url,
            tls,
            downtime_ms,
            max_bandwidth_mb_s,
            no_wait,
        } => {
            let tls = tls
                .as_ref()
                .map(|t| {
                    t.absolute().map_err(|source| CtlError::TlsPath {
                        path: t.cert.clone(),
                        source,
                    })
                })
                .transpose()?;
            json!({"request": "migrate", "url": url, "tls": tls, "downtime_ms": downtime_ms,
                    "max_bandwidth_mb_s": max_bandwidth_mb_s, "follow": !no_wait})
        }
        CtlRequest::MigrationStatus => json!({"request": "migration-status"}),
        CtlRequest::Resume => json!({"request": "resume"}),
        CtlRequest::Snapshot { path, paused } => {
            let path = std::path::absolute(path).map_err(|source| CtlError::SnapshotPath {
                path: path.clone(),
                source,
            })?;
            json!({"request": "snapshot", "path": path, "paused": paused})
        }
        CtlRequest::Mediator {
            device,
            command,
            args,
        } => {
            let args: Value =
                serde_json::from_str(args).map_err(|source| CtlError::ArgsNotJson {
                    text: args.clone(),
                    source,
                })?;
            json!({"request": "mediator", "device": device, "command": command, "args": args})
        }
        CtlRequest::DeviceMigration { device, op, path } => {
            json!({"request": "device-migration", "device": device, "op": op, "path": path})
        }
        CtlRequest::Raw { json } => {
            serde_json::from_str(json).map_err(|source| CtlError::RawNotJson {
                text: json.clone(),
                source,
            })?
        }
    })
}

fn run(cli: &CtlCli) -> Result<Value, CtlError> {
    let request = request_of(&cli.request)?;
    let started = call(cli, &request)?;
    match &cli.request {
        CtlRequest::Migrate { no_wait: false, .. } => follow_migration(cli),
        _ => Ok(started),
    }
}

/// Polls the migration status and prints progress lines on stderr until it ends. A
/// completed source waits (a few seconds at most) until a client that follows the
/// migration has been told "completed" before it exits, so this normally sees the end; a
/// closed socket counts as done only if the last status was "completed".
fn follow_migration(cli: &CtlCli) -> Result<Value, CtlError> {
    let mut last = Value::Null;
    let mut last_line = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let status = match call(cli, &json!({"request": "migration-status"})) {
            Ok(s) => s,
            Err(e) if last["phase"] == "completed" => {
                eprintln!("migrate: the source VMM exited after completing ({e})");
                return Ok(last);
            }
            Err(e) if last["phase"] == "stop-and-copy" => {
                return Err(CtlError::LostInStopAndCopy {
                    source: Box::new(e),
                    last,
                })
            }
            Err(e) => {
                return Err(CtlError::Lost {
                    source: Box::new(e),
                    last,
                })
            }
        };
        let line = format!(
            "migrate: {} iteration {} sent {:.1} MB at {:.1} MB/s, dirty {} pages ({:.0}/s), expected downtime {:.1} ms",
            status["phase"].as_str().unwrap_or("?"),
            status["iteration"],
            status["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            status["bandwidth_mb_s"].as_f64().unwrap_or(0.0),
            status["dirty_pages"],
            status["dirty_rate_pages_s"].as_f64().unwrap_or(0.0),
            status["expected_downtime_ms"].as_f64().unwrap_or(0.0),
        );
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        match status["phase"].as_str() {
            Some("completed") => return Ok(status),
            Some("failed") => {
                return Err(CtlError::MigrationFailed(
                    status["error"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_owned(),
                ))
            }
            _ => {}
        }
        last = status;
    }
}

fn call(cli: &CtlCli, request: &Value) -> Result<Value, CtlError> {
    let stream = UnixStream::connect(&cli.api_socket).map_err(|source| CtlError::Connect {
        path: cli.api_socket.clone(),
        source,
    })?;
    let io = |what| move |source| CtlError::Io { what, source };
    stream
        .set_read_timeout(Some(Duration::from_secs(cli.timeout)))
        .map_err(io("setting the answer timeout"))?;
    let mut w = stream.try_clone().map_err(io("opening the socket"))?;
    let mut line = request.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
        .map_err(io("sending the request"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io("waiting for the answer"))?;
    if answer.is_empty() {
        return Err(CtlError::NoAnswer);
    }
    let v: Value = serde_json::from_str(&answer).map_err(|source| CtlError::BadAnswer {
        answer: answer.clone(),
        source,
    })?;
    if v["ok"] == Value::Bool(true) {
        Ok(v["result"].clone())
    } else {
        Err(CtlError::Refused(
            v["error"]
                .as_str()
                .unwrap_or("error without text")
                .to_string(),
        ))
    }
}
