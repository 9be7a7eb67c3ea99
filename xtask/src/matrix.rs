//! `cargo xtask guest-matrix`: the real-guest scenarios that every guest
//! kernel must pass (a: the driver binds, b: inflate and deflate return
//! memory, c: statistics, d: free page reporting, g: deflate on OOM), run
//! against a guest image of each Debian cloud kernel, with a table of
//! kernel x scenario.
//! A scenario prints `[absent] FEATURE` for a feature the kernel lacks;
//! the table shows those instead of counting them as failures.

use std::process::Command;

use anyhow::Context;

use crate::provision::{self, KernelSuite};

/// (test file, short name) of the scenarios in the matrix.
const SCENARIOS: [(&str, &str); 5] = [
    ("a_driver_binds", "a binds"),
    ("b_inflate_returns_memory", "b inflate"),
    ("c_statistics", "c stats"),
    ("d_free_page_reporting", "d reporting"),
    ("g_deflate_on_oom", "g oom"),
];

/// One cell of the table: passed or not, the features reported absent,
/// and the kernel the guest said it booted.
struct Outcome {
    passed: bool,
    absent: Vec<String>,
    booted: Option<String>,
}

impl Outcome {
    fn cell(&self) -> String {
        match (self.passed, self.absent.is_empty()) {
            (false, _) => "FAILED".into(),
            (true, true) => "pass".into(),
            (true, false) => format!("pass (absent: {})", self.absent.join(", ")),
        }
    }
}

/// Runs one scenario's test binary against the guest recorded in the env
/// file; its output goes to `log`.
fn run_scenario(test: &str, log: &std::path::Path) -> anyhow::Result<Outcome> {
    let output = Command::new(provision::cargo())
        .current_dir(provision::workspace_root())
        .args([
            "test",
            "--release",
            "--quiet",
            "-p",
            "guest-tests",
            "--test",
            test,
            "--",
            "--nocapture",
        ])
        .output()
        .with_context(|| format!("running {test}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(log, &text).with_context(|| format!("writing {}", log.display()))?;
    let absent = text
        .lines()
        .filter_map(|line| line.split("[absent] ").nth(1))
        .map(|feature| feature.trim().to_string())
        .collect();
    let booted = text.lines().find_map(|line| {
        let (_, tail) = line.split_once(", kernel ")?;
        Some(tail.trim_end_matches(')').to_string())
    });
    Ok(Outcome {
        passed: output.status.success(),
        absent,
        booted,
    })
}

pub fn run() -> anyhow::Result<()> {
    let base = provision::ensure_all()?;
    let root = provision::workspace_root();
    let logs = root.join("target/guest-matrix");
    std::fs::create_dir_all(&logs).context("creating target/guest-matrix")?;
    let mut rows = Vec::new();
    let mut failures = 0;
    for suite in KernelSuite::ALL {
        let guest_dir = provision::ensure_guest(Some(suite))?;
        let package = std::fs::read_to_string(guest_dir.join("kernel-package"))
            .unwrap_or_default()
            .trim()
            .trim_start_matches("linux-image-")
            .to_string();
        let mut env = base.clone();
        env.guest_dir = guest_dir;
        env.save(&root)?;
        let mut cells = Vec::new();
        for (test, name) in SCENARIOS {
            eprintln!("[xtask] {} ({package}): {name}", suite.name());
            let log = logs.join(format!("{}-{test}.log", suite.name()));
            let mut outcome = run_scenario(test, &log)?;
            // The image must really boot the suite's kernel.
            if outcome.booted.as_deref() != Some(package.as_str()) {
                eprintln!(
                    "[xtask]   the guest booted kernel {:?}, not {package}",
                    outcome.booted
                );
                outcome.passed = false;
            }
            if !outcome.passed {
                failures += 1;
                eprintln!("[xtask]   FAILED: see {}", log.display());
            }
            cells.push(outcome.cell());
        }
        rows.push(format!(
            "| {} | {package} | {} |",
            suite.name(),
            cells.join(" | ")
        ));
    }
    // Later `cargo test` runs use the default guest again.
    base.save(&root)?;
    let names: Vec<&str> = SCENARIOS.iter().map(|(_, name)| *name).collect();
    println!(
        "| suite | kernel | {} |\n|---|---|{}\n{}",
        names.join(" | "),
        "---|".repeat(names.len()),
        rows.join("\n")
    );
    anyhow::ensure!(
        failures == 0,
        "{failures} scenario(s) failed; logs in {}",
        logs.display()
    );
    Ok(())
}
