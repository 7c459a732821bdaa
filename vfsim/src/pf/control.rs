//! [`Controller`]: the PF side's operations on the function (state, quiesce, resume,
//! DMA write log, counters), whatever transport carries them.
//!
//! Queue processing happens in passes of the poller thread with the engine lock held,
//! and a pass completes every request it takes. `quiesce` sets the engine's `quiesced`
//! flag with that lock held, so it waits for a running pass to end and no pass starts
//! after it: once it returns nothing is in flight and nothing new is taken. Doorbells
//! are not needed afterwards: a pass always reads the available indexes, so `resume`
//! clears the flag and wakes the poller, which picks up whatever the driver queued.

use std::sync::{Arc, Mutex, MutexGuard};

use pf_protocol::proto::{ErrorKind, QuiesceReport, Request, Response, Stats, VfState};

use crate::engine::Engine;
use crate::pci_config::PciRegs;
use crate::poller::PollerHandle;

use super::state;

/// A refused request: its kind and message, as [`Response::Error`] carries them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What went wrong.
    pub message: String,
}

impl ControlError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ControlError {
            kind,
            message: message.into(),
        }
    }
}

/// The PF side's handle on one function; cheap to clone, shared by all connections.
#[derive(Debug, Clone)]
pub struct Controller {
    engine: Arc<Mutex<Engine>>,
    pci: Arc<Mutex<PciRegs>>,
    poller: PollerHandle,
}

impl Controller {
    /// A controller over the function's shared parts.
    pub fn new(engine: Arc<Mutex<Engine>>, pci: Arc<Mutex<PciRegs>>, poller: PollerHandle) -> Self {
        Controller {
            engine,
            pci,
            poller,
        }
    }

    // Lock order: engine, then PCI registers (the vfio-user side takes one at a time).
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pci(&self) -> MutexGuard<'_, PciRegs> {
        self.pci.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Carries out `request`.
    pub fn handle(&self, request: &Request) -> Response {
        let result = match request {
            Request::GetState => Ok(Response::State {
                state: self.get_state(),
            }),
            Request::SetState { state } => self.set_state(state).map(|()| Response::Ok),
            Request::Quiesce => Ok(Response::Quiesced(self.quiesce())),
            Request::Resume => {
                self.resume();
                Ok(Response::Ok)
            }
            Request::DmaLogStart => self.dma_log_start().map(|()| Response::Ok),
            Request::DmaLogTake => self.dma_log_take().map(|pages| Response::DmaLog { pages }),
            Request::DmaLogStop => {
                self.dma_log_stop();
                Ok(Response::Ok)
            }
            Request::Stats => Ok(Response::Stats(self.stats())),
        };
        result.unwrap_or_else(|e| Response::Error {
            kind: e.kind,
            message: e.message,
        })
    }

    /// The function's state now.
    pub fn get_state(&self) -> VfState {
        let e = self.engine();
        let p = self.pci();
        state::capture(&e, &p)
    }

    /// Loads `s` if the device is quiesced or the driver has not started it; leaves the
    /// device quiesced.
    pub fn set_state(&self, s: &VfState) -> Result<(), ControlError> {
        let mut e = self.engine();
        if !e.quiesced && e.common.status != 0 {
            return Err(ControlError::new(
                ErrorKind::Refused,
                format!(
                    "set_state refused: the device is running (device status {:#04x}) and not quiesced; quiesce it first",
                    e.common.status
                ),
            ));
        }
        state::check(s, &e).map_err(|m| {
            ControlError::new(ErrorKind::InvalidState, format!("set_state refused: {m}"))
        })?;
        let mut p = self.pci();
        state::apply(s, &mut e, &mut p);
        e.quiesced = true;
        e.loaded = true;
        tracing::info!(
            status = s.device_status,
            "PF side loaded a saved state; quiesced until resume"
        );
        Ok(())
    }

    /// Stops taking requests; returns once nothing is in flight.
    pub fn quiesce(&self) -> QuiesceReport {
        // Taking the lock waits for a processing pass to finish (see the module docs).
        let mut e = self.engine();
        if !e.quiesced {
            tracing::info!("PF side quiesced the device");
        }
        e.quiesced = true;
        QuiesceReport {
            in_flight: 0,
            requests_completed: e.completed,
        }
    }

    /// Continues processing, including whatever the driver queued meanwhile.
    /// The first resume after a state was loaded tells the personality that the device
    /// moved (a NIC announces its MAC).
    pub fn resume(&self) {
        {
            let mut e = self.engine();
            let was = std::mem::replace(&mut e.quiesced, false);
            if was {
                tracing::info!("PF side resumed the device");
            }
            if std::mem::take(&mut e.loaded) {
                e.personality.resumed_after_load();
            }
        }
        self.poller.kick();
    }

    /// Starts the DMA write log.
    pub fn dma_log_start(&self) -> Result<(), ControlError> {
        if self.engine().mem.log_start() {
            Ok(())
        } else {
            Err(ControlError::new(
                ErrorKind::Refused,
                "dma_log_start refused: DMA logging is already on (take or stop it)",
            ))
        }
    }

    /// The pages written since the start or the previous take.
    pub fn dma_log_take(&self) -> Result<Vec<u64>, ControlError> {
        self.engine().mem.log_take().ok_or_else(|| {
            ControlError::new(
                ErrorKind::Refused,
                "dma_log_take refused: DMA logging is off (dma_log_start first)",
            )
        })
    }

    /// Stops the DMA write log (nothing happens if it is off).
    pub fn dma_log_stop(&self) {
        self.engine().mem.log_stop();
    }

    /// Counters and modes.
    pub fn stats(&self) -> Stats {
        let e = self.engine();
        let mut stats = Stats {
            requests_completed: e.completed,
            doorbells: self.poller.doorbells(),
            quiesced: e.quiesced,
            dma_logging: e.mem.logging(),
            rx_frames: 0,
            tx_frames: 0,
            rx_dropped: 0,
            tx_dropped: 0,
            announcements: 0,
        };
        e.personality.stats(&mut stats);
        stats
    }
}
