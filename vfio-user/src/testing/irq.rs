//! The fake device's interrupts: per IRQ type, its information and one eventfd slot per
//! vector, set and triggered through `SET_IRQS` as a VFIO device does.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
};

use super::eventfd::signal;
use crate::device::{DeviceResult, Errno, IrqData};
use crate::types::IrqInfo;

/// One IRQ type: its `VFIO_IRQ_INFO_*` flags and its vectors' eventfds.
#[derive(Debug)]
struct IrqType {
    flags: u32,
    vectors: Vec<Option<OwnedFd>>,
}

/// Every IRQ type the device has (kept in its shared state, so that the test can raise
/// an interrupt too).
#[derive(Debug, Default)]
pub(crate) struct Irqs {
    types: BTreeMap<u32, IrqType>,
    /// Types below this index that were not described exist with no vectors.
    num_irqs: u32,
}

impl Irqs {
    /// IRQ types `index -> (flags, count)`, out of `num_irqs`.
    pub(crate) fn new(described: &BTreeMap<u32, (u32, u32)>, num_irqs: u32) -> Self {
        let types = described
            .iter()
            .map(|(&index, &(flags, count))| {
                let vectors = (0..count).map(|_| None).collect();
                (index, IrqType { flags, vectors })
            })
            .collect();
        Irqs { types, num_irqs }
    }

    /// `DEVICE_GET_IRQ_INFO`.
    pub(crate) fn info(&self, index: u32) -> DeviceResult<IrqInfo> {
        match self.types.get(&index) {
            Some(t) => Ok(IrqInfo {
                index,
                flags: t.flags,
                count: t.vectors.len() as u32,
            }),
            None if index < self.num_irqs => Ok(IrqInfo {
                index,
                flags: 0,
                count: 0,
            }),
            None => Err(Errno(libc::EINVAL)),
        }
    }

    /// `DEVICE_SET_IRQS`. Only the trigger action is modelled (masking is accepted and
    /// does nothing), on the types that have vectors.
    pub(crate) fn set(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DeviceResult<()> {
        let Some(t) = self.types.get_mut(&index) else {
            return Ok(());
        };
        if flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return Ok(());
        }
        let end = start
            .checked_add(count)
            .filter(|&end| end as usize <= t.vectors.len())
            .ok_or(Errno(libc::EINVAL))?;
        let range = start as usize..end as usize;
        match (flags & VFIO_IRQ_SET_DATA_TYPE_MASK, data) {
            (VFIO_IRQ_SET_DATA_EVENTFD, IrqData::Eventfds(fds)) if fds.is_empty() => {
                t.vectors[range].iter_mut().for_each(|v| *v = None);
            }
            (VFIO_IRQ_SET_DATA_EVENTFD, IrqData::Eventfds(fds)) => {
                for (v, fd) in t.vectors[range].iter_mut().zip(fds) {
                    *v = Some(fd);
                }
            }
            // No data and no vectors: disable the whole type.
            (VFIO_IRQ_SET_DATA_NONE, _) if count == 0 => {
                t.vectors.iter_mut().for_each(|v| *v = None);
            }
            (VFIO_IRQ_SET_DATA_NONE, _) => {
                for fd in t.vectors[range].iter().flatten() {
                    let _ = signal(fd.as_fd());
                }
            }
            (VFIO_IRQ_SET_DATA_BOOL, IrqData::Bool(set)) => {
                for (fd, on) in t.vectors[range].iter().zip(set) {
                    if let (Some(fd), true) = (fd, on) {
                        let _ = signal(fd.as_fd());
                    }
                }
            }
            _ => return Err(Errno(libc::EINVAL)),
        }
        Ok(())
    }

    /// The device raises vector `vector` of type `index` (`ENXIO` when it has no
    /// eventfd).
    pub(crate) fn raise(&self, index: u32, vector: u32) -> DeviceResult<()> {
        let fd = self
            .types
            .get(&index)
            .and_then(|t| t.vectors.get(vector as usize))
            .and_then(Option::as_ref)
            .ok_or(Errno(libc::ENXIO))?;
        signal(fd.as_fd()).map_err(|_| Errno(libc::EIO))
    }

    /// Drops every eventfd (the client went away).
    pub(crate) fn clear(&mut self) {
        for t in self.types.values_mut() {
            t.vectors.iter_mut().for_each(|v| *v = None);
        }
    }
}
