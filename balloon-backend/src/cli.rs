//! Command-line flags and their validation into a `BackendOptions`.

use std::path::PathBuf;

use clap::Parser;

use crate::features::FeatureSwitches;
use crate::saved_state::STATE_VERSION;
use crate::seccomp::SeccompMode;

/// Largest maximum reclaim an operator may configure (percent of guest RAM).
pub const MAX_RECLAIM_PERCENT_LIMIT: u8 = 75;
/// VMware's vmmemctl default.
pub const DEFAULT_MAX_RECLAIM_PERCENT: u8 = 65;
/// Longest stats polling interval accepted (one day).
pub const MAX_STATS_INTERVAL_S: u64 = 86_400;

/// vhost-user virtio-balloon device: returns inflated and free guest pages
/// to the host by punching holes in shared guest RAM.
#[derive(Debug, Parser)]
#[command(name = "balloon-backend", version)]
pub struct Args {
    /// vhost-user socket that QEMU connects to (-chardev socket,path=PATH).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Control socket (JSON lines) for status and balloon targets.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Permissions of the --socket file, in octal (0600 to 0777, owner
    /// read and write included); default 0600, or 0660 with --socket-group.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group of the --socket file (a name or a number), so that a QEMU
    /// running as another user of that group can connect.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Create missing parent directories of --socket and --control (mode 0750).
    #[arg(long)]
    pub create_dirs: bool,
    /// Seconds between guest statistics refreshes; 0 refreshes only on request.
    // Negative numbers are taken as this flag's (bad) value, so the error
    // names the flag instead of calling "-1" an unexpected argument.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5,
        allow_negative_numbers = true
    )]
    pub stats_interval: u64,
    /// Largest balloon, in percent of guest RAM (0 to 75).
    #[arg(
        long,
        value_name = "PERCENT",
        default_value_t = DEFAULT_MAX_RECLAIM_PERCENT,
        allow_negative_numbers = true
    )]
    pub max_reclaim_percent: u8,
    /// Do not offer the statistics queue (STATS_VQ).
    #[arg(long)]
    pub no_stats: bool,
    /// Do not offer DEFLATE_ON_OOM.
    #[arg(long)]
    pub no_deflate_on_oom: bool,
    /// Do not offer PAGE_POISON.
    #[arg(long)]
    pub no_page_poison: bool,
    /// Do not offer free page reporting (REPORTING).
    #[arg(long)]
    pub no_reporting: bool,
    /// System-call filter: `enforce` kills the process with SIGSYS on a call
    /// outside its thread's allow-list, `log` lets the kernel log such calls,
    /// `off` installs no filter.
    #[arg(long, value_enum, default_value_t = SeccompMode::Enforce)]
    pub seccomp: SeccompMode,
    /// File that keeps the balloon's state (which pages are ballooned, the
    /// target, the counters) across a restart of this backend: rewritten
    /// within half a second of a change, read at start-up, and taken over
    /// only by the same guest (the same memory files).
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// The saved-state version this process writes and accepts (for
    /// compatibility tests only).
    #[arg(long, value_name = "N", hide = true, default_value_t = STATE_VERSION)]
    pub device_state_version: u32,
}

/// Validated configuration of one backend process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendOptions {
    pub socket: PathBuf,
    pub control: Option<PathBuf>,
    /// Permission bits given to the vhost-user socket file.
    pub socket_mode: u32,
    /// Group id given to the vhost-user socket file.
    pub socket_gid: Option<u32>,
    pub create_dirs: bool,
    pub stats_interval_s: u64,
    pub max_reclaim_percent: u8,
    pub switches: FeatureSwitches,
    pub seccomp: SeccompMode,
    pub state_file: Option<PathBuf>,
    pub state_version: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("--max-reclaim-percent must be between 0 and {MAX_RECLAIM_PERCENT_LIMIT}, got {0}")]
    MaxReclaimPercent(u8),
    #[error("--stats-interval must be between 0 and {MAX_STATS_INTERVAL_S} seconds, got {0}")]
    StatsInterval(u64),
    #[error("{flags} must be different paths, both are {path}")]
    SamePath { flags: &'static str, path: PathBuf },
    #[error("{flag} must not be empty")]
    EmptyPath { flag: &'static str },
    #[error("--socket-mode must be an octal mode from 0600 to 0777 that gives the owner read and write (for example 0660), got {0:?}")]
    SocketMode(String),
    #[error("--socket-group {0:?}: no such group (give a group name or number)")]
    UnknownGroup(String),
    /// The lookup's errno (kept as a number so that errors compare equal).
    #[error("--socket-group {name:?}: looking up the group failed: {}", std::io::Error::from_raw_os_error(*errno))]
    GroupLookup { name: String, errno: i32 },
}

/// Default socket mode: only the backend's user may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Default socket mode with --socket-group: the group may connect too.
pub const DEFAULT_GROUP_SOCKET_MODE: u32 = 0o660;

/// An octal mode such as `0660`, `660` or `0o660` that lets the owner read
/// and write and sets nothing beyond the permission bits.
pub fn parse_socket_mode(text: &str) -> Result<u32, FlagError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let bad = || FlagError::SocketMode(text.to_string());
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(bad());
    }
    Ok(mode)
}

