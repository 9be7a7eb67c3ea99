//! The daemon against real balloon-backend processes (each driven by the
//! in-process vhost-user frontend), with host memory read from a file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use balloon_policy::policy::HostMode;
use host_policy::daemon::Daemon;
use host_policy_config::Config;
use test_support::{Harness, GUEST_RAM_BYTES, MIB};

/// The balloon-backend binary built next to this test (same profile).
fn backend_binary() -> PathBuf {
    test_support::workspace_binary("balloon-backend")
}

/// Guest statistics: available memory (2 MiB of it free, the rest page
/// cache), allocation stalls. With little free memory, a balloon returns
/// memory from its first page (the fake guest never touches its RAM, so
/// its free memory is not on the host: host-policy sees that in the
/// backend's `guest_ram_resident_bytes`).
fn stats(available_mib: u64, stalls: u64) -> Vec<(u16, u64)> {
    stats_with_free(available_mib, available_mib.min(2), stalls)
}

fn stats_with_free(available_mib: u64, free_mib: u64, stalls: u64) -> Vec<(u16, u64)> {
    vec![
        (4, free_mib * MIB),
        (5, GUEST_RAM_BYTES),
        (6, available_mib * MIB),
        (11, stalls),
    ]
}

fn write_host(path: &Path, total_mib: u64, available_mib: u64) {
    std::fs::write(
        path,
        format!(
            "MemTotal: {} kB\nMemFree: 0 kB\nMemAvailable: {} kB\n",
            total_mib * 1024,
            available_mib * 1024
        ),
    )
    .unwrap();
}

struct Setup {
    dir: tempfile::TempDir,
    vms: Vec<Harness>,
    meminfo: PathBuf,
}

fn setup(count: usize, extra_config: &str) -> (Setup, Config) {
    setup_with(count, "", extra_config, |_| String::new())
}

