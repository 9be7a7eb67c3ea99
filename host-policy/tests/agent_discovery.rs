//! The daemon finds a VM's guest agent where libvirt makes the host end of
//! the agent's channel, with no `agent =`: a discovered VM whose channel
//! appears while the daemon runs gets its agent at the next tick, and the
//! agent's reports reach the state file (what `host-policy status` and
//! balloonctl read).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use balloon_protocol::agent::{
    FromAgent, MemInfo, Report, ReportReason, VmStat, DEFAULT_PORT_NAME,
};
use host_policy::daemon::Daemon;
use host_policy_config::{Config, StateFile};
use test_support::{Harness, GUEST_RAM_BYTES, MIB};

/// A guest agent at `socket` that says hello with `page_cache_mib` of page
/// cache, then reads (and ignores) whatever the host sends until it hangs
/// up.
fn serve_agent(socket: &Path, page_cache_mib: u64) {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut out = stream.try_clone().unwrap();
        let hello = FromAgent::Report(Report {
            v: 1,
            reason: ReportReason::Hello,
            seq: 1,
            meminfo: MemInfo {
                total_bytes: GUEST_RAM_BYTES,
                free_bytes: 2 * MIB,
                available_bytes: 40 * MIB,
                page_cache_bytes: page_cache_mib * MIB,
                shmem_bytes: 0,
            },
            vmstat: VmStat::default(),
            psi: None,
            cgroup: None,
        });
        let mut line = hello.to_line().unwrap();
        line.push(b'\n');
        if out.write_all(&line).is_err() {
            return;
        }
        for line in BufReader::new(stream).lines() {
            if line.is_err() {
                return;
            }
        }
    });
}

/// Ticks until the state file has an agent report for `vm`, or `timeout`.
fn tick_until_reported(daemon: &mut Daemon, state: &Path, vm: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        daemon.tick().unwrap();
        if StateFile::read(state).is_some_and(|s| s.agents.contains_key(vm)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_discovered_vm_gets_the_agent_libvirt_made_a_channel_for() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Harness::start(&test_support::workspace_binary("balloon-backend"), &[]);
    let _answers = vm.answer_config_changes();
    // The backend's control socket where the libvirt hook puts it.
    let runtime = dir.path().join("balloon");
    std::fs::create_dir(&runtime).unwrap();
    std::os::unix::fs::symlink(vm.dir.path().join("control.sock"), runtime.join("web1.ctl"))
        .unwrap();
    // Both of libvirt's layouts, newest first, as the default roots are.
    let new_root = dir.path().join("run-libvirt-qemu-channel");
    let old_root = dir.path().join("var-lib-libvirt-qemu-channel-target");
    std::fs::create_dir(&new_root).unwrap();
    std::fs::create_dir(&old_root).unwrap();
    let meminfo = dir.path().join("meminfo");
    std::fs::write(
        &meminfo,
        "MemTotal: 1048576 kB\nMemFree: 0 kB\nMemAvailable: 524288 kB\n",
    )
    .unwrap();
    let state = dir.path().join("state.json");
    let path = dir.path().join("host-policy.toml");
    std::fs::write(
        &path,
        format!(
            "[host]\nmeminfo = {meminfo:?}\nstate_file = {state:?}\nlibvirt_channel_dirs = [{new_root:?}, {old_root:?}]\n\
             [defaults]\nmin_free_mib = 4\nmin_free_percent = 0\n[discover]\ndirectory = {runtime:?}\n"
        ),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let mut daemon = Daemon::new(config, false);

    // The domain runs without the channel: managed, without an agent.
    std::fs::create_dir(new_root.join("domain-12-other")).unwrap();
    for _ in 0..3 {
        daemon.tick().unwrap();
    }
    let read = StateFile::read(&state).expect("a state file");
    assert!(read.agents.is_empty(), "{:?}", read.agents);
    assert!(
        !read
            .errors
            .get("web1")
            .is_some_and(|e| e.keys().any(|k| k.starts_with("agent"))),
        "{:?}",
        read.errors
    );

    // libvirt (before 9.7) makes the channel when the domain starts with
    // it: the next ticks find and read the agent.
    let channel = old_root.join("domain-7-web1");
    std::fs::create_dir(&channel).unwrap();
    serve_agent(&channel.join(DEFAULT_PORT_NAME), 24);
    assert!(
        tick_until_reported(&mut daemon, &state, "web1", Duration::from_secs(10)),
        "no agent report for web1 in {}",
        std::fs::read_to_string(&state).unwrap_or_default()
    );
    let read = StateFile::read(&state).unwrap();
    assert_eq!(read.agents["web1"].meminfo.page_cache_bytes, 24 * MIB);
    assert_eq!(read.decision.vms.len(), 1);
    assert_eq!(read.decision.vms[0].name, "web1");
}
