//! What the real-guest integrity tests (issue 30) share: starting
//! `guest-verifier` in the guest and reading its `@@VERIFY` lines into a
//! report (docs/guest-verifier.md), waiting for more of its passes, waiting
//! for a quiet period of the balloon and checking that the backend's
//! balloon is the driver's `actual` then, and a seeded generator for the
//! schedules. `n_restart_integrity` and `o_integrity_paths` use them.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use balloon_protocol::control::{ControlClient, StatusReply};

use crate::env::TestEnv;
use crate::vm::Vm;
use crate::MIB;

/// Longest wait for QEMU to reconnect to a restarted backend.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// Longest wait for a quiet period.
pub const QUIET_DEADLINE: Duration = Duration::from_secs(120);
/// A quiet period: target, actual and ballooned unchanged this long, no
/// punch pending.
pub const QUIET_FOR: Duration = Duration::from_secs(1);
pub const QUIET_POLL: Duration = Duration::from_millis(250);
/// Longest a verifier pass may take under TCG.
pub const PASS_DEADLINE: Duration = Duration::from_secs(180);

/// SplitMix64: a small seeded generator, so a seed gives one schedule.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high` (modulo bias is irrelevant here).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        let span = high.saturating_sub(low).saturating_add(1);
        low.saturating_add(self.next_u64() % span)
    }

    /// A duration of `low_ms..=high_ms` milliseconds.
    pub fn millis(&mut self, low_ms: u64, high_ms: u64) -> Duration {
        Duration::from_millis(self.between(low_ms, high_ms))
    }
}

/// A number from the environment, or `default` when it is not set.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={text:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The provisioned environment, with `BALLOON_BACKEND_BINARY` and
/// `BALLOON_QEMU` running other builds (an older commit's, or one broken
/// on purpose) against the same harness and guest.
pub fn env_with_overrides() -> anyhow::Result<TestEnv> {
    let mut env = TestEnv::load()?;
    if let Some(binary) = std::env::var_os("BALLOON_BACKEND_BINARY") {
        env.backend_binary = binary.into();
    }
    if let Some(qemu) = std::env::var_os("BALLOON_QEMU") {
        env.qemu = qemu.into();
    }
    Ok(env)
}

/// The value of `key=` in a `@@VERIFY` line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

pub fn number(line: &str, key: &str) -> Option<u64> {
    field(line, key)?.parse().ok()
}

pub fn is_start_line(line: &str) -> bool {
    line.starts_with("@@VERIFY start ")
}

pub fn is_pass_line(line: &str) -> bool {
    line.starts_with("@@VERIFY pass=")
}

pub fn is_memory_mismatch(line: &str) -> bool {
    line.starts_with("@@VERIFY MISMATCH ")
}

pub fn is_cache_mismatch(line: &str) -> bool {
    line.starts_with("@@VERIFY CACHE-MISMATCH ")
}

pub fn is_cache_round(line: &str) -> bool {
    line.starts_with("@@VERIFY cache round=")
}

/// The totals one verifier run printed last.
#[derive(Clone, Copy, Debug, Default)]
struct RunTotals {
    passes: u64,
    mismatches: u64,
    cache_rounds: u64,
    cache_mismatches: u64,
}

/// What the verifier has said so far: every run of it on one console (a
/// rebooted guest starts it again; each `start` line begins a run), its
/// totals summed over the runs.
#[derive(Debug, Default)]
pub struct VerifierReport {
    /// Runs seen (`start` lines).
    pub runs: u64,
    pub passes: u64,
    /// Memory mismatches by its own count (the pass lines' `mismatches=`).
    pub mismatches: u64,
    pub cache_rounds: u64,
    pub cache_mismatches: u64,
    /// Cache rounds whose checksums differed from the expected one.
    pub bad_cache_rounds: Vec<String>,
    pub mismatch_lines: Vec<String>,
    pub cache_mismatch_lines: Vec<String>,
    /// Errors the verifier printed (`@@VERIFY error ...`).
    pub errors: Vec<String>,
}

