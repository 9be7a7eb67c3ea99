//! The verifier's loop: pass after pass over the owned memory, a churn
//! round and a page-cache round beside each, one summary line per pass,
//! until the time is up (or forever).

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::arena::{Arena, CHUNK_BYTES};
use crate::cache::CacheCheck;
use crate::churn::churn_round;
use crate::pattern::{mix, Rng};
use crate::report::Reporter;

/// Each pass replaces a chunk with probability 1 in this.
pub const REPLACE_ONE_IN: u64 = 4;

/// Keeps the replacement choices apart from the patterns (same seed).
const RNG_DOMAIN: u64 = 0x5eed_0000_0000_0001;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// MiB owned, in 1 MiB chunks.
    pub mib: u64,
    /// Run time; 0 = forever.
    pub seconds: u64,
    pub seed: u64,
    /// MiB mapped, verified and freed each pass.
    pub churn_mib: u64,
    /// The page-cache file and its size (no page-cache check for 0 MiB).
    pub cache_file: PathBuf,
    pub cache_mib: u64,
    /// The knob that drops the guest's caches.
    pub drop_caches: Option<PathBuf>,
    /// The knob set to -1000 at the start, so that the OOM killer never
    /// picks the verifier (a deflate-on-OOM push may run beside it).
    pub oom_score_adj: Option<PathBuf>,
}

/// The totals so far, printed after every pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub passes: u64,
    /// Words verified in the last pass.
    pub words: u64,
    /// Memory words that differed (owned chunks and churn), since the start.
    pub mismatches: u64,
    pub pass_mismatches: u64,
    pub replaced: u64,
    pub cache_rounds: u64,
    pub cache_mismatches: u64,
    /// Mismatches counted but not printed (over the per-pass cap).
    pub unreported: u64,
}

impl Totals {
    /// `@@VERIFY pass=N words=M mismatches=K ...` (K since the start).
    pub fn pass_line(&self, seconds: f64) -> String {
        format!(
            "@@VERIFY pass={} words={} mismatches={} pass_mismatches={} replaced={} cache_rounds={} cache_mismatches={} unreported={} seconds={seconds:.2}",
            self.passes,
            self.words,
            self.mismatches,
            self.pass_mismatches,
            self.replaced,
            self.cache_rounds,
            self.cache_mismatches,
            self.unreported
        )
    }

    pub fn done_line(&self) -> String {
        format!(
            "@@VERIFY done passes={} mismatches={} cache_mismatches={}",
            self.passes, self.mismatches, self.cache_mismatches
        )
    }
}

fn bytes_of(mib: u64, what: &str) -> io::Result<usize> {
    mib.checked_mul(CHUNK_BYTES as u64)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| io::Error::other(format!("{what} is too large")))
}

