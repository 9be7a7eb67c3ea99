//! A client for balloon-backend's control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} sent an unreadable reply: {source}")]
    Reply {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path} refused: {message}")]
    Refused { path: String, message: String },
}

/// The parts of the backend's status the policy uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub connected: bool,
    pub guest_ram_bytes: u64,
    pub target_bytes: u64,
    pub actual_bytes: u64,
    pub max_reclaim_bytes: u64,
    pub stats: Option<BackendStats>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct BackendStats {
    pub free_bytes: Option<u64>,
    pub available_bytes: Option<u64>,
    pub swap_in: Option<u64>,
    pub major_faults: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub direct_reclaims: Option<u64>,
    pub oom_kills: Option<u64>,
    pub updated_unix_ms: u64,
}

pub struct BackendClient {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl BackendClient {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: shown.clone(),
            source,
        })?;
        let io = |source| ClientError::Io {
            path: shown.clone(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(BackendClient {
            path: shown,
            reader: BufReader::new(stream),
            writer,
        })
    }

    fn request(&mut self, request: &Value) -> Result<Value, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        writeln!(self.writer, "{request}").map_err(io)?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        let reply: Value = serde_json::from_str(&line).map_err(|source| ClientError::Reply {
            path: self.path.clone(),
            source,
        })?;
        if reply["ok"] != true {
            return Err(ClientError::Refused {
                path: self.path.clone(),
                message: reply["error"]
                    .as_str()
                    .unwrap_or("no error text")
                    .to_string(),
            });
        }
        Ok(reply)
    }

    pub fn status(&mut self) -> Result<BackendStatus, ClientError> {
        let reply = self.request(&json!({"cmd": "status"}))?;
        serde_json::from_value(reply).map_err(|source| ClientError::Reply {
            path: self.path.clone(),
            source,
        })
    }

    pub fn set_target(&mut self, bytes: u64) -> Result<Value, ClientError> {
        self.request(&json!({"cmd": "set-target", "bytes": bytes}))
    }
}
