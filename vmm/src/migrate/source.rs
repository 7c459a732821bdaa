//! The source side of a live migration, on its own thread.

use std::collections::BTreeSet;
use std::io::BufWriter;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::vfio::migration::MigrationState;
use migration::{Control, DevicePhase, Section, StreamReader, StreamWriter, FLAG_LIVE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::error::MigrateError;
use super::progress::{Counted, Phase, StopAndCopyTimes};
use super::stall::StallGuard;
use super::throttle::{Cap, Throttled};
use super::tls::Conn;
use super::Transport;
use crate::config::tls::MigrationTlsConfig;
use crate::exit::ExitReason;
use crate::machine::Machine;
use crate::snapshot::save::{
    check_migratable, config, restart_devices, stop_devices, write_all_ram, write_device_chunks,
    write_final_state, write_pages,
};

/// Pre-copy passes after the first before stopping the guest anyway.
pub const MAX_ITERATIONS: u32 = 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A destination that says nothing for this long is gone.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the Abort after a failure may take: the stream may be the thing that failed
/// (a cut link), and the guest's resumption here waits for it.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a completed source waits for a following client to read the final status.
const FOLLOWER_GRACE: Duration = Duration::from_secs(3);

/// What the caller asked for.
#[derive(Clone, Debug)]
pub struct Request {
    /// `tcp:HOST:PORT` or `tls:HOST:PORT`.
    pub url: String,
    /// This VMM's certificate, key and the CA the destination's certificate must be signed
    /// by (required with `tls:`, refused with `tcp:`).
    pub tls: Option<MigrationTlsConfig>,
    /// Downtime budget.
    pub downtime_ms: u64,
    /// Pre-copy's bandwidth cap in MB/s (10^6 bytes); stop-and-copy runs uncapped.
    pub max_bandwidth_mb_s: Option<u64>,
    /// The requesting client follows the migration with `migration-status`: once it
    /// completes, wait for that client to hear so before exiting.
    pub follow: bool,
}

/// Starts the migration on a thread; the status is in `m.migration`. Fails at once if one
/// is already running or the URL is bad.
pub fn start(m: Arc<Machine>, req: Request) -> Result<(), MigrateError> {
    let target = super::parse_url(&req.url)?;
    // The files are read here, so a bad one is the request's answer.
    let tls = match (target.transport, &req.tls) {
        (Transport::Tls, Some(t)) => Some(TlsClient {
            config: super::tls::client_config(t)?,
            name: super::tls::server_name(t, &target.host)?,
        }),
        (Transport::Tls, None) => {
            return Err(MigrateError::TlsNotConfigured {
                url: req.url.clone(),
            })
        }
        (Transport::Tcp, Some(_)) => {
            return Err(MigrateError::TlsForTcp {
                url: req.url.clone(),
            })
        }
        (Transport::Tcp, None) => None,
    };
    let addr = target.addr;
    if req.max_bandwidth_mb_s == Some(0) {
        return Err(MigrateError::ZeroBandwidth);
    }
    if m.caps.is_none() {
        return Err(MigrateError::NoCaps);
    }
    check_migratable(&m).map_err(MigrateError::Snapshot)?;
    {
        if m.migration.busy() {
            return Err(MigrateError::Busy(m.migration.get().url));
        }
        m.migration.begin(super::progress::Status {
            phase: Phase::Setup,
            url: req.url.clone(),
            downtime_budget_ms: req.downtime_ms,
            ..Default::default()
        });
        if req.follow {
            m.migration.expect_follower();
        }
    }
    std::thread::Builder::new()
        .name("migrate".into())
        .spawn(move || {
            m.seccomp.narrow(crate::seccomp::ThreadKind::Migration);
            let started = Instant::now();
            match migrate(&m, addr, tls, &req, started) {
                Ok(()) => {
                    // A `vmm ctl migrate` following the migration must hear that it
                    // completed before this VMM goes, or it reports a lost source.
                    if !m.migration.wait_completion_told(FOLLOWER_GRACE) {
                        tracing::warn!(
                            "the client following the migration did not ask for the final status within {} s",
                            FOLLOWER_GRACE.as_secs()
                        );
                    }
                    tracing::info!("migration to {} complete; exiting", req.url);
                    m.exit.trigger(ExitReason::Migrated(req.url.clone()));
                }
                Err(e) => {
                    let mut s = m.migration.lock();
                    s.phase = Phase::Failed;
                    s.error = Some(e.to_string());
                    s.total_ms = started.elapsed().as_secs_f64() * 1e3;
                    tracing::error!(
                        "migration to {} failed, the guest runs on here: {e}",
                        req.url
                    );
                }
            }
        })
        .map_err(MigrateError::Thread)?;
    Ok(())
}

/// The source's side of a `tls:` migration.
struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    /// What the destination's certificate must be issued for.
    name: rustls::pki_types::ServerName<'static>,
}

