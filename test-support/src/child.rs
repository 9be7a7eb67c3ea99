//! A child process the tests own: stopped with SIGTERM, then SIGKILL after
//! a grace period, and always reaped, also when a test fails half-way.

use std::io;
use std::process::{Child, ExitStatus};
use std::time::Duration;

pub use rustix::process::Signal;

use crate::wait::wait_for;

/// How long a process gets to exit after SIGTERM when it is dropped.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

pub struct ChildGuard {
    child: Child,
    /// What the process is, for messages.
    what: String,
}

impl ChildGuard {
    pub fn new(what: impl Into<String>, child: Child) -> Self {
        ChildGuard {
            child,
            what: what.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status, once it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Sends `signal` (the process may have exited already: then nothing).
    pub fn signal(&mut self, signal: Signal) -> io::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| io::Error::other(format!("{}: no pid", self.what)))?;
        rustix::process::kill_process(pid, signal).map_err(io::Error::from)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let what = format!("{} to exit", self.what);
        wait_for(&what, timeout, || Ok(self.child.try_wait()?))
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; reaped
    /// either way. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let terminated = self
            .signal(Signal::TERM)
            .map_err(anyhow::Error::from)
            .and_then(|()| self.wait_exit(grace));
        match terminated {
            Ok(status) => Ok(status),
            Err(error) => {
                eprintln!("{}: {error:#}; sending SIGKILL", self.what);
                self.child.kill()?;
                self.child.wait()
            }
        }
    }

    /// SIGKILL at once and reap, for tests that simulate a crash.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.child.kill()?;
        self.child.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(error) = self.stop(DEFAULT_GRACE) {
            eprintln!("stopping {}: {error}", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    #[test]
    fn sigterm_first_then_sigkill() {
        let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let mut guard = ChildGuard::new("sleep", sleeper);
        assert!(guard.is_running());
        let status = guard.stop(Duration::from_secs(5)).unwrap();
        assert_eq!(status.signal(), Some(Signal::TERM.as_raw()));
        assert!(!guard.is_running());

        // A process that ignores SIGTERM is killed after the grace period.
        let stubborn = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; sleep 30"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new("stubborn sh", stubborn);
        // Wait until the trap is set before signalling.
        {
            use std::io::Read;
            let mut byte = [0u8; 1];
            let out = guard.child.stdout.as_mut().unwrap();
            out.read_exact(&mut byte).unwrap();
        }
        let status = guard.stop(Duration::from_millis(300)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
