//! The request, response and state types of the PF-side protocol (JSON lines, see the
//! crate documentation for an exchange). They are plain types so that the agent serving
//! the protocol and its clients (mediators, tests) speak it with the same definitions.

use serde::{Deserialize, Serialize};

/// Longest request line the server reads (without its newline); longer lines are
/// skipped and answered with [`ErrorKind::LineTooLong`].
pub const MAX_REQUEST_LINE: usize = 1 << 20;
/// Longest response line the client accepts (a DMA log of a large guest is long).
pub const MAX_RESPONSE_LINE: usize = 256 << 20;
/// The [`VfState::version`] this build writes and accepts.
pub const STATE_VERSION: u32 = 1;
/// Granularity of the DMA write log: addresses are IOVAs rounded down to this.
pub const DMA_LOG_PAGE_SIZE: u64 = 4096;

/// A request, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The function's full state; answered with [`Response::State`]. Allowed at any
    /// time; it is consistent only while quiesced (or with the driver stopped).
    GetState,
    /// Loads a state saved by `get_state`. Allowed while quiesced, or before the driver
    /// started (device status 0); the device is quiesced afterwards, so processing
    /// starts with [`Request::Resume`]. Answered with [`Response::Ok`].
    SetState {
        /// The state to load.
        state: VfState,
    },
    /// Stops taking requests from the available rings once the requests in flight are
    /// complete (used entries and interrupts written); answered with
    /// [`Response::Quiesced`] only then. Doorbells rung while quiesced are not lost.
    Quiesce,
    /// Continues processing, re-checking every ready queue for available entries.
    /// Answered with [`Response::Ok`] (also when the device was not quiesced).
    Resume,
    /// Starts logging the pages the device writes by DMA, with an empty log; answered
    /// with [`Response::Ok`], or an error if logging is already on.
    DmaLogStart,
    /// The pages written since the start or the previous take; answered with
    /// [`Response::DmaLog`], or an error if logging is off.
    DmaLogTake,
    /// Stops logging and drops the log; answered with [`Response::Ok`] (also when
    /// logging was off).
    DmaLogStop,
    /// Counters; answered with [`Response::Stats`].
    Stats,
}

impl Request {
    /// The request's `op` name (for messages).
    pub fn op(&self) -> &'static str {
        match self {
            Request::GetState => "get_state",
            Request::SetState { .. } => "set_state",
            Request::Quiesce => "quiesce",
            Request::Resume => "resume",
            Request::DmaLogStart => "dma_log_start",
            Request::DmaLogTake => "dma_log_take",
            Request::DmaLogStop => "dma_log_stop",
            Request::Stats => "stats",
        }
    }
}

/// A response, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The request was carried out and has nothing to report.
    Ok,
    /// The answer to `get_state`.
    State {
        /// The function's state.
        state: VfState,
    },
    /// The answer to `quiesce`.
    Quiesced(QuiesceReport),
    /// The answer to `dma_log_take`.
    DmaLog {
        /// Guest pages (IOVA rounded down to [`DMA_LOG_PAGE_SIZE`]) the device wrote,
        /// sorted, each once.
        pages: Vec<u64>,
    },
    /// The answer to `stats`.
    Stats(Stats),
    /// The request failed; nothing was changed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What went wrong, for people.
        message: String,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not JSON, names no known `op`, or a field has the wrong type.
    BadRequest,
    /// The line is longer than [`MAX_REQUEST_LINE`]; it was skipped.
    LineTooLong,
    /// The request is not allowed in the device's current state (e.g. `set_state`
    /// while running, `dma_log_take` with logging off).
    Refused,
    /// The state given to `set_state` does not fit this device or is inconsistent.
    InvalidState,
}

/// What `quiesce` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceReport {
    /// Requests taken from the rings and not completed: always 0 once quiesced.
    pub in_flight: u32,
    /// Requests completed since the device was created.
    pub requests_completed: u64,
}

