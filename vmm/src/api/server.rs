//! The API's Unix socket: accepts clients and serves each on its own thread, a request per
//! line, handing every request to the VM's owner ([`super::owner`]).
//!
//! Nothing a client does can stall the VMM or another client: clients are served
//! concurrently (up to [`MAX_CLIENTS`]), a line is refused as soon as it outgrows
//! [`MAX_LINE`] (memory stays bounded whatever is sent), an answer that cannot be written
//! within [`WRITE_DEADLINE`] drops the client, and every wait also watches a stop eventfd,
//! so stopping the server never waits on a client. The socket is the owner's alone (mode
//! 0600 whatever the umask), and a peer of another uid than the VMM's (or root) is refused.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::wait::{readable_or_stopped, Woken};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::owner::ToOwner;
use super::protocol::{self, Response};
use super::ApiError;

/// Longest request line accepted.
pub const MAX_LINE: usize = 1 << 20;
/// Clients served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 16;
/// How long writing one answer may take before the client is dropped.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(1);

/// The running API server; stops (joining every client thread) and removes its socket on
/// drop.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens at `path` (a stale socket left by a dead VMM is replaced) and hands the
    /// requests it reads to `owner`.
    pub fn start(
        path: &Path,
        owner: ToOwner,
        seccomp: crate::seccomp::Filters,
    ) -> Result<Self, ApiError> {
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ApiError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ApiError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        // The umask decides the mode bind() gives; the peer check below also covers a
        // client that connected before this.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ApiError::Thread)?);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || {
                    // Client threads inherit the accept thread's narrowed filter.
                    seccomp.narrow(crate::seccomp::ThreadKind::Api);
                    accept_loop(&listener, &owner, &stop)
                })
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
        if let Err(e) = self.stop.write(1) {
            tracing::error!("cannot stop the API threads: {e}");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, owner: &ToOwner, stop: &Arc<EventFd>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    loop {
        match readable_or_stopped(listener.as_fd(), stop) {
            Ok(Woken::Stopped) => break,
            Ok(Woken::Readable) => {}
            Err(e) => {
                tracing::error!("API socket: poll failed, the API stops: {e}");
                break;
            }
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("API socket: accept failed: {e}");
                continue;
            }
        };
        clients.retain(|c| !c.is_finished());
        if let Err(refusal) = admit(&stream, active.load(Ordering::Acquire)) {
            tracing::warn!("API socket: {refusal}");
            let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
            let _ = respond(&mut stream, &Response::error(refusal.to_string()));
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (owner, stop, done) = (owner.clone(), stop.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("api-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &owner, &stop) {
                    tracing::debug!("API client: {e}");
                }
                done.fetch_sub(1, Ordering::AcqRel);
            });
        match spawned {
            Ok(t) => clients.push(t),
            Err(e) => {
                active.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("API socket: cannot start a client thread: {e}");
            }
        }
    }
    for c in clients {
        let _ = c.join();
    }
}

/// Why a client is not served (told to the client and logged).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("cannot read the client's credentials: {0}")]
    Credentials(std::io::Error),
    #[error(
        "refused a client of uid {uid}: only uid {own} (the VMM's) or root may use this socket"
    )]
    OtherUser { uid: u32, own: u32 },
    #[error("{MAX_CLIENTS} clients are connected already; try again when one has left")]
    Full,
}

/// Whether a new client may be served: its uid is the VMM's or root's, and there is room.
fn admit(stream: &UnixStream, active: usize) -> Result<(), Refusal> {
    let uid = peer_uid(stream).map_err(Refusal::Credentials)?;
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if uid != own && uid != 0 {
        return Err(Refusal::OtherUser { uid, own });
    }
    if active >= MAX_CLIENTS {
        return Err(Refusal::Full);
    }
    Ok(())
}

/// The uid of the process at the other end (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, for the call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn serve_client(mut stream: UnixStream, owner: &ToOwner, stop: &EventFd) -> std::io::Result<()> {
    stream.set_write_timeout(Some(WRITE_DEADLINE))?;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if readable_or_stopped(stream.as_fd(), stop)? == Woken::Stopped {
            return Ok(());
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.len() > MAX_LINE + 1 {
                return refuse_long_line(&mut stream);
            }
            let response = match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match protocol::parse(text.trim()) {
                    Ok(request) => owner.call(request),
                    Err(e) => Response::error(e.to_string()),
                },
                Err(_) => Response::error("request is not UTF-8"),
            };
            respond(&mut stream, &response)?;
        }
        if pending.len() > MAX_LINE {
            return refuse_long_line(&mut stream);
        }
    }
}

fn refuse_long_line(stream: &mut UnixStream) -> std::io::Result<()> {
    respond(
        stream,
        &Response::error(format!(
            "request line longer than {} MiB; the connection is closed",
            MAX_LINE >> 20
        )),
    )
}

fn respond(out: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(r).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"error\":\"cannot encode the response: {e}\"}}")
    });
    text.push('\n');
    out.write_all(text.as_bytes())
}
