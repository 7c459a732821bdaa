//! Per-test scratch directories under the system temp dir, removed on drop unless
//! `$VMM_TEST_KEEP` is set.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// When set (to anything), scratch directories are kept for inspection.
pub const KEEP_ENV: &str = "VMM_TEST_KEEP";

/// The directory could not be created.
#[derive(Debug, Error)]
#[error("cannot create scratch directory {path}: {source}")]
pub struct TestDirError {
    /// The directory.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// A fresh directory, unique within the machine (named after the pid and a counter).
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<temp>/vmm-test-<pid>-<n>-<label>` (replacing a stale one left by a process
    /// that had the same pid).
    pub fn new(label: &str) -> Result<Self, TestDirError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = env::temp_dir().join(format!("vmm-test-{}-{n}-{label}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(|source| TestDirError {
            path: path.clone(),
            source,
        })?;
        Ok(TestDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sparse disk image `name` of `size` bytes in the directory.
    pub fn disk(&self, name: &str, size: u64) -> PathBuf {
        let path = self.join(name);
        fs::File::create(&path)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("creating the disk image {}: {e}", path.display()));
        path
    }

    /// A path inside the directory.
    pub fn join<P: AsRef<Path>>(&self, name: P) -> PathBuf {
        self.path.join(name)
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if env::var_os(KEEP_ENV).is_some() {
            eprintln!(
                "vmm-tests: keeping {} ({KEEP_ENV} is set)",
                self.path.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_and_removed() {
        let a = TestDir::new("a/b").unwrap();
        let b = TestDir::new("a/b").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().is_dir());
        assert!(a
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("a_b"));
        fs::write(a.join("f"), b"x").unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        if env::var_os(KEEP_ENV).is_none() {
            assert!(!path.exists());
        }
    }
}
