//! Snapshot files: the stream in a file.
//!
//! A snapshot is written to `PATH.tmp` and renamed over `PATH` only once complete and
//! synced, so a crash or a failed save never leaves a partial file under the final name
//! (which a later `--restore` would take for a snapshot, only to fail on it).

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use crate::file::NewFile;
use crate::{Error, Result, StreamReader, StreamWriter};

/// A snapshot being written. Write sections through [`SnapshotWriter::stream`], then
/// [`SnapshotWriter::commit`]; dropping it without committing removes the temporary file.
/// The file is made as [`crate::file`] says: never through a planted link, mode 0600.
#[derive(Debug)]
pub struct SnapshotWriter {
    stream: Option<StreamWriter<BufWriter<File>>>,
    file: NewFile,
}

/// Starts a snapshot at `path` with header `flags` (normally 0).
pub fn create(path: impl AsRef<Path>, flags: u32) -> Result<SnapshotWriter> {
    let mut file = NewFile::create(path.as_ref())?;
    let f = file.take();
    Ok(SnapshotWriter {
        stream: Some(StreamWriter::write_header(
            BufWriter::with_capacity(1 << 20, f),
            flags,
        )?),
        file,
    })
}

impl SnapshotWriter {
    /// The stream to write sections to.
    pub fn stream(&mut self) -> &mut StreamWriter<BufWriter<File>> {
        // Only commit() takes the stream, and it consumes self.
        self.stream.as_mut().expect("stream present until commit")
    }

    /// Writes the end section, syncs the file and moves it to its final name (removing
    /// the temporary file if any step fails).
    pub fn commit(mut self) -> Result<()> {
        let stream = self.stream.take().expect("stream present until commit");
        let buf = stream.finish()?;
        let file = buf
            .into_inner()
            .map_err(|e| Error::io("flushing the snapshot file", e.into_error()))?;
        self.file.commit(Some(file))?;
        Ok(())
    }
}

/// Opens the snapshot at `path` and checks its header. Read sections with
/// [`StreamReader::next_section`] until [`crate::Section::End`], then call
/// [`StreamReader::finish`] to check nothing follows.
pub fn open(path: impl AsRef<Path>) -> Result<StreamReader<BufReader<File>>> {
    let (f, _) = crate::file::open_regular(path.as_ref())?;
    StreamReader::read_header(BufReader::with_capacity(1 << 20, f))
}
