//! `trace`: a mediator that passes every access through to the device, traps the BAR
//! ranges it is told to (`trap=BAR:OFFSET+SIZE;...` at start, `trap`/`untrap` control
//! requests at run time), and counts and logs (at debug level, target
//! `mediate::mediators::trace`) the accesses that reach it.
//!
//! It only takes devices it is named for: under `mediator=auto` it declines, since tracing
//! costs an exit per trapped access.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use devices::vfio::{BackendError, VfioBackend};
use serde_json::{json, Value};

use crate::attach::{AttachContext, TrapHandle, TrapOwner};
use crate::error::{MediateError, Result};
use crate::identity::{BarRange, DeviceIdentity, MediatorOptions};
use crate::mediator::{Access, MediatedDevice, Mediator, Probe};

/// The `trace` mediator.
pub struct Trace;

impl Mediator for Trace {
    fn name(&self) -> &str {
        "trace"
    }

    fn description(&self) -> &str {
        "passes everything through; traps the BAR ranges it is told to and counts and logs the accesses"
    }

    fn probe(
        &self,
        identity: &DeviceIdentity,
        options: &MediatorOptions,
        _backend: &Arc<dyn VfioBackend>,
    ) -> Result<Probe> {
        if !options.named {
            return Ok(Probe::Decline(
                "trace takes only devices it is named for (mediator=trace)".into(),
            ));
        }
        Ok(Probe::Accept(Box::new(TraceDevice {
            name: identity.address.clone(),
            initial: options.trap.clone(),
            traps: OnceLock::new(),
            counts: Default::default(),
        })))
    }
}

/// Per BAR (0-5) and the configuration space (6): reads and writes that reached us.
#[derive(Default)]
struct Counts {
    reads: [AtomicU64; 7],
    writes: [AtomicU64; 7],
}

struct TraceDevice {
    name: String,
    initial: Vec<BarRange>,
    traps: OnceLock<TrapHandle>,
    counts: Counts,
}

/// Counter slot of a region index: BARs 0-5, then the configuration space.
fn slot(index: u32) -> Option<usize> {
    match index {
        0..=5 => Some(index as usize),
        devices::vfio::backend::CONFIG_REGION => Some(6),
        _ => None,
    }
}

impl TraceDevice {
    fn traps(&self) -> Result<&TrapHandle> {
        self.traps
            .get()
            .ok_or_else(|| MediateError::NotAttached(self.name.clone()))
    }

    fn range(args: &Value) -> Result<BarRange> {
        let field = |k: &str| {
            args.get(k).and_then(Value::as_u64).ok_or_else(|| {
                MediateError::BadRequest(format!(
                    "argument {k:?} is missing or not a number; give {{\"bar\": N, \"offset\": N, \"size\": N}}"
                ))
            })
        };
        Ok(BarRange {
            bar: field("bar")? as usize,
            offset: field("offset")?,
            size: field("size")?,
        })
    }

    fn trapped(&self) -> Value {
        let Ok(t) = self.traps() else {
            return json!([]);
        };
        let list: Vec<Value> = (0..6)
            .flat_map(|bar| {
                t.trapped(bar)
                    .into_iter()
                    .map(move |(o, s)| json!({"bar": bar, "offset": o, "size": s}))
            })
            .collect();
        Value::Array(list)
    }
}

impl MediatedDevice for TraceDevice {
    fn attach(&self, ctx: AttachContext) {
        for r in &self.initial {
            match ctx.traps.trap(r.bar, r.offset, r.size, TrapOwner::Device) {
                Ok(()) => tracing::info!(
                    "trace {}: trapping BAR {} {:#x}+{:#x}",
                    self.name,
                    r.bar,
                    r.offset,
                    r.size
                ),
                Err(e) => tracing::warn!("trace {}: {e}", self.name),
            }
        }
        let _ = self.traps.set(ctx.traps);
    }

    fn read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> std::result::Result<Access, BackendError> {
        if let Some(s) = slot(index) {
            self.counts.reads[s].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "trace {}: read region {index} + {offset:#x}, {} bytes",
                self.name,
                data.len()
            );
        }
        Ok(Access::PassThrough)
    }

    fn write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<Access, BackendError> {
        if let Some(s) = slot(index) {
            self.counts.writes[s].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "trace {}: write region {index} + {offset:#x} = {data:02x?}",
                self.name
            );
        }
        Ok(Access::PassThrough)
    }

    fn control(&self, command: &str, args: &Value) -> Result<Value> {
        match command {
            "trap" | "untrap" => {
                let r = Self::range(args)?;
                let t = self.traps()?;
                let started = std::time::Instant::now();
                if command == "trap" {
                    t.trap(r.bar, r.offset, r.size, TrapOwner::Device)?;
                } else {
                    t.untrap(r.bar, r.offset, r.size, TrapOwner::Device)?;
                }
                let us = started.elapsed().as_secs_f64() * 1e6;
                tracing::info!(
                    "trace {}: {command} BAR {} {:#x}+{:#x} took {us:.0} us",
                    self.name,
                    r.bar,
                    r.offset,
                    r.size
                );
                Ok(json!({"trapped": self.trapped(), "latency_us": us}))
            }
            "trapped" => Ok(json!({"trapped": self.trapped()})),
            "stats" => Ok(self.stats()),
            _ => Err(MediateError::BadRequest(format!(
                "trace knows the requests trap, untrap, trapped and stats, not {command:?}"
            ))),
        }
    }

    fn stats(&self) -> Value {
        let load = |a: &[AtomicU64; 7]| -> Vec<u64> {
            a.iter().map(|c| c.load(Ordering::Relaxed)).collect()
        };
        json!({
            "bar_reads": load(&self.counts.reads)[..6],
            "bar_writes": load(&self.counts.writes)[..6],
            "config_reads": load(&self.counts.reads)[6],
            "config_writes": load(&self.counts.writes)[6],
            "trapped": self.trapped(),
        })
    }

    fn release(&self) {
        tracing::info!("trace {}: released", self.name);
    }
}
