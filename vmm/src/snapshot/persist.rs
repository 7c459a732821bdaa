//! The one way a device the VMM emulates goes into the stream and comes back: its
//! [`Persist`] state, in the `migration` crate's encoding, as one final device section
//! named by its [`SectionKey`].

use std::io::Write;

use devices::Persist;
use migration::{DevicePhase, StreamWriter};

use super::section_key::SectionKey;
use super::SnapshotError;

/// Writes `dev`'s state as the section `key`.
pub fn save_device<P: Persist, W: Write>(
    w: &mut StreamWriter<W>,
    key: &SectionKey,
    dev: &P,
) -> Result<(), SnapshotError> {
    let id = key.encode();
    let bytes = migration::encode_state(&dev.save()).map_err(|e| SnapshotError::Device {
        id: id.clone(),
        reason: format!("encoding its state: {e}"),
    })?;
    w.write_device(&id, DevicePhase::Final, &bytes)?;
    Ok(())
}

/// Loads the section `key`'s bytes into `dev`; `what` names the state in errors.
pub fn restore_device<P: Persist>(
    dev: &P,
    key: &SectionKey,
    data: &[u8],
    what: &str,
) -> Result<(), SnapshotError> {
    let bad = |e: String| SnapshotError::Device {
        id: key.encode(),
        reason: format!("{what}: {e}"),
    };
    let state = migration::decode_state(data).map_err(|e| bad(e.to_string()))?;
    dev.restore(&state).map_err(|e| bad(e.to_string()))
}