impl VerifierReport {
    pub fn from_lines(lines: &[String]) -> VerifierReport {
        let mut report = VerifierReport::default();
        let mut runs: Vec<RunTotals> = Vec::new();
        for line in lines {
            if is_start_line(line) {
                runs.push(RunTotals::default());
                report.runs = report.runs.saturating_add(1);
            } else if is_pass_line(line) {
                if runs.is_empty() {
                    // The lines of a run that started on another console
                    // (the source of a migration).
                    runs.push(RunTotals::default());
                }
                if let Some(run) = runs.last_mut() {
                    run.passes = number(line, "pass").unwrap_or(run.passes);
                    run.mismatches = number(line, "mismatches").unwrap_or(run.mismatches);
                    run.cache_mismatches =
                        number(line, "cache_mismatches").unwrap_or(run.cache_mismatches);
                    run.cache_rounds = number(line, "cache_rounds").unwrap_or(run.cache_rounds);
                }
            } else if is_memory_mismatch(line) {
                report.mismatch_lines.push(line.clone());
            } else if is_cache_mismatch(line) {
                report.cache_mismatch_lines.push(line.clone());
            } else if is_cache_round(line) {
                let want = field(line, "want");
                let held = want.is_some()
                    && field(line, "cached") == want
                    && field(line, "reread") == want
                    && number(line, "mismatches") == Some(0);
                if !held {
                    report.bad_cache_rounds.push(line.clone());
                }
            } else if line.starts_with("@@VERIFY error") {
                report.errors.push(line.clone());
            }
        }
        for run in runs {
            report.passes = report.passes.saturating_add(run.passes);
            report.mismatches = report.mismatches.saturating_add(run.mismatches);
            report.cache_rounds = report.cache_rounds.saturating_add(run.cache_rounds);
            report.cache_mismatches = report.cache_mismatches.saturating_add(run.cache_mismatches);
        }
        report
    }

    /// Mismatches seen, by the larger of the verifier's count and the
    /// lines printed (a pass cut short by a dead guest prints no count).
    pub fn memory_mismatches(&self) -> u64 {
        self.mismatches.max(self.mismatch_lines.len() as u64)
    }

    pub fn cache_problems(&self) -> u64 {
        self.cache_mismatches
            .max(self.cache_mismatch_lines.len() as u64)
            .max(self.bad_cache_rounds.len() as u64)
    }

    /// `key=value` pairs for a closing summary line.
    pub fn summary(&self) -> String {
        format!(
            "verifier_runs={} verifier_passes={} mismatches={} mismatch_lines={} pages_hit={} cache_rounds={} cache_problems={}",
            self.runs,
            self.passes,
            self.memory_mismatches(),
            self.mismatch_lines.len(),
            pages_hit(&self.mismatch_lines),
            self.cache_rounds,
            self.cache_problems(),
        )
    }

    /// What the guest saw that fails a test: corrupted words, page-cache
    /// checksums that did not hold, errors, no pass at all.
    pub fn findings(&self) -> Vec<String> {
        let mut findings = Vec::new();
        if self.memory_mismatches() > 0 {
            let shown = self
                .mismatch_lines
                .iter()
                .take(8)
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n");
            findings.push(format!(
                "guest memory corrupted: {} words did not hold what the guest wrote ({} pages among the {} lines printed; address, expected, found of the first {}):\n{shown}",
                self.memory_mismatches(),
                pages_hit(&self.mismatch_lines),
                self.mismatch_lines.len(),
                self.mismatch_lines.len().min(8)
            ));
        }
        if self.cache_problems() > 0 {
            let shown = self
                .cache_mismatch_lines
                .iter()
                .chain(&self.bad_cache_rounds)
                .take(6)
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n");
            findings.push(format!(
                "the page-cache checksums did not hold ({} problems):\n{shown}",
                self.cache_problems()
            ));
        }
        findings.extend(self.errors.iter().map(|e| format!("verifier: {e}")));
        if self.passes == 0 {
            findings.push("the verifier made no pass".to_string());
        } else if self.cache_rounds == 0 {
            findings.push("the verifier made no page-cache round".to_string());
        }
        findings
    }
}

