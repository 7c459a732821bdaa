//! The destination side: `vmm --incoming tcp:ADDR:PORT`.

use std::io::{BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use migration::{Control, StreamReader, StreamWriter, VmConfig, FLAG_LIVE, FLAG_REPLY};

use super::error::ReplyError;
use crate::snapshot::SnapshotError;

/// A source that sends nothing for this long is gone.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The answer channel to the source.
pub struct Reply {
    w: Option<StreamWriter<TcpStream>>,
    stream: TcpStream,
}

impl Reply {
    fn send(&mut self, msg: Control) -> Result<(), ReplyError> {
        if self.w.is_none() {
            let s = self.stream.try_clone().map_err(ReplyError::Clone)?;
            self.w = Some(
                StreamWriter::write_header(s, FLAG_LIVE | FLAG_REPLY).map_err(ReplyError::Open)?,
            );
        }
        let Some(w) = self.w.as_mut() else {
            unreachable!("the answer stream was opened just above")
        };
        w.write_control(&msg)
            .and_then(|()| w.flush())
            .map_err(ReplyError::Send)
    }

    /// The config fits: send the state.
    pub fn ready(&mut self) -> Result<(), ReplyError> {
        self.send(Control::Ready)
    }

    /// Pre-copy pass `iteration` is applied.
    pub fn synced(&mut self, iteration: u32) -> Result<(), ReplyError> {
        self.send(Control::Synced { iteration })
    }

    /// The guest runs here now.
    pub fn resumed(&mut self) -> Result<(), ReplyError> {
        self.send(Control::Resumed)
    }

    /// The migration failed here, and why (best effort: the source also sees the
    /// connection close).
    pub fn abort(&mut self, reason: &str) {
        if let Err(e) = self.send(Control::Abort {
            reason: reason.to_string(),
        }) {
            tracing::debug!("telling the source about the failure: {e}");
        }
    }
}

/// The accepted stream, ready to read sections after the config.
pub type Incoming = (StreamReader<Box<dyn Read + Send>>, VmConfig, Reply);

/// Listens on `url`, accepts one source, and reads its header and VM config.
pub fn accept(url: &str) -> Result<Incoming, SnapshotError> {
    let addr = super::parse_tcp(url)?;
    let listener = TcpListener::bind(addr)
        .map_err(|e| SnapshotError::Mismatch(format!("--incoming {url}: cannot listen: {e}")))?;
    tracing::info!("waiting for a migration on {addr}");
    let (stream, peer) = listener
        .accept()
        .map_err(|e| SnapshotError::Mismatch(format!("--incoming {url}: accept failed: {e}")))?;
    tracing::info!("migration from {peer}");
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
    let reply = Reply {
        w: None,
        stream: stream
            .try_clone()
            .map_err(|e| SnapshotError::Mismatch(e.to_string()))?,
    };
    let r: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(1 << 20, stream));
    let mut reply = reply;
    match crate::snapshot::restore::open(r) {
        Ok((reader, config)) => Ok((reader, config, reply)),
        Err(e) => {
            reply.abort(&e.to_string());
            Err(e)
        }
    }
}
