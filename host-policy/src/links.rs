//! The daemon's connections to one VM: its backend's control socket and its
//! guest agent, kept open across ticks and reopened only after an error.
//! Both peers are untrusted (the agent is the guest's; a backend may hang):
//! every failure is counted per VM under its own name and logged at most
//! once per interval per kind.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use balloon_policy::policy::AgentReclaim;
use balloon_protocol::agent::{AgentConnection, AgentCounters, Report};
use balloon_protocol::control::{
    ControlClient, ControlError, Request, SetTargetReply, StatusReply,
};
use balloon_protocol::lines::{LineCounters, LineError};
use log::{error, info, warn};

/// How long a backend has to answer `host-policy status`.
pub const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the backends have to answer the requests of one tick: half the
/// interval, between 200 ms and 2 s, so that a silent backend costs every
/// tick at most that, once, and ticks keep their pace.
pub fn tick_reply_timeout(interval: Duration) -> Duration {
    (interval / 2).clamp(Duration::from_millis(200), BACKEND_REPLY_TIMEOUT)
}
/// How long a peer has to take one request line.
pub const WRITE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long the agent has to answer a reclaim before inflation goes ahead
/// (how often it may be asked is balloon-policy's gate's to say).
pub const RECLAIM_TIMEOUT: Duration = Duration::from_secs(20);
/// One kind of fault is logged at most this often per VM.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Which peer a connection fault came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Backend,
    Agent,
}

/// The counter a connection error falls under.
fn line_fault(peer: Peer, error: &LineError) -> &'static str {
    match (peer, error) {
        (Peer::Backend, LineError::Connect { .. }) => "backend_connect_failures",
        (Peer::Backend, LineError::Io { .. }) => "backend_io_errors",
        (Peer::Backend, LineError::Closed { .. }) => "backend_closed",
        (Peer::Backend, LineError::ReadTimeout { .. }) => "backend_read_timeouts",
        (Peer::Backend, LineError::ReadCap { .. }) => "backend_read_cap_reached",
        (Peer::Backend, LineError::WriteTimeout { .. }) => "backend_write_timeouts",
        (Peer::Agent, LineError::Connect { .. }) => "agent_connect_failures",
        (Peer::Agent, LineError::Io { .. }) => "agent_io_errors",
        (Peer::Agent, LineError::Closed { .. }) => "agent_closed",
        (Peer::Agent, LineError::ReadTimeout { .. }) => "agent_read_timeouts",
        (Peer::Agent, LineError::ReadCap { .. }) => "agent_read_cap_reached",
        (Peer::Agent, LineError::WriteTimeout { .. }) => "agent_write_timeouts",
    }
}

fn control_fault(error: &ControlError) -> &'static str {
    match error {
        ControlError::Line(error) => line_fault(Peer::Backend, error),
        ControlError::Reply { .. } => "backend_bad_replies",
        ControlError::Refused { .. } => "backend_refusals",
    }
}

/// Fault counters of one VM with a per-kind log rate limit.
#[derive(Debug, Default)]
pub struct VmFaults {
    counts: BTreeMap<&'static str, u64>,
    last_logged: BTreeMap<&'static str, Instant>,
}

impl VmFaults {
    /// Counts `n` faults of kind `name` and logs `detail` unless this kind
    /// was logged for this VM within the interval; says whether it logged.
    pub fn record(
        &mut self,
        vm: &str,
        name: &'static str,
        n: u64,
        detail: impl FnOnce() -> String,
    ) -> bool {
        if n == 0 {
            return false;
        }
        let count = self.counts.entry(name).or_default();
        *count = count.saturating_add(n);
        let total = *count;
        let now = Instant::now();
        let due = self
            .last_logged
            .get(name)
            .is_none_or(|at| now.duration_since(*at) >= LOG_INTERVAL);
        if due {
            self.last_logged.insert(name, now);
            let detail = detail();
            warn!("vm {vm}: {name}: {detail} (total {total})");
        }
        due
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts
            .iter()
            .map(|(name, count)| ((*name).to_string(), *count))
            .collect()
    }
}

/// Where a reclaim request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reclaim {
    Idle { last_done: Option<Instant> },
    Waiting { id: u64, bytes: u64, sent: Instant },
}

/// A reply the backend owes, in the order the requests were sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owed {
    Target,
    Status,
}

/// One VM's connections and what they have cost.
pub struct VmLink {
    name: String,
    backend: Option<ControlClient>,
    backend_seen: LineCounters,
    /// Replies owed on `backend`, oldest first.
    owed: VecDeque<Owed>,
    agent: Option<AgentConnection>,
    agent_seen: AgentCounters,
    reclaim: Reclaim,
    pub faults: VmFaults,
}

impl VmLink {
    pub fn new(name: &str) -> Self {
        VmLink {
            name: name.to_string(),
            backend: None,
            backend_seen: LineCounters::default(),
            owed: VecDeque::new(),
            agent: None,
            agent_seen: AgentCounters::default(),
            reclaim: Reclaim::Idle { last_done: None },
            faults: VmFaults::default(),
        }
    }