/// Distinct 4 KiB guest pages named by mismatch lines (by `gpa`, else by
/// the virtual address).
pub fn pages_hit(lines: &[String]) -> usize {
    let pages: BTreeSet<u64> = lines
        .iter()
        .filter_map(|line| {
            let address = field(line, "gpa")
                .filter(|gpa| *gpa != "?")
                .or_else(|| field(line, "addr"))?;
            u64::from_str_radix(address.trim_start_matches("0x"), 16).ok()
        })
        .map(|address| address >> 12)
        .collect();
    pages.len()
}

/// Console lines that say the guest kernel or a guest program crashed (a
/// page punched under the kernel or a process reads back as zeros: a
/// jump to address 0, a panic).
pub fn crash_lines(lines: &[String]) -> Vec<String> {
    const MARKERS: [&str; 6] = [
        "Kernel panic",
        "segfault at",
        "BUG: ",
        "Oops: ",
        "general protection fault",
        "invalid opcode",
    ];
    lines
        .iter()
        .filter(|l| MARKERS.iter().any(|m| l.contains(m)))
        .cloned()
        .collect()
}

/// What a console says of crashes, as a finding (None when it says
/// nothing).
pub fn crash_finding(lines: &[String]) -> Option<String> {
    let crashes = crash_lines(lines);
    if crashes.is_empty() {
        return None;
    }
    let shown = crashes
        .iter()
        .take(6)
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    Some(format!(
        "the guest crashed ({} console lines of crashes; guest memory was lost under the kernel or a process):\n{shown}",
        crashes.len()
    ))
}

/// The verifier's lines on this VM's console so far.
pub fn verifier_lines(vm: &Vm) -> Vec<String> {
    vm.lines_matching(|l| l.starts_with("@@VERIFY"))
}

/// How the verifier is started in the guest.
#[derive(Clone, Debug)]
pub struct VerifierSettings {
    pub mib: u64,
    pub seed: u64,
    pub churn_mib: u64,
    /// The page-cache file: the head of a virtio-blk disk (`/dev/vda`), so
    /// dropping the guest's caches really sends the next read to the host.
    pub cache_file: String,
    pub cache_mib: u64,
}

impl VerifierSettings {
    pub fn command(&self) -> String {
        format!(
            "guest-verifier --mib {} --seconds 0 --seed {} --churn-mib {} --cache-file {} --cache-mib {} &",
            self.mib, self.seed, self.churn_mib, self.cache_file, self.cache_mib
        )
    }
}

/// Longest a short guest command may take (a guest that died while it
/// ran never answers).
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// Runs a short command that must succeed in the guest's shell.
fn short_command(vm: &mut Vm, command: &str) -> anyhow::Result<String> {
    let (status, output) = vm.run(command, COMMAND_DEADLINE)?;
    anyhow::ensure!(
        status == 0,
        "guest command `{command}` exited {status}: {output}"
    );
    Ok(output)
}

/// Starts the verifier in the background of the guest's shell and waits
/// for this run's `start` line and its first pass; the `start` line.
pub fn start_verifier(vm: &mut Vm, settings: &VerifierSettings) -> anyhow::Result<String> {
    short_command(
        vm,
        &format!(
            "command -v guest-verifier && test -e {}",
            settings.cache_file
        ),
    )
    .context("the guest image needs guest-verifier (cargo xtask guest) and its cache file")?;
    let starts = vm.lines_matching(is_start_line).len();
    let first_passes = vm
        .lines_matching(|l| l.starts_with("@@VERIFY pass=1 "))
        .len();
    short_command(vm, &settings.command())?;
    let start = vm.wait_nth_line(is_start_line, starts.saturating_add(1), PASS_DEADLINE)?;
    vm.wait_nth_line(
        |l| l.starts_with("@@VERIFY pass=1 "),
        first_passes.saturating_add(1),
        PASS_DEADLINE,
    )?;
    Ok(start)
}

