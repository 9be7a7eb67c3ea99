//! `host-policy.toml`: parsing and validation. Range checks run inside
//! deserialisation, so the TOML parser reports them with file, line, column
//! and key; unknown keys are errors; relations between keys are checked
//! afterwards and name both keys.

use std::fmt;
use std::path::{Path, PathBuf};

use balloon_policy::policy::HostThresholds;
use balloon_policy::{PolicyKind, VmPolicy, MIB};
use serde::{Deserialize, Deserializer};

/// An integer that must lie in `MIN..=MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bounded<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match u64::try_from(value) {
            Ok(v) if (MIN..=MAX).contains(&v) => Ok(Bounded(v)),
            _ => Err(serde::de::Error::custom(format!(
                "must be between {MIN} and {MAX}, got {value}"
            ))),
        }
    }
}

impl<const MIN: u64, const MAX: u64> fmt::Display for Bounded<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A percentage with decimals (PSI averages are), between 0.1 and 100.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl Percent {
    pub const MIN: f64 = 0.1;
    pub const MAX: f64 = 100.0;
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if value.is_finite() && (Self::MIN..=Self::MAX).contains(&value) {
            Ok(Percent(value))
        } else {
            Err(serde::de::Error::custom(format!(
                "must be between {} and {} (decimals allowed), got {value}",
                Self::MIN,
                Self::MAX
            )))
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// Seconds between policy ticks.
    #[serde(default = "defaults::interval_s")]
    pub interval_s: Bounded<1, 3600>,
    /// Where host memory is read, /proc/meminfo when unset (a file of its
    /// format makes tests and simulations possible). Not with `cgroup`.
    #[serde(default)]
    pub meminfo: Option<PathBuf>,
    /// A memory cgroup's directory (v2, or a v1 memory-controller one):
    /// the host host-policy balances is that cgroup, its limit the total.
    /// Not with `meminfo`.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Where the host's memory PSI is read (/proc/pressure/memory's
    /// format). Unset: a v2 `cgroup`'s memory.pressure, else
    /// /proc/pressure/memory, except with a `meminfo` file other than
    /// /proc/meminfo (a stand-in host has no PSI).
    #[serde(default)]
    pub pressure: Option<PathBuf>,
    /// The host's PSI memory `some` avg10 (percent) at or above which it
    /// is under pressure whatever its available memory: at least reclaim,
    /// hard at twice it.
    #[serde(default = "defaults::psi_some_avg10")]
    pub psi_some_avg10: Percent,
    /// Host MemAvailable below this percent of MemTotal: start reclaiming.
    #[serde(default = "defaults::reclaim_start_percent")]
    pub reclaim_start_percent: Bounded<1, 99>,
    /// Below this percent: reclaim with the larger (hard) steps.
    #[serde(default = "defaults::reclaim_hard_percent")]
    pub reclaim_hard_percent: Bounded<0, 98>,
    /// Above this percent: give memory back gradually.
    #[serde(default = "defaults::give_back_percent")]
    pub give_back_percent: Bounded<2, 100>,
    /// Where `run` writes its last decisions for `status`.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Which policy sets the targets: ours, or a peer's for operators who
    /// come from it (`docs/host-policy.md`, "Baseline policies").
    #[serde(default)]
    pub policy: PolicyKind,
    /// Where libvirt makes the host ends of its channels, searched for each
    /// VM's guest-agent port; unset: both of libvirt's places
    /// (`balloon_protocol::agent::LIBVIRT_CHANNEL_ROOTS`), empty: nowhere.
    #[serde(default)]
    pub libvirt_channel_dirs: Option<Vec<PathBuf>>,
}

impl HostSection {
    /// The thresholds the policies read.
    pub fn thresholds(&self) -> HostThresholds {
        HostThresholds {
            reclaim_start_percent: self.reclaim_start_percent.0,
            reclaim_hard_percent: self.reclaim_hard_percent.0,
            give_back_percent: self.give_back_percent.0,
            psi_some_avg10: self.psi_some_avg10.0,
        }
    }

