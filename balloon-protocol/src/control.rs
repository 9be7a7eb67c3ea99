//! balloon-backend's control protocol (`docs/control-protocol.md`): one
//! request object per line, one reply object per line; and a client for it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::lines::{Limits, LineConnection, LineCounters, LineError};

/// One control request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {},
    SetTarget {
        bytes: u64,
        /// An operator's target (`balloonctl set`): until `unpin`, the
        /// backend refuses targets that do not pin, so host-policy cannot
        /// undo it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pin: bool,
    },
    /// Releases an operator's pin: host-policy manages the target again.
    Unpin {},
    RefreshStats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
}

/// Parses one request line; the error text is what the reply says.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|error| format!("bad request: {error}"))
}

/// The guest's statistics as the device last received them. Each value is
/// `None` when the guest did not send that tag. Swap figures are bytes, as
/// the Linux driver reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub available_bytes: Option<u64>,
    pub disk_caches_bytes: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    pub oom_kills: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub async_scans: Option<u64>,
    pub direct_scans: Option<u64>,
    pub async_reclaims: Option<u64>,
    pub direct_reclaims: Option<u64>,
    /// When the device last received these values (Unix time, milliseconds).
    pub updated_unix_ms: u64,
    /// The balloon's size (the guest's `actual`) when these values arrived:
    /// memory a later step takes is not yet out of `available_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_bytes: Option<u64>,
}

/// The reply to `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub ok: bool,
    pub connected: bool,
    pub guest_ram_bytes: u64,
    pub target_bytes: u64,
    pub actual_bytes: u64,
    pub max_reclaim_bytes: u64,
    pub max_reclaim_percent: u8,
    pub ballooned_bytes: u64,
    pub discarded_bytes: u64,
    /// Wholly ballooned memory whose punch is deferred (at most 20 ms).
    #[serde(default)]
    pub pending_punch_bytes: u64,
    pub reported_bytes_total: u64,
    pub guest_ram_resident_bytes: Option<u64>,
    pub features: Vec<String>,
    pub config_notify: bool,
    pub stats: Option<GuestStats>,
    /// Non-zero fault counters by name.
    pub errors: BTreeMap<String, u64>,
    /// An operator pinned the target (`set-target` with `pin`).
    #[serde(default)]
    pub pinned: bool,
    /// CPU time spent inside the calls that free guest RAM (the kernel's
    /// work of returning memory), microseconds since start.
    #[serde(default)]
    pub discard_cpu_us: u64,
}

/// The reply to `set-target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTargetReply {
    pub ok: bool,
    pub target_bytes: u64,
    pub clamped: bool,
    pub notified: bool,
    /// The target is pinned (this request pinned it).
    #[serde(default)]
    pub pinned: bool,
}

/// The reply to `unpin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpinReply {
    pub ok: bool,
    /// Whether the target was pinned before.
    pub was_pinned: bool,
}

/// The reply to `refresh-stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshStatsReply {
    pub ok: bool,
    pub stats: GuestStats,
}

/// The reply to a request that failed; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub ok: bool,
    pub error: String,
}

