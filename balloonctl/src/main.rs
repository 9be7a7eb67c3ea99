//! balloonctl: parses the command line and runs one command; exit codes in
//! docs/balloonctl.md.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};

use balloonctl::cli::{Cli, Command, DEFAULT_CONFIG};
use balloonctl::commands::{self, Wait};
use balloonctl::error::CtlError;
use balloonctl::inventory::{self, Inventory};
use host_policy_config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("balloonctl: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// host-policy's configuration: the explicit one (which must load) or the
/// default one when it exists.
fn load_config(cli: &Cli) -> Result<Option<Config>, CtlError> {
    match &cli.config {
        Some(path) => Config::load(path)
            .map(Some)
            .map_err(|error| CtlError::Other(format!("--config: {error}"))),
        None => {
            let path = std::path::Path::new(DEFAULT_CONFIG);
            if !path.exists() {
                return Ok(None);
            }
            Config::load(path)
                .map(Some)
                .map_err(|error| CtlError::Other(format!("{DEFAULT_CONFIG}: {error}")))
        }
    }
}

fn inventory(cli: &Cli) -> Result<Inventory, CtlError> {
    Ok(inventory::find(
        &cli.runtime_dir,
        load_config(cli)?.as_ref(),
    ))
}

fn print(text: String) {
    print!("{text}");
}

fn run(cli: Cli) -> Result<(), CtlError> {
    match &cli.command {
        Command::List => print(commands::list(&inventory(&cli)?)),
        Command::Status { vm, json } => print(commands::status(&inventory(&cli)?, vm, *json)?),
        Command::Set {
            vm,
            size,
            no_wait,
            timeout,
        } => {
            let wait = Wait {
                enabled: !no_wait,
                timeout: Command::wait_timeout(*timeout),
            };
            commands::set(&inventory(&cli)?, vm, size, &wait, &mut std::io::stdout())?
        }
        Command::Unpin { vm } => print(commands::unpin(&inventory(&cli)?, vm)?),
        Command::Stats { vm } => print(commands::stats(&inventory(&cli)?, vm)?),
        Command::Watch { interval } => {
            // Checked before the screen changes, so a bad config reads plainly.
            inventory(&cli)?;
            balloonctl::watch::watch(
                || match inventory(&cli) {
                    Ok(inventory) => commands::list(&inventory),
                    Err(error) => format!("{error}\n"),
                },
                Duration::from_secs(*interval),
            )?
        }
        Command::Completions { shell } => clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "balloonctl",
            &mut std::io::stdout(),
        ),
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|error| CtlError::Other(error.to_string()))?,
    }
    Ok(())
}
