//! The package under a real systemd as PID 1 (part of `cargo xtask
//! package-test`): a Debian root booted with systemd-nspawn, the package
//! installed into it with dpkg while systemd runs, and then, for real:
//!
//! - the backend unit's system-call filter, as this systemd reads and
//!   compiles it, allows every call of the backend's seccomp lists;
//! - a sandbox setting that stops a daemon fails the check: each daemon
//!   started once with one such setting in a drop-in (`ProcSubset=pid` on
//!   host-policy, `seccomp` taken from the backend's filter) must be
//!   caught, with the reason from its journal;
//! - the libvirt hook's systemd path: `prepare` starts
//!   `balloon-backend@DOMAIN` through systemctl, its directory and sockets
//!   have the documented owner, group and mode, and it runs as `balloon`
//!   with no capabilities under seccomp;
//! - a guest's QEMU on the host (reaching the root's /run/balloon through a
//!   bind mount) attaches, a target is reached and host-resident RAM falls;
//!   SIGKILLed, the backend is restarted by systemd, QEMU reconnects, the
//!   balloon is kept and still moves;
//! - `host-policy.service` runs with the installed configuration and
//!   discovers the VM; restarted with metrics on a Unix socket, the limit
//!   it applies to the VM (its own `balloon_vm_limit_bytes`) follows a
//!   changed configuration on `systemctl reload`, by the same process, and
//!   the VM's balloon keeps within it; `systemctl stop` leaves no process
//!   and no socket;
//! - the hook's `release` stops the backend and removes its sockets.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use balloon_protocol::control::ControlClient;
use guest_tests::backend::{self, ControlWaits};
use guest_tests::env::TestEnv;
use guest_tests::vm::{Balloon, Vm, VmConfig};

use crate::nspawn::{Booted, UnitState};
use crate::package_test::{domain_xml, exposure_score, run_hook, HOOK, MAX_EXPOSURE};
use crate::provision::output;
use crate::syscall_filter::{check_backend, check_backend_unit, Filter, Sets};

const DOMAIN: &str = "vm1";
const BACKEND_UNIT: &str = "balloon-backend@vm1.service";
const POLICY_UNIT: &str = "host-policy.service";
const POLICY_CONFIG: &str = "/etc/balloon-stack/host-policy.toml";
const POLICY_STATE: &str = "/run/balloon/host-policy.json";
const POLICY_METRICS: &str = "/run/balloon/host-policy.metrics";
const FAKE_MEMINFO: &str = "/etc/balloon-stack/package-test-meminfo";
const MIB: u64 = 1 << 20;
const GUEST_MIB: u64 = 512;
/// The domain's metadata limit, which the hook hands the backend.
const METADATA_LIMIT_PERCENT: u64 = 50;
const TARGET_MIB: u64 = 128;
/// A unit's longest way to running (restart delays included).
const UNIT_DEADLINE: Duration = Duration::from_secs(30);
/// A target's longest way to the guest under TCG.
const TARGET_DEADLINE: Duration = Duration::from_secs(120);
/// host-policy ticks every 5 s as installed: discovery within a few ticks.
const DISCOVERY_DEADLINE: Duration = Duration::from_secs(30);

/// Boots `template` (a Debian root with systemd), installs `debs` in it
/// and runs every check above. Returns the root's systemd version, major
/// and whole line.
pub fn run(
    template: &Path,
    label: &str,
    debs: &[&Path],
    env: &TestEnv,
) -> anyhow::Result<(u32, String)> {
    let booted = Booted::boot(template, label)?;
    let (major, version) = booted.systemd_version()?;
    let tag = format!("[systemd {major}]");
    eprintln!("{tag} {label}: booted, PID 1 is {version}");
    install(&booted, debs, &tag)?;
    check_filters(&booted, &tag)?;
    check_security(&booted, &tag)?;
    a_sandbox_setting_that_stops_a_daemon_is_caught(&booted, &tag)?;
    check_backend_guest_and_policy(&booted, env, &tag)?;
    booted.poweroff()?;
    eprintln!("{tag} {label}: every check passed; powered off");
    Ok((major, version))
}

