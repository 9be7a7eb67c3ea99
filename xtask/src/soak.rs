//! `cargo xtask soak --seconds N --seed S` (issue 28): two real guests,
//! each with its balloon-backend (`--state-file`, QEMU reconnecting with
//! `reconnect-ms`) and a second QEMU and backend to migrate to, one
//! host-policy reading a meminfo file this harness rewrites from the
//! guests' real host-resident RAM, the real `balloonctl`, and
//! guest-verifier in every guest, driven by a seeded schedule of
//! operations and faults (`schedule.rs`). The invariants of the issue are
//! checked continuously (every second) and after every quiet period; the
//! first step that breaks one ends the run with the seed and the schedule
//! up to it. docs/reliability.md describes it and records a long run.

mod schedule;
mod watch;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use balloon_protocol::control::{ControlClient, ControlError, StatusReply};
use guest_tests::backend::{BackendProcess, ControlWaits};
use guest_tests::env::TestEnv;
use guest_tests::host_policy_process::{write_meminfo, PolicyProcess};
use guest_tests::migration::set_capabilities;
use guest_tests::qmp::Qmp;
use guest_tests::vm::{Balloon, Vm, VmConfig};
use guest_tests::MIB;
use serde_json::json;

use schedule::{size, Action, RudeClient, Schedule, Step, HOST_LEVELS};
use watch::VerifierWatch;

/// The soak `cargo xtask test` runs: two minutes, this seed.
pub const TEST_SECONDS: u64 = 120;
pub const TEST_SEED: u64 = 28;

const GUESTS: usize = 2;
const GUEST_MIB: u64 = 512;
/// What each guest's verifier owns, churns and checks in its page cache.
const VERIFIER_MIB: u64 = 128;
const CHURN_MIB: u64 = 16;
const CACHE_MIB: u64 = 8;
/// The guest's disk (/dev/vda), head of which is the page-cache check.
const DISK_MIB: u64 = 16;
/// QEMU reconnects to a restarted backend this often.
const RECONNECT_MS: u32 = 500;
/// The host as host-policy reads it: the guests' RAM and one more guest's
/// worth for the host itself.
const HOST_TOTAL_MIB: u64 = GUEST_MIB * (GUESTS as u64 + 1);
/// The host's available memory during a quiet period, in percent: inside
/// host-policy's dead band (20-35 %), where it holds every target.
const DEAD_BAND_PERCENT: u64 = 27;

// Invariant bounds (docs/reliability.md).
/// Host-resident guest RAM may exceed guest RAM less the balloon by this
/// once punches settle: nothing but rounding should be there.
const RESIDENT_SLACK_BYTES: u64 = 8 * MIB;
/// The backend's descriptors, threads and anonymous RSS may exceed their
/// first quiet measurement by these.
const FD_TOLERANCE: u64 = 4;
const THREAD_TOLERANCE: u64 = 2;
const RSS_ANON_TOLERANCE_BYTES: u64 = 16 * MIB;

// Deadlines.
const TICK: Duration = Duration::from_millis(200);
const CONTINUOUS_EVERY: Duration = Duration::from_secs(1);
const QUIET_FOR: Duration = Duration::from_secs(2);
const QUIET_DEADLINE: Duration = Duration::from_secs(180);
/// Punches and the counts of a settled backend, after a quiet period.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
const PASS_DEADLINE: Duration = Duration::from_secs(180);
const MIGRATION_DEADLINE: Duration = Duration::from_secs(300);
const POLICY_TICK_DEADLINE: Duration = Duration::from_secs(30);
const BALLOONCTL_DEADLINE: Duration = Duration::from_secs(150);
/// A verifier that completes no pass for this long (outside pauses,
/// reboots and migrations) has stopped.
const STALL_LIMIT: Duration = Duration::from_secs(120);
/// A client that never reads must have been dropped by this age (the
/// backend drops it after 5 s of an unread reply).
const NEVER_READER_DROPPED_BY: Duration = Duration::from_secs(9);

/// The invariants of issue 28, as the violations name them.
const VERIFIER: &str = "verifier: no mismatch";
const RESIDENCY: &str = "host-resident guest RAM <= RAM - balloon + slack";
const BALLOON_IS_ACTUAL: &str = "balloon = driver's actual after a quiet period";
const NO_GROWTH: &str = "no growth of the backend's fds, threads, RSS";
const PROCESSES: &str = "killed processes come back, the others stay up";

/// What a soak found.
#[derive(Debug)]
pub struct Outcome {
    pub operations: u64,
    pub faults: u64,
    pub checks: u64,
    pub violations: u64,
    pub seed: u64,
}

impl Outcome {
    pub fn line(&self) -> String {
        format!(
            "soak: {} operations, {} faults, {} invariant checks, {} violations (seed {})",
            self.operations, self.faults, self.checks, self.violations, self.seed
        )
    }
}

/// `cargo xtask soak`: provisions, runs, prints the summary last and exits
/// non-zero on a violation.
pub fn command(seconds: u64, seed: Option<u64>) -> anyhow::Result<()> {
    let env = crate::provision::ensure_all()?;
    let seed = match seed {
        Some(seed) => seed,
        None => {
            let seed = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            println!("soak: seed {seed} (from the clock)");
            seed
        }
    };
    let outcome = run(&env, seconds, seed)?;
    if outcome.violations > 0 {
        // Everything is stopped by now: nothing may print after the line.
        std::process::exit(1);
    }
    Ok(())
}

/// The soak of `cargo xtask test` (environment already provisioned).
pub fn in_test(env: &TestEnv) -> anyhow::Result<()> {
    let outcome = run(env, TEST_SECONDS, TEST_SEED)?;
    anyhow::ensure!(
        outcome.violations == 0,
        "the soak found {} violations (replay: cargo xtask soak --seconds {TEST_SECONDS} --seed {TEST_SEED})",
        outcome.violations
    );
    Ok(())
}