/// A group given by number or by name (looked up through NSS).
pub fn resolve_group(text: &str) -> Result<u32, FlagError> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match group_id_by_name(text) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(FlagError::UnknownGroup(text.to_string())),
        Err(error) => Err(FlagError::GroupLookup {
            name: text.to_string(),
            errno: error.raw_os_error().unwrap_or(0),
        }),
    }
}

/// getgrnam_r with a buffer that grows until the entry fits.
fn group_id_by_name(name: &str) -> std::io::Result<Option<u32>> {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    let mut buffer: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: group is plain old data; all-zero is a valid value.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local of the stated size;
        // the strings getgrnam_r stores point into `buffer`, unused after.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(group.gr_gid)),
            libc::ERANGE if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 2, 0),
            errno => return Err(std::io::Error::from_raw_os_error(errno)),
        }
    }
}

impl TryFrom<Args> for BackendOptions {
    type Error = FlagError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if args.max_reclaim_percent > MAX_RECLAIM_PERCENT_LIMIT {
            return Err(FlagError::MaxReclaimPercent(args.max_reclaim_percent));
        }
        if args.stats_interval > MAX_STATS_INTERVAL_S {
            return Err(FlagError::StatsInterval(args.stats_interval));
        }
        if args.socket.as_os_str().is_empty() {
            return Err(FlagError::EmptyPath { flag: "--socket" });
        }
        if let Some(control) = &args.control {
            if control.as_os_str().is_empty() {
                return Err(FlagError::EmptyPath { flag: "--control" });
            }
            if *control == args.socket {
                return Err(FlagError::SamePath {
                    flags: "--socket and --control",
                    path: control.clone(),
                });
            }
        }
        if let Some(state_file) = &args.state_file {
            if state_file.as_os_str().is_empty() {
                return Err(FlagError::EmptyPath {
                    flag: "--state-file",
                });
            }
            for (flags, other) in [
                ("--state-file and --socket", Some(&args.socket)),
                ("--state-file and --control", args.control.as_ref()),
            ] {
                if other == Some(state_file) {
                    return Err(FlagError::SamePath {
                        flags,
                        path: state_file.clone(),
                    });
                }
            }
        }
        let socket_gid = args
            .socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?;
        let socket_mode = match (&args.socket_mode, socket_gid) {
            (Some(text), _) => parse_socket_mode(text)?,
            (None, Some(_)) => DEFAULT_GROUP_SOCKET_MODE,
            (None, None) => DEFAULT_SOCKET_MODE,
        };
        Ok(BackendOptions {
            socket: args.socket,
            control: args.control,
            socket_mode,
            socket_gid,
            create_dirs: args.create_dirs,
            stats_interval_s: args.stats_interval,
            max_reclaim_percent: args.max_reclaim_percent,
            switches: FeatureSwitches {
                stats: !args.no_stats,
                deflate_on_oom: !args.no_deflate_on_oom,
                page_poison: !args.no_page_poison,
                reporting: !args.no_reporting,
            },
            seccomp: args.seccomp,
            state_file: args.state_file,
            state_version: args.device_state_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<BackendOptions, FlagError> {
        let mut argv = vec!["balloon-backend", "--socket", "/run/b.sock"];
        argv.extend_from_slice(extra);
        BackendOptions::try_from(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn values_clap_cannot_parse_name_their_flag() {
        for (flag, value) in [
            ("--max-reclaim-percent", "-1"),
            ("--max-reclaim-percent", "300"),
            ("--max-reclaim-percent", "ten"),
            ("--stats-interval", "-5"),
        ] {
            let error = Args::try_parse_from(["balloon-backend", "--socket", "/s", flag, value])
                .unwrap_err()
                .to_string();
            let first = error.lines().next().unwrap_or_default();
            assert!(
                first.contains(flag) && first.contains(value),
                "{flag} {value}: {first}"
            );
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.max_reclaim_percent, 65);
        assert_eq!(config.stats_interval_s, 5);
        assert_eq!(config.switches, FeatureSwitches::default());
        assert_eq!(config.control, None);
        assert_eq!(config.seccomp, SeccompMode::Enforce);
        assert_eq!(config.socket_mode, 0o600);
        assert_eq!(config.socket_gid, None);
        assert!(!config.create_dirs);
    }

    #[test]
    fn socket_modes_are_octal_and_keep_the_owner_able_to_connect() {
        for (text, mode) in [
            ("0660", 0o660),
            ("660", 0o660),
            ("0o600", 0o600),
            ("0777", 0o777),
        ] {
            assert_eq!(parse_socket_mode(text), Ok(mode), "{text}");
        }
        for bad in [
            "",
            "0o",
            "0400",
            "0060",
            "1777",
            "0888",
            "rw-rw----",
            "-0660",
            "99999999999",
        ] {
            let error = parse_socket_mode(bad).unwrap_err().to_string();
            assert!(
                error.contains("--socket-mode") && error.contains("0600 to 0777"),
                "{bad}: {error}"
            );
        }
        assert_eq!(
            parse(&["--socket-mode", "0666"]).unwrap().socket_mode,
            0o666
        );
    }

    #[test]
    fn socket_groups_are_names_or_numbers() {
        let config = parse(&["--socket-group", "0"]).unwrap();
        assert_eq!(config.socket_gid, Some(0));
        assert_eq!(
            config.socket_mode, 0o660,
            "a group alone means group access"
        );
        assert_eq!(
            parse(&["--socket-group", "root"]).unwrap().socket_gid,
            Some(0)
        );
        let config = parse(&["--socket-group", "root", "--socket-mode", "0600"]).unwrap();
        assert_eq!((config.socket_gid, config.socket_mode), (Some(0), 0o600));
        let error = parse(&["--socket-group", "no-such-group-here"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--socket-group") && error.contains("no-such-group-here"),
            "{error}"
        );
    }

    #[test]
    fn seccomp_takes_its_three_modes_and_names_them_on_error() {
        assert_eq!(
            parse(&["--seccomp", "log"]).unwrap().seccomp,
            SeccompMode::Log
        );
        assert_eq!(
            parse(&["--seccomp", "off"]).unwrap().seccomp,
            SeccompMode::Off
        );
        let error =
            Args::try_parse_from(["balloon-backend", "--socket", "s", "--seccomp", "strict"])
                .unwrap_err()
                .to_string();
        for word in ["--seccomp", "strict", "enforce", "log", "off"] {
            assert!(error.contains(word), "{word} missing from: {error}");
        }
    }

    #[test]
    fn ranges_are_enforced_with_the_flag_named() {
        assert_eq!(
            parse(&["--max-reclaim-percent", "75"])
                .unwrap()
                .max_reclaim_percent,
            75
        );
        assert_eq!(
            parse(&["--max-reclaim-percent", "0"])
                .unwrap()
                .max_reclaim_percent,
            0
        );
        let error = parse(&["--max-reclaim-percent", "76"]).unwrap_err();
        assert!(error.to_string().contains("--max-reclaim-percent"));
        assert!(error.to_string().contains("0 and 75"));
        assert!(parse(&["--stats-interval", "86401"]).is_err());
        assert!(parse(&["--control", "/run/b.sock"]).is_err());
        let mut args = Args::try_parse_from(["balloon-backend", "--socket", "s"]).unwrap();
        args.control = Some(PathBuf::new());
        assert_eq!(
            BackendOptions::try_from(args).unwrap_err(),
            FlagError::EmptyPath { flag: "--control" }
        );
    }

    #[test]
    fn the_state_file_is_a_path_of_its_own() {
        let config = parse(&["--state-file", "/run/balloon/vm1/state.json"]).unwrap();
        assert_eq!(
            config.state_file,
            Some(PathBuf::from("/run/balloon/vm1/state.json"))
        );
        assert_eq!(config.state_version, STATE_VERSION);
        assert_eq!(parse(&[]).unwrap().state_file, None);
        assert_eq!(
            parse(&["--state-file", "/run/b.sock"]).unwrap_err(),
            FlagError::SamePath {
                flags: "--state-file and --socket",
                path: PathBuf::from("/run/b.sock")
            }
        );
        let error = parse(&["--control", "/run/c", "--state-file", "/run/c"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--state-file and --control must be different paths, both are /run/c"
        );
        let mut args = Args::try_parse_from(["balloon-backend", "--socket", "s"]).unwrap();
        args.state_file = Some(PathBuf::new());
        assert_eq!(
            BackendOptions::try_from(args).unwrap_err(),
            FlagError::EmptyPath {
                flag: "--state-file"
            }
        );
    }

    #[test]
    fn clap_rejects_values_that_are_not_numbers() {
        let error = Args::try_parse_from([
            "balloon-backend",
            "--socket",
            "s",
            "--max-reclaim-percent",
            "x",
        ])
        .unwrap_err();
        assert!(error.to_string().contains("--max-reclaim-percent"));
        assert!(Args::try_parse_from(["balloon-backend"]).is_err());
    }

    #[test]
    fn switches_turn_features_off() {
        let config = parse(&["--no-stats", "--no-reporting"]).unwrap();
        assert!(!config.switches.stats && !config.switches.reporting);
        assert!(config.switches.deflate_on_oom && config.switches.page_poison);
    }
}
