//! A report of the guest's memory state, read from /proc and cgroup v2.

use std::path::{Path, PathBuf};

use crate::procfs::{parse_key_values, parse_meminfo, parse_psi};
use balloon_protocol::agent::{FromAgent, ReportReason, PROTOCOL_VERSION};

/// Where the agent reads from (a directory tree in tests).
#[derive(Clone, Debug)]
pub struct Sources {
    pub proc_dir: PathBuf,
    pub cgroup_dir: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            proc_dir: PathBuf::from("/proc"),
            cgroup_dir: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

pub use balloon_protocol::agent::{CgroupMemory, MemInfo, Report, VmStat};

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

pub fn meminfo(sources: &Sources) -> MemInfo {
    let m = parse_meminfo(&read(&sources.proc_dir.join("meminfo")).unwrap_or_default());
    let get = |k: &str| m.get(k).copied().unwrap_or(0);
    MemInfo {
        total_bytes: get("MemTotal"),
        free_bytes: get("MemFree"),
        available_bytes: get("MemAvailable"),
        page_cache_bytes: (get("Cached") + get("Buffers")).saturating_sub(get("Shmem")),
        shmem_bytes: get("Shmem"),
    }
}

pub fn collect(sources: &Sources, reason: ReportReason, seq: u64) -> Report {
    let vm = parse_key_values(&read(&sources.proc_dir.join("vmstat")).unwrap_or_default());
    let sum = |prefix: &str| {
        vm.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| *v)
            .sum::<u64>()
    };
    let get = |k: &str| vm.get(k).copied().unwrap_or(0);
    let cgroup = read(&sources.cgroup_dir.join("memory.stat")).map(|text| {
        let stat = parse_key_values(&text);
        CgroupMemory {
            anon_bytes: stat.get("anon").copied().unwrap_or(0),
            file_bytes: stat.get("file").copied().unwrap_or(0),
        }
    });
    Report {
        v: PROTOCOL_VERSION,
        reason,
        seq,
        meminfo: meminfo(sources),
        vmstat: VmStat {
            major_faults: get("pgmajfault"),
            swap_in_pages: get("pswpin"),
            swap_out_pages: get("pswpout"),
            alloc_stalls: sum("allocstall"),
            direct_scans: sum("pgscan_direct"),
            oom_kills: get("oom_kill"),
        },
        psi: read(&sources.proc_dir.join("pressure/memory")).and_then(|t| parse_psi(&t)),
        cgroup,
    }
}

/// The report as the agent sends it.
pub fn to_message(report: Report) -> FromAgent {
    FromAgent::Report(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_from_a_recorded_tree() {
        let dir = tempfile_dir();
        let proc_dir = dir.join("proc");
        std::fs::create_dir_all(proc_dir.join("pressure")).unwrap();
        std::fs::write(proc_dir.join("meminfo"), "MemTotal: 1000 kB\nMemFree: 500 kB\nMemAvailable: 700 kB\nBuffers: 10 kB\nCached: 300 kB\nShmem: 100 kB\n").unwrap();
        std::fs::write(proc_dir.join("vmstat"), "pgmajfault 5\nallocstall_normal 2\nallocstall_movable 3\noom_kill 1\npgscan_direct 9\n").unwrap();
        std::fs::write(
            proc_dir.join("pressure/memory"),
            "some avg10=3.00 avg60=1.00 avg300=0.50 total=99\n",
        )
        .unwrap();
        let sources = Sources {
            proc_dir,
            cgroup_dir: dir.join("no-cgroup"),
        };
        let report = collect(&sources, ReportReason::Timer, 4);
        assert_eq!(report.meminfo.page_cache_bytes, 210 * 1024);
        assert_eq!(report.vmstat.alloc_stalls, 5);
        assert_eq!(report.vmstat.oom_kills, 1);
        assert_eq!(report.psi.unwrap().some.avg10, 3.0);
        assert_eq!(report.cgroup, None);
        let json: serde_json::Value =
            serde_json::from_slice(&to_message(report).to_line().unwrap()).unwrap();
        assert_eq!(json["type"], "report");
        assert_eq!(json["reason"], "timer");
        assert_eq!(json["v"], 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("guest-agent-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