/// `setup` with more `[host]` lines and more lines for each `[[vm]]`.
fn setup_with(
    count: usize,
    host_config: &str,
    extra_config: &str,
    vm_lines: impl Fn(usize) -> String,
) -> (Setup, Config) {
    let dir = tempfile::tempdir().unwrap();
    let meminfo = dir.path().join("meminfo");
    write_host(&meminfo, 1024, 512);
    let vms: Vec<Harness> = (0..count)
        .map(|_| Harness::start(&backend_binary(), &[]))
        .collect();
    let mut text = format!(
        "[host]\nmeminfo = {:?}\nstate_file = {:?}\n{host_config}\n\n[defaults]\nmin_free_mib = 4\nmin_free_percent = 0\ninflate_step_mib = 8\nhard_inflate_step_mib = 16\ndeflate_step_mib = 16\nmin_change_mib = 0\n{extra_config}\n",
        meminfo,
        dir.path().join("state.json"),
    );
    for (i, vm) in vms.iter().enumerate() {
        text.push_str(&format!(
            "\n[[vm]]\nname = \"vm{i}\"\ncontrol = {:?}\n{}",
            vm.dir.path().join("control.sock"),
            vm_lines(i)
        ));
    }
    let path = dir.path().join("host-policy.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    (Setup { dir, vms, meminfo }, config)
}

#[test]
fn host_pressure_inflates_idle_guests_and_relief_gives_it_back() {
    let (mut s, config) = setup(2, "");
    let _answers: Vec<_> = s.vms.iter().map(|vm| vm.answer_config_changes()).collect();
    // Floor 4 MiB plus an 8 MiB margin: 28 and 4 MiB of idle memory.
    s.vms[0].send_stats(&stats(40, 0));
    s.vms[1].send_stats(&stats(16, 0));
    let mut daemon = Daemon::new(config, false);

    // Host at 15 % available: reclaim, more from the idler guest (after a
    // tick in which host-policy first sees them).
    write_host(&s.meminfo, 1024, 150);
    daemon.tick().unwrap();
    let decision = daemon.tick().unwrap();
    assert_eq!(decision.mode, HostMode::Reclaim);
    let t0 = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    let t1 = s.vms[1].status()["target_bytes"].as_u64().unwrap();
    assert!(t0 > t1 && t1 > 0, "idle guest gives more: {t0} vs {t1}");
    // 14.6 % available is 54 % of the way from reclaim (20 %) to hard
    // (10 %): so is the step, from inflate_step_mib (8) to
    // hard_inflate_step_mib (16).
    let depth = (20.0 - 150.0 * 100.0 / 1024.0) / 10.0;
    let step = 8 * MIB + (8.0 * MIB as f64 * depth) as u64;
    assert!(
        t0 <= step && t0 > 0,
        "one inflate step per tick: {t0} of {step}"
    );
    assert!(
        decision.vms[0].reason.contains("idle guest memory"),
        "{}",
        decision.vms[0].reason
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["decision"]["vms"][0]["target_bytes"], t0);

    // Keep reclaiming: never past a VM's limit (65 % of 48 MiB).
    for _ in 0..20 {
        daemon.tick().unwrap();
    }
    let limit = s.vms[0].status()["max_reclaim_bytes"].as_u64().unwrap();
    let big = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    assert!(big <= limit && big > t0, "{big} within {limit}");

    // Relief: 60 % available, above give-back at 35 %: targets come down.
    write_host(&s.meminfo, 1024, 614);
    let decision = daemon.tick().unwrap();
    assert_eq!(decision.mode, HostMode::Normal);
    let after = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    assert!(after < big, "gave back: {big} -> {after}");
    assert!(
        decision.vms[0].reason.contains("give-back"),
        "{}",
        decision.vms[0].reason
    );
    for _ in 0..20 {
        daemon.tick().unwrap();
    }
    assert_eq!(s.vms[0].status()["target_bytes"], 0);
}

#[test]
fn host_psi_reclaims_from_a_host_with_memory_and_holds_give_back() {
    let (mut s, _) = setup(1, "");
    let psi = s.dir.path().join("pressure");
    let write_psi = |some: f64| {
        std::fs::write(
            &psi,
            format!("some avg10={some:.2} avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"),
        )
        .unwrap()
    };
    write_psi(0.0);
    let path = s.dir.path().join("host-policy.toml");
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[host]\n",
        &format!("[host]\npressure = {psi:?}\npsi_some_avg10 = 5\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let _answers: Vec<_> = s.vms.iter().map(|vm| vm.answer_config_changes()).collect();
    s.vms[0].send_stats(&stats(40, 0));
    let mut daemon = Daemon::new(config, false);
    // 30 % available: inside the dead band, nothing to do by memory.
    write_host(&s.meminfo, 1024, 307);
    daemon.tick().unwrap();
    let quiet = daemon.tick().unwrap();
    assert_eq!(quiet.mode, HostMode::Normal);
    assert_eq!(s.vms[0].status()["target_bytes"], 0);
    // The host stalls (PSI at its threshold of 5 %): reclaim anyway.
    write_psi(6.5);
    let decision = daemon.tick().unwrap();
    assert_eq!(decision.mode, HostMode::Reclaim);
    assert!(
        decision.vms[0]
            .reason
            .contains("host PSI memory some avg10 6.5%"),
        "{}",
        decision.vms[0].reason
    );
    let taken = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    assert!(taken > 0 && taken <= 8 * MIB, "one inflate step: {taken}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["host"]["psi_some_avg10"], 6.5, "{state}");
    assert_eq!(state["host"]["source"], "meminfo", "{state}");
    // Twice the threshold: hard.
    write_psi(10.0);
    assert_eq!(daemon.tick().unwrap().mode, HostMode::Hard);
    let held = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    assert!(held > taken, "{held} after {taken}");
    // Plenty of memory, but the PSI still at half the threshold: nothing
    // goes back; once it is quiet, it does.
    write_host(&s.meminfo, 1024, 700);
    write_psi(2.5);
    let decision = daemon.tick().unwrap();
    assert_eq!(decision.mode, HostMode::Normal);
    assert_eq!(s.vms[0].status()["target_bytes"], held, "{decision:?}");
    write_psi(0.0);
    daemon.tick().unwrap();
    let after = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    assert!(after < held, "gave back: {held} -> {after}");
}

#[test]
fn guest_pressure_deflates_and_stale_statistics_never_inflate() {
    let (mut s, config) = setup(2, "pressure_cooldown_s = 3600");
    let _answers: Vec<_> = s.vms.iter().map(|vm| vm.answer_config_changes()).collect();
    s.vms[0].send_stats(&stats(40, 0));
    // vms[1] never sends statistics.
    let mut daemon = Daemon::new(config, false);
    // 16.6 % available: short, but not so near the hard threshold (10 %)
    // that a guest whose working set fits would wait.
    write_host(&s.meminfo, 1024, 170);
    for _ in 0..4 {
        daemon.tick().unwrap();
    }
    let before = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    assert!(before >= 16 * MIB, "{before}");
    assert_eq!(
        s.vms[1].status()["target_bytes"],
        0,
        "no statistics, no inflation"
    );

    // Allocation stalls in the guest: deflate at once, then hold. A tick
    // decides on the status it asked for when the tick before ended, so
    // the stalls count from the second tick after they were sent.
    s.vms[0].send_stats(&stats(30, 7));
    daemon.tick().unwrap();
    let before = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    let decision = daemon.tick().unwrap();
    let after = s.vms[0].status()["target_bytes"].as_u64().unwrap();
    assert_eq!(after, before.saturating_sub(16 * MIB));
    assert!(
        decision.vms[0]
            .reason
            .contains("allocation stalls rose by 7"),
        "{}",
        decision.vms[0].reason
    );
    let decision = daemon.tick().unwrap();
    assert_eq!(s.vms[0].status()["target_bytes"], after);
    assert!(
        decision.vms[0].reason.contains("cooling down"),
        "{}",
        decision.vms[0].reason
    );
    assert!(
        decision.vms[1].reason.contains("stale"),
        "{}",
        decision.vms[1].reason
    );
}

#[test]
fn dry_run_decides_without_applying_and_missing_backends_are_skipped() {
    let (mut s, config) = setup(2, "");
    s.vms[0].send_stats(&stats(40, 0));
    s.vms[1].send_stats(&stats(40, 0));
    write_host(&s.meminfo, 1024, 150);
    let mut daemon = Daemon::new(config.clone(), true);
    daemon.tick().unwrap();
    let decision = daemon.tick().unwrap();
    assert!(decision.vms[0].target_bytes > 0);
    assert_eq!(
        s.vms[0].status()["target_bytes"],
        0,
        "dry run applied a target"
    );

    // One backend disappears: the daemon keeps managing the other.
    let _answer = s.vms[0].answer_config_changes();
    s.vms.truncate(1);
    let mut daemon = Daemon::new(config, false);
    daemon.tick().unwrap();
    let decision = daemon.tick().unwrap();
    assert_eq!(decision.vms.len(), 1);
    assert!(s.vms[0].status()["target_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn control_sockets_in_a_directory_are_discovered() {
    let (mut s, _) = setup(1, "");
    let _answer = s.vms[0].answer_config_changes();
    s.vms[0].send_stats(&stats(40, 0));
    let sockets = s.dir.path().join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    std::os::unix::fs::symlink(
        s.vms[0].dir.path().join("control.sock"),
        sockets.join("web.ctl"),
    )
    .unwrap();
    // Not VMs: a regular file with the suffix, a socket whose name has a
    // space, and a file without the suffix.
    std::fs::write(sockets.join("notes.ctl"), "keep").unwrap();
    std::os::unix::fs::symlink(
        s.vms[0].dir.path().join("control.sock"),
        sockets.join("my vm.ctl"),
    )
    .unwrap();
    std::fs::write(sockets.join("readme.txt"), "").unwrap();
    let path = s.dir.path().join("discover.toml");
    std::fs::write(
        &path,
        format!(
            "[host]\nmeminfo = {:?}\n[defaults]\nmin_free_mib = 4\nmin_free_percent = 0\n[discover]\ndirectory = {:?}\n",
            s.meminfo, sockets
        ),
    )
    .unwrap();
    write_host(&s.meminfo, 1024, 150);
    let config = Config::load(&path).unwrap();
    let (found, skipped) = host_policy_config::discovered_vms(&config);
    let names: Vec<&str> = found.iter().map(|vm| vm.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    let skipped: Vec<String> = skipped
        .iter()
        .map(|(path, reason)| format!("{}: {reason}", path.file_name().unwrap().to_string_lossy()))
        .collect();
    assert_eq!(
        skipped,
        [
            "my vm.ctl: vm name \"my vm\" must be non-empty without spaces",
            "notes.ctl: not a socket"
        ]
    );
    let mut daemon = Daemon::new(config, false);
    daemon.tick().unwrap();
    let decision = daemon.tick().unwrap();
    assert_eq!(decision.vms.len(), 1);
    assert_eq!(decision.vms[0].name, "web");
    assert!(s.vms[0].status()["target_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        std::fs::read_to_string(sockets.join("notes.ctl")).unwrap(),
        "keep"
    );
}

#[test]
fn a_pinned_target_is_held_until_unpinned() {
    let (mut s, config) = setup(2, "");
    let _answers: Vec<_> = s.vms.iter().map(|vm| vm.answer_config_changes()).collect();
    s.vms[0].send_stats(&stats(40, 0));
    s.vms[1].send_stats(&stats(40, 0));
    let socket = s.vms[0].dir.path().join("control.sock");
    let control = || {
        balloon_protocol::control::ControlClient::connect(
            &socket,
            std::time::Duration::from_secs(5),
        )
        .unwrap()
    };
    control().pin_target(4 * MIB).unwrap();
    let mut daemon = Daemon::new(config, false);
    write_host(&s.meminfo, 1024, 150);
    for _ in 0..4 {
        let decision = daemon.tick().unwrap();
        assert_eq!(decision.vms[0].cause, balloon_policy::policy::Cause::Pinned);
        assert!(
            decision.vms[0].reason.contains("balloonctl unpin vm0"),
            "{}",
            decision.vms[0].reason
        );
    }
    assert_eq!(s.vms[0].status()["target_bytes"], 4 * MIB);
    assert!(s.vms[1].status()["target_bytes"].as_u64().unwrap() > 4 * MIB);
    assert_eq!(
        daemon
            .errors()
            .get("vm0")
            .and_then(|e| e.get("backend_refusals")),
        None,
        "host-policy sent a pinned VM a target"
    );

    // Unpinned, the host's shortage moves it again (the tick after next
    // sees the status asked for when the next one ends).
    control().unpin().unwrap();
    for _ in 0..3 {
        daemon.tick().unwrap();
    }
    assert!(s.vms[0].status()["target_bytes"].as_u64().unwrap() > 4 * MIB);
}

/// A guest agent that reports `page_cache_mib` of page cache and answers
/// every reclaim; the bytes each reclaim asked for come out of the channel.
fn fake_agent(path: &Path, page_cache_mib: u64) -> std::sync::mpsc::Receiver<u64> {
    use balloon_protocol::agent::{
        FromAgent, MemInfo, ReclaimOutcome, Reply, Report, ReportReason, VmStat,
    };
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    let (asked, asks) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut out = stream.try_clone().unwrap();
        let report = FromAgent::Report(Report {
            v: 1,
            reason: ReportReason::Hello,
            seq: 1,
            meminfo: MemInfo {
                total_bytes: GUEST_RAM_BYTES,
                free_bytes: 2 * MIB,
                available_bytes: 10 * MIB,
                page_cache_bytes: page_cache_mib * MIB,
                shmem_bytes: 0,
            },
            vmstat: VmStat::default(),
            psi: None,
            cgroup: None,
        });
        out.write_all(&report.to_line().unwrap()).unwrap();
        out.write_all(b"\n").unwrap();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let command: serde_json::Value = serde_json::from_str(&line).unwrap();
            let (Some(id), Some(bytes)) = (command["id"].as_u64(), command["bytes"].as_u64())
            else {
                continue;
            };
            if asked.send(bytes).is_err() {
                return;
            }
            let reply = FromAgent::Reply(Reply::reclaimed(
                id,
                ReclaimOutcome {
                    method: "memory.reclaim".into(),
                    requested_bytes: bytes,
                    page_cache_before_bytes: page_cache_mib * MIB,
                    page_cache_after_bytes: page_cache_mib * MIB - bytes,
                    reclaimed_bytes: bytes,
                },
            ));
            out.write_all(&reply.to_line().unwrap()).unwrap();
            out.write_all(b"\n").unwrap();
        }
    });
    asks
}

/// Ticks for `seconds`; the reclaim the agent was asked for, if any.
fn tick_for_reclaim(
    daemon: &mut Daemon,
    asks: &std::sync::mpsc::Receiver<u64>,
    seconds: u64,
) -> Option<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        daemon.tick().unwrap();
        if let Ok(bytes) = asks.recv_timeout(std::time::Duration::from_millis(200)) {
            return Some(bytes);
        }
    }
    None
}

#[test]
fn while_the_host_reclaims_the_guest_agent_drops_cache_first() {
    let agents = tempfile::tempdir().unwrap();
    let agent = |i: usize| agents.path().join(format!("agent-{i}.sock"));
    let asks = fake_agent(&agent(0), 24);
    let (mut s, config) = setup_with(1, "", "", |i| format!("agent = {:?}\n", agent(i)));
    let _answers: Vec<_> = s.vms.iter().map(|vm| vm.answer_config_changes()).collect();
    // 40 MiB available, 4 MiB of it free. If the host does not hold that
    // free memory (the guest reports free pages, and the backend's resident
    // size says so), the policy asks the agent to drop page cache instead
    // of ballooning; if it does, the daemon asks the agent to drop the
    // cache the balloon would otherwise take (what free memory does not
    // cover) before the balloon inflates. Either way the agent goes first.
    s.vms[0].send_stats(&stats_with_free(40, 4, 0));
    let mut daemon = Daemon::new(config, false);

    // A host with memory to spare (inside the dead band): the cache is
    // left alone.
    write_host(&s.meminfo, 1024, 300);
    assert_eq!(tick_for_reclaim(&mut daemon, &asks, 3), None);
    // The host reclaims: the balloon holds while the agent is asked for
    // page cache, at most what it has (24 MiB).
    write_host(&s.meminfo, 1024, 150);
    let bytes = tick_for_reclaim(&mut daemon, &asks, 10).expect("a cache reclaim");
    assert!(bytes > 0 && bytes <= 24 * MIB, "{bytes}");
    assert_eq!(s.vms[0].status()["target_bytes"], 0);
}

#[test]
fn the_peer_policies_never_ask_an_agent_to_drop_cache() {
    let agents = tempfile::tempdir().unwrap();
    let agent = |i: usize| agents.path().join(format!("agent-{i}.sock"));
    let asks = fake_agent(&agent(0), 24);
    let (mut s, config) = setup_with(1, "policy = \"mom\"", "", |i| {
        format!("agent = {:?}\n", agent(i))
    });
    let _answers: Vec<_> = s.vms.iter().map(|vm| vm.answer_config_changes()).collect();
    // Nothing free: MOM does not inflate either (which would ask the agent
    // to reclaim before inflating, as for every policy).
    s.vms[0].send_stats(&stats(0, 0));
    let mut daemon = Daemon::new(config, false);
    write_host(&s.meminfo, 1024, 50);
    assert_eq!(tick_for_reclaim(&mut daemon, &asks, 3), None);
}
