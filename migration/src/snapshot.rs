//! Snapshot files: the stream in a file.
//!
//! A snapshot is written to `PATH.tmp` and renamed over `PATH` only once complete and
//! synced, so a crash or a failed save never leaves a partial file under the final name
//! (which a later `--restore` would take for a snapshot, only to fail on it).

use std::fs::{self, File};
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use crate::{Error, Result, StreamReader, StreamWriter};

/// A snapshot being written. Write sections through [`SnapshotWriter::stream`], then
/// [`SnapshotWriter::commit`]; dropping it without committing removes the temporary file.
#[derive(Debug)]
pub struct SnapshotWriter {
    stream: Option<StreamWriter<BufWriter<File>>>,
    tmp: PathBuf,
    path: PathBuf,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Starts a snapshot at `path` with header `flags` (normally 0).
pub fn create(path: impl AsRef<Path>, flags: u32) -> Result<SnapshotWriter> {
    let path = path.as_ref().to_path_buf();
    let tmp = tmp_path(&path);
    let f = File::create(&tmp).map_err(|e| Error::io("creating the snapshot file", e))?;
    let mut w = SnapshotWriter {
        stream: None,
        tmp,
        path,
    };
    // Assigned after construction so that a failed header still removes the file on drop.
    w.stream = Some(StreamWriter::write_header(
        BufWriter::with_capacity(1 << 20, f),
        flags,
    )?);
    Ok(w)
}

impl SnapshotWriter {
    /// The stream to write sections to.
    pub fn stream(&mut self) -> &mut StreamWriter<BufWriter<File>> {
        // Only commit() takes the stream, and it consumes self.
        self.stream.as_mut().expect("stream present until commit")
    }

    /// Writes the end section, syncs the file and moves it to its final name.
    pub fn commit(mut self) -> Result<()> {
        let stream = self.stream.take().expect("stream present until commit");
        let buf = stream.finish()?;
        let file = buf
            .into_inner()
            .map_err(|e| Error::io("flushing the snapshot file", e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io("syncing the snapshot file", e))?;
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io("renaming the snapshot file", e))?;
        Ok(())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.stream.is_some() {
            // Not committed: the partial file is of no use to anyone.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Opens the snapshot at `path` and checks its header. Read sections with
/// [`StreamReader::next_section`] until [`crate::Section::End`], then call
/// [`StreamReader::finish`] to check nothing follows.
pub fn open(path: impl AsRef<Path>) -> Result<StreamReader<BufReader<File>>> {
    let f = File::open(path.as_ref()).map_err(|e| Error::io("opening the snapshot file", e))?;
    StreamReader::read_header(BufReader::with_capacity(1 << 20, f))
}
