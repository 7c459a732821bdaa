//! Answers API requests on the VM's owner thread.

use std::sync::Arc;

use crate::device_manager::PciPassthrough;
use crate::machine::Machine;

use super::error::RequestError;
use super::protocol::{Request, Response};
use super::{migration, replies};

fn device<'a>(vm: &'a Machine, id: &str) -> Result<&'a PciPassthrough, RequestError> {
    let devices = &vm.devices;
    devices
        .iter()
        .find(|d| d.id == id)
        .ok_or_else(|| RequestError::UnknownDevice {
            id: id.to_owned(),
            known: devices.iter().map(|d| d.id.clone()).collect(),
        })
}

/// Answers one request.
pub fn handle(request: Request, vm: &Arc<Machine>) -> Response {
    let stops_the_vm = matches!(
        request,
        Request::Pause {} | Request::Resume {} | Request::Snapshot { .. }
    );
    if stops_the_vm && vm.migration.busy() {
        return Response::error(format!(
            "a migration to {} is running; wait for it to end (migration-status)",
            vm.migration.get().url
        ));
    }
    match request {
        Request::Info {} => Response::reply(&replies::Info {
            cpus: vm.cpus,
            memory: vm.mem_size,
            paused: vm.paused(),
            migration: vm.migration.get().phase,
            devices: vm
                .devices
                .iter()
                .map(|d| replies::DeviceSummary {
                    id: d.id.clone(),
                    mediator: d.mediated.as_ref().map(|m| m.mediator_name().to_string()),
                })
                .collect(),
        }),
        Request::DeviceStats {} => Response::reply(&device_stats(vm)),
        Request::Pause {} => match vm.pause() {
            Ok(()) => Response::reply(&replies::Paused { paused: true }),
            Err(e) => Response::error(format!("cannot pause: {e}")),
        },
        Request::Resume {} => match vm.resume() {
            Ok(()) => Response::reply(&replies::Paused { paused: false }),
            Err(e) => Response::error(format!("cannot resume: {e}")),
        },
        Request::Migrate {
            url,
            tls,
            downtime_ms,
            max_bandwidth_mb_s,
            follow,
        } => {
            let req = crate::migrate::source::Request {
                url: url.clone(),
                tls,
                downtime_ms: downtime_ms.unwrap_or(300),
                max_bandwidth_mb_s,
                follow,
            };
            match crate::migrate::source::start(vm.clone(), req) {
                Ok(()) => Response::reply(&replies::MigrationStarted { started: url }),
                Err(e) => Response::error(format!("cannot migrate: {e}")),
            }
        }
        Request::MigrationStatus {} => Response::reply(&vm.migration.report()),
        Request::Snapshot { path, paused } => {
            match crate::snapshot::file::snapshot(vm, &path, paused) {
                Ok(v) => Response::reply(&v),
                Err(e) => Response::error(format!(
                    "snapshot to {} failed: {e} (the VM runs on)",
                    path.display()
                )),
            }
        }
        Request::DeviceMigration {
            device: id,
            op,
            path,
        } => {
            let d = match device(vm, &id) {
                Ok(d) => d,
                Err(e) => return Response::error(e.to_string()),
            };
            let Some(m) = &d.migration else {
                return Response::error(format!(
                    "device {id} cannot migrate: {}",
                    d.migration_blocker
                        .as_deref()
                        .unwrap_or("it has no migration interface")
                ));
            };
            match migration::run(&**m, op, path.as_deref()) {
                Ok(v) => v,
                Err(e) => Response::error(format!("device {id}: {e}")),
            }
        }
        Request::Mediator {
            device: id,
            command,
            args,
        } => {
            let d = match device(vm, &id) {
                Ok(d) => d,
                Err(e) => return Response::error(e.to_string()),
            };
            let Some(m) = &d.mediated else {
                return Response::error(format!(
                    "device {id} has no mediator; start it with --device vfio-mediated,...,mediator=NAME"
                ));
            };
            match m.handle().control(&command, &args) {
                Ok(v) => Response::ok(v),
                Err(e) => {
                    Response::error(format!("device {id}: mediator {}: {e}", m.mediator_name()))
                }
            }
        }
    }
}

fn device_stats(vm: &Machine) -> replies::DeviceStats {
    let m = vm;
    let exits = m
        .exits
        .snapshot()
        .into_iter()
        .map(|(k, count, handling_ns)| (k.to_string(), replies::ExitCount { count, handling_ns }))
        .collect();
    let devices = m
        .devices
        .iter()
        .map(|d| {
            let s = d.stats();
            replies::DeviceCounters {
                id: s.id,
                backend_errors: s.errors,
                bars: s
                    .bars
                    .iter()
                    .map(|b| replies::BarCounters {
                        index: b.index,
                        size: b.size,
                        base: b.base,
                        reads: b.reads,
                        writes: b.writes,
                        mapped: d.device.mapped_areas(b.index),
                        trapped: d.device.trapped(b.index),
                    })
                    .collect(),
                migration_state: d
                    .migration
                    .as_ref()
                    .and_then(|m| m.state().ok())
                    .map(|s| s.to_string()),
                mediator: d.mediated.as_ref().map(|m| replies::MediatorStats {
                    name: m.mediator_name().to_string(),
                    stats: m.handle().stats(),
                }),
            }
        })
        .collect();
    replies::DeviceStats {
        exits,
        total_exits: m.exits.total(),
        devices,
    }
}
