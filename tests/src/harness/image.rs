//! The guest image (kernel and initramfs), built once per test process by
//! `tests/guest/build.sh`.

use std::env;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use thiserror::Error;

use super::paths::workspace_root;

/// Environment variable naming a prebuilt guest kernel (used with [`INITRAMFS_ENV`]).
pub const VMLINUX_ENV: &str = "VMM_TEST_VMLINUX";
/// Environment variable naming a prebuilt initramfs (used with [`VMLINUX_ENV`]).
pub const INITRAMFS_ENV: &str = "VMM_TEST_INITRAMFS";

/// Why the guest image is not available. Cloneable: every caller of [`GuestImage::get`] in the
/// process gets the first attempt's error.
#[derive(Debug, Clone, Error)]
pub enum ImageError {
    /// The build script could not be started.
    #[error("cannot run {script}: {reason}")]
    Spawn {
        /// The script.
        script: String,
        /// The OS error.
        reason: String,
    },
    /// The build script failed.
    #[error("{script} failed ({status}); its stderr above says why")]
    Failed {
        /// The script.
        script: String,
        /// How it exited.
        status: String,
    },
    /// The build script did not print the expected result lines.
    #[error("{script} succeeded but printed no {key}... line; its stdout was:\n{stdout}")]
    NoResult {
        /// The script.
        script: String,
        /// The missing key.
        key: &'static str,
        /// What it printed.
        stdout: String,
    },
    /// A result file does not exist.
    #[error("guest {what} {path} (from {origin}) does not exist")]
    Missing {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path.
        path: String,
        /// Where the path came from.
        origin: String,
    },
}

/// A bootable guest: an uncompressed ELF kernel and an uncompressed cpio initramfs whose
/// `/init` is the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel (ELF vmlinux).
    pub vmlinux: PathBuf,
    /// The initramfs (cpio).
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// The guest image, built at most once per process: from `$VMM_TEST_VMLINUX` and
    /// `$VMM_TEST_INITRAMFS` when both are set, else by running `tests/guest/build.sh` (whose
    /// stderr goes to the test's stderr; a cached build takes seconds, a fresh one minutes).
    pub fn get() -> Result<&'static GuestImage, ImageError> {
        static IMAGE: OnceLock<Result<GuestImage, ImageError>> = OnceLock::new();
        IMAGE
            .get_or_init(Self::locate)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn locate() -> Result<GuestImage, ImageError> {
        let image = match (env::var_os(VMLINUX_ENV), env::var_os(INITRAMFS_ENV)) {
            (Some(vmlinux), Some(initramfs)) => (
                GuestImage {
                    vmlinux: vmlinux.into(),
                    initramfs: initramfs.into(),
                },
                format!("${VMLINUX_ENV} and ${INITRAMFS_ENV}"),
            ),
            _ => {
                let script = workspace_root().join("tests/guest/build.sh");
                (Self::build(&script)?, script.display().to_string())
            }
        };
        let (image, origin) = image;
        for (what, path) in [("kernel", &image.vmlinux), ("initramfs", &image.initramfs)] {
            if !path.is_file() {
                return Err(ImageError::Missing {
                    what,
                    path: path.display().to_string(),
                    origin: origin.clone(),
                });
            }
        }
        Ok(image)
    }

    fn build(script: &std::path::Path) -> Result<GuestImage, ImageError> {
        let name = script.display().to_string();
        let output = Command::new("bash")
            .arg(script)
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| ImageError::Spawn {
                script: name.clone(),
                reason: e.to_string(),
            })?;
        if !output.status.success() {
            return Err(ImageError::Failed {
                script: name,
                status: output.status.to_string(),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let (vmlinux, initramfs) =
            parse_build_output(&stdout).map_err(|key| ImageError::NoResult {
                script: name,
                key,
                stdout: stdout.clone().into_owned(),
            })?;
        Ok(GuestImage { vmlinux, initramfs })
    }
}

/// Extracts the last `VMLINUX=` and `INITRAMFS=` lines; `Err(key)` names a missing one.
fn parse_build_output(stdout: &str) -> Result<(PathBuf, PathBuf), &'static str> {
    let last = |key: &'static str| {
        stdout
            .lines()
            .rev()
            .find_map(|l| l.trim_end().strip_prefix(key))
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or(key)
    };
    Ok((last("VMLINUX=")?, last("INITRAMFS=")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_build_output() {
        let out = "noise\nVMLINUX=/old\nVMLINUX=/c/vmlinux\nINITRAMFS=/c/initramfs.cpio\n";
        assert_eq!(
            parse_build_output(out),
            Ok(("/c/vmlinux".into(), "/c/initramfs.cpio".into()))
        );
        assert_eq!(parse_build_output("VMLINUX=/k\n"), Err("INITRAMFS="));
        assert_eq!(
            parse_build_output("INITRAMFS=/i\nVMLINUX=\n"),
            Err("VMLINUX=")
        );
    }
}
