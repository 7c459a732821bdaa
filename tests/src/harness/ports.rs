//! Ports for test listeners.

use std::net::TcpListener;

/// A TCP port free on 127.0.0.1 now (bound and released; another process could take it
/// before the caller binds it, which these tests accept).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
