//! Reads the host each tick: its memory from `[host] meminfo` or
//! `[host] cgroup` (v1 or v2, told apart by the files present), its
//! memory PSI, and a cgroup's OOM kills. Only file reading here; the
//! parsing is `meminfo_reader`'s and `host_memory`'s.

use std::io;
use std::path::{Path, PathBuf};

use balloon_policy::policy::HostState;
use host_policy_config::config::{HostSection, HostSource};
use host_policy_config::state_file::HostReport;

use crate::host_memory::{self, CgroupMemory, CgroupParseError, Pressure, PsiParseError};
use crate::meminfo_reader::parse_meminfo;

/// The whole host's memory PSI.
pub const HOST_PSI: &str = "/proc/pressure/memory";
/// The whole host's memory.
pub const HOST_MEMINFO: &str = "/proc/meminfo";

/// What the host's memory is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Meminfo,
    CgroupV1,
    CgroupV2,
}

impl SourceKind {
    /// As `check` and `status` show it.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Meminfo => "meminfo",
            SourceKind::CgroupV1 => "cgroup v1",
            SourceKind::CgroupV2 => "cgroup v2",
        }
    }

    /// The `source` label of `balloon_host_source_info`.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Meminfo => "meminfo",
            SourceKind::CgroupV1 => "cgroup_v1",
            SourceKind::CgroupV2 => "cgroup_v2",
        }
    }
}

/// The host's PSI this tick, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub enum PressureReading {
    Read {
        path: PathBuf,
        /// What the reader should know about where it came from.
        note: Option<&'static str>,
        pressure: Pressure,
    },
    Unavailable {
        why: String,
    },
}

impl PressureReading {
    pub fn some_avg10(&self) -> Option<f64> {
        match self {
            PressureReading::Read { pressure, .. } => Some(pressure.some_avg10),
            PressureReading::Unavailable { .. } => None,
        }
    }

    /// Where it was read (with the note), or why not.
    pub fn describe(&self) -> String {
        match self {
            PressureReading::Read {
                path,
                note: Some(note),
                ..
            } => format!("{} ({note})", path.display()),
            PressureReading::Read { path, .. } => path.display().to_string(),
            PressureReading::Unavailable { why } => format!("none: {why}"),
        }
    }
}

/// The host as one tick read it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostReading {
    pub kind: SourceKind,
    /// The meminfo file or the cgroup's directory.
    pub path: PathBuf,
    /// What the policy reads: total, available and PSI.
    pub state: HostState,
    /// A cgroup's limit, usage and reclaimable file pages.
    pub cgroup: Option<CgroupMemory>,
    /// A cgroup's OOM kills so far (None without a cgroup, or on a v1
    /// kernel that does not count them).
    pub cgroup_oom_kills: Option<u64>,
    pub pressure: PressureReading,
}

impl HostReading {
    /// Two lines for `check`: the source and what it reads now, in MiB;
    /// the PSI and where it came from.
    pub fn describe(&self) -> [String; 2] {
        let mib = |bytes: u64| bytes >> 20;
        let parts = self.cgroup.map_or(String::new(), |c| {
            format!(
                "limit {} MiB, usage {} MiB, reclaimable file pages {} MiB: ",
                mib(c.limit_bytes),
                mib(c.usage_bytes),
                mib(c.reclaimable_file_bytes)
            )
        });
        let oom = match (self.kind, self.cgroup_oom_kills) {
            (SourceKind::Meminfo, _) => String::new(),
            (_, Some(kills)) => format!(", OOM kills {kills}"),
            (_, None) => ", OOM kills not counted by this kernel".to_string(),
        };
        let source = format!(
            "host source: {} {}: {parts}total {} MiB, available {} MiB ({:.1}%){oom}",
            self.kind.name(),
            self.path.display(),
            mib(self.state.total_bytes),
            mib(self.state.available_bytes),
            self.state.available_percent()
        );
        let pressure = match &self.pressure {
            PressureReading::Read { pressure, .. } => format!(
                "host pressure: {}: some avg10 {:.2}%, full avg10 {}",
                self.pressure.describe(),
                pressure.some_avg10,
                pressure
                    .full_avg10
                    .map_or("-".to_string(), |full| format!("{full:.2}%"))
            ),
            PressureReading::Unavailable { why } => {
                format!("host pressure: none ({why}): the policy goes by available memory alone")
            }
        };
        [source, pressure]
    }

