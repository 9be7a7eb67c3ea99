//! The guest-agent protocol (`docs/guest-agent.md`): one JSON object per
//! line over a virtio-serial port, each with `"v": 1`. The agent sends
//! reports and replies; the host sends commands. The host side's
//! connection ([`AgentConnection`]) treats everything the agent sends as
//! untrusted.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::lines::{Limits, LineConnection, LineCounters, LineError};

pub mod libvirt;
pub use libvirt::{
    libvirt_channel_socket, list_libvirt_channels, LibvirtChannel, LibvirtChannelError,
    LIBVIRT_CHANNEL_ROOTS,
};

pub const PROTOCOL_VERSION: u64 = 1;
/// The virtio-serial port name the agent looks for.
pub const DEFAULT_PORT_NAME: &str = "org.balloon.agent.0";
/// Replies kept unclaimed at most; older ones are dropped.
const MAX_WAITING_REPLIES: usize = 16;

/// A command from the host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    Ping {
        v: u64,
        id: u64,
    },
    /// Reclaim this many bytes of page cache.
    Reclaim {
        v: u64,
        id: u64,
        bytes: u64,
    },
}

impl Command {
    pub fn id(&self) -> u64 {
        match self {
            Command::Ping { id, .. } | Command::Reclaim { id, .. } => *id,
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Command::Ping { v, .. } | Command::Reclaim { v, .. } => *v,
        }
    }
}

/// A parsed command, or the error reply to send back.
pub fn parse_command(line: &[u8]) -> Result<Command, Reply> {
    let command: Command = serde_json::from_slice(line).map_err(|error| {
        // Answer with the id when one can be read, so the host can match it.
        let id = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64));
        Reply::error(id, format!("bad request: {error}"))
    })?;
    if command.version() != PROTOCOL_VERSION {
        return Err(Reply::error(
            Some(command.id()),
            format!(
                "unsupported protocol version {}, this agent speaks {PROTOCOL_VERSION}",
                command.version()
            ),
        ));
    }
    Ok(command)
}

/// Why a report was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportReason {
    Hello,
    Timer,
    Psi,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    /// Page cache: Cached + Buffers, less shared memory (which cannot be
    /// dropped like cache).
    pub page_cache_bytes: u64,
    pub shmem_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStat {
    pub major_faults: u64,
    pub swap_in_pages: u64,
    pub swap_out_pages: u64,
    pub alloc_stalls: u64,
    pub direct_scans: u64,
    pub oom_kills: u64,
}

/// One line of a PSI file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time in microseconds.
    pub total_us: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMemory {
    pub anon_bytes: u64,
    pub file_bytes: u64,
}

/// The guest's memory state, sent on a timer, on connecting and on a PSI
/// trigger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub v: u64,
    pub reason: ReportReason,
    pub seq: u64,
    pub meminfo: MemInfo,
    pub vmstat: VmStat,
    pub psi: Option<Psi>,
    pub cgroup: Option<CgroupMemory>,
}

/// What a reclaim did, measured by the agent around its own reclaim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReclaimOutcome {
    pub method: String,
    pub requested_bytes: u64,
    pub page_cache_before_bytes: u64,
    pub page_cache_after_bytes: u64,
    pub reclaimed_bytes: u64,
}

/// The answer to a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u64,
    /// `None` when the command was too broken to carry one.
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pong: Option<bool>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub reclaim: Option<ReclaimOutcome>,
}

impl Reply {
    pub fn error(id: Option<u64>, message: String) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            error: Some(message),
            pong: None,
            reclaim: None,
        }
    }

    pub fn pong(id: u64) -> Reply {
        Reply {
            pong: Some(true),
            ..Reply::ok(id)
        }
    }

    pub fn reclaimed(id: u64, outcome: ReclaimOutcome) -> Reply {
        Reply {
            reclaim: Some(outcome),
            ..Reply::ok(id)
        }
    }

    fn ok(id: u64) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            id: Some(id),
            ok: true,
            error: None,
            pong: None,
            reclaim: None,
        }
    }
}

/// Everything the agent sends, told apart by `"type"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FromAgent {
    Report(Report),
    Reply(Reply),
}

impl FromAgent {
    /// The line the agent sends (without its newline).
    pub fn to_line(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// What an agent's lines have cost, by kind; they only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCounters {
    pub lines: LineCounters,
    /// Complete lines that are not a report or reply of this protocol.
    pub malformed_lines: u64,
    /// Replies to no command in flight.
    pub unexpected_replies: u64,
}

/// The host side of one guest agent: keeps the latest report, sends
/// commands without waiting, and collects their replies on later polls.
pub struct AgentConnection {
    conn: LineConnection,
    latest: Option<Report>,
    replies: BTreeMap<u64, Reply>,
    in_flight: Vec<u64>,
    next_id: u64,
    malformed_lines: u64,
    unexpected_replies: u64,
}

impl AgentConnection {
    pub fn connect(path: &Path) -> Result<Self, LineError> {
        Ok(Self::new(LineConnection::connect(path, Limits::default())?))
    }

    pub fn new(conn: LineConnection) -> Self {
        AgentConnection {
            conn,
            latest: None,
            replies: BTreeMap::new(),
            in_flight: Vec::new(),
            next_id: 1,
            malformed_lines: 0,
            unexpected_replies: 0,
        }
    }

    pub fn latest(&self) -> Option<&Report> {
        self.latest.as_ref()
    }

    pub fn counters(&self) -> AgentCounters {
        AgentCounters {
            lines: self.conn.counters(),
            malformed_lines: self.malformed_lines,
            unexpected_replies: self.unexpected_replies,
        }
    }