/// Sends on the socket; fails with what was being sent.
struct Link {
    w: StreamWriter<BufWriter<Throttled<Counted<StallGuard<Conn>>>>>,
    /// The socket itself, for its timeouts.
    socket: TcpStream,
    /// Pre-copy's bandwidth cap, lifted for stop-and-copy.
    cap: Cap,
    reply: Option<StreamReader<Conn>>,
}

fn io<T>(what: &'static str, r: Result<T, migration::Error>) -> Result<T, MigrateError> {
    r.map_err(|e| MigrateError::stream(what, e))
}

/// RAM pages the vCPUs wrote since the last call (KVM's log).
fn ram_dirty_pages(m: &Machine) -> Result<BTreeSet<u64>, MigrateError> {
    let mut pages = BTreeSet::new();
    for r in m.mem.iter() {
        let gpa = r.start_addr().0;
        pages.extend(
            m.memslots
                .take_dirty_pages(gpa)
                .map_err(MigrateError::DirtyLog)?,
        );
    }
    Ok(pages)
}

/// RAM pages written since the last call (KVM's log) plus the devices' dirty pages.
fn dirty_pages(m: &Machine) -> Result<(BTreeSet<u64>, u64), MigrateError> {
    let mut pages = ram_dirty_pages(m)?;
    let mut from_devices = 0;
    for d in m.devices.iter() {
        if let Some(mig) = &d.migration {
            let dev = mig
                .take_dirty_pages()
                .map_err(|source| MigrateError::DeviceDirtyPages {
                    id: d.id.clone(),
                    source,
                })?;
            from_devices += dev.len() as u64;
            pages.extend(dev);
        }
    }
    Ok((pages, from_devices))
}

fn set_ram_logging(m: &Machine, on: bool) -> Result<(), MigrateError> {
    for r in m.mem.iter() {
        m.memslots
            .set_dirty_logging(r.start_addr().0, on)
            .map_err(|source| MigrateError::DirtyLogging { on, source })?;
    }
    Ok(())
}

fn migrate(
    m: &Arc<Machine>,
    addr: std::net::SocketAddr,
    tls: Option<TlsClient>,
    req: &Request,
    started: Instant,
) -> Result<(), MigrateError> {
    let url = &req.url;
    let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|source| {
        MigrateError::Connect {
            url: url.clone(),
            source,
        }
    })?;
    let _ = tcp.set_nodelay(true);
    tcp.set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|()| tcp.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(MigrateError::Socket)?;
    let socket = tcp.try_clone().map_err(MigrateError::Socket)?;
    let stream = match tls {
        Some(t) => {
            Conn::connect_tls(tcp, t.config, t.name).map_err(|source| MigrateError::Handshake {
                url: url.clone(),
                source,
            })?
        }
        None => Conn::plain(tcp),
    };
    let cap = Cap::new(req.max_bandwidth_mb_s.map(|mb| mb * 1_000_000));
    let writer = BufWriter::with_capacity(
        1 << 20,
        Throttled::new(
            m.migration.counted(StallGuard::new(
                stream.try_clone().map_err(MigrateError::Socket)?,
                IO_TIMEOUT,
            )),
            cap.clone(),
        ),
    );
    let mut link = Link {
        socket,
        cap,
        w: io(
            "sending the header",
            StreamWriter::write_header(writer, FLAG_LIVE),
        )?,
        reply: None,
    };
    io("sending the VM config", link.w.write_vm_config(&config(m)))?;
    io("sending", link.w.flush())?;
    let mut reply = io(
        "reading the destination's answer",
        StreamReader::read_header(stream),
    )?;
    expect_answer(
        &mut reply,
        Control::Ready,
        "reading the destination's answer",
        "the destination refused the migration",
    )?;
    link.reply = Some(reply);
    tracing::info!("migration to {url}: destination ready");

    // From here on a failure must undo: the guest keeps running here.
    // No pause, resume or snapshot runs beside a migration (the API refuses them while
    // it is busy), so the flag holds still until this thread changes it.
    let was_paused = m.paused();
    let mut paused_here = false;
    let result = precopy_and_stop(m, &mut link, req, started, was_paused, &mut paused_here);
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            // Tell the destination why, if the link still carries it; a cut link must not
            // hold the guest here for more I/O timeouts (the buffered rest of the stream
            // goes first and would wait the full timeout on each write).
            let _ = link.socket.set_write_timeout(Some(ABORT_TIMEOUT));
            let _ = link.w.write_control(&Control::Abort {
                reason: e.to_string(),
            });
            let _ = link.w.flush();
            for d in m.devices.iter() {
                if let Some(mig) = &d.migration {
                    let _ = mig.stop_dirty_tracking();
                }
            }
            restart_devices(m);
            if let Err(e2) = set_ram_logging(m, false) {
                tracing::warn!("{e2}");
            }
            if paused_here && !was_paused {
                if let Err(e2) = m.resume_vcpus() {
                    tracing::error!("resuming the guest after the failed migration: {e2}");
                }
            }
            Err(e)
        }
    }
}