fn install(booted: &Booted, debs: &[&Path], tag: &str) -> anyhow::Result<()> {
    for deb in debs {
        let name = deb
            .file_name()
            .and_then(|n| n.to_str())
            .context("a package without a file name")?;
        std::fs::copy(deb, booted.path(&format!("/var/tmp/{name}")))?;
        booted.run("dpkg", &["-i", &format!("/var/tmp/{name}")])?;
    }
    // libvirt's QEMU group, as its package would create it.
    booted.run("groupadd", &["--system", "libvirt-qemu"])?;
    // postinst made /run/balloon through systemd-tmpfiles.
    let meta = std::fs::metadata(booted.path("/run/balloon"))?;
    let balloon = account_id(booted, "passwd", "balloon")?;
    anyhow::ensure!(
        meta.uid() == balloon && meta.mode() & 0o7777 == 0o755,
        "/run/balloon is {:o} uid {} after the install (want 0755, balloon {balloon})",
        meta.mode() & 0o7777,
        meta.uid()
    );
    eprintln!("{tag} dpkg -i under systemd: installed; /run/balloon 0755 balloon (tmpfiles)");
    Ok(())
}

/// A user's or group's id in the root (`getent passwd|group NAME`).
fn account_id(booted: &Booted, database: &str, name: &str) -> anyhow::Result<u32> {
    let entry = booted.run("getent", &[database, name])?;
    entry
        .split(':')
        .nth(2)
        .and_then(|id| id.trim().parse().ok())
        .with_context(|| format!("the id of {name} in {database}: {entry:?}"))
}

/// The backend unit's filter against its seccomp lists, twice with this
/// systemd: its sets (`systemd-analyze syscall-filter`) applied to the
/// unit's lines, and the filter systemd compiled (`systemctl show`).
fn check_filters(booted: &Booted, tag: &str) -> anyhow::Result<()> {
    let sets = Sets::parse(&booted.run("systemd-analyze", &["syscall-filter"])?);
    let unit =
        std::fs::read_to_string(booted.path("/lib/systemd/system/balloon-backend@.service"))?;
    let whose = format!("{tag} systemd-analyze syscall-filter in the root");
    let calls = check_backend_unit(&unit, &sets, &whose)?;
    let compiled = booted.systemctl(&["show", "-p", "SystemCallFilter", BACKEND_UNIT])?;
    let filter = Filter::of_systemctl_show(&compiled)?;
    check_backend(&filter, &format!("{tag} systemctl show"))?;
    eprintln!(
        "{tag} balloon-backend@.service's SystemCallFilter allows all {calls} calls of the backend's seccomp lists (this systemd's sets, and the filter it compiled: {} calls)",
        filter.calls.len()
    );
    Ok(())
}

fn check_security(booted: &Booted, tag: &str) -> anyhow::Result<()> {
    for unit in [BACKEND_UNIT, POLICY_UNIT] {
        let text = booted.run("systemd-analyze", &["security", "--no-pager", unit])?;
        let score = exposure_score(&text, unit)?;
        anyhow::ensure!(
            score <= MAX_EXPOSURE,
            "{unit}: exposure {score}, more than {MAX_EXPOSURE}:\n{text}"
        );
        eprintln!("{tag} systemd-analyze security {unit}: {score}");
    }
    Ok(())
}

/// Deletes `path` if it exists.
fn remove_if_there(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.into()),
        _ => Ok(()),
    }
}

/// Starts (or restarts: `verb`) host-policy and waits until it runs and
/// has written its state file (a whole tick: /proc/meminfo read, backends
/// asked). A failure's error holds the unit's journal.
fn start_policy(booted: &Booted, verb: &str) -> anyhow::Result<UnitState> {
    let state_file = booted.path(POLICY_STATE);
    remove_if_there(&state_file)?;
    let before = booted.unit_state(POLICY_UNIT)?.restarts;
    // A failed start is judged by wait_running, journal and all.
    output(booted.command("systemctl").args([verb, POLICY_UNIT]))?;
    booted.wait_running(POLICY_UNIT, before, UNIT_DEADLINE, |_| {
        Ok(state_file.exists())
    })
}

