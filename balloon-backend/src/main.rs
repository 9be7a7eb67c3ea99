//! balloon-backend: parses flags, binds the sockets, serves until signalled.

use std::process::ExitCode;

use anyhow::Context;
use balloon_backend::cli::{Args, BackendOptions};
use balloon_backend::daemon::{Backend, SocketFiles};
use balloon_backend::seccomp::{self, SeccompMode, ThreadRole};
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::io::Read;
use std::sync::Arc;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("balloon-backend: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let config = BackendOptions::try_from(Args::parse())?;
    // On SIGINT/SIGTERM remove our socket files and exit, leaving nothing
    // behind. Installed before the sockets exist, so that a signal right
    // after they appear is never missed; only files this process made are
    // removed. A pipe, not a socketpair: the backend request channel is
    // found as the process's only unnamed socket pair (see config_change).
    let files = Arc::new(SocketFiles::default());
    let files_for_signals = files.clone();
    let (mut wake_reader, wake_writer) = std::io::pipe().context("creating the signal pipe")?;
    for signal in [SIGINT, SIGTERM] {
        let writer = wake_writer.try_clone().context("cloning the signal pipe")?;
        signal_hook::low_level::pipe::register(signal, writer)
            .context("installing signal handlers")?;
    }
    let mode = config.seccomp;
    if mode == SeccompMode::Enforce {
        seccomp::install_sigsys_reporter()?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            seccomp::confine_or_exit(ThreadRole::Signals, mode);
            let mut byte = [0u8; 1];
            if wake_reader.read(&mut byte).is_ok() {
                log::info!("signal received: removing sockets and exiting");
                files_for_signals.remove_all();
                std::process::exit(0);
            }
        })
        .context("starting the signal thread")?;
    // DaemonError can hold vhost-user-backend's error, which is not Sync;
    // anyhow takes its message here at the binary's edge.
    let backend = match Backend::bind(config, &files) {
        Ok(backend) => backend,
        Err(error) => {
            // A failed start leaves no socket file behind.
            files.remove_all();
            return Err(anyhow::anyhow!("{error}"));
        }
    };
    backend.run().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
