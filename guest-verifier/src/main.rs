//! guest-verifier: owns part of the guest's memory and checks that it keeps
//! what was written. It writes a pattern derived from chunk, word and
//! generation into every 8-byte word of N MiB (1 MiB anonymous mappings),
//! re-reads every word continuously, and each pass replaces about one chunk
//! in four; beside it, it allocates and frees memory and checks a
//! page-cache file. Every bad word is one `@@VERIFY MISMATCH ...` line on
//! stdout, every pass one `@@VERIFY pass=...` line (docs/guest-verifier.md).
//! `--oom-push MIB` instead pushes the guest into deflate-on-OOM once
//! (allocates what is available plus MIB, verifies it, exits).
//! Exit status: 0 clean, 1 mismatches seen, 2 bad arguments, 3 an I/O
//! error.

mod arena;
mod cache;
mod churn;
mod pattern;
mod push;
mod report;
mod run;
mod words;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use push::PushSettings;
use run::Settings;

/// Largest --mib and --churn-mib accepted (the guest's RAM is the real limit).
const MAX_MIB: u64 = 1 << 20;
/// Largest --cache-mib accepted.
const MAX_CACHE_MIB: u64 = 4096;

/// Owns guest memory, writes a pattern into every word and verifies it
/// continuously; reports every mismatch on stdout.
#[derive(Debug, Parser)]
#[command(name = "guest-verifier", version)]
struct Args {
    /// MiB of memory to own, in 1 MiB chunks.
    #[arg(long, value_name = "MIB", required_unless_present = "oom_push")]
    mib: Option<u64>,
    /// How long to run; 0 runs until killed.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    seconds: u64,
    /// Seed of the patterns and of which chunks are replaced.
    #[arg(long, value_name = "SEED", default_value_t = 1)]
    seed: u64,
    /// MiB mapped, written, verified and freed each pass (0: none).
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    churn_mib: u64,
    /// File or block device for the page-cache check.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/mnt/data/guest-verifier.cache"
    )]
    cache_file: PathBuf,
    /// MiB of the page-cache file (0: no page-cache check).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    cache_mib: u64,
    /// Do not drop the guest's caches between the two reads.
    #[arg(long)]
    no_drop_caches: bool,
    /// Instead of verifying: push the guest into deflate-on-OOM once, by
    /// allocating what it has available plus MIB (written and verified),
    /// and exit.
    #[arg(long, value_name = "MIB", conflicts_with = "mib")]
    oom_push: Option<u64>,
}

/// What a run does.
#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Verify(Settings),
    Push(PushSettings),
}

impl TryFrom<Args> for Mode {
    type Error = String;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        if let Some(mib) = args.oom_push {
            if mib > MAX_MIB {
                return Err(format!("--oom-push must be 0-{MAX_MIB}, got {mib}"));
            }
            return Ok(Mode::Push(PushSettings {
                mib,
                seed: args.seed,
                meminfo: PathBuf::from(push::MEMINFO),
                vmstat: PathBuf::from(push::VMSTAT),
                oom_score_adj: Some(PathBuf::from(push::OOM_SCORE_ADJ)),
            }));
        }
        let mib = args.mib.ok_or("--mib is required")?;
        if !(1..=MAX_MIB).contains(&mib) {
            return Err(format!("--mib must be 1-{MAX_MIB}, got {mib}"));
        }
        if args.churn_mib > MAX_MIB {
            return Err(format!(
                "--churn-mib must be 0-{MAX_MIB}, got {}",
                args.churn_mib
            ));
        }
        if args.cache_mib > MAX_CACHE_MIB {
            return Err(format!(
                "--cache-mib must be 0-{MAX_CACHE_MIB}, got {}",
                args.cache_mib
            ));
        }
        Ok(Mode::Verify(Settings {
            mib,
            seconds: args.seconds,
            seed: args.seed,
            churn_mib: args.churn_mib,
            cache_file: args.cache_file,
            cache_mib: args.cache_mib,
            drop_caches: (!args.no_drop_caches).then(|| PathBuf::from(cache::DROP_CACHES)),
            oom_score_adj: Some(PathBuf::from(push::OOM_SCORE_ADJ)),
        }))
    }
}

