//! The host-policy binary: check, simulate, and a running daemon's reload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_host-policy");

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

#[test]
fn check_accepts_the_example_and_names_mistakes() {
    let out = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(examples().join("host-policy.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vm web1") && text.contains("shares 2000"),
        "{text}"
    );
    // Where the host is read, and what it reads now.
    assert!(
        text.contains("host source: meminfo /proc/meminfo: total ")
            && text.contains("host pressure: ")
            && text.contains("is pressure (reclaim; hard at 20%)"),
        "{text}"
    );

    // Each bad configuration fails `check` with exit 1 and names the file
    // and the problem. A meminfo file that does not exist fails `check`, as
    // it would fail `run`.
    let dir = tempfile::tempdir().unwrap();
    for (file, text, expected) in [
        (
            "bad.toml",
            "[host]\ngive_back_percent = 101\n[[vm]]\nname = \"a\"\ncontrol = \"/x\"\n",
            &["bad.toml", "line 2", "between 2 and 100, got 101"][..],
        ),
        (
            "no-meminfo.toml",
            "[host]\nmeminfo = \"/no/such/meminfo\"\n[[vm]]\nname = \"a\"\ncontrol = \"/x\"\n",
            &["/no/such/meminfo", "meminfo"][..],
        ),
        (
            "both.toml",
            "[host]\nmeminfo = \"/proc/meminfo\"\ncgroup = \"/sys/fs/cgroup/machine.slice\"\n[[vm]]\nname = \"a\"\ncontrol = \"/x\"\n",
            &["both.toml:3:", "host.cgroup", "host.meminfo", "remove one"][..],
        ),
        (
            "no-cgroup.toml",
            "[host]\ncgroup = \"/no/such/cgroup\"\n[[vm]]\nname = \"a\"\ncontrol = \"/x\"\n",
            &["[host] cgroup /no/such/cgroup", "no such directory"][..],
        ),
        (
            "not-memory.toml",
            "[host]\ncgroup = \"/proc\"\n[[vm]]\nname = \"a\"\ncontrol = \"/x\"\n",
            &["[host] cgroup /proc", "not a memory cgroup"][..],
        ),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BINARY)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{file}");
        let error = String::from_utf8_lossy(&out.stderr);
        for word in expected {
            assert!(error.contains(word), "{file}: {word} missing from {error}");
        }
    }
    let out = Command::new(BINARY)
        .args(["check", "--config", "/no/such/file.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.toml"));
}

/// The parts of `examples/scenario.toml` the simulate test checks against.
struct Scenario {
    duration_s: u64,
    tick_s: u64,
    vm_names: Vec<String>,
    /// When the host's other use is at its largest, and when it ends.
    host_job_start_s: u64,
    host_job_end_s: u64,
}

fn read_scenario(path: &std::path::Path) -> Scenario {
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let int = |v: &toml::Value| u64::try_from(v.as_integer().unwrap()).unwrap();
    let steps: Vec<(u64, u64)> = table["host_other_mib"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| {
            let point = point.as_array().unwrap();
            (int(&point[0]), int(&point[1]))
        })
        .collect();
    let peak = steps.iter().map(|(_, mib)| *mib).max().unwrap();
    let host_job_start_s = steps.iter().find(|(_, mib)| *mib == peak).unwrap().0;
    let host_job_end_s = steps
        .iter()
        .filter(|(_, mib)| *mib == peak)
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    Scenario {
        duration_s: int(&table["duration_s"]),
        tick_s: int(&table["tick_s"]),
        vm_names: table["vm"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["name"].as_str().unwrap().to_string())
            .collect(),
        host_job_start_s,
        host_job_end_s,
    }
}

