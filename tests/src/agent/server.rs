//! The request loop: read request lines, dispatch ops, write one reply line per request.

use std::io::{self, Read, Write};
use std::panic::{self, AssertUnwindSafe};

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use super::lines::{Line, LineReader};
use super::mem::{self, MemBuffer};
use super::protocol::{self, Op, PingReply, ProtocolError, MAX_LINE};
use super::workload::{Workload, WorkloadError};
use super::{bar_time, blk, net, poke, refresh, run, sys};

/// Why serving stopped with an error.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Reading requests failed.
    #[error("reading requests failed: {0}")]
    Read(#[source] io::Error),
    /// Writing a reply failed.
    #[error("writing a reply failed: {0}")]
    Write(#[source] io::Error),
}

/// How serving ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The request stream ended.
    Eof,
    /// A `reboot` was acknowledged: the caller drains the channel, syncs and reboots.
    Reboot,
}

/// What the agent does after replying to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Go on serving.
    Continue,
    /// Reboot the machine.
    Reboot,
}

/// The agent's state across requests.
pub struct Server {
    pid1: bool,
    trace: bool,
    mem: Option<MemBuffer>,
    workload: Option<Workload>,
    streams: net::Streams,
}

impl Server {
    /// A server; `pid1` enables the ops that act on the machine (`reboot`, `poke`) and zombie
    /// reaping.
    pub fn new(pid1: bool) -> Self {
        Server {
            pid1,
            trace: false,
            mem: None,
            workload: None,
            streams: net::Streams::default(),
        }
    }

    /// Logs every request line (shortened) to the console when `trace` is set: a debugging
    /// aid, slow on the test guest's serial console.
    pub fn set_trace(&mut self, trace: bool) {
        self.trace = trace;
    }

    /// Serves requests from `input`, replying on `output`, until the input ends or a reboot is
    /// acknowledged.
    pub fn serve<R: Read, W: Write>(
        &mut self,
        input: R,
        mut output: W,
    ) -> Result<ServeEnd, ServeError> {
        let mut lines = LineReader::new(input, MAX_LINE);
        while let Some(line) = lines.next_line().map_err(ServeError::Read)? {
            if self.trace {
                trace_line(&line);
            }
            let (reply, after) = match line {
                Line::TooLong => (
                    protocol::error_reply(None, &ProtocolError::LineTooLong.to_string()),
                    After::Continue,
                ),
                Line::Data(bytes) => match self.handle_line(&bytes) {
                    Some(handled) => handled,
                    None => continue,
                },
            };
            output
                .write_all(reply.as_bytes())
                .and_then(|()| output.flush())
                .map_err(ServeError::Write)?;
            if self.pid1 {
                sys::reap_zombies();
            }
            if after == After::Reboot {
                return Ok(ServeEnd::Reboot);
            }
        }
        Ok(ServeEnd::Eof)
    }

