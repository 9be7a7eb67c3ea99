//! `[metrics]`: host-policy run against real balloon-backend processes
//! (in-process frontends) serves Prometheus's text format over TCP and over
//! a Unix socket; `promtool check metrics` (Debian's prometheus package)
//! accepts it, and docs/metrics.md lists exactly the metrics served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::wait::wait_for;
use test_support::{ChildGuard, Harness, GUEST_RAM_BYTES, MIB};

fn backend_binary() -> PathBuf {
    test_support::workspace_binary("balloon-backend")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// host-policy managing two backends, its metrics at `listen`.
fn start(listen: &str) -> (tempfile::TempDir, Vec<Harness>, ChildGuard) {
    let dir = tempfile::tempdir().unwrap();
    let mut vms: Vec<Harness> = (0..2)
        .map(|_| Harness::start(&backend_binary(), &[]))
        .collect();
    // The host is a cgroup v2 directory (files as the kernel writes them):
    // 1 GiB limit, 150 MiB available, no PSI, no OOM kill yet.
    let cgroup = dir.path().join("machine.slice");
    std::fs::create_dir(&cgroup).unwrap();
    for (file, text) in [
        ("memory.max", "1073741824\n".to_string()),
        ("memory.high", "max\n".to_string()),
        ("memory.current", format!("{}\n", (1024 - 150) * MIB)),
        ("memory.stat", "anon 0\nactive_file 0\ninactive_file 0\n".to_string()),
        ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n".to_string()),
        (
            "memory.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n".to_string(),
        ),
    ] {
        std::fs::write(cgroup.join(file), text).unwrap();
    }
    let mut config = format!(
        "[host]\ninterval_s = 1\ncgroup = {cgroup:?}\n\n[metrics]\nlisten = {listen:?}\n\n[defaults]\nmin_free_mib = 4\nmin_free_percent = 0\ninflate_step_mib = 8\n"
    );
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.send_stats(&[
            (4, 40 * MIB),
            (5, GUEST_RAM_BYTES),
            (6, 40 * MIB),
            (7, 6 * MIB),
        ]);
        config.push_str(&format!(
            "\n[[vm]]\nname = \"vm{i}\"\ncontrol = {:?}\n",
            vm.dir.path().join("control.sock")
        ));
    }
    // So that every series has a sample: a guest fault the backend counts,
    // and an agent socket nobody serves.
    vms[0].send_pfns(test_support::INFLATE, &[u32::MAX]);
    config.push_str(&format!("agent = {:?}\n", dir.path().join("no-agent.sock")));
    std::fs::write(dir.path().join("host-policy.toml"), config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_host-policy"))
        .args(["run", "--config"])
        .arg(dir.path().join("host-policy.toml"))
        .stdin(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    (dir, vms, ChildGuard::new("host-policy", child))
}

/// The value of the sample line that starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// The metric names the documentation lists (first column of its tables).
fn documented_names() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"))
            .unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("| `balloon_"))
        .filter_map(|rest| rest.split('`').next())
        .map(|name| format!("balloon_{name}"))
        .collect()
}