    /// Where the host's memory is read.
    pub fn source(&self) -> HostSource {
        match (&self.cgroup, &self.meminfo) {
            (Some(directory), _) => HostSource::Cgroup(directory.clone()),
            (None, Some(file)) => HostSource::Meminfo(file.clone()),
            (None, None) => HostSource::Meminfo(defaults::meminfo()),
        }
    }
}

/// Where host-policy reads the host's memory (`[host] meminfo` or
/// `[host] cgroup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostSource {
    /// /proc/meminfo, or a file of its format: the whole host.
    Meminfo(PathBuf),
    /// A memory cgroup's directory, v1 or v2 (told apart by its files).
    Cgroup(PathBuf),
}

impl HostSource {
    /// The key that set it.
    pub fn key(&self) -> &'static str {
        match self {
            HostSource::Meminfo(_) => "meminfo",
            HostSource::Cgroup(_) => "cgroup",
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            HostSource::Meminfo(path) | HostSource::Cgroup(path) => path,
        }
    }
}

/// Per-VM settings; `[defaults]` gives them for every VM, `[[vm]]` may
/// override. One type for both tables (rather than `serde(flatten)`, which
/// would cost the parser its line numbers); `name`, `control` and `agent`
/// belong to `[[vm]]` only, which `Config::parse` enforces.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub name: Option<String>,
    pub control: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    /// The largest balloon, in percent of guest RAM (VMware's vmmemctl limit).
    pub max_reclaim_percent: Option<Bounded<0, 75>>,
    /// The guest keeps at least this much available memory (MiB)...
    pub min_free_mib: Option<Bounded<0, 1048576>>,
    /// ...and at least this percent of its RAM, whichever is larger.
    pub min_free_percent: Option<Bounded<0, 90>>,
    /// Relative priority: a VM with twice the shares gives half as much.
    pub shares: Option<Bounded<1, 100000>>,
    /// Largest inflate per tick (MiB).
    pub inflate_step_mib: Option<Bounded<1, 1048576>>,
    /// Largest inflate per tick when the host is below the hard threshold (MiB).
    pub hard_inflate_step_mib: Option<Bounded<1, 1048576>>,
    /// Deflate per tick when giving back or under guest pressure (MiB).
    pub deflate_step_mib: Option<Bounded<1, 1048576>>,
    /// After guest pressure, no inflation for this long (seconds).
    pub pressure_cooldown_s: Option<Bounded<0, 86400>>,
    /// Statistics older than this are stale: the VM is not inflated (seconds).
    pub stats_max_age_s: Option<Bounded<1, 86400>>,
    /// Target changes smaller than this are not applied (MiB).
    pub min_change_mib: Option<Bounded<0, 65536>>,
    /// Major faults per tick above which the guest counts as under pressure.
    pub major_faults_per_tick: Option<Bounded<1, 100000000>>,
    /// Guest PSI memory `some` avg10 (percent) above which it is under pressure.
    pub psi_some_avg10: Option<Percent>,
}

/// `settings` over `base`.
pub fn resolve(settings: &VmSettings, base: &VmPolicy) -> VmPolicy {
    settings.resolve(base)
}

