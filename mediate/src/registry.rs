//! The registry of mediators: registered by name, offered devices by name or in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::vfio::VfioBackend;

use crate::backend::MediatedBackend;
use crate::error::{MediateError, Result};
use crate::identity::{DeviceIdentity, MediatorOptions};
use crate::mediator::{Mediator, Probe};

/// Which mediator a device asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// The mediator with this name.
    Named(String),
    /// Each registered mediator in registration order; the first that accepts.
    Auto,
}

impl std::str::FromStr for Selector {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Selector::Auto,
            name => Selector::Named(name.to_string()),
        })
    }
}

struct Entry {
    mediator: Arc<dyn Mediator>,
    users: Arc<AtomicUsize>,
}

/// The mediators known to the VMM. A mediator stays registered while any device uses it.
#[derive(Default)]
pub struct Registry {
    /// In registration order (the order `auto` tries them).
    entries: Mutex<Vec<Entry>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry with the bundled mediators (`virtio-blk-vf`, then `trace`).
    pub fn with_bundled() -> Self {
        let r = Self::new();
        for m in crate::mediators::bundled() {
            // The bundled names are distinct.
            let _ = r.register(m);
        }
        r
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a mediator; its name must be new.
    pub fn register(&self, mediator: Arc<dyn Mediator>) -> Result<()> {
        let mut entries = self.lock();
        if entries.iter().any(|e| e.mediator.name() == mediator.name()) {
            return Err(MediateError::Duplicate(mediator.name().to_string()));
        }
        entries.push(Entry {
            mediator,
            users: Arc::new(AtomicUsize::new(0)),
        });
        Ok(())
    }

    /// Removes a mediator that no device uses.
    pub fn unregister(&self, name: &str) -> Result<()> {
        let mut entries = self.lock();
        let at = entries
            .iter()
            .position(|e| e.mediator.name() == name)
            .ok_or_else(|| self.unknown(&entries, name))?;
        let users = entries[at].users.load(Ordering::Acquire);
        if users > 0 {
            return Err(MediateError::InUse {
                name: name.to_string(),
                users,
            });
        }
        entries.remove(at);
        Ok(())
    }

    /// `(name, description, devices using it)` of each mediator, in registration order.
    pub fn list(&self) -> Vec<(String, String, usize)> {
        self.lock()
            .iter()
            .map(|e| {
                (
                    e.mediator.name().to_string(),
                    e.mediator.description().to_string(),
                    e.users.load(Ordering::Acquire),
                )
            })
            .collect()
    }

    /// Checks that `selector` names a registered mediator (or is `auto`), before any
    /// device is opened.
    pub fn check(&self, selector: &Selector) -> Result<()> {
        match selector {
            Selector::Auto => Ok(()),
            Selector::Named(name) => {
                let entries = self.lock();
                if entries.iter().any(|e| e.mediator.name() == name) {
                    Ok(())
                } else {
                    Err(self.unknown(&entries, name))
                }
            }
        }
    }

    fn unknown(&self, entries: &[Entry], name: &str) -> MediateError {
        let known: Vec<&str> = entries.iter().map(|e| e.mediator.name()).collect();
        MediateError::UnknownMediator {
            name: name.to_string(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        }
    }

    /// Offers the device behind `backend` (at `address`, e.g. `vfio-user:/run/vf0.sock`) to
    /// the selected mediator(s) and returns the backend to build the vfio-pci device over.
    pub fn open(
        &self,
        selector: &Selector,
        address: &str,
        options: &MediatorOptions,
        backend: Arc<dyn VfioBackend>,
    ) -> Result<Arc<MediatedBackend>> {
        let identity = DeviceIdentity::read(&*backend, address)?;
        let candidates: Vec<(Arc<dyn Mediator>, Arc<AtomicUsize>)> = {
            let entries = self.lock();
            match selector {
                Selector::Named(name) => {
                    let e = entries
                        .iter()
                        .find(|e| e.mediator.name() == name)
                        .ok_or_else(|| self.unknown(&entries, name))?;
                    vec![(e.mediator.clone(), e.users.clone())]
                }
                Selector::Auto => entries
                    .iter()
                    .map(|e| (e.mediator.clone(), e.users.clone()))
                    .collect(),
            }
        };
        let options = MediatorOptions {
            named: matches!(selector, Selector::Named(_)),
            ..options.clone()
        };
        let mut reasons = Vec::new();
        for (mediator, users) in candidates {
            match mediator.probe(&identity, &options, &backend)? {
                Probe::Accept(handle) => {
                    tracing::info!("mediator {} takes device {identity}", mediator.name());
                    users.fetch_add(1, Ordering::AcqRel);
                    let b = MediatedBackend::new(backend, handle, mediator, users).map_err(
                        |source| MediateError::Backend {
                            what: format!("asking {identity} for its device info"),
                            source,
                        },
                    )?;
                    return Ok(Arc::new(b));
                }
                Probe::Decline(reason) => reasons.push((mediator.name().to_string(), reason)),
            }
        }
        match selector {
            Selector::Named(name) => Err(MediateError::Declined {
                name: name.clone(),
                device: identity.to_string(),
                reason: reasons.pop().map(|(_, r)| r).unwrap_or_default(),
            }),
            Selector::Auto => Err(MediateError::NoneAccepts {
                device: identity.to_string(),
                reasons: if reasons.is_empty() {
                    "no mediator is registered".into()
                } else {
                    reasons
                        .iter()
                        .map(|(n, r)| format!("{n}: {r}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            }),
        }
    }
}
