//! A LAN for the NIC migration tests: two "hosts" and a traffic peer on one Ethernet segment,
//! so a guest's NIC (a tap made by vfsim in the host it runs on) keeps its network when the
//! guest moves from host A to host B.
//!
//! ```text
//!   host A ns                      lan ns                      host B ns
//!   [tap]--br0--lan0 ===veth=== a0--br0--b0 ===veth=== lan0--br0--[tap]
//!                                    |
//!                                    p0 ===veth=== eth0 10.78.0.100/24   peer ns
//!   veth0 10.77.0.1/24 ========================================= veth0 10.77.0.2/24
//!                         (the NetnsPair link: the migration path)
//! ```
//!
//! Hosts A and B are a [`NetnsPair`] (its veth link carries the migration); the `lan`
//! namespace's bridge joins a veth from each host and one from the peer; in each host a local
//! bridge joins that veth and the host's tap. vfsim creates its tap (`--net-tap NAME`) in the
//! namespace it runs in, so call [`Lan::attach_tap`] once it is up, or make a persistent tap
//! first with [`Lan::create_tap`] for vfsim to attach to. The guest takes [`GUEST_ADDR`] and
//! talks to the peer at [`PEER_ADDR`]; [`Lan::bridge_fdb`] says on which side the LAN
//! bridge has learned a MAC (after a migration's announce: host B). Needs root, `ip` and
//! `bridge` (iproute2).

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::netns::{self, enter, run_ip, NetnsError, NetnsPair, Side, NETNS_DIR};

/// The peer's address on the LAN.
pub const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 100);
/// The address a guest on the LAN takes.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// Prefix length of the LAN's subnet.
pub const LAN_PREFIX_LEN: u8 = 24;
/// The bridge in the lan namespace and in each host namespace.
pub const BRIDGE: &str = "br0";
/// Each host's veth into the lan namespace.
pub const HOST_UPLINK: &str = "lan0";
/// The peer's interface.
pub const PEER_IFACE: &str = "eth0";

/// How long [`Lan::create`] and [`Lan::attach_tap`] wait for a bridge port to forward.
pub const PORT_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// A namespace of the LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Host A (the pair's side A: the source of a migration).
    A,
    /// Host B (the pair's side B).
    B,
    /// The traffic peer.
    Peer,
    /// The namespace of the LAN bridge itself.
    Lan,
}

impl From<Side> for Host {
    fn from(side: Side) -> Host {
        match side {
            Side::A => Host::A,
            Side::B => Host::B,
        }
    }
}

/// The LAN bridge's port for a host's (or the peer's) veth.
fn lan_port(host: Host) -> &'static str {
    match host {
        Host::A => "a0",
        Host::B => "b0",
        Host::Peer => "p0",
        Host::Lan => BRIDGE,
    }
}

/// Hosts A and B, the peer and the LAN between them; all deleted on drop.
#[derive(Debug)]
pub struct Lan {
    ip: PathBuf,
    peer: String,
    lan: String,
    created: [bool; 2],
    pair: NetnsPair,
}

