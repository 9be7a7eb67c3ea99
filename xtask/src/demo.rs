//! `cargo xtask demo`: a 1 GiB guest on the real backend. It shows, live,
//! the guest's free memory (from the balloon statistics), the balloon target
//! and actual size, and the host memory really backing the guest (allocated
//! bytes of QEMU's guest-RAM memfd, measured on the host). The guest frees
//! memory and free page reporting hands it back; then host-policy, seeing
//! (simulated) host pressure, inflates the balloon, and gives the memory
//! back when the pressure ends; then everything is stopped and cleaned up.

use std::time::{Duration, Instant};

use anyhow::Context;
use guest_tests::backend::{BackendProcess, ControlClient};
use guest_tests::env::TestEnv;
use guest_tests::policy::PolicyProcess;
use guest_tests::vm::{qemu_args, Vm, VmConfig};
use guest_tests::MIB;
use serde_json::Value;

const GUEST_MIB: u64 = 1024;
/// The demo waits until host-policy has ballooned at least this much.
const BALLOON_MIB: u64 = 600;

struct Screen {
    started: Instant,
}

impl Screen {
    fn header(&self) {
        println!(
            "{:>7}  {:>14}  {:>13}  {:>13}  {:>17}",
            "time", "guest free", "balloon target", "balloon actual", "host RAM for guest"
        );
    }

    fn row(&self, status: &Value, resident_bytes: u64) {
        let mib = |v: &Value| {
            v.as_u64()
                .map_or("-".to_string(), |b| format!("{} MiB", b / MIB))
        };
        println!(
            "{:>6.1}s  {:>14}  {:>13}  {:>13}  {:>17}",
            self.started.elapsed().as_secs_f64(),
            mib(&status["stats"]["free_bytes"]),
            mib(&status["target_bytes"]),
            mib(&status["actual_bytes"]),
            format!("{} MiB", resident_bytes / MIB),
        );
    }

    /// Prints a row every half second until `done` holds or `timeout` passes.
    fn watch(
        &self,
        control: &mut ControlClient,
        vm: &Vm,
        timeout: Duration,
        done: impl Fn(&Value, u64) -> bool,
    ) -> anyhow::Result<(Value, u64)> {
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

pub fn run(env: &TestEnv) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a socket directory")?;
    let mut backend = BackendProcess::start(env, dir.path(), &["--stats-interval", "1"])?;
    let config = VmConfig::with_backend(GUEST_MIB, backend.socket.clone());
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
        "== {GUEST_MIB} MiB guest booted ({}). The guest fills 700 MiB, then frees it:",
        env.accel
    );
    screen.header();
    screen.watch(&mut control, &vm, Duration::from_secs(10), |s, _| {
        !s["stats"].is_null()
    })?;
    vm.sh("dd if=/dev/zero of=/mnt/data/fill bs=1M count=700 2>/dev/null")?;
    let (_, peak) = screen.watch(&mut control, &vm, Duration::from_secs(2), |_, _| true)?;
    vm.sh("rm /mnt/data/fill")?;
    println!("-- freed in the guest; free page reporting returns it to the host:");
    let (_, low) = screen.watch(&mut control, &vm, Duration::from_secs(20), |_, r| {
        r + 500 * MIB < peak
    })?;

    println!("== host-policy takes charge; the host comes under pressure (simulated: 8 % of a 16 GiB host available):");
    let mut policy = PolicyProcess::start(
        env,
        dir.path(),
        &backend.control,
        "hard_inflate_step_mib = 256\ndeflate_step_mib = 256",
    )?;
    policy.set_host(16384, 1310)?;
    screen.watch(&mut control, &vm, Duration::from_secs(120), |s, _| {
        let actual = s["actual_bytes"].as_u64().unwrap_or(0);
        actual >= BALLOON_MIB * MIB && s["actual_bytes"] == s["target_bytes"]
    })?;
    control.request(&serde_json::json!({"cmd": "refresh-stats"}))?;
    let (inflated, _) = screen.watch(&mut control, &vm, Duration::from_secs(3), |_, _| true)?;

    println!("== the pressure ends (60 % available): host-policy gives the memory back:");
    policy.set_host(16384, 9830)?;
    screen.watch(&mut control, &vm, Duration::from_secs(120), |s, _| {
        s["actual_bytes"] == 0
    })?;
    control.request(&serde_json::json!({"cmd": "refresh-stats"}))?;
    let (deflated, _) = screen.watch(&mut control, &vm, Duration::from_secs(3), |_, _| true)?;
    policy.stop()?;

    drop(vm);
    backend.stop();
    let leftovers: Vec<_> = [&backend.socket, &backend.control]
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    anyhow::ensure!(leftovers.is_empty(), "sockets left behind: {leftovers:?}");
    let free = |s: &Value| s["stats"]["free_bytes"].as_u64().unwrap_or(0) / MIB;
    println!(
        "\nSummary: reporting cut the host memory behind the guest from {} MiB to {} MiB; \
         under host pressure host-policy ballooned {} MiB out of the guest (guest free {} MiB), \
         then gave it back (guest free {} MiB). QEMU, host-policy and the backend are stopped \
         and their sockets removed.",
        peak / MIB,
        low / MIB,
        inflated["actual_bytes"].as_u64().unwrap_or(0) / MIB,
        free(&inflated),
        free(&deflated)
    );
    Ok(())
}
