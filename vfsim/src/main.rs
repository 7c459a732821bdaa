//! `vfsim`: serves a simulated virtio-blk VF over vfio-user on a Unix socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use vfsim::{serve, SimConfig, VfSim};

/// A software SR-IOV VF (virtio-blk) served over vfio-user.
#[derive(Debug, Parser)]
#[command(name = "vfsim", version)]
struct Args {
    /// Path of the Unix socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Disk image backing the device (read and written in place).
    #[arg(long)]
    disk: PathBuf,
    /// Largest virtqueue size offered (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
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
    signals::block_termination().map_err(|e| format!("blocking SIGTERM/SIGINT failed: {e}"))?;
    let mut device = VfSim::new(&SimConfig {
        disk: args.disk.clone(),
        queue_size: args.queue_size,
    })
    .map_err(|e| e.to_string())?;
    let listener = serve::bind(&args.socket).map_err(|e| e.to_string())?;
    let disk = device
        .disk_file()
        .map_err(|e| format!("duplicating the disk image handle failed: {e}"))?;
    let socket = args.socket.clone();
    std::thread::Builder::new()
        .name("vfsim-signals".into())
        .spawn(move || {
            let sig = signals::wait_termination();
            tracing::info!("signal {sig} received; exiting");
            shutdown(&socket, &disk)
        })
        .map_err(|e| format!("spawning the signal thread failed: {e}"))?;
    tracing::info!(socket = %args.socket.display(), "vfsim listening");
    serve::serve_clients(&listener, &mut device)
}

/// Flushes the disk, removes the socket and exits with success.
fn shutdown(socket: &Path, disk: &std::fs::File) -> ! {
    if let Err(e) = disk.sync_all() {
        tracing::warn!("flushing the disk image on exit failed: {e}");
    }
    if let Err(e) = std::fs::remove_file(socket) {
        tracing::warn!("removing {} on exit failed: {e}", socket.display());
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