/// Whether the backend of `instance` runs as it should: its control socket
/// answers (the control thread confined itself first) and its main thread
/// logged that it waits for QEMU (after confining itself).
fn backend_ready(booted: &Booted, instance: &str, state: &UnitState) -> anyhow::Result<bool> {
    let answers = backend::connect(&booted.path(&format!("/run/balloon/{instance}.ctl")))
        .and_then(|mut c| Ok(c.status()?))
        .is_ok();
    if !answers {
        return Ok(false);
    }
    let log = booted.run(
        "journalctl",
        &[
            &format!("_PID={}", state.main_pid),
            "-o",
            "cat",
            "--no-pager",
        ],
    )?;
    Ok(log.contains("waiting for a frontend"))
}

/// Starts `balloon-backend@INSTANCE` as the hook would (its directory
/// first) and waits until it is ready.
fn start_backend(booted: &Booted, instance: &str) -> anyhow::Result<UnitState> {
    let unit = format!("balloon-backend@{instance}.service");
    booted.run(
        "install",
        &[
            "-d",
            "-m",
            "2750",
            "-o",
            "balloon",
            "-g",
            "libvirt-qemu",
            &format!("/run/balloon/{instance}"),
        ],
    )?;
    let before = booted.unit_state(&unit)?.restarts;
    output(booted.command("systemctl").args(["start", &unit]))?;
    booted.wait_running(&unit, before, UNIT_DEADLINE, |state| {
        backend_ready(booted, instance, state)
    })
}

/// A sandbox setting that stops a daemon must fail the checks the units
/// pass: each daemon is started with one such setting added in a drop-in
/// (`ProcSubset=pid` hides /proc/meminfo from host-policy; taking
/// `seccomp` from the backend's filter stops it installing its own), and
/// the start check must fail, naming why from the unit's journal.
fn a_sandbox_setting_that_stops_a_daemon_is_caught(
    booted: &Booted,
    tag: &str,
) -> anyhow::Result<()> {
    const BROKEN: &str = "broken";
    let backend = format!("balloon-backend@{BROKEN}.service");
    // (unit, the setting added, what its journal must say)
    let cases = [
        (POLICY_UNIT, "ProcSubset=pid", "/proc/meminfo"),
        (backend.as_str(), "SystemCallFilter=~seccomp", "seccomp"),
    ];
    for (unit, setting, symptom) in cases {
        let dropin_dir = booted.path(&format!("/etc/systemd/system/{unit}.d"));
        std::fs::create_dir_all(&dropin_dir)?;
        std::fs::write(
            dropin_dir.join("package-test-break.conf"),
            format!("[Service]\n{setting}\n"),
        )?;
        booted.systemctl(&["daemon-reload"])?;
        let caught = if unit == POLICY_UNIT {
            start_policy(booted, "start")
        } else {
            start_backend(booted, BROKEN)
        };
        std::fs::remove_dir_all(&dropin_dir)?;
        booted.systemctl(&["daemon-reload"])?;
        booted.systemctl(&["stop", unit])?;
        // Its failure is forgotten (nothing to forget when stop unloaded it).
        output(booted.command("systemctl").args(["reset-failed", unit]))?;
        match caught {
            Ok(_) => anyhow::bail!(
                "{unit} ran with {setting}: the check that a sandbox setting stops a daemon would not catch it"
            ),
            Err(error) => {
                let text = format!("{error:#}");
                let why = text
                    .lines()
                    .find(|l| l.contains(symptom) && !l.contains("systemd["))
                    .map(str::trim)
                    .with_context(|| {
                        format!("{unit} with {setting} failed, but its journal does not name {symptom}: {text}")
                    })?;
                eprintln!("{tag} a sandbox setting that stops a daemon fails the check: {setting} on {unit} -> {why}");
            }
        }
    }
    let dir = booted.path(&format!("/run/balloon/{BROKEN}"));
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

/// The process `pid` of the root: its uid, and whether it runs with no
/// new privileges, no capabilities and a seccomp filter.
fn check_confined(booted: &Booted, pid: u32, balloon: u32) -> anyhow::Result<()> {
    let status = booted.run("cat", &[&format!("/proc/{pid}/status")])?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().next().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    anyhow::ensure!(
        field("Uid") == balloon.to_string()
            && field("NoNewPrivs") == "1"
            && field("Seccomp") == "2"
            && field("CapEff") == "0000000000000000",
        "the backend is not confined as its unit says:\n{status}"
    );
    Ok(())
}

/// Owner, group and permission bits (with setgid) of a path, or why not.
fn expect_file(path: &Path, uid: u32, gid: u32, mode: u32, socket: bool) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    anyhow::ensure!(
        meta.uid() == uid
            && meta.gid() == gid
            && meta.mode() & 0o7777 == mode
            && meta.file_type().is_socket() == socket,
        "{} is {:o} {}:{} (want {mode:o} {uid}:{gid}{})",
        path.display(),
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        if socket { ", a socket" } else { "" }
    );
    Ok(())
}

