//! Where things are: the workspace, the guest command line, the VMM binary.

use std::env;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Environment variable naming the VMM binary to test.
pub const VMM_BIN_ENV: &str = "VMM_BIN";

/// A file the harness needs is missing.
#[derive(Debug, Clone, Error)]
pub enum PathsError {
    /// No VMM binary where one was looked for.
    #[error("no vmm binary: {tried}; build it with `cargo build -p vmm` or set {VMM_BIN_ENV}")]
    NoVmm {
        /// The places looked at, with why each was rejected.
        tried: String,
    },
}

/// The workspace root (the parent of the `tests` package).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The guest kernel command line: `tests/guest/cmdline`, trimmed (compiled in, so it cannot go
/// missing at run time).
pub fn guest_cmdline() -> String {
    include_str!("../../guest/cmdline").trim().to_owned()
}

/// The VMM binary: `$VMM_BIN` if set, else `vmm` in the directory of the running test's
/// profile (which follows `CARGO_TARGET_DIR` and `--release`), else
/// `<workspace>/target/debug/vmm`.
pub fn vmm_binary() -> Result<PathBuf, PathsError> {
    if let Some(bin) = env::var_os(VMM_BIN_ENV) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        return Err(PathsError::NoVmm {
            tried: format!("{VMM_BIN_ENV}={} is not a file", bin.display()),
        });
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = env::current_exe() {
        // Test binaries live in <target>/<profile>/deps/.
        if let Some(profile_dir) = exe
            .parent()
            .filter(|d| d.ends_with("deps"))
            .and_then(Path::parent)
        {
            candidates.push(profile_dir.join("vmm"));
        }
    }
    candidates.push(workspace_root().join("target/debug/vmm"));
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let tried = candidates
        .iter()
        .map(|c| c.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(PathsError::NoVmm {
        tried: format!("{VMM_BIN_ENV} is not set and none of {tried} exists"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_layout() {
        let root = workspace_root();
        assert!(root.join("tests/guest/build.sh").is_file());
        let cmdline = guest_cmdline();
        assert!(cmdline.contains("console=ttyS0"), "{cmdline}");
        assert!(!cmdline.ends_with('\n'));
    }
}