/// Runs until `settings.seconds` have passed (forever for 0); returns the
/// totals. Fails on a mapping or file error, or when `out` cannot be
/// written.
pub fn run<W: Write>(settings: &Settings, out: W) -> io::Result<Totals> {
    let started = Instant::now();
    let churn_bytes = bytes_of(settings.churn_mib, "--churn-mib")?;
    bytes_of(settings.mib, "--mib")?;
    let mut reporter = Reporter::new(out);
    let oom_protected = settings
        .oom_score_adj
        .as_ref()
        .is_some_and(|knob| std::fs::write(knob, "-1000").is_ok());
    let mut arena = Arena::new(settings.seed, settings.mib)?;
    let mut cache = if settings.cache_mib > 0 {
        Some(CacheCheck::open(
            &settings.cache_file,
            settings.cache_mib,
            settings.seed,
            settings.drop_caches.clone(),
        )?)
    } else {
        None
    };
    reporter.line(&format!(
        "@@VERIFY start mib={} words={} seed={} churn_mib={} cache_file={} cache_mib={} pid={} fill_seconds={:.2} oom_protected={oom_protected}",
        settings.mib,
        arena.words(),
        settings.seed,
        settings.churn_mib,
        cache
            .as_ref()
            .map_or_else(|| "-".to_string(), |c| c.path().display().to_string()),
        settings.cache_mib,
        std::process::id(),
        started.elapsed().as_secs_f64()
    ));
    let mut rng = Rng::new(mix(settings.seed ^ RNG_DOMAIN));
    let mut totals = Totals::default();
    let budget = Duration::from_secs(settings.seconds);
    loop {
        let pass_started = Instant::now();
        let pass = totals.passes.saturating_add(1);
        reporter.start_pass();
        let stats = arena.pass(pass, &mut rng, REPLACE_ONE_IN, |m| {
            reporter.memory_mismatch(m)
        })?;
        let churned = churn_round(settings.seed, pass, pass, churn_bytes, |m| {
            reporter.memory_mismatch(m)
        })?;
        if let Some(check) = cache.as_mut() {
            let round = check.round(|m| reporter.cache_mismatch(m))?;
            reporter.line(&round.line(check.path()));
            totals.cache_rounds = totals.cache_rounds.saturating_add(1);
            totals.cache_mismatches = totals.cache_mismatches.saturating_add(round.mismatches);
        }
        totals.passes = pass;
        totals.words = stats.words;
        totals.pass_mismatches = stats.mismatches.saturating_add(churned);
        totals.mismatches = totals.mismatches.saturating_add(totals.pass_mismatches);
        totals.replaced = totals.replaced.saturating_add(stats.replaced);
        totals.unreported = reporter.unreported();
        reporter.line(&totals.pass_line(pass_started.elapsed().as_secs_f64()));
        if let Some(error) = reporter.take_error() {
            return Err(error);
        }
        if settings.seconds > 0 && started.elapsed() >= budget {
            break;
        }
    }
    reporter.line(&totals.done_line());
    match reporter.take_error() {
        Some(error) => Err(error),
        None => Ok(totals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pass_line_starts_with_pass_words_and_mismatches() {
        let totals = Totals {
            passes: 3,
            words: 20_971_520,
            mismatches: 2,
            pass_mismatches: 1,
            replaced: 120,
            cache_rounds: 3,
            cache_mismatches: 0,
            unreported: 0,
        };
        assert_eq!(
            totals.pass_line(1.234),
            "@@VERIFY pass=3 words=20971520 mismatches=2 pass_mismatches=1 replaced=120 cache_rounds=3 cache_mismatches=0 unreported=0 seconds=1.23"
        );
        assert_eq!(
            totals.done_line(),
            "@@VERIFY done passes=3 mismatches=2 cache_mismatches=0"
        );
    }

    #[test]
    fn a_short_run_prints_start_passes_cache_rounds_and_done() {
        let cache_file =
            std::env::temp_dir().join(format!("guest-verifier-run-{}", std::process::id()));
        let settings = Settings {
            mib: 4,
            seconds: 1,
            seed: 30,
            churn_mib: 2,
            cache_file: cache_file.clone(),
            cache_mib: 1,
            drop_caches: None,
            oom_score_adj: None,
        };
        let mut out = Vec::new();
        let totals = run(&settings, &mut out).unwrap();
        std::fs::remove_file(&cache_file).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("@@VERIFY start mib=4 words=524288 seed=30 "));
        assert!(totals.passes >= 1);
        assert_eq!((totals.mismatches, totals.cache_mismatches), (0, 0));
        assert_eq!(totals.words, 4 * 131_072);
        let passes = lines
            .iter()
            .filter(|l| l.starts_with("@@VERIFY pass="))
            .count();
        let rounds = lines
            .iter()
            .filter(|l| l.starts_with("@@VERIFY cache round="))
            .count();
        assert_eq!(
            (passes as u64, rounds as u64),
            (totals.passes, totals.passes)
        );
        assert_eq!(lines.last().copied(), Some(totals.done_line().as_str()));
    }
}
