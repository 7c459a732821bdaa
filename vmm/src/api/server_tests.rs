//! The API socket against real client sockets, with a test thread as the VM's owner.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::owner::{self, Calls};
use super::protocol::Response;
use super::server::{ApiServer, MAX_LINE};

/// A server whose owner answers every request with its debug text, until dropped.
struct Served {
    server: Option<ApiServer>,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    owner: Option<std::thread::JoinHandle<()>>,
    _dir: Scratch,
}

/// A directory of its own per test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmm-api-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        Scratch(p)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn serve() -> Served {
    let dir = Scratch::new();
    let path = dir.path().join("api.sock");
    let (to, calls) = owner::channel().unwrap();
    let server = ApiServer::start(
        &path,
        to,
        crate::seccomp::Filters::new(crate::seccomp::SeccompMode::Off).unwrap(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let owner = {
        let stop = stop.clone();
        std::thread::spawn(move || run_owner(calls, &stop))
    };
    Served {
        server: Some(server),
        path,
        stop,
        owner: Some(owner),
        _dir: dir,
    }
}

fn run_owner(calls: Calls, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        calls.answer_all(|r| Response::error(format!("{r:?}")));
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(o) = self.owner.take() {
            let _ = o.join();
        }
        self.server.take();
    }
}

fn ask(stream: &mut UnixStream, line: &str) -> String {
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut answer)
        .unwrap();
    answer
}

#[test]
fn a_second_client_is_served_while_the_first_idles() {
    let s = serve();
    let _idle = UnixStream::connect(&s.path).unwrap();
    let mut second = UnixStream::connect(&s.path).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let a = ask(&mut second, r#"{"request":"info"}"#);
    assert!(a.contains("Info"), "{a}");
}

#[test]
fn a_long_line_is_refused_while_it_is_read() {
    let s = serve();
    let mut c = UnixStream::connect(&s.path).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // Far more than the limit, no newline: the server must answer and close long before
    // all of it is sent (a server that buffers to the newline would read it all).
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    let mut refused = false;
    for _ in 0..64 {
        match c.write_all(&chunk) {
            Ok(()) => sent += chunk.len(),
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    assert!(
        refused,
        "the server read {sent} bytes of one line and went on"
    );
    assert!(sent <= 4 * MAX_LINE, "{sent} bytes read before the refusal");
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.contains("longer than 1 MiB"), "{answer:?}");
}

#[test]
fn stopping_does_not_wait_for_a_client_that_never_reads() {
    let mut s = serve();
    let mut c = UnixStream::connect(&s.path).unwrap();
    // Requests whose answers fill the socket buffers, never read.
    let line = format!(
        "{{\"request\":\"mediator\",\"device\":\"{}\",\"command\":\"c\"}}\n",
        "d".repeat(4000)
    );
    c.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    for _ in 0..200 {
        if c.write_all(line.as_bytes()).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    s.server.take();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stopping took {:?}",
        t.elapsed()
    );
}

#[test]
fn the_socket_is_the_owners_alone() {
    let s = serve();
    let mode = std::fs::metadata(&s.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_client_of_another_uid_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to connect as another uid");
        return;
    }
    let s = serve();
    // The socket is 0600: open it to others for this test, so the peer check is what
    // refuses.
    std::fs::set_permissions(&s.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(
        s.path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"])
        .arg(format!(
            "import socket; s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect('{}'); print(s.recv(4096).decode())",
            s.path.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refused a client of uid 65534"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("Info"), "{text}");
}

#[test]
fn a_regular_file_at_the_path_is_not_replaced() {
    let dir = Scratch::new();
    let path = dir.path().join("precious");
    std::fs::write(&path, b"keep").unwrap();
    let (to, _calls) = owner::channel().unwrap();
    let e = ApiServer::start(
        &path,
        to,
        crate::seccomp::Filters::new(crate::seccomp::SeccompMode::Off).unwrap(),
    )
    .err()
    .expect("started over a file");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
}