impl VmSettings {
    /// `self` over `base`.
    fn resolve(&self, base: &VmPolicy) -> VmPolicy {
        let mib = |v: Option<Bounded<0, 1048576>>, d: u64| v.map_or(d, |b| b.0.saturating_mul(MIB));
        let step =
            |v: Option<Bounded<1, 1048576>>, d: u64| v.map_or(d, |b| b.0.saturating_mul(MIB));
        VmPolicy {
            max_reclaim_percent: self
                .max_reclaim_percent
                .map_or(base.max_reclaim_percent, |b| b.0),
            min_free_bytes: mib(self.min_free_mib, base.min_free_bytes),
            min_free_percent: self.min_free_percent.map_or(base.min_free_percent, |b| b.0),
            shares: self.shares.map_or(base.shares, |b| b.0),
            inflate_step_bytes: step(self.inflate_step_mib, base.inflate_step_bytes),
            hard_inflate_step_bytes: step(self.hard_inflate_step_mib, base.hard_inflate_step_bytes),
            deflate_step_bytes: step(self.deflate_step_mib, base.deflate_step_bytes),
            pressure_cooldown_s: self
                .pressure_cooldown_s
                .map_or(base.pressure_cooldown_s, |b| b.0),
            stats_max_age_s: self.stats_max_age_s.map_or(base.stats_max_age_s, |b| b.0),
            min_change_bytes: self
                .min_change_mib
                .map_or(base.min_change_bytes, |b| b.0.saturating_mul(MIB)),
            major_faults_per_tick: self
                .major_faults_per_tick
                .map_or(base.major_faults_per_tick, |b| b.0),
            psi_some_avg10: self.psi_some_avg10.map_or(base.psi_some_avg10, |b| b.0),
        }
    }
}

/// One VM of the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct VmEntry {
    pub name: String,
    /// The VM's balloon-backend control socket.
    pub control: PathBuf,
    /// The VM's guest-agent socket, when it has one.
    pub agent: Option<PathBuf>,
    pub settings: VmSettings,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiscoverSection {
    /// Every `*.ctl` socket here is a VM named after the file.
    pub directory: PathBuf,
    #[serde(default = "defaults::suffix")]
    pub suffix: String,
}

/// Where `[metrics]` serves Prometheus's text format.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.starts_with('/') {
            return Ok(MetricsListen::Unix(PathBuf::from(text)));
        }
        text.parse().map(MetricsListen::Tcp).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected an address and port such as \"127.0.0.1:9848\", or an absolute Unix socket path, got {text:?}"
            ))
        })
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Tcp(address) => write!(f, "http://{address}/metrics"),
            MetricsListen::Unix(path) => {
                write!(f, "{} (HTTP over a Unix socket), /metrics", path.display())
            }
        }
    }
}

/// `[metrics]`: off unless present.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: MetricsListen,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host: Option<HostSection>,
    metrics: Option<MetricsSection>,
    #[serde(default)]
    defaults: VmSettings,
    #[serde(default)]
    vm: Vec<VmSettings>,
    discover: Option<DiscoverSection>,
}

/// The keys of one table with where each value stands in the file.
type KeySpans = std::collections::BTreeMap<String, toml::Spanned<toml::Value>>;

/// Where the tables and keys stand in the file, so that errors found after
/// parsing (relations between keys, `[[vm]]` entries) name the line of the
/// key or entry at fault rather than a guess.
#[derive(Debug, Default, Deserialize)]
struct Locations {
    host: Option<toml::Spanned<KeySpans>>,
    defaults: Option<toml::Spanned<KeySpans>>,
    #[serde(default)]
    vm: Vec<toml::Spanned<KeySpans>>,
}

/// The 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}

impl Locations {
    fn parse(text: &str) -> Locations {
        // The text already parsed as a RawConfig, so this cannot fail in
        // practice; an empty map only costs the errors their precision.
        toml::from_str(text).unwrap_or_default()
    }

    /// The line of the first of `keys` set in `table`, else of the table
    /// itself, else line 1.
    fn line(text: &str, table: Option<&toml::Spanned<KeySpans>>, keys: &[&str]) -> usize {
        let Some(table) = table else { return 1 };
        keys.iter()
            .find_map(|key| table.get_ref().get(*key))
            .map_or_else(
                || line_at(text, table.span().start),
                |value| line_at(text, value.span().start),
            )
    }
}

mod defaults {
    use super::Bounded;
    use std::path::PathBuf;

