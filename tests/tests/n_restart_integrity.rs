//! (n) Restart integrity (issue 30): the backend is SIGKILLed right after a
//! deflate and started again with the same `--state-file`, over and over,
//! while `guest-verifier` in the guest owns 160 MiB, re-verifies every word
//! of it and churns memory and page cache. A restarted backend must never
//! punch a page the guest owns, QEMU must survive every restart, and after
//! each quiet period the backend's balloon must equal the driver's `actual`.
//!
//! The schedule is drawn from a seed (`BALLOON_RESTART_SEED`, default 30;
//! `BALLOON_RESTART_CYCLES` overrides the number of cycles), printed, and
//! named in every failure, so a run replays. `BALLOON_BACKEND_BINARY` and
//! `BALLOON_QEMU` run other builds (an older commit's, to see the bug)
//! against the same harness and guest.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use guest_tests::backend::{BackendProcess, ControlClient};
use guest_tests::env::TestEnv;
use guest_tests::vm::{Balloon, Vm, VmConfig};
use guest_tests::MIB;
use serde_json::Value;

const DEFAULT_SEED: u64 = 30;
/// About two minutes of cycles under TCG (about 4 s each).
const DEFAULT_CYCLES: u32 = 30;
const GUEST_MIB: u64 = 512;
const VERIFIER_MIB: u64 = 160;
const CHURN_MIB: u64 = 16;
/// The page-cache file: the head of a virtio-blk disk, so dropping the
/// guest's caches really sends the next read to the host.
const CACHE_MIB: u64 = 8;
const DISK_MIB: u64 = 16;

/// A balloon this large when the deflate is asked makes a cycle count as
/// the case issue 30 is about; a run without one tested nothing.
const SUBSTANTIAL_MIB: u64 = 32;

/// Longest wait for QEMU to reconnect to a restarted backend.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// Longest wait for a quiet period after a restart.
const QUIET_DEADLINE: Duration = Duration::from_secs(120);
/// A quiet period: target, actual and ballooned unchanged this long, no
/// punch pending.
const QUIET_FOR: Duration = Duration::from_secs(1);
const QUIET_POLL: Duration = Duration::from_millis(250);
/// Longest a verifier pass may take under TCG.
const PASS_DEADLINE: Duration = Duration::from_secs(180);

/// SplitMix64: a small seeded generator, so a seed gives one schedule.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high` (modulo bias is irrelevant here).
    fn between(&mut self, low: u64, high: u64) -> u64 {
        let span = high.saturating_sub(low).saturating_add(1);
        low.saturating_add(self.next_u64() % span)
    }
}

/// One cycle of issue 30's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cycle {
    high_mib: u64,
    hold_ms: u64,
    low_mib: u64,
    kill_after_ms: u64,
    down_ms: u64,
}

impl Cycle {
    fn draw(rng: &mut SplitMix64) -> Cycle {
        Cycle {
            high_mib: rng.between(150, 180),
            hold_ms: rng.between(1000, 2500),
            low_mib: if rng.between(0, 1) == 0 { 0 } else { 16 },
            kill_after_ms: rng.between(50, 400),
            down_ms: rng.between(200, 1000),
        }
    }

    fn describe(&self) -> String {
        format!(
            "target {} MiB, {} ms later {} MiB, {} ms later SIGKILL, {} ms later restart",
            self.high_mib, self.hold_ms, self.low_mib, self.kill_after_ms, self.down_ms
        )
    }
}

fn schedule(seed: u64, cycles: u32) -> Vec<Cycle> {
    let mut rng = SplitMix64(seed);
    (0..cycles).map(|_| Cycle::draw(&mut rng)).collect()
}

/// The value of `key=` in a `@@VERIFY` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

fn number(line: &str, key: &str) -> Option<u64> {
    field(line, key)?.parse().ok()
}

fn is_pass_line(line: &str) -> bool {
    line.starts_with("@@VERIFY pass=")
}

fn is_memory_mismatch(line: &str) -> bool {
    line.starts_with("@@VERIFY MISMATCH ")
}

fn is_cache_mismatch(line: &str) -> bool {
    line.starts_with("@@VERIFY CACHE-MISMATCH ")
}

fn is_cache_round(line: &str) -> bool {
    line.starts_with("@@VERIFY cache round=")
}

