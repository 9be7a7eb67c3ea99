//! (o) The other paths of issue 30's class, where a page the guest owns
//! could be punched or the backend's balloon drift from the driver's.
//! `guest-verifier` owns part of the guest's memory in every test
//! and re-verifies every word beside memory and page-cache churn, while
//!
//! - the guest migrates while a deflate is in flight (the target drops
//!   from ~150 MiB to 0 and the migration starts at once);
//! - the guest is reset (QMP `system_reset`) right after a large target
//!   is set, with punches pending;
//! - an operator's pin is set and released with the backend killed and
//!   restarted from its state file after each;
//! - free page reporting (the verifier's churn frees memory all along)
//!   races large targets that go up and down, the backend killed now and
//!   then.
//!
//! Each must end with no verifier mismatch, the page-cache checks held,
//! QEMU up, the backend's balloon equal to the driver's `actual` after each
//! quiet period, a new target reached, and the verifier making passes after
//! the last event. The schedules come from a seed (`BALLOON_PATHS_SEED`,
//! default 30), printed with every step; `BALLOON_BACKEND_BINARY` and
//! `BALLOON_QEMU` run other builds against the same harness and guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use balloon_protocol::control::{ControlClient, ControlError, StatusReply};
use guest_tests::backend::{BackendProcess, ControlWaits};
use guest_tests::env::TestEnv;
use guest_tests::migration::{migrate, side_dir, Side};
use guest_tests::qmp::Qmp;
use guest_tests::verifier::{
    balloon_differs_from_actual, crash_finding, crash_lines, describe_quiet, env_number,
    env_with_overrides, log_highlights, mib, mib_bytes, start_verifier, verifier_lines,
    wait_more_passes, wait_quiet, wait_reconnected, wait_still, SplitMix64, VerifierReport,
    VerifierSettings, PASS_DEADLINE,
};
use guest_tests::vm::{Balloon, Vm, VmConfig};
use serde_json::json;

const DEFAULT_SEED: u64 = 30;
/// Smaller than n_restart_integrity's guest: these tests run side by side.
const GUEST_MIB: u64 = 384;
const VERIFIER_MIB: u64 = 96;
const CHURN_MIB: u64 = 16;
/// The page-cache file: the head of a virtio-blk disk, so dropping the
/// guest's caches really sends the next read to the host.
const CACHE_MIB: u64 = 8;
const DISK_MIB: u64 = 16;
/// Longest a rebooted guest may take to come back to its shell.
const REBOOT_DEADLINE: Duration = Duration::from_secs(180);
/// The error a set-target without `pin` gets while a pin holds
/// (docs/control-protocol.md).
const PINNED_ERROR: &str = "the target is pinned by an operator";

fn seed() -> anyhow::Result<u64> {
    env_number("BALLOON_PATHS_SEED", DEFAULT_SEED)
}

fn bump(counter: &mut u32) -> anyhow::Result<()> {
    *counter = counter.checked_add(1).context("counter overflow")?;
    Ok(())
}

fn verifier_settings(seed: u64, mib: u64, churn_mib: u64) -> VerifierSettings {
    VerifierSettings {
        mib,
        seed,
        churn_mib,
        cache_file: "/dev/vda".into(),
        cache_mib: CACHE_MIB,
    }
}

fn new_disk(dir: &Path) -> anyhow::Result<PathBuf> {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(mib_bytes(DISK_MIB)?)?;
    Ok(disk)
}

/// What one test saw: its events, its quiet checks and the problems they
/// found; `finish` adds what the guest saw, prints the numbers and fails
/// the test on any finding.
struct Outcome {
    name: &'static str,
    seed: u64,
    started: Instant,
    events: u32,
    quiet_checks: u32,
    /// Problems where the backend's balloon or `actual` was not what the
    /// guest holds.
    accounting_violations: u32,
    problems: Vec<String>,
}

impl Outcome {
    fn new(name: &'static str, seed: u64) -> Outcome {
        eprintln!("[o:{name}] seed {seed} (replay: BALLOON_PATHS_SEED={seed})");
        Outcome {
            name,
            seed,
            started: Instant::now(),
            events: 0,
            quiet_checks: 0,
            accounting_violations: 0,
            problems: Vec::new(),
        }
    }