/// Waits until the verifier has printed `more` pass lines beyond those on
/// the console now (every word checked again after the last event); a
/// description of what went wrong otherwise.
pub fn wait_more_passes(vm: &mut Vm, more: usize, timeout: Duration) -> Option<String> {
    let seen = vm.lines_matching(is_pass_line).len();
    let wanted = seen.saturating_add(more);
    match vm.wait_nth_line(is_pass_line, wanted, timeout) {
        Ok(_) => None,
        Err(error) => {
            let alive = vm
                .run("pidof guest-verifier || echo gone", Duration::from_secs(30))
                .map(|(_, out)| out)
                .unwrap_or_default();
            Some(format!(
                "the verifier made no {more} more passes after the last event (pidof: {}): {error:#}",
                alive.trim()
            ))
        }
    }
}

pub fn mib_bytes(mib: u64) -> anyhow::Result<u64> {
    mib.checked_mul(MIB).context("MiB to bytes")
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Waits until QEMU is attached to the (restarted) backend and the
/// config-change channel is up; how long that took.
pub fn wait_reconnected(control: &mut ControlClient) -> anyhow::Result<Duration> {
    let started = Instant::now();
    crate::wait_for("QEMU to reconnect", RECONNECT_DEADLINE, || {
        let status = control.status()?;
        Ok((status.connected && status.config_notify).then_some(()))
    })?;
    Ok(started.elapsed())
}

/// Waits for a quiet period: the guest has reached the target, no punch is
/// pending, and target, actual and ballooned held still for `QUIET_FOR`.
/// Returns the status then.
pub fn wait_quiet(control: &mut ControlClient) -> anyhow::Result<StatusReply> {
    wait_still(control, true)
}

/// Waits until no punch is pending and target, actual and ballooned held
/// still for `QUIET_FOR`, with `actual` = target when `at_target` (a quiet
/// period), or wherever it stands otherwise. Returns the status then.
pub fn wait_still(control: &mut ControlClient, at_target: bool) -> anyhow::Result<StatusReply> {
    let mut since: Option<(Instant, [u64; 3])> = None;
    let what = if at_target {
        "a quiet period (actual = target, no punch pending, nothing moving for 1 s)"
    } else {
        "the balloon to stand still (no punch pending, nothing moving for 1 s)"
    };
    test_support::wait::wait_for_every(what, QUIET_DEADLINE, QUIET_POLL, || {
        let status = control.status()?;
        let key = [
            status.target_bytes,
            status.actual_bytes,
            status.ballooned_bytes,
        ];
        let settled =
            status.connected && (key[0] == key[1] || !at_target) && status.pending_punch_bytes == 0;
        if !settled {
            since = None;
            return Ok(None);
        }
        match since {
            Some((at, seen)) if seen == key && at.elapsed() >= QUIET_FOR => Ok(Some(status)),
            Some((_, seen)) if seen == key => Ok(None),
            _ => {
                since = Some((Instant::now(), key));
                Ok(None)
            }
        }
    })
}

/// After a quiet period: None when the backend's balloon is the driver's
/// `actual`, else what differs.
pub fn balloon_differs_from_actual(quiet: &StatusReply) -> Option<String> {
    let actual = quiet.actual_bytes;
    let ballooned = quiet.ballooned_bytes;
    if ballooned == actual {
        return None;
    }
    let (more, by) = match ballooned.checked_sub(actual) {
        Some(excess) => ("more", excess),
        None => ("less", actual.saturating_sub(ballooned)),
    };
    Some(format!(
        "the backend's balloon is {:.1} MiB but the driver's actual is {:.1} MiB ({:.1} MiB {more})",
        mib(ballooned),
        mib(actual),
        mib(by)
    ))
}

/// A quiet status in a few words, for progress lines.
pub fn describe_quiet(quiet: &StatusReply) -> String {
    format!(
        "target {:.1} MiB, actual {:.1} MiB, ballooned {:.1} MiB, discarded {:.1} MiB, reported {:.1} MiB",
        mib(quiet.target_bytes),
        mib(quiet.actual_bytes),
        mib(quiet.ballooned_bytes),
        mib(quiet.discarded_bytes),
        mib(quiet.reported_bytes_total),
    )
}

/// Lines of a backend's log worth showing next to a failure.
#[derive(Debug, Default)]
pub struct LogHighlights {
    /// "balloon taken over" lines (restarts that took a state file over).
    pub taken_over: usize,
    /// "inflated twice" lines (pages the guest inflated that the backend
    /// thought were in the balloon already).
    pub inflated_twice: usize,
    /// Lines about the reset check.
    pub resets_seen: usize,
    /// The last lines of note.
    pub tail: Vec<String>,
}

pub fn log_highlights(log: &Path) -> LogHighlights {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    let tail = text
        .lines()
        .filter(|l| {
            l.contains("taken over")
                || l.contains("inflated twice")
                || l.contains("started over")
                || l.contains("state")
                || l.contains("ERROR")
                || l.contains("WARN")
        })
        .rev()
        .take(12)
        .map(str::to_string)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    LogHighlights {
        taken_over: count("taken over"),
        inflated_twice: count("inflated twice"),
        resets_seen: count("started over"),
        tail,
    }
}

impl LogHighlights {
    pub fn indented_tail(&self) -> String {
        self.tail
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn verifier_lines_are_read_into_a_report() {
        let lines = lines(&[
            "@@VERIFY start mib=160 words=20971520 seed=30",
            "@@VERIFY cache round=1 file=/dev/vda generation=1 bytes=8388608 rewritten=true want=0x1 cached=0x1 reread=0x1 dropped=true mismatches=0",
            "@@VERIFY pass=1 words=20971520 mismatches=0 pass_mismatches=0 replaced=40 cache_rounds=1 cache_mismatches=0 unreported=0 seconds=2.00",
            "@@VERIFY MISMATCH addr=0x7f0000001000 chunk=14 word=0 want=0x2602081c1e7a4580 got=0x0000000000000000 generation=2 pass=2 gpa=0x1234000",
            "@@VERIFY cache round=2 file=/dev/vda generation=1 bytes=8388608 rewritten=false want=0x1 cached=0x2 reread=0x1 dropped=true mismatches=1",
            "@@VERIFY CACHE-MISMATCH file=/dev/vda round=2 read=cached offset=0x0 want=0x1 got=0x0",
            "@@VERIFY pass=2 words=20971520 mismatches=1 pass_mismatches=1 replaced=80 cache_rounds=2 cache_mismatches=1 unreported=0 seconds=2.00",
            "[    1.0] unrelated console line",
        ]);
        let report = VerifierReport::from_lines(&lines);
        assert_eq!(report.runs, 1);
        assert_eq!((report.passes, report.memory_mismatches()), (2, 1));
        assert_eq!((report.cache_rounds, report.cache_problems()), (2, 1));
        assert_eq!(report.bad_cache_rounds.len(), 1);
        assert_eq!(
            field(&report.mismatch_lines[0], "want"),
            Some("0x2602081c1e7a4580")
        );
        assert_eq!(
            field(&report.mismatch_lines[0], "addr"),
            Some("0x7f0000001000")
        );
        assert_eq!(number(&lines[2], "words"), Some(20_971_520));
        assert_eq!(field(&lines[2], "nothing"), None);
        assert_eq!(report.findings().len(), 2, "{:?}", report.findings());
        let hits = [
            "@@VERIFY MISMATCH addr=0x7f0000001000 gpa=0x1234000",
            "@@VERIFY MISMATCH addr=0x7f0000001008 gpa=0x1234008",
            "@@VERIFY MISMATCH addr=0x7f0000002000 gpa=?",
        ]
        .map(String::from);
        assert_eq!(pages_hit(&hits), 2);
    }

    #[test]
    fn the_runs_of_a_rebooted_guest_are_summed() {
        let lines = lines(&[
            "@@VERIFY start mib=96 seed=1",
            "@@VERIFY pass=1 words=1 mismatches=0 pass_mismatches=0 replaced=1 cache_rounds=1 cache_mismatches=0",
            "@@VERIFY pass=2 words=1 mismatches=3 pass_mismatches=3 replaced=1 cache_rounds=2 cache_mismatches=0",
            // The guest was reset in pass 3; it starts again.
            "@@VERIFY pass=3 words=1",
            "@@VERIFY start mib=96 seed=2",
            "@@VERIFY pass=1 words=1 mismatches=0 pass_mismatches=0 replaced=1 cache_rounds=1 cache_mismatches=1",
        ]);
        let report = VerifierReport::from_lines(&lines);
        assert_eq!(report.runs, 2);
        assert_eq!(report.passes, 4);
        assert_eq!(report.memory_mismatches(), 3);
        assert_eq!((report.cache_rounds, report.cache_problems()), (3, 1));
    }

    #[test]
    fn lines_of_a_run_started_elsewhere_count() {
        // The destination of a migration sees no start line.
        let lines = lines(&[
            "@@VERIFY pass=7 words=1 mismatches=0 pass_mismatches=0 replaced=1 cache_rounds=7 cache_mismatches=0",
        ]);
        let report = VerifierReport::from_lines(&lines);
        assert_eq!((report.runs, report.passes, report.cache_rounds), (0, 7, 7));
        assert!(report.findings().is_empty(), "{:?}", report.findings());
        assert!(VerifierReport::from_lines(&[])
            .findings()
            .iter()
            .any(|f| f.contains("no pass")));
    }

    #[test]
    fn crashes_on_the_console_are_found() {
        let console = lines(&[
            "@@READY",
            "[    5.99] init[1]: segfault at 0 ip 0000000000000000 sp 00007ffe118e6ae0 error 14",
            "[    6.00] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b",
            "@@VERIFY pass=1 words=1 mismatches=0",
        ]);
        assert_eq!(crash_lines(&console).len(), 2);
        assert!(crash_finding(&console).is_some_and(|f| f.contains("Kernel panic")));
        assert_eq!(crash_finding(&console[3..]), None);
    }

    #[test]
    fn a_seed_gives_one_sequence() {
        let draw = |seed| {
            let mut rng = SplitMix64(seed);
            (0..20).map(|_| rng.between(3, 9)).collect::<Vec<_>>()
        };
        assert_eq!(draw(30), draw(30));
        assert_ne!(draw(30), draw(31));
        assert!(draw(30).iter().all(|n| (3..=9).contains(n)));
    }

    #[test]
    fn a_quiet_status_that_differs_is_named() {
        let status = StatusReply {
            actual_bytes: 0,
            ballooned_bytes: 16 * MIB,
            ..StatusReply::default()
        };
        let found = balloon_differs_from_actual(&status);
        assert!(
            found
                .as_deref()
                .is_some_and(|f| f.contains("16.0 MiB more")),
            "{found:?}"
        );
        let status = StatusReply {
            actual_bytes: MIB,
            ballooned_bytes: MIB,
            ..StatusReply::default()
        };
        assert_eq!(balloon_differs_from_actual(&status), None);
    }
}
