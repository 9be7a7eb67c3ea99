//! guest-agent: reports the guest's memory pressure to the host over a
//! virtio-serial port and reclaims page cache when asked.

#![forbid(unsafe_code)]

mod agent;
mod procfs;
mod reclaim;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Memory-pressure reporter and cooperative reclaimer for the balloon stack.
#[derive(Debug, Parser)]
#[command(name = "guest-agent", version)]
struct Args {
    /// Name of the virtio-serial port (QEMU: virtserialport,name=…).
    #[arg(long, default_value = balloon_protocol::agent::DEFAULT_PORT_NAME)]
    port_name: String,
    /// Use this device instead of looking the port up by name.
    #[arg(long, value_name = "PATH")]
    device: Option<PathBuf>,
    /// Seconds between reports (1-3600).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5,
        allow_negative_numbers = true
    )]
    interval: u64,
    /// PSI trigger: report at once when memory stalls exceed this many
    /// microseconds within the window (1000-10000000).
    #[arg(
        long,
        value_name = "MICROSECONDS",
        default_value_t = 100_000,
        allow_negative_numbers = true
    )]
    psi_stall_us: u64,
    /// PSI trigger window (500000-10000000 microseconds).
    #[arg(
        long,
        value_name = "MICROSECONDS",
        default_value_t = 1_000_000,
        allow_negative_numbers = true
    )]
    psi_window_us: u64,
}

impl TryFrom<Args> for agent::Settings {
    type Error = String;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if !(1..=3600).contains(&args.interval) {
            return Err(format!(
                "--interval must be between 1 and 3600, got {}",
                args.interval
            ));
        }
        if !(500_000..=10_000_000).contains(&args.psi_window_us) {
            return Err(format!(
                "--psi-window-us must be between 500000 and 10000000, got {}",
                args.psi_window_us
            ));
        }
        if !(1000..=args.psi_window_us).contains(&args.psi_stall_us) {
            return Err(format!(
                "--psi-stall-us must be between 1000 and --psi-window-us ({}), got {}",
                args.psi_window_us, args.psi_stall_us
            ));
        }
        Ok(agent::Settings {
            port_name: args.port_name,
            device: args.device,
            interval: Duration::from_secs(args.interval),
            psi_stall_us: args.psi_stall_us,
            psi_window_us: args.psi_window_us,
            sources: report::Sources::default(),
        })
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match agent::Settings::try_from(Args::parse()) {
        Ok(settings) => agent::run(&settings),
        Err(message) => {
            eprintln!("guest-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &[&str]) -> Result<agent::Settings, String> {
        let mut argv = vec!["guest-agent"];
        argv.extend_from_slice(extra);
        agent::Settings::try_from(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn flags_are_validated() {
        assert_eq!(settings(&[]).unwrap().interval, Duration::from_secs(5));
        assert!(settings(&["--interval", "0"])
            .unwrap_err()
            .contains("--interval"));
        assert!(settings(&["--psi-stall-us", "2000000"])
            .unwrap_err()
            .contains("--psi-stall-us"));
        assert!(settings(&["--psi-window-us", "100"])
            .unwrap_err()
            .contains("--psi-window-us"));
    }

    #[test]
    fn values_clap_cannot_parse_name_their_flag() {
        for (flag, value) in [
            ("--interval", "-1"),
            ("--interval", "soon"),
            ("--psi-stall-us", "-5"),
            ("--psi-window-us", "-1000000"),
        ] {
            let error = Args::try_parse_from(["guest-agent", flag, value])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let first = error.lines().next().unwrap_or_default();
            assert!(
                first.contains(flag) && first.contains(value),
                "{flag} {value}: {first}"
            );
        }
    }

    #[test]
    fn requests_are_answered_and_bad_ones_refused() {
        let settings = settings(&[]).unwrap();
        let reply = agent::answer(&settings, br#"{"v":1,"id":1,"cmd":"ping"}"#);
        assert!(reply.ok);
        assert_eq!(reply.pong, Some(true));
        let reply = agent::answer(&settings, b"{}");
        assert!(!reply.ok);
    }
}
