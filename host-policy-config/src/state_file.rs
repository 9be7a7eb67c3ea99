//! The state file (`[host] state_file`): what `host-policy run` leaves
//! after every tick for `host-policy status` and balloonctl.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use balloon_policy::policy::Decision;
use balloon_protocol::agent::Report as AgentReport;
use serde::{Deserialize, Serialize};

/// What `run` leaves for `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateFile {
    pub unix_s: u64,
    pub dry_run: bool,
    pub decision: Decision,
    /// The latest guest-agent report of each VM that has one.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentReport>,
    /// Each VM's connection and protocol fault counters, by name.
    #[serde(default)]
    pub errors: BTreeMap<String, BTreeMap<String, u64>>,
    /// How long the tick took, from reading the host to the last reply.
    #[serde(default)]
    pub tick_ms: u64,
    /// What the host looked like at the tick; None from a daemon before
    /// this field.
    #[serde(default)]
    pub host: Option<HostReport>,
}

/// The host as the tick read it (`host-policy status` shows it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// `meminfo`, `cgroup v1` or `cgroup v2`.
    pub source: String,
    /// The meminfo file or the cgroup's directory.
    pub path: PathBuf,
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// The host's PSI memory averages over 10 s, in percent.
    pub psi_some_avg10: Option<f64>,
    pub psi_full_avg10: Option<f64>,
    /// Where the PSI was read, or why there is none.
    pub pressure: String,
    /// The cgroup's OOM kills so far (a cgroup source on a kernel that
    /// counts them).
    pub cgroup_oom_kills: Option<u64>,
}

impl StateFile {
    /// The state file at `path`; None when it is missing or unreadable
    /// (the daemon has not run yet, or wrote something else).
    pub fn read(path: &Path) -> Option<StateFile> {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    /// Writes the state file at `path` whole: into `path` with the
    /// extension `tmp`, then renamed over it, so a reader never sees half.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, bytes)?;
        std::fs::rename(&temporary, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use balloon_policy::policy::{HostMode, PolicyMemory};

    #[test]
    fn a_written_state_reads_back_and_garbage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("state.json");
        assert!(StateFile::read(&path).is_none());
        let state = StateFile {
            unix_s: 7,
            dry_run: true,
            decision: Decision {
                mode: HostMode::Reclaim,
                host_available_percent: 12.5,
                vms: Vec::new(),
                memory: PolicyMemory::default(),
            },
            agents: BTreeMap::new(),
            errors: BTreeMap::new(),
            tick_ms: 3,
            host: Some(HostReport {
                source: "cgroup v2".into(),
                path: PathBuf::from("/sys/fs/cgroup/machine.slice"),
                psi_some_avg10: Some(1.5),
                ..HostReport::default()
            }),
        };
        state.write(&path).unwrap_or_else(|e| panic!("{e}"));
        let read = StateFile::read(&path).unwrap_or_else(|| panic!("unreadable"));
        assert_eq!((read.unix_s, read.dry_run, read.tick_ms), (7, true, 3));
        assert_eq!(read.decision, state.decision);
        assert_eq!(read.host, state.host);
        assert!(!path.with_extension("tmp").exists());
        std::fs::write(&path, "not json").unwrap_or_else(|e| panic!("{e}"));
        assert!(StateFile::read(&path).is_none());
    }
}
