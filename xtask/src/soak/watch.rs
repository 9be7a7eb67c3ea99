//! What the soak reads from a guest's console: guest-verifier's lines
//! (docs/guest-verifier.md), read as they come, across the QEMUs a guest
//! runs in (a migration moves it to another console).

use std::time::Instant;

/// The value of `key=` in a `@@VERIFY` line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

pub fn number(line: &str, key: &str) -> Option<u64> {
    field(line, key)?.parse().ok()
}

/// Mismatch lines kept for the report, at most.
const KEPT_LINES: usize = 8;

/// One guest's verifier, as its lines tell it.
#[derive(Debug)]
pub struct VerifierWatch {
    /// `@@VERIFY` lines of the current console already read.
    pub seen: usize,
    /// Verifiers started (a guest reset needs a new one).
    pub starts: u64,
    /// The newest verifier's last pass.
    pub pass: u64,
    /// Passes of every verifier of this guest.
    pub total_passes: u64,
    /// When a pass was last completed (or a verifier started).
    pub last_progress: Instant,
    /// Whether the newest verifier made itself the OOM killer's last choice.
    pub protected: bool,
    pub pushes_started: u64,
    pub pushes_done: u64,
    /// Pages the balloon gave back during the pushes (deflate-on-OOM).
    pub push_deflated_pages: u64,
    /// The verifier's own count of mismatches, the newest run's.
    counted_mismatches: u64,
    counted_cache_mismatches: u64,
}

impl VerifierWatch {
    pub fn new(now: Instant) -> Self {
        VerifierWatch {
            seen: 0,
            starts: 0,
            pass: 0,
            total_passes: 0,
            last_progress: now,
            protected: false,
            pushes_started: 0,
            pushes_done: 0,
            push_deflated_pages: 0,
            counted_mismatches: 0,
            counted_cache_mismatches: 0,
        }
    }