    /// What the state file keeps for `status`.
    pub fn report(&self) -> HostReport {
        let full = match &self.pressure {
            PressureReading::Read { pressure, .. } => pressure.full_avg10,
            PressureReading::Unavailable { .. } => None,
        };
        HostReport {
            source: self.kind.name().to_string(),
            path: self.path.clone(),
            total_bytes: self.state.total_bytes,
            available_bytes: self.state.available_bytes,
            psi_some_avg10: self.state.psi_some_avg10,
            psi_full_avg10: full,
            pressure: self.pressure.describe(),
            cgroup_oom_kills: self.cgroup_oom_kills,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("[host] meminfo {}: {source}", path.display())]
    MeminfoRead { path: PathBuf, source: io::Error },
    #[error("[host] meminfo {}: no {field} line", path.display())]
    MeminfoMissing { path: PathBuf, field: &'static str },
    #[error("[host] cgroup {}: {problem}", path.display())]
    Cgroup {
        path: PathBuf,
        problem: CgroupProblem,
    },
    #[error("[host] pressure {}: {problem}", path.display())]
    Pressure {
        path: PathBuf,
        problem: PressureProblem,
    },
}

/// Why a `[host] cgroup` directory cannot be read as the host.
#[derive(Debug, thiserror::Error)]
pub enum CgroupProblem {
    #[error("no such directory (a systemd slice's directory exists once the slice is started)")]
    NoDirectory,
    #[error("not a directory: expected a cgroup's directory, such as /sys/fs/cgroup/machine.slice (v2) or /sys/fs/cgroup/memory/machine.slice (v1)")]
    NotADirectory,
    #[error("not a memory cgroup: it has neither memory.current (cgroup v2) nor memory.usage_in_bytes (cgroup v1); a root cgroup has neither (leave cgroup out to balance the whole host), and where the v2 hierarchy has no memory controller, the v1 one is under /sys/fs/cgroup/memory")]
    NotMemory,
    #[error("reading {file}: {source}")]
    Read {
        file: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Parse(#[from] CgroupParseError),
}

#[derive(Debug, thiserror::Error)]
pub enum PressureProblem {
    #[error("{0}")]
    Read(io::Error),
    #[error(transparent)]
    Parse(#[from] PsiParseError),
}

/// Where this tick reads the PSI.
enum PressurePlan {
    /// `[host] pressure`: it must be readable.
    Configured(PathBuf),
    /// Implied by the source: unreadable means none (a kernel without PSI).
    Implied {
        path: PathBuf,
        note: Option<&'static str>,
    },
    Nothing(&'static str),
}

fn pressure_plan(host: &HostSection, kind: SourceKind, path: &Path) -> PressurePlan {
    if let Some(configured) = &host.pressure {
        return PressurePlan::Configured(configured.clone());
    }
    match kind {
        SourceKind::CgroupV2 => PressurePlan::Implied {
            path: path.join("memory.pressure"),
            note: None,
        },
        SourceKind::CgroupV1 => PressurePlan::Implied {
            path: PathBuf::from(HOST_PSI),
            note: Some("the whole host's: cgroup v1 has no per-cgroup PSI"),
        },
        SourceKind::Meminfo if path == Path::new(HOST_MEMINFO) => PressurePlan::Implied {
            path: PathBuf::from(HOST_PSI),
            note: None,
        },
        SourceKind::Meminfo => PressurePlan::Nothing(
            "the meminfo file stands in for the host; [host] pressure can name a PSI file",
        ),
    }
}

fn read_pressure(plan: PressurePlan) -> Result<PressureReading, HostError> {
    let read = |path: &Path| -> Result<Pressure, PressureProblem> {
        let text = std::fs::read_to_string(path).map_err(PressureProblem::Read)?;
        Ok(host_memory::parse_psi(&text)?)
    };
    match plan {
        PressurePlan::Configured(path) => match read(&path) {
            Ok(pressure) => Ok(PressureReading::Read {
                path,
                note: None,
                pressure,
            }),
            Err(problem) => Err(HostError::Pressure { path, problem }),
        },
        PressurePlan::Implied { path, note } => Ok(match read(&path) {
            Ok(pressure) => PressureReading::Read {
                path,
                note,
                pressure,
            },
            Err(problem) => PressureReading::Unavailable {
                why: format!("{}: {problem}", path.display()),
            },
        }),
        PressurePlan::Nothing(why) => Ok(PressureReading::Unavailable {
            why: why.to_string(),
        }),
    }
}

fn read_meminfo(path: &Path) -> Result<(u64, u64), HostError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostError::MeminfoRead {
        path: path.to_path_buf(),
        source,
    })?;
    let missing = |field| HostError::MeminfoMissing {
        path: path.to_path_buf(),
        field,
    };
    match parse_meminfo(&text) {
        (None, _) => Err(missing("MemTotal")),
        (_, None) => Err(missing("MemAvailable")),
        (Some(total), Some(available)) => Ok((total, available)),
    }
}

/// A cgroup's version, by its files.
fn cgroup_kind(directory: &Path) -> Result<SourceKind, CgroupProblem> {
    match std::fs::metadata(directory) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(CgroupProblem::NoDirectory)
        }
        Err(source) => return Err(CgroupProblem::Read { file: ".", source }),
        Ok(meta) if !meta.is_dir() => return Err(CgroupProblem::NotADirectory),
        Ok(_) => {}
    }
    if directory.join("memory.current").exists() {
        Ok(SourceKind::CgroupV2)
    } else if directory.join("memory.usage_in_bytes").exists() {
        Ok(SourceKind::CgroupV1)
    } else {
        Err(CgroupProblem::NotMemory)
    }
}

/// A cgroup's file, which must be there.
fn cgroup_file(directory: &Path, file: &'static str) -> Result<String, CgroupProblem> {
    std::fs::read_to_string(directory.join(file))
        .map_err(|source| CgroupProblem::Read { file, source })
}

/// A cgroup's file that may be absent.
fn optional_cgroup_file(
    directory: &Path,
    file: &'static str,
) -> Result<Option<String>, CgroupProblem> {
    match std::fs::read_to_string(directory.join(file)) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupProblem::Read { file, source }),
    }
}

