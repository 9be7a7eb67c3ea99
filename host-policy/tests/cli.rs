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

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[host]\ngive_back_percent = 101\n[[vm]]\nname = \"a\"\ncontrol = \"/x\"\n",
    )
    .unwrap();
    let out = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("bad.toml")
            && error.contains("line 2")
            && error.contains("between 2 and 100, got 101"),
        "{error}"
    );
    let out = Command::new(BINARY)
        .args(["check", "--config", "/no/such/file.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.toml"));
}

#[test]
fn simulate_writes_a_csv_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let status = Command::new(BINARY)
        .args(["simulate", "--scenario"])
        .arg(examples().join("scenario.toml"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(
        header.starts_with("t_s,host_available_mib,web_balloon_mib,web_guest_free_mib"),
        "{header}"
    );
    assert_eq!(csv.lines().count(), 1 + 1200 / 5 + 1);
    // The host job forces reclaim: some balloon grows while it runs, and it
    // is given back after.
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    let during = rows.iter().find(|r| r[0] == 590.0).unwrap();
    let end = rows.last().unwrap();
    assert!(
        during[2] + during[4] + during[6] > 0.0,
        "nothing ballooned during the host job: {during:?}"
    );
    assert!(
        end[2] + end[4] + end[6] < during[2] + during[4] + during[6],
        "{end:?}"
    );
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline"),
        "not an SVG plot"
    );
}

#[test]
fn sighup_reloads_and_a_bad_file_keeps_the_old_config() {
    let dir = tempfile::tempdir().unwrap();
    let meminfo = dir.path().join("meminfo");
    std::fs::write(&meminfo, "MemTotal: 1048576 kB\nMemAvailable: 524288 kB\n").unwrap();
    let config = dir.path().join("host-policy.toml");
    let good = format!("[host]\ninterval_s = 1\nmeminfo = {meminfo:?}\n[[vm]]\nname = \"a\"\ncontrol = \"/nonexistent.ctl\"\n");
    std::fs::write(&config, &good).unwrap();
    let mut child = Command::new(BINARY)
        .args(["run", "--dry-run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
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
    let mut stderr = child.stderr.take().unwrap();
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
    wait_log("managing 1 VM(s)");
    std::fs::write(&config, "[host]\ninterval_s = 0\n").unwrap();
    signal(1);
    wait_log("configuration not reloaded, keeping the old one");
    wait_log("between 1 and 3600");
    std::fs::write(&config, good.replace("interval_s = 1", "interval_s = 2")).unwrap();
    signal(1);
    wait_log("configuration reloaded");
    wait_log("vm a: skipped this tick");
    signal(15);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "host-policy did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
