//! (l) The operator's view of a real guest: host-policy managing it with
//! `[metrics]` on, a real Prometheus server (Debian's) scraping it, and
//! balloonctl. `balloonctl set` reaches the target on the guest and holds
//! it against host-policy; Prometheus's query API returns that target and
//! the host-resident guest RAM the test measures itself; `unpin` hands the
//! VM back and host-policy gives the memory back.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::Context;

use guest_tests::host_policy_process::PolicyProcess;
use guest_tests::{wait_for, Stack, MIB};
use test_support::ChildGuard;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn balloonctl(binary: &Path, config: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .with_context(|| format!("running {}", binary.display()))
}

/// The value of an instant query, when it has exactly one sample.
fn query(prometheus: &str, promql: &str) -> anyhow::Result<Option<f64>> {
    let Ok(response) = ureq::get(&format!("{prometheus}/api/v1/query"))
        .query("query", promql)
        .call()
    else {
        return Ok(None);
    };
    let body: serde_json::Value = serde_json::from_str(&response.into_string()?)?;
    let result = &body["data"]["result"];
    if result.as_array().map(Vec::len) != Some(1) {
        return Ok(None);
    }
    eprintln!("[l] prometheus: {promql} -> {}", result[0]);
    Ok(result[0]["value"][1].as_str().and_then(|v| v.parse().ok()))
}

#[test]
fn balloonctl_and_prometheus_see_and_steer_a_real_guest() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &["--no-reporting", "--stats-interval", "1"], |c| {
        c.prealloc = true
    })?;
    let metrics_port = free_port()?;
    let policy = PolicyProcess::start_with_tables(
        &stack.env,
        stack.dir.path(),
        &stack.backend.control,
        None,
        "min_free_mib = 64\nmin_free_percent = 0",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
    )?;
    let ctl = stack.env.backend_binary.with_file_name("balloonctl");

    // A real Prometheus server scraping host-policy every second.
    let prometheus_port = free_port()?;
    let prometheus_dir = stack.dir.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir)?;
    let scrape = prometheus_dir.join("prometheus.yml");
    std::fs::write(
        &scrape,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: balloon\n    static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n"
        ),
    )?;
    let server = Command::new("prometheus")
        .arg(format!("--config.file={}", scrape.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prometheus_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            prometheus_dir.join("log"),
        )?))
        .spawn()
        .context("starting prometheus (Debian's prometheus package)")?;
    let _prometheus = ChildGuard::new("prometheus", server);
    let prometheus = format!("http://127.0.0.1:{prometheus_port}");

    let list = wait_for(
        "balloonctl list to show the guest",
        Duration::from_secs(30),
        || {
            let output = balloonctl(&ctl, &policy.config, &["list"])?;
            let table = String::from_utf8_lossy(&output.stdout).to_string();
            Ok((output.status.success()
                && table.lines().any(|l| {
                    l.starts_with("guest ") && l.contains("512 MiB") && l.contains(" ok ")
                }))
            .then_some(table))
        },
    )?;
    eprintln!("[l] balloonctl list:\n{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("guest ") && l.contains("host-policy")),
        "{list}"
    );

    // The operator's target: reached on the guest, pinned against host-policy
    // (the host is at ease, so host-policy would give it back).
    let set = balloonctl(
        &ctl,
        &policy.config,
        &["set", "guest", "128M", "--timeout", "120"],
    )?;
    let said = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(
        said.contains("granted 128 MiB") && said.contains("actual reached 128 MiB"),
        "{said}"
    );
    eprintln!("[l] balloonctl set:\n{said}");
    wait_for(
        "host-policy to see the pin",
        Duration::from_secs(30),
        || {
            Ok(policy
                .state()
                .is_some_and(|s| s["decision"]["vms"][0]["cause"] == "pinned")
                .then_some(()))
        },
    )?;
    assert_eq!(stack.control.status()?.target_bytes, 128 * MIB);

    // Prometheus has the target, and the host-resident guest RAM that the
    // test measures on QEMU's memfd.
    let target = wait_for("the target in Prometheus", Duration::from_secs(60), || {
        query(&prometheus, "balloon_vm_target_bytes{vm=\"guest\"}")
            .map(|v| v.filter(|v| *v == (128 * MIB) as f64))
    })?;
    assert_eq!(target, (128 * MIB) as f64);
    let measured = stack.vm.host_resident_bytes()?;
    assert!(
        measured <= 512 * MIB - 120 * MIB,
        "only {measured} bytes resident"
    );
    let scraped = wait_for(
        "the resident bytes in Prometheus",
        Duration::from_secs(60),
        || {
            let value = query(&prometheus, "balloon_vm_host_resident_bytes{vm=\"guest\"}")?;
            let now = stack.vm.host_resident_bytes()?;
            Ok(value.filter(|v| (*v as u64).abs_diff(now) <= 8 * MIB))
        },
    )?;
    eprintln!(
        "[l] host-resident guest RAM: measured {} MiB, Prometheus {} MiB",
        measured / MIB,
        scraped as u64 / MIB
    );
    let pinned = query(&prometheus, "balloon_vm_pinned{vm=\"guest\"}")?;
    assert_eq!(pinned, Some(1.0));

    let stats = balloonctl(&ctl, &policy.config, &["stats", "guest"])?;
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.contains("available memory") && stats.contains("MiB"),
        "{stats}"
    );
    let status = balloonctl(&ctl, &policy.config, &["status", "guest"])?;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("target set by         pinned"), "{status}");

    // Unpinned, host-policy manages the VM again: the host is at ease, so
    // it gives the memory back.
    let unpin = balloonctl(&ctl, &policy.config, &["unpin", "guest"])?;
    assert!(String::from_utf8_lossy(&unpin.stdout).contains("host-policy sets its target again"));
    wait_for(
        "host-policy to give the balloon back",
        Duration::from_secs(90),
        || Ok((stack.control.status()?.actual_bytes == 0).then_some(())),
    )?;
    Ok(())
}