/// A cgroup's memory and OOM kills.
fn read_cgroup(directory: &Path) -> Result<(SourceKind, CgroupMemory, Option<u64>), CgroupProblem> {
    let kind = cgroup_kind(directory)?;
    let (memory, events) = if kind == SourceKind::CgroupV2 {
        let memory = host_memory::parse_v2(
            &cgroup_file(directory, "memory.max")?,
            optional_cgroup_file(directory, "memory.high")?.as_deref(),
            &cgroup_file(directory, "memory.current")?,
            &cgroup_file(directory, "memory.stat")?,
        )?;
        (memory, "memory.events")
    } else {
        let memory = host_memory::parse_v1(
            &cgroup_file(directory, "memory.limit_in_bytes")?,
            &cgroup_file(directory, "memory.usage_in_bytes")?,
            &cgroup_file(directory, "memory.stat")?,
        )?;
        (memory, "memory.oom_control")
    };
    // Only a metric: a file that cannot be read leaves it unknown.
    let oom_kills = std::fs::read_to_string(directory.join(events))
        .ok()
        .and_then(|text| host_memory::oom_kills(&text));
    Ok((kind, memory, oom_kills))
}

/// The host now, as `[host]` says to read it.
pub fn read(host: &HostSection) -> Result<HostReading, HostError> {
    let source = host.source();
    let path = source.path().to_path_buf();
    let (kind, total_bytes, available_bytes, cgroup, cgroup_oom_kills) = match &source {
        HostSource::Meminfo(file) => {
            let (total, available) = read_meminfo(file)?;
            (SourceKind::Meminfo, total, available, None, None)
        }
        HostSource::Cgroup(directory) => {
            let (kind, memory, oom_kills) =
                read_cgroup(directory).map_err(|problem| HostError::Cgroup {
                    path: directory.clone(),
                    problem,
                })?;
            (
                kind,
                memory.limit_bytes,
                memory.available_bytes(),
                Some(memory),
                oom_kills,
            )
        }
    };
    let pressure = read_pressure(pressure_plan(host, kind, &path))?;
    Ok(HostReading {
        kind,
        state: HostState {
            total_bytes,
            available_bytes,
            psi_some_avg10: pressure.some_avg10(),
        },
        path,
        cgroup,
        cgroup_oom_kills,
        pressure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    fn cgroup_host(dir: &Path) -> HostSection {
        HostSection {
            cgroup: Some(dir.to_path_buf()),
            ..HostSection::default()
        }
    }

    #[test]
    fn a_v2_cgroup_directory_is_the_host_with_its_own_pressure() {
        let dir = tempdir();
        write(
            dir.path(),
            &[
                ("memory.max", "max\n"),
                ("memory.high", "2147483648\n"),
                ("memory.current", "1073741824\n"),
                ("memory.stat", "anon 0\nshmem 1073741824\nactive_file 1048576\ninactive_file 1048576\n"),
                ("memory.events", "low 0\nhigh 5\nmax 0\noom 1\noom_kill 2\n"),
                ("memory.pressure", "some avg10=3.50 avg60=1.00 avg300=0.20 total=9\nfull avg10=1.25 avg60=0.00 avg300=0.00 total=1\n"),
            ],
        );
        let reading = read(&cgroup_host(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reading.kind, SourceKind::CgroupV2);
        assert_eq!(
            reading.state,
            HostState {
                total_bytes: 2048 * MIB,
                available_bytes: 1024 * MIB + 2 * MIB,
                psi_some_avg10: Some(3.5),
            }
        );
        assert_eq!(reading.cgroup_oom_kills, Some(2));
        let report = reading.report();
        assert_eq!(report.psi_full_avg10, Some(1.25));
        assert!(report.pressure.ends_with("memory.pressure"), "{report:?}");
        // `[host] pressure` overrides the cgroup's own.
        write(
            dir.path(),
            &[("psi", "some avg10=40.00 avg60=0 avg300=0 total=0\n")],
        );
        let host = HostSection {
            pressure: Some(dir.path().join("psi")),
            ..cgroup_host(dir.path())
        };
        let reading = read(&host).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reading.state.psi_some_avg10, Some(40.0));
    }

    #[test]
    fn a_v1_cgroup_directory_is_the_host_with_the_host_wide_pressure() {
        let dir = tempdir();
        write(
            dir.path(),
            &[
                ("memory.limit_in_bytes", "1073741824\n"),
                ("memory.usage_in_bytes", "536870912\n"),
                (
                    "memory.stat",
                    "cache 536870912\ntotal_active_file 0\ntotal_inactive_file 4194304\n",
                ),
                ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n"),
            ],
        );
        let reading = read(&cgroup_host(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reading.kind, SourceKind::CgroupV1);
        assert_eq!(reading.state.total_bytes, 1024 * MIB);
        assert_eq!(reading.state.available_bytes, 516 * MIB);
        // An older kernel's oom_control counts no kills.
        assert_eq!(reading.cgroup_oom_kills, None);
        match &reading.pressure {
            PressureReading::Read { path, note, .. } => {
                assert_eq!(path, Path::new(HOST_PSI));
                assert!(note.is_some_and(|n| n.contains("cgroup v1")));
            }
            PressureReading::Unavailable { why } => assert!(why.contains(HOST_PSI), "{why}"),
        }
    }

    #[test]
    fn cgroup_errors_name_the_key_the_directory_and_the_reason() {
        let dir = tempdir();
        let error = |host: &HostSection| match read(host) {
            Ok(reading) => panic!("read {reading:?}"),
            Err(error) => error.to_string(),
        };
        let missing = dir.path().join("machine.slice");
        let text = error(&cgroup_host(&missing));
        assert!(
            text.starts_with("[host] cgroup ")
                && text.contains("machine.slice")
                && text.contains("no such directory"),
            "{text}"
        );
        let text = error(&cgroup_host(dir.path()));
        assert!(text.contains("not a memory cgroup"), "{text}");
        write(
            dir.path(),
            &[
                ("memory.current", "0\n"),
                ("memory.max", "max\n"),
                ("memory.high", "max\n"),
                ("memory.stat", "active_file 0\ninactive_file 0\n"),
            ],
        );
        let text = error(&cgroup_host(dir.path()));
        assert!(text.contains("no limit set"), "{text}");
        write(dir.path(), &[("memory.max", "1073741824\n")]);
        assert!(read(&cgroup_host(dir.path())).is_ok());
        std::fs::remove_file(dir.path().join("memory.stat")).unwrap_or_else(|e| panic!("{e}"));
        let text = error(&cgroup_host(dir.path()));
        assert!(text.contains("reading memory.stat"), "{text}");
        write(
            dir.path(),
            &[
                ("memory.stat", "active_file 0\ninactive_file 0\n"),
                ("memory.current", "lots\n"),
            ],
        );
        let text = error(&cgroup_host(dir.path()));
        assert!(
            text.contains("memory.current") && text.contains("\"lots\""),
            "{text}"
        );
        let file = dir.path().join("memory.max");
        let text = error(&cgroup_host(&file));
        assert!(text.contains("not a directory"), "{text}");
        // A configured pressure file must be readable; the meminfo error
        // names its key.
        write(dir.path(), &[("memory.current", "0\n")]);
        let host = HostSection {
            pressure: Some(dir.path().join("no-psi")),
            ..cgroup_host(dir.path())
        };
        let text = error(&host);
        assert!(
            text.starts_with("[host] pressure ") && text.contains("no-psi"),
            "{text}"
        );
        let host = HostSection {
            meminfo: Some(dir.path().join("no-meminfo")),
            ..HostSection::default()
        };
        let text = error(&host);
        assert!(
            text.starts_with("[host] meminfo ") && text.contains("no-meminfo"),
            "{text}"
        );
    }

    #[test]
    fn a_meminfo_file_standing_in_for_the_host_has_no_pressure_unless_named() {
        let dir = tempdir();
        write(
            dir.path(),
            &[
                ("meminfo", "MemTotal: 1048576 kB\nMemAvailable: 524288 kB\n"),
                ("psi", "some avg10=12.00 avg60=0 avg300=0 total=0\n"),
            ],
        );
        let mut host = HostSection {
            meminfo: Some(dir.path().join("meminfo")),
            ..HostSection::default()
        };
        let reading = read(&host).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reading.kind, SourceKind::Meminfo);
        assert_eq!(
            reading.state,
            HostState {
                total_bytes: 1024 * MIB,
                available_bytes: 512 * MIB,
                psi_some_avg10: None,
            }
        );
        assert!(matches!(
            reading.pressure,
            PressureReading::Unavailable { .. }
        ));
        host.pressure = Some(dir.path().join("psi"));
        let reading = read(&host).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reading.state.psi_some_avg10, Some(12.0));
        assert_eq!(reading.cgroup_oom_kills, None);
    }
}