impl Lan {
    /// Creates the namespaces (`<prefix>-<pid>-<n>-{a,b,p,l}`), veths, bridges and addresses.
    pub fn create(prefix: &str) -> Result<Self, NetnsError> {
        let pair = NetnsPair::create(prefix)?;
        let base = pair
            .name(Side::A)
            .strip_suffix("-a")
            .expect("pair names end in -a")
            .to_owned();
        let mut lan = Lan {
            ip: PathBuf::from("ip"),
            peer: format!("{base}-p"),
            lan: format!("{base}-l"),
            created: [false; 2],
            pair,
        };
        for (i, name) in [lan.peer.clone(), lan.lan.clone()].iter().enumerate() {
            if Path::new(NETNS_DIR).join(name).exists() {
                let _ = lan.ip(&["netns", "del", name]);
            }
            lan.ip(&["netns", "add", name])?;
            lan.created[i] = true;
        }
        let l = lan.lan.clone();
        lan.ip(&["-n", &l, "link", "add", BRIDGE, "type", "bridge"])?;
        lan.ip(&["-n", &l, "link", "set", BRIDGE, "up"])?;
        lan.ip(&["-n", &l, "link", "set", "lo", "up"])?;
        for host in [Host::A, Host::B] {
            let h = lan.name(host).to_owned();
            let port = lan_port(host);
            lan.ip(&[
                "link",
                "add",
                port,
                "netns",
                &l,
                "type",
                "veth",
                "peer",
                "name",
                HOST_UPLINK,
                "netns",
                &h,
            ])?;
            lan.ip(&["-n", &l, "link", "set", port, "master", BRIDGE, "up"])?;
            lan.ip(&["-n", &h, "link", "add", BRIDGE, "type", "bridge"])?;
            lan.ip(&["-n", &h, "link", "set", HOST_UPLINK, "master", BRIDGE, "up"])?;
            lan.ip(&["-n", &h, "link", "set", BRIDGE, "up"])?;
        }
        let p = lan.peer.clone();
        let port = lan_port(Host::Peer);
        lan.ip(&[
            "link", "add", port, "netns", &l, "type", "veth", "peer", "name", PEER_IFACE, "netns",
            &p,
        ])?;
        lan.ip(&["-n", &l, "link", "set", port, "master", BRIDGE, "up"])?;
        let cidr = format!("{PEER_ADDR}/{LAN_PREFIX_LEN}");
        lan.ip(&["-n", &p, "addr", "add", &cidr, "dev", PEER_IFACE])?;
        lan.ip(&["-n", &p, "link", "set", PEER_IFACE, "up"])?;
        lan.ip(&["-n", &p, "link", "set", "lo", "up"])?;
        for host in [Host::A, Host::B, Host::Peer] {
            lan.wait_forwarding(Host::Lan, lan_port(host), PORT_UP_TIMEOUT)?;
        }
        for host in [Host::A, Host::B] {
            lan.wait_forwarding(host, HOST_UPLINK, PORT_UP_TIMEOUT)?;
        }
        Ok(lan)
    }

    /// The two hosts and their direct link (the migration path).
    pub fn pair(&self) -> &NetnsPair {
        &self.pair
    }

    /// A namespace's name.
    pub fn name(&self, host: Host) -> &str {
        match host {
            Host::A => self.pair.name(Side::A),
            Host::B => self.pair.name(Side::B),
            Host::Peer => &self.peer,
            Host::Lan => &self.lan,
        }
    }

    /// The address a host has on the migration link (see [`NetnsPair::addr`]).
    pub fn migration_addr(&self, side: Side) -> Ipv4Addr {
        self.pair.addr(side)
    }

    /// The peer's address on the LAN ([`PEER_ADDR`]).
    pub fn peer_addr(&self) -> Ipv4Addr {
        PEER_ADDR
    }

    /// The address a guest on the LAN takes ([`GUEST_ADDR`]).
    pub fn guest_addr(&self) -> Ipv4Addr {
        GUEST_ADDR
    }

