//! Side-by-side with QEMU's built-in virtio-balloon on the same QEMU build,
//! guest image and memfd guest RAM: inflate speed, memory returned, discard
//! system calls and host CPU; and free page reporting.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use guest_tests::backend::BackendProcess;
use guest_tests::env::TestEnv;
use guest_tests::qmp::Qmp;
use guest_tests::vm::{Balloon, Vm, VmConfig};
use guest_tests::{wait_for, MIB};
use serde_json::json;
use test_support::child::Signal;
use test_support::ChildGuard;

const GUEST_MIB: u64 = 2048;
const TARGET_BYTES: u64 = 1 << 30;

/// CPU seconds of a process's threads, leaving out vCPU threads ("CPU n/…").
fn device_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let mut ticks = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised command name: utime is 14, stime 15.
        let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let get = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += get(11) + get(12);
    }
    Ok(ticks as f64 / 100.0)
}

/// Whether every thread of `pid` names `tracer` as its TracerPid.
fn all_threads_traced_by(pid: u32, tracer: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let wanted = format!("TracerPid:\t{tracer}");
    let mut seen = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if !status.lines().any(|line| line == wanted) {
            return false;
        }
        seen += 1;
    }
    seen > 0
}

/// `strace -c` on a process for fallocate and madvise calls.
struct SyscallCount {
    child: ChildGuard,
    output: PathBuf,
}

