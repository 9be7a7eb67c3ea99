//! balloonctl against real balloon-backend processes (each driven by the
//! in-process vhost-user frontend): the table, status, pinned targets,
//! errors and their exit codes, the watch view in a real terminal (tmux),
//! completions and the man page.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use balloon_protocol::control::ControlClient;
use test_support::wait::wait_for;
use test_support::{Harness, GUEST_RAM_BYTES, MIB};

fn backend_binary() -> PathBuf {
    test_support::workspace_binary("balloon-backend")
}

/// Two backends, `vm-a` (managed by host-policy's configuration) and
/// `vm-b`, and `gone`, a socket nobody listens on, in a runtime directory.
struct Host {
    dir: tempfile::TempDir,
    vms: Vec<Harness>,
}

impl Host {
    fn start() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).unwrap();
        let vms: Vec<Harness> = (0..2)
            .map(|_| Harness::start(&backend_binary(), &[]))
            .collect();
        for (name, vm) in ["vm-a", "vm-b"].iter().zip(&vms) {
            std::os::unix::fs::symlink(
                vm.dir.path().join("control.sock"),
                runtime.join(format!("{name}.ctl")),
            )
            .unwrap();
        }
        drop(std::os::unix::net::UnixListener::bind(runtime.join("gone.ctl")).unwrap());
        std::fs::write(
            dir.path().join("host-policy.toml"),
            format!(
                "[host]\nmeminfo = \"/proc/meminfo\"\n\n[[vm]]\nname = \"vm-a\"\ncontrol = {:?}\n",
                runtime.join("vm-a.ctl")
            ),
        )
        .unwrap();
        Host { dir, vms }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_balloonctl"));
        command
            .arg("--runtime-dir")
            .arg(self.dir.path().join("run"))
            .arg("--config")
            .arg(self.dir.path().join("host-policy.toml"));
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn control(&self, vm: usize) -> ControlClient {
        ControlClient::connect(
            &self.vms[vm].dir.path().join("control.sock"),
            Duration::from_secs(5),
        )
        .unwrap()
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[test]
fn list_shows_every_vm_and_who_sets_its_target() {
    let host = Host::start();
    let output = host.run(&["list"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let table = stdout(&output);
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{table}"))
            .to_string()
    };
    assert!(table.lines().next().unwrap().starts_with("VM "), "{table}");
    let ram = format!("{} MiB", GUEST_RAM_BYTES / MIB);
    assert!(
        line("vm-a").contains(&ram) && line("vm-a").contains("host-policy"),
        "{table}"
    );
    assert!(
        line("vm-b").contains(&ram) && line("vm-b").contains("manual"),
        "{table}"
    );
    assert!(line("gone").contains("unreachable"), "{table}");
}

/// The JSON of host-policy's state file, written now, with a guest-agent
/// report for each VM of `agents`.
fn state_with_agents(agents: &[&str]) -> String {
    use balloon_protocol::agent::{MemInfo, Report, ReportReason, VmStat};
    let report = Report {
        v: 1,
        reason: ReportReason::Hello,
        seq: 1,
        meminfo: MemInfo {
            total_bytes: GUEST_RAM_BYTES,
            free_bytes: 2 * MIB,
            available_bytes: 10 * MIB,
            page_cache_bytes: 8 * MIB,
            shmem_bytes: 0,
        },
        vmstat: VmStat::default(),
        psi: None,
        cgroup: None,
    };
    let unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let agents: serde_json::Map<String, serde_json::Value> = agents
        .iter()
        .map(|name| (name.to_string(), serde_json::to_value(&report).unwrap()))
        .collect();
    serde_json::json!({
        "unix_s": unix_s,
        "dry_run": false,
        "decision": {
            "mode": "normal",
            "host_available_percent": 50.0,
            "vms": [],
            "memory": {"mode": "normal", "vms": {}},
        },
        "agents": agents,
    })
    .to_string()
}

#[test]
fn an_agent_found_in_libvirts_channel_shows_in_list_and_status() {
    let host = Host::start();
    // libvirt's host end of vm-a's channel (libvirt 9.7 and later's
    // layout); vm-a's [[vm]] names no agent.
    let channels = host.dir.path().join("channel");
    std::fs::create_dir_all(channels.join("3-vm-a")).unwrap();
    let _agent =
        std::os::unix::net::UnixListener::bind(channels.join("3-vm-a/org.balloon.agent.0"))
            .unwrap();
    let state = host.dir.path().join("state.json");
    std::fs::write(
        host.dir.path().join("host-policy.toml"),
        format!(
            "[host]\nmeminfo = \"/proc/meminfo\"\nstate_file = {state:?}\nlibvirt_channel_dirs = [{channels:?}]\n\n[[vm]]\nname = \"vm-a\"\ncontrol = {:?}\n",
            host.dir.path().join("run/vm-a.ctl")
        ),
    )
    .unwrap();
    let agent_of = |name: &str| {
        let table = stdout(&host.run(&["list"]));
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{table}"))
            .to_string();
        let status = host.run(&["status", name, "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        (line, json["agent"].as_str().unwrap_or_default().to_string())
    };

    // No state yet: unknown; vm-b has no agent at all.
    assert_eq!(agent_of("vm-a").1, "?");
    assert_eq!(agent_of("vm-b").1, "-");
    std::fs::write(&state, state_with_agents(&[])).unwrap();
    let (line, agent) = agent_of("vm-a");
    assert_eq!(agent, "silent", "{line}");
    assert!(line.contains(" silent "), "{line}");
    std::fs::write(&state, state_with_agents(&["vm-a"])).unwrap();
    let (line, agent) = agent_of("vm-a");
    assert_eq!(agent, "reporting", "{line}");
    assert!(line.contains(" reporting "), "{line}");
    let text = stdout(&host.run(&["status", "vm-a"]));
    assert!(
        text.lines()
            .any(|l| l.starts_with("guest agent") && l.ends_with("reporting")),
        "{text}"
    );
    assert_eq!(agent_of("vm-b").1, "-");
}

#[test]
fn set_pins_the_target_against_host_policy_until_unpin() {
    let host = Host::start();
    let _answers: Vec<_> = host
        .vms
        .iter()
        .map(|vm| vm.answer_config_changes())
        .collect();
    let output = host.run(&["set", "vm-a", "25%", "--no-wait"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let quarter = GUEST_RAM_BYTES / 4;
    let said = stdout(&output);
    assert!(
        said.contains(&format!("granted {} MiB", quarter / MIB)),
        "{said}"
    );
    assert!(
        said.contains("host-policy holds this target until `balloonctl unpin vm-a`"),
        "{said}"
    );

    let status = host.run(&["status", "vm-a", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["backend"]["target_bytes"], quarter);
    assert_eq!(json["backend"]["pinned"], true);
    assert_eq!(json["target_by"], "pinned");

    // What host-policy sends is refused while the pin holds.
    let refused = host.control(0).set_target(0).unwrap_err().to_string();
    assert!(refused.contains("pinned by an operator"), "{refused}");
    assert_eq!(host.control(0).status().unwrap().target_bytes, quarter);

    // Beyond the VM's limit: clamped, and said so.
    let output = host.run(&["set", "vm-a", "90%", "--no-wait"]);
    assert!(
        stdout(&output).contains("clamped to the VM's limit of 65 %"),
        "{}",
        stdout(&output)
    );

    let output = host.run(&["unpin", "vm-a"]);
    assert!(
        stdout(&output).contains("unpinned; host-policy sets its target again"),
        "{}",
        stdout(&output)
    );
    host.control(0).set_target(0).unwrap();
    assert!(!host.control(0).status().unwrap().pinned);
    let output = host.run(&["unpin", "vm-a"]);
    assert!(
        stdout(&output).contains("was not pinned"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn errors_name_the_problem_and_have_their_exit_codes() {
    let host = Host::start();
    let check = |args: &[&str], code: i32, says: &str| {
        let output = host.run(args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(says),
            "{args:?}: {}",
            stderr(&output)
        );
    };
    check(&["status", "nosuch"], 3, "no VM named \"nosuch\"");
    check(&["set", "vm-a", "12"], 2, "expected a size such as 512M");
    check(&["set", "vm-a", "1G", "--timeout", "0"], 2, "--timeout");
    check(&["status", "gone"], 4, "cannot reach its backend");
    // The in-process frontend never inflates: actual stays at 0.
    let _answers: Vec<_> = host
        .vms
        .iter()
        .map(|vm| vm.answer_config_changes())
        .collect();
    check(
        &["set", "vm-b", "8M", "--timeout", "1"],
        6,
        "reached 0 of 8 MiB within 1 s",
    );
    let missing = Command::new(env!("CARGO_BIN_EXE_balloonctl"))
        .arg("--config")
        .arg(host.dir.path().join("missing.toml"))
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("--config"),
        "{}",
        stderr(&missing)
    );

    // Another user: the backends' sockets are root's alone.
    if rustix::process::geteuid().is_root() {
        std::fs::set_permissions(
            host.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(
            host.dir.path().join("run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(
            host.dir.path().join("host-policy.toml"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        // A checkout under a private directory is out of nobody's reach:
        // run a link or copy of the binary from the test's own directory.
        let binary = host.dir.path().join("balloonctl");
        if std::fs::hard_link(env!("CARGO_BIN_EXE_balloonctl"), &binary).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_balloonctl"), &binary).unwrap();
        }
        let output = wait_for(
            "balloonctl to start as nobody",
            Duration::from_secs(10),
            || {
                let mut command = Command::new(&binary);
                command
                    .arg("--runtime-dir")
                    .arg(host.dir.path().join("run"))
                    .arg("--config")
                    .arg(host.dir.path().join("host-policy.toml"))
                    .args(["status", "vm-a"])
                    .uid(65534)
                    .gid(65534);
                match command.output() {
                    Ok(output) => Ok(Some(output)),
                    // A copy's write descriptor, inherited by a process another
                    // test forked meanwhile, makes exec fail for a moment.
                    Err(error)
                        if error.raw_os_error()
                            == Some(rustix::io::Errno::TXTBSY.raw_os_error()) =>
                    {
                        Ok(None)
                    }
                    Err(error) => Err(error.into()),
                }
            },
        )
        .unwrap();
        assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("permission denied"),
            "{}",
            stderr(&output)
        );
    } else {
        eprintln!("not root: the other-user case is checked only as root (as CI runs)");
    }
}

fn tmux(args: &[&str]) -> Output {
    Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (Debian's tmux package) runs")
}

#[test]
fn watch_redraws_in_a_terminal_and_quits_on_q() {
    let host = Host::start();
    let session = format!("balloonctl-watch-{}", std::process::id());
    let line = format!(
        "{} --runtime-dir {} --config {} watch",
        env!("CARGO_BIN_EXE_balloonctl"),
        host.dir.path().join("run").display(),
        host.dir.path().join("host-policy.toml").display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "40",
        &line,
    ]);
    assert!(started.status.success(), "{}", stderr(&started));
    let screen = wait_for("the watch view", Duration::from_secs(20), || {
        let pane = stdout(&tmux(&["capture-pane", "-p", "-t", &session]));
        Ok(
            (pane.contains("q quits") && pane.contains("vm-a") && pane.contains("vm-b"))
                .then_some(pane),
        )
    })
    .unwrap();
    assert!(screen.contains("TARGET BY"), "{screen}");
    // A new target shows on a later redraw.
    let _answers: Vec<_> = host
        .vms
        .iter()
        .map(|vm| vm.answer_config_changes())
        .collect();
    host.control(1).set_target(8 * MIB).unwrap();
    wait_for("the new target on screen", Duration::from_secs(20), || {
        let pane = stdout(&tmux(&["capture-pane", "-p", "-t", &session]));
        Ok(pane
            .lines()
            .any(|l| l.starts_with("vm-b ") && l.contains("8 MiB"))
            .then_some(()))
    })
    .unwrap();
    assert!(tmux(&["send-keys", "-t", &session, "q"]).status.success());
    wait_for("watch to quit", Duration::from_secs(20), || {
        Ok((!tmux(&["has-session", "-t", &session]).status.success()).then_some(()))
    })
    .unwrap();
}

#[test]
fn completions_and_the_man_page() {
    let host = Host::start();
    let bash = host.run(&["completions", "bash"]);
    assert!(stdout(&bash).contains("_balloonctl()"), "{}", stdout(&bash));
    let man = host.run(&["man"]);
    assert!(stdout(&man).contains(".TH balloonctl"), "{}", stdout(&man));
    assert!(stdout(&man).contains("unpin"), "{}", stdout(&man));
}