    fn backend_failed(&mut self, error: &ControlError) {
        let name = control_fault(error);
        let vm = self.name.clone();
        self.faults
            .record(&vm, name, 1, || format!("{error}; trying again next tick"));
        self.take_backend_counters();
        self.backend = None;
        self.owed.clear();
    }

    /// Adds what the backend connection's line counters gained.
    fn take_backend_counters(&mut self) {
        let Some(backend) = &self.backend else { return };
        let now = backend.counters();
        let seen = std::mem::replace(&mut self.backend_seen, now);
        let vm = self.name.clone();
        let oversized = now.oversized_lines.saturating_sub(seen.oversized_lines);
        self.faults
            .record(&vm, "backend_oversized_lines", oversized, || {
                format!("{oversized} reply lines over the line cap dropped")
            });
        let dropped = now.dropped_lines.saturating_sub(seen.dropped_lines);
        self.faults
            .record(&vm, "backend_unread_lines", dropped, || {
                format!("{dropped} unrequested lines dropped")
            });
    }

    /// Whether the guest agent's connection is open.
    pub fn agent_connected(&self) -> bool {
        self.agent.is_some()
    }

    /// Whether the backend connection is open.
    pub fn connected(&self) -> bool {
        self.backend.is_some()
    }

    /// Whether a status request is in flight (sent after the last tick).
    pub fn status_requested(&self) -> bool {
        self.owed.contains(&Owed::Status)
    }

    /// Sends a status request, connecting first when needed. The daemon
    /// sends the next tick's request as soon as a tick is done, so that its
    /// reply waits in the socket and the next tick reads it without
    /// sleeping for it.
    pub fn request_status(&mut self, control: &Path) {
        if self.backend.is_none() {
            match ControlClient::connect(control, BACKEND_REPLY_TIMEOUT) {
                Ok(client) => {
                    self.backend_seen = LineCounters::default();
                    self.backend = Some(client);
                }
                Err(error) => return self.backend_failed(&error),
            }
        }
        if self.send(&Request::Status {}) {
            self.owed.push_back(Owed::Status);
        }
    }

    /// The reply to the oldest request in flight when it is a status
    /// request, waiting until `deadline`; None when none was asked for or
    /// the connection failed (counted).
    pub fn take_status(&mut self, deadline: Instant) -> Option<StatusReply> {
        if self.owed.front() != Some(&Owed::Status) {
            return None;
        }
        self.owed.pop_front();
        self.receive(deadline)
    }

    /// The reply to a target sent by `send_target`, waiting until
    /// `deadline`; a failure is logged and counted.
    pub fn take_target(&mut self, deadline: Instant) -> bool {
        if self.owed.front() != Some(&Owed::Target) {
            return false;
        }
        self.owed.pop_front();
        let done = self.receive::<SetTargetReply>(deadline).is_some();
        if !done {
            error!(
                "vm {}: setting the target failed (see the counters in `host-policy status`)",
                self.name
            );
        }
        done
    }

    /// Sends a new target; `take_target` reads its reply.
    pub fn send_target(&mut self, bytes: u64) -> bool {
        let sent = self.send(&Request::SetTarget { bytes, pin: false });
        if sent {
            self.owed.push_back(Owed::Target);
        }
        sent
    }

    /// Sends a request on the open backend connection; a failure is counted
    /// and drops the connection.
    fn send(&mut self, request: &Request) -> bool {
        let Some(backend) = self.backend.as_mut() else {
            return false;
        };
        match backend.send(request, Instant::now() + WRITE_TIMEOUT) {
            Ok(()) => true,
            Err(error) => {
                self.backend_failed(&error);
                false
            }
        }
    }

    /// The reply to the oldest request sent, waiting until `deadline`; a
    /// failure is counted and drops the connection.
    fn receive<T: serde::de::DeserializeOwned>(&mut self, deadline: Instant) -> Option<T> {
        let reply = self.backend.as_mut()?.receive::<T>(deadline);
        self.take_backend_counters();
        match reply {
            Ok(reply) => Some(reply),
            Err(error) => {
                self.backend_failed(&error);
                None
            }
        }
    }

    fn agent_failed(&mut self, error: &LineError) {
        let name = line_fault(Peer::Agent, error);
        let vm = self.name.clone();
        self.faults
            .record(&vm, name, 1, || format!("{error}; trying again next tick"));
        self.take_agent_counters();
        self.agent = None;
        if let Reclaim::Waiting { .. } = self.reclaim {
            self.reclaim = Reclaim::Idle {
                last_done: Some(Instant::now()),
            };
        }
    }

