//! The host side of the serial ports: where guest output goes and where input comes from.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::serial_config::SerialConfig;

/// Errors connecting a serial port on the host.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file cannot be opened.
    #[error("cannot open serial output file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    /// The socket cannot be created.
    #[error("cannot listen on serial socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    /// Something else than a socket is in the way.
    #[error("serial socket path {0} exists and is not a socket; remove it or choose another path")]
    PathTaken(PathBuf),
}

/// The currently connected client of a socket-backed port.
pub type SharedClient = Arc<Mutex<Option<UnixStream>>>;

/// Where a port's host input comes from.
pub enum InputSource {
    /// No input.
    None,
    /// Standard input.
    Stdin,
    /// Clients of a listening socket.
    Socket {
        listener: UnixListener,
        client: SharedClient,
        path: PathBuf,
    },
}

/// Guest output to a socket client: dropped while no client is connected, and dropped
/// rather than blocking the vCPU when the client does not read.
struct SocketWriter(SharedClient);

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = c.as_mut() {
            match stream.write(buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tracing::debug!("serial socket client is not reading; output dropped");
                }
                Err(e) => {
                    tracing::info!("serial socket client gone: {e}");
                    *c = None;
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Creates the output writer and input source for one port.
pub fn connect(cfg: &SerialConfig) -> Result<(Box<dyn Write + Send>, InputSource), ConsoleError> {
    Ok(match cfg {
        SerialConfig::Off => (Box::new(io::sink()), InputSource::None),
        SerialConfig::Stdio => (Box::new(io::stdout()), InputSource::Stdin),
        SerialConfig::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ConsoleError::File {
                    path: path.clone(),
                    source,
                })?;
            (Box::new(f), InputSource::None)
        }
        SerialConfig::Socket(path) => {
            let listener = listen(path)?;
            let client: SharedClient = Arc::new(Mutex::new(None));
            (
                Box::new(SocketWriter(client.clone())),
                InputSource::Socket {
                    listener,
                    client,
                    path: path.clone(),
                },
            )
        }
    })
}

fn listen(path: &Path) -> Result<UnixListener, ConsoleError> {
    // A socket left behind by an earlier run is replaced; anything else is not ours to delete.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ConsoleError::PathTaken(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|source| ConsoleError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| ConsoleError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn socket_output_reaches_a_client_and_is_dropped_without_one() {
        let path =
            std::env::temp_dir().join(format!("vmm-console-test-{}.sock", std::process::id()));
        let (mut w, src) = connect(&SerialConfig::Socket(path.clone())).unwrap();
        let InputSource::Socket {
            listener, client, ..
        } = src
        else {
            panic!("socket source expected")
        };
        w.write_all(b"lost").unwrap(); // no client: dropped, no error
        let mut peer = UnixStream::connect(&path).unwrap();
        let (s, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        s.set_nonblocking(true).unwrap();
        *client.lock().unwrap() = Some(s);
        w.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_regular_file_in_the_way_is_not_deleted() {
        let path =
            std::env::temp_dir().join(format!("vmm-console-test-{}.file", std::process::id()));
        std::fs::write(&path, b"keep").unwrap();
        let e = connect(&SerialConfig::Socket(path.clone())).err().unwrap();
        assert!(matches!(e, ConsoleError::PathTaken(_)), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        let _ = std::fs::remove_file(path);
    }
}