/// Counters and modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests completed since the device was created.
    pub requests_completed: u64,
    /// Doorbells the device saw (several rings between two polls count once).
    pub doorbells: u64,
    /// Whether the device is quiesced.
    pub quiesced: bool,
    /// Whether DMA writes are being logged.
    pub dma_logging: bool,
    /// virtio-net: frames delivered into receive buffers (absent from older agents: 0).
    #[serde(default)]
    pub rx_frames: u64,
    /// virtio-net: frames taken from transmit chains and sent on the tap.
    #[serde(default)]
    pub tx_frames: u64,
    /// virtio-net: received frames dropped because the receive buffer was too short.
    #[serde(default)]
    pub rx_dropped: u64,
    /// virtio-net: transmitted frames the tap did not take (e.g. a tap that is down); their
    /// chains are completed, as a NIC drops what the wire refuses.
    #[serde(default)]
    pub tx_dropped: u64,
    /// virtio-net: gratuitous RARP frames sent to announce the MAC after a move.
    #[serde(default)]
    pub announcements: u64,
}

/// Everything a fresh VF (for vfsim: a fresh vfsim over the same disk image) needs so
/// that a running guest driver continues as if nothing happened: the virtio common
/// configuration, the queues with the device's ring positions, ISR, the PCI registers the
/// driver may have written, the MSI-X table, and the identity the driver saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfState {
    /// Format version, [`STATE_VERSION`].
    pub version: u32,
    /// `device_status`.
    pub device_status: u8,
    /// Features the device offers (checked on load: the target must offer the same).
    pub device_features: u64,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// `config_msix_vector` (0xffff: none).
    pub msix_config: u16,
    /// `config_generation`.
    pub config_generation: u8,
    /// `queue_select` (the driver may be between selecting and programming a queue).
    pub queue_select: u16,
    /// ISR status (read to clear).
    pub isr: u8,
    /// virtio-blk: disk capacity in sectors (checked on load: the device configuration
    /// must not change under the driver). 0 for other device types.
    #[serde(default)]
    pub capacity_sectors: u64,
    /// virtio-blk: the id string `GET_ID` returns (at most 20 bytes), restored on load.
    /// Empty for other device types.
    #[serde(default)]
    pub serial: String,
    /// virtio-net: the device configuration; absent for other device types (and in
    /// states saved before there was a virtio-net function). A state with it loads only
    /// into a virtio-net function with the same MAC; one without it only into a
    /// virtio-blk function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetState>,
    /// PCI configuration registers the driver may write.
    pub pci: PciState,
    /// The MSI-X table, one entry per vector.
    pub msix_table: Vec<MsixEntry>,
    /// The MSI-X pending bits (vector `v` at bit `v`): interrupts the device holds back
    /// while MSI-X is off or the vector masked. Absent in states saved before the device
    /// held any (0).
    #[serde(default)]
    pub msix_pending: u64,
    /// The virtqueues, by index.
    pub queues: Vec<QueueState>,
    /// Requests taken from the rings and not completed. vfsim completes each request
    /// within one processing pass, so this is 0 in every state it gives, and its
    /// `set_state` refuses anything else.
    pub in_flight: u32,
}

/// The virtio-net part of a [`VfState`]: its device configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC address, `xx:xx:xx:xx:xx:xx` (lowercase hex).
    pub mac: String,
    /// The `status` field of the device configuration (`VIRTIO_NET_S_LINK_UP` = 1).
    pub status: u16,
}

/// PCI configuration registers the driver may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    /// The command register.
    pub command: u16,
    /// BAR 0 (64-bit: both dwords, type bits included).
    pub bar0: u64,
    /// The interrupt line register.
    pub interrupt_line: u8,
    /// The MSI-X message control word (enable, function mask).
    pub msix_control: u16,
}

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address (both dwords).
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