fn control(booted: &Booted) -> anyhow::Result<ControlClient> {
    backend::connect(&booted.path(&format!("/run/balloon/{DOMAIN}.ctl")))
}

fn hook(booted: &Booted, operation: &str, xml: &str) -> anyhow::Result<()> {
    let out = run_hook(booted.command(HOOK), DOMAIN, operation, xml)?;
    anyhow::ensure!(
        out.status.success(),
        "hook {operation} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn check_backend_guest_and_policy(booted: &Booted, env: &TestEnv, tag: &str) -> anyhow::Result<()> {
    let balloon = account_id(booted, "passwd", "balloon")?;
    let qemu_group = account_id(booted, "group", "libvirt-qemu")?;
    let xml = domain_xml(
        DOMAIN,
        &format!(
            "<metadata><balloon:backend xmlns:balloon='urn:balloon-stack:libvirt:1' max-reclaim-percent='{METADATA_LIMIT_PERCENT}'/></metadata>"
        ),
    );

    // The hook's systemd path: prepare starts the unit through systemctl.
    hook(booted, "prepare", &xml)?;
    let socket = booted.path(&format!("/run/balloon/{DOMAIN}/balloon.sock"));
    let started = booted.wait_running(BACKEND_UNIT, 0, UNIT_DEADLINE, |state| {
        Ok(socket.exists() && backend_ready(booted, DOMAIN, state)?)
    })?;
    expect_file(
        &booted.path("/run/balloon/vm1"),
        balloon,
        qemu_group,
        0o2750,
        false,
    )?;
    expect_file(&socket, balloon, qemu_group, 0o660, true)?;
    expect_file(
        &booted.path("/run/balloon/vm1.ctl"),
        balloon,
        balloon,
        0o600,
        true,
    )?;
    expect_file(
        &booted.path("/run/balloon/vm1/balloon.state"),
        balloon,
        qemu_group,
        0o600,
        false,
    )?;
    check_confined(booted, started.main_pid, balloon)?;
    let mut control_client = control(booted)?;
    let status = control_client.status()?;
    anyhow::ensure!(
        u64::from(status.max_reclaim_percent) == METADATA_LIMIT_PERCENT,
        "the domain's metadata limit did not reach the backend: {status:?}"
    );
    eprintln!(
        "{tag} hook prepare: {BACKEND_UNIT} active (running) through systemctl, pid {} as balloon (NoNewPrivs, seccomp, no capabilities); /run/balloon/vm1 2750 balloon:libvirt-qemu, balloon.sock 0660 balloon:libvirt-qemu, vm1.ctl 0600 balloon, balloon.state 0600; limit {METADATA_LIMIT_PERCENT} % from the domain's metadata",
        started.main_pid
    );

    // A guest's QEMU on the host, on the socket the unit made.
    let config = VmConfig {
        mem_mib: GUEST_MIB,
        prealloc: true,
        balloon: Balloon::VhostUser {
            socket: socket.clone(),
            reconnect_ms: Some(1000),
            migratable: true,
        },
        ..VmConfig::default()
    };
    let mut vm = Vm::boot(env, &config)?;
    control_client.wait_negotiated(TARGET_DEADLINE)?;
    let before = vm.host_resident_bytes()?;
    control_client.set_target(TARGET_MIB * MIB)?;
    control_client.wait_actual(TARGET_MIB * MIB, TARGET_DEADLINE)?;
    let after = vm.host_resident_bytes()?;
    anyhow::ensure!(
        after.saturating_add((TARGET_MIB - 32) * MIB) <= before,
        "host-resident guest RAM fell from {before} to {after} bytes only"
    );
    eprintln!(
        "{tag} a guest's QEMU attached to the unit's backend: {TARGET_MIB} MiB balloon, host-resident guest RAM {} MiB -> {} MiB",
        before / MIB,
        after / MIB
    );

    // SIGKILL: systemd restarts it, QEMU reconnects, the balloon is kept.
    booted.systemctl(&["kill", "--signal=SIGKILL", BACKEND_UNIT])?;
    let restarted = test_support::wait::wait_for_every(
        "systemd to restart the killed backend",
        UNIT_DEADLINE,
        Duration::from_millis(200),
        || {
            let state = booted.unit_state(BACKEND_UNIT)?;
            Ok((state.restarts == started.restarts + 1
                && state.running()
                && state.main_pid != started.main_pid)
                .then_some(state))
        },
    )?;
    let restarted =
        booted.wait_running(BACKEND_UNIT, restarted.restarts, UNIT_DEADLINE, |state| {
            backend_ready(booted, DOMAIN, state)
        })?;
    let mut control_client = control(booted)?;
    let reconnected = test_support::wait::wait_for(
        "QEMU to reconnect to the restarted backend",
        Duration::from_secs(60),
        || {
            let status = control_client.status()?;
            Ok((status.connected && status.config_notify).then_some(status))
        },
    )?;
    anyhow::ensure!(
        reconnected.ballooned_bytes == TARGET_MIB * MIB,
        "the restarted backend lost the balloon: {reconnected:?}"
    );
    control_client.set_target(2 * TARGET_MIB * MIB)?;
    control_client.wait_actual(2 * TARGET_MIB * MIB, TARGET_DEADLINE)?;
    anyhow::ensure!(
        vm.sh("echo alive")? == "alive",
        "the guest stopped answering"
    );
    control_client.set_target(0)?;
    control_client.wait_actual(0, TARGET_DEADLINE)?;
    let killed = booted
        .journal(BACKEND_UNIT)
        .lines()
        .find(|l| l.contains("status=9/KILL"))
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "{tag} SIGKILL: systemd restarted {BACKEND_UNIT} (pid {} -> {}, restarts {}; journal: {killed}); QEMU reconnected, the {TARGET_MIB} MiB balloon was kept, {} MiB and 0 reached after",
        started.main_pid,
        restarted.main_pid,
        restarted.restarts,
        2 * TARGET_MIB
    );

    check_policy(booted, &mut control_client, tag)?;

    // libvirt releases the domain after QEMU ended.
    drop(vm);
    hook(booted, "release", &xml)?;
    test_support::wait::wait_for_every(
        "the hook's release to stop the backend",
        UNIT_DEADLINE,
        Duration::from_millis(200),
        || {
            let state = booted.unit_state(BACKEND_UNIT)?;
            Ok((state.active == "inactive" && state.main_pid == 0).then_some(()))
        },
    )?;
    let left: Vec<String> = [
        "/run/balloon/vm1/balloon.sock",
        "/run/balloon/vm1.ctl",
        "/run/balloon/vm1",
    ]
    .iter()
    .filter(|p| booted.path(p).exists())
    .map(|p| p.to_string())
    .collect();
    anyhow::ensure!(left.is_empty(), "left after the hook's release: {left:?}");
    anyhow::ensure!(
        booted.processes_named("balloon-backend").is_empty(),
        "a balloon-backend process is left after the hook's release"
    );
    eprintln!("{tag} hook release: {BACKEND_UNIT} stopped through systemctl (inactive), its sockets and directory gone");
    Ok(())
}