/// What the verifier has said so far.
#[derive(Debug, Default)]
struct VerifierReport {
    passes: u64,
    /// Memory mismatches by its own count (the pass lines' `mismatches=`).
    mismatches: u64,
    cache_rounds: u64,
    cache_mismatches: u64,
    /// Cache rounds whose checksums differed from the expected one.
    bad_cache_rounds: Vec<String>,
    mismatch_lines: Vec<String>,
    cache_mismatch_lines: Vec<String>,
    /// Errors the verifier printed (`@@VERIFY error ...`).
    errors: Vec<String>,
}

impl VerifierReport {
    fn from_lines(lines: &[String]) -> VerifierReport {
        let mut report = VerifierReport::default();
        for line in lines {
            if is_pass_line(line) {
                report.passes = number(line, "pass").unwrap_or(report.passes);
                report.mismatches = number(line, "mismatches").unwrap_or(report.mismatches);
                report.cache_mismatches =
                    number(line, "cache_mismatches").unwrap_or(report.cache_mismatches);
                report.cache_rounds = number(line, "cache_rounds").unwrap_or(report.cache_rounds);
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
        report
    }

    /// Mismatches seen, by the larger of the verifier's count and the
    /// lines printed (a pass cut short by a dead guest prints no count).
    fn memory_mismatches(&self) -> u64 {
        self.mismatches.max(self.mismatch_lines.len() as u64)
    }

    fn cache_problems(&self) -> u64 {
        self.cache_mismatches
            .max(self.cache_mismatch_lines.len() as u64)
            .max(self.bad_cache_rounds.len() as u64)
    }
}

/// Distinct 4 KiB guest pages named by mismatch lines (by `gpa`, else by
/// the virtual address).
fn pages_hit(lines: &[String]) -> usize {
    let pages: std::collections::BTreeSet<u64> = lines
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

fn verifier_lines(vm: &Vm) -> Vec<String> {
    vm.lines_matching(|l| l.starts_with("@@VERIFY"))
}

fn bytes_field(status: &Value, key: &str) -> anyhow::Result<u64> {
    status[key]
        .as_u64()
        .with_context(|| format!("status has no {key}: {status}"))
}

fn mib_bytes(mib: u64) -> anyhow::Result<u64> {
    mib.checked_mul(MIB).context("MiB to bytes")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Waits until QEMU is attached to the restarted backend.
fn wait_reconnected(control: &mut ControlClient) -> anyhow::Result<Duration> {
    let started = Instant::now();
    guest_tests::wait_for("QEMU to reconnect", RECONNECT_DEADLINE, || {
        let status = control.status()?;
        Ok((status["connected"] == true && status["config_notify"] == true).then_some(()))
    })?;
    Ok(started.elapsed())
}

/// Waits for a quiet period: the guest has reached the target, no punch is
/// pending, and target, actual and ballooned held still for `QUIET_FOR`.
fn wait_quiet(control: &mut ControlClient) -> anyhow::Result<Value> {
    let mut since: Option<(Instant, [u64; 3])> = None;
    test_support::wait::wait_for_every(
        "a quiet period (actual = target, no punch pending, nothing moving for 1 s)",
        QUIET_DEADLINE,
        QUIET_POLL,
        || {
            let status = control.status()?;
            let key = [
                bytes_field(&status, "target_bytes")?,
                bytes_field(&status, "actual_bytes")?,
                bytes_field(&status, "ballooned_bytes")?,
            ];
            let settled = status["connected"] == true
                && key[0] == key[1]
                && bytes_field(&status, "pending_punch_bytes")? == 0;
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
        },
    )
}

/// Lines of the backend's log worth showing next to a failure.
fn log_highlights(log: &Path) -> (usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let taken_over = text.lines().filter(|l| l.contains("taken over")).count();
    let twice = text
        .lines()
        .filter(|l| l.contains("inflated twice"))
        .count();
    let tail = text
        .lines()
        .filter(|l| {
            l.contains("taken over")
                || l.contains("inflated twice")
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
    (taken_over, twice, tail)
}

#[derive(Debug, Default)]
struct Counts {
    cycles: u32,
    /// Cycles whose deflate started from a balloon of at least
    /// `SUBSTANTIAL_MIB` (the case issue 30 is about).
    substantial_deflates: u32,
    kills: u32,
    targets: u32,
    restarts: u32,
    quiet_checks: u32,
}

fn bump(counter: &mut u32) -> anyhow::Result<()> {
    *counter = counter.checked_add(1).context("counter overflow")?;
    Ok(())
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={text:?} is not a number")),
        Err(_) => Ok(default),
    }
}

#[test]
fn a_restarted_backend_never_corrupts_guest_memory() -> anyhow::Result<()> {
    let seed: u64 = env_number("BALLOON_RESTART_SEED", DEFAULT_SEED)?;
    let cycles: u32 = env_number("BALLOON_RESTART_CYCLES", DEFAULT_CYCLES)?;
    let plan = schedule(seed, cycles);
    eprintln!("[n] seed {seed}, {cycles} cycles (replay: BALLOON_RESTART_SEED={seed})");
    for (index, cycle) in plan.iter().enumerate() {
        eprintln!("[n]   plan {}: {}", index + 1, cycle.describe());
    }

    let mut env = TestEnv::load()?;
    if let Some(binary) = std::env::var_os("BALLOON_BACKEND_BINARY") {
        env.backend_binary = binary.into();
    }
    if let Some(qemu) = std::env::var_os("BALLOON_QEMU") {
        env.qemu = qemu.into();
    }
    eprintln!(
        "[n] backend {}, QEMU {}",
        env.backend_binary.display(),
        env.qemu.display()
    );
    let dir = tempfile::tempdir()?;
    let state_file = dir.path().join("state.json");
    let log = dir.path().join("backend.log");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(mib_bytes(DISK_MIB)?)?;
    let state_arg = state_file.display().to_string();
    let mut backend =
        BackendProcess::start_logged(&env, dir.path(), &["--state-file", &state_arg], Some(&log))?;
    let mut config = VmConfig::with_backend(GUEST_MIB, backend.socket.clone());
    config.balloon = Balloon::VhostUser {
        socket: backend.socket.clone(),
        reconnect_ms: Some(500),
        migratable: true,
    };
    config.disk = Some(disk);
    let mut vm = Vm::boot(&env, &config)?;
    let mut control = backend.client()?;
    control.wait_negotiated(Duration::from_secs(60))?;

    vm.sh("command -v guest-verifier && test -b /dev/vda")
        .context("the guest image needs guest-verifier (cargo xtask guest) and the disk")?;
    vm.sh(&format!(
        "guest-verifier --mib {VERIFIER_MIB} --seconds 0 --seed {seed} --churn-mib {CHURN_MIB} \
         --cache-file /dev/vda --cache-mib {CACHE_MIB} &"
    ))?;
    let start = vm.wait_line(|l| l.starts_with("@@VERIFY start "), PASS_DEADLINE)?;
    vm.wait_line(|l| l.starts_with("@@VERIFY pass=1 "), PASS_DEADLINE)?;
    eprintln!("[n] {start}");

    let started = Instant::now();
    let mut counts = Counts::default();
    let mut problems: Vec<String> = Vec::new();
    for (index, cycle) in plan.iter().enumerate() {
        let n = index.checked_add(1).context("cycle number")?;
        control.set_target(mib_bytes(cycle.high_mib)?)?;
        bump(&mut counts.targets)?;
        std::thread::sleep(Duration::from_millis(cycle.hold_ms));
        let peak = bytes_field(&control.status()?, "actual_bytes")?;
        if peak >= mib_bytes(SUBSTANTIAL_MIB)? {
            bump(&mut counts.substantial_deflates)?;
        }
        control.set_target(mib_bytes(cycle.low_mib)?)?;
        bump(&mut counts.targets)?;
        std::thread::sleep(Duration::from_millis(cycle.kill_after_ms));
        let before_kill = control.status()?;
        backend.kill()?;
        bump(&mut counts.kills)?;
        std::thread::sleep(Duration::from_millis(cycle.down_ms));
        backend.start_again()?;
        bump(&mut counts.restarts)?;
        control = backend.client()?;
        bump(&mut counts.cycles)?;

        if !vm.is_running() {
            problems.push(format!(
                "cycle {n}: QEMU exited while the backend was down ({})",
                cycle.describe()
            ));
            break;
        }
        let reconnect = match wait_reconnected(&mut control) {
            Ok(took) => took,
            Err(error) => {
                problems.push(format!("cycle {n}: {error:#}"));
                break;
            }
        };
        let quiet = match wait_quiet(&mut control) {
            Ok(status) => status,
            Err(error) => {
                let last = control.status().map(|s| s.to_string()).unwrap_or_default();
                problems.push(format!("cycle {n}: {error:#}; last status {last}"));
                break;
            }
        };
        bump(&mut counts.quiet_checks)?;
        if !vm.is_running() {
            problems.push(format!("cycle {n}: QEMU exited"));
            break;
        }
        let target = bytes_field(&quiet, "target_bytes")?;
        let actual = bytes_field(&quiet, "actual_bytes")?;
        let ballooned = bytes_field(&quiet, "ballooned_bytes")?;
        let discarded = bytes_field(&quiet, "discarded_bytes")?;
        if ballooned != actual {
            let (more, by) = match ballooned.checked_sub(actual) {
                Some(excess) => ("more", excess),
                None => ("less", actual.saturating_sub(ballooned)),
            };
            problems.push(format!(
                "cycle {n}: after the restart the backend's balloon is {:.1} MiB but the driver's actual is {:.1} MiB ({:.1} MiB {more}); {}",
                mib(ballooned),
                mib(actual),
                mib(by),
                cycle.describe()
            ));
        }
        let report = VerifierReport::from_lines(&verifier_lines(&vm));
        eprintln!(
            "[n] cycle {n}/{cycles} ({:.0} s): {}; actual {:.1} MiB when the deflate was asked, {:.1} MiB at the kill; reconnected in {:.1} s; quiet: target {:.1} MiB, actual {:.1} MiB, ballooned {:.1} MiB, discarded {:.1} MiB; verifier pass {}, mismatches {}, cache problems {}",
            started.elapsed().as_secs_f64(),
            cycle.describe(),
            mib(peak),
            mib(bytes_field(&before_kill, "actual_bytes")?),
            reconnect.as_secs_f64(),
            mib(target),
            mib(actual),
            mib(ballooned),
            mib(discarded),
            report.passes,
            report.memory_mismatches(),
            report.cache_problems(),
        );
    }
    let cycles_s = started.elapsed().as_secs_f64();

    // Every word is checked again after the last restart: two more passes.
    let qemu_up = vm.is_running();
    let mut progress_problem = None;
    if qemu_up {
        let seen = verifier_lines(&vm)
            .iter()
            .filter(|l| is_pass_line(l))
            .count();
        let wanted = seen.checked_add(2).context("pass count")?;
        if let Err(error) = vm.wait_nth_line(is_pass_line, wanted, PASS_DEADLINE.saturating_mul(2))
        {
            let alive = vm
                .run("pidof guest-verifier || echo gone", Duration::from_secs(30))
                .map(|(_, out)| out)
                .unwrap_or_default();
            progress_problem = Some(format!(
                "the verifier made no two more passes after the last cycle (pidof: {}): {error:#}",
                alive.trim()
            ));
        }
    } else if !problems.iter().any(|p| p.contains("QEMU exited")) {
        problems.push("QEMU exited".to_string());
    }
    let report = VerifierReport::from_lines(&verifier_lines(&vm));
    let (taken_over, twice, highlights) = log_highlights(&log);
    eprintln!(
        "[n] seed={seed} cycles={} substantial_deflates={} kills={} restarts={} targets={} quiet_checks={} verifier_passes={} mismatches={} mismatch_lines={} pages_hit={} cache_rounds={} cache_problems={} accounting_violations={} qemu={} takeovers={taken_over} inflated_twice_lines={twice} cycles_seconds={cycles_s:.0}",
        counts.cycles,
        counts.substantial_deflates,
        counts.kills,
        counts.restarts,
        counts.targets,
        counts.quiet_checks,
        report.passes,
        report.memory_mismatches(),
        report.mismatch_lines.len(),
        pages_hit(&report.mismatch_lines),
        report.cache_rounds,
        report.cache_problems(),
        problems.iter().filter(|p| p.contains("backend's balloon")).count(),
        if qemu_up { "running" } else { "exited" },
    );

    // What the guest saw comes first, then what the cycles found.
    let mut findings: Vec<String> = Vec::new();
    if report.memory_mismatches() > 0 {
        let shown = report
            .mismatch_lines
            .iter()
            .take(8)
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        findings.push(format!(
            "guest memory corrupted: {} words did not hold what the guest wrote ({} pages among the {} lines printed; address, expected, found of the first {}):\n{shown}",
            report.memory_mismatches(),
            pages_hit(&report.mismatch_lines),
            report.mismatch_lines.len(),
            report.mismatch_lines.len().min(8)
        ));
    }
    if report.cache_problems() > 0 {
        let shown = report
            .cache_mismatch_lines
            .iter()
            .chain(&report.bad_cache_rounds)
            .take(6)
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        findings.push(format!(
            "the page-cache checksums did not hold ({} problems):\n{shown}",
            report.cache_problems()
        ));
    }
    findings.extend(report.errors.iter().map(|e| format!("verifier: {e}")));
    if let Some(problem) = progress_problem {
        findings.push(problem);
    }
    if counts.cycles > 0 && counts.substantial_deflates == 0 {
        findings.push(format!(
            "no cycle deflated a balloon of {SUBSTANTIAL_MIB} MiB or more: the schedule did not reach the case it is for"
        ));
    }
    if report.passes == 0 {
        findings.push("the verifier made no pass".to_string());
    }

    findings.append(&mut problems);
    if !findings.is_empty() {
        let list = findings
            .iter()
            .map(|p| format!("  - {p}"))
            .collect::<Vec<_>>()
            .join("\n");
        let log_lines = highlights
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        anyhow::bail!(
            "restart integrity failed for seed {seed} after {} of {cycles} cycles (replay: BALLOON_RESTART_SEED={seed}):\n{list}\n  backend log ({taken_over} takeovers, {twice} 'inflated twice' lines), last lines of note:\n{log_lines}",
            counts.cycles
        );
    }
    Ok(())
}

#[test]
fn the_schedule_is_seeded_and_within_issue_30s_bounds() {
    let plan = schedule(30, 50);
    assert_eq!(plan, schedule(30, 50), "same seed, same schedule");
    assert_ne!(plan, schedule(31, 50));
    for cycle in &plan {
        assert!((150..=180).contains(&cycle.high_mib), "{cycle:?}");
        assert!((1000..=2500).contains(&cycle.hold_ms), "{cycle:?}");
        assert!(cycle.low_mib == 0 || cycle.low_mib == 16, "{cycle:?}");
        assert!((50..=400).contains(&cycle.kill_after_ms), "{cycle:?}");
        assert!((200..=1000).contains(&cycle.down_ms), "{cycle:?}");
    }
    assert!(plan.iter().any(|c| c.low_mib == 0) && plan.iter().any(|c| c.low_mib == 16));
}

#[test]
fn verifier_lines_are_read_into_a_report() {
    let lines: Vec<String> = [
        "@@VERIFY start mib=160 words=20971520 seed=30",
        "@@VERIFY cache round=1 file=/dev/vda generation=1 bytes=8388608 rewritten=true want=0x1 cached=0x1 reread=0x1 dropped=true mismatches=0",
        "@@VERIFY pass=1 words=20971520 mismatches=0 pass_mismatches=0 replaced=40 cache_rounds=1 cache_mismatches=0 unreported=0 seconds=2.00",
        "@@VERIFY MISMATCH addr=0x7f0000001000 chunk=14 word=0 want=0x2602081c1e7a4580 got=0x0000000000000000 generation=2 pass=2 gpa=0x1234000",
        "@@VERIFY cache round=2 file=/dev/vda generation=1 bytes=8388608 rewritten=false want=0x1 cached=0x2 reread=0x1 dropped=true mismatches=1",
        "@@VERIFY CACHE-MISMATCH file=/dev/vda round=2 read=cached offset=0x0 want=0x1 got=0x0",
        "@@VERIFY pass=2 words=20971520 mismatches=1 pass_mismatches=1 replaced=80 cache_rounds=2 cache_mismatches=1 unreported=0 seconds=2.00",
        "[    1.0] unrelated console line",
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    let report = VerifierReport::from_lines(&lines);
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
    let hits = [
        "@@VERIFY MISMATCH addr=0x7f0000001000 gpa=0x1234000",
        "@@VERIFY MISMATCH addr=0x7f0000001008 gpa=0x1234008",
        "@@VERIFY MISMATCH addr=0x7f0000002000 gpa=?",
    ]
    .map(String::from);
    assert_eq!(pages_hit(&hits), 2);
}