    pub fn interval_s() -> Bounded<1, 3600> {
        Bounded(5)
    }
    pub fn meminfo() -> PathBuf {
        PathBuf::from("/proc/meminfo")
    }
    pub fn psi_some_avg10() -> super::Percent {
        super::Percent(10.0)
    }
    pub fn reclaim_start_percent() -> Bounded<1, 99> {
        Bounded(20)
    }
    pub fn reclaim_hard_percent() -> Bounded<0, 98> {
        Bounded(10)
    }
    pub fn give_back_percent() -> Bounded<2, 100> {
        Bounded(35)
    }
    pub fn suffix() -> String {
        ".ctl".into()
    }
}

impl Default for HostSection {
    fn default() -> Self {
        HostSection {
            interval_s: defaults::interval_s(),
            meminfo: None,
            cgroup: None,
            pressure: None,
            psi_some_avg10: defaults::psi_some_avg10(),
            reclaim_start_percent: defaults::reclaim_start_percent(),
            reclaim_hard_percent: defaults::reclaim_hard_percent(),
            give_back_percent: defaults::give_back_percent(),
            state_file: None,
            policy: Default::default(),
            libvirt_channel_dirs: None,
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub host: HostSection,
    pub defaults: VmPolicy,
    pub vms: Vec<VmEntry>,
    pub discover: Option<DiscoverSection>,
    pub metrics: Option<MetricsSection>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax, type, range and unknown-key errors, with line and column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Something the whole file lacks, so no line is at fault.
    #[error("{path}: {message}")]
    Incomplete { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: error.to_string().trim_end().to_string(),
        })?;
        let locations = Locations::parse(text);
        let at = |line: usize, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            message,
        };
        let host_line = |keys: &[&str]| Locations::line(text, locations.host.as_ref(), keys);
        let host = raw.host.unwrap_or_default();
        check_host(&host).map_err(|(keys, message)| at(host_line(keys), message))?;
        let defaults_line =
            |keys: &[&str]| Locations::line(text, locations.defaults.as_ref(), keys);
        if raw.defaults.name.is_some()
            || raw.defaults.control.is_some()
            || raw.defaults.agent.is_some()
        {
            return Err(at(
                defaults_line(&["name", "control", "agent"]),
                "[defaults] cannot set name, control or agent: those belong to a [[vm]]".into(),
            ));
        }
        const STEP_KEYS: [&str; 2] = ["deflate_step_mib", "inflate_step_mib"];
        let defaults = raw.defaults.resolve(&VmPolicy::default());
        check_steps("defaults", &defaults).map_err(|m| at(defaults_line(&STEP_KEYS), m))?;
        let mut names = std::collections::BTreeSet::new();
        let mut vms = Vec::new();
        for (index, settings) in raw.vm.iter().enumerate() {
            let entry = locations.vm.get(index);
            let entry_line = |keys: &[&str]| Locations::line(text, entry, keys);
            let name = settings
                .name
                .clone()
                .ok_or_else(|| at(entry_line(&[]), "[[vm]] needs a name".into()))?;
            let control = settings.control.clone().ok_or_else(|| {
                at(
                    entry_line(&[]),
                    format!("vm {name:?} needs control (its balloon-backend control socket)"),
                )
            })?;
            check_vm_name(&name).map_err(|m| at(entry_line(&["name"]), m))?;
            if !names.insert(name.clone()) {
                return Err(at(
                    entry_line(&["name"]),
                    format!("vm name {name:?} appears twice"),
                ));
            }
            check_steps(&format!("vm {name:?}"), &settings.resolve(&defaults))
                .map_err(|m| at(entry_line(&STEP_KEYS), m))?;
            vms.push(VmEntry {
                name,
                control,
                agent: settings.agent.clone(),
                settings: settings.clone(),
            });
        }
        if raw.vm.is_empty() && raw.discover.is_none() {
            return Err(ConfigError::Incomplete {
                path: path.to_path_buf(),
                message: "no VMs: add [[vm]] entries (name, control) or a [discover] directory"
                    .into(),
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            host,
            defaults,
            vms,
            discover: raw.discover,
            metrics: raw.metrics,
        })
    }

