//! `cargo xtask fuzz --seconds N`: runs every cargo-fuzz target for N
//! seconds from the committed seed corpus (new inputs go to a scratch
//! directory, so the checkout is not modified). Installs cargo-fuzz from
//! crates.io when it is missing; needs the nightly toolchain.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::provision::{cargo, workspace_root};

pub const TARGETS: [&str; 6] = [
    "queues",
    "pfn_tracking",
    "stats_and_config",
    "operator_input",
    "saved_state",
    "state_file",
];

fn cargo_fuzz_installed() -> bool {
    Command::new(cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

pub fn run(seconds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=86_400).contains(&seconds),
        "--seconds must be between 1 and 86400, got {seconds}"
    );
    if !cargo_fuzz_installed() {
        eprintln!("[xtask] installing cargo-fuzz");
        let status = Command::new(cargo())
            .args(["install", "cargo-fuzz", "--locked", "--quiet"])
            .status()
            .context("installing cargo-fuzz")?;
        anyhow::ensure!(status.success(), "installing cargo-fuzz failed");
    }
    let fuzz_dir = workspace_root().join("fuzz");
    let scratch = tempfile::tempdir().context("creating a scratch corpus directory")?;
    for target in TARGETS {
        let new_inputs = scratch.path().join(target);
        std::fs::create_dir_all(&new_inputs)?;
        let seeds = Path::new("corpus").join(target);
        eprintln!("[xtask] fuzzing {target} for {seconds} s");
        let output = Command::new("cargo")
            .current_dir(&fuzz_dir)
            .env_remove("CARGO")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&new_inputs)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .output()
            .with_context(|| format!("running the {target} fuzz target"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let summary = log
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("no summary");
        if !output.status.success() {
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            anyhow::bail!("fuzz target {target} found a problem:\n{}", tail.join("\n"));
        }
        eprintln!("[xtask] {target}: {summary}");
    }
    println!("fuzz: {} passed, 0 failed", TARGETS.len());
    Ok(())
}
