//! The control API's messages: one JSON object per line each way.
//!
//! ```text
//! {"request": "info"}
//! {"request": "device-stats"}
//! {"request": "mediator", "device": "vf0", "command": "trap", "args": {"bar": 0, "offset": 4096, "size": 4096}}
//! ```
//! Every response is `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request to the VMM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The VM's configuration and devices. (Empty struct variants, not unit ones: serde
    /// checks unknown fields only for those.)
    Info {},
    /// KVM exit counts, and per device: BAR access counters, trapped ranges, mediator
    /// statistics.
    DeviceStats {},
    /// Stops the vCPUs (devices keep their state).
    Pause {},
    /// Lets the vCPUs run again.
    Resume {},
    /// Writes the VM to a snapshot file; it runs on afterwards unless `paused`.
    Snapshot {
        /// The file.
        path: std::path::PathBuf,
        /// Stay paused after writing.
        #[serde(default)]
        paused: bool,
    },
    /// Starts a live migration to a `vmm --incoming` (`tls:HOST:PORT` or `tcp:HOST:PORT`);
    /// returns at once, follow it with `migration-status`.
    Migrate {
        /// The destination.
        url: String,
        /// For `tls:`: `{"cert": PATH, "key": PATH, "ca": PATH, "server-name": NAME}`
        /// (files this VMM reads; `server-name` defaults to the URL's host).
        #[serde(default)]
        tls: Option<crate::config::tls::MigrationTlsConfig>,
        /// Downtime budget in ms (default 300).
        #[serde(default)]
        downtime_ms: Option<u64>,
        /// Pre-copy's bandwidth cap in MB/s (default: none); stop-and-copy is uncapped.
        #[serde(default)]
        max_bandwidth_mb_s: Option<u64>,
        /// The client will follow the migration with `migration-status`: a completed
        /// source waits (3 s at most) until it was told before exiting, even when the
        /// migration ended before the client's first status request.
        #[serde(default)]
        follow: bool,
    },
    /// Progress of the current or last migration.
    MigrationStatus {},
    /// A step of a device's migration (through its mediator's migration region or another
    /// source): for tests and tools; live migration drives the same interface itself.
    DeviceMigration {
        /// The device's id.
        device: String,
        /// What to do.
        op: MigrationOp,
        /// The file `save` writes and `restore` reads.
        path: Option<std::path::PathBuf>,
    },
    /// A request to the mediator of a `vfio-mediated` device.
    Mediator {
        /// The device's id.
        device: String,
        /// The mediator's command (e.g. `trap`, `untrap`, `stats` for `trace`).
        command: String,
        /// Its arguments.
        #[serde(default)]
        args: Value,
    },
}

/// A device-migration step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationOp {
    /// The device's migration state.
    State,
    /// Starts recording the guest pages the device writes.
    StartDirtyTracking,
    /// Stops recording them.
    StopDirtyTracking,
    /// The pages written since the start or the last take.
    TakeDirtyPages,
    /// Saves the device's state to `path` while the VM runs: pre-copy, then a short
    /// stop-and-copy, then the device runs on.
    Save,
    /// Loads a state saved with `save` from `path` into the device and lets it run.
    Restore,
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// What went wrong, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success with `result`.
    pub fn ok(result: Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A success whose result is `reply` (one of [`super::replies`]).
    pub fn reply<T: Serialize>(reply: &T) -> Self {
        match serde_json::to_value(reply) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(format!("cannot encode the reply: {e}")),
        }
    }

    /// A failure saying `error`.
    pub fn error(error: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
}

/// Parses one request line; the error says what is wrong and what is accepted.
pub fn parse(line: &str) -> Result<Request, super::error::RequestError> {
    serde_json::from_str(line).map_err(super::error::RequestError::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse(r#"{"request":"info"}"#).ok(), Some(Request::Info {}));
        assert_eq!(
            parse(r#"{"request":"mediator","device":"vf0","command":"stats"}"#).ok(),
            Some(Request::Mediator {
                device: "vf0".into(),
                command: "stats".into(),
                args: Value::Null
            })
        );
        assert_eq!(
            parse(r#"{"request":"device-migration","device":"vf0","op":"save","path":"/x"}"#).ok(),
            Some(Request::DeviceMigration {
                device: "vf0".into(),
                op: MigrationOp::Save,
                path: Some("/x".into()),
            })
        );
        for bad in [
            r#"{"request":"device-migration","device":"vf0","op":"fly"}"#,
            "",
            "nope",
            r#"{"request":"reboot"}"#,
            r#"{"request":"info","x":1}"#,
            r#"{"request":"mediator"}"#,
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad request"), "{bad}: {e}");
        }
        let r = serde_json::to_string(&Response::error("x")).unwrap();
        assert_eq!(r, r#"{"ok":false,"error":"x"}"#);
    }
}
