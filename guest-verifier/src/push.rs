//! The deflate-on-OOM push (`--oom-push MIB`): one short-lived process
//! that makes itself the OOM killer's first choice, allocates what the
//! guest has available plus MIB, writes a pattern into every word and
//! verifies it. The guest runs out of memory on the way; a balloon driver
//! that negotiated `DEFLATE_ON_OOM` then gives pages back from the balloon
//! (1 MiB per OOM) instead of killing anything, and the push lands on
//! those pages, just back from the balloon: a punch that hits them after
//! the deflate reads back as zeros in its verification. When the balloon
//! has less to give than asked, the OOM killer ends the push itself (its
//! `oom_score_adj` is 1000; the verifier's own is -1000).

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Instant;

use memmap2::MmapMut;

use crate::pattern::{mix, Pattern};
use crate::report::{MemoryMismatch, Region, Reporter};
use crate::words;

/// Keeps the push's patterns apart from the chunks' (same seed).
const PUSH_DOMAIN: u64 = 0x0f0f_0000_0000_0001;

/// The guest kernel's memory summary.
pub const MEMINFO: &str = "/proc/meminfo";
/// The guest kernel's event counters (`balloon_deflate`, `oom_kill`).
pub const VMSTAT: &str = "/proc/vmstat";
/// The knob that makes a process the OOM killer's choice (1000) or never
/// its choice (-1000).
pub const OOM_SCORE_ADJ: &str = "/proc/self/oom_score_adj";

const MIB: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushSettings {
    /// MiB asked beyond what the guest has available.
    pub mib: u64,
    pub seed: u64,
    /// Where `MemAvailable` is read.
    pub meminfo: PathBuf,
    /// Where the balloon's deflations and the OOM kills are counted (a
    /// file that cannot be read counts nothing).
    pub vmstat: PathBuf,
    /// The knob set to 1000 first (None: left alone, for tests).
    pub oom_score_adj: Option<PathBuf>,
}

/// What a push did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushTotals {
    pub available_mib: u64,
    pub want_mib: u64,
    pub mismatches: u64,
    pub unreported: u64,
    /// Pages the balloon gave back while the push ran (any deflate,
    /// deflate-on-OOM's among them), and OOM kills meanwhile.
    pub balloon_deflated_pages: u64,
    pub oom_kills: u64,
}

/// A counter of a /proc/vmstat text.
pub fn vmstat_counter(vmstat: &str, name: &str) -> Option<u64> {
    vmstat.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == name).then_some(())?;
        words.next()?.parse().ok()
    })
}

/// `balloon_deflate` and `oom_kill` now (0 when unknown).
fn counters(vmstat: &PathBuf) -> (u64, u64) {
    let text = std::fs::read_to_string(vmstat).unwrap_or_default();
    (
        vmstat_counter(&text, "balloon_deflate").unwrap_or(0),
        vmstat_counter(&text, "oom_kill").unwrap_or(0),
    )
}

