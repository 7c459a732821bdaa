//! `vfsim`: serves a simulated virtio-blk or virtio-net VF over vfio-user on a Unix
//! socket, and optionally the PF side's control socket (`--pf-socket`, see `vfsim::pf`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use vfsim::net::{Mac, DEFAULT_MAC};
use vfsim::{pf, serve, PersonalityConfig, SimConfig, VfSim};

/// A software SR-IOV VF served over vfio-user: a modern virtio-blk function over a disk
/// image (--disk), or a modern virtio-net function over a tap interface (--net-tap).
///
/// virtio-net: VERSION_1, MAC and STATUS; queue 0 receives, queue 1 transmits; MSI-X
/// vectors: configuration, receive, transmit. The tap (IFF_TAP|IFF_NO_PI) is created if
/// missing, or attached if it exists as a persistent tap, and set up; creating it needs
/// CAP_NET_ADMIN and /dev/net/tun (without it: `ip tuntap add dev NAME mode tap user
/// $USER` and `ip link set NAME up` beforehand). A net function whose state was loaded
/// (set_state, or native migration's RESUMING) sends 3 gratuitous RARP frames with its
/// MAC when it runs again.
///
/// With --pf-socket it also serves the PF side's control socket: JSON lines
/// (`{"op":"get_state"}`, `set_state`, `quiesce`, `resume`, `dma_log_start`,
/// `dma_log_take`, `dma_log_stop`, `stats`), see `pf_protocol::proto`.
#[derive(Debug, Parser)]
#[command(name = "vfsim", version)]
#[command(group(
    ArgGroup::new("personality")
        .required(true)
        .args(["disk", "net_tap"]),
))]
struct Args {
    /// Path of the Unix socket to listen on (vfio-user).
    #[arg(long)]
    socket: PathBuf,
    /// Path of the PF-side control socket (JSON lines: state save/load, quiesce,
    /// resume, DMA write log); none if not given.
    #[arg(long)]
    pf_socket: Option<PathBuf>,
    /// Be a virtio-blk function over this disk image (read and written in place).
    /// Exactly one of --disk and --net-tap.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Be a virtio-net function whose wire is the tap interface NAME (created if
    /// missing; needs CAP_NET_ADMIN and /dev/net/tun). Exactly one of --disk and
    /// --net-tap.
    #[arg(long, value_name = "NAME")]
    net_tap: Option<String>,
    /// The virtio-net function's MAC address (unicast), xx:xx:xx:xx:xx:xx [default:
    /// 52:54:00:12:34:56]. Only with --net-tap.
    #[arg(long, conflicts_with = "disk")]
    mac: Option<Mac>,
    /// Largest virtqueue size offered (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Implement vfio-user's migration messages: the migration device features (v2
    /// state machine), MIG_DATA_READ/WRITE carrying the same state as the PF socket's
    /// get_state/set_state, and DMA dirty-page logging. Without it they are refused.
    #[arg(long)]
    native_migration: bool,
    /// Log filter (e.g. `info`, `debug`, `vfsim=trace`).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vfsim: invalid --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(&args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("vfsim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<std::convert::Infallible, String> {
    if args.pf_socket.as_ref() == Some(&args.socket) {
        return Err("--pf-socket must differ from --socket".into());
    }
    signals::block_termination().map_err(|e| format!("blocking SIGTERM/SIGINT failed: {e}"))?;
    let personality = match (&args.disk, &args.net_tap) {
        (Some(disk), None) => PersonalityConfig::Blk { disk: disk.clone() },
        (None, Some(tap)) => PersonalityConfig::Net {
            tap: tap.clone(),
            mac: args.mac.unwrap_or(DEFAULT_MAC),
        },
        // clap's group makes it exactly one.
        _ => return Err("exactly one of --disk and --net-tap is required".into()),
    };
    let mut device = VfSim::new(&SimConfig {
        personality,
        queue_size: args.queue_size,
        native_migration: args.native_migration,
    })
    .map_err(|e| e.to_string())?;
    // The PF socket first: once the vfio-user socket exists, both are ready.
    let mut sockets = Vec::new();
    if let Some(path) = &args.pf_socket {
        let pf = serve::bind(path).map_err(|e| e.to_string())?;
        sockets.push(path.clone());
        pf::server::spawn(pf, device.pf_controller())
            .map_err(|e| format!("spawning the PF socket thread failed: {e}"))?;
        tracing::info!(socket = %path.display(), "PF control socket listening");
    }
    let listener = serve::bind(&args.socket).map_err(|e| {
        for s in &sockets {
            let _ = std::fs::remove_file(s);
        }
        e.to_string()
    })?;
    sockets.push(args.socket.clone());
    let backing = device
        .backing_file()
        .transpose()
        .map_err(|e| format!("duplicating the disk image handle failed: {e}"))?;
    std::thread::Builder::new()
        .name("vfsim-signals".into())
        .spawn(move || {
            let sig = signals::wait_termination();
            tracing::info!("signal {sig} received; exiting");
            shutdown(&sockets, backing.as_ref())
        })
        .map_err(|e| format!("spawning the signal thread failed: {e}"))?;
    tracing::info!(socket = %args.socket.display(), "vfsim listening");
    serve::serve_clients(&listener, &mut device)
}

/// Flushes the disk (if any), removes the sockets and exits with success.
fn shutdown(sockets: &[PathBuf], disk: Option<&std::fs::File>) -> ! {
    if let Some(Err(e)) = disk.map(|d| d.sync_all()) {
        tracing::warn!("flushing the disk image on exit failed: {e}");
    }
    for socket in sockets {
        if let Err(e) = std::fs::remove_file(socket) {
            tracing::warn!("removing {} on exit failed: {e}", socket.display());
        }
    }
    std::process::exit(0)
}

mod signals {
    //! SIGTERM and SIGINT are blocked in every thread and taken by one thread with
    //! `sigwait()`, so they never interrupt the server.

    use std::io;

    fn set() -> libc::sigset_t {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned here.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
        }
        set
    }

    /// Blocks the signals in this thread and the threads it spawns later.
    pub fn block_termination() -> io::Result<()> {
        let set = set();
        // SAFETY: `set` is initialised; the old mask is not wanted (null).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Waits for SIGTERM or SIGINT; returns the signal number.
    pub fn wait_termination() -> i32 {
        let set = set();
        loop {
            let mut sig = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                return sig;
            }
        }
    }
}
