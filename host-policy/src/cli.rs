//! host-policy's command line (here, not in main.rs, so that the package
//! build can generate its man page and shell completions).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use balloon_policy::PolicyKind;

/// Sets balloon targets for the VMs on this host.
#[derive(Parser)]
#[command(name = "host-policy", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Poll every backend and apply targets until SIGTERM; SIGHUP reloads.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Decide and log, but set no targets.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a configuration and show what each VM gets.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// A table of every VM's balloon and the last decision.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the policy on a synthetic host; write OUT.csv and OUT.svg. With
    /// --compare, run several policies and write into the directory OUT a
    /// CSV per policy, compare.svg and table.md. With --family N, generate
    /// N scenarios (seed --seed), run every policy (or --compare's) on
    /// each and write OUT/table.md and OUT/scenarios/.
    Simulate {
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "family",
            conflicts_with = "family"
        )]
        scenario: Option<PathBuf>,
        #[arg(long, value_name = "OUT", default_value = "simulation")]
        out: PathBuf,
        /// `all`, or policies separated by commas: balloon-stack, mom,
        /// proxmox, esx-idle-tax.
        #[arg(long, value_name = "POLICIES", value_parser = parse_policies)]
        compare: Option<PolicyList>,
        /// Generate this many scenarios from the documented distribution
        /// (1-100000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
        family: Option<u64>,
        /// The family's seed.
        #[arg(long, value_name = "S", default_value_t = 1, requires = "family")]
        seed: u64,
    },
}

/// The policies `--compare` runs.
#[derive(Clone, Debug)]
pub struct PolicyList(pub Vec<PolicyKind>);

/// `--compare`: `all`, or policy names separated by commas.
fn parse_policies(text: &str) -> Result<PolicyList, String> {
    if text == "all" {
        return Ok(PolicyList(PolicyKind::ALL.to_vec()));
    }
    text.split(',')
        .map(|name| {
            PolicyKind::ALL
                .into_iter()
                .find(|kind| kind.name() == name.trim())
                .ok_or_else(|| {
                    format!("unknown policy {name:?}: expected all, or some of balloon-stack, mom, proxmox, esx-idle-tax separated by commas")
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(PolicyList)
}
