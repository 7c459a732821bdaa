//! The virtio-net personality (virtio 1.x section 5.1): a NIC whose wire is a Linux tap.
//! Features: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS`,
//! `VIRTIO_NET_F_MRG_RXBUF`; no offloads, no control queue. Every buffer starts with the
//! 12-byte `virtio_net_hdr_v1` (all zero but `num_buffers` = 1 on receive). Mergeable
//! receive buffers are offered because NICs' drivers use them (Linux then posts page
//! fragments it never writes and copies only a frame's first bytes out, so a frame's data
//! stays in the pages the device wrote until the application reads it); a frame always
//! takes one buffer, since Linux sizes each at least MTU + headers.
//!
//! - queue 0, receiveq: a frame read from the tap goes into the next available chain
//!   (header, then the frame); a chain too short drops the frame (counted). Frames are
//!   read from the tap only while a chain is available, so they wait in the tap's own
//!   queue meanwhile (and while quiesced).
//! - queue 1, transmitq: each chain is a header and a frame in device-readable buffers;
//!   the frame goes to the tap. A chain with device-writable buffers, without a whole
//!   header, or with a frame over 65535 bytes marks the device `DEVICE_NEEDS_RESET`.
//!
//! - [`tap`]: opening the tap;
//! - [`announce`]: the gratuitous RARP frames sent after a move.

pub mod announce;
pub mod tap;

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pf_protocol::proto::{NetState, Stats, VfState};

use crate::common_cfg::VIRTIO_F_VERSION_1;
use crate::guest_mem::GuestMemory;
use crate::layout::{Identity, NET_IDENTITY};
use crate::personality::{DeviceConfig, Personality, Ring};
use crate::virtqueue::{gather, scatter, Chain, Queue, QueueError};

use tap::Tap;

/// `VIRTIO_NET_F_MAC`: the device configuration holds the MAC.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the device configuration holds the link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_F_MRG_RXBUF`: the header's `num_buffers` says how many receive buffers a
/// frame took (here always 1).
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// Features the virtio-net function offers.
pub const NET_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF;
/// `VIRTIO_NET_S_LINK_UP`.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Size of `struct virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
/// Largest frame taken from a transmit chain (and read from the tap).
pub const MAX_FRAME: usize = 65535;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The MAC used unless one is given (locally administered, QEMU's prefix).
pub const DEFAULT_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

/// A MAC address, written `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || {
            format!("{s:?} is not a MAC address: expected six two-digit hex bytes separated by ':', e.g. 52:54:00:12:34:56")
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "{s} is a multicast address (lowest bit of the first byte set); a NIC needs a unicast MAC"
            ));
        }
        Ok(Mac(mac))
    }
}

/// Counters, shared with the announcement thread.
#[derive(Debug, Default)]
struct Counters {
    rx_frames: AtomicU64,
    tx_frames: AtomicU64,
    rx_dropped: AtomicU64,
    tx_dropped: AtomicU64,
    announcements: Arc<AtomicU64>,
}

/// The virtio-net personality over a tap.
#[derive(Debug)]
pub struct NetFunction {
    tap: Tap,
    mac: Mac,
    status: u16,
    counters: Counters,
    /// One frame, read from the tap.
    buf: Vec<u8>,
}