    /// Reads `lines` (the console's `@@VERIFY` lines from the first not
    /// yet seen); returns what they show wrong, one text per finding.
    pub fn read(&mut self, lines: &[String], now: Instant) -> Vec<String> {
        let mut findings = Vec::new();
        let mut mismatch_lines: Vec<&str> = Vec::new();
        let mut more_mismatches = 0u64;
        for line in lines {
            if line.starts_with("@@VERIFY MISMATCH ")
                || line.starts_with("@@VERIFY CACHE-MISMATCH ")
            {
                if mismatch_lines.len() < KEPT_LINES {
                    mismatch_lines.push(line);
                } else {
                    more_mismatches = more_mismatches.saturating_add(1);
                }
            } else if line.starts_with("@@VERIFY start ") {
                self.starts = self.starts.saturating_add(1);
                self.pass = 0;
                self.counted_mismatches = 0;
                self.counted_cache_mismatches = 0;
                self.protected = field(line, "oom_protected") == Some("true");
                self.last_progress = now;
            } else if line.starts_with("@@VERIFY pass=") {
                if let Some(pass) = number(line, "pass") {
                    if pass > self.pass {
                        self.total_passes = self.total_passes.saturating_add(pass - self.pass);
                        self.pass = pass;
                        self.last_progress = now;
                    }
                }
                let mismatches = number(line, "mismatches").unwrap_or(0);
                let cache = number(line, "cache_mismatches").unwrap_or(0);
                if mismatches > self.counted_mismatches || cache > self.counted_cache_mismatches {
                    findings.push(format!(
                        "the verifier counted {} memory and {} page-cache mismatches by its pass {}: {line}",
                        mismatches.saturating_sub(self.counted_mismatches),
                        cache.saturating_sub(self.counted_cache_mismatches),
                        self.pass
                    ));
                    self.counted_mismatches = mismatches.max(self.counted_mismatches);
                    self.counted_cache_mismatches = cache.max(self.counted_cache_mismatches);
                }
            } else if line.starts_with("@@VERIFY cache round=") {
                let want = field(line, "want");
                let held = want.is_some()
                    && field(line, "cached") == want
                    && field(line, "reread") == want
                    && number(line, "mismatches") == Some(0);
                if !held {
                    findings.push(format!("a page-cache round did not read back: {line}"));
                }
            } else if line.starts_with("@@VERIFY oom-push start ") {
                self.pushes_started = self.pushes_started.saturating_add(1);
            } else if line.starts_with("@@VERIFY oom-push done ") {
                self.pushes_done = self.pushes_done.saturating_add(1);
                self.push_deflated_pages = self
                    .push_deflated_pages
                    .saturating_add(number(line, "balloon_deflated_pages").unwrap_or(0));
                if number(line, "mismatches").unwrap_or(0) > 0 {
                    findings.push(format!(
                        "a deflate-on-OOM push read back wrong words: {line}"
                    ));
                }
            } else if line.starts_with("@@VERIFY error") || line.starts_with("@@VERIFY done ") {
                findings.push(format!("the verifier stopped: {line}"));
            }
        }
        if !mismatch_lines.is_empty() {
            let mut text = format!(
                "guest memory did not hold what the guest wrote ({} mismatch lines{}):",
                mismatch_lines
                    .len()
                    .saturating_add(usize::try_from(more_mismatches).unwrap_or(usize::MAX)),
                if more_mismatches > 0 {
                    format!(", the first {KEPT_LINES} shown")
                } else {
                    String::new()
                }
            );
            for line in mismatch_lines {
                text.push_str("\n      ");
                text.push_str(line);
            }
            findings.insert(0, text);
        }
        findings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn clean_lines_are_progress_and_nothing_else() {
        let now = Instant::now();
        let mut watch = VerifierWatch::new(now);
        let findings = watch.read(
            &lines(&[
                "@@VERIFY start mib=128 words=1 seed=3 oom_protected=true",
                "@@VERIFY cache round=1 file=/dev/vda generation=1 bytes=8 rewritten=true want=0x1 cached=0x1 reread=0x1 dropped=true mismatches=0",
                "@@VERIFY pass=1 words=1 mismatches=0 pass_mismatches=0 replaced=1 cache_rounds=1 cache_mismatches=0 unreported=0 seconds=2.00",
                "@@VERIFY oom-push start available_mib=10 want_mib=42 pid=9",
                "@@VERIFY oom-push done want_mib=42 mismatches=0 unreported=0 balloon_deflated_pages=9000 oom_kills=0 seconds=1.00",
                "@@VERIFY pass=2 words=1 mismatches=0 pass_mismatches=0 replaced=1 cache_rounds=2 cache_mismatches=0 unreported=0 seconds=2.00",
            ]),
            now,
        );
        assert!(findings.is_empty(), "{findings:?}");
        assert_eq!((watch.starts, watch.pass, watch.total_passes), (1, 2, 2));
        assert!(watch.protected);
        assert_eq!((watch.pushes_started, watch.pushes_done), (1, 1));
        assert_eq!(watch.push_deflated_pages, 9000);
        // A new verifier (after a reset) counts its passes from 1 again.
        watch.read(
            &lines(&[
                "@@VERIFY start mib=128 words=1 seed=4 oom_protected=false",
                "@@VERIFY pass=1 words=1 mismatches=0 pass_mismatches=0 replaced=1 cache_rounds=1 cache_mismatches=0 unreported=0 seconds=2.00",
            ]),
            now,
        );
        assert_eq!((watch.starts, watch.pass, watch.total_passes), (2, 1, 3));
        assert!(!watch.protected);
    }

    #[test]
    fn every_kind_of_wrong_line_is_a_finding() {
        let now = Instant::now();
        let mut watch = VerifierWatch::new(now);
        let findings = watch.read(
            &lines(&[
                "@@VERIFY start mib=128 words=1 seed=3 oom_protected=true",
                "@@VERIFY MISMATCH addr=0x7f0000001000 chunk=14 word=0 want=0x2 got=0x0000000000000000 generation=2 pass=2 gpa=0x1234000",
                "@@VERIFY pass=1 words=1 mismatches=1 pass_mismatches=1 replaced=1 cache_rounds=1 cache_mismatches=0 unreported=0 seconds=2.00",
                "@@VERIFY cache round=2 file=/dev/vda generation=1 bytes=8 rewritten=false want=0x1 cached=0x2 reread=0x1 dropped=true mismatches=1",
                "@@VERIFY oom-push done want_mib=42 mismatches=3 unreported=0 seconds=1.00",
                "@@VERIFY error /dev/vda: Input/output error",
            ]),
            now,
        );
        assert_eq!(findings.len(), 5, "{findings:#?}");
        assert!(findings[0].contains("chunk=14"), "{}", findings[0]);
        // The same count again is not a new finding; a higher one is.
        let pass = "@@VERIFY pass=2 words=1 mismatches=1 pass_mismatches=0 replaced=1 cache_rounds=1 cache_mismatches=0 unreported=0 seconds=2.00";
        assert!(watch.read(&lines(&[pass]), now).is_empty());
        let pass = "@@VERIFY pass=3 words=1 mismatches=5 pass_mismatches=4 replaced=1 cache_rounds=1 cache_mismatches=0 unreported=0 seconds=2.00";
        assert_eq!(watch.read(&lines(&[pass]), now).len(), 1);
    }

    #[test]
    fn fields_are_found_by_key() {
        let line = "@@VERIFY pass=3 words=20 mismatches=0";
        assert_eq!(number(line, "words"), Some(20));
        assert_eq!(field(line, "pass"), Some("3"));
        assert_eq!(field(line, "nothing"), None);
    }
}
