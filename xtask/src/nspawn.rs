//! A Debian root booted under a real systemd as PID 1 (`systemd-nspawn
//! --register=no --keep-unit -b`), driven from the host with `nsenter`
//! into its namespaces. The root's `/run/balloon` is a directory of the
//! host bound into it, so QEMU and the tests on the host reach the
//! sockets the root's services make.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::provision::{ensure_packages, output, succeed};

/// The longest a boot to `running` may take.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);
/// The longest `systemctl poweroff` may take before nspawn is killed.
const POWEROFF_DEADLINE: Duration = Duration::from_secs(30);
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// A unit's state, from `systemctl show`.
#[derive(Debug, Clone, Default)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    pub result: String,
    pub restarts: u32,
    /// In the root's PID namespace; 0 when nothing runs.
    pub main_pid: u32,
}

impl UnitState {
    pub fn running(&self) -> bool {
        self.active == "active" && self.sub == "running"
    }
}

pub struct Booted {
    /// The root's directory on the host.
    pub root: PathBuf,
    /// The host directory bound at the root's /run/balloon, if one is.
    pub runtime: Option<PathBuf>,
    nspawn: Child,
    leader: u32,
    log: PathBuf,
    _scratch: tempfile::TempDir,
}

/// The pid of a child of `parent` whose command is `comm`.
fn child_named(parent: u32, comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent)
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == comm)
        })
}

impl Booted {
    /// Copies `template` and boots the copy, its /run/balloon bound to a
    /// directory of the host; returns once its systemd reports `running`
    /// (or `degraded`: then the failed units are printed).
    pub fn boot(template: &Path, label: &str) -> anyhow::Result<Booted> {
        // On disk, not in a /tmp that may be a nodev tmpfs (and would hold
        // a whole root in memory).
        let scratch = tempfile::Builder::new()
            .prefix("balloon-root")
            .tempdir_in("/var/tmp")?;
        let root = scratch.path().join("root");
        let runtime = scratch.path().join("run-balloon");
        std::fs::create_dir(&runtime)?;
        succeed(Command::new("cp").arg("-a").arg(template).arg(&root))?;
        let bind = format!("--bind={}:/run/balloon", runtime.display());
        Self::boot_root(scratch, root, Some(runtime), label, &[bind], &[])
    }