impl NetFunction {
    /// The function with `mac` on `tap`, link up.
    pub fn new(tap: Tap, mac: Mac) -> Self {
        NetFunction {
            tap,
            mac,
            status: VIRTIO_NET_S_LINK_UP,
            counters: Counters::default(),
            buf: vec![0; MAX_FRAME],
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// Delivers frames waiting in the tap into receive chains while both last.
    fn receive(&mut self, ring: &mut Ring<'_>) -> Result<(), QueueError> {
        while ring.has_available()? {
            let len = match self.tap.recv(&mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(tap = self.tap.name(), "reading a frame failed: {e}");
                    break;
                }
            };
            let Some(chain) = ring.pop()? else {
                break;
            };
            if !chain.readable.is_empty() {
                return Err(malformed(
                    &chain,
                    "a receive chain has device-readable buffers",
                ));
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
            let frame = &self.buf[..len];
            let used = match scatter(ring.mem(), &chain.writable, &[&hdr, frame]) {
                Ok(()) => {
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    (NET_HDR_LEN + len) as u32
                }
                Err(why) => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(head = chain.head, len, "received frame dropped: {why}");
                    0
                }
            };
            ring.complete(chain.head, used)?;
        }
        Ok(())
    }

    /// Sends the frame of every available transmit chain.
    fn transmit(&mut self, ring: &mut Ring<'_>) -> Result<(), QueueError> {
        while let Some(chain) = ring.pop()? {
            if !chain.writable.is_empty() {
                return Err(malformed(
                    &chain,
                    "a transmit chain has device-writable buffers",
                ));
            }
            let total = chain.readable_len();
            if total < NET_HDR_LEN as u64 {
                return Err(malformed(
                    &chain,
                    &format!("{total} bytes are shorter than the {NET_HDR_LEN}-byte header"),
                ));
            }
            let len = total - NET_HDR_LEN as u64;
            if len > MAX_FRAME as u64 {
                return Err(malformed(
                    &chain,
                    &format!("a frame of {len} bytes is longer than {MAX_FRAME}"),
                ));
            }
            let frame = &mut self.buf[..len as usize];
            gather(ring.mem(), &chain.readable, NET_HDR_LEN as u64, frame)
                .map_err(|why| malformed(&chain, &why))?;
            match self.tap.send(frame) {
                Ok(()) => {
                    self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                }
                // A NIC drops what the wire does not take (a tap that is down answers
                // EIO), counts it, and completes the chain.
                Err(e) => {
                    self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(tap = self.tap.name(), "sending a frame failed: {e}");
                }
            }
            ring.complete(chain.head, 0)?;
        }
        Ok(())
    }
}

fn malformed(chain: &Chain, why: &str) -> QueueError {
    QueueError::Malformed {
        head: chain.head,
        why: why.into(),
    }
}

impl Personality for NetFunction {
    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn identity(&self) -> &'static Identity {
        &NET_IDENTITY
    }

    fn features(&self) -> u64 {
        NET_FEATURES
    }

    /// `struct virtio_net_config`: `mac[6]`, `status`.
    fn device_config(&self, _max_queue_size: u16) -> DeviceConfig {
        let mut c = [0u8; std::mem::size_of::<DeviceConfig>()];
        c[0..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&self.status.to_le_bytes());
        c
    }

    fn serve(&mut self, index: usize, ring: &mut Ring<'_>) -> Result<(), QueueError> {
        match index {
            RX_QUEUE => self.receive(ring),
            TX_QUEUE => self.transmit(ring),
            _ => Ok(()),
        }
    }

    /// The tap, while the receive queue has a chain to fill.
    fn wake_fd(&self, queues: &[Queue], mem: &GuestMemory) -> Option<RawFd> {
        let rx = queues.get(RX_QUEUE)?;
        (rx.ready && rx.has_work(mem).unwrap_or(false)).then(|| self.tap.raw_fd())
    }

    fn save(&self, state: &mut VfState) {
        state.net = Some(NetState {
            mac: self.mac.to_string(),
            status: self.status,
        });
    }

    fn check(&self, state: &VfState) -> Result<(), String> {
        let Some(net) = &state.net else {
            return Err(
                "the state is of a virtio-blk function (it has no net section), this is a virtio-net function"
                    .into(),
            );
        };
        let mac: Mac = net.mac.parse()?;
        if mac != self.mac {
            return Err(format!(
                "the state comes from a NIC with MAC {mac}, this one has {} (see --mac)",
                self.mac
            ));
        }
        if net.status & !VIRTIO_NET_S_LINK_UP != 0 {
            return Err(format!(
                "net status {:#x} has bits other than LINK_UP",
                net.status
            ));
        }
        Ok(())
    }

    fn load(&mut self, state: &VfState) {
        if let Some(net) = &state.net {
            self.status = net.status;
        }
    }

    fn resumed_after_load(&mut self) {
        match self.tap.try_clone() {
            Ok(tap) => announce::spawn(tap, self.mac, self.counters.announcements.clone()),
            Err(e) => tracing::warn!(
                tap = self.tap.name(),
                "duplicating the tap for announcements failed: {e}; not announcing"
            ),
        }
    }

    fn stats(&self, stats: &mut Stats) {
        let c = &self.counters;
        stats.rx_frames = c.rx_frames.load(Ordering::Relaxed);
        stats.tx_frames = c.tx_frames.load(Ordering::Relaxed);
        stats.rx_dropped = c.rx_dropped.load(Ordering::Relaxed);
        stats.tx_dropped = c.tx_dropped.load(Ordering::Relaxed);
        stats.announcements = c.announcements.load(Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5254.00ab.cd0f",
            "52:54:00:ab:cd:g0",
            "52:54:0:ab:cd:0f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!("01:00:5e:00:00:01"
            .parse::<Mac>()
            .unwrap_err()
            .contains("multicast"));
    }
}
