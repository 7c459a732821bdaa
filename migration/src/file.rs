//! Files the VMM writes or reads because someone asked (a snapshot, a device's state): a
//! path from a request is not trusted to be what it seems.
//!
//! Writing goes to `PATH.tmp`, created with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600 (a
//! planted symlink, FIFO or file there is refused, never followed or truncated; guest RAM
//! is for the owner only), synced, then renamed over `PATH` (the rename replaces a
//! symlink at `PATH` itself, never its target) and the directory synced. On any failure,
//! or a drop before [`NewFile::commit`], the temporary file is removed. Reading accepts
//! regular files only, and no more bytes than the caller's bound.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a requested file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The temporary file already exists (left by a crash, or planted).
    #[error("{0} exists already (left by an interrupted save, or put there by someone); remove it and try again")]
    TmpExists(PathBuf),
    /// An I/O step failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO, a device, a directory, a socket).
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Larger than the caller accepts.
    #[error("{path} has {size} bytes, more than the {max} accepted here")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `PATH.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// A file being written; see the module's documentation.
#[derive(Debug)]
pub struct NewFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl NewFile {
    /// Creates `PATH.tmp` for writing.
    pub fn create(path: &Path) -> Result<NewFile, FileError> {
        let tmp = tmp_path(path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    FileError::TmpExists(tmp.clone())
                } else {
                    io("create", &tmp)(e)
                }
            })?;
        Ok(NewFile {
            file: Some(file),
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// The file to write to (until [`commit`](Self::commit) or [`take`](Self::take)).
    pub fn file(&mut self) -> &File {
        self.file.as_ref().expect("file present until commit")
    }

    /// Takes the file to wrap it in a writer; give it back to [`commit`](Self::commit).
    pub fn take(&mut self) -> File {
        self.file.take().expect("file present until commit")
    }

    /// Syncs `file` (the one taken, or the one kept if `None`), renames it to its final
    /// name and syncs the directory. On failure the temporary file is removed.
    pub fn commit(mut self, file: Option<File>) -> Result<(), FileError> {
        let file = file
            .or_else(|| self.file.take())
            .expect("file present until commit");
        file.sync_all().map_err(io("sync", &self.tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
            .map_err(io("rename the temporary file to", &self.path))?;
        // Renamed: nothing to remove any more.
        self.tmp = PathBuf::new();
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync the directory of", &self.path))
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            // Not committed: the partial file is of no use to anyone.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Opens `path` for reading if it is a regular file, with its size.
pub fn open_regular(path: &Path) -> Result<(File, u64), FileError> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer before it can be refused.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("open", path))?;
    let meta = file.metadata().map_err(io("inspect", path))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_dir() {
            "directory"
        } else if ft.is_socket() {
            "socket"
        } else {
            "special file"
        };
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    Ok((file, meta.len()))
}

/// Reads a regular file of at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let (file, size) = open_regular(path)?;
    if size > max {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            size,
            max,
        });
    }
    let mut data = Vec::with_capacity(size as usize);
    // take(): a file that grows meanwhile still yields at most `max` bytes (+1 to tell).
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(io("read", path))?;
    if data.len() as u64 > max {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            size: data.len() as u64,
            max,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-file-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn a_file_is_written_0600_and_renamed() {
        let d = scratch("ok");
        let p = d.join("f");
        let mut f = NewFile::create(&p).unwrap();
        f.file().write_all(b"data").unwrap();
        f.commit(None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!tmp_path(&p).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_planted_symlink_or_fifo_at_the_temporary_path_is_refused() {
        let d = scratch("planted");
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let p = d.join("snap");
        std::os::unix::fs::symlink(&victim, tmp_path(&p)).unwrap();
        let e = NewFile::create(&p).unwrap_err();
        assert!(matches!(e, FileError::TmpExists(_)), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        std::fs::remove_file(tmp_path(&p)).unwrap();
        let c = std::ffi::CString::new(tmp_path(&p).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = NewFile::create(&p).unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_rename_or_a_drop_leaves_nothing_behind() {
        let d = scratch("rename");
        // The final name is a non-empty directory: rename fails.
        let p = d.join("dir");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("x"), b"").unwrap();
        let mut f = NewFile::create(&p).unwrap();
        f.file().write_all(b"data").unwrap();
        let e = f.commit(None).unwrap_err();
        assert!(e.to_string().contains("rename"), "{e}");
        assert!(!tmp_path(&p).exists(), "the temporary file was left");
        let q = d.join("dropped");
        drop(NewFile::create(&q).unwrap());
        assert!(!tmp_path(&q).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let d = scratch("read");
        let p = d.join("f");
        std::fs::write(&p, vec![1u8; 100]).unwrap();
        assert_eq!(read_regular(&p, 100).unwrap().len(), 100);
        let e = read_regular(&p, 99).unwrap_err();
        assert!(e.to_string().contains("more than the 99"), "{e}");
        let e = read_regular(&d, 99).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