    /// Settings of a VM: its own entry over `[defaults]`.
    pub fn policy_for(&self, name: &str) -> VmPolicy {
        self.vms.iter().find(|vm| vm.name == name).map_or_else(
            || self.defaults.clone(),
            |vm| vm.settings.resolve(&self.defaults),
        )
    }
}

/// The host thresholds must be ordered hard < start < give back, and the
/// host is read from one source; on error, the keys to point at and the
/// message.
pub fn check_host(host: &HostSection) -> Result<(), (&'static [&'static str], String)> {
    if let (Some(cgroup), Some(meminfo)) = (&host.cgroup, &host.meminfo) {
        return Err((
            &["cgroup", "meminfo"],
            format!(
                "host.cgroup ({}) and host.meminfo ({}) are both set: the host is either a memory cgroup (cgroup = its directory) or the whole machine (meminfo = /proc/meminfo or a file of its format); remove one",
                cgroup.display(),
                meminfo.display()
            ),
        ));
    }
    let (hard, start, give_back) = (
        host.reclaim_hard_percent.0,
        host.reclaim_start_percent.0,
        host.give_back_percent.0,
    );
    if hard >= start {
        return Err((
            &["reclaim_hard_percent", "reclaim_start_percent"],
            format!("host.reclaim_hard_percent ({hard}) must be below host.reclaim_start_percent ({start})"),
        ));
    }
    if start >= give_back {
        return Err((
            &["give_back_percent", "reclaim_start_percent"],
            format!("host.give_back_percent ({give_back}) must be above host.reclaim_start_percent ({start}), leaving a dead band between them"),
        ));
    }
    Ok(())
}

/// A VM name: non-empty, no whitespace (it is used in logs and file names).
pub fn check_vm_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("vm name {name:?} must be non-empty without spaces"));
    }
    Ok(())
}