fn main() -> ExitCode {
    let mode = match Mode::try_from(Args::parse()) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("guest-verifier: {message}");
            return ExitCode::from(2);
        }
    };
    let clean = match mode {
        Mode::Verify(settings) => run::run(&settings, std::io::stdout())
            .map(|totals| totals.mismatches == 0 && totals.cache_mismatches == 0),
        Mode::Push(settings) => {
            push::push(&settings, std::io::stdout()).map(|totals| totals.mismatches == 0)
        }
    };
    match clean {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("guest-verifier: {error}");
            println!("@@VERIFY error {error}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(list: &[&str]) -> Result<Mode, String> {
        Mode::try_from(Args::try_parse_from(list).map_err(|e| e.to_string())?)
    }

    fn settings(list: &[&str]) -> Result<Settings, String> {
        match mode(list)? {
            Mode::Verify(settings) => Ok(settings),
            Mode::Push(push) => Err(format!("a push: {push:?}")),
        }
    }

    #[test]
    fn flags_become_settings_with_defaults() {
        let s = settings(&["guest-verifier", "--mib", "160", "--seed", "30"]).unwrap();
        assert_eq!((s.mib, s.seconds, s.seed), (160, 0, 30));
        assert_eq!((s.churn_mib, s.cache_mib), (16, 8));
        assert_eq!(
            s.drop_caches,
            Some(PathBuf::from("/proc/sys/vm/drop_caches"))
        );
        let s = settings(&[
            "guest-verifier",
            "--mib",
            "4",
            "--seconds",
            "10",
            "--cache-file",
            "/dev/vda",
            "--cache-mib",
            "0",
            "--no-drop-caches",
        ])
        .unwrap();
        assert_eq!((s.seconds, s.cache_mib, s.drop_caches), (10, 0, None));
        assert_eq!(s.cache_file, PathBuf::from("/dev/vda"));
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        let error = settings(&["guest-verifier"]).err().unwrap();
        assert!(error.contains("--mib"), "{error}");
        let error = settings(&["guest-verifier", "--mib", "0"]).err().unwrap();
        assert!(error.contains("--mib"), "{error}");
        let error = settings(&["guest-verifier", "--mib", "1", "--churn-mib", "9999999"])
            .err()
            .unwrap();
        assert!(error.contains("--churn-mib"), "{error}");
        let error = settings(&["guest-verifier", "--mib", "1", "--cache-mib", "5000"])
            .err()
            .unwrap();
        assert!(error.contains("--cache-mib"), "{error}");
        let error = settings(&["guest-verifier", "--mib", "x"]).err().unwrap();
        assert!(error.contains("--mib"), "{error}");
        let error = mode(&["guest-verifier", "--mib", "4", "--oom-push", "32"])
            .err()
            .unwrap();
        assert!(error.contains("--oom-push"), "{error}");
        let error = mode(&["guest-verifier", "--oom-push", "9999999"])
            .err()
            .unwrap();
        assert!(error.contains("--oom-push"), "{error}");
    }

    #[test]
    fn oom_push_needs_no_mib_and_sets_the_knobs() {
        assert_eq!(
            mode(&["guest-verifier", "--oom-push", "32", "--seed", "7"]).unwrap(),
            Mode::Push(PushSettings {
                mib: 32,
                seed: 7,
                meminfo: PathBuf::from("/proc/meminfo"),
                vmstat: PathBuf::from("/proc/vmstat"),
                oom_score_adj: Some(PathBuf::from("/proc/self/oom_score_adj")),
            })
        );
        let s = settings(&["guest-verifier", "--mib", "8"]).unwrap();
        assert_eq!(
            s.oom_score_adj,
            Some(PathBuf::from("/proc/self/oom_score_adj"))
        );
    }
}