impl ErrorReply {
    pub fn new(error: impl Into<String>) -> Self {
        ErrorReply {
            ok: false,
            error: error.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Line(#[from] LineError),
    #[error("{path} sent an unreadable reply: {source}")]
    Reply {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path} refused: {message}")]
    Refused { path: String, message: String },
}

/// A client of one backend's control socket. Requests and replies pair up
/// in order; after any error the connection should be dropped, since a late
/// reply would answer the wrong request.
pub struct ControlClient {
    conn: LineConnection,
    timeout: Duration,
}

impl ControlClient {
    /// Connects; every later request waits at most `timeout` for its reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ControlError> {
        Ok(ControlClient {
            conn: LineConnection::connect(path, Limits::default())?,
            timeout,
        })
    }

    pub fn path(&self) -> &str {
        self.conn.path()
    }

    /// How long later requests wait for their reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn counters(&self) -> LineCounters {
        self.conn.counters()
    }

    /// Sends a request without waiting for the reply, so that requests to
    /// many backends can be in flight at once.
    pub fn send(&mut self, request: &Request, deadline: Instant) -> Result<(), ControlError> {
        let line = serde_json::to_vec(request).map_err(|source| ControlError::Reply {
            path: self.conn.path().to_string(),
            source,
        })?;
        Ok(self.conn.send(&line, deadline)?)
    }

    /// Waits for the reply to the oldest request sent, until `deadline`.
    pub fn receive<T: DeserializeOwned>(&mut self, deadline: Instant) -> Result<T, ControlError> {
        let line = self.conn.next_line(deadline)?;
        decode_reply(self.conn.path(), &line)
    }

    /// Sends a request and waits for its reply.
    pub fn request<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ControlError> {
        let deadline = Instant::now() + self.timeout;
        self.send(request, deadline)?;
        self.receive(deadline)
    }

    /// Sends `line` as it is, whatever it holds (tests send malformed
    /// requests this way), and returns the reply as JSON, whether it
    /// succeeded or refused: only an unreadable reply is an error.
    pub fn request_raw(&mut self, line: &[u8]) -> Result<serde_json::Value, ControlError> {
        let deadline = Instant::now() + self.timeout;
        self.conn.send(line, deadline)?;
        let reply = self.conn.next_line(deadline)?;
        serde_json::from_slice(&reply).map_err(|source| ControlError::Reply {
            path: self.conn.path().to_string(),
            source,
        })
    }

    pub fn status(&mut self) -> Result<StatusReply, ControlError> {
        self.request(&Request::Status {})
    }

    pub fn set_target(&mut self, bytes: u64) -> Result<SetTargetReply, ControlError> {
        self.request(&Request::SetTarget { bytes, pin: false })
    }

    /// Sets and pins an operator's target.
    pub fn pin_target(&mut self, bytes: u64) -> Result<SetTargetReply, ControlError> {
        self.request(&Request::SetTarget { bytes, pin: true })
    }

    pub fn unpin(&mut self) -> Result<UnpinReply, ControlError> {
        self.request(&Request::Unpin {})
    }

    pub fn refresh_stats(&mut self, timeout_ms: u64) -> Result<RefreshStatsReply, ControlError> {
        self.request(&Request::RefreshStats {
            timeout_ms: Some(timeout_ms),
        })
    }
}

/// A reply line as `T`, or the backend's refusal.
pub fn decode_reply<T: DeserializeOwned>(path: &str, line: &[u8]) -> Result<T, ControlError> {
    let unreadable = |source| ControlError::Reply {
        path: path.to_string(),
        source,
    };
    let value: serde_json::Value = serde_json::from_slice(line).map_err(unreadable)?;
    if value.get("ok") != Some(&serde_json::Value::Bool(true)) {
        let refusal: ErrorReply = serde_json::from_value(value).map_err(unreadable)?;
        return Err(ControlError::Refused {
            path: path.to_string(),
            message: refusal.error,
        });
    }
    serde_json::from_value(value).map_err(unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn requests_keep_their_wire_form() {
        for (request, line) in [
            (Request::Status {}, r#"{"cmd":"status"}"#),
            (
                Request::SetTarget {
                    bytes: 4096,
                    pin: false,
                },
                r#"{"cmd":"set-target","bytes":4096}"#,
            ),
            (
                Request::RefreshStats { timeout_ms: None },
                r#"{"cmd":"refresh-stats"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
            assert_eq!(parse_request(line.as_bytes()).unwrap(), request);
        }
        let error = parse_request(br#"{"cmd":"status","x":1}"#).unwrap_err();
        assert!(error.contains("unknown field `x`"), "{error}");
    }

    #[test]
    fn a_refusal_is_an_error_and_replies_pair_in_order() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = ControlClient {
            conn: LineConnection::from_stream("backend", ours, Limits::default()),
            timeout: Duration::from_secs(5),
        };
        let server = std::thread::spawn(move || {
            let mut lines = BufReader::new(theirs.try_clone().unwrap()).lines();
            let mut out = theirs;
            let first = lines.next().unwrap().unwrap();
            writeln!(out, r#"{{"ok":false,"error":"no guest is attached yet"}}"#).unwrap();
            let second = lines.next().unwrap().unwrap();
            writeln!(
                out,
                r#"{{"ok":true,"target_bytes":8192,"clamped":true,"notified":false}}"#
            )
            .unwrap();
            (first, second)
        });
        let refused = client.set_target(1 << 40).unwrap_err();
        assert!(
            matches!(&refused, ControlError::Refused { message, .. } if message == "no guest is attached yet"),
            "{refused}"
        );
        let reply = client.set_target(8192).unwrap();
        assert!(reply.clamped && !reply.notified);
        let (first, second) = server.join().unwrap();
        assert_eq!(first, r#"{"cmd":"set-target","bytes":1099511627776}"#);
        assert_eq!(second, r#"{"cmd":"set-target","bytes":8192}"#);
    }

    #[test]
    fn a_raw_request_goes_out_as_it_is_and_any_reply_comes_back() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = ControlClient {
            conn: LineConnection::from_stream("backend", ours, Limits::default()),
            timeout: Duration::from_secs(5),
        };
        let server = std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let mut out = theirs;
            let mut first = Vec::new();
            reader.read_until(b'\n', &mut first).unwrap();
            writeln!(
                out,
                r#"{{"ok":false,"error":"bad request: expected value"}}"#
            )
            .unwrap();
            let mut second = Vec::new();
            reader.read_until(b'\n', &mut second).unwrap();
            writeln!(out, "not json").unwrap();
            (first, second)
        });
        let reply = client.request_raw(b"\xff{\"cmd\":").unwrap();
        assert_eq!(reply["ok"], false);
        assert_eq!(reply["error"], "bad request: expected value");
        client.set_timeout(Duration::from_secs(1));
        let unreadable = client.request_raw(b"").unwrap_err();
        assert!(
            matches!(unreadable, ControlError::Reply { .. }),
            "{unreadable}"
        );
        let (first, second) = server.join().unwrap();
        assert_eq!(first, b"\xff{\"cmd\":\n");
        assert_eq!(second, b"\n");
    }
}
