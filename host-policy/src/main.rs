//! host-policy: run, check, status, simulate.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use host_policy::baselines::PolicyKind;
use host_policy::config::Config;
use host_policy::daemon::managed_vms;

/// Sets balloon targets for the VMs on this host.
#[derive(Parser)]
#[command(name = "host-policy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// CSV per policy, compare.svg and table.md.
    Simulate {
        #[arg(long, value_name = "FILE")]
        scenario: PathBuf,
        #[arg(long, value_name = "OUT", default_value = "simulation")]
        out: PathBuf,
        /// `all`, or policies separated by commas: balloon-stack, mom,
        /// proxmox, esx-idle-tax.
        #[arg(long, value_name = "POLICIES", value_parser = parse_policies)]
        compare: Option<PolicyList>,
    },
}

/// The policies `--compare` runs.
#[derive(Clone, Debug)]
struct PolicyList(Vec<PolicyKind>);

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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("host-policy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, dry_run } => host_policy::daemon::run(&config, dry_run),
        Command::Check { config } => {
            let config = Config::load(&config)?;
            // `run` reads it every tick: a missing or unreadable file fails
            // here, not only once the daemon runs.
            host_policy::meminfo_reader::read_host(&config.host.meminfo)
                .with_context(|| format!("{}: [host] meminfo", config.path.display()))?;
            println!("{}: valid", config.path.display());
            println!(
                "host: every {} s from {}; reclaim below {}% available, hard below {}%, give back at or above {}%",
                config.host.interval_s,
                config.host.meminfo.display(),
                config.host.reclaim_start_percent,
                config.host.reclaim_hard_percent,
                config.host.give_back_percent
            );
            for (path, reason) in host_policy::daemon::discovered_vms(&config).1 {
                println!("skipped {}: {reason}", path.display());
            }
            for vm in managed_vms(&config) {
                let p = &vm.policy;
                println!(
                    "vm {}: {} (limit {}%, floor max({} MiB, {}%), shares {}, inflate {} MiB/tick (hard {}), deflate {} MiB/tick)",
                    vm.name,
                    vm.control.display(),
                    p.max_reclaim_percent,
                    p.min_free_bytes >> 20,
                    p.min_free_percent,
                    p.shares,
                    p.inflate_step_bytes >> 20,
                    p.hard_inflate_step_bytes >> 20,
                    p.deflate_step_bytes >> 20
                );
            }
            Ok(())
        }
        Command::Status { config } => {
            print!("{}", host_policy::status::render(&Config::load(&config)?));
            Ok(())
        }
        Command::Simulate {
            scenario,
            out,
            compare: None,
        } => {
            println!("{}", host_policy::simulate::simulate(&scenario, &out)?);
            Ok(())
        }
        Command::Simulate {
            scenario,
            out,
            compare: Some(PolicyList(policies)),
        } => {
            print!(
                "{}",
                host_policy::simulate::compare(&scenario, &policies, &out)?
            );
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}
