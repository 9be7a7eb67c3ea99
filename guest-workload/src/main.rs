//! guest-workload: a scripted memory workload for the real-guest policy
//! benchmark. It holds a working set of anonymous memory that grows and
//! shrinks in phases, touching all of it every second, and keeps part of a
//! file (a block device) in the page cache by re-reading it. Each phase
//! ends with one JSON line on stdout saying how long its work took.

#![forbid(unsafe_code)]

mod cache;
mod plan;
mod working_set;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

use cache::CacheReader;
use plan::Phase;
use working_set::WorkingSet;

/// A scripted memory workload: phases of working set, page cache re-read.
#[derive(Debug, Parser)]
#[command(name = "guest-workload", version)]
struct Args {
    /// Phases as SECONDS:MIB, comma-separated (30:48,40:288): hold MIB of
    /// anonymous memory, touched every second, for SECONDS.
    #[arg(long, value_name = "PHASES")]
    phases: String,
    /// File (or block device) whose head is read into the page cache.
    #[arg(long, value_name = "PATH")]
    cache_file: Option<PathBuf>,
    /// MiB of the file read once at the start.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    cache_mib: u64,
    /// MiB of the file re-read every second (the hot part of the cache).
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    hot_cache_mib: u64,
}

struct Settings {
    phases: Vec<Phase>,
    cache_file: Option<PathBuf>,
    cache_mib: u64,
    hot_cache_mib: u64,
}

impl TryFrom<Args> for Settings {
    type Error = String;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let phases = plan::parse_phases(&args.phases).map_err(|e| format!("--phases: {e}"))?;
        if phases.is_empty() {
            return Err("--phases: give at least one SECONDS:MIB".into());
        }
        if args.hot_cache_mib > args.cache_mib {
            return Err(format!(
                "--hot-cache-mib ({}) must be at most --cache-mib ({})",
                args.hot_cache_mib, args.cache_mib
            ));
        }
        if args.cache_mib > 0 && args.cache_file.is_none() {
            return Err("--cache-mib needs --cache-file".into());
        }
        Ok(Settings {
            phases,
            cache_file: args.cache_file,
            cache_mib: args.cache_mib,
            hot_cache_mib: args.hot_cache_mib,
        })
    }
}

/// What one phase's work took.
#[derive(Debug, Default, Serialize)]
struct PhaseReport {
    index: usize,
    working_set_mib: u64,
    planned_s: u64,
    /// Growing or shrinking the working set to the phase's size.
    ramp_s: f64,
    /// Passes over the working set (one a second).
    passes: u64,
    pass_max_s: f64,
    pass_total_s: f64,
    /// Re-reading the hot cache, all passes.
    cache_read_s: f64,
}

fn emit(line: &impl Serialize) -> std::io::Result<()> {
    let text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

fn run(settings: &Settings) -> std::io::Result<()> {
    let mut cache = match &settings.cache_file {
        Some(path) => Some(CacheReader::open(path)?),
        None => None,
    };
    if let Some(reader) = cache.as_mut() {
        let started = Instant::now();
        let bytes = reader.read_head(settings.cache_mib)?;
        emit(&serde_json::json!({
            "event": "cache-filled",
            "bytes": bytes,
            "seconds": started.elapsed().as_secs_f64(),
        }))?;
    }
    emit(&serde_json::json!({
        "event": "start",
        "phases": settings.phases.len(),
        "planned_s": plan::total_seconds(&settings.phases),
    }))?;
    let mut working_set = WorkingSet::default();
    for (index, phase) in settings.phases.iter().enumerate() {
        let phase_started = Instant::now();
        working_set.resize(phase.working_set_mib)?;
        let mut report = PhaseReport {
            index,
            working_set_mib: working_set.mib(),
            planned_s: phase.seconds,
            ramp_s: phase_started.elapsed().as_secs_f64(),
            ..PhaseReport::default()
        };
        for second in 1..=phase.seconds {
            let pass_started = Instant::now();
            working_set.touch_all();
            let pass_s = pass_started.elapsed().as_secs_f64();
            if let Some(reader) = cache.as_mut() {
                let read_started = Instant::now();
                reader.read_head(settings.hot_cache_mib)?;
                report.cache_read_s += read_started.elapsed().as_secs_f64();
            }
            report.passes += 1;
            report.pass_total_s += pass_s;
            report.pass_max_s = report.pass_max_s.max(pass_s);
            // Passes keep a one-second rhythm from the phase's start; a late
            // pass is followed at once by the next.
            let due = phase_started + Duration::from_secs(second);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        emit(&report)?;
    }
    emit(&serde_json::json!({ "event": "done" }))
}

fn main() -> ExitCode {
    let settings = match Settings::try_from(Args::parse()) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("guest-workload: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guest-workload: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Settings, String> {
        Settings::try_from(Args::try_parse_from(list).map_err(|e| e.to_string())?)
    }

    #[test]
    fn flags_become_settings() {
        let settings = args(&[
            "guest-workload",
            "--phases",
            "2:8,3:0",
            "--cache-file",
            "/dev/vda",
            "--cache-mib",
            "64",
            "--hot-cache-mib",
            "16",
        ])
        .unwrap();
        assert_eq!(settings.phases.len(), 2);
        assert_eq!(plan::total_seconds(&settings.phases), 5);
        assert_eq!((settings.cache_mib, settings.hot_cache_mib), (64, 16));
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        let error = args(&["guest-workload", "--phases", "x"]).err().unwrap();
        assert!(error.contains("--phases"), "{error}");
        let error = args(&["guest-workload", "--phases", "1:1", "--cache-mib", "8"])
            .err()
            .unwrap();
        assert!(error.contains("--cache-file"), "{error}");
        let error = args(&[
            "guest-workload",
            "--phases",
            "1:1",
            "--cache-file",
            "/dev/vda",
            "--cache-mib",
            "8",
            "--hot-cache-mib",
            "9",
        ])
        .err()
        .unwrap();
        assert!(error.contains("--hot-cache-mib"), "{error}");
    }

    #[test]
    fn a_short_script_runs_and_reports_each_phase() {
        let settings = args(&["guest-workload", "--phases", "1:4,1:0"]).unwrap();
        run(&settings).unwrap();
    }
}
