//! `cargo xtask demo`: a 1 GiB guest on the real backend. It shows, live,
//! the guest's free memory and page cache (from the balloon statistics),
//! the balloon target and actual size, and the host memory really backing
//! the guest (allocated bytes of QEMU's guest-RAM memfd, measured on the
//! host). Free page reporting returns what the guest frees; memory the
//! guest uses (here, page cache) only the balloon can take: host-policy,
//! seeing (simulated) host pressure, inflates it, and gives the memory back
//! when the pressure ends, after which the guest refills its cache. The
//! summary names what each mechanism returned, measured on the host.

use std::time::{Duration, Instant};

use anyhow::Context;
use balloon_protocol::control::{
    ControlClient, ControlError, RefreshStatsReply, Request, StatusReply,
};
use guest_tests::backend::BackendProcess;
use guest_tests::env::TestEnv;
use guest_tests::host_policy_process::PolicyProcess;
use guest_tests::vm::{qemu_args, Vm, VmConfig};
use guest_tests::MIB;

const GUEST_MIB: u64 = 1024;
/// The demo waits until host-policy has ballooned at least this much.
const BALLOON_MIB: u64 = 600;
/// What the guest writes to its tmpfs and frees again (for reporting).
const FILL_MIB: u64 = 600;
/// The guest's disk, read into its page cache (memory in use).
const DISK_MIB: u64 = 640;

struct Screen {
    started: Instant,
}

impl Screen {
    fn header(&self) {
        println!(
            "{:>7}  {:>10}  {:>11}  {:>14}  {:>14}  {:>18}",
            "time",
            "guest free",
            "guest cache",
            "balloon target",
            "balloon actual",
            "host RAM for guest"
        );
    }

    fn row(&self, status: &StatusReply, resident_bytes: u64) {
        let mib = |v: Option<u64>| v.map_or("-".to_string(), |b| format!("{} MiB", b / MIB));
        let stats = status.stats.as_ref();
        println!(
            "{:>6.1}s  {:>10}  {:>11}  {:>14}  {:>14}  {:>18}",
            self.started.elapsed().as_secs_f64(),
            mib(stats.and_then(|s| s.free_bytes)),
            mib(stats.and_then(|s| s.disk_caches_bytes)),
            mib(Some(status.target_bytes)),
            mib(Some(status.actual_bytes)),
            format!("{} MiB", resident_bytes / MIB),
        );
    }

