//! The API's device-migration steps, over [`DeviceMigration`].

use std::io::Write;
use std::time::Instant;

use devices::vfio::migration::{DeviceMigration, MigrationState};

use super::error::RequestError;
use super::protocol::{MigrationOp, Response};
use super::replies::{DirtyPages, Done, MigrationStateReply, StateFile};

/// Chunks read in one phase before giving up: a device that keeps offering data forever
/// must not hang the API.
const MAX_CHUNKS: usize = 100_000;

/// Runs one step: its reply, or what failed.
pub fn run(
    m: &dyn DeviceMigration,
    op: MigrationOp,
    path: Option<&std::path::Path>,
) -> Result<Response, RequestError> {
    let path = || path.ok_or(RequestError::NeedsPath(op));
    match op {
        MigrationOp::State => Ok(Response::reply(&MigrationStateReply {
            state: m.state()?.to_string(),
        })),
        MigrationOp::StartDirtyTracking => {
            m.start_dirty_tracking()?;
            Ok(Response::reply(&Done {}))
        }
        MigrationOp::StopDirtyTracking => {
            m.stop_dirty_tracking()?;
            Ok(Response::reply(&Done {}))
        }
        MigrationOp::TakeDirtyPages => Ok(Response::reply(&DirtyPages {
            pages: m.take_dirty_pages()?,
        })),
        MigrationOp::Save => save(m, path()?),
        MigrationOp::Restore => {
            let path = path()?;
            // The state goes to the device as one chunk, which a stream would carry as one
            // section: no larger.
            let data = migration::file::read_regular(path, migration::MAX_SECTION_LEN)?;
            m.set_state(MigrationState::Resuming)?;
            let r = m
                .restore_chunk(&data)
                .and_then(|()| m.set_state(MigrationState::Running));
            if let Err(source) = r {
                return Err(RequestError::Restore {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                    after: after_failed_restore(m),
                });
            }
            Ok(Response::reply(&StateFile {
                bytes: data.len(),
                device_stopped_us: None,
            }))
        }
    }
}

/// Leaves a device whose restore failed in a defined state: running again with the state
/// it had (a refused state never took effect), else stopped; says which, or what it is in.
fn after_failed_restore(m: &dyn DeviceMigration) -> String {
    match m.set_state(MigrationState::Running) {
        Ok(()) => "the device runs on with the state it had before".into(),
        Err(resume) => {
            let stopped = m.state().is_ok_and(|s| s == MigrationState::Stopped)
                || m.set_state(MigrationState::Stopped).is_ok();
            match (stopped, m.state()) {
                (true, _) => format!(
                    "the device is stopped: it could not run again ({resume}); restore a good state into it"
                ),
                (false, Ok(s)) => format!(
                    "the device is left {s}: it could neither run again ({resume}) nor stop"
                ),
                (false, Err(e)) => format!(
                    "the device's state is unknown: it could not run again ({resume}) and its state cannot be read ({e})"
                ),
            }
        }
    }
}

/// Pre-copy, stop-and-copy, then back to running; the device runs on whatever happens.
fn save(m: &dyn DeviceMigration, path: &std::path::Path) -> Result<Response, RequestError> {
    let mut data = Vec::new();
    let result = (|| {
        m.set_state(MigrationState::PreCopy)?;
        drain(m, &mut data, false)?;
        let stopped = Instant::now();
        m.set_state(MigrationState::StopCopy)?;
        drain(m, &mut data, true)?;
        m.set_state(MigrationState::Running)?;
        Ok::<_, devices::vfio::migration::MigrationError>(stopped.elapsed())
    })();
    let stopped_for = match result {
        Ok(d) => d,
        Err(err) => {
            let _ = m.set_state(MigrationState::Running);
            return Err(RequestError::Save(err));
        }
    };
    let mut file = migration::file::NewFile::create(path)?;
    file.file()
        .write_all(&data)
        .map_err(|source| migration::file::FileError::Io {
            what: "write",
            path: path.to_path_buf(),
            source,
        })?;
    file.commit(None)?;
    Ok(Response::reply(&StateFile {
        bytes: data.len(),
        device_stopped_us: Some(stopped_for.as_micros() as u64),
    }))
}

fn drain(
    m: &dyn DeviceMigration,
    out: &mut Vec<u8>,
    until_empty: bool,
) -> devices::vfio::migration::Result<()> {
    for _ in 0..MAX_CHUNKS {
        if until_empty && m.pending_bytes()? == 0 {
            return Ok(());
        }
        match m.save_chunk()? {
            Some(chunk) => out.extend_from_slice(&chunk),
            None if until_empty => {}
            None => return Ok(()),
        }
    }
    Err(devices::vfio::migration::MigrationError::Protocol(format!(
        "the device offered more than {MAX_CHUNKS} chunks"
    )))
}
