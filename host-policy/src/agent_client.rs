//! A client for a VM's guest agent, reached through QEMU's virtio-serial
//! chardev socket: it keeps the latest report and sends requests.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to the guest agent at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("guest agent at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("guest agent at {path} closed the connection")]
    Closed { path: String },
    #[error("guest agent at {path} did not answer within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("guest agent at {path} refused: {message}")]
    Refused { path: String, message: String },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    pub some: PsiLine,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentMemInfo {
    pub available_bytes: u64,
    pub page_cache_bytes: u64,
}

/// The parts of an agent report the policy uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    pub seq: u64,
    pub reason: String,
    pub meminfo: AgentMemInfo,
    pub psi: Option<Psi>,
}

pub struct AgentClient {
    path: String,
    // (A stream, not a path, so tests can hand in one end of a socketpair.)
    stream: UnixStream,
    pending: Vec<u8>,
    latest: Option<AgentReport>,
    next_id: u64,
}

impl AgentClient {
    pub fn connect(path: &Path) -> Result<Self, AgentError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: shown.clone(),
            source,
        })?;
        Ok(Self::from_stream(&shown, stream))
    }

    /// Wraps an already connected stream.
    pub fn from_stream(path: &str, stream: UnixStream) -> Self {
        AgentClient {
            path: path.to_string(),
            stream,
            pending: Vec::new(),
            latest: None,
            next_id: 1,
        }
    }

    pub fn latest(&self) -> Option<&AgentReport> {
        self.latest.as_ref()
    }

    fn io(&self, source: std::io::Error) -> AgentError {
        AgentError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads what has arrived (waiting at most `wait`); returns complete lines.
    fn read_lines(&mut self, wait: Option<Duration>) -> Result<Vec<Value>, AgentError> {
        match wait {
            None => self.stream.set_nonblocking(true),
            Some(timeout) => self.stream.set_nonblocking(false).and_then(|()| {
                self.stream
                    .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            }),
        }
        .map_err(|e| self.io(e))?;
        let mut buffer = [0u8; 8192];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    return Err(AgentError::Closed {
                        path: self.path.clone(),
                    })
                }
                Ok(n) => {
                    self.pending.extend_from_slice(&buffer[..n]);
                    if wait.is_some() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => return Err(self.io(e)),
            }
        }
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                if value["type"] == "report" {
                    if let Ok(report) = serde_json::from_value::<AgentReport>(value.clone()) {
                        self.latest = Some(report);
                    }
                }
                lines.push(value);
            }
        }
        Ok(lines)
    }

    /// Takes in every report that has arrived since the last call.
    pub fn poll(&mut self) -> Result<Option<&AgentReport>, AgentError> {
        self.read_lines(None)?;
        Ok(self.latest.as_ref())
    }

    /// Sends a request and waits for its reply.
    pub fn request(&mut self, mut request: Value, timeout: Duration) -> Result<Value, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        request["v"] = json!(1);
        request["id"] = json!(id);
        let line = format!("{request}\n");
        self.stream.set_nonblocking(false).map_err(|e| self.io(e))?;
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout {
                    path: self.path.clone(),
                    timeout,
                });
            }
            for reply in self.read_lines(Some(left))? {
                if reply["type"] == "reply" && reply["id"] == id {
                    if reply["ok"] != true {
                        return Err(AgentError::Refused {
                            path: self.path.clone(),
                            message: reply["error"]
                                .as_str()
                                .unwrap_or("no error text")
                                .to_string(),
                        });
                    }
                    return Ok(reply);
                }
            }
        }
    }

    /// Asks the guest to drop about `bytes` of page cache.
    pub fn reclaim(&mut self, bytes: u64) -> Result<Value, AgentError> {
        self.request(
            json!({"cmd": "reclaim", "bytes": bytes}),
            Duration::from_secs(20),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    const REPORT: &str = r#"{"v":1,"type":"report","reason":"timer","seq":7,"meminfo":{"total_bytes":1,"free_bytes":1,"available_bytes":300,"page_cache_bytes":200,"shmem_bytes":0},"vmstat":{},"psi":{"some":{"avg10":3.5,"avg60":1.0,"avg300":0.1,"total_us":9},"full":null},"cgroup":null}"#;

    #[test]
    fn keeps_the_latest_report_and_matches_replies_by_id() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = AgentClient::from_stream("test", ours);
        assert_eq!(client.poll().unwrap(), None);
        let mut agent = theirs.try_clone().unwrap();
        writeln!(agent, "{}", REPORT.replace("\"seq\":7", "\"seq\":6")).unwrap();
        writeln!(agent, "{REPORT}").unwrap();
        let report = client.poll().unwrap().cloned().unwrap();
        assert_eq!(report.seq, 7);
        assert_eq!(report.psi.unwrap().some.avg10, 3.5);
        assert_eq!(report.meminfo.page_cache_bytes, 200);

        // The agent answers after a report; the reply is found by id.
        let responder = std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(theirs.try_clone().unwrap()).lines();
            let request: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            let id = request["id"].as_u64().unwrap();
            let mut out = theirs;
            writeln!(out, "{}", REPORT.replace("\"seq\":7", "\"seq\":8")).unwrap();
            writeln!(
                out,
                r#"{{"v":1,"type":"reply","id":{},"ok":false,"error":"nope"}}"#,
                id + 100
            )
            .unwrap();
            writeln!(
                out,
                r#"{{"v":1,"type":"reply","id":{id},"ok":true,"reclaimed_bytes":5}}"#
            )
            .unwrap();
            request
        });
        let reply = client.reclaim(64).unwrap();
        assert_eq!(reply["reclaimed_bytes"], 5);
        let request = responder.join().unwrap();
        assert_eq!(request["cmd"], "reclaim");
        assert_eq!(request["bytes"], 64);
        assert_eq!(request["v"], 1);
        assert_eq!(client.latest().unwrap().seq, 8);
    }

    #[test]
    fn a_refusal_and_a_closed_agent_are_errors() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = AgentClient::from_stream("test", ours);
        let responder = std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(theirs.try_clone().unwrap()).lines();
            let request: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            let mut out = theirs;
            writeln!(
                out,
                r#"{{"v":1,"type":"reply","id":{},"ok":false,"error":"no cgroup"}}"#,
                request["id"]
            )
            .unwrap();
        });
        assert!(
            matches!(client.reclaim(1), Err(AgentError::Refused { message, .. }) if message == "no cgroup")
        );
        responder.join().unwrap();
        assert!(matches!(client.poll(), Err(AgentError::Closed { .. })));
    }
}