/// Deflate must be at least as fast as inflate (giving back is urgent).
pub fn check_steps(what: &str, policy: &VmPolicy) -> Result<(), String> {
    if policy.deflate_step_bytes < policy.inflate_step_bytes {
        return Err(format!(
            "{what}: deflate_step_mib ({}) must be at least inflate_step_mib ({}): deflating is the urgent direction",
            policy.deflate_step_bytes / MIB,
            policy.inflate_step_bytes / MIB
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("host-policy.toml"), text)
    }

    const MINIMAL: &str = "[[vm]]\nname = \"web1\"\ncontrol = \"/run/balloon/web1.ctl\"\n";

    #[test]
    fn the_policy_is_one_of_four() {
        let config = parse(&format!("[host]\npolicy = \"proxmox\"\n{MINIMAL}")).unwrap();
        assert_eq!(config.host.policy, PolicyKind::Proxmox);
        assert_eq!(
            parse(MINIMAL).unwrap().host.policy,
            PolicyKind::BalloonStack
        );
        let error = parse(&format!("[host]\npolicy = \"vmware\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("policy")
                && error.contains("`balloon-stack`, `mom`, `proxmox`, `esx-idle-tax`"),
            "{error}"
        );
    }

    #[test]
    fn psi_thresholds_take_decimals_within_their_range() {
        let config = parse(&format!("[defaults]\npsi_some_avg10 = 2.5\n{MINIMAL}")).unwrap();
        assert_eq!(config.policy_for("web1").psi_some_avg10, 2.5);
        let config = parse(&format!("[defaults]\npsi_some_avg10 = 7\n{MINIMAL}")).unwrap();
        assert_eq!(config.policy_for("web1").psi_some_avg10, 7.0);
        for bad in ["0.05", "101", "-1", "nan"] {
            let error = parse(&format!("[defaults]\npsi_some_avg10 = {bad}\n{MINIMAL}"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("psi_some_avg10") && error.contains("between 0.1 and 100"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn the_host_is_a_cgroup_or_meminfo_never_both() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(
            config.host.source(),
            HostSource::Meminfo(PathBuf::from("/proc/meminfo"))
        );
        assert_eq!(config.host.psi_some_avg10, Percent(10.0));
        assert_eq!(config.host.thresholds().psi_some_avg10, 10.0);
        let config = parse(&format!(
            "[host]\ncgroup = \"/sys/fs/cgroup/machine.slice\"\npsi_some_avg10 = 2.5\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            config.host.source(),
            HostSource::Cgroup(PathBuf::from("/sys/fs/cgroup/machine.slice"))
        );
        assert_eq!(config.host.source().key(), "cgroup");
        assert_eq!(config.host.thresholds().psi_some_avg10, 2.5);
        let text = format!(
            "[host]\ninterval_s = 5\nmeminfo = \"/proc/meminfo\"\ncgroup = \"/sys/fs/cgroup/machine.slice\"\n{MINIMAL}"
        );
        let error = parse(&text).unwrap_err().to_string();
        assert!(
            error.contains("host.cgroup")
                && error.contains("host.meminfo")
                && error.contains("remove one"),
            "{error}"
        );
        assert_eq!(error_line(&text), 4, "the cgroup line");
        for bad in ["0", "100.5", "-3"] {
            let error = parse(&format!("[host]\npsi_some_avg10 = {bad}\n{MINIMAL}"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("psi_some_avg10") && error.contains("between 0.1 and 100"),
                "{bad}: {error}"
            );
        }
        let config = parse(&format!("[host]\npressure = \"/tmp/psi\"\n{MINIMAL}")).unwrap();
        assert_eq!(config.host.pressure, Some(PathBuf::from("/tmp/psi")));
    }

    #[test]
    fn defaults_apply_and_vm_settings_override_them() {
        let config = parse(&format!(
            "[defaults]\nshares = 500\n{MINIMAL}max_reclaim_percent = 40\n"
        ))
        .unwrap();
        assert_eq!(config.host.interval_s.0, 5);
        let policy = config.policy_for("web1");
        assert_eq!(policy.max_reclaim_percent, 40);
        assert_eq!(policy.shares, 500);
        assert_eq!(policy.min_free_bytes, 128 * MIB);
        assert_eq!(config.policy_for("other").max_reclaim_percent, 65);
    }

    #[test]
    fn out_of_range_values_name_line_column_key_and_range() {
        let error = parse(&format!("{MINIMAL}max_reclaim_percent = 80\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("host-policy.toml"), "{error}");
        assert!(error.contains("line 4"), "{error}");
        assert!(error.contains("column"), "{error}");
        assert!(error.contains("max_reclaim_percent"), "{error}");
        assert!(error.contains("between 0 and 75, got 80"), "{error}");
        let error = parse(&format!("[host]\ninterval_s = 0\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 2") && error.contains("between 1 and 3600"),
            "{error}"
        );
        let error = parse(&format!("[defaults]\nshares = -3\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("got -3"), "{error}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors() {
        let error = parse(&format!("[host]\nintervall_s = 5\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("intervall_s") && error.contains("line 2"),
            "{error}"
        );
        let error = parse(&format!("{MINIMAL}colour = \"red\"\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("colour"), "{error}");
        let error = parse(&format!("[host]\ninterval_s = \"5\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("interval_s") || error.contains("line 2"),
            "{error}"
        );
        let error = parse("[host]\n\n[[vm]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("control") && error.contains("host-policy.toml:3:"),
            "{error}"
        );
        let error = parse(&format!("[defaults]\nname = \"x\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("[defaults] cannot set name"), "{error}");
        assert!(parse("this is not toml").is_err());
    }

    #[test]
    fn relations_between_keys_are_checked() {
        let error = parse(&format!(
            "[host]\nreclaim_hard_percent = 30\nreclaim_start_percent = 20\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("host-policy.toml:2:") && error.contains("reclaim_start_percent"),
            "{error}"
        );
        let error = parse(&format!(
            "[host]\nreclaim_start_percent = 40\ngive_back_percent = 40\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("give_back_percent (40)"), "{error}");
        let error = parse(&format!(
            "[defaults]\ninflate_step_mib = 512\ndeflate_step_mib = 64\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("deflate_step_mib (64)"), "{error}");
        let error = parse(&format!("{MINIMAL}{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("appears twice"), "{error}");
        let error = parse("[host]\ninterval_s = 5\n").unwrap_err().to_string();
        assert!(error.contains("no VMs"), "{error}");
        assert!(parse("[discover]\ndirectory = \"/run/balloon\"\n").is_ok());
    }

    /// The line number in an error, `host-policy.toml:N: ...`.
    fn error_line(text: &str) -> usize {
        let error = parse(text).unwrap_err().to_string();
        error
            .strip_prefix("host-policy.toml:")
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no line in {error:?}"))
    }

    #[test]
    fn errors_about_vm_entries_name_the_entry_at_fault() {
        // The same key set validly earlier in the file must not be named.
        let text = "[defaults]\ndeflate_step_mib = 512\n\n\
                    [[vm]]\nname = \"a\"\ncontrol = \"/a\"\ndeflate_step_mib = 512\n\n\
                    [[vm]]\nname = \"b\"\ncontrol = \"/b\"\ninflate_step_mib = 300\ndeflate_step_mib = 100\n";
        assert_eq!(error_line(text), 13, "vm b's deflate_step_mib");
        // Inherited deflate step, the entry's own inflate step at fault.
        let text = "[[vm]]\nname = \"a\"\ncontrol = \"/a\"\n\n[[vm]]\nname = \"b\"\ncontrol = \"/b\"\ninflate_step_mib = 300\n";
        assert_eq!(error_line(text), 8);
        // A duplicate names the second entry's name.
        let text =
            "[[vm]]\nname = \"a\"\ncontrol = \"/a\"\n[[vm]]\ncontrol = \"/b\"\nname = \"a\"\n";
        assert_eq!(error_line(text), 6);
        // An entry without a name: its own header line.
        let text = "[[vm]]\nname = \"a\"\ncontrol = \"/a\"\n\n[[vm]]\ncontrol = \"/b\"\n";
        assert_eq!(error_line(text), 5);
        let text = "[[vm]]\nname = \"a b\"\ncontrol = \"/a\"\n";
        assert_eq!(error_line(text), 2);
    }

    #[test]
    fn relation_errors_name_the_key_set_in_the_file() {
        // Only reclaim_start_percent is set; the hard default (10) is above it.
        let text = format!("[host]\ninterval_s = 5\nreclaim_start_percent = 5\n{MINIMAL}");
        assert_eq!(error_line(&text), 3);
        let text =
            format!("[host]\nreclaim_start_percent = 30\n\ngive_back_percent = 25\n{MINIMAL}");
        assert_eq!(error_line(&text), 4);
        // Only the start is set, above the default give-back of 35.
        let text = format!("{MINIMAL}\n[host]\nreclaim_start_percent = 50\n");
        assert_eq!(error_line(&text), 6);
        // [defaults] at fault while a [[vm]] earlier sets the same key.
        let text =
            format!("{MINIMAL}deflate_step_mib = 1024\n[defaults]\ninflate_step_mib = 512\n");
        assert_eq!(error_line(&text), 6);
        let text = format!("[defaults]\nshares = 5\nname = \"x\"\n{MINIMAL}");
        assert_eq!(error_line(&text), 3);
        // A file without VMs names no line at all, never line 0.
        let error = parse("[host]\ninterval_s = 5\n").unwrap_err().to_string();
        assert_eq!(error, "host-policy.toml: no VMs: add [[vm]] entries (name, control) or a [discover] directory");
    }
}