/// Runs the schedule of `seed` for `seconds` (after setting up) and prints
/// the report, its last line the summary.
pub fn run(env: &TestEnv, seconds: u64, seed: u64) -> anyhow::Result<Outcome> {
    let mut env = env.clone();
    if let Some(binary) = std::env::var_os("BALLOON_BACKEND_BINARY") {
        env.backend_binary = binary.into();
    }
    println!(
        "soak: seed {seed}, {seconds} s, {GUESTS} guests of {GUEST_MIB} MiB ({}), backend {} (replay: cargo xtask soak --seconds {seconds} --seed {seed})",
        env.accel,
        env.backend_binary.display()
    );
    let work = tempfile::Builder::new().prefix("balloon-soak-").tempdir()?;
    let mut soak = Soak::set_up(&env, seed, work.path())?;
    let started = Instant::now();
    let budget = Duration::from_secs(seconds);
    let mut schedule = Schedule::new(seed, GUESTS);
    let mut index: u64 = 0;
    if soak.violations.is_empty() {
        soak.say("the schedule starts");
        while started.elapsed() < budget {
            let step = schedule.next_step();
            index = index.checked_add(1).context("step count")?;
            soak.execute(index, step);
            if !soak.violations.is_empty() {
                break;
            }
            if let Err(error) = soak.idle(Duration::from_millis(step.then_ms)) {
                soak.violation("step failed", format!("{error:#}"));
            }
            if !soak.violations.is_empty() {
                break;
            }
        }
    }
    if soak.violations.is_empty() {
        soak.current = "the final quiet period".to_string();
        soak.say("the schedule is done: a final quiet period");
        if let Err(error) = soak.quiet() {
            soak.violation("step failed", format!("{error:#}"));
        }
    }
    let outcome = soak.finish(seed, seconds);
    if outcome.violations > 0 {
        let kept = work.keep();
        println!(
            "soak: logs kept in {} (backend.log of each side, host-policy*.log)",
            kept.display()
        );
    } else {
        drop(work);
    }
    println!("{}", outcome.line());
    Ok(outcome)
}

/// A backend's footprint, from /proc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resources {
    fds: u64,
    threads: u64,
    rss_bytes: u64,
    rss_anon_bytes: u64,
}

