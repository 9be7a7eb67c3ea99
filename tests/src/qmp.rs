//! A minimal QMP client (QEMU's JSON monitor), for the built-in balloon
//! and for migrations.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::wait_for;

/// Longest one QMP command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (waiting for QEMU to create the socket) and negotiates.
    pub fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let stream = wait_for("the QMP socket", Duration::from_secs(20), || {
            Ok(UnixStream::connect(path).ok())
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut qmp = Qmp {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        };
        qmp.read()?; // greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        anyhow::ensure!(self.reader.read_line(&mut line)? > 0, "QMP socket closed");
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; its `return` value, or an error with QEMU's reply.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        writeln!(
            self.writer,
            "{}",
            json!({"execute": command, "arguments": arguments})
        )?;
        loop {
            let reply = self.read()?;
            if reply.get("event").is_some() {
                continue;
            }
            anyhow::ensure!(reply.get("error").is_none(), "QMP {command}: {reply}");
            return Ok(reply["return"].clone());
        }
    }

    /// Starts a migration to `uri` and waits for it to end; the final
    /// `query-migrate` (status `completed` or `failed`, with its error).
    pub fn migrate(&mut self, uri: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.execute("migrate", json!({"uri": uri}))?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            let status = info["status"].as_str().unwrap_or("");
            if matches!(status, "completed" | "failed" | "cancelled") {
                return Ok(info);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "migration still {status} after {timeout:?}: {info}"
            );
            std::thread::sleep(crate::POLL_INTERVAL);
        }
    }

    /// The VM's run state (`running`, `postmigrate`, `inmigrate`, ...).
    pub fn run_state(&mut self) -> anyhow::Result<String> {
        let status = self.execute("query-status", json!({}))?;
        Ok(status["status"].as_str().unwrap_or("").to_string())
    }
}