    /// A command running `program` in the namespace (`ip netns exec NAME program`).
    pub fn command<S: AsRef<OsStr>>(&self, host: Host, program: S) -> Command {
        let mut cmd = Command::new(&self.ip);
        cmd.args([OsStr::new("netns"), OsStr::new("exec")])
            .arg(self.name(host))
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread inside the namespace (see [`NetnsPair::within`]).
    pub fn within<T, F>(&self, host: Host, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        enter(self.name(host), f)
    }

    /// Runs `ip -n NAME ARGS`: its output, or an error with its stderr.
    pub fn ip_in(&self, host: Host, args: &[&str]) -> Result<Output, NetnsError> {
        let name = self.name(host).to_owned();
        let mut all = vec!["-n", name.as_str()];
        all.extend_from_slice(args);
        self.ip(&all)
    }

    /// Adds tap `tap` (made by vfsim in the host's namespace) to the host's bridge, brings it
    /// up and waits until the bridge forwards to it.
    pub fn attach_tap(&self, side: Side, tap: &str) -> Result<(), NetnsError> {
        self.ip_in(side.into(), &["link", "set", tap, "master", BRIDGE])?;
        self.ip_in(side.into(), &["link", "set", tap, "up"])?;
        self.wait_forwarding(side.into(), tap, PORT_UP_TIMEOUT)
    }

    /// The state of bridge port `port` in namespace `host` (`forwarding`, `disabled`, ...).
    pub fn port_state(&self, host: Host, port: &str) -> Result<String, NetnsError> {
        let out = self.ip(&[
            "netns",
            "exec",
            self.name(host),
            "bridge",
            "link",
            "show",
            "dev",
            port,
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        Ok(words
            .find(|w| *w == "state")
            .and_then(|_| words.next())
            .unwrap_or("unknown")
            .to_owned())
    }

    /// Waits until bridge port `port` forwards: a port enters the forwarding state only once
    /// the kernel's link watch has seen its carrier, up to about a second after it came up.
    pub fn wait_forwarding(
        &self,
        host: Host,
        port: &str,
        timeout: Duration,
    ) -> Result<(), NetnsError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.port_state(host, port)?;
            if state == "forwarding" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NetnsError::Ip {
                    command: format!("bridge link show dev {port} (in {})", self.name(host)),
                    status: "timed out".into(),
                    stderr: format!("port still {state} after {} ms", timeout.as_millis()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates a persistent tap `tap` in the host (`ip tuntap add mode tap`) in the host's
    /// bridge: vfsim's `--net-tap` then opens it instead of making one. Its carrier is down
    /// (the port disabled) until a process has it open: [`Lan::wait_forwarding`] after that.
    pub fn create_tap(&self, side: Side, tap: &str) -> Result<(), NetnsError> {
        self.ip_in(side.into(), &["tuntap", "add", "dev", tap, "mode", "tap"])?;
        self.ip_in(side.into(), &["link", "set", tap, "master", BRIDGE])?;
        self.ip_in(side.into(), &["link", "set", tap, "up"])?;
        Ok(())
    }

    /// The bridge forwarding entries of namespace `host`'s bridge (`bridge fdb show br br0`).
    pub fn fdb(&self, host: Host) -> Result<String, NetnsError> {
        let mut cmd = vec![
            "netns",
            "exec",
            self.name(host),
            "bridge",
            "fdb",
            "show",
            "br",
        ];
        cmd.push(BRIDGE);
        let out = self.ip(&cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Where the LAN bridge sends frames for `mac` (`aa:bb:..`, any case): the host behind
    /// the port that learned it, or `None` when it is not (or no longer) learned.
    pub fn bridge_fdb(&self, mac: &str) -> Result<Option<Host>, NetnsError> {
        Ok(learned_port(&self.fdb(Host::Lan)?, mac).and_then(|port| {
            [Host::A, Host::B, Host::Peer]
                .into_iter()
                .find(|h| lan_port(*h) == port)
        }))
    }

    fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        run_ip(&self.ip, args)
    }
}

/// The port a learned (not permanent) entry for `mac` points at, in `bridge fdb show` output.
pub fn learned_port(fdb: &str, mac: &str) -> Option<String> {
    let mac = mac.to_ascii_lowercase();
    fdb.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first().map(|w| w.to_ascii_lowercase()) != Some(mac.clone())
            || words.contains(&"permanent")
            || words.contains(&"self")
        {
            return None;
        }
        let dev = words.iter().position(|w| *w == "dev")?;
        words.get(dev + 1).map(|s| (*s).to_owned())
    })
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting the lan namespace removes every veth into it; the pair deletes itself.
        for (i, name) in [&self.peer, &self.lan].into_iter().enumerate() {
            if self.created[i] {
                if let Err(e) = run_ip(&self.ip, &["netns", "del", name]) {
                    eprintln!("warning: {e}");
                }
            }
        }
    }
}

/// Whether namespace `name` exists (for cleanup checks).
pub fn namespace_exists(name: &str) -> bool {
    netns::list_namespaces().is_ok_and(|l| l.iter().any(|n| n == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_learned_ports() {
        let fdb = "\
33:33:00:00:00:01 dev a0 self permanent
52:54:00:12:34:56 dev a0 master br0 permanent
52:54:00:00:00:02 dev b0 master br0
01:00:5e:00:00:01 dev br0 self permanent
";
        assert_eq!(
            learned_port(fdb, "52:54:00:00:00:02").as_deref(),
            Some("b0")
        );
        assert_eq!(
            learned_port(fdb, "52:54:00:00:00:02".to_uppercase().as_str()).as_deref(),
            Some("b0")
        );
        assert_eq!(learned_port(fdb, "52:54:00:12:34:56"), None);
        assert_eq!(learned_port(fdb, "aa:bb:cc:dd:ee:ff"), None);
        assert_eq!(Host::from(Side::B), Host::B);
    }
}
