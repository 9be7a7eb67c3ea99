//! host-policy: run, check, status, simulate.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use host_policy::baselines::PolicyKind;
use host_policy::cli::{Cli, Command, PolicyList};
use host_policy::config::Config;
use host_policy::daemon::managed_vms;

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
                host_policy::family::simulate_family(count, seed, &policies, &out)?
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
            println!("{}", host_policy::simulate::simulate(&scenario, &out)?);
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
                host_policy::simulate::compare(&scenario, &policies, &out)?
            );
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Simulate { scenario: None, .. } => {
            anyhow::bail!("simulate needs --scenario FILE or --family N")
        }
    }
}
