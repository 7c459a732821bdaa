//! The `run` op: spawn a program, feed its stdin, capture its output, enforce a timeout.
//!
//! The program runs in its own process group so that a timeout kills whatever it started too.
//! Waiting uses blocking threads rather than polling: every system call is costly in the test
//! guest, whose kernel code is emulated.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::protocol::{RunOutput, RunRequest, OUTPUT_LIMIT};

/// How long to wait for the output pipes to close once the program has exited (a background
/// process it started may hold them open).
const PIPE_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a killed program to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// Why `run` failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// `argv` was empty.
    #[error("run: argv is empty")]
    EmptyArgv,
    /// The program could not be started.
    #[error("run: cannot spawn `{program}`: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program outlived its timeout and was killed.
    #[error("run: `{command}` timed out after {timeout_ms} ms and was killed")]
    TimedOut {
        /// The command line, shortened.
        command: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// Waiting for the program failed.
    #[error("run: waiting for `{program}` failed: {reason}")]
    Wait {
        /// `argv[0]`.
        program: String,
        /// What went wrong.
        reason: String,
    },
}

/// Runs the request to completion.
pub fn run(req: &RunRequest) -> Result<RunOutput, RunError> {
    let program = req.argv.first().ok_or(RunError::EmptyArgv)?.clone();
    let timeout = Duration::from_millis(req.timeout_ms());
    let start = Instant::now();

    let mut child = Command::new(&program)
        .args(&req.argv[1..])
        // A pipe rather than /dev/null even without input: /dev may lack it (devtmpfs not
        // mounted), and spawning must not depend on that.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = child.id();

    // Without input the pipe is closed at once: the program reads end of file.
    if let (Some(mut pipe), Some(input)) = (child.stdin.take(), req.stdin.clone()) {
        // A program that does not read its stdin makes this fail with EPIPE: not an error.
        thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = Capture::start(child.stdout.take(), done_tx.clone());
    let stderr = Capture::start(child.stderr.take(), done_tx);
    let exited = wait_in_thread(child);

    let status = match exited.recv_timeout(timeout) {
        Ok(status) => status,
        Err(RecvTimeoutError::Timeout) => {
            kill_group(pid);
            // Reap it (the thread does) before replying, so no zombie is left behind.
            let _ = exited.recv_timeout(KILL_GRACE);
            return Err(RunError::TimedOut {
                command: shorten(&req.argv.join(" ")),
                timeout_ms: req.timeout_ms(),
            });
        }
        Err(RecvTimeoutError::Disconnected) => {
            return Err(RunError::Wait {
                program,
                reason: "the waiting thread died".to_owned(),
            })
        }
    }
    .map_err(|e| RunError::Wait {
        program: program.clone(),
        reason: e.to_string(),
    })?;

    let grace = Instant::now() + PIPE_GRACE;
    let pipe_deadline = start
        .checked_add(timeout)
        .map_or(grace, |end| end.min(grace));
    for _ in 0..2 {
        let left = pipe_deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(RunOutput {
        status: status.code(),
        signal: status.signal(),
        stdout: stdout.text(),
        stderr: stderr.text(),
    })
}

/// Waits for `child` on a thread; the receiver gets its exit status.
fn wait_in_thread(mut child: Child) -> Receiver<std::io::Result<ExitStatus>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    rx
}

/// Kills the process group led by `pid` and, in case it left the group, `pid` itself.
fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions. The pid is still the child's: its
    // waiting thread had not reported an exit an instant ago (a reap in between, followed by
    // reuse of the pid, is the one theoretical race).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Output of one pipe, kept up to [`OUTPUT_LIMIT`] bytes and counted beyond.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    dropped: u64,
}

/// A pipe drained by a thread into a shared [`Captured`].
struct Capture(Arc<Mutex<Captured>>);

impl Capture {
    /// Drains `pipe` on a thread, which sends on `done` at end of stream.
    fn start<R: Read + Send + 'static>(pipe: Option<R>, done: mpsc::Sender<()>) -> Capture {
        let shared = Arc::new(Mutex::new(Captured::default()));
        let Some(mut pipe) = pipe else {
            let _ = done.send(());
            return Capture(shared);
        };
        let sink = Arc::clone(&shared);
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let Ok(mut c) = sink.lock() else { break };
                        let room = OUTPUT_LIMIT.saturating_sub(c.kept.len()).min(n);
                        c.kept.extend_from_slice(&buf[..room]);
                        c.dropped += (n - room) as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
        Capture(shared)
    }

    /// What was captured so far, as lossy UTF-8 with a truncation marker.
    fn text(&self) -> String {
        let Ok(c) = self.0.lock() else {
            return "[agent: output lost: capture thread panicked]".to_owned();
        };
        let mut text = String::from_utf8_lossy(&c.kept).into_owned();
        if c.dropped > 0 {
            text.push_str(&format!("\n[agent: truncated, {} more bytes]", c.dropped));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str]) -> RunRequest {
        RunRequest::new(argv)
    }

    #[test]
    fn captures_status_and_output() {
        let out = run(&req(&["sh", "-c", "echo hi; echo err >&2; exit 3"])).unwrap();
        assert_eq!(out.status, Some(3));
        assert_eq!(out.signal, None);
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn feeds_stdin() {
        let mut r = req(&["cat"]);
        r.stdin = Some("abc\n".into());
        let out = run(&r).unwrap();
        assert_eq!(out.stdout, "abc\n");
        assert!(out.success());
    }

    #[test]
    fn absurd_timeout_is_fine() {
        let mut r = req(&["true"]);
        r.timeout_ms = Some(u64::MAX);
        assert!(run(&r).unwrap().success());
    }

    #[test]
    fn reports_signals() {
        let out = run(&req(&["sh", "-c", "kill -9 $$"])).unwrap();
        assert_eq!(out.status, None);
        assert_eq!(out.signal, Some(9));
    }

    #[test]
    fn truncates_output() {
        let out = run(&req(&["sh", "-c", "head -c 70000 /dev/zero | tr '\\0' x"])).unwrap();
        assert!(out.stdout.starts_with("xxxx"));
        assert!(
            out.stdout.ends_with("[agent: truncated, 4464 more bytes]"),
            "{}",
            &out.stdout[out.stdout.len() - 60..]
        );
    }

    #[test]
    fn spawn_failure_names_program() {
        let e = run(&req(&["/nonexistent/prog"])).unwrap_err();
        assert!(matches!(e, RunError::Spawn { .. }));
        assert!(e.to_string().contains("/nonexistent/prog"), "{e}");
        assert!(matches!(run(&req(&[])), Err(RunError::EmptyArgv)));
    }

    #[test]
    fn timeout_kills_the_group() {
        let mut r = req(&["sh", "-c", "sleep 30 & sleep 30"]);
        r.timeout_ms = Some(200);
        let start = Instant::now();
        let e = run(&r).unwrap_err();
        assert!(matches!(e, RunError::TimedOut { .. }), "{e}");
        assert!(e.to_string().contains("timed out after 200 ms"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn background_holder_does_not_block_reply() {
        let start = Instant::now();
        let out = run(&req(&["sh", "-c", "sleep 5 & echo started"])).unwrap();
        assert_eq!(out.stdout, "started\n");
        assert!(start.elapsed() < Duration::from_secs(4));
    }
}
