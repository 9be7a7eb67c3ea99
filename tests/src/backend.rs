//! A `balloon-backend` process and a client for its control socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use balloon_protocol::control::{ControlClient, StatusReply};

use crate::env::TestEnv;
use crate::wait_for;
use test_support::ChildGuard;

/// When the tests run as root, the backend runs as this account, with no
/// rights but its socket directory (the least privileges documented in
/// docs/balloon-backend.md).
const UNPRIVILEGED_USER: &str = "nobody";

/// A uid and gid to run the backend as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// The account the backend runs as: `nobody` when the tests run as root,
/// or None (the tests' own user) otherwise.
pub fn backend_account() -> anyhow::Result<Option<Account>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let account = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&UNPRIVILEGED_USER))
        .and_then(|fields| {
            Some(Account {
                uid: fields.get(2)?.parse().ok()?,
                gid: fields.get(3)?.parse().ok()?,
            })
        })
        .with_context(|| format!("no user {UNPRIVILEGED_USER} in /etc/passwd"))?;
    Ok(Some(account))
}

/// The real, effective, saved and filesystem uids of a process.
fn process_uids(pid: u32) -> anyhow::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .context("no Uid line")?;
    line.split_whitespace()
        .map(|field| Ok(field.parse()?))
        .collect()
}

pub struct BackendProcess {
    child: ChildGuard,
    binary: PathBuf,
    args: Vec<String>,
    account: Option<Account>,
    /// Where its stderr goes (the tests' own stderr when None).
    log: Option<PathBuf>,
    pub socket: PathBuf,
    pub control: PathBuf,
}

impl BackendProcess {
    /// Starts the backend with sockets in `dir` and extra flags.
    pub fn start(env: &TestEnv, dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_logged(env, dir, extra_args, None)
    }

    /// Like `start`, with the backend's log (stderr) appended to `log`.
    pub fn start_logged(
        env: &TestEnv,
        dir: &Path,
        extra_args: &[&str],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let socket = dir.join("balloon.sock");
        let control = dir.join("control.sock");
        let mut args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--control".to_string(),
            control.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let account = backend_account()?;
        let mut binary = env.backend_binary.clone();
        if let Some(account) = account {
            // Its socket directory is the one thing the backend may write.
            std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))
                .with_context(|| format!("giving {} to the backend's user", dir.display()))?;
            // A checkout under a private home directory is out of the other
            // user's reach: run it from the directory that user owns. A hard
            // link where possible: a copy's write descriptor, inherited by a
            // process another test forks meanwhile, makes exec fail (ETXTBSY).
            let link = dir.join("balloon-backend");
            if std::fs::hard_link(&binary, &link).is_err() {
                std::fs::copy(&binary, &link).with_context(|| {
                    format!("copying {} for the backend's user", binary.display())
                })?;
            }
            binary = link;
        }
        let log = log.map(Path::to_path_buf);
        let child = Self::spawn(&binary, &args, account, log.as_deref())?;
        let backend = BackendProcess {
            child,
            binary,
            args,
            account,
            log,
            socket,
            control,
        };
        backend.wait_ready()?;
        Ok(backend)
    }

    fn spawn(
        binary: &Path,
        args: &[String],
        account: Option<Account>,
        log: Option<&Path>,
    ) -> anyhow::Result<ChildGuard> {
        let mut command = Command::new(binary);
        if let Some(account) = account {
            use std::os::unix::process::CommandExt;
            // std drops the supplementary groups when root sets a uid.
            command.uid(account.uid).gid(account.gid);
        }
        command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::inherit());
        match log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                command.stderr(file)
            }
            None => command.stderr(Stdio::inherit()),
        };
        // A copied binary stays "busy" while a process forked by another
        // test still holds the copy's descriptor; that ends at its exec.
        wait_for(
            &format!("{} to start", binary.display()),
            Duration::from_secs(10),
            || match command.spawn() {
                Ok(child) => Ok(Some(ChildGuard::new("balloon-backend", child))),
                Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) => Ok(None),
                Err(error) => {
                    Err(anyhow::Error::new(error).context(format!("starting {}", binary.display())))
                }
            },
        )
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for(
            "the backend's control socket",
            Duration::from_secs(20),
            || Ok(UnixStream::connect(&self.control).ok().map(drop)),
        )?;
        if let Some(account) = self.account {
            let uids = process_uids(self.child.pid())?;
            anyhow::ensure!(
                uids.iter().all(|uid| *uid == account.uid),
                "the backend should run as uid {} but runs as {uids:?}",
                account.uid
            );
        }
        Ok(())
    }

    /// kill -9 the backend, then start it again with the same flags.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.start_again()
    }

    /// kill -9 the backend (a crash) and reap it; `start_again` brings it
    /// back, after whatever pause the test wants in between.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        Ok(())
    }

    /// Starts the backend again with the same flags (after `kill`) and
    /// waits for its control socket.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.child = Self::spawn(&self.binary, &self.args, self.account, self.log.as_deref())?;
        self.wait_ready()
    }

    pub fn client(&self) -> anyhow::Result<ControlClient> {
        connect(&self.control)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// SIGTERM (the backend removes its sockets), SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Err(error) = self.child.stop(Duration::from_secs(5)) {
            eprintln!("stopping the backend: {error}");
        }
    }
}

/// Longest a test waits for one reply (refresh-stats may wait 60 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(70);

/// A client of the control socket at `path`, with the tests' reply timeout.
pub fn connect(path: &Path) -> anyhow::Result<ControlClient> {
    Ok(ControlClient::connect(path, REPLY_TIMEOUT)?)
}

/// What the tests wait for on a control connection.
pub trait ControlWaits {
    /// Waits until a guest's driver has negotiated its features.
    fn wait_negotiated(&mut self, timeout: Duration) -> anyhow::Result<()>;

    /// Waits until the guest reports `bytes` in the balloon and the
    /// backend has punched all of it (inflated pages wait up to 20 ms).
    fn wait_actual(&mut self, bytes: u64, timeout: Duration) -> anyhow::Result<StatusReply>;
}

impl ControlWaits for ControlClient {
    fn wait_negotiated(&mut self, timeout: Duration) -> anyhow::Result<()> {
        wait_for("the guest driver to negotiate", timeout, || {
            let status = self.status()?;
            Ok((status.connected && !status.features.is_empty()).then_some(()))
        })
    }

    fn wait_actual(&mut self, bytes: u64, timeout: Duration) -> anyhow::Result<StatusReply> {
        wait_for(
            &format!("actual = {bytes} bytes, every punch done"),
            timeout,
            || {
                let status = self.status()?;
                Ok(
                    (status.actual_bytes == bytes && status.pending_punch_bytes == 0)
                        .then_some(status),
                )
            },
        )
    }
}
