//! A `balloon-backend` process and a client for its control socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use balloon_protocol::lines::{Limits, LineConnection};
use serde_json::Value;

use crate::env::TestEnv;
use crate::wait_for;

pub struct BackendProcess {
    child: Child,
    binary: PathBuf,
    args: Vec<String>,
    pub socket: PathBuf,
    pub control: PathBuf,
}

impl BackendProcess {
    /// Starts the backend with sockets in `dir` and extra flags.
    pub fn start(env: &TestEnv, dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let socket = dir.join("balloon.sock");
        let control = dir.join("control.sock");
        let mut args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--control".to_string(),
            control.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let child = Self::spawn(&env.backend_binary, &args)?;
        let backend = BackendProcess {
            child,
            binary: env.backend_binary.clone(),
            args,
            socket,
            control,
        };
        backend.wait_ready()?;
        Ok(backend)
    }

    fn spawn(binary: &Path, args: &[String]) -> anyhow::Result<Child> {
        Command::new(binary)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for(
            "the backend's control socket",
            Duration::from_secs(20),
            || Ok(UnixStream::connect(&self.control).ok().map(drop)),
        )
    }

    /// kill -9 the backend, then start it again with the same flags.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = Self::spawn(&self.binary, &self.args)?;
        self.wait_ready()
    }

    pub fn client(&self) -> anyhow::Result<ControlClient> {
        ControlClient::connect(&self.control)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        let signalled = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if signalled != 0
            || wait_for("the backend to exit", Duration::from_secs(5), || {
                Ok(self.child.try_wait()?.map(drop))
            })
            .is_err()
        {
            if let Err(error) = self.child.kill() {
                eprintln!("killing the backend: {error}");
            }
        }
        if let Err(error) = self.child.wait() {
            eprintln!("reaping the backend: {error}");
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop();
        }
    }
}

/// One connection to the control socket, through the protocol crate's
/// line client (deadlines and caps as host-policy has them).
pub struct ControlClient {
    conn: LineConnection,
}

/// Longest a test waits for one reply (refresh-stats may wait 60 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(70);

impl ControlClient {
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        Ok(ControlClient {
            conn: LineConnection::connect(path, Limits::default())?,
        })
    }

    pub fn request(&mut self, request: &Value) -> anyhow::Result<Value> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        self.conn.send(request.to_string().as_bytes(), deadline)?;
        let line = self.conn.next_line(deadline)?;
        serde_json::from_slice(&line)
            .with_context(|| format!("reply {:?}", String::from_utf8_lossy(&line)))
    }

    pub fn status(&mut self) -> anyhow::Result<Value> {
        let status = self.request(&serde_json::json!({"cmd": "status"}))?;
        anyhow::ensure!(status["ok"] == true, "status failed: {status}");
        Ok(status)
    }

    pub fn set_target(&mut self, bytes: u64) -> anyhow::Result<Value> {
        let reply = self.request(&serde_json::json!({"cmd": "set-target", "bytes": bytes}))?;
        anyhow::ensure!(reply["ok"] == true, "set-target failed: {reply}");
        Ok(reply)
    }

    /// Waits until the guest's `actual` equals the target.
    pub fn wait_actual(&mut self, bytes: u64, timeout: Duration) -> anyhow::Result<Value> {
        wait_for(&format!("actual = {bytes} bytes"), timeout, || {
            let status = self.status()?;
            Ok((status["actual_bytes"] == bytes).then_some(status))
        })
    }
}
