//! The control API: a Unix socket (`--api-socket PATH`) that answers JSON requests (see
//! [`protocol`]) while the VM runs.
//!
//! One thread accepts connections and serves them one at a time, a request per line. It
//! polls a stop flag, so the VM's shutdown joins it before the devices it reads are
//! dropped. Requests never panic the VMM: bad ones get an error response.

pub mod protocol;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::device_setup::PciPassthrough;
use crate::machine::Machine;
use error::RequestError;
use protocol::{Request, Response};

pub mod error;
mod migration;
pub mod replies;

/// Longest request line accepted.
const MAX_LINE: usize = 1 << 20;
/// How often blocked calls look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process serves the path.
    #[error(
        "--api-socket {0}: another process is listening there; choose another path or stop it"
    )]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("--api-socket {path}: cannot listen: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server thread could not start.
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// What requests are answered from.
pub struct ApiState {
    /// The running VM.
    pub machine: Arc<Machine>,
}

/// The running API server; stops and removes its socket on drop.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens at `path` (a stale socket left by a dead VMM is replaced) and serves
    /// requests from `state` on a thread.
    pub fn start(path: &Path, state: ApiState) -> Result<Self, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || serve(&listener, &state, &stop))
                .map_err(ApiError::Thread)?
        };
        tracing::info!("control API listening on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, state: &ApiState, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_client(stream, state, stop) {
                    tracing::debug!("API client: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                tracing::warn!("API socket accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

fn serve_client(stream: UnixStream, state: &ApiState, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !stop.load(Ordering::Acquire) {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if line.ends_with(b"\n") => {}
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if line.len() > MAX_LINE {
                    respond(&mut out, &Response::error("request line longer than 1 MiB"))?;
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        let response = match std::str::from_utf8(&line) {
            Ok(text) if text.trim().is_empty() => {
                line.clear();
                continue;
            }
            Ok(text) => match protocol::parse(text.trim()) {
                Ok(request) => handle(request, state),
                Err(e) => Response::error(e.to_string()),
            },
            Err(_) => Response::error("request is not UTF-8"),
        };
        line.clear();
        respond(&mut out, &response)?;
    }
    Ok(())
}

fn respond(out: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(r).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"error\":\"cannot encode the response: {e}\"}}")
    });
    text.push('\n');
    out.write_all(text.as_bytes())
}

fn device<'a>(state: &'a ApiState, id: &str) -> Result<&'a PciPassthrough, RequestError> {
    let devices = &state.machine.devices;
    devices
        .iter()
        .find(|d| d.id == id)
        .ok_or_else(|| RequestError::UnknownDevice {
            id: id.to_owned(),
            known: devices.iter().map(|d| d.id.clone()).collect(),
        })
}

/// Answers one request.
pub fn handle(request: Request, state: &ApiState) -> Response {
    let stops_the_vm = matches!(
        request,
        Request::Pause {} | Request::Resume {} | Request::Snapshot { .. }
    );
    if stops_the_vm && state.machine.migration.busy() {
        return Response::error(format!(
            "a migration to {} is running; wait for it to end (migration-status)",
            state.machine.migration.get().url
        ));
    }
    match request {
        Request::Info {} => Response::reply(&replies::Info {
            cpus: state.machine.cpus,
            memory: state.machine.mem_size,
            paused: state.machine.paused_now(),
            migration: state.machine.migration.get().phase,
            devices: state
                .machine
                .devices
                .iter()
                .map(|d| replies::DeviceSummary {
                    id: d.id.clone(),
                    mediator: d.mediated.as_ref().map(|m| m.mediator_name().to_string()),
                })
                .collect(),
        }),
        Request::DeviceStats {} => Response::reply(&device_stats(state)),
        Request::Pause {} => match state.machine.pause() {
            Ok(()) => Response::reply(&replies::Paused { paused: true }),
            Err(e) => Response::error(format!("cannot pause: {e}")),
        },
        Request::Resume {} => match state.machine.resume() {
            Ok(()) => Response::reply(&replies::Paused { paused: false }),
            Err(e) => Response::error(format!("cannot resume: {e}")),
        },
        Request::Migrate {
            url,
            downtime_ms,
            max_bandwidth_mb_s,
        } => {
            let req = crate::migrate::source::Request {
                url: url.clone(),
                downtime_ms: downtime_ms.unwrap_or(300),
                max_bandwidth_mb_s,
            };
            match crate::migrate::source::start(state.machine.clone(), req) {
                Ok(()) => Response::reply(&replies::MigrationStarted { started: url }),
                Err(e) => Response::error(format!("cannot migrate: {e}")),
            }
        }
        Request::MigrationStatus {} => Response::reply(&state.machine.migration.report()),
        Request::Snapshot { path, paused } => {
            match crate::snapshot::file::snapshot(&state.machine, &path, paused) {
                Ok(v) => Response::reply(&v),
                Err(e) => Response::error(format!(
                    "snapshot to {} failed: {e} (the VM runs on)",
                    path.display()
                )),
            }
        }
        Request::DeviceMigration {
            device: id,
            op,
            path,
        } => {
            let d = match device(state, &id) {
                Ok(d) => d,
                Err(e) => return Response::error(e.to_string()),
            };
            let Some(m) = &d.migration else {
                return Response::error(format!(
                    "device {id} cannot migrate: {}",
                    d.migration_blocker
                        .as_deref()
                        .unwrap_or("it has no migration interface")
                ));
            };
            match migration::run(&**m, op, path.as_deref()) {
                Ok(v) => v,
                Err(e) => Response::error(format!("device {id}: {e}")),
            }
        }
        Request::Mediator {
            device: id,
            command,
            args,
        } => {
            let d = match device(state, &id) {
                Ok(d) => d,
                Err(e) => return Response::error(e.to_string()),
            };
            let Some(m) = &d.mediated else {
                return Response::error(format!(
                    "device {id} has no mediator; start it with --device vfio-mediated,...,mediator=NAME"
                ));
            };
            match m.handle().control(&command, &args) {
                Ok(v) => Response::ok(v),
                Err(e) => {
                    Response::error(format!("device {id}: mediator {}: {e}", m.mediator_name()))
                }
            }
        }
    }
}

fn device_stats(state: &ApiState) -> replies::DeviceStats {
    let m = &state.machine;
    let exits = m
        .exits
        .snapshot()
        .into_iter()
        .map(|(k, count, handling_ns)| (k.to_string(), replies::ExitCount { count, handling_ns }))
        .collect();
    let devices = m
        .devices
        .iter()
        .map(|d| {
            let s = d.stats();
            replies::DeviceCounters {
                id: s.id,
                backend_errors: s.errors,
                bars: s
                    .bars
                    .iter()
                    .map(|b| replies::BarCounters {
                        index: b.index,
                        size: b.size,
                        base: b.base,
                        reads: b.reads,
                        writes: b.writes,
                        mapped: d.device.mapped_areas(b.index),
                        trapped: d.device.trapped(b.index),
                    })
                    .collect(),
                migration_state: d
                    .migration
                    .as_ref()
                    .and_then(|m| m.state().ok())
                    .map(|s| s.to_string()),
                mediator: d.mediated.as_ref().map(|m| replies::MediatorStats {
                    name: m.mediator_name().to_string(),
                    stats: m.handle().stats(),
                }),
            }
        })
        .collect();
    replies::DeviceStats {
        exits,
        total_exits: m.exits.total(),
        devices,
    }
}
