//! A sequence of slot changes that is undone if one of its steps fails.

use tracing::error;

use super::error::{MemSlotsError, Result};
use super::mapping::{Mapping, SlotId};
use super::record::Record;
use super::SlotBackend;

/// How to undo one step that KVM accepted.
enum Undo {
    /// Delete the mapping created at this guest address.
    Delete(u64),
    /// Re-create this deleted mapping in its old slot.
    Recreate(SlotId, Mapping),
}

/// Applies slot changes one by one, remembering how to undo each.
pub(super) struct Txn<'a> {
    backend: &'a dyn SlotBackend,
    record: &'a mut Record,
    undo: Vec<Undo>,
}

impl<'a> Txn<'a> {
    /// Runs `steps` on `record`. If a step fails, the steps before it are
    /// undone in reverse order and the step's error is returned (wrapped in
    /// [`MemSlotsError::Partial`] if undoing failed too).
    pub(super) fn run<T>(
        backend: &'a dyn SlotBackend,
        record: &'a mut Record,
        steps: impl FnOnce(&mut Txn<'a>) -> Result<T>,
    ) -> Result<T> {
        let mut txn = Txn {
            backend,
            record,
            undo: Vec::new(),
        };
        match steps(&mut txn) {
            Ok(value) => Ok(value),
            Err(failed) => Err(txn.roll_back(failed)),
        }
    }

    /// Deletes the mapping that starts at `gpa`.
    pub(super) fn delete(&mut self, op: &'static str, gpa: u64) -> Result<(SlotId, Mapping)> {
        let (slot, mapping) = self.record.delete(self.backend, op, gpa)?;
        self.undo.push(Undo::Recreate(slot, mapping.clone()));
        Ok((slot, mapping))
    }

    /// Creates `mapping` in the lowest free slot.
    ///
    /// # Safety
    ///
    /// As [`Record::create`].
    pub(super) unsafe fn create(&mut self, mapping: Mapping) -> Result<SlotId> {
        let gpa = mapping.gpa;
        // SAFETY: passed on from this function's caller.
        let slot = unsafe { self.record.create(self.backend, None, mapping) }?;
        self.undo.push(Undo::Delete(gpa));
        Ok(slot)
    }

    fn roll_back(self, failed: MemSlotsError) -> MemSlotsError {
        for step in self.undo.into_iter().rev() {
            let res = match step {
                Undo::Delete(gpa) => self.record.delete(self.backend, "undo", gpa).map(|_| ()),
                Undo::Recreate(slot, mapping) => {
                    // SAFETY: the mapping was live until this transaction
                    // deleted it, so its creator's guarantee on the host
                    // memory still holds (our caller was not told it is
                    // gone), and everything created since has already been
                    // deleted again (undo runs in reverse and stops at the
                    // first failure), so it overlaps nothing.
                    unsafe { self.record.create(self.backend, Some(slot), mapping) }.map(|_| ())
                }
            };
            if let Err(undo) = res {
                error!(%failed, %undo, "could not undo a memory slot change");
                return MemSlotsError::Partial {
                    failed: Box::new(failed),
                    undo: Box::new(undo),
                };
            }
        }
        failed
    }
}
