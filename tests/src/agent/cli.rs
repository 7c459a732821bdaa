//! The agent's command line and entry point.

use std::io;
use std::process::ExitCode;

use thiserror::Error;

use super::server::{ServeEnd, Server};
use super::{pid1, sys, tty};

/// Usage text printed on a bad command line.
pub const USAGE: &str = "\
usage: guest-agent --stdio        serve the agent protocol on stdin/stdout
       guest-agent --port PATH    serve it on a tty or device
       guest-agent --net-peer ARGS  be the NIC tests' traffic peer (see net-peer)
As PID 1 (the guest's /init) it mounts file systems and serves on /dev/ttyS1
(kernel command line: agent.port=PATH, agent.oneshot).";

/// How the agent was asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// As the guest's init.
    Pid1,
    /// On stdin/stdout.
    Stdio,
    /// On a device.
    Port(String),
    /// The traffic peer, with its arguments.
    NetPeer(Vec<String>),
}

/// A command line that names no mode.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct UsageError(String);

/// Chooses the mode from the arguments (without the program name); PID 1 ignores them (the
/// kernel passes unknown boot parameters as init's arguments).
pub fn parse_args<I: IntoIterator<Item = String>>(args: I, pid1: bool) -> Result<Mode, UsageError> {
    if pid1 {
        return Ok(Mode::Pid1);
    }
    let args: Vec<String> = args.into_iter().collect();
    match args.as_slice() {
        [flag, rest @ ..] if flag == "--net-peer" => Ok(Mode::NetPeer(rest.to_vec())),
        [flag] if flag == "--stdio" => Ok(Mode::Stdio),
        [flag, path] if flag == "--port" => Ok(Mode::Port(path.clone())),
        [] => Err(UsageError("no mode given".to_owned())),
        _ => Err(UsageError(format!(
            "unexpected arguments: {}",
            args.join(" ")
        ))),
    }
}

/// The agent's `main`.
pub fn main() -> ExitCode {
    let mode = match parse_args(std::env::args().skip(1), sys::is_pid1()) {
        Ok(mode) => mode,
        Err(e) => {
            eprintln!("guest-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut server = Server::new(false);
    let result = match mode {
        Mode::NetPeer(args) => return super::net_peer::main(args),
        Mode::Pid1 => pid1::run(),
        Mode::Stdio => server
            .serve(io::stdin().lock(), io::stdout().lock())
            .map_err(|e| e.to_string()),
        Mode::Port(path) => tty::open_raw(&path)
            .map_err(|e| e.to_string())
            .and_then(|file| server.serve(&file, &file).map_err(|e| e.to_string())),
    };
    match result {
        Ok(ServeEnd::Eof | ServeEnd::Reboot) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn modes() {
        assert_eq!(parse_args(args(&["--stdio"]), false).unwrap(), Mode::Stdio);
        assert_eq!(
            parse_args(args(&["--port", "/dev/ttyS3"]), false).unwrap(),
            Mode::Port("/dev/ttyS3".into())
        );
        assert_eq!(parse_args(args(&["whatever"]), true).unwrap(), Mode::Pid1);
        assert!(parse_args(args(&[]), false).is_err());
        assert!(parse_args(args(&["--port"]), false).is_err());
        assert!(parse_args(args(&["--stdio", "x"]), false).is_err());
        assert_eq!(
            parse_args(args(&["--net-peer", "--seed", "1"]), false).unwrap(),
            Mode::NetPeer(args(&["--seed", "1"]))
        );
    }
}