impl Resources {
    fn of(pid: u32) -> anyhow::Result<Resources> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?
            .count();
        Self::parse(&status, u64::try_from(fds)?)
            .with_context(|| format!("/proc/{pid}/status lacks Threads, VmRSS or RssAnon"))
    }

    fn parse(status: &str, fds: u64) -> Option<Resources> {
        let value = |key: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Some(Resources {
            fds,
            threads: value("Threads:")?,
            rss_bytes: value("VmRSS:")?.checked_mul(1024)?,
            rss_anon_bytes: value("RssAnon:")?.checked_mul(1024)?,
        })
    }

    fn within(&self, baseline: &Resources) -> bool {
        self.fds <= baseline.fds.saturating_add(FD_TOLERANCE)
            && self.threads <= baseline.threads.saturating_add(THREAD_TOLERANCE)
            && self.rss_anon_bytes
                <= baseline
                    .rss_anon_bytes
                    .saturating_add(RSS_ANON_TOLERANCE_BYTES)
    }

    fn describe(&self) -> String {
        format!(
            "RSS {:.1} MiB (anonymous {:.1} MiB), {} fds, {} threads",
            mib(self.rss_bytes),
            mib(self.rss_anon_bytes),
            self.fds,
            self.threads
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// A console line of a guest kernel in trouble (the console shows only
/// emergencies: `loglevel=1`).
fn is_kernel_trouble(line: &str) -> bool {
    [
        "Kernel panic",
        "BUG: ",
        "Oops",
        "general protection fault",
        "segfault at",
    ]
    .iter()
    .any(|sign| line.contains(sign))
}

/// Whether process `pid` (a child not reaped yet) still runs.
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name's closing parenthesis.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

fn signal(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill has no memory preconditions; pid is a child of ours
    // that has not been reaped, so it names that child.
    let result = unsafe { libc::kill(pid, signal) };
    anyhow::ensure!(
        result == 0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One guest: the QEMU and backend it runs on now (side 0 or 1), its
/// other side's directory, and what its verifier said.
struct Guest {
    name: String,
    dirs: [PathBuf; 2],
    active: usize,
    disk: PathBuf,
    backend: BackendProcess,
    vm: Vm,
    qmp: Qmp,
    control: ControlClient,
    watch: VerifierWatch,
    /// Killed and not started again yet.
    backend_down: bool,
    /// SIGSTOPped.
    backend_stopped: bool,
    /// `@@READY` lines the current console should have (its boot and the
    /// resets asked for); more is a guest that rebooted by itself.
    expected_boots: usize,
    /// Console lines of a guest kernel in trouble, seen so far.
    kernel_trouble_seen: usize,
    /// The verifier need not progress until then (a pause, a reboot, a
    /// migration).
    grace_until: Instant,
    verifier_runs: u64,
    /// The backend's first quiet footprint, and its latest.
    baseline: Option<Resources>,
    latest: Option<Resources>,
}

/// A control client that sent requests and never reads.
struct HeldClient {
    guest: usize,
    stream: UnixStream,
    /// Since when the backend has run without a stop: its 5 s start over
    /// when it is continued (a write blocked in a stopped process is
    /// restarted with its whole timeout).
    opened: Instant,
    close_at: Instant,
}

struct Soak<'e> {
    env: &'e TestEnv,
    seed: u64,
    work: PathBuf,
    run_dir: PathBuf,
    balloonctl: PathBuf,
    guests: Vec<Guest>,
    policy: Option<PolicyProcess>,
    policy_dir: PathBuf,
    policy_config: String,
    meminfo: PathBuf,
    other_percent: u64,
    /// The meminfo file is held in the dead band (a quiet period).
    frozen: bool,
    started: Instant,
    last_meminfo: Option<Instant>,
    last_continuous: Option<Instant>,
    held: Vec<HeldClient>,
    /// The step being run, and every step so far.
    current: String,
    steps: Vec<String>,
    operations: u64,
    faults: u64,
    checks: u64,
    kinds: BTreeMap<&'static str, u64>,
    violations: Vec<String>,
    notes: BTreeMap<&'static str, u64>,
    longest_status: (Duration, String),
    /// The most host-resident guest RAM seen above RAM - balloon, in bytes
    /// (negative: below).
    largest_excess: Option<i128>,
    migrations: u64,
}

impl<'e> Soak<'e> {
    fn set_up(env: &'e TestEnv, seed: u64, work: &Path) -> anyhow::Result<Soak<'e>> {
        // The backends run as `nobody` under root: they must reach their
        // directories.
        std::fs::set_permissions(work, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let run_dir = work.join("run");
        let policy_dir = work.join("policy");
        std::fs::create_dir_all(&run_dir)?;
        std::fs::create_dir_all(&policy_dir)?;
        let meminfo = policy_dir.join("host-meminfo");
        let started = Instant::now();
        let mut soak = Soak {
            env,
            seed,
            work: work.to_path_buf(),
            run_dir: run_dir.clone(),
            balloonctl: env.host_policy_binary.with_file_name("balloonctl"),
            guests: Vec::new(),
            policy: None,
            policy_dir: policy_dir.clone(),
            policy_config: format!(
                "[host]\ninterval_s = 1\nmeminfo = {meminfo:?}\nstate_file = {:?}\n\n\
                 [defaults]\nstats_max_age_s = 30\n\n[discover]\ndirectory = {run_dir:?}\nsuffix = \".ctl\"\n",
                policy_dir.join("host-policy.json"),
            ),
            meminfo,
            other_percent: HOST_LEVELS[1],
            frozen: false,
            started,
            last_meminfo: None,
            last_continuous: None,
            held: Vec::new(),
            current: "setting up".to_string(),
            steps: Vec::new(),
            operations: 0,
            faults: 0,
            checks: 0,
            kinds: BTreeMap::new(),
            violations: Vec::new(),
            notes: BTreeMap::new(),
            longest_status: (Duration::ZERO, String::new()),
            largest_excess: None,
            migrations: 0,
        };
        for index in 0..GUESTS {
            let guest = soak.boot_guest(index)?;
            soak.guests.push(guest);
        }
        soak.write_meminfo()?;
        soak.policy = Some(PolicyProcess::start_config(
            env,
            &soak.policy_dir,
            &soak.policy_config,
        )?);
        for index in 0..GUESTS {
            soak.start_verifier(index)?;
        }
        soak.say("every guest runs its verifier: the first quiet period sets the baselines");
        soak.current = "the first quiet period".to_string();
        soak.quiet()?;
        Ok(soak)
    }

    fn say(&self, text: &str) {
        println!(
            "[soak {:7.1} s] {text}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn backend_args(dir: &Path) -> Vec<String> {
        vec![
            "--state-file".into(),
            dir.join("state").display().to_string(),
            "--stats-interval".into(),
            "1".into(),
        ]
    }

    fn start_backend(&self, dir: &Path) -> anyhow::Result<BackendProcess> {
        // Under root, `BackendProcess` links the binary into the directory
        // for `nobody`; a side used before still has that link (to the
        // binary every backend runs: copying onto it fails, ETXTBSY).
        match std::fs::remove_file(dir.join("balloon-backend")) {
            Err(error) if error.kind() != ErrorKind::NotFound => {
                return Err(error).context("removing the previous backend's link");
            }
            _ => {}
        }
        let args = Self::backend_args(dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        BackendProcess::start_logged(self.env, dir, &args, Some(&dir.join("backend.log")))
    }

    fn vm_config(
        backend: &BackendProcess,
        dir: &Path,
        disk: &Path,
        incoming: Option<String>,
    ) -> VmConfig {
        VmConfig {
            mem_mib: GUEST_MIB,
            balloon: Balloon::VhostUser {
                socket: backend.socket.clone(),
                reconnect_ms: Some(RECONNECT_MS),
                migratable: true,
            },
            qmp_socket: Some(dir.join("qmp.sock")),
            disk: Some(disk.to_path_buf()),
            incoming,
            allow_reboot: true,
            ..VmConfig::default()
        }
    }

    /// Points `<run>/<name>.ctl`, which host-policy and balloonctl find,
    /// at the control socket in `dir`.
    fn link_control(&self, name: &str, dir: &Path) -> anyhow::Result<()> {
        let link = self.run_dir.join(format!("{name}.ctl"));
        let temporary = self.run_dir.join(format!(".{name}.ctl.new"));
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(dir.join("control.sock"), &temporary)?;
        std::fs::rename(&temporary, &link).context("replacing the control link")
    }

    fn boot_guest(&self, index: usize) -> anyhow::Result<Guest> {
        let name = format!("g{index}");
        let base = self.work.join(&name);
        let dirs = [base.join("a"), base.join("b")];
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
        }
        let disk = base.join("disk.img");
        std::fs::File::create(&disk)?.set_len(DISK_MIB * MIB)?;
        let backend = self.start_backend(&dirs[0])?;
        let vm = Vm::boot(self.env, &Self::vm_config(&backend, &dirs[0], &disk, None))?;
        let qmp = Qmp::connect(&dirs[0].join("qmp.sock"))?;
        let mut control = backend.client()?;
        control.wait_negotiated(Duration::from_secs(120))?;
        self.link_control(&name, &dirs[0])?;
        self.say(&format!("{name}: booted, backend pid {}", backend.pid()));
        Ok(Guest {
            name,
            dirs,
            active: 0,
            disk,
            backend,
            vm,
            qmp,
            control,
            watch: VerifierWatch::new(Instant::now()),
            backend_down: false,
            backend_stopped: false,
            expected_boots: 1,
            kernel_trouble_seen: 0,
            grace_until: Instant::now(),
            verifier_runs: 0,
            baseline: None,
            latest: None,
        })
    }

    fn start_verifier(&mut self, g: usize) -> anyhow::Result<()> {
        let seed = self.seed;
        let guest = &mut self.guests[g];
        guest.verifier_runs = guest
            .verifier_runs
            .checked_add(1)
            .context("verifier runs")?;
        let verifier_seed = seed
            .wrapping_mul(31)
            .wrapping_add(u64::try_from(g)?.wrapping_mul(1000))
            .wrapping_add(guest.verifier_runs);
        guest.vm.sh(&format!(
            "guest-verifier --mib {VERIFIER_MIB} --seconds 0 --seed {verifier_seed} \
             --churn-mib {CHURN_MIB} --cache-file /dev/vda --cache-mib {CACHE_MIB} &"
        ))?;
        let runs = guest.verifier_runs;
        let passes = guest.watch.total_passes;
        self.wait_while(
            &format!("g{g}'s verifier to start and make a pass"),
            PASS_DEADLINE,
            |soak| {
                let watch = &soak.guests[g].watch;
                Ok(watch.starts >= runs && watch.total_passes > passes)
            },
        )?;
        if !self.guests[g].watch.protected {
            self.say(&format!(
                "g{g}: the verifier could not protect itself from the OOM killer"
            ));
        }
        Ok(())
    }

    // ----- continuous duties -----

    /// Waits `duration`, doing the continuous duties meanwhile.
    fn idle(&mut self, duration: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + duration;
        loop {
            self.duties()?;
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(TICK));
        }
    }

    /// Waits until `done` holds, doing the duties; fails after `timeout`.
    fn wait_while(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&mut Self) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.duties()?;
            if done(self)? {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(TICK);
        }
    }

    fn write_meminfo(&mut self) -> anyhow::Result<()> {
        let available_mib = if self.frozen {
            HOST_TOTAL_MIB * DEAD_BAND_PERCENT / 100
        } else {
            let mut resident: u64 = 0;
            for guest in &self.guests {
                resident = resident.saturating_add(guest.vm.host_resident_bytes().unwrap_or(0));
            }
            let other = HOST_TOTAL_MIB.saturating_mul(self.other_percent) / 100;
            HOST_TOTAL_MIB
                .saturating_sub(resident / MIB)
                .saturating_sub(other)
        };
        write_meminfo(&self.meminfo, HOST_TOTAL_MIB, available_mib)?;
        self.last_meminfo = Some(Instant::now());
        Ok(())
    }

    fn duties(&mut self) -> anyhow::Result<()> {
        if self
            .last_meminfo
            .is_none_or(|at| at.elapsed() >= CONTINUOUS_EVERY)
        {
            self.write_meminfo()?;
        }
        self.close_due_clients();
        if self
            .last_continuous
            .is_some_and(|at| at.elapsed() < CONTINUOUS_EVERY)
        {
            return Ok(());
        }
        self.last_continuous = Some(Instant::now());
        for g in 0..self.guests.len() {
            self.scan(g);
            let running = self.guests[g].vm.is_running();
            let name = self.guests[g].name.clone();
            self.check(PROCESSES, running, || format!("{name}: QEMU exited"));
            let guest = &self.guests[g];
            let boots = guest.vm.lines_matching(|l| l == "@@READY").len();
            let expected = guest.expected_boots;
            self.check(PROCESSES, boots <= expected, || {
                format!("{name}: the guest rebooted by itself ({boots} boots on this console, {expected} expected)")
            });
            let trouble = self.guests[g].vm.lines_matching(is_kernel_trouble);
            let seen = self.guests[g].kernel_trouble_seen;
            self.guests[g].kernel_trouble_seen = trouble.len();
            let news = trouble.get(seen..).unwrap_or(&[]).join("\n      ");
            self.check(PROCESSES, news.is_empty(), || {
                format!("{name}: the guest kernel is in trouble:\n      {news}")
            });
            if !self.guests[g].backend_down {
                let up = self.guests[g].backend.is_running();
                self.check(PROCESSES, up, || format!("{name}: the backend exited"));
            }
            let guest = &self.guests[g];
            let stalled = Instant::now() > guest.grace_until
                && guest.watch.last_progress.elapsed() > STALL_LIMIT;
            let since = guest.watch.last_progress.elapsed().as_secs();
            self.check(PROCESSES, !stalled, || {
                format!("{name}: the verifier made no pass for {since} s")
            });
            let guest = &self.guests[g];
            if !guest.backend_down && !guest.backend_stopped && running {
                self.status(g)?;
            }
        }
        if let Some(policy) = &self.policy {
            let alive = process_alive(policy.pid());
            self.check(PROCESSES, alive, || "host-policy exited".to_string());
        }
        Ok(())
    }

    /// Reads the verifier's new lines of guest `g`.
    fn scan(&mut self, g: usize) {
        let guest = &mut self.guests[g];
        let lines = guest.vm.lines_matching(|l| l.starts_with("@@VERIFY"));
        let new = lines.get(guest.watch.seen..).unwrap_or(&[]);
        let findings = guest.watch.read(new, Instant::now());
        guest.watch.seen = lines.len();
        let name = guest.name.clone();
        for line in new.iter().filter(|l| l.starts_with("@@VERIFY oom-push")) {
            self.say(&format!("{name}: {line}"));
        }
        self.checks = self.checks.saturating_add(1);
        for finding in findings {
            self.violation(VERIFIER, format!("{name}: {finding}"));
        }
    }

    /// The backend's `status`, its reply time recorded.
    fn status(&mut self, g: usize) -> anyhow::Result<StatusReply> {
        let asked = Instant::now();
        let status = self.guests[g]
            .control
            .status()
            .with_context(|| format!("g{g}: status"))?;
        let took = asked.elapsed();
        if took > self.longest_status.0 {
            self.longest_status = (
                took,
                format!(
                    "g{g} at {:.0} s, during: {}",
                    self.started.elapsed().as_secs_f64(),
                    self.current
                ),
            );
        }
        Ok(status)
    }

    fn check(&mut self, invariant: &'static str, holds: bool, what: impl FnOnce() -> String) {
        self.checks = self.checks.saturating_add(1);
        if !holds {
            self.violation(invariant, what());
        }
    }

    fn violation(&mut self, invariant: &str, what: String) {
        let text = format!("[{invariant}] {what}");
        println!(
            "soak: VIOLATION at {:.1} s (seed {}), during {}: {text}",
            self.started.elapsed().as_secs_f64(),
            self.seed,
            self.current
        );
        self.violations.push(text);
    }

    fn note(&mut self, what: &'static str) {
        let count = self.notes.entry(what).or_insert(0);
        *count = count.saturating_add(1);
    }

    // ----- the steps -----

    fn execute(&mut self, index: u64, step: Step) {
        let action = step.action;
        self.current = format!("step {index} ({})", action.describe());
        let line = format!(
            "#{index} at {:.1} s: {}, then {} ms",
            self.started.elapsed().as_secs_f64(),
            action.describe(),
            step.then_ms
        );
        self.say(&line);
        self.steps.push(line);
        if action.is_fault() {
            self.faults = self.faults.saturating_add(1);
        } else {
            self.operations = self.operations.saturating_add(1);
        }
        let count = self.kinds.entry(action.kind()).or_insert(0);
        *count = count.saturating_add(1);
        if let Err(error) = self.perform(action) {
            self.violation("step failed", format!("{error:#}"));
        }
    }

    fn perform(&mut self, action: Action) -> anyhow::Result<()> {
        match action {
            Action::PinnedTarget { guest, mib, wait } => {
                let mut args = vec![
                    "set".to_string(),
                    self.guests[guest].name.clone(),
                    size(mib),
                ];
                if wait {
                    args.extend(["--timeout".into(), "90".into()]);
                } else {
                    args.push("--no-wait".into());
                }
                self.balloonctl(&args)
            }
            Action::Bounce {
                guest,
                high_mib,
                low_mib,
                gap_ms,
            } => {
                let name = self.guests[guest].name.clone();
                self.balloonctl(&[
                    "set".into(),
                    name.clone(),
                    size(high_mib),
                    "--no-wait".into(),
                ])?;
                self.idle(Duration::from_millis(gap_ms))?;
                self.balloonctl(&["set".into(), name, size(low_mib), "--no-wait".into()])
            }
            Action::Unpin { guest } => {
                let name = self.guests[guest].name.clone();
                self.balloonctl(&["unpin".into(), name])
            }
            Action::UnpinnedTarget { guest, mib } => {
                let bytes = mib.checked_mul(MIB).context("target")?;
                match self.guests[guest].control.set_target(bytes) {
                    Ok(_) => self.note("unpinned targets taken"),
                    Err(ControlError::Refused { message, .. }) if message.contains("pinned") => {
                        self.note("unpinned targets refused (pinned)")
                    }
                    Err(error) => anyhow::bail!("set-target without a pin: {error}"),
                }
                Ok(())
            }
            Action::HostMemory { other_percent } => {
                self.other_percent = other_percent;
                self.write_meminfo()
            }
            Action::OomPush { guest, mib } => {
                let seed = self.seed.wrapping_add(mib);
                self.guests[guest]
                    .vm
                    .sh(&format!("guest-verifier --oom-push {mib} --seed {seed} &"))?;
                Ok(())
            }
            Action::Quiet => self.quiet(),
            Action::KillBackend {
                guest,
                down_ms,
                reset,
            } => self.kill_backend(guest, down_ms, reset),
            Action::StopBackend { guest, hold_ms } => {
                let pid = self.guests[guest].backend.pid();
                signal(pid, libc::SIGSTOP)?;
                self.guests[guest].backend_stopped = true;
                self.idle(Duration::from_millis(hold_ms))?;
                signal(pid, libc::SIGCONT)?;
                self.guests[guest].backend_stopped = false;
                let continued = Instant::now();
                for client in self.held.iter_mut().filter(|c| c.guest == guest) {
                    client.opened = client.opened.max(continued);
                }
                self.grace(guest, hold_ms);
                Ok(())
            }
            Action::PauseGuest { guest, hold_ms } => {
                self.guests[guest].qmp.execute("stop", json!({}))?;
                self.idle(Duration::from_millis(hold_ms))?;
                self.guests[guest].qmp.execute("cont", json!({}))?;
                self.grace(guest, hold_ms);
                Ok(())
            }
            Action::Migrate { guest } => self.migrate(guest),
            Action::Reset { guest } => self.reset(guest),
            Action::KillPolicy { down_ms } => self.kill_policy(down_ms),
            Action::Rude { guest, how } => {
                let mut stream = UnixStream::connect(&self.guests[guest].backend.control)?;
                match how {
                    RudeClient::HalfLine => stream.write_all(b"{\"cmd\":\"sta")?,
                    RudeClient::LeavesBeforeReply => stream.write_all(b"{\"cmd\":\"status\"}\n")?,
                    RudeClient::Silent => {}
                }
                drop(stream);
                Ok(())
            }
            Action::NeverReads { guest, hold_ms } => self.never_reads(guest, hold_ms),
        }
    }

    /// The verifier of `guest` need not progress for a while after a
    /// pause of `hold_ms`.
    fn grace(&mut self, guest: usize, hold_ms: u64) {
        self.guests[guest].grace_until =
            Instant::now() + Duration::from_millis(hold_ms) + Duration::from_secs(60);
    }

    /// Runs the real balloonctl; exit 0, or 6 (`set` waited and the guest
    /// had not reached the target) are what it may do.
    fn balloonctl(&mut self, args: &[String]) -> anyhow::Result<()> {
        let out_path = self.work.join("balloonctl.out");
        let out = std::fs::File::create(&out_path)?;
        let mut child = Command::new(&self.balloonctl)
            .arg("--runtime-dir")
            .arg(&self.run_dir)
            .arg("--config")
            .arg(self.policy_dir.join("host-policy.toml"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.balloonctl.display()))?;
        let deadline = Instant::now() + BALLOONCTL_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "balloonctl {} did not end within {BALLOONCTL_DEADLINE:?}",
                    args.join(" ")
                );
            }
            self.idle(Duration::from_millis(100))?;
        };
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        match status.code() {
            Some(0) => Ok(()),
            Some(6) => {
                self.note("balloonctl set: target not reached in time (exit 6)");
                Ok(())
            }
            _ => anyhow::bail!(
                "balloonctl {} ended {status}: {}",
                args.join(" "),
                output.trim()
            ),
        }
    }

    fn kill_backend(&mut self, g: usize, down_ms: u64, reset: bool) -> anyhow::Result<()> {
        self.guests[g].backend_down = true;
        self.guests[g].backend.kill()?;
        let ready = if reset {
            Some(self.reset_now(g)?)
        } else {
            None
        };
        self.idle(Duration::from_millis(down_ms))?;
        self.guests[g].backend.start_again()?;
        self.guests[g].backend_down = false;
        self.guests[g].control = self.guests[g].backend.client()?;
        self.grace(g, down_ms);
        let back = self.wait_while(
            &format!("QEMU to reconnect to g{g}'s restarted backend"),
            RECONNECT_DEADLINE,
            |soak| {
                let status = soak.status(g)?;
                Ok(status.connected && status.config_notify)
            },
        );
        let name = self.guests[g].name.clone();
        self.check(PROCESSES, back.is_ok(), || {
            format!(
                "{name}: QEMU did not come back to the restarted backend: {:#}",
                back.err().unwrap_or_else(|| anyhow::anyhow!("?"))
            )
        });
        match ready {
            Some(ready) => self.rebooted(g, ready),
            None => Ok(()),
        }
    }

    fn kill_policy(&mut self, down_ms: u64) -> anyhow::Result<()> {
        let policy = self.policy.take().context("host-policy is not running")?;
        signal(policy.pid(), libc::SIGKILL)?;
        // Reaped as it is dropped.
        drop(policy);
        let kept = self
            .policy_dir
            .join(format!("host-policy-{}.log", self.faults));
        let _ = std::fs::rename(self.policy_dir.join("host-policy.log"), kept);
        self.idle(Duration::from_millis(down_ms))?;
        let restarted_at = unix_now_s();
        self.policy = Some(PolicyProcess::start_config(
            self.env,
            &self.policy_dir,
            &self.policy_config,
        )?);
        let back = self.wait_while("host-policy to tick again", POLICY_TICK_DEADLINE, |soak| {
            Ok(soak
                .policy
                .as_ref()
                .and_then(PolicyProcess::state)
                .and_then(|state| state["unix_s"].as_u64())
                .is_some_and(|tick| tick >= restarted_at))
        });
        self.check(PROCESSES, back.is_ok(), || {
            format!("host-policy did not tick again after its restart: {back:?}")
        });
        Ok(())
    }

    fn never_reads(&mut self, g: usize, hold_ms: u64) -> anyhow::Result<()> {
        let stream = UnixStream::connect(&self.guests[g].backend.control)?;
        stream.set_nonblocking(true)?;
        let request = b"{\"cmd\":\"status\"}\n";
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent: u64 = 0;
        let mut writer = &stream;
        // Until the backend stops taking requests: its replies fill the
        // socket and it blocks writing the next one.
        loop {
            match writer.write(request) {
                Ok(_) => sent = sent.saturating_add(1),
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) => return Err(error).context("a client that never reads"),
            }
            if Instant::now() >= deadline {
                break;
            }
            if sent.is_multiple_of(512) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let opened = Instant::now();
        self.held.push(HeldClient {
            guest: g,
            stream,
            opened,
            close_at: opened + Duration::from_millis(hold_ms),
        });
        Ok(())
    }

    /// Closes the held clients whose time is up; one held long enough
    /// must have been dropped by the backend by then.
    fn close_due_clients(&mut self) {
        let now = Instant::now();
        let (due, keep): (Vec<HeldClient>, Vec<HeldClient>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|c| c.close_at <= now);
        self.held = keep;
        for client in due {
            if client.opened.elapsed() >= NEVER_READER_DROPPED_BY {
                let dropped = dropped_by_peer(&client.stream);
                let name = self
                    .guests
                    .get(client.guest)
                    .map(|g| g.name.clone())
                    .unwrap_or_default();
                let age = client.opened.elapsed().as_secs();
                self.check(NO_GROWTH, dropped, || {
                    format!("{name}: a control client that never read its replies was still connected after {age} s (its thread and descriptor stay)")
                });
                self.note("never-reading clients dropped by the backend");
            }
        }
    }

    fn reset(&mut self, g: usize) -> anyhow::Result<()> {
        let ready = self.reset_now(g)?;
        self.rebooted(g, ready)
    }

    /// QMP `system_reset`; the boots the console had before.
    fn reset_now(&mut self, g: usize) -> anyhow::Result<usize> {
        let ready = self.guests[g].vm.lines_matching(|l| l == "@@READY").len();
        self.guests[g].expected_boots = ready.saturating_add(1);
        self.guests[g].qmp.execute("system_reset", json!({}))?;
        self.guests[g].grace_until = Instant::now() + BOOT_DEADLINE + PASS_DEADLINE;
        Ok(ready)
    }

    /// Waits for the reset guest's boot and starts its verifier again.
    fn rebooted(&mut self, g: usize, ready: usize) -> anyhow::Result<()> {
        let booted = self.wait_while(
            &format!("g{g} to boot again after its reset"),
            BOOT_DEADLINE,
            |soak| Ok(soak.guests[g].vm.lines_matching(|l| l == "@@READY").len() > ready),
        );
        let name = self.guests[g].name.clone();
        let ok = booted.is_ok();
        self.check(PROCESSES, ok, || {
            format!("{name}: the guest did not boot again after its reset: {booted:?}")
        });
        if ok {
            self.start_verifier(g)?;
        }
        Ok(())
    }

    fn migrate(&mut self, g: usize) -> anyhow::Result<()> {
        self.migrations = self.migrations.checked_add(1).context("migrations")?;
        let to = usize::from(self.guests[g].active == 0);
        let dir = self.guests[g].dirs[to].clone();
        let backend = self.start_backend(&dir)?;
        let uri = format!(
            "unix:{}",
            self.work
                .join(format!("migration-{}.sock", self.migrations))
                .display()
        );
        let config = Self::vm_config(&backend, &dir, &self.guests[g].disk, Some(uri.clone()));
        let vm = Vm::start_incoming(self.env, &config)?;
        let mut qmp = Qmp::connect(&dir.join("qmp.sock"))?;
        set_capabilities(&mut qmp, &[])?;
        let source = &mut self.guests[g];
        set_capabilities(&mut source.qmp, &["auto-converge"])?;
        source.qmp.execute(
            "migrate-set-parameters",
            json!({"downtime-limit": 1000, "max-bandwidth": 1u64 << 30}),
        )?;
        source.grace_until = Instant::now() + MIGRATION_DEADLINE + Duration::from_secs(60);
        let started = Instant::now();
        let info = source.qmp.migrate(&uri, MIGRATION_DEADLINE)?;
        anyhow::ensure!(
            info["status"] == "completed",
            "the migration failed: {info}"
        );
        let mut destination_qmp = qmp;
        guest_tests::wait_for("the destination to run", MIGRATION_DEADLINE, || {
            Ok((destination_qmp.run_state()? == "running").then_some(()))
        })?;
        self.say(&format!(
            "g{g}: migrated to side {} in {:.1} s ({} ms downtime, {} MiB sent)",
            to,
            started.elapsed().as_secs_f64(),
            info["downtime"].as_u64().unwrap_or(0),
            info["ram"]["transferred"].as_u64().unwrap_or(0) / MIB
        ));
        // The source's last lines, then the destination is the guest.
        self.scan(g);
        let name = self.guests[g].name.clone();
        self.link_control(&name, &dir)?;
        let guest = &mut self.guests[g];
        let old_vm = std::mem::replace(&mut guest.vm, vm);
        let mut old_backend = std::mem::replace(&mut guest.backend, backend);
        guest.qmp = destination_qmp;
        guest.control = guest.backend.client()?;
        guest.active = to;
        guest.watch.seen = 0;
        guest.expected_boots = 0;
        guest.kernel_trouble_seen = 0;
        // As libvirt does: the source QEMU quits, its backend is stopped.
        drop(old_vm);
        old_backend.stop();
        Ok(())
    }

    // ----- the quiet period -----

    /// Holds the host in the dead band until every balloon is still, then
    /// checks every invariant on every guest.
    fn quiet(&mut self) -> anyhow::Result<()> {
        self.frozen = true;
        self.write_meminfo()?;
        let result = self.quiet_checks();
        self.frozen = false;
        self.write_meminfo()?;
        result
    }

    fn quiet_checks(&mut self) -> anyhow::Result<()> {
        self.note("quiet periods");
        let statuses = self.wait_quiet()?;
        for (g, quiet) in statuses.iter().enumerate() {
            let name = self.guests[g].name.clone();
            let actual = quiet.actual_bytes;
            let ballooned = quiet.ballooned_bytes;
            self.check(BALLOON_IS_ACTUAL, ballooned == actual, || {
                format!(
                    "{name}: the backend's balloon is {:.1} MiB, the driver's actual {:.1} MiB: {quiet:?}",
                    mib(ballooned),
                    mib(actual)
                )
            });
        }
        for g in 0..self.guests.len() {
            self.check_resident(g)?;
        }
        for g in 0..self.guests.len() {
            self.check_resources(g)?;
        }
        // Every word is read again after the quiet period.
        let before: Vec<u64> = self.guests.iter().map(|g| g.watch.total_passes).collect();
        let more = self.wait_while("a verifier pass in every guest", PASS_DEADLINE, |soak| {
            Ok(soak
                .guests
                .iter()
                .zip(&before)
                .all(|(guest, passes)| guest.watch.total_passes > *passes))
        });
        self.check(PROCESSES, more.is_ok(), || {
            format!("a verifier made no pass after the quiet period: {more:?}")
        });
        let now = unix_now_s();
        let tick = self
            .policy
            .as_ref()
            .and_then(PolicyProcess::state)
            .and_then(|state| state["unix_s"].as_u64());
        self.check(
            PROCESSES,
            tick.is_some_and(|t| t.saturating_add(10) >= now),
            || format!("host-policy's last tick is not recent (unix {tick:?}, now {now})"),
        );
        Ok(())
    }

    /// Waits until every guest's target, actual and balloon hold still
    /// for `QUIET_FOR` with no punch pending; their statuses then.
    fn wait_quiet(&mut self) -> anyhow::Result<Vec<StatusReply>> {
        let guests = self.guests.len();
        let mut since: Vec<Option<(Instant, [u64; 3])>> = vec![None; guests];
        let mut quiet: Vec<Option<StatusReply>> = vec![None; guests];
        let deadline = Instant::now() + QUIET_DEADLINE;
        loop {
            self.duties()?;
            for g in 0..guests {
                if quiet[g].is_some() {
                    continue;
                }
                let status = self.status(g)?;
                let key = [
                    status.target_bytes,
                    status.actual_bytes,
                    status.ballooned_bytes,
                ];
                let still = status.connected && status.pending_punch_bytes == 0;
                since[g] = match since[g] {
                    Some((at, seen)) if still && seen == key => {
                        if at.elapsed() >= QUIET_FOR {
                            quiet[g] = Some(status);
                        }
                        Some((at, seen))
                    }
                    _ if still => Some((Instant::now(), key)),
                    _ => None,
                };
            }
            if quiet.iter().all(Option::is_some) {
                return Ok(quiet.into_iter().flatten().collect());
            }
            if Instant::now() >= deadline {
                let mut states = Vec::new();
                for g in 0..guests {
                    states.push(format!("g{g}: {:?}", self.status(g)?));
                }
                anyhow::bail!(
                    "no quiet period within {QUIET_DEADLINE:?} (the balloons kept moving): {}",
                    states.join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Host-resident guest RAM <= RAM - balloon + slack, measured on the
    /// QEMU's memfd between two statuses that agree (a balloon that moved
    /// in between is measured again), within `SETTLE_DEADLINE`.
    fn check_resident(&mut self, g: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        let mut last = String::new();
        loop {
            let before = self.status(g)?;
            let resident = self.guests[g].vm.host_resident_bytes()?;
            let after = self.status(g)?;
            let ballooned = after.ballooned_bytes;
            let ram = after.guest_ram_bytes;
            let settled = before.ballooned_bytes == after.ballooned_bytes
                && before.pending_punch_bytes == 0
                && after.pending_punch_bytes == 0;
            if settled {
                let allowed = ram.saturating_sub(ballooned);
                let excess = i128::from(resident) - i128::from(allowed);
                if self.largest_excess.is_none_or(|seen| excess > seen) {
                    self.largest_excess = Some(excess);
                }
                if resident <= allowed.saturating_add(RESIDENT_SLACK_BYTES) {
                    self.checks = self.checks.saturating_add(1);
                    return Ok(());
                }
                last = format!(
                    "{:.1} MiB of guest RAM resident on the host, guest RAM {:.1} MiB less the balloon {:.1} MiB is {:.1} MiB (slack {:.0} MiB)",
                    mib(resident),
                    mib(ram),
                    mib(ballooned),
                    mib(allowed),
                    mib(RESIDENT_SLACK_BYTES)
                );
            }
            if Instant::now() >= deadline {
                let name = self.guests[g].name.clone();
                self.check(RESIDENCY, false, || {
                    format!("{name}: after {SETTLE_DEADLINE:?} still {last}")
                });
                return Ok(());
            }
            self.idle(Duration::from_millis(500))?;
        }
    }

    /// The backend's descriptors, threads and anonymous RSS within their
    /// tolerance of the first quiet measurement (within
    /// `SETTLE_DEADLINE`: a client just gone takes a moment to be let go).
    fn check_resources(&mut self, g: usize) -> anyhow::Result<()> {
        // Clients that never read and are held still must have been
        // dropped by the backend before its threads are counted.
        let youngest = self
            .held
            .iter()
            .filter(|c| c.guest == g)
            .map(|c| c.opened.elapsed())
            .min();
        if let Some(age) = youngest {
            self.idle(NEVER_READER_DROPPED_BY.saturating_sub(age))?;
        }
        let deadline = Instant::now() + SETTLE_DEADLINE;
        loop {
            let now = Resources::of(self.guests[g].backend.pid())?;
            let guest = &mut self.guests[g];
            guest.latest = Some(now);
            let Some(baseline) = guest.baseline else {
                guest.baseline = Some(now);
                let text = format!("{}: backend baseline {}", guest.name, now.describe());
                self.say(&text);
                self.checks = self.checks.saturating_add(1);
                return Ok(());
            };
            if now.within(&baseline) {
                self.checks = self.checks.saturating_add(1);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let name = guest.name.clone();
                self.check(NO_GROWTH, false, || {
                    format!(
                        "{name}: the backend has {}; its baseline was {} (tolerance {FD_TOLERANCE} fds, {THREAD_TOLERANCE} threads, {:.0} MiB anonymous)",
                        now.describe(),
                        baseline.describe(),
                        mib(RSS_ANON_TOLERANCE_BYTES)
                    )
                });
                return Ok(());
            }
            self.idle(Duration::from_millis(500))?;
        }
    }

    // ----- the end -----

    fn finish(mut self, seed: u64, seconds: u64) -> Outcome {
        if !self.violations.is_empty() {
            println!(
                "soak: {} violations (seed {seed}); the schedule up to them (replay: cargo xtask soak --seconds {seconds} --seed {seed}):",
                self.violations.len()
            );
            for step in &self.steps {
                println!("soak:   {step}");
            }
            for violation in &self.violations {
                println!("soak: violation: {violation}");
            }
        }
        println!(
            "soak: ran {:.0} s; steps by kind:",
            self.started.elapsed().as_secs_f64()
        );
        for (kind, count) in &self.kinds {
            println!("soak:   {count:5}  {kind}");
        }
        for (what, count) in &self.notes {
            println!("soak:   {count:5}  ({what})");
        }
        for guest in &self.guests {
            println!(
                "soak: {}: {} verifier passes by {} verifiers; {} deflate-on-OOM pushes, {} completed (the rest OOM-killed), {:.1} MiB deflated during them",
                guest.name,
                guest.watch.total_passes,
                guest.watch.starts,
                guest.watch.pushes_started,
                guest.watch.pushes_done,
                mib(guest.watch.push_deflated_pages.saturating_mul(4096))
            );
            if let (Some(first), Some(latest)) = (guest.baseline, guest.latest) {
                println!(
                    "soak: {}: backend at the first quiet period: {}; at the last: {}",
                    guest.name,
                    first.describe(),
                    latest.describe()
                );
            }
        }
        if let Some(excess) = self.largest_excess {
            let sign = if excess < 0 { "-" } else { "" };
            println!(
                "soak: host-resident guest RAM minus (RAM - balloon), largest seen once settled: {sign}{:.1} MiB (slack {:.0} MiB)",
                mib(u64::try_from(excess.unsigned_abs()).unwrap_or(u64::MAX)),
                mib(RESIDENT_SLACK_BYTES)
            );
        }
        println!(
            "soak: longest status reply: {:.1} ms ({})",
            self.longest_status.0.as_secs_f64() * 1000.0,
            self.longest_status.1
        );
        let outcome = Outcome {
            operations: self.operations,
            faults: self.faults,
            checks: self.checks,
            violations: u64::try_from(self.violations.len()).unwrap_or(u64::MAX),
            seed,
        };
        // Everything stops before the summary line.
        self.held.clear();
        if let Some(mut policy) = self.policy.take() {
            if let Err(error) = policy.stop() {
                println!("soak: stopping host-policy: {error:#}");
            }
        }
        for mut guest in self.guests.drain(..) {
            if guest.backend_stopped {
                let _ = signal(guest.backend.pid(), libc::SIGCONT);
            }
            drop(guest.vm);
            guest.backend.stop();
        }
        outcome
    }
}

/// Whether the peer closed `stream`: its pending replies are read and then
/// the end of the stream (or a reset) follows.
fn dropped_by_peer(stream: &UnixStream) -> bool {
    let mut reader = stream;
    let mut buffer = [0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proc_status_gives_threads_and_rss() {
        let status =
            "Name:\tballoon-backend\nVmRSS:\t   12000 kB\nRssAnon:\t    3000 kB\nThreads:\t6\n";
        let resources = Resources::parse(status, 25).unwrap();
        assert_eq!(
            resources,
            Resources {
                fds: 25,
                threads: 6,
                rss_bytes: 12_000 * 1024,
                rss_anon_bytes: 3000 * 1024
            }
        );
        assert!(Resources::parse("Threads:\t6\n", 1).is_none());
        let grown = Resources {
            fds: 25 + FD_TOLERANCE + 1,
            ..resources
        };
        assert!(resources.within(&resources) && !grown.within(&resources));
    }

    #[test]
    fn the_summary_line_reads_as_the_issue_asks() {
        let outcome = Outcome {
            operations: 10,
            faults: 4,
            checks: 99,
            violations: 0,
            seed: 28,
        };
        assert_eq!(
            outcome.line(),
            "soak: 10 operations, 4 faults, 99 invariant checks, 0 violations (seed 28)"
        );
    }

    #[test]
    fn our_own_children_are_seen_alive_until_they_exit() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(process_alive(child.id()));
        child.kill().unwrap();
        // Killed but not reaped: a zombie is not alive.
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(child.id()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!process_alive(child.id()));
        child.wait().unwrap();
        assert_eq!(size(0), "0");
        assert!(is_kernel_trouble(
            "[   12.1] Kernel panic - not syncing: Fatal exception"
        ));
        assert!(!is_kernel_trouble("@@VERIFY pass=1 words=1 mismatches=0"));
        assert_eq!(size(160), "160M");
    }
}