    fn say(&self, what: &str) {
        eprintln!(
            "[o:{}] ({:.1} s) {what}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Something the schedule did to the guest or the backend.
    fn event(&mut self, what: &str) -> anyhow::Result<()> {
        bump(&mut self.events)?;
        self.say(what);
        Ok(())
    }

    fn problem(&mut self, problem: String) {
        self.say(&format!("PROBLEM: {problem}"));
        self.problems.push(problem);
    }

    fn accounting_problem(&mut self, problem: String) -> anyhow::Result<()> {
        bump(&mut self.accounting_violations)?;
        self.problem(problem);
        Ok(())
    }

    /// Waits for a quiet period and checks that the backend's balloon is
    /// the driver's `actual` then; the quiet status. A quiet period that
    /// never comes, or QEMU gone, ends the schedule (an error).
    fn quiet(
        &mut self,
        control: &mut ControlClient,
        vm: &mut Vm,
        when: &str,
    ) -> anyhow::Result<StatusReply> {
        let quiet = match wait_quiet(control) {
            Ok(status) => status,
            Err(error) => {
                let last = control
                    .status()
                    .map(|s| format!("{s:?}"))
                    .unwrap_or_default();
                anyhow::bail!("{when}: {error:#}; last status {last}");
            }
        };
        anyhow::ensure!(vm.is_running(), "{when}: QEMU exited");
        bump(&mut self.quiet_checks)?;
        if let Some(differs) = balloon_differs_from_actual(&quiet) {
            self.accounting_problem(format!("{when}: {differs}"))?;
        }
        let report = VerifierReport::from_lines(&verifier_lines(vm));
        self.say(&format!(
            "quiet {when}: {}; verifier passes {}, mismatches {}, cache problems {}",
            describe_quiet(&quiet),
            report.passes,
            report.memory_mismatches(),
            report.cache_problems()
        ));
        Ok(quiet)
    }

    /// Checks that a quiet status holds `target` (what the schedule set).
    fn expect_target(
        &mut self,
        quiet: &StatusReply,
        target: u64,
        when: &str,
    ) -> anyhow::Result<()> {
        let held = quiet.target_bytes;
        if held != target {
            self.problem(format!(
                "{when}: the target is {:.1} MiB, {:.1} MiB was set",
                mib(held),
                mib(target)
            ));
        }
        Ok(())
    }

    /// Sets a target (not pinned) and waits until the guest reached it.
    fn reach_target(
        &mut self,
        control: &mut ControlClient,
        vm: &mut Vm,
        bytes: u64,
        when: &str,
    ) -> anyhow::Result<StatusReply> {
        control.set_target(bytes)?;
        self.event(&format!("{when}: target {:.1} MiB", mib(bytes)))?;
        let quiet = self.quiet(control, vm, when)?;
        self.expect_target(&quiet, bytes, when)?;
        Ok(quiet)
    }

    /// The end: the schedule's own outcome, QEMU up, two more verifier
    /// passes after the last event, then every finding. `earlier_lines`
    /// are verifier and crash lines of consoles gone (a migration's
    /// sources).
    fn finish(
        mut self,
        vm: &mut Vm,
        earlier_lines: &[String],
        logs: &[PathBuf],
        numbers: &str,
        schedule: anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if let Err(error) = schedule {
            self.problem(format!("the schedule stopped: {error:#}"));
        }
        let schedule_s = self.started.elapsed().as_secs_f64();
        let qemu_up = vm.is_running();
        let progress = if qemu_up {
            wait_more_passes(vm, 2, PASS_DEADLINE.saturating_mul(2))
        } else {
            self.problems.push("QEMU exited".to_string());
            None
        };
        let mut lines = earlier_lines.to_vec();
        lines.extend(verifier_lines(vm));
        let report = VerifierReport::from_lines(&lines);
        eprintln!(
            "[o:{}] seed={} events={} quiet_checks={} {} accounting_violations={} qemu={} {numbers} schedule_seconds={schedule_s:.0}",
            self.name,
            self.seed,
            self.events,
            self.quiet_checks,
            report.summary(),
            self.accounting_violations,
            if qemu_up { "running" } else { "exited" },
        );
        let mut findings = report.findings();
        let mut consoles = earlier_lines.to_vec();
        consoles.extend(vm.console());
        findings.extend(crash_finding(&consoles));
        findings.extend(progress);
        findings.append(&mut self.problems);
        if findings.is_empty() {
            return Ok(());
        }
        let list = findings
            .iter()
            .map(|p| format!("  - {p}"))
            .collect::<Vec<_>>()
            .join("\n");
        let logs = logs
            .iter()
            .map(|log| {
                let highlights = log_highlights(log);
                format!(
                    "  backend log {} ({} takeovers, {} 'inflated twice' lines, {} resets seen), last lines of note:\n{}",
                    log.display(),
                    highlights.taken_over,
                    highlights.inflated_twice,
                    highlights.resets_seen,
                    highlights.indented_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        anyhow::bail!(
            "{} failed for seed {} (replay: BALLOON_PATHS_SEED={}):\n{list}\n{logs}",
            self.name,
            self.seed,
            self.seed
        )
    }
}

/// A backend (with `--state-file` and a log) and a guest booted on it
/// with the migratable device and a disk for the page-cache check.
struct Guest {
    vm: Vm,
    backend: BackendProcess,
    control: ControlClient,
    log: PathBuf,
    qmp: Option<Qmp>,
    _dir: tempfile::TempDir,
}

impl Guest {
    fn boot(env: &TestEnv, tweak: impl FnOnce(&mut VmConfig)) -> anyhow::Result<Guest> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("backend.log");
        let state = dir.path().join("state").display().to_string();
        let backend =
            BackendProcess::start_logged(env, dir.path(), &["--state-file", &state], Some(&log))?;
        let mut config = VmConfig::with_backend(GUEST_MIB, backend.socket.clone());
        config.balloon = Balloon::VhostUser {
            socket: backend.socket.clone(),
            reconnect_ms: Some(500),
            migratable: true,
        };
        config.disk = Some(new_disk(dir.path())?);
        tweak(&mut config);
        let qmp_socket = config.qmp_socket.clone();
        let vm = Vm::boot(env, &config)?;
        let qmp = qmp_socket.map(|path| Qmp::connect(&path)).transpose()?;
        let mut control = backend.client()?;
        control.wait_negotiated(Duration::from_secs(60))?;
        Ok(Guest {
            vm,
            backend,
            control,
            log,
            qmp,
            _dir: dir,
        })
    }

    /// SIGKILLs the backend, waits `down`, starts it again with the same
    /// flags and waits for QEMU to reconnect.
    fn kill_and_restart(&mut self, outcome: &mut Outcome, down: Duration) -> anyhow::Result<()> {
        self.backend.kill()?;
        outcome.event("SIGKILL")?;
        std::thread::sleep(down);
        self.backend.start_again()?;
        self.control = self.backend.client()?;
        anyhow::ensure!(
            self.vm.is_running(),
            "QEMU exited while the backend was down"
        );
        let took = wait_reconnected(&mut self.control)?;
        outcome.event(&format!(
            "restarted after {} ms down; QEMU reconnected in {:.1} s",
            down.as_millis(),
            took.as_secs_f64()
        ))
    }
}

/// Migrations: how many, and how far the deflate had come.
#[derive(Debug, Default)]
struct MigrationNumbers {
    migrations: u32,
    /// Migrations whose source stopped with the deflate unfinished
    /// (`actual` above the new target of 0 on the source at the end).
    in_flight_at_switchover: u32,
    /// Migrations that began before the guest had finished the deflate.
    in_flight_at_start: u32,
}

/// The hops of the migration test: live with QEMU's defaults (the
/// deflate runs during the precopy), then with a switchover as soon as
/// QEMU may (the VM stops within the deflate).
const MIGRATION_HOPS: u32 = 2;

/// Where the migration test's sides live and what it keeps of them.
struct Hops<'a> {
    env: &'a TestEnv,
    dir: &'a Path,
    /// One disk image for every side (shared storage).
    disk: &'a Path,
    /// Verifier lines and crash lines of the sources' consoles.
    earlier_lines: Vec<String>,
    logs: Vec<PathBuf>,
    numbers: MigrationNumbers,
}

fn migrate_during_deflates(
    hops: &mut Hops,
    side: &mut Side,
    rng: &mut SplitMix64,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let disk = hops.disk.to_path_buf();
    let tweak = |config: &mut VmConfig| {
        config.mem_mib = GUEST_MIB;
        config.disk = Some(disk.clone());
    };
    for hop in 1..=MIGRATION_HOPS {
        let high = mib_bytes(rng.between(140, 160))?;
        let quiet = outcome.reach_target(
            &mut side.control,
            &mut side.vm,
            high,
            &format!("hop {hop}, before"),
        )?;
        anyhow::ensure!(
            quiet.actual_bytes == high,
            "hop {hop}: the balloon did not fill: {quiet:?}"
        );

        let hop_dir = side_dir(hops.dir, &format!("hop{hop}"))?;
        let log = hop_dir.join("backend.log");
        hops.logs.push(log.clone());
        let uri = format!("unix:{}", hop_dir.join("migration.sock").display());
        let mut destination =
            Side::incoming_with(hops.env, &hop_dir, &[], &uri, Some(&log), tweak)?;
        // Fast enough for TCG and a guest that keeps writing; on the second
        // hop a downtime limit so large that QEMU stops the VM as soon as
        // it may, inside the deflate.
        let downtime_ms: u64 = if hop == 1 { 300 } else { 60_000 };
        side.qmp.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 4_u64 << 30, "downtime-limit": downtime_ms}),
        )?;
        let delay = rng.millis(0, 50);
        side.control.set_target(0)?;
        outcome.event(&format!(
            "hop {hop}: target 0 from {:.1} MiB; migration in {} ms (downtime limit {downtime_ms} ms)",
            mib(high),
            delay.as_millis()
        ))?;
        std::thread::sleep(delay);
        let at_start = side.control.status()?.actual_bytes;
        let cost = migrate(side, &uri)?;
        bump(&mut hops.numbers.migrations)?;
        // The source's VM is stopped: its backend holds the last `actual`
        // the guest wrote there.
        let at_stop = side.control.status()?.actual_bytes;
        if at_start > 0 {
            bump(&mut hops.numbers.in_flight_at_start)?;
        }
        if at_stop > 0 {
            bump(&mut hops.numbers.in_flight_at_switchover)?;
        }
        outcome.event(&format!(
            "hop {hop}: migrated in {} ms ({} MiB sent); actual {:.1} MiB at the start, {:.1} MiB when the source stopped",
            cost.total_time_ms,
            cost.transferred_bytes / guest_tests::MIB,
            mib(at_start),
            mib(at_stop)
        ))?;
        destination.wait_running()?;
        hops.earlier_lines.extend(verifier_lines(&side.vm));
        hops.earlier_lines.extend(crash_lines(&side.vm.console()));
        // The source QEMU ends after a migration; its backend with it.
        drop(std::mem::replace(side, destination));

        let quiet = outcome.quiet(
            &mut side.control,
            &mut side.vm,
            &format!("hop {hop}, on the destination"),
        )?;
        outcome.expect_target(&quiet, 0, &format!("hop {hop}, on the destination"))?;
        let new = mib_bytes(rng.between(48, 96))?;
        outcome.reach_target(
            &mut side.control,
            &mut side.vm,
            new,
            &format!("hop {hop}, a new target on the destination"),
        )?;
    }
    Ok(())
}