#[test]
fn metrics_are_served_valid_and_documented() {
    let port = free_port();
    let (dir, vms, mut policy) = start(&format!("127.0.0.1:{port}"));
    let _answers: Vec<_> = vms.iter().map(|vm| vm.answer_config_changes()).collect();
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Reclaim takes idle memory: a target shows up after a few ticks.
    let text = wait_for("a target in the metrics", Duration::from_secs(30), || {
        let Ok(response) = ureq::get(&url).call() else {
            return Ok(None);
        };
        let text = response.into_string()?;
        Ok(sample(&text, "balloon_vm_target_bytes{vm=\"vm0\"}")
            .is_some_and(|v| v > 0.0)
            .then_some(text))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        )
    });

    assert_eq!(
        sample(&text, "balloon_vm_guest_ram_bytes{vm=\"vm0\"}"),
        Some(GUEST_RAM_BYTES as f64)
    );
    assert_eq!(
        sample(&text, "balloon_vm_guest_cache_bytes{vm=\"vm1\"}"),
        Some((6 * MIB) as f64)
    );
    assert_eq!(
        sample(&text, "balloon_host_memory_total_bytes"),
        Some((1024 * MIB) as f64)
    );
    assert_eq!(
        sample(&text, "balloon_host_mode{mode=\"reclaim\"}"),
        Some(1.0),
        "{text}"
    );
    let cgroup = dir.path().join("machine.slice");
    assert_eq!(
        sample(
            &text,
            &format!(
                "balloon_host_source_info{{path={:?},pressure={:?},source=\"cgroup_v2\"}}",
                cgroup,
                cgroup.join("memory.pressure")
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "balloon_host_memory_pressure_some_avg10"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "balloon_host_cgroup_oom_kills_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "balloon_vm_backend_up{vm=\"vm1\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "balloon_vm_agent_up{vm=\"vm1\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "balloon_vm_backend_errors_total{kind=\"pfn_outside_ram\",vm=\"vm0\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "balloon_vm_policy_errors_total{kind=\"agent_connect_failures\",vm=\"vm1\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "balloon_vm_target_changes_total{cause=\"reclaim\",direction=\"inflate\",vm=\"vm0\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, "balloon_policy_tick_duration_seconds_count").is_some_and(|v| v >= 1.0),
        "{text}"
    );

    // Debian's promtool accepts the exposition, lint included.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) runs");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(promtool.stdin.take());
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // docs/metrics.md lists exactly what is served.
    let served: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect();
    assert_eq!(documented_names(), served);

    let missing = ureq::get(&format!("http://127.0.0.1:{port}/other")).call();
    assert!(
        matches!(missing, Err(ureq::Error::Status(404, _))),
        "{missing:?}"
    );

    // SIGHUP: one reload; a broken file: one refused reload.
    let scrape = |series: &'static str| {
        let url = url.clone();
        move || -> anyhow::Result<Option<f64>> {
            Ok(ureq::get(&url)
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .and_then(|t| sample(&t, series)))
        }
    };
    policy.signal(test_support::child::Signal::HUP).unwrap();
    let reloads = scrape("balloon_policy_config_reloads_total");
    wait_for("a reload", Duration::from_secs(20), || {
        Ok(reloads()?.filter(|v| *v == 1.0))
    })
    .unwrap();
    std::fs::write(
        dir.path().join("host-policy.toml"),
        "[host]\ninterval_s = 0\n",
    )
    .unwrap();
    policy.signal(test_support::child::Signal::HUP).unwrap();
    let failures = scrape("balloon_policy_config_reload_failures_total");
    wait_for("a refused reload", Duration::from_secs(20), || {
        Ok(failures()?.filter(|v| *v == 1.0))
    })
    .unwrap();
}

#[test]
fn metrics_over_a_unix_socket() {
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("metrics.sock");
    let (_dir, vms, mut policy) = start(socket.to_str().unwrap());
    let _answers: Vec<_> = vms.iter().map(|vm| vm.answer_config_changes()).collect();
    let text = wait_for("metrics over the socket", Duration::from_secs(30), || {
        let output = Command::new("curl")
            .args(["--silent", "--fail", "--unix-socket"])
            .arg(&socket)
            .arg("http://localhost/metrics")
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        Ok(
            (output.status.success() && text.contains("balloon_policy_ticks_total"))
                .then_some(text),
        )
    })
    .unwrap();
    assert_eq!(
        sample(&text, "balloon_vm_guest_ram_bytes{vm=\"vm1\"}"),
        Some(GUEST_RAM_BYTES as f64)
    );
    // Stopped (as systemctl stop does, SIGTERM), it leaves no socket.
    let status = policy.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "host-policy exited with {status}");
    assert!(!socket.exists(), "{} is left", socket.display());
}

#[test]
fn a_bad_listen_address_names_the_key_and_what_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host-policy.toml");
    std::fs::write(
        &path,
        "[metrics]\nlisten = \"localhost\"\n\n[[vm]]\nname = \"a\"\ncontrol = \"/run/balloon/a.ctl\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_host-policy"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        error.contains("listen")
            && error.contains("127.0.0.1:9848")
            && error.contains("absolute Unix socket path"),
        "{error}"
    );
}

#[test]
fn the_dashboard_queries_only_documented_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let documented = documented_names();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("balloon_") {
                    used.insert(word.to_string());
                }
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    let unknown: Vec<&String> = used.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics that are not served: {unknown:?}"
    );
}