/// Reads the destination's next answer, which must be `expected`: `waiting` says what for
/// (in I/O errors), `aborted` what an Abort from it means.
fn expect_answer(
    reply: &mut StreamReader<Conn>,
    expected: Control,
    waiting: &'static str,
    aborted: &'static str,
) -> Result<(), MigrateError> {
    match io(waiting, reply.next_section())? {
        Section::Control(c) if c == expected => Ok(()),
        Section::Control(Control::Abort { reason }) => Err(MigrateError::Aborted {
            what: aborted,
            reason,
        }),
        other => Err(MigrateError::Unexpected {
            got: format!("{other:?}"),
            expected: format!("{expected:?}"),
        }),
    }
}

impl Link {
    /// The destination's answer stream (there once it said Ready).
    fn reply(&mut self) -> Result<&mut StreamReader<Conn>, MigrateError> {
        self.reply.as_mut().ok_or(MigrateError::NoAnswerChannel)
    }
}

fn precopy_and_stop(
    m: &Arc<Machine>,
    link: &mut Link,
    req: &Request,
    started: Instant,
    was_paused: bool,
    paused_here: &mut bool,
) -> Result<(), MigrateError> {
    let url = &req.url;
    set_ram_logging(m, true)?;
    // Clear what KVM logged before (the devices' tracking starts just below).
    ram_dirty_pages(m)?;
    for d in m.devices.iter() {
        if let Some(mig) = &d.migration {
            let derr = |source| MigrateError::Device {
                id: d.id.clone(),
                source,
            };
            mig.start_dirty_tracking().map_err(derr)?;
            mig.set_state(MigrationState::PreCopy).map_err(derr)?;
        }
    }
    m.migration.lock().phase = Phase::PreCopy;

    let mut pages: Vec<u64> = Vec::new();
    let mut iteration = 0u32;
    loop {
        let pass_start = Instant::now();
        let bytes_before = link.w.bytes_written();
        io(
            "sending",
            link.w.write_control(&Control::IterationBegin { iteration }),
        )?;
        // The first pass sends all RAM (never-written memory as zero runs), later ones
        // what was dirtied meanwhile.
        let n = if iteration == 0 {
            write_all_ram(m, &mut link.w)
        } else {
            write_pages(m, &mut link.w, pages.iter().copied())
        }
        .map_err(MigrateError::from)?;
        for d in m.devices.iter() {
            if let Some(mig) = &d.migration {
                write_device_chunks(&d.id, &**mig, DevicePhase::PreCopy, &mut link.w)
                    .map_err(MigrateError::from)?;
            }
        }
        io(
            "sending",
            link.w.write_control(&Control::IterationEnd { iteration }),
        )?;
        io("sending", link.w.flush())?;
        // Until the destination has applied the pass: its backlog is not left for the
        // downtime, and the pass's rate is what the destination takes in.
        expect_answer(
            link.reply()?,
            Control::Synced { iteration },
            "waiting for the destination to apply the pass",
            "the destination gave up",
        )?;
        let elapsed = started.elapsed().as_secs_f64();
        let bytes = link.w.bytes_written();
        let pass_secs = pass_start.elapsed().as_secs_f64().max(1e-3);
        // The rate of this pass: what the link and the page copy achieve now.
        let bandwidth = (bytes - bytes_before) as f64 / pass_secs;
        let (dirty, from_devices) = dirty_pages(m)?;
        let expected_ms = dirty.len() as f64 * 4096.0 / bandwidth * 1e3;
        {
            let mut s = m.migration.lock();
            s.iteration = iteration;
            s.bytes = bytes;
            s.pages += n;
            s.dirty_pages = dirty.len() as u64;
            s.device_dirty_pages = from_devices;
            s.dirty_rate_pages_s = dirty.len() as f64 / pass_secs;
            s.bandwidth_mb_s = bandwidth / 1e6;
            s.expected_downtime_ms = expected_ms;
            s.total_ms = elapsed * 1e3;
        }
        tracing::info!(
            "migration to {url}: iteration {iteration}: sent {n} pages, {:.1} MB total at {:.1} MB/s; {} pages dirty ({from_devices} by devices, {:.0}/s); stopping now would take {expected_ms:.1} ms",
            bytes as f64 / 1e6,
            bandwidth / 1e6,
            dirty.len(),
            dirty.len() as f64 / pass_secs
        );
        pages = dirty.into_iter().collect();
        iteration += 1;
        if expected_ms <= req.downtime_ms as f64 || iteration > MAX_ITERATIONS {
            break;
        }
    }

    // Stop-and-copy: uncapped, every millisecond is downtime.
    let stop_start = Instant::now();
    link.cap.lift();
    m.migration.lock().phase = Phase::StopAndCopy;
    if !was_paused {
        m.pause_vcpus()?;
        *paused_here = true;
    }
    let ms = |t: Instant| t.duration_since(stop_start).as_secs_f64() * 1e3;
    let vcpus_paused = Instant::now();
    stop_devices(m)?;
    let devices_stopped = Instant::now();
    io("sending", link.w.write_control(&Control::StopAndCopy))?;
    let (dirty, _) = dirty_pages(m)?;
    pages.extend(dirty);
    pages.sort_unstable();
    pages.dedup();
    let n = write_pages(m, &mut link.w, pages.iter().copied()).map_err(MigrateError::from)?;
    write_final_state(m, &mut link.w).map_err(MigrateError::from)?;
    io("sending", link.w.write_control(&Control::Complete))?;
    io("sending", link.w.flush())?;
    let sent = Instant::now();
    expect_answer(
        link.reply()?,
        Control::Resumed,
        "waiting for the destination to resume the guest",
        "the destination could not resume the guest",
    )?;
    let downtime = stop_start.elapsed().as_secs_f64() * 1e3;
    let times = StopAndCopyTimes {
        vcpus_paused_ms: ms(vcpus_paused),
        devices_stopped_ms: ms(devices_stopped),
        sent_ms: ms(sent),
        resumed_ms: downtime,
    };
    // The guest runs on the destination: it stays stopped here until this VMM exits.
    m.set_paused(true);
    let mut s = m.migration.lock();
    s.phase = Phase::Completed;
    s.pages += n;
    s.bytes = link.w.bytes_written();
    s.downtime_ms = Some(downtime);
    s.total_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        "migration to {url}: guest resumed there; downtime {downtime:.1} ms, total {:.0} ms, {:.1} MB sent in {} iterations",
        s.total_ms,
        s.bytes as f64 / 1e6,
        iteration
    );
    tracing::info!(
        "migration to {url}: stop-and-copy: vCPUs paused at {:.1} ms, devices stopped at {:.1} ms, {n} pages and the final state sent at {:.1} ms, guest running there at {downtime:.1} ms",
        times.vcpus_paused_ms,
        times.devices_stopped_ms,
        times.sent_ms
    );
    s.stop_and_copy = Some(times);
    let _ = link.w.flush();
    Ok(())
}
