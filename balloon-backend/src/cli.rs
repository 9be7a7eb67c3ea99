//! Command-line flags and their validation into a `BackendConfig`.

use std::path::PathBuf;

use clap::Parser;

use crate::features::FeatureSwitches;
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
}

/// Validated configuration of one backend process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub socket: PathBuf,
    pub control: Option<PathBuf>,
    pub stats_interval_s: u64,
    pub max_reclaim_percent: u8,
    pub switches: FeatureSwitches,
    pub seccomp: SeccompMode,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--max-reclaim-percent must be between 0 and {MAX_RECLAIM_PERCENT_LIMIT}, got {0}")]
    MaxReclaimPercent(u8),
    #[error("--stats-interval must be between 0 and {MAX_STATS_INTERVAL_S} seconds, got {0}")]
    StatsInterval(u64),
    #[error("--socket and --control must be different paths, both are {0}")]
    SamePath(PathBuf),
    #[error("{flag} must not be empty")]
    EmptyPath { flag: &'static str },
}

impl TryFrom<Args> for BackendConfig {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if args.max_reclaim_percent > MAX_RECLAIM_PERCENT_LIMIT {
            return Err(ConfigError::MaxReclaimPercent(args.max_reclaim_percent));
        }
        if args.stats_interval > MAX_STATS_INTERVAL_S {
            return Err(ConfigError::StatsInterval(args.stats_interval));
        }
        if args.socket.as_os_str().is_empty() {
            return Err(ConfigError::EmptyPath { flag: "--socket" });
        }
        if let Some(control) = &args.control {
            if control.as_os_str().is_empty() {
                return Err(ConfigError::EmptyPath { flag: "--control" });
            }
            if *control == args.socket {
                return Err(ConfigError::SamePath(control.clone()));
            }
        }
        Ok(BackendConfig {
            socket: args.socket,
            control: args.control,
            stats_interval_s: args.stats_interval,
            max_reclaim_percent: args.max_reclaim_percent,
            switches: FeatureSwitches {
                stats: !args.no_stats,
                deflate_on_oom: !args.no_deflate_on_oom,
                page_poison: !args.no_page_poison,
                reporting: !args.no_reporting,
            },
            seccomp: args.seccomp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<BackendConfig, ConfigError> {
        let mut argv = vec!["balloon-backend", "--socket", "/run/b.sock"];
        argv.extend_from_slice(extra);
        BackendConfig::try_from(Args::try_parse_from(argv).unwrap())
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
            BackendConfig::try_from(args).unwrap_err(),
            ConfigError::EmptyPath { flag: "--control" }
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
