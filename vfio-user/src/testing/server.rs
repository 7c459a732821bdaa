//! [`FakeServer`]: a fake device served on a thread, on one end of a socket pair or on
//! a listening socket. Without faults it is the crate's own server with the device;
//! with [`Fault`]s (or [`FakeServerBuilder::record`]) a relay thread stands between it
//! and the client, applies them and records what the client sends.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::device::FakeDevice;
use super::fault::Fault;
use super::probe::Probe;
use super::relay::Relay;
use super::transcript::Received;
use super::FakeError;
use crate::server::{serve, ServerConfig};

/// How to serve a fake device.
pub struct FakeServerBuilder {
    device: FakeDevice,
    config: ServerConfig,
    faults: Vec<Fault>,
    record: bool,
}

impl FakeServerBuilder {
    /// The server's configuration (default: [`ServerConfig::default`]).
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a fault (faults are tried in the order added).
    pub fn fault(mut self, fault: Fault) -> Self {
        self.faults.push(fault);
        self
    }

    /// Records what the client sends even without faults.
    pub fn record(mut self) -> Self {
        self.record = true;
        self
    }

    /// Serves on a new socket pair; returns the client's end.
    pub fn pair(self) -> Result<(UnixStream, FakeServer), FakeError> {
        let (client, ours) = UnixStream::pair().map_err(FakeError::Socket)?;
        let server = self.start(move || Ok(ours))?;
        Ok((client, server))
    }

    /// Listens on `path` (bound before this returns) and serves the first client.
    pub fn listen(self, path: &Path) -> Result<FakeServer, FakeError> {
        let listener = UnixListener::bind(path).map_err(|error| FakeError::Listen {
            path: path.to_path_buf(),
            error,
        })?;
        self.start(move || {
            let (stream, _) = listener.accept().map_err(FakeError::Accept)?;
            Ok(stream)
        })
    }

    fn start(
        self,
        connect: impl FnOnce() -> Result<UnixStream, FakeError> + Send + 'static,
    ) -> Result<FakeServer, FakeError> {
        let probe = self.device.probe();
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let relay = !self.faults.is_empty() || self.record;
        let seen = transcript.clone();
        let run = move || {
            let stream = connect()?;
            if relay {
                run_relayed(
                    self.device,
                    self.config,
                    self.faults,
                    stream,
                    seen,
                    released,
                )
            } else {
                let mut device = self.device;
                serve(stream, &mut device, &self.config).map_err(FakeError::Server)
            }
        };
        thread::Builder::new()
            .name("fake-vfio-user".into())
            .spawn(move || {
                let _ = done_tx.send(run());
            })
            .map_err(FakeError::Thread)?;
        Ok(FakeServer {
            done,
            transcript,
            release,
            probe,
        })
    }
}

/// Serves `device` behind a relay on `client`; the relay's failure first, else the
/// server's.
fn run_relayed(
    mut device: FakeDevice,
    config: ServerConfig,
    faults: Vec<Fault>,
    client: UnixStream,
    transcript: Arc<Mutex<Vec<Received>>>,
    released: mpsc::Receiver<()>,
) -> Result<(), FakeError> {
    let (ours, theirs) = UnixStream::pair().map_err(FakeError::Socket)?;
    let server = thread::Builder::new()
        .name("fake-vfio-user-device".into())
        .spawn(move || serve(theirs, &mut device, &config))
        .map_err(FakeError::Thread)?;
    // The relay's end of the pair closes when it returns, which ends the server.
    let relayed = Relay::new(client, ours, faults, transcript, released).and_then(Relay::run);
    let served = server.join().map_err(|_| FakeError::Panicked)?;
    relayed?;
    served.map_err(FakeError::Server)
}

/// A fake device being served on a thread (detached: dropping this leaves it serving
/// until its client goes away, but lets a stalled server close).
pub struct FakeServer {
    done: mpsc::Receiver<Result<(), FakeError>>,
    transcript: Arc<Mutex<Vec<Received>>>,
    release: mpsc::Sender<()>,
    probe: Probe,
}

impl FakeServer {
    /// Starts describing how to serve `device`.
    pub fn builder(device: FakeDevice) -> FakeServerBuilder {
        FakeServerBuilder {
            device,
            config: ServerConfig::default(),
            faults: Vec::new(),
            record: false,
        }
    }

    /// The device's probe.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// Everything received from the client so far (only with a relay: faults or
    /// [`FakeServerBuilder::record`]).
    pub fn transcript(&self) -> Vec<Received> {
        self.transcript
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// [`Received::describe`] of each message of the transcript.
    pub fn sequence(&self) -> Vec<String> {
        self.transcript().iter().map(Received::describe).collect()
    }

    /// The client's reply to the message with ID `id` sent to it, if it came.
    pub fn reply_to(&self, id: u16) -> Option<Received> {
        self.transcript()
            .into_iter()
            .find(|r| r.header.is_reply() && r.header.msg_id == id)
    }

    /// Waits up to `timeout` for the client's reply to message `id`.
    pub fn wait_for_reply(&self, id: u16, timeout: Duration) -> Option<Received> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(reply) = self.reply_to(id) {
                return Some(reply);
            }
            if Instant::now() >= until {
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a server stalled by [`Fault::then_stall`] close the connection.
    pub fn release(&self) {
        let _ = self.release.send(());
    }

    /// Waits up to `timeout` for the server to end: `Ok` when the client went away (or a
    /// fault closed the connection), else why it failed. Call it once.
    pub fn finish(&self, timeout: Duration) -> Result<(), FakeError> {
        match self.done.recv_timeout(timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(FakeError::StillRunning(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(FakeError::Panicked),
        }
    }
}