    /// Adds what the agent connection's counters gained.
    fn take_agent_counters(&mut self) {
        let Some(agent) = &self.agent else { return };
        let now = agent.counters();
        let seen = std::mem::replace(&mut self.agent_seen, now);
        let vm = self.name.clone();
        for (name, gained, what) in [
            (
                "agent_oversized_lines",
                now.lines
                    .oversized_lines
                    .saturating_sub(seen.lines.oversized_lines),
                "lines over the 64 KiB cap dropped",
            ),
            (
                "agent_read_cap_reached",
                now.lines
                    .read_cap_reached
                    .saturating_sub(seen.lines.read_cap_reached),
                "ticks that stopped reading at the per-tick cap",
            ),
            (
                "agent_unread_lines",
                now.lines
                    .dropped_lines
                    .saturating_sub(seen.lines.dropped_lines),
                "lines dropped unread",
            ),
            (
                "agent_malformed_lines",
                now.malformed_lines.saturating_sub(seen.malformed_lines),
                "lines that are no report or reply",
            ),
            (
                "agent_unexpected_replies",
                now.unexpected_replies
                    .saturating_sub(seen.unexpected_replies),
                "replies to no request in flight",
            ),
        ] {
            self.faults
                .record(&vm, name, gained, || format!("{gained} {what}"));
        }
    }

    /// Takes in the agent's reports and replies (connecting when needed)
    /// and settles an answered or expired reclaim; returns the latest
    /// report.
    pub fn poll_agent(&mut self, path: &Path) -> Option<Report> {
        if self.agent.is_none() {
            match AgentConnection::connect(path) {
                Ok(agent) => {
                    info!(
                        "vm {}: guest agent connected at {}",
                        self.name,
                        path.display()
                    );
                    self.agent_seen = AgentCounters::default();
                    self.agent = Some(agent);
                }
                Err(error) => {
                    self.agent_failed(&error);
                    return None;
                }
            }
        }
        let polled = self.agent.as_mut()?.poll();
        self.take_agent_counters();
        if let Err(error) = polled {
            self.agent_failed(&error);
            return None;
        }
        self.settle_reclaim();
        self.agent.as_ref()?.latest().cloned()
    }

    fn settle_reclaim(&mut self) {
        let Reclaim::Waiting { id, bytes, sent } = self.reclaim else {
            return;
        };
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        let vm = self.name.clone();
        if let Some(reply) = agent.take_reply(id) {
            match (reply.ok, reply.reclaim) {
                (true, Some(outcome)) => info!(
                    "vm {vm}: guest agent reclaimed {} MiB of page cache ({}), {} MiB asked",
                    outcome.reclaimed_bytes >> 20,
                    outcome.method,
                    bytes >> 20
                ),
                (_, _) => {
                    let message = reply.error.unwrap_or_else(|| "no reclaim outcome".into());
                    self.faults.record(&vm, "reclaim_refusals", 1, || {
                        format!("guest agent refused to reclaim: {message}")
                    });
                }
            }
            self.reclaim = Reclaim::Idle {
                last_done: Some(Instant::now()),
            };
        } else if sent.elapsed() >= RECLAIM_TIMEOUT {
            agent.forget(id);
            self.faults.record(&vm, "reclaim_timeouts", 1, || {
                format!("guest agent did not answer a reclaim within {RECLAIM_TIMEOUT:?}; inflating without it")
            });
            self.reclaim = Reclaim::Idle {
                last_done: Some(Instant::now()),
            };
        }
    }

    /// Where the guest agent stands with its reclaims, for the policy's
    /// gate (`balloon_policy::gate`): one in flight, or when the last
    /// ended; `Unavailable` without a connected agent.
    pub fn agent_reclaim(&self) -> AgentReclaim {
        match self.reclaim {
            Reclaim::Waiting { sent, .. } => AgentReclaim::Waiting {
                asked_s_ago: sent.elapsed().as_secs(),
            },
            Reclaim::Idle { .. } if self.agent.is_none() => AgentReclaim::Unavailable,
            Reclaim::Idle { last_done } => AgentReclaim::Idle {
                done_s_ago: last_done.map(|at| at.elapsed().as_secs()),
            },
        }
    }

    /// Sends the agent a reclaim of `bytes` (the decision's
    /// `agent_reclaim_bytes`; `why` for the log) and waits for its answer
    /// in `settle_reclaim`; false when there is no agent or it failed.
    pub fn ask_reclaim(&mut self, bytes: u64, why: &str) -> bool {
        let Some(agent) = self.agent.as_mut() else {
            return false;
        };
        match agent.send_reclaim(bytes, Instant::now() + WRITE_TIMEOUT) {
            Ok(id) => {
                info!(
                    "vm {}: asked the guest agent to reclaim {} MiB of page cache {why}",
                    self.name,
                    bytes >> 20
                );
                self.reclaim = Reclaim::Waiting {
                    id,
                    bytes,
                    sent: Instant::now(),
                };
                true
            }
            Err(error) => {
                self.agent_failed(&error);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_counted_every_time_and_logged_at_most_once_per_interval() {
        let mut faults = VmFaults::default();
        let logged = (0..5)
            .filter(|_| faults.record("vm", "agent_malformed_lines", 3, String::new))
            .count();
        assert!(!faults.record("vm", "agent_closed", 0, String::new));
        assert_eq!(logged, 1);
        assert_eq!(faults.counts().get("agent_malformed_lines"), Some(&15));
        assert_eq!(faults.counts().get("agent_closed"), None);
    }
}