#[test]
fn migration_while_a_deflate_is_in_flight() -> anyhow::Result<()> {
    let seed = seed()?;
    let mut rng = SplitMix64(seed ^ 0x6d69_6772);
    let env = env_with_overrides()?;
    let dir = tempfile::tempdir()?;
    let disk = new_disk(dir.path())?;
    let first = side_dir(dir.path(), "hop0")?;
    let first_log = first.join("backend.log");
    let mut side = Side::boot_with(&env, &first, &[], Some(&first_log), |config| {
        config.mem_mib = GUEST_MIB;
        config.disk = Some(disk.clone());
    })?;
    let mut outcome = Outcome::new("migration", seed);
    let start = start_verifier(
        &mut side.vm,
        &verifier_settings(seed, VERIFIER_MIB, CHURN_MIB),
    )?;
    outcome.say(&start);
    let mut hops = Hops {
        env: &env,
        dir: dir.path(),
        disk: &disk,
        earlier_lines: Vec::new(),
        logs: vec![first_log],
        numbers: MigrationNumbers::default(),
    };
    let schedule = migrate_during_deflates(&mut hops, &mut side, &mut rng, &mut outcome);
    let numbers = &hops.numbers;
    if schedule.is_ok() && numbers.in_flight_at_start == 0 {
        outcome.problem(
            "no migration started before the deflate finished: the schedule missed its case"
                .to_string(),
        );
    }
    let summary = format!(
        "migrations={} deflate_in_flight_at_start={} deflate_in_flight_at_switchover={}",
        numbers.migrations, numbers.in_flight_at_start, numbers.in_flight_at_switchover
    );
    outcome.finish(
        &mut side.vm,
        &hops.earlier_lines,
        &hops.logs,
        &summary,
        schedule,
    )
}

