//! `vmm`: the binary's edge. Parses the command line, runs the VM, and turns every error into
//! one line on stderr and a non-zero exit status.

mod api;
mod boot;
mod builder;
mod cli;
mod config;
mod console;
mod ctl;
mod device_manager;
mod event_loop;
mod exit;
mod irq_routes;
mod machine;
mod memory;
mod migrate;
mod pause;
mod seccomp;
mod serial_config;
mod snapshot;
mod state;
mod vcpu;
mod vm;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::exit::ExitReason;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "ctl") {
        return ExitCode::from(ctl::main(args));
    }
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's message is several lines; give one, with where to look.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("vmm: error: {first} (see vmm --help)");
            return ExitCode::from(2);
        }
    };
    init_logging(cli.log_level.as_deref());
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm: error: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each cause once: many of the project's error
/// messages already include their source's text, so a cause whose text the line holds
/// already is not repeated (plain `{:#}` printed `X: X: X`).
fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|e| {
            eprintln!("vmm: warning: bad --log-level '{f}' ({e}); using 'info'");
            EnvFilter::new("info")
        }),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn run(cli: &cli::Cli) -> anyhow::Result<u8> {
    let mem_size = memory::parse_size(&cli.memory)?;
    memory::validate_size(mem_size, &format!("--memory {}", cli.memory))?;
    for (opt, path) in [("--kernel", &cli.kernel), ("--restore", &cli.restore)] {
        let Some(path) = path else { continue };
        if !path.is_file() {
            // Checked here so the message names the option, not an internal step.
            let why = match std::fs::metadata(path) {
                Ok(_) => "not a regular file".to_string(),
                Err(e) => e.to_string(),
            };
            anyhow::bail!("{opt} {}: {why}", path.display());
        }
    }
    if let Some(initramfs) = &cli.initramfs {
        std::fs::metadata(initramfs)
            .with_context(|| format!("--initramfs {}", initramfs.display()))?;
    }
    let devices = config::device::resolve(&cli.devices)?;
    let start = match (&cli.restore, &cli.kernel) {
        _ if cli.incoming.is_some() => vm::Start::Incoming(migrate::incoming::IncomingConfig {
            url: cli.incoming.clone().unwrap_or_default(),
            tls: cli.migration_tls.clone(),
            timeout: cli.incoming_timeout.map(std::time::Duration::from_secs),
        }),
        (Some(path), _) => vm::Start::Restore(path.clone()),
        (None, Some(kernel)) => vm::Start::Boot {
            kernel: kernel.clone(),
            initramfs: cli.initramfs.clone(),
            cmdline: cli.cmdline.clone(),
        },
        (None, None) => anyhow::bail!("give --kernel PATH (or --restore PATH)"),
    };
    let cfg = vm::VmConfig {
        start,
        mem_size,
        cpus: cli.cpus,
        serial: cli.serial.clone(),
        serial2: cli.serial2.clone(),
        devices,
        api_socket: cli.api_socket.clone(),
        seccomp: cli.seccomp,
    };
    let started = std::time::Instant::now();
    let (reason, stats) = vm::run(&cfg)?;
    let secs = started.elapsed().as_secs_f64();
    if cli.exit_stats {
        print_stats(&stats, secs);
    }
    match &reason {
        ExitReason::GuestReset => tracing::info!("guest reset after {secs:.1} s; exiting"),
        ExitReason::GuestPowerOff => tracing::info!("guest powered off after {secs:.1} s; exiting"),
        ExitReason::Signal(n) => tracing::info!("stopped by signal {n} after {secs:.1} s"),
        ExitReason::Migrated(to) => {
            tracing::info!("guest migrated to {to} after {secs:.1} s; exiting")
        }
        ExitReason::Error(msg) => anyhow::bail!("{msg}"),
    }
    Ok(reason.status() as u8)
}

fn print_stats(stats: &vm::RunStats, secs: f64) {
    eprintln!("exit-stats: total {} exits in {secs:.1} s", stats.total);
    for (kind, n, ns) in &stats.exits {
        if *n > 0 && *ns > 0 {
            let avg_us = *ns as f64 / *n as f64 / 1000.0;
            eprintln!("exit-stats: cause {kind:<14} {n} (VMM handling {avg_us:.1} us each)");
        } else if *n > 0 {
            eprintln!("exit-stats: cause {kind:<14} {n}");
        }
    }
    for s in &stats.bus {
        if s.reads + s.writes > 0 {
            eprintln!(
                "exit-stats: device {:<12} {:<4} {:#06x} reads {} writes {}",
                s.name, s.space, s.base, s.reads, s.writes
            );
        }
    }
    for d in &stats.devices {
        for b in &d.bars {
            let at = b.base.map_or("unplaced".to_string(), |a| format!("{a:#x}"));
            eprintln!(
                "exit-stats: pci {:<12} bar{} {at} size {:#x} reads {} writes {}",
                d.id, b.index, b.size, b.reads, b.writes
            );
        }
        if d.errors > 0 {
            eprintln!("exit-stats: pci {:<12} backend errors {}", d.id, d.errors);
        }
    }
}

#[cfg(test)]
mod error_text_tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to the device: {source}")]
    struct Embeds {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(Embeds { source: io }).context("starting the VM");
        assert_eq!(
            error_text(&e),
            "starting the VM: connecting to the device: connection refused"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&plain), "outer: inner");
    }
}