#[test]
fn simulate_writes_a_csv_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let scenario_path = examples().join("scenario.toml");
    let scenario = read_scenario(&scenario_path);
    let status = Command::new(BINARY)
        .args(["simulate", "--scenario"])
        .arg(&scenario_path)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(header[..2], ["t_s", "host_available_mib"]);
    for name in &scenario.vm_names {
        for column in [
            format!("{name}_balloon_mib"),
            format!("{name}_guest_free_mib"),
        ] {
            assert!(
                header.contains(&column.as_str()),
                "{column} missing: {header:?}"
            );
        }
    }
    let rows_expected = scenario.duration_s / scenario.tick_s + 1;
    assert_eq!(csv.lines().count() as u64, 1 + rows_expected);
    // The host job forces reclaim: the balloons grow while it runs, and are
    // given back after it ends.
    let balloon_columns: Vec<usize> = scenario
        .vm_names
        .iter()
        .map(|name| {
            let column = format!("{name}_balloon_mib");
            header.iter().position(|h| *h == column).unwrap()
        })
        .collect();
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    let ballooned = |row: &Vec<f64>| balloon_columns.iter().map(|&c| row[c]).sum::<f64>();
    let last_before_end = rows
        .iter()
        .rfind(|r| r[0] < scenario.host_job_end_s as f64)
        .unwrap();
    let before_job = rows
        .iter()
        .rfind(|r| r[0] <= scenario.host_job_start_s as f64)
        .unwrap();
    let end = rows.last().unwrap();
    assert!(
        ballooned(last_before_end) > ballooned(before_job),
        "nothing ballooned during the host job: {before_job:?} -> {last_before_end:?}"
    );
    assert!(
        ballooned(end) < ballooned(last_before_end),
        "nothing given back after the host job: {end:?}"
    );
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline"),
        "not an SVG plot"
    );
}

/// Kills the daemon if the test fails half-way.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            if let Err(error) = self.0.kill() {
                eprintln!("killing host-policy: {error}");
            }
            if let Err(error) = self.0.wait() {
                eprintln!("reaping host-policy: {error}");
            }
        }
    }
}

#[test]
fn sighup_reloads_and_a_bad_file_keeps_the_old_config() {
    let dir = tempfile::tempdir().unwrap();
    let meminfo = dir.path().join("meminfo");
    std::fs::write(&meminfo, "MemTotal: 1048576 kB\nMemAvailable: 524288 kB\n").unwrap();
    let config = dir.path().join("host-policy.toml");
    let good = format!("[host]\ninterval_s = 1\nmeminfo = {meminfo:?}\n[[vm]]\nname = \"a\"\ncontrol = \"/nonexistent.ctl\"\n");
    std::fs::write(&config, &good).unwrap();
    // Debug level: every tick logs "skipped this tick" for the VM that has
    // no backend, which is how the test counts ticks.
    let mut child = ChildGuard(
        Command::new(BINARY)
            .args(["run", "--dry-run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "host_policy=debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id() as i32;
    let signal = |sig: i32| {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    };
    // Collect the log as it comes, to wait for lines rather than for time.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = child.0.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    let wait_log = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log: {}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let ticks_so_far = |log: &str| log.matches("vm a: skipped this tick").count();
    wait_log("managing 1 VM(s)");
    wait_log("vm a: skipped this tick");
    // An invalid file: the old configuration stays, ticks go on at 1 s.
    std::fs::write(&config, "[host]\ninterval_s = 0\n").unwrap();
    signal(1);
    wait_log("configuration not reloaded, keeping the old one");
    wait_log("between 1 and 3600");
    let ticks = ticks_so_far(&log.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticks_so_far(&log.lock().unwrap()) < ticks + 2 {
        assert!(
            Instant::now() < deadline,
            "ticks stopped after a bad reload"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A valid file that moves the reclaim threshold above the host's 50 %:
    // only the new configuration makes the next tick switch to reclaim.
    assert!(
        !log.lock().unwrap().contains("host mode"),
        "{}",
        log.lock().unwrap()
    );
    std::fs::write(
        &config,
        good.replace(
            "interval_s = 1\n",
            "interval_s = 1\nreclaim_start_percent = 60\ngive_back_percent = 80\n",
        ),
    )
    .unwrap();
    signal(1);
    wait_log("configuration reloaded");
    wait_log("host mode Normal -> Reclaim (50.0% available)");
    signal(15);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "host-policy did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