    /// Boots `root` (inside `scratch`, which goes with the result) with
    /// `args` for systemd-nspawn and `env` for it (`SYSTEMD_NSPAWN_*`).
    pub fn boot_root(
        scratch: tempfile::TempDir,
        root: PathBuf,
        runtime: Option<PathBuf>,
        label: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Booted> {
        ensure_packages(&[
            ("systemd-nspawn", "systemd-container"),
            ("nsenter", "util-linux"),
        ])?;
        // The host's resolver, for apt inside the root.
        std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))?;
        let log = scratch.path().join("console.log");
        let nspawn = Command::new("systemd-nspawn")
            .args(["--register=no", "--keep-unit", "--quiet", "-b", "--pipe"])
            .arg("-D")
            .arg(&root)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::create(
                scratch.path().join("nspawn.err"),
            )?))
            .spawn()
            .context("starting systemd-nspawn")?;
        let nspawn_pid = nspawn.id();
        let mut booted = Booted {
            root,
            runtime,
            nspawn,
            leader: 0,
            log,
            _scratch: scratch,
        };
        let leader = test_support::wait::wait_for_every(
            &format!("{label}: systemd to start as the root's PID 1"),
            BOOT_DEADLINE,
            Duration::from_millis(100),
            || {
                if let Some(status) = booted.nspawn.try_wait()? {
                    anyhow::bail!("systemd-nspawn exited ({status}): {}", booted.diagnostics());
                }
                Ok(child_named(nspawn_pid, "systemd"))
            },
        )?;
        booted.leader = leader;
        let state = test_support::wait::wait_for_every(
            &format!("{label}: the boot to finish"),
            BOOT_DEADLINE,
            Duration::from_millis(250),
            || {
                let out = output(booted.command("systemctl").arg("is-system-running"))?;
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok(matches!(state.as_str(), "running" | "degraded").then_some(state))
            },
        )?;
        if state == "degraded" {
            eprintln!(
                "[systemd] {label}: booted degraded; failed units:\n{}",
                booted.systemctl(&["--failed", "--no-pager", "--plain"])?
            );
        }
        Ok(booted)
    }

    /// `program` run inside the root: its mount, PID, IPC, UTS, network
    /// and cgroup namespaces, a clean environment.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.leader.to_string())
            .args(["-a", "--"])
            .arg(program)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8");
        command
    }

    /// Runs `program args` inside; its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        succeed(self.command(program).args(args))
    }

    pub fn systemctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run("systemctl", args)
    }

    /// The root's systemd version (252, 254, ...).
    pub fn systemd_version(&self) -> anyhow::Result<(u32, String)> {
        let text = self.systemctl(&["--version"])?;
        let first = text.lines().next().unwrap_or_default().to_string();
        let major = first
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no version in {first:?}"))?;
        Ok((major, first))
    }

    pub fn unit_state(&self, unit: &str) -> anyhow::Result<UnitState> {
        let text = self.systemctl(&[
            "show",
            "-p",
            "ActiveState,SubState,Result,NRestarts,MainPID",
            unit,
        ])?;
        let mut state = UnitState::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("ActiveState", v)) => state.active = v.to_string(),
                Some(("SubState", v)) => state.sub = v.to_string(),
                Some(("Result", v)) => state.result = v.to_string(),
                Some(("NRestarts", v)) => state.restarts = v.parse().unwrap_or(0),
                Some(("MainPID", v)) => state.main_pid = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(state)
    }

    /// The unit's journal (its last 40 lines), which says why a unit
    /// failed: what an operator reads with `journalctl -u UNIT`.
    pub fn journal(&self, unit: &str) -> String {
        match self.run(
            "journalctl",
            &["-u", unit, "-n", "40", "--no-pager", "-o", "short-precise"],
        ) {
            Ok(text) => text,
            Err(error) => format!("(journalctl -u {unit} failed: {error:#})"),
        }
    }

    /// Waits until `unit` runs and `ready` (given its state) says its
    /// daemon did its first job; fails at once, with the unit's journal, if it fails or systemd
    /// restarts it (`restarts_before` is its NRestarts beforehand).
    pub fn wait_running(
        &self,
        unit: &str,
        restarts_before: u32,
        timeout: Duration,
        mut ready: impl FnMut(&UnitState) -> anyhow::Result<bool>,
    ) -> anyhow::Result<UnitState> {
        let waited = test_support::wait::wait_for_every(
            &format!("{unit} to run"),
            timeout,
            Duration::from_millis(200),
            || {
                let state = self.unit_state(unit)?;
                if state.active == "failed"
                    || state.sub == "auto-restart"
                    || state.restarts > restarts_before
                {
                    anyhow::bail!(
                        "{unit} failed ({}/{}, result {}, restarted {} times); journalctl -u {unit}:\n{}",
                        state.active,
                        state.sub,
                        state.result,
                        state.restarts,
                        self.journal(unit)
                    );
                }
                Ok((state.running() && ready(&state)?).then_some(state))
            },
        );
        waited.map_err(|error| {
            if error.to_string().contains("journalctl -u") {
                error
            } else {
                error.context(format!("journalctl -u {unit}:\n{}", self.journal(unit)))
            }
        })
    }

    /// A path of the root as the host sees it (not under /run, which is
    /// the root's own tmpfs; /run/balloon is `runtime` when bound).
    pub fn path(&self, inside: &str) -> PathBuf {
        match (inside.strip_prefix("/run/balloon"), &self.runtime) {
            (Some(rest), Some(runtime)) => runtime.join(rest.trim_start_matches('/')),
            _ => self.root.join(inside.trim_start_matches('/')),
        }
    }

    /// The root as its own processes see it (its /dev, /proc and /run
    /// included), through its PID 1's /proc entry.
    pub fn inside_root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader))
    }

    /// Pids (the host's) of the processes in the root whose command is
    /// `comm`.
    pub fn processes_named(&self, comm: &str) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
                    && std::fs::read_link(format!("/proc/{pid}/root"))
                        .is_ok_and(|root| root == self.root)
            })
            .collect()
    }

    fn diagnostics(&self) -> String {
        let console = std::fs::read_to_string(&self.log).unwrap_or_default();
        let errors =
            std::fs::read_to_string(self.log.with_file_name("nspawn.err")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        format!(
            "nspawn: {errors}\nconsole (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// `systemctl poweroff`, and waits for systemd-nspawn to end.
    pub fn poweroff(mut self) -> anyhow::Result<()> {
        self.systemctl(&["poweroff", "--no-block"])?;
        let status = test_support::wait::wait_for_every(
            "the root to power off",
            POWEROFF_DEADLINE,
            Duration::from_millis(200),
            || Ok(self.nspawn.try_wait()?),
        )?;
        anyhow::ensure!(
            status.success(),
            "systemd-nspawn ended with {status}: {}",
            self.diagnostics()
        );
        Ok(())
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM asks nspawn to power the root off; SIGKILL if it hangs.
        if let Err(error) = Command::new("kill")
            .arg(self.nspawn.id().to_string())
            .status()
        {
            eprintln!("[systemd] stopping systemd-nspawn: {error}");
        }
        let ended = test_support::wait::wait_for_every(
            "systemd-nspawn to end",
            POWEROFF_DEADLINE,
            Duration::from_millis(200),
            || Ok(self.nspawn.try_wait()?),
        );
        if ended.is_err() {
            if let Err(error) = self.nspawn.kill().and_then(|()| self.nspawn.wait()) {
                eprintln!("[systemd] killing systemd-nspawn: {error}");
            }
        }
    }
}