/// Resets: how many, and what was pending when they came.
#[derive(Debug, Default)]
struct ResetNumbers {
    resets: u32,
    /// Resets that came while inflated pages waited to be punched.
    with_pending_punches: u32,
    /// Resets that came with pages in the balloon.
    with_balloon: u32,
}

const RESETS: u32 = 3;

fn reset_while_punches_pend(
    guest: &mut Guest,
    rng: &mut SplitMix64,
    seed: u64,
    outcome: &mut Outcome,
    numbers: &mut ResetNumbers,
) -> anyhow::Result<()> {
    for reset in 1..=RESETS {
        let high = mib_bytes(rng.between(140, 170))?;
        let from = guest.control.status()?.ballooned_bytes;
        // The reset comes once the balloon has grown by `grow` (up to three
        // quarters of the way) and inflated pages wait to be punched, or at
        // the latest `latest` after the target.
        let room = high.saturating_sub(from) / 4 * 3;
        let grow = mib_bytes(rng.between(24, 64))?.min(room);
        let latest = rng.millis(2000, 3000);
        // Every other reset leaves the large target for the rebooted
        // driver, which inflates to it as it comes up.
        let keep_target = reset % 2 == 0;
        guest.control.set_target(high)?;
        outcome.event(&format!(
            "reset {reset}: target {:.1} MiB; system_reset once {:.1} MiB more are ballooned and punches pend (at the latest in {} ms)",
            mib(high),
            mib(grow),
            latest.as_millis()
        ))?;
        let deadline = Instant::now() + latest;
        let wanted = from.checked_add(grow).context("balloon size")?;
        let before = loop {
            let status = guest.control.status()?;
            let pending = status.pending_punch_bytes > 0;
            let grown = status.ballooned_bytes >= wanted;
            if (pending && grown) || Instant::now() >= deadline {
                break status;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let qmp = guest.qmp.as_mut().context("no QMP")?;
        qmp.execute("system_reset", json!({}))?;
        bump(&mut numbers.resets)?;
        if !keep_target {
            guest.control.set_target(0)?;
        }
        let pending = before.pending_punch_bytes;
        let ballooned = before.ballooned_bytes;
        if pending > 0 {
            bump(&mut numbers.with_pending_punches)?;
        }
        if ballooned > 0 {
            bump(&mut numbers.with_balloon)?;
        }
        outcome.event(&format!(
            "reset {reset}: system_reset with actual {:.1} MiB, ballooned {:.1} MiB, {:.1} MiB of punches pending just before; target {}",
            mib(before.actual_bytes),
            mib(ballooned),
            mib(pending),
            if keep_target { "kept" } else { "0 at once" }
        ))?;
        let boots = usize::try_from(reset)?.checked_add(1).context("boots")?;
        guest.vm.wait_ready_count(boots, REBOOT_DEADLINE)?;
        let run_seed = seed.checked_add(u64::from(reset)).context("seed")?;
        let start = start_verifier(
            &mut guest.vm,
            &verifier_settings(run_seed, VERIFIER_MIB, CHURN_MIB),
        )?;
        outcome.say(&format!("reset {reset}: rebooted; {start}"));
        let when = format!("reset {reset}, rebooted");
        if keep_target {
            let quiet = outcome.quiet(&mut guest.control, &mut guest.vm, &when)?;
            outcome.expect_target(&quiet, high, &when)?;
            outcome.reach_target(
                &mut guest.control,
                &mut guest.vm,
                0,
                &format!("reset {reset}, emptied"),
            )?;
        } else {
            rebooted_with_no_balloon(guest, outcome, &when)?;
        }
        let new = mib_bytes(rng.between(48, 112))?;
        outcome.reach_target(
            &mut guest.control,
            &mut guest.vm,
            new,
            &format!("reset {reset}, a new target"),
        )?;
    }
    Ok(())
}

/// The guest came back with a target of 0: its new driver never inflated,
/// so the backend's balloon and `actual` must both be 0. (Not a quiet
/// period by `actual` = target: an `actual` kept from before the reset
/// would never come down, since the driver writes it only after a
/// request.)
fn rebooted_with_no_balloon(
    guest: &mut Guest,
    outcome: &mut Outcome,
    when: &str,
) -> anyhow::Result<()> {
    let still = match wait_still(&mut guest.control, false) {
        Ok(status) => status,
        Err(error) => anyhow::bail!("{when}: {error:#}"),
    };
    anyhow::ensure!(guest.vm.is_running(), "{when}: QEMU exited");
    bump(&mut outcome.quiet_checks)?;
    outcome.say(&format!("still {when}: {}", describe_quiet(&still)));
    outcome.expect_target(&still, 0, when)?;
    let ballooned = still.ballooned_bytes;
    let actual = still.actual_bytes;
    if ballooned != 0 || actual != 0 {
        // The guest's own count of pages its driver ballooned since boot.
        let vmstat = guest
            .vm
            .sh("grep -E '^balloon_(inflate|deflate) ' /proc/vmstat")
            .map(|out| {
                // The console is shared with the verifier's lines.
                out.lines()
                    .filter(|l| l.starts_with("balloon_"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|error| format!("no vmstat: {error:#}"));
        outcome.accounting_problem(format!(
            "{when}: the guest rebooted with a target of 0, so its driver never inflated (its counters since boot: {}), but the backend holds a balloon of {:.1} MiB and reports actual {:.1} MiB; both must be 0",
            vmstat.trim(),
            mib(ballooned),
            mib(actual)
        ))?;
    }
    Ok(())
}

#[test]
fn a_guest_reset_while_punches_are_pending() -> anyhow::Result<()> {
    let seed = seed()?;
    let mut rng = SplitMix64(seed ^ 0x7265_7365);
    let env = env_with_overrides()?;
    let qmp_dir = tempfile::tempdir()?;
    let mut guest = Guest::boot(&env, |config| {
        config.allow_reboot = true;
        config.qmp_socket = Some(qmp_dir.path().join("qmp.sock"));
    })?;
    let mut outcome = Outcome::new("reset", seed);
    let start = start_verifier(
        &mut guest.vm,
        &verifier_settings(seed, VERIFIER_MIB, CHURN_MIB),
    )?;
    outcome.say(&start);
    let mut numbers = ResetNumbers::default();
    let schedule = reset_while_punches_pend(&mut guest, &mut rng, seed, &mut outcome, &mut numbers);
    if schedule.is_ok() && numbers.with_balloon == 0 {
        outcome.problem(
            "no reset came with pages in the balloon: the schedule missed its case".to_string(),
        );
    }
    let summary = format!(
        "resets={} resets_with_balloon={} resets_with_pending_punches={}",
        numbers.resets, numbers.with_balloon, numbers.with_pending_punches
    );
    let logs = [guest.log.clone()];
    outcome.finish(&mut guest.vm, &[], &logs, &summary, schedule)
}

/// Pins: how many cycles, and what a restart kept.
#[derive(Debug, Default)]
struct PinNumbers {
    cycles: u32,
    kills: u32,
    /// Unpinned set-targets refused while the pin held.
    refused: u32,
}

const PIN_CYCLES: u32 = 2;

fn set_pinned(control: &mut ControlClient, bytes: u64) -> anyhow::Result<()> {
    let reply = control.pin_target(bytes)?;
    anyhow::ensure!(reply.pinned, "a pinned set-target failed: {reply:?}");
    Ok(())
}

fn pin_and_unpin_across_restarts(
    guest: &mut Guest,
    rng: &mut SplitMix64,
    outcome: &mut Outcome,
    numbers: &mut PinNumbers,
) -> anyhow::Result<()> {
    for cycle in 1..=PIN_CYCLES {
        let pinned = mib_bytes(rng.between(96, 160))?;
        let kill_after = rng.millis(50, 400);
        let down = rng.millis(200, 800);
        set_pinned(&mut guest.control, pinned)?;
        outcome.event(&format!(
            "cycle {cycle}: pinned target {:.1} MiB; SIGKILL in {} ms",
            mib(pinned),
            kill_after.as_millis()
        ))?;
        std::thread::sleep(kill_after);
        guest.kill_and_restart(outcome, down)?;
        bump(&mut numbers.kills)?;

        let when = format!("cycle {cycle}, restarted while pinned");
        let status = guest.control.status()?;
        if !status.pinned {
            outcome.problem(format!("{when}: the pin is gone: {status:?}"));
        }
        outcome.expect_target(&status, pinned, &when)?;
        let other = mib_bytes(rng.between(0, 64))?;
        let refused = match guest.control.set_target(other) {
            Err(ControlError::Refused { message, .. }) if message.contains(PINNED_ERROR) => None,
            Err(ControlError::Refused { message, .. }) => Some(message),
            Ok(reply) => Some(format!("{reply:?}")),
            Err(error) => return Err(error.into()),
        };
        match refused {
            None => bump(&mut numbers.refused)?,
            Some(reply) => outcome.problem(format!(
                "{when}: an unpinned set-target of {:.1} MiB was not refused with \"{PINNED_ERROR} …\": {reply}",
                mib(other)
            )),
        }
        let quiet = outcome.quiet(&mut guest.control, &mut guest.vm, &when)?;
        outcome.expect_target(&quiet, pinned, &when)?;
        if !quiet.pinned {
            outcome.problem(format!("{when}: the pin is gone: {quiet:?}"));
        }

        let not_found = match guest.control.unpin() {
            Ok(reply) => (!reply.was_pinned).then(|| format!("{reply:?}")),
            Err(ControlError::Refused { message, .. }) => Some(message),
            Err(error) => return Err(error.into()),
        };
        if let Some(reply) = not_found {
            outcome.problem(format!(
                "cycle {cycle}: unpin did not find the pin: {reply}"
            ));
        }
        let kill_after = rng.millis(0, 300);
        let down = rng.millis(200, 800);
        outcome.event(&format!(
            "cycle {cycle}: unpinned; SIGKILL in {} ms",
            kill_after.as_millis()
        ))?;
        std::thread::sleep(kill_after);
        guest.kill_and_restart(outcome, down)?;
        bump(&mut numbers.kills)?;

        let when = format!("cycle {cycle}, restarted unpinned");
        let status = guest.control.status()?;
        if status.pinned {
            outcome.problem(format!("{when}: still pinned: {status:?}"));
        }
        let quiet = outcome.quiet(&mut guest.control, &mut guest.vm, &when)?;
        outcome.expect_target(&quiet, pinned, &when)?;
        let new = mib_bytes(rng.between(16, 80))?;
        outcome.reach_target(
            &mut guest.control,
            &mut guest.vm,
            new,
            &format!("cycle {cycle}, a new target, unpinned"),
        )?;
        bump(&mut numbers.cycles)?;
    }
    Ok(())
}

#[test]
fn pin_and_unpin_across_backend_restarts() -> anyhow::Result<()> {
    let seed = seed()?;
    let mut rng = SplitMix64(seed ^ 0x7069_6e73);
    let env = env_with_overrides()?;
    let mut guest = Guest::boot(&env, |_| {})?;
    let mut outcome = Outcome::new("pin", seed);
    let start = start_verifier(
        &mut guest.vm,
        &verifier_settings(seed, VERIFIER_MIB, CHURN_MIB),
    )?;
    outcome.say(&start);
    let mut numbers = PinNumbers::default();
    let schedule = pin_and_unpin_across_restarts(&mut guest, &mut rng, &mut outcome, &mut numbers);
    let summary = format!(
        "pin_cycles={} kills={} refused_while_pinned={}",
        numbers.cycles, numbers.kills, numbers.refused
    );
    let logs = [guest.log.clone()];
    outcome.finish(&mut guest.vm, &[], &logs, &summary, schedule)
}

/// Free page reporting against the balloon.
#[derive(Debug, Default)]
struct ReportingNumbers {
    rounds: u32,
    kills: u32,
    /// `reported_bytes_total` at the first and the last quiet period.
    reported_first: u64,
    reported_last: u64,
    /// Rounds in which free page reports were punched while the balloon
    /// inflated (the counter rose between the large target and its hold's
    /// end).
    reports_during_inflate: u32,
}

const REPORTING_ROUNDS: u32 = 8;
/// The verifier owns less and churns more here: more freed memory for
/// free page reporting, with room left for a large balloon.
const REPORTING_VERIFIER_MIB: u64 = 64;
const REPORTING_CHURN_MIB: u64 = 64;

fn reports_racing_inflates(
    guest: &mut Guest,
    rng: &mut SplitMix64,
    outcome: &mut Outcome,
    numbers: &mut ReportingNumbers,
) -> anyhow::Result<()> {
    let quiet = outcome.quiet(&mut guest.control, &mut guest.vm, "before the rounds")?;
    numbers.reported_first = quiet.reported_bytes_total;
    numbers.reported_last = numbers.reported_first;
    for round in 1..=REPORTING_ROUNDS {
        let high = mib_bytes(rng.between(110, 150))?;
        let hold = rng.millis(300, 1200);
        let low = mib_bytes(rng.between(0, 32))?;
        // Every third round kills the backend right after the target drops.
        let kill = (round % 3 == 2).then(|| (rng.millis(50, 300), rng.millis(200, 800)));
        let reported_before = guest.control.status()?.reported_bytes_total;
        guest.control.set_target(high)?;
        outcome.event(&format!(
            "round {round}: target {:.1} MiB for {} ms",
            mib(high),
            hold.as_millis()
        ))?;
        std::thread::sleep(hold);
        let at_hold = guest.control.status()?;
        if at_hold.reported_bytes_total > reported_before {
            bump(&mut numbers.reports_during_inflate)?;
        }
        guest.control.set_target(low)?;
        outcome.event(&format!(
            "round {round}: target {:.1} MiB (actual was {:.1} MiB)",
            mib(low),
            mib(at_hold.actual_bytes)
        ))?;
        if let Some((kill_after, down)) = kill {
            std::thread::sleep(kill_after);
            guest.kill_and_restart(outcome, down)?;
            bump(&mut numbers.kills)?;
        }
        let when = format!("round {round}");
        let quiet = outcome.quiet(&mut guest.control, &mut guest.vm, &when)?;
        outcome.expect_target(&quiet, low, &when)?;
        let reported = quiet.reported_bytes_total;
        if reported < numbers.reported_last {
            outcome.problem(format!(
                "{when}: reported_bytes_total went back from {:.1} MiB to {:.1} MiB",
                mib(numbers.reported_last),
                mib(reported)
            ));
        }
        numbers.reported_last = reported;
        bump(&mut numbers.rounds)?;
    }
    let new = mib_bytes(rng.between(48, 96))?;
    outcome.reach_target(&mut guest.control, &mut guest.vm, new, "a new target")?;
    Ok(())
}

#[test]
fn free_page_reports_racing_inflates() -> anyhow::Result<()> {
    let seed = seed()?;
    let mut rng = SplitMix64(seed ^ 0x6670_7273);
    let env = env_with_overrides()?;
    let mut guest = Guest::boot(&env, |_| {})?;
    let mut outcome = Outcome::new("reporting", seed);
    let start = start_verifier(
        &mut guest.vm,
        &verifier_settings(seed, REPORTING_VERIFIER_MIB, REPORTING_CHURN_MIB),
    )?;
    outcome.say(&start);
    let mut numbers = ReportingNumbers::default();
    let schedule = reports_racing_inflates(&mut guest, &mut rng, &mut outcome, &mut numbers);
    let grown = numbers.reported_last.checked_sub(numbers.reported_first);
    if schedule.is_ok() && grown.unwrap_or(0) == 0 {
        outcome.problem(format!(
            "reported_bytes_total did not grow over the rounds ({:.1} MiB, then {:.1} MiB): no free page report raced the balloon",
            mib(numbers.reported_first),
            mib(numbers.reported_last)
        ));
    }
    let summary = format!(
        "rounds={} kills={} reported_mib_first={:.1} reported_mib_last={:.1} rounds_with_reports_during_inflate={}",
        numbers.rounds,
        numbers.kills,
        mib(numbers.reported_first),
        mib(numbers.reported_last),
        numbers.reports_during_inflate
    );
    let logs = [guest.log.clone()];
    outcome.finish(&mut guest.vm, &[], &logs, &summary, schedule)
}
