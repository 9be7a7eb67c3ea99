//! `cargo xtask demo`: a 1 GiB guest on the real backend. It shows, live,
//! the guest's free memory (from the balloon statistics), the balloon target
//! and actual size, and the host memory really backing the guest (allocated
//! bytes of QEMU's guest-RAM memfd, measured on the host). The guest frees
//! memory and free page reporting hands it back; then the host inflates the
//! balloon and deflates it again; then everything is stopped and cleaned up.

use std::time::{Duration, Instant};

use anyhow::Context;
use guest_tests::backend::{BackendProcess, ControlClient};
use guest_tests::env::TestEnv;
use guest_tests::vm::{qemu_args, Vm, VmConfig};
use guest_tests::MIB;
use serde_json::Value;

const GUEST_MIB: u64 = 1024;
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

    println!("== the host sets the balloon to {BALLOON_MIB} MiB:");
    control.set_target(BALLOON_MIB * MIB)?;
    screen.watch(&mut control, &vm, Duration::from_secs(120), |s, _| {
        s["actual_bytes"] == BALLOON_MIB * MIB
    })?;
    control.request(&serde_json::json!({"cmd": "refresh-stats"}))?;
    let (inflated, _) = screen.watch(&mut control, &vm, Duration::from_secs(3), |_, _| true)?;

    println!("== the host gives it back (target 0):");
    control.set_target(0)?;
    screen.watch(&mut control, &vm, Duration::from_secs(120), |s, _| {
        s["actual_bytes"] == 0
    })?;
    control.request(&serde_json::json!({"cmd": "refresh-stats"}))?;
    let (deflated, _) = screen.watch(&mut control, &vm, Duration::from_secs(3), |_, _| true)?;

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
         the balloon took {} MiB from the guest (free {} MiB while inflated, {} MiB after deflating). \
         QEMU and the backend are stopped and their sockets removed.",
        peak / MIB,
        low / MIB,
        BALLOON_MIB,
        free(&inflated),
        free(&deflated)
    );
    Ok(())
}