    /// Takes in what has arrived, without waiting and within the read cap.
    pub fn poll(&mut self) -> Result<(), LineError> {
        for line in self.conn.poll()? {
            match serde_json::from_slice::<FromAgent>(&line) {
                Ok(FromAgent::Report(report)) if report.v == PROTOCOL_VERSION => {
                    self.latest = Some(report);
                }
                Ok(FromAgent::Reply(reply)) if reply.v == PROTOCOL_VERSION => {
                    match reply.id.filter(|id| self.in_flight.contains(id)) {
                        Some(id) => {
                            self.in_flight.retain(|i| *i != id);
                            if self.replies.len() == MAX_WAITING_REPLIES {
                                self.replies.pop_first();
                            }
                            self.replies.insert(id, reply);
                        }
                        None => self.unexpected_replies += 1,
                    }
                }
                Ok(_) | Err(_) => self.malformed_lines += 1,
            }
        }
        Ok(())
    }

    /// Sends a reclaim command; its reply comes through `take_reply`.
    pub fn send_reclaim(&mut self, bytes: u64, deadline: Instant) -> Result<u64, LineError> {
        let id = self.next_id;
        self.next_id += 1;
        let command = Command::Reclaim {
            v: PROTOCOL_VERSION,
            id,
            bytes,
        };
        // A command of our own always serialises.
        let line = serde_json::to_vec(&command).unwrap_or_default();
        self.conn.send(&line, deadline)?;
        if self.in_flight.len() == MAX_WAITING_REPLIES {
            self.in_flight.remove(0);
        }
        self.in_flight.push(id);
        Ok(id)
    }

    /// The reply to command `id`, once it has arrived.
    pub fn take_reply(&mut self, id: u64) -> Option<Reply> {
        self.replies.remove(&id)
    }

    /// Stops waiting for command `id` (it timed out); a late reply to it
    /// counts as unexpected.
    pub fn forget(&mut self, id: u64) {
        self.in_flight.retain(|i| *i != id);
        self.replies.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    const REPORT: &str = r#"{"v":1,"type":"report","reason":"timer","seq":7,"meminfo":{"total_bytes":1,"free_bytes":1,"available_bytes":300,"page_cache_bytes":200,"shmem_bytes":0},"vmstat":{"major_faults":0,"swap_in_pages":0,"swap_out_pages":0,"alloc_stalls":0,"direct_scans":0,"oom_kills":0},"psi":{"some":{"avg10":3.5,"avg60":1.0,"avg300":0.1,"total_us":9},"full":null},"cgroup":null}"#;

    fn connection() -> (AgentConnection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let conn = LineConnection::from_stream("agent", ours, Limits::default());
        (AgentConnection::new(conn), theirs)
    }

    #[test]
    fn reports_replies_and_garbage_are_told_apart() {
        let (mut agent, mut guest) = connection();
        writeln!(guest, "{}", REPORT.replace("\"seq\":7", "\"seq\":6")).unwrap();
        writeln!(guest, "{REPORT}").unwrap();
        writeln!(guest, "not json").unwrap();
        writeln!(guest, r#"{{"v":2,"type":"report"}}"#).unwrap();
        writeln!(guest, r#"{{"v":1,"type":"reply","id":99,"ok":true}}"#).unwrap();
        agent.poll().unwrap();
        let report = agent.latest().unwrap();
        assert_eq!(report.seq, 7);
        assert_eq!(report.psi.unwrap().some.avg10, 3.5);
        let counters = agent.counters();
        assert_eq!(counters.malformed_lines, 2);
        assert_eq!(counters.unexpected_replies, 1);

        let id = agent
            .send_reclaim(64, Instant::now() + Duration::from_secs(5))
            .unwrap();
        let mut lines = BufReader::new(guest.try_clone().unwrap()).lines();
        let command = parse_command(lines.next().unwrap().unwrap().as_bytes()).unwrap();
        assert_eq!(
            command,
            Command::Reclaim {
                v: 1,
                id,
                bytes: 64
            }
        );
        let outcome = ReclaimOutcome {
            method: "memory.reclaim".into(),
            requested_bytes: 64,
            page_cache_before_bytes: 200,
            page_cache_after_bytes: 100,
            reclaimed_bytes: 100,
        };
        let reply = FromAgent::Reply(Reply::reclaimed(id, outcome.clone()));
        guest.write_all(&reply.to_line().unwrap()).unwrap();
        guest.write_all(b"\n").unwrap();
        assert_eq!(agent.take_reply(id), None);
        agent.poll().unwrap();
        assert_eq!(agent.take_reply(id).unwrap().reclaim, Some(outcome));
    }

    #[test]
    fn bad_commands_get_error_replies_with_their_id() {
        let reply = parse_command(br#"{"v":1,"id":9,"cmd":"explode"}"#).unwrap_err();
        assert!(!reply.ok);
        assert_eq!(reply.id, Some(9));
        assert!(reply.error.unwrap().contains("explode"));
        let reply = parse_command(br#"{"v":2,"id":3,"cmd":"ping"}"#).unwrap_err();
        assert!(reply.error.unwrap().contains("version 2"));
        let reply = parse_command(br#"{"v":1,"id":4,"cmd":"reclaim"}"#).unwrap_err();
        assert!(reply.error.unwrap().contains("bytes"));
        let reply = parse_command(b"\xff not json").unwrap_err();
        assert_eq!(reply.id, None);
        let line = serde_json::to_string(&FromAgent::Reply(reply)).unwrap();
        assert!(
            line.starts_with(r#"{"type":"reply","v":1,"id":null,"ok":false,"error":"#),
            "{line}"
        );
    }
}