/// `MemAvailable` of a /proc/meminfo text, in KiB.
pub fn mem_available_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Pushes once: see the module's description. Fails when the knob or
/// /proc/meminfo cannot be used, the mapping is refused, or `out` cannot
/// be written.
pub fn push<W: Write>(settings: &PushSettings, out: W) -> io::Result<PushTotals> {
    let started = Instant::now();
    if let Some(knob) = &settings.oom_score_adj {
        std::fs::write(knob, "1000")
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", knob.display())))?;
    }
    let meminfo = std::fs::read_to_string(&settings.meminfo)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", settings.meminfo.display())))?;
    let available_kib = mem_available_kib(&meminfo)
        .ok_or_else(|| io::Error::other("no MemAvailable in the guest's meminfo"))?;
    let available_mib = available_kib / 1024;
    let want_mib = available_mib
        .checked_add(settings.mib)
        .ok_or_else(|| io::Error::other("--oom-push is too large"))?;
    let bytes = want_mib
        .checked_mul(MIB)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| io::Error::other("--oom-push is too large"))?;
    let (deflated_before, kills_before) = counters(&settings.vmstat);
    let mut reporter = Reporter::new(out);
    reporter.line(&format!(
        "@@VERIFY oom-push start available_mib={available_mib} want_mib={want_mib} pid={}",
        std::process::id()
    ));
    let mut totals = PushTotals {
        available_mib,
        want_mib,
        ..PushTotals::default()
    };
    if bytes > 0 {
        let mut map = MmapMut::map_anon(bytes)?;
        let words = words::as_words(&mut map)
            .ok_or_else(|| io::Error::other("the push mapping is not whole aligned words"))?;
        let pattern = Pattern::new(mix(settings.seed ^ PUSH_DOMAIN), 0, 0);
        words::fill(words, |index| pattern.word(index));
        totals.mismatches = words::verify(
            words,
            |index| pattern.word(index),
            |word| {
                reporter.memory_mismatch(&MemoryMismatch {
                    region: Region::Push,
                    generation: 0,
                    pass: 0,
                    word,
                })
            },
        );
    }
    totals.unreported = reporter.unreported();
    let (deflated_after, kills_after) = counters(&settings.vmstat);
    totals.balloon_deflated_pages = deflated_after.saturating_sub(deflated_before);
    totals.oom_kills = kills_after.saturating_sub(kills_before);
    reporter.line(&format!(
        "@@VERIFY oom-push done want_mib={want_mib} mismatches={} unreported={} balloon_deflated_pages={} oom_kills={} seconds={:.2}",
        totals.mismatches,
        totals.unreported,
        totals.balloon_deflated_pages,
        totals.oom_kills,
        started.elapsed().as_secs_f64()
    ));
    match reporter.take_error() {
        Some(error) => Err(error),
        None => Ok(totals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmstat_counters_are_read_by_name() {
        let text = "nr_free_pages 100\nballoon_inflate 70\nballoon_deflate 12\noom_kill 1\n";
        assert_eq!(vmstat_counter(text, "balloon_deflate"), Some(12));
        assert_eq!(vmstat_counter(text, "oom_kill"), Some(1));
        assert_eq!(vmstat_counter(text, "balloon"), None);
    }

    #[test]
    fn mem_available_is_read_in_kib() {
        let text =
            "MemTotal:         481296 kB\nMemFree:          100 kB\nMemAvailable:     219152 kB\n";
        assert_eq!(mem_available_kib(text), Some(219_152));
        assert_eq!(mem_available_kib("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available_kib("MemAvailable: lots\n"), None);
    }

    #[test]
    fn a_push_allocates_available_plus_its_mib_and_verifies_it() {
        let meminfo =
            std::env::temp_dir().join(format!("guest-verifier-push-{}", std::process::id()));
        std::fs::write(&meminfo, "MemAvailable:       3072 kB\n").unwrap();
        let settings = PushSettings {
            mib: 2,
            seed: 30,
            meminfo: meminfo.clone(),
            vmstat: PathBuf::from("/nonexistent/vmstat"),
            oom_score_adj: None,
        };
        let mut out = Vec::new();
        let totals = push(&settings, &mut out).unwrap();
        std::fs::remove_file(&meminfo).unwrap();
        assert_eq!(
            totals,
            PushTotals {
                available_mib: 3,
                want_mib: 5,
                ..PushTotals::default()
            }
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("@@VERIFY oom-push start available_mib=3 want_mib=5 pid="));
        assert!(lines[1].starts_with(
            "@@VERIFY oom-push done want_mib=5 mismatches=0 unreported=0 balloon_deflated_pages=0 oom_kills=0 seconds="
        ));
    }

    #[test]
    fn a_push_without_meminfo_is_an_error_naming_the_file() {
        let settings = PushSettings {
            mib: 1,
            seed: 1,
            meminfo: PathBuf::from("/nonexistent/meminfo"),
            vmstat: PathBuf::from("/nonexistent/vmstat"),
            oom_score_adj: None,
        };
        let error = push(&settings, Vec::new()).err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("/nonexistent/meminfo")),
            "{error:?}"
        );
    }
}