impl SyscallCount {
    fn attach(pid: u32, output: PathBuf) -> anyhow::Result<Self> {
        let child = Command::new("strace")
            .args(["-f", "-c", "-e", "trace=fallocate,madvise", "-o"])
            .arg(&output)
            .args(["-p", &pid.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .context("starting strace (apt-get install strace)")?;
        // Counting starts only once strace traces every thread.
        let child = ChildGuard::new("strace", child);
        let tracer = child.pid();
        wait_for(
            "strace to attach to every thread",
            Duration::from_secs(10),
            || Ok(all_threads_traced_by(pid, tracer).then_some(())),
        )?;
        Ok(SyscallCount { child, output })
    }

    fn finish(mut self) -> anyhow::Result<u64> {
        // SIGINT makes strace detach and write its table.
        self.child.signal(Signal::INT)?;
        self.child.wait_exit(Duration::from_secs(10))?;
        let text = std::fs::read_to_string(&self.output)?;
        // Rows: % time, seconds, usecs/call, calls, [errors,] syscall.
        Ok(text
            .lines()
            .filter(|l| l.ends_with("fallocate") || l.ends_with("madvise"))
            .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
            .sum())
    }
}

struct InflateRun {
    seconds: f64,
    returned_bytes: u64,
    cpu_s: f64,
    discard_calls: Option<u64>,
    /// balloon-backend only: its CPU time inside the discard calls.
    discard_cpu_s: Option<f64>,
}

fn inflate_ours(env: &TestEnv, count_calls: bool) -> anyhow::Result<InflateRun> {
    let dir = tempfile::tempdir()?;
    let backend = BackendProcess::start(
        env,
        dir.path(),
        &[
            "--max-reclaim-percent",
            "75",
            "--no-reporting",
            "--stats-interval",
            "0",
        ],
    )?;
    let vm = Vm::boot(
        env,
        &VmConfig {
            prealloc: true,
            ..VmConfig::with_backend(GUEST_MIB, backend.socket.clone())
        },
    )?;
    let mut control = backend.client()?;
    wait_for("the driver", Duration::from_secs(60), || {
        Ok((!control.status()?.features.is_empty()).then_some(()))
    })?;
    let before_us = control.status()?.discard_cpu_us;
    let mut after_us = before_us;
    let mut run = measure_inflate(
        &vm,
        backend.pid(),
        count_calls.then(|| dir.path().join("strace.txt")),
        || {
            control.set_target(TARGET_BYTES)?;
            // Until the guest reports the balloon full and the backend has
            // punched the last of it (punches wait up to 20 ms).
            wait_for("actual", Duration::from_secs(300), || {
                let status = control.status()?;
                after_us = status.discard_cpu_us;
                Ok(
                    (status.actual_bytes == TARGET_BYTES && status.pending_punch_bytes == 0)
                        .then_some(()),
                )
            })
        },
    )?;
    run.discard_cpu_s = Some(after_us.saturating_sub(before_us) as f64 / 1e6);
    Ok(run)
}

fn inflate_builtin(env: &TestEnv, count_calls: bool) -> anyhow::Result<InflateRun> {
    let dir = tempfile::tempdir()?;
    let qmp_path = dir.path().join("qmp.sock");
    let vm = Vm::boot(
        env,
        &VmConfig {
            mem_mib: GUEST_MIB,
            balloon: Balloon::BuiltIn {
                free_page_reporting: false,
            },
            prealloc: true,
            qmp_socket: Some(qmp_path.clone()),
            ..VmConfig::default()
        },
    )?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    let ram = GUEST_MIB * MIB;
    measure_inflate(
        &vm,
        vm.pid(),
        count_calls.then(|| dir.path().join("strace.txt")),
        || {
            qmp.execute("balloon", json!({"value": ram - TARGET_BYTES}))?;
            wait_for("actual", Duration::from_secs(300), || {
                let actual = qmp.execute("query-balloon", json!({}))?["actual"]
                    .as_u64()
                    .unwrap_or(ram);
                Ok((actual <= ram - TARGET_BYTES).then_some(()))
            })
        },
    )
}

/// Times `inflate` (set a 1 GiB target and wait for it) and measures what
/// it returned to the host and cost the device process `device_pid`;
/// with `trace`, counts discard calls into that file.
fn measure_inflate(
    vm: &Vm,
    device_pid: u32,
    trace: Option<PathBuf>,
    inflate: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<InflateRun> {
    let trace = trace
        .map(|path| SyscallCount::attach(device_pid, path))
        .transpose()?;
    let resident = vm.host_resident_bytes()?;
    let cpu = device_cpu_s(device_pid)?;
    let started = Instant::now();
    inflate()?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(InflateRun {
        seconds,
        returned_bytes: resident.saturating_sub(vm.host_resident_bytes()?),
        cpu_s: device_cpu_s(device_pid)? - cpu,
        discard_calls: trace.map(SyscallCount::finish).transpose()?,
        discard_cpu_s: None,
    })
}

/// Host memory returned after the guest frees 512 MiB: (at 10 s, seconds to 400 MiB).
fn reporting_run(env: &TestEnv, ours: bool) -> anyhow::Result<(u64, Option<f64>)> {
    let dir = tempfile::tempdir()?;
    let backend = if ours {
        Some(BackendProcess::start(env, dir.path(), &[])?)
    } else {
        None
    };
    let config = match &backend {
        Some(b) => VmConfig::with_backend(1024, b.socket.clone()),
        None => VmConfig {
            mem_mib: 1024,
            balloon: Balloon::BuiltIn {
                free_page_reporting: true,
            },
            ..VmConfig::default()
        },
    };
    let mut vm = Vm::boot(env, &config)?;
    vm.sh("dd if=/dev/zero of=/mnt/data/fill bs=1M count=512 2>/dev/null")?;
    let filled = vm.host_resident_bytes()?;
    vm.sh("rm /mnt/data/fill")?;
    let freed_at = Instant::now();
    let mut reached = None;
    let mut returned = 0;
    while freed_at.elapsed() < Duration::from_secs(10) {
        returned = filled.saturating_sub(vm.host_resident_bytes()?);
        if reached.is_none() && returned >= 400 * MIB {
            reached = Some(freed_at.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((returned, reached))
}

/// strace counts the discard calls; install it when missing (as root).
fn ensure_strace() -> anyhow::Result<()> {
    crate::provision::ensure_packages(&[("strace", "strace")])
}

/// The device's CPU per GiB inflated may be at most this multiple of the
/// kernel's own work: one punch of 1 GiB of guest-RAM-like memory.
pub const DEVICE_CPU_LIMIT_FACTOR: f64 = 1.5;

/// The comparison tables; `punch_limit_s` is the in-process bench's time
/// for one punch of 1 GiB mapped and touched by a second process (guest RAM
/// as QEMU holds it), `punch_unmapped_s` the same for a file nobody maps,
/// both measured in the same run.
pub fn run(env: &TestEnv, punch_limit_s: f64, punch_unmapped_s: f64) -> anyhow::Result<String> {
    ensure_strace()?;
    eprintln!("[xtask] real-guest comparison with QEMU's virtio-balloon (about 2 minutes)");
    let ours = inflate_ours(env, false)?;
    let ours_calls = inflate_ours(env, true)?.discard_calls.unwrap_or(0);
    let builtin = inflate_builtin(env, false)?;
    let builtin_calls = inflate_builtin(env, true)?.discard_calls.unwrap_or(0);
    let (ours_reported, ours_400) = reporting_run(env, true)?;
    let (builtin_reported, builtin_400) = reporting_run(env, false)?;
    let secs = |s: Option<f64>| s.map_or("not reached".to_string(), |s| format!("{s:.1} s"));
    let gib = TARGET_BYTES as f64 / (1u64 << 30) as f64;
    Ok(format!(
        "| 1 GiB balloon on a 2 GiB guest (prealloc) | balloon-backend | QEMU virtio-balloon | ours / QEMU |\n\
         |---|---|---|---|\n\
         | time from target to `actual` | {:.2} s | {:.2} s | {:.2}x |\n\
         | host memory returned | {} MiB | {} MiB | {:.2}x |\n\
         | discard system calls per GiB (fallocate + madvise) | {:.0} | {:.0} | {:.4}x |\n\
         | host CPU of the device side (QEMU: all non-vCPU threads) | {:.2} s | {:.2} s | {:.2}x |\n\n\
         | free page reporting, 1 GiB guest frees 512 MiB | balloon-backend | QEMU virtio-balloon | ours / QEMU |\n\
         |---|---|---|---|\n\
         | host memory returned within 10 s | {} MiB | {} MiB | {:.2}x |\n\
         | time until 400 MiB were back | {} | {} | |\n\n\
         | balloon-backend's host CPU per GiB inflated on this real guest (user + system time of all its threads, `status` polled every 50 ms) | seconds | device CPU / this |\n\
         |---|---|---|\n\
         | device CPU | {:.2} s | |\n\
         | the kernel's own work in this run: the backend's CPU inside its `fallocate` calls (`discard_cpu_us`) | {:.2} s | {:.2}x (limit {DEVICE_CPU_LIMIT_FACTOR}x) |\n\
         | limit: {DEVICE_CPU_LIMIT_FACTOR} x one punch of 1 GiB mapped and touched by a second process, as QEMU holds guest RAM (inflate table) | {:.2} s | {:.2}x |\n\
         | for reference: {DEVICE_CPU_LIMIT_FACTOR} x one punch of 1 GiB that nobody maps (inflate table) | {:.2} s | {:.2}x |",
        ours.seconds,
        builtin.seconds,
        ours.seconds / builtin.seconds,
        ours.returned_bytes / MIB,
        builtin.returned_bytes / MIB,
        ours.returned_bytes as f64 / builtin.returned_bytes.max(1) as f64,
        ours_calls as f64 / gib,
        builtin_calls as f64 / gib,
        ours_calls as f64 / builtin_calls.max(1) as f64,
        ours.cpu_s,
        builtin.cpu_s,
        ours.cpu_s / builtin.cpu_s.max(0.01),
        ours_reported / MIB,
        builtin_reported / MIB,
        ours_reported as f64 / builtin_reported.max(1) as f64,
        secs(ours_400),
        secs(builtin_400),
        ours.cpu_s / gib,
        ours.discard_cpu_s.unwrap_or(0.0) / gib,
        ours.cpu_s / ours.discard_cpu_s.unwrap_or(0.0).max(1e-6),
        punch_limit_s * DEVICE_CPU_LIMIT_FACTOR,
        ours.cpu_s / gib / (punch_limit_s * DEVICE_CPU_LIMIT_FACTOR),
        punch_unmapped_s * DEVICE_CPU_LIMIT_FACTOR,
        ours.cpu_s / gib / (punch_unmapped_s * DEVICE_CPU_LIMIT_FACTOR),
    ))
}