/// One split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers (checked on load: the target must offer the same,
    /// since the device configuration's `seg_max` follows from it).
    pub max_size: u16,
    /// `queue_size`.
    pub size: u16,
    /// `queue_enable`.
    pub ready: bool,
    /// `queue_msix_vector` (0xffff: none).
    pub msix_vector: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// The next available-ring index the device consumes.
    pub last_avail_idx: u16,
    /// The used index the device has written (the next used entry goes here).
    pub used_idx: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VfState {
        VfState {
            version: STATE_VERSION,
            device_status: 0x0f,
            device_features: (1 << 32) | (1 << 9) | (1 << 63),
            driver_features: (1 << 32) | (1 << 9),
            device_feature_select: 1,
            driver_feature_select: 0,
            msix_config: 0,
            config_generation: 3,
            queue_select: 0,
            isr: 1,
            capacity_sectors: u64::MAX,
            serial: "vfsim-1234".into(),
            net: None,
            pci: PciState {
                command: 0x0406,
                bar0: 0x0000_0001_e000_0004,
                interrupt_line: 11,
                msix_control: 0x8001,
            },
            msix_table: vec![
                MsixEntry {
                    addr: 0xfee0_0000,
                    data: 0x4021,
                    control: 0,
                },
                MsixEntry {
                    addr: 0xfee0_1000,
                    data: 0x4022,
                    control: 1,
                },
            ],
            msix_pending: 0b10,
            queues: vec![QueueState {
                max_size: 256,
                size: 128,
                ready: true,
                msix_vector: 1,
                desc: 0x1_0000_0000,
                avail: 0x1_0000_0800,
                used: u64::MAX - 0xfff,
                last_avail_idx: 65535,
                used_idx: 65534,
            }],
            in_flight: 0,
        }
    }

    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(v: &T) {
        let line = serde_json::to_string(v).unwrap();
        assert!(!line.contains('\n'), "one line: {line}");
        let back: T = serde_json::from_str(&line).unwrap();
        assert_eq!(&back, v, "{line}");
    }

    fn net_state() -> VfState {
        VfState {
            capacity_sectors: 0,
            serial: String::new(),
            net: Some(NetState {
                mac: "52:54:00:12:34:56".into(),
                status: 1,
            }),
            ..state()
        }
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::GetState,
            Request::SetState { state: state() },
            Request::SetState { state: net_state() },
            Request::Quiesce,
            Request::Resume,
            Request::DmaLogStart,
            Request::DmaLogTake,
            Request::DmaLogStop,
            Request::Stats,
        ] {
            round_trip(&r);
            let v: serde_json::Value = serde_json::to_value(&r).unwrap();
            assert_eq!(v["op"], r.op());
        }
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Ok,
            Response::State { state: state() },
            Response::State { state: net_state() },
            Response::Quiesced(QuiesceReport {
                in_flight: 0,
                requests_completed: u64::MAX,
            }),
            Response::DmaLog {
                pages: vec![0, 0x1000, !0xfff],
            },
            Response::Stats(Stats {
                requests_completed: 5,
                doorbells: 7,
                quiesced: true,
                dma_logging: false,
                rx_frames: 1,
                tx_frames: 2,
                rx_dropped: 3,
                tx_dropped: 4,
                announcements: 3,
            }),
            Response::Error {
                kind: ErrorKind::LineTooLong,
                message: "a \"quoted\"\nmessage".into(),
            },
        ] {
            round_trip(&r);
        }
    }

    #[test]
    fn older_json_still_parses() {
        // Stats and states from before the virtio-net fields.
        let stats: Stats = serde_json::from_str(
            r#"{"requests_completed":1,"doorbells":2,"quiesced":false,"dma_logging":true}"#,
        )
        .unwrap();
        assert_eq!((stats.rx_frames, stats.announcements), (0, 0));
        let mut old = serde_json::to_value(state()).unwrap();
        old.as_object_mut().unwrap().remove("net");
        let back: VfState = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(back, state());
        // A net state may leave out the blk fields.
        let mut net = serde_json::to_value(net_state()).unwrap();
        net.as_object_mut().unwrap().remove("capacity_sectors");
        net.as_object_mut().unwrap().remove("serial");
        assert_eq!(serde_json::from_value::<VfState>(net).unwrap(), net_state());
    }

    #[test]
    fn the_wire_format_is_as_documented() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"dma_log_take"}"#).unwrap(),
            Request::DmaLogTake
        );
        assert_eq!(
            serde_json::to_string(&Response::Quiesced(QuiesceReport {
                in_flight: 0,
                requests_completed: 12
            }))
            .unwrap(),
            r#"{"type":"quiesced","in_flight":0,"requests_completed":12}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Error {
                kind: ErrorKind::BadRequest,
                message: "m".into()
            })
            .unwrap(),
            r#"{"type":"error","kind":"bad_request","message":"m"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Ok).unwrap(),
            r#"{"type":"ok"}"#
        );
        let s = serde_json::to_value(state()).unwrap();
        assert_eq!(s["queues"][0]["last_avail_idx"], 65535);
        assert_eq!(s["pci"]["command"], 0x0406);
        assert!(s.get("net").is_none(), "no net section in a blk state: {s}");
        let n = serde_json::to_value(net_state()).unwrap();
        assert_eq!(n["net"]["mac"], "52:54:00:12:34:56");
        assert_eq!(n["net"]["status"], 1);
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"set_state","state":1}"#).is_err());
    }
}
