//! balloon-backend: parses flags, binds the sockets, serves until signalled.

use std::process::ExitCode;

use anyhow::Context;
use balloon_backend::cli::{Args, BackendOptions};
use balloon_backend::daemon::Backend;
use balloon_backend::seccomp::{self, SeccompMode, ThreadRole};
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
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
    let sockets: Vec<_> = std::iter::once(config.socket.clone())
        .chain(config.control.clone())
        .collect();
    // On SIGINT/SIGTERM remove our socket files and exit, leaving nothing
    // behind. Installed before the sockets exist, so that a signal right
    // after they appear is never missed; the files are removed only once
    // this process has bound them. A pipe, not a socketpair: the backend
    // request channel is found as the process's only unnamed socket pair
    // (see config_change).
    let bound = Arc::new(AtomicBool::new(false));
    let bound_for_signals = bound.clone();
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
                let ours = bound_for_signals.load(Ordering::SeqCst);
                for path in sockets.iter().filter(|_| ours) {
                    if let Err(error) = std::fs::remove_file(path) {
                        log::warn!("removing {}: {error}", path.display());
                    }
                }
                std::process::exit(0);
            }
        })
        .context("starting the signal thread")?;
    // DaemonError can hold vhost-user-backend's error, which is not Sync;
    // anyhow takes its message here at the binary's edge.
    let backend = Backend::bind(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    bound.store(true, Ordering::SeqCst);
    backend.run().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