    /// Handles one request line: the reply line (newline included) and what to do after
    /// sending it, or `None` for a blank line.
    pub fn handle_line(&mut self, line: &[u8]) -> Option<(String, After)> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let request = match protocol::parse_request(line) {
            Ok(r) => r,
            Err(e) => {
                return Some((
                    protocol::error_reply(e.id(), &e.to_string()),
                    After::Continue,
                ))
            }
        };
        let name = request.op.name();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| self.dispatch(request.op)));
        Some(match outcome {
            Ok(Ok((result, after))) => (protocol::ok_reply(request.id, result), after),
            Ok(Err(message)) => (
                protocol::error_reply(Some(request.id), &message),
                After::Continue,
            ),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                let message = format!("internal error: {name} panicked: {what}");
                (
                    protocol::error_reply(Some(request.id), &message),
                    After::Continue,
                )
            }
        })
    }

    fn dispatch(&mut self, op: Op) -> Result<(Value, After), String> {
        let value = match op {
            Op::Ping => to_value(PingReply {
                kernel: sys::kernel_release(),
                uptime_ms: sys::uptime_ms(),
                cpus: sys::online_cpus(),
            }),
            Op::Run(req) => to_value(run::run(&req).map_err(|e| e.to_string())?),
            Op::Reboot => {
                if !self.pid1 {
                    return Err("reboot is only available as PID 1".to_owned());
                }
                return Ok((Value::Null, After::Reboot));
            }
            Op::Poke(req) => {
                if !self.pid1 {
                    return Err(
                        "poke is only available as PID 1 (refusing to poke this machine's hardware)"
                            .to_owned(),
                    );
                }
                to_value(poke::poke(&req).map_err(|e| format!("poke: {e}"))?)
            }
            Op::BlkWrite(req) => {
                to_value(blk::blk_write(&req).map_err(|e| format!("blk_write: {e}"))?)
            }
            Op::BlkVerify(req) => {
                to_value(blk::blk_verify(&req).map_err(|e| format!("blk_verify: {e}"))?)
            }
            Op::BarTime(req) => {
                if !self.pid1 {
                    return Err("bar_time is only available as PID 1".to_owned());
                }
                to_value(bar_time::bar_time(&req).map_err(|e| format!("bar_time: {e}"))?)
            }
            Op::Checksum(req) => {
                to_value(blk::checksum(&req).map_err(|e| format!("checksum: {e}"))?)
            }
            Op::MemFill(req) => {
                let (buffer, reply) =
                    mem::mem_fill(&req, self.mem.take()).map_err(|e| e.to_string())?;
                self.mem = Some(buffer);
                to_value(reply)
            }
            Op::MemCheck => to_value(mem::mem_check(self.mem.as_ref()).map_err(|e| e.to_string())?),
            Op::WorkloadStart(req) => {
                if self.workload.is_some() {
                    return Err(format!("workload_start: {}", WorkloadError::AlreadyRunning));
                }
                let workload = Workload::start(&req).map_err(|e| format!("workload_start: {e}"))?;
                let status = workload.status();
                self.workload = Some(workload);
                to_value(status)
            }
            Op::WorkloadStatus => to_value(
                self.workload
                    .as_ref()
                    .map(Workload::status)
                    .unwrap_or_default(),
            ),
            Op::WorkloadVerify(req) => to_value(
                self.workload_mut("workload_verify")?
                    .verify(&req)
                    .map_err(|e| format!("workload_verify: {e}"))?,
            ),
            Op::WorkloadCorruptMem(req) => to_value(
                self.workload_mut("workload_corrupt_mem")?
                    .corrupt_mem(&req)
                    .map_err(|e| format!("workload_corrupt_mem: {e}"))?,
            ),
            Op::Refresh(req) => {
                if !self.pid1 {
                    return Err("refresh is only available as PID 1 (it sets the clock)".to_owned());
                }
                to_value(refresh::refresh(&req).map_err(|e| format!("refresh: {e}"))?)
            }
            Op::NetIfaces => to_value(net::ifaces().map_err(|e| format!("net_ifaces: {e}"))?),
            Op::NetConfig(req) => {
                to_value(net::config(&req).map_err(|e| format!("net_config: {e}"))?)
            }
            Op::NetStreamStart(req) => to_value(
                self.streams
                    .start(&req)
                    .map_err(|e| format!("net_stream_start: {e}"))?,
            ),
            Op::NetStreamStatus(req) => to_value(
                self.streams
                    .status(req.handle)
                    .map_err(|e| format!("net_stream_status: {e}"))?,
            ),
            Op::NetStreamHold(req) => to_value(
                self.streams
                    .hold(req.handle, std::time::Duration::from_millis(req.ms))
                    .map_err(|e| format!("net_stream_hold: {e}"))?,
            ),
            Op::NetStreamFinish(req) => to_value(
                self.streams
                    .finish(&req)
                    .map_err(|e| format!("net_stream_finish: {e}"))?,
            ),
            Op::WorkloadStop => {
                let Some(workload) = self.workload.take() else {
                    return Err(format!("workload_stop: {}", WorkloadError::NotRunning));
                };
                to_value(workload.stop().map_err(|e| format!("workload_stop: {e}"))?)
            }
        };
        Ok((value, After::Continue))
    }
}

impl Server {
    fn workload_mut(&mut self, op: &str) -> Result<&mut Workload, String> {
        self.workload
            .as_mut()
            .ok_or_else(|| format!("{op}: {}", WorkloadError::NotRunning))
    }
}

fn trace_line(line: &Line) {
    let text = match line {
        Line::TooLong => "(line too long)".to_owned(),
        Line::Data(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            text.chars().take(120).collect()
        }
    };
    super::pid1::console(&format!("request: {text}"));
}