/// The configuration as installed with `edits` applied (each must match).
fn edited_config(installed: &str, edits: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut text = installed.to_string();
    for (from, to) in edits {
        anyhow::ensure!(
            text.contains(from),
            "the installed host-policy.toml has no {from:?}; update this test:\n{installed}"
        );
        text = text.replacen(from, to, 1);
    }
    Ok(text)
}

/// The VMs host-policy decided on at its last tick (its state file).
fn policy_vms(booted: &Booted) -> anyhow::Result<Vec<String>> {
    let Ok(text) = std::fs::read_to_string(booted.path(POLICY_STATE)) else {
        return Ok(Vec::new());
    };
    let state: serde_json::Value = match serde_json::from_str(&text) {
        Ok(state) => state,
        // Replaced while read: the next poll sees it whole.
        Err(_) => return Ok(Vec::new()),
    };
    Ok(state["decision"]["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|vm| vm["name"].as_str().map(str::to_string))
        .collect())
}

/// The value of `series` (name and labels) in Prometheus' text format.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        // Byte counts: whole numbers, far below 2^53.
        .map(|v| v as u64)
}

/// GET /metrics over host-policy's Unix socket.
fn metrics(path: &Path) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    anyhow::ensure!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "GET /metrics: {}",
        reply.lines().next().unwrap_or_default()
    );
    Ok(reply)
}

