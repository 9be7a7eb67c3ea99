//! The agent's wire protocol: one JSON object per line over a virtio-serial
//! port, with a version field. Host requests are parsed here; a malformed or
//! unknown request gets an error reply and the agent carries on.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const PROTOCOL_VERSION: u64 = 1;
/// The virtio-serial port name the agent looks for.
pub const DEFAULT_PORT_NAME: &str = "org.balloon.agent.0";

#[derive(Debug, Deserialize, PartialEq, Eq)]
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

    fn version(&self) -> u64 {
        match self {
            Command::Ping { v, .. } | Command::Reclaim { v, .. } => *v,
        }
    }
}

/// A parsed request, or the error reply to send.
pub fn parse_request(line: &[u8]) -> Result<Command, Value> {
    let command: Command = serde_json::from_slice(line).map_err(|error| {
        // Answer with the id when one can be read, so the host can match it.
        let id = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v["id"].as_u64());
        error_reply(id, format!("bad request: {error}"))
    })?;
    if command.version() != PROTOCOL_VERSION {
        return Err(error_reply(
            Some(command.id()),
            format!(
                "unsupported protocol version {}, this agent speaks {PROTOCOL_VERSION}",
                command.version()
            ),
        ));
    }
    Ok(command)
}

pub fn error_reply(id: Option<u64>, message: String) -> Value {
    json!({"v": PROTOCOL_VERSION, "type": "reply", "id": id, "ok": false, "error": message})
}

pub fn ok_reply(id: u64, mut fields: Value) -> Value {
    let mut reply = json!({"v": PROTOCOL_VERSION, "type": "reply", "id": id, "ok": true});
    if let (Some(reply), Some(extra)) = (reply.as_object_mut(), fields.as_object_mut()) {
        reply.append(extra);
    }
    reply
}

/// Why a report was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportReason {
    Hello,
    Timer,
    Psi,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request(br#"{"v":1,"id":7,"cmd":"ping"}"#),
            Ok(Command::Ping { v: 1, id: 7 })
        );
        assert_eq!(
            parse_request(br#"{"v":1,"id":8,"cmd":"reclaim","bytes":1048576}"#),
            Ok(Command::Reclaim {
                v: 1,
                id: 8,
                bytes: 1048576
            })
        );
    }

    #[test]
    fn bad_requests_get_error_replies_with_their_id() {
        let reply = parse_request(br#"{"v":1,"id":9,"cmd":"explode"}"#).unwrap_err();
        assert_eq!(reply["ok"], false);
        assert_eq!(reply["id"], 9);
        assert!(reply["error"].as_str().unwrap().contains("explode"));
        let reply = parse_request(br#"{"v":2,"id":3,"cmd":"ping"}"#).unwrap_err();
        assert!(reply["error"].as_str().unwrap().contains("version 2"));
        let reply = parse_request(br#"{"v":1,"id":4,"cmd":"reclaim"}"#).unwrap_err();
        assert!(reply["error"].as_str().unwrap().contains("bytes"));
        let reply = parse_request(b"\xff not json").unwrap_err();
        assert_eq!(reply["id"], Value::Null);
    }

    #[test]
    fn ok_replies_carry_extra_fields() {
        let reply = ok_reply(5, json!({"reclaimed_bytes": 10}));
        assert_eq!(reply["id"], 5);
        assert_eq!(reply["reclaimed_bytes"], 10);
        assert_eq!(reply["type"], "reply");
    }
}
