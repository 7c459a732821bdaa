//! Announcing the MAC after a move, as QEMU's self-announce does
//! (`qemu_announce_self`): gratuitous RARP frames (ethertype 0x8035, broadcast, opcode 3
//! "reverse request", sender and target hardware address = the MAC, IPs 0) so that
//! switches learn the port the MAC moved to. Sent from a thread of their own so that the
//! PF socket (or the migration message) that resumed the device never waits for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::tap::Tap;
use super::Mac;

/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// RARP opcode "reverse request".
pub const RARP_REQUEST_REVERSE: u16 = 3;
/// When each announcement goes out, from the resume.
pub const SCHEDULE: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(150),
];
/// Length of an announcement (the Ethernet minimum without FCS; QEMU's length too).
pub const FRAME_LEN: usize = 60;

/// The gratuitous RARP frame announcing `mac`.
pub fn rarp_frame(mac: &Mac) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&RARP_REQUEST_REVERSE.to_be_bytes());
    f[22..28].copy_from_slice(&mac.0); // sender hardware address
                                       // 28..32: sender IP 0
    f[32..38].copy_from_slice(&mac.0); // target hardware address
                                       // 38..42: target IP 0, then padding
    f
}

/// Sends the announcements of `mac` on `tap` at [`SCHEDULE`] from a new thread,
/// counting each one sent in `sent`.
pub fn spawn(tap: Tap, mac: Mac, sent: Arc<AtomicU64>) {
    let spawned = std::thread::Builder::new()
        .name("vfsim-announce".into())
        .spawn(move || {
            let frame = rarp_frame(&mac);
            let start = std::time::Instant::now();
            for at in SCHEDULE {
                if let Some(wait) = at.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                match tap.send(&frame) {
                    Ok(()) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(tap = tap.name(), %mac, "announced the MAC (gratuitous RARP)");
                    }
                    Err(e) => tracing::warn!(tap = tap.name(), "sending an announcement failed: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("spawning the announcement thread failed: {e}; not announcing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_qemus() {
        let mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let f = rarp_frame(&mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac.0);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac.0);
        assert!(f[38..].iter().all(|b| *b == 0));
    }
}
