//! A `host-policy run` process for real-guest tests and the demo, with host
//! memory read from a file the caller controls.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::env::TestEnv;
use test_support::child::Signal;
use test_support::ChildGuard;

pub struct PolicyProcess {
    child: ChildGuard,
    pub meminfo: PathBuf,
    pub config: PathBuf,
    /// The daemon's state file (its last decisions, agent reports, counters).
    pub state_file: PathBuf,
}

/// Writes a meminfo file with the given host size and available memory.
pub fn write_meminfo(path: &Path, total_mib: u64, available_mib: u64) -> anyhow::Result<()> {
    let text = format!(
        "MemTotal: {} kB\nMemFree: {} kB\nMemAvailable: {} kB\n",
        total_mib * 1024,
        available_mib * 1024,
        available_mib * 1024
    );
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path).context("replacing the meminfo file")
}

impl PolicyProcess {
    /// Starts `host-policy run` for one VM whose backend control socket is
    /// `control`; `settings` are extra `[defaults]` lines.
    pub fn start(
        env: &TestEnv,
        dir: &Path,
        control: &Path,
        settings: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with_agent(env, dir, control, None, settings)
    }

    /// Like `start`, with the VM's guest-agent socket. The daemon's log goes
    /// to `host-policy.log` in `dir`.
    pub fn start_with_agent(
        env: &TestEnv,
        dir: &Path,
        control: &Path,
        agent: Option<&Path>,
        settings: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with_tables(env, dir, control, agent, settings, "")
    }

    /// Like `start_with_agent`, with more tables (`[metrics]`, …) in the
    /// configuration.
    pub fn start_with_tables(
        env: &TestEnv,
        dir: &Path,
        control: &Path,
        agent: Option<&Path>,
        settings: &str,
        tables: &str,
    ) -> anyhow::Result<Self> {
        let meminfo = dir.join("host-meminfo");
        Self::start_config(
            env,
            dir,
            &format!(
                "[host]\ninterval_s = 1\nmeminfo = {meminfo:?}\nstate_file = {:?}\n\n{tables}\n\n[defaults]\n{settings}\n\n[[vm]]\nname = \"guest\"\ncontrol = {control:?}\n{}",
                dir.join("host-policy.json"),
                agent.map_or(String::new(), |a| format!("agent = {a:?}\n"))
            ),
        )
    }

    /// Starts `host-policy run` on the configuration `config`, which should
    /// read host memory from `host-meminfo` and write its state to
    /// `host-policy.json`, both in `dir` (unless the caller wrote
    /// `host-meminfo` first, the host has 8 GiB of 16 GiB available). The
    /// daemon's log goes to `host-policy.log` in `dir`.
    pub fn start_config(env: &TestEnv, dir: &Path, config: &str) -> anyhow::Result<Self> {
        let meminfo = dir.join("host-meminfo");
        if !meminfo.exists() {
            write_meminfo(&meminfo, 16384, 8192)?;
        }
        let config_path = dir.join("host-policy.toml");
        std::fs::write(&config_path, config)?;
        let child = Command::new(&env.host_policy_binary)
            .args(["run", "--config"])
            .arg(&config_path)
            // Decisions are logged at info; tests read them whatever RUST_LOG says.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.join("host-policy.log"),
            )?))
            .spawn()
            .with_context(|| format!("starting {}", env.host_policy_binary.display()))?;
        Ok(PolicyProcess {
            child: ChildGuard::new("host-policy", child),
            meminfo,
            config: config_path,
            state_file: dir.join("host-policy.json"),
        })
    }

    /// The last state the daemon wrote; `None` before its first tick.
    pub fn state(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(&self.state_file).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Pretends the host has `available_mib` of `total_mib` available.
    pub fn set_host(&self, total_mib: u64, available_mib: u64) -> anyhow::Result<()> {
        write_meminfo(&self.meminfo, total_mib, available_mib)
    }

    /// SIGTERM; host-policy must exit within 10 s by itself.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.child.signal(Signal::TERM)?;
        self.child.wait_exit(Duration::from_secs(10)).map(drop)
    }
}
