//! The command line, and its conversion into validated options.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The balloons of this host: list them, inspect one, set a target.
#[derive(Parser, Debug)]
#[command(name = "balloonctl", version)]
pub struct Cli {
    /// Where balloon-backend control sockets (`<vm>.ctl`) are.
    #[arg(
        long,
        value_name = "DIR",
        env = "BALLOON_RUNTIME_DIR",
        default_value = "/run/balloon"
    )]
    pub runtime_dir: PathBuf,
    /// host-policy's configuration: its VMs, and its state file for the
    /// last decisions. Read when it exists; an explicit path must exist.
    #[arg(long, value_name = "FILE", env = "BALLOON_POLICY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// host-policy's configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/balloon-stack/host-policy.toml";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Every VM, one line each: RAM, target, actual, returned to the host,
    /// guest available memory, limit, pressure, backend and agent.
    List,
    /// One VM in detail.
    Status {
        vm: String,
        /// The backend's status and host-policy's view as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a VM's balloon (memory taken from the guest) and pin it against
    /// host-policy until `unpin`: 2G, 512M, 25% of guest RAM, or 0.
    Set {
        vm: String,
        #[arg(value_name = "SIZE", allow_hyphen_values = true)]
        size: String,
        /// Return at once instead of waiting for the guest.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the guest to reach the target.
        #[arg(long, value_name = "SECONDS", default_value_t = 120,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
    },
    /// Hand a pinned VM back to host-policy.
    Unpin { vm: String },
    /// Fresh guest statistics of one VM, with units.
    Stats { vm: String },
    /// A live view of every VM, redrawn every second; q quits.
    Watch {
        #[arg(long, value_name = "SECONDS", default_value_t = 1,
              value_parser = clap::value_parser!(u64).range(1..=60))]
        interval: u64,
    },
    /// A shell completion script on standard output.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page (roff) on standard output.
    Man,
}

impl Command {
    pub fn wait_timeout(timeout_s: u64) -> Duration {
        Duration::from_secs(timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn out_of_range_values_name_the_flag() {
        let error = Cli::try_parse_from(["balloonctl", "set", "vm", "1G", "--timeout", "0"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--timeout"), "{error}");
        let error = Cli::try_parse_from(["balloonctl", "watch", "--interval", "99"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--interval"), "{error}");
    }
}