    /// Prints a row every half second until `done` holds or `timeout` passes.
    fn watch(
        &self,
        control: &mut ControlClient,
        vm: &Vm,
        timeout: Duration,
        done: impl Fn(&StatusReply, u64) -> bool,
    ) -> anyhow::Result<(StatusReply, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = control.status()?;
            let resident = vm.host_resident_bytes()?;
            self.row(&status, resident);
            if done(&status, resident) || Instant::now() >= deadline {
                return Ok((status, resident));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// One phase's line of the summary: host memory behind the guest before
/// and after, in MiB.
/// Asks for fresh statistics (the default wait); a guest that does not
/// answer in time only leaves the last ones on screen.
fn refresh_stats(control: &mut ControlClient) -> anyhow::Result<()> {
    let request = Request::RefreshStats { timeout_ms: None };
    match control.request::<RefreshStatsReply>(&request) {
        Ok(_) | Err(ControlError::Refused { .. }) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

struct Returned {
    before_mib: u64,
    after_mib: u64,
}

impl Returned {
    fn new(before_bytes: u64, after_bytes: u64) -> Self {
        Returned {
            before_mib: before_bytes / MIB,
            after_mib: after_bytes / MIB,
        }
    }

    fn freed_mib(&self) -> u64 {
        self.before_mib.saturating_sub(self.after_mib)
    }
}

pub fn run(env: &TestEnv) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a socket directory")?;
    let mut backend = BackendProcess::start(env, dir.path(), &["--stats-interval", "1"])?;
    // A sparse file: reading it fills the guest's page cache with pages the
    // host allocates for guest RAM, not for the file.
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(DISK_MIB * MIB))
        .context("creating the guest's disk")?;
    let mut config = VmConfig::with_backend(GUEST_MIB, backend.socket.clone());
    config.disk = Some(disk);
    // The device an operator should use with this QEMU (it migrates).
    if let guest_tests::vm::Balloon::VhostUser { migratable, .. } = &mut config.balloon {
        *migratable = true;
    }
    println!(
        "\nballoon-backend --socket {} --control {} --stats-interval 1",
        backend.socket.display(),
        backend.control.display()
    );
    println!(
        "{} {}\n",
        env.qemu.display(),
        qemu_args(env, &config).join(" ")
    );
    let mut vm = Vm::boot(env, &config)?;
    let mut control = backend.client()?;
    let screen = Screen {
        started: Instant::now(),
    };

    println!(
        "== 1. {GUEST_MIB} MiB guest booted ({}). Free page reporting: the guest writes {FILL_MIB} MiB, \
         then frees it, and the device punches the freed pages out of guest RAM.",
        env.accel
    );
    screen.header();
    screen.watch(&mut control, &vm, Duration::from_secs(10), |s, _| {
        s.stats.is_some()
    })?;
    vm.sh(&format!(
        "dd if=/dev/zero of=/mnt/data/fill bs=1M count={FILL_MIB} 2>/dev/null"
    ))?;
    let (_, filled) = screen.watch(&mut control, &vm, Duration::from_secs(2), |_, _| true)?;
    vm.sh("rm /mnt/data/fill")?;
    let (_, reported) = screen.watch(&mut control, &vm, Duration::from_secs(20), |_, r| {
        r + (FILL_MIB - 100) * MIB < filled
    })?;
    let reporting = Returned::new(filled, reported);

    println!(
        "== 2. Memory in use: the guest reads its {DISK_MIB} MiB disk into its page cache. \
         Those pages are not free, so reporting cannot return them."
    );
    // The reader keeps the disk open: closing it would drop its cache.
    vm.sh(&format!(
        "sleep 100000 </dev/vda & dd if=/dev/vda of=/dev/null bs=1M count={DISK_MIB} 2>/dev/null"
    ))?;
    let (_, cached) = screen.watch(&mut control, &vm, Duration::from_secs(6), |_, _| false)?;

    println!(
        "== 3. The host comes under pressure (simulated: 8 % of a 16 GiB host available). \
         host-policy inflates the balloon; the guest gives up its cache to fill it."
    );
    let mut policy = PolicyProcess::start(
        env,
        dir.path(),
        &backend.control,
        "hard_inflate_step_mib = 256\ndeflate_step_mib = 256",
    )?;
    policy.set_host(16384, 1310)?;
    screen.watch(&mut control, &vm, Duration::from_secs(120), |s, _| {
        s.actual_bytes >= BALLOON_MIB * MIB && s.actual_bytes == s.target_bytes
    })?;
    refresh_stats(&mut control)?;
    let (inflated, ballooned) =
        screen.watch(&mut control, &vm, Duration::from_secs(3), |_, _| true)?;
    let balloon = Returned::new(cached, ballooned);

    println!(
        "== 4. The pressure ends (60 % available): host-policy gives the memory back, \
         and the guest refills its cache from its disk."
    );
    policy.set_host(16384, 9830)?;
    screen.watch(&mut control, &vm, Duration::from_secs(120), |s, _| {
        s.actual_bytes == 0
    })?;
    vm.sh(&format!(
        "dd if=/dev/vda of=/dev/null bs=1M count={DISK_MIB} 2>/dev/null"
    ))?;
    refresh_stats(&mut control)?;
    let (refilled, restored) =
        screen.watch(&mut control, &vm, Duration::from_secs(3), |_, _| true)?;
    policy.stop()?;

    drop(vm);
    backend.stop();
    let leftovers: Vec<_> = [&backend.socket, &backend.control]
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    anyhow::ensure!(leftovers.is_empty(), "sockets left behind: {leftovers:?}");
    let cache = |s: &StatusReply| {
        s.stats
            .as_ref()
            .and_then(|stats| stats.disk_caches_bytes)
            .unwrap_or(0)
            / MIB
    };
    println!(
        "\nSummary (host memory behind the guest, measured on the host):\n\
         - free page reporting returned the guest's free pages: {} MiB ({} -> {} MiB);\n\
         - with {} MiB of it in use as page cache, reporting returned nothing more ({} MiB behind the guest);\n\
         - the balloon returned page cache and idle memory: {} MiB ({} -> {} MiB; balloon {} MiB, guest cache {} MiB);\n\
         - after the pressure the guest took its memory back and refilled its cache ({} MiB cache, {} MiB behind the guest).\n\
         QEMU, host-policy and the backend are stopped and their sockets removed.",
        reporting.freed_mib(),
        reporting.before_mib,
        reporting.after_mib,
        DISK_MIB,
        balloon.before_mib,
        balloon.freed_mib(),
        balloon.before_mib,
        balloon.after_mib,
        inflated.actual_bytes / MIB,
        cache(&inflated),
        cache(&refilled),
        restored / MIB,
    );
    Ok(())
}