fn check_policy(
    booted: &Booted,
    control_client: &mut ControlClient,
    tag: &str,
) -> anyhow::Result<()> {
    // As installed: it runs, reads the host's /proc/meminfo, finds the VM.
    let started = start_policy(booted, "start")?;
    test_support::wait::wait_for_every(
        "host-policy to discover the VM",
        DISCOVERY_DEADLINE,
        Duration::from_millis(500),
        || {
            Ok(policy_vms(booted)?
                .iter()
                .any(|vm| vm == DOMAIN)
                .then_some(()))
        },
    )?;
    let table = booted.run("host-policy", &["status", "--config", POLICY_CONFIG])?;
    anyhow::ensure!(
        table.lines().any(|l| l.starts_with(DOMAIN)),
        "host-policy status does not list {DOMAIN}:\n{table}"
    );
    eprintln!(
        "{tag} {POLICY_UNIT} active (running), pid {}, installed configuration: discovered {DOMAIN}; host-policy status:\n{}",
        started.main_pid,
        table.trim_end()
    );

    // A short host (a meminfo file), one-second ticks, metrics on a Unix
    // socket (read at start-up: a restart) and a 25 % limit.
    let installed = std::fs::read_to_string(booted.path(POLICY_CONFIG))?;
    guest_tests::host_policy_process::write_meminfo(&booted.path(FAKE_MEMINFO), 16384, 1024)?;
    let config = |limit: u64| {
        edited_config(
            &installed,
            &[
                (
                    "meminfo = \"/proc/meminfo\"",
                    &format!("meminfo = {FAKE_MEMINFO:?}"),
                ),
                ("interval_s = 5", "interval_s = 1"),
                (
                    "# [metrics]\n# listen = \"127.0.0.1:9848\"",
                    &format!("[metrics]\nlisten = {POLICY_METRICS:?}"),
                ),
                (
                    "max_reclaim_percent = 65",
                    &format!("max_reclaim_percent = {limit}"),
                ),
            ],
        )
    };
    let guest_ram = GUEST_MIB * MIB;
    std::fs::write(booted.path(POLICY_CONFIG), config(25)?)?;
    let restarted = start_policy(booted, "restart")?;
    // The limit the daemon applies to the VM, from its own metrics.
    let limit_series = format!("balloon_vm_limit_bytes{{vm=\"{DOMAIN}\"}}");
    let applied_limit = |what: &str, fits: &dyn Fn(u64) -> bool| {
        let last = std::cell::RefCell::new(None);
        test_support::wait::wait_for_every(
            what,
            DISCOVERY_DEADLINE,
            Duration::from_millis(500),
            || {
                let limit = metric(&metrics(&booted.path(POLICY_METRICS))?, &limit_series);
                *last.borrow_mut() = limit;
                Ok(limit.filter(|l| fits(*l)))
            },
        )
        .with_context(|| {
            format!(
                "{limit_series} was {:?}; journalctl -u {POLICY_UNIT}:\n{}",
                last.borrow(),
                booted.journal(POLICY_UNIT)
            )
        })
    };
    let limit_25 = applied_limit("host-policy to apply a 25 % limit", &|limit| {
        limit == guest_ram / 4
    })?;

    // The limit changed and reloaded: the same process applies it, and
    // the VM's target keeps within it.
    std::fs::write(booted.path(POLICY_CONFIG), config(10)?)?;
    booted.systemctl(&["reload", POLICY_UNIT])?;
    let limit_10 = applied_limit("host-policy to apply its reloaded 10 % limit", &|limit| {
        limit > 0 && limit <= guest_ram / 10
    })?;
    let after_reload = booted.unit_state(POLICY_UNIT)?;
    anyhow::ensure!(
        after_reload.running()
            && after_reload.main_pid == restarted.main_pid
            && after_reload.restarts == restarted.restarts,
        "systemctl reload restarted host-policy: {after_reload:?} (was {restarted:?})"
    );
    anyhow::ensure!(
        booted
            .journal(POLICY_UNIT)
            .contains("configuration reloaded"),
        "host-policy's journal does not show the reload"
    );
    let target = test_support::wait::wait_for_every(
        "the VM's target to keep within the reloaded limit",
        TARGET_DEADLINE,
        Duration::from_millis(500),
        || {
            let status = control_client.status()?;
            let target = status.target_bytes;
            Ok((target <= limit_10 && status.actual_bytes == target).then_some(target))
        },
    )?;
    eprintln!(
        "{tag} {POLICY_UNIT} restarted with a short host and metrics on {POLICY_METRICS}: limit {} MiB (25 %); systemctl reload with 10 %: limit {} MiB, same pid {}, the VM's balloon {} MiB",
        limit_25 / MIB,
        limit_10 / MIB,
        after_reload.main_pid,
        target / MIB
    );

    // Stop: no process, no socket.
    booted.systemctl(&["stop", POLICY_UNIT])?;
    let stopped = booted.unit_state(POLICY_UNIT)?;
    anyhow::ensure!(
        stopped.active == "inactive" && stopped.main_pid == 0 && stopped.result == "success",
        "systemctl stop: {stopped:?}\n{}",
        booted.journal(POLICY_UNIT)
    );
    let left = booted.processes_named("host-policy");
    anyhow::ensure!(left.is_empty(), "host-policy processes left: {left:?}");
    anyhow::ensure!(
        !booted.path(POLICY_METRICS).exists(),
        "systemctl stop left {POLICY_METRICS}"
    );
    std::fs::write(booted.path(POLICY_CONFIG), &installed)?;
    eprintln!("{tag} systemctl stop {POLICY_UNIT}: inactive, no process and no socket left");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_read_by_its_series() {
        let text = "# TYPE balloon_vm_limit_bytes gauge\n\
                    balloon_vm_limit_bytes{vm=\"vm1\"} 134217728\n\
                    balloon_vm_limit_bytes{vm=\"vm10\"} 1.34217728e8\n";
        assert_eq!(
            metric(text, "balloon_vm_limit_bytes{vm=\"vm1\"}"),
            Some(134_217_728)
        );
        assert_eq!(
            metric(text, "balloon_vm_limit_bytes{vm=\"vm10\"}"),
            Some(134_217_728)
        );
        assert_eq!(metric(text, "balloon_vm_limit_bytes{vm=\"vm2\"}"), None);
    }
}
