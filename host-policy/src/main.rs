//! host-policy: run, check, status, simulate.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use balloon_policy::PolicyKind;
use clap::Parser;
use host_policy::cli::{Cli, Command, PolicyList};
use host_policy_config::{discovered_vms, managed_vms, Config};

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
            // `run` reads it every tick: a missing or unreadable source
            // fails here, not only once the daemon runs.
            let reading = host_policy::host_reader::read(&config.host)
                .with_context(|| config.path.display().to_string())?;
            println!("{}: valid", config.path.display());
            println!(
                "host: every {} s; reclaim below {}% available, hard below {}%, give back at or above {}%; host PSI some avg10 at or above {}% is pressure (reclaim; hard at {}%)",
                config.host.interval_s,
                config.host.reclaim_start_percent,
                config.host.reclaim_hard_percent,
                config.host.give_back_percent,
                config.host.psi_some_avg10.0,
                2.0 * config.host.psi_some_avg10.0
            );
            for line in reading.describe() {
                println!("{line}");
            }
            for (path, reason) in discovered_vms(&config).1 {
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
            family: Some(count),
            seed,
            out,
            compare,
            ..
        } => {
            let policies = compare.map_or_else(|| PolicyKind::ALL.to_vec(), |list| list.0);
            if policies.first() != Some(&PolicyKind::BalloonStack) {
                anyhow::bail!(
                    "--family compares ours with baselines: --compare must start with balloon-stack"
                );
            }
            print!(
                "{}",
                policy_sim::family::simulate_family(count, seed, &policies, &out)?
            );
            println!("wrote {}", out.join("table.md").display());
            Ok(())
        }
        Command::Simulate {
            scenario: Some(scenario),
            out,
            compare: None,
            ..
        } => {
            println!("{}", policy_sim::simulate::simulate(&scenario, &out)?);
            Ok(())
        }
        Command::Simulate {
            scenario: Some(scenario),
            out,
            compare: Some(PolicyList(policies)),
            ..
        } => {
            print!(
                "{}",
                policy_sim::simulate::compare(&scenario, &policies, &out)?
            );
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Simulate { scenario: None, .. } => {
            anyhow::bail!("simulate needs --scenario FILE or --family N")
        }
    }
}
