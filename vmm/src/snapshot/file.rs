//! The snapshot request: pause, write the VM to a file, resume.

use std::path::Path;
use std::time::Instant;

use super::save::{
    check_migratable, config, restart_devices, stop_devices, write_all_ram, write_final_state,
};
use super::SnapshotError;
use crate::machine::Machine;

/// What a snapshot wrote (the API's `snapshot` reply).
#[derive(Debug, serde::Serialize)]
pub struct Written {
    /// The file written.
    pub path: std::path::PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Guest pages in it (zero runs included).
    pub pages: u64,
    /// How long it took.
    pub ms: f64,
    /// Whether the VM stays paused.
    pub paused: bool,
}

/// Writes the VM to `path` (through `PATH.tmp`, renamed when complete). The VM runs on
/// afterwards unless `stay_paused`; devices run on whatever happens. Runs on the VM's
/// owner thread, never beside a pause, a resume or a migration (see [`crate::machine`]).
pub fn snapshot(m: &Machine, path: &Path, stay_paused: bool) -> Result<Written, SnapshotError> {
    if m.caps.is_none() {
        return Err(SnapshotError::NoCaps(
            "probing KVM's capabilities failed at start".into(),
        ));
    }
    check_migratable(m)?;
    let started = Instant::now();
    let was_paused = m.paused();
    if !was_paused {
        m.pause_vcpus()?;
    }
    let result = (|| {
        stop_devices(m)?;
        let mut snap = migration::snapshot::create(path, 0)?;
        let w = snap.stream();
        w.write_vm_config(&config(m))?;
        // Devices are stopped, so RAM is final: no more DMA.
        write_final_state(m, w)?;
        let pages = write_all_ram(m, w)?;
        let bytes = w.bytes_written();
        snap.commit()?;
        Ok::<_, SnapshotError>((pages, bytes))
    })();
    restart_devices(m);
    if stay_paused || was_paused {
        m.set_paused(true);
    } else if let Err(e) = m.resume_vcpus() {
        tracing::error!("resuming after the snapshot: {e}");
    }
    let (pages, bytes) = result?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        "snapshot written to {}: {bytes} bytes, {pages} pages, {ms:.0} ms",
        path.display()
    );
    Ok(Written {
        path: path.to_path_buf(),
        bytes,
        pages,
        ms,
        paused: m.paused(),
    })
}
