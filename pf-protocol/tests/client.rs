//! [`PfClient`] against fake servers on real sockets: every way a call can fail says
//! what failed, and a connection that can no longer be trusted is not used again.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pf_protocol::proto::ErrorKind;
use pf_protocol::{PfClient, PfError};

fn socket(name: &str) -> (PathBuf, UnixListener) {
    let path = std::env::temp_dir().join(format!(
        "pf-protocol-client-{}-{name}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    (path, listener)
}

/// A fake server: reads one line per request and answers with `answer(line)` (None:
/// stay silent; the connection is closed when the list runs out).
fn fake(
    listener: UnixListener,
    answers: Vec<Option<&'static str>>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut seen = Vec::new();
        for a in answers {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            seen.push(line);
            match a {
                Some(text) => w.write_all(text.as_bytes()).unwrap(),
                None => std::thread::sleep(Duration::from_millis(600)),
            }
        }
        seen
    })
}

#[test]
fn connect_failure_names_the_path() {
    let e = PfClient::connect(
        std::path::Path::new("/nonexistent/pf.sock"),
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(matches!(e, PfError::Connect { .. }));
    assert!(e.to_string().contains("/nonexistent/pf.sock"), "{e}");
}

#[test]
fn responses_are_decoded_and_errors_reported() {
    let (path, listener) = socket("ok");
    let server = fake(
        listener,
        vec![
            Some("{\"type\":\"quiesced\",\"in_flight\":0,\"requests_completed\":7}\n"),
            Some("{\"type\":\"dma_log\",\"pages\":[4096,8192]}\n"),
            Some("{\"type\":\"error\",\"kind\":\"refused\",\"message\":\"no way\"}\n"),
            // A response of the wrong type for the request: malformed.
            Some("{\"type\":\"ok\"}\n"),
        ],
    );
    let c = PfClient::connect(&path, Duration::from_secs(2)).unwrap();
    assert_eq!(c.quiesce().unwrap().requests_completed, 7);
    assert_eq!(c.dma_log_take().unwrap(), vec![4096, 8192]);
    match c.resume().unwrap_err() {
        PfError::Device { op, kind, message } => {
            assert_eq!(
                (op, kind, message.as_str()),
                ("resume", ErrorKind::Refused, "no way")
            )
        }
        other => panic!("{other:?}"),
    }
    let e = c.stats().unwrap_err();
    assert!(matches!(e, PfError::Malformed { op: "stats", .. }), "{e}");
    // A wrong-type answer means the pairing is in doubt: the client is done.
    assert!(matches!(c.stats().unwrap_err(), PfError::Broken { .. }));
    let seen = server.join().unwrap();
    assert_eq!(seen[0], "{\"op\":\"quiesce\"}\n");
    assert_eq!(seen[2], "{\"op\":\"resume\"}\n");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_silent_server_times_out_and_the_client_is_broken_afterwards() {
    let (path, listener) = socket("silent");
    let server = fake(listener, vec![None]);
    let c = PfClient::connect(&path, Duration::from_millis(300)).unwrap();
    let t = Instant::now();
    let e = c.get_state().unwrap_err();
    assert!(
        matches!(
            e,
            PfError::Timeout {
                op: "get_state",
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(3));
    let e = c.stats().unwrap_err();
    assert!(matches!(e, PfError::Broken { op: "stats", .. }), "{e}");
    assert!(e.to_string().contains("no response within"), "{e}");
    server.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn garbage_and_a_closed_peer_are_told_apart() {
    let (path, listener) = socket("garbage");
    let server = fake(listener, vec![Some("this is not json\n")]);
    let c = PfClient::connect(&path, Duration::from_secs(2)).unwrap();
    let e = c.stats().unwrap_err();
    assert!(matches!(e, PfError::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("this is not json"), "{e}");
    server.join().unwrap();

    let (path2, listener) = socket("closed");
    let server = fake(listener, vec![]);
    let c = PfClient::connect(&path2, Duration::from_secs(2)).unwrap();
    server.join().unwrap();
    let e = c.resume().unwrap_err();
    assert!(
        matches!(e, PfError::PeerClosed { op: "resume" } | PfError::Io { .. }),
        "{e}"
    );
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path2);
}

#[test]
fn a_response_cut_short_is_a_closed_peer() {
    let (path, listener) = socket("short");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        s.write_all(b"{\"type\":\"stats\",\"requ").unwrap();
        let _ = UnixStream::shutdown(&s, std::net::Shutdown::Both);
    });
    let c = PfClient::connect(&path, Duration::from_secs(2)).unwrap();
    let e = c.stats().unwrap_err();
    assert!(matches!(e, PfError::PeerClosed { op: "stats" }), "{e}");
    server.join().unwrap();
    let _ = std::fs::remove_file(path);
}