fn to_value<T: Serialize>(reply: T) -> Value {
    // Reply types are plain structs of numbers and strings: serialization cannot fail.
    serde_json::to_value(reply)
        .unwrap_or_else(|e| Value::String(format!("unserializable reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn serve(input: &[u8]) -> (Vec<serde_json::Value>, ServeEnd) {
        let mut out = Vec::new();
        let end = Server::new(false).serve(input, &mut out).unwrap();
        let replies = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        (replies, end)
    }

    #[test]
    fn replies_in_order_and_survives_garbage() {
        let mut input =
            b"{\"id\":1,\"op\":\"ping\"}\n\n  \ngarbage\n{\"id\":2,\"op\":\"nope\"}\n".to_vec();
        input.extend(vec![b'x'; MAX_LINE + 10]);
        input.extend(b"\n{\"id\":3,\"op\":\"run\",\"argv\":[\"true\"]}\n{\"id\":4,\"op\":\"pi");
        let (replies, end) = serve(&input);
        assert_eq!(end, ServeEnd::Eof);
        assert_eq!(replies.len(), 6, "{replies:?}");
        assert_eq!(replies[0]["id"], 1);
        assert_eq!(replies[0]["ok"], true);
        assert!(replies[0]["cpus"].as_u64().unwrap() >= 1);
        assert_eq!(
            replies[1],
            json!({"id": null, "ok": false, "error": replies[1]["error"]})
        );
        assert_eq!(replies[2]["id"], 2);
        assert_eq!(replies[2]["ok"], false);
        assert_eq!(replies[3]["id"], serde_json::Value::Null);
        assert!(replies[3]["error"]
            .as_str()
            .unwrap()
            .contains("longer than"));
        assert_eq!(replies[4]["status"], 0);
        assert_eq!(replies[5]["id"], serde_json::Value::Null);
    }

    #[test]
    fn machine_ops_refused_outside_pid1() {
        let (replies, end) =
            serve(b"{\"id\":1,\"op\":\"reboot\"}\n{\"id\":2,\"op\":\"poke\",\"ports\":[128]}\n");
        assert_eq!(end, ServeEnd::Eof);
        assert!(replies[0]["error"]
            .as_str()
            .unwrap()
            .contains("only available as PID 1"));
        assert!(replies[1]["error"]
            .as_str()
            .unwrap()
            .contains("only available as PID 1"));
    }

    #[test]
    fn reboot_as_pid1_stops_serving_after_reply() {
        let mut server = Server::new(true);
        let mut out = Vec::new();
        let input: &[u8] = b"{\"id\":1,\"op\":\"reboot\"}\n{\"id\":2,\"op\":\"ping\"}\n";
        assert_eq!(server.serve(input, &mut out).unwrap(), ServeEnd::Reboot);
        assert_eq!(out, b"{\"id\":1,\"ok\":true}\n");
    }

    #[test]
    fn mem_state_is_kept() {
        let mut server = Server::new(false);
        let (reply, _) = server
            .handle_line(b"{\"id\":1,\"op\":\"mem_check\"}")
            .unwrap();
        assert!(reply.contains("mem_fill first"));
        let (fill, _) = server
            .handle_line(b"{\"id\":2,\"op\":\"mem_fill\",\"mib\":1,\"seed\":3}")
            .unwrap();
        let fill: Value = serde_json::from_str(&fill).unwrap();
        let (check, _) = server
            .handle_line(b"{\"id\":3,\"op\":\"mem_check\"}")
            .unwrap();
        let check: Value = serde_json::from_str(&check).unwrap();
        assert_eq!(check["intact"], true);
        assert_eq!(check["crc"], fill["crc"]);
    }

    #[test]
    fn net_ops_are_dispatched() {
        let mut server = Server::new(false);
        let (reply, _) = server
            .handle_line(b"{\"id\":1,\"op\":\"net_ifaces\"}")
            .unwrap();
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        assert!(reply["ifaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "lo" && i["loopback"] == true));
        let (reply, _) = server
            .handle_line(b"{\"id\":2,\"op\":\"net_stream_status\",\"handle\":9}")
            .unwrap();
        assert!(
            reply.contains("net_stream_status: no stream with handle 9"),
            "{reply}"
        );
        let (reply, _) = server
            .handle_line(b"{\"id\":3,\"op\":\"net_stream_start\",\"peer\":\"x\",\"seed\":1}")
            .unwrap();
        assert!(reply.contains("bad peer"), "{reply}");
    }
}
