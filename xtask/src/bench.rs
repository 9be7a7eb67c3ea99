//! `cargo xtask bench`: runs the benchmarks and writes their tables, with
//! the machine and date, to docs/performance.md.

use std::process::Command;

use anyhow::Context;

use crate::provision::{cargo, workspace_root};

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn run() -> anyhow::Result<()> {
    let root = workspace_root();
    eprintln!("[xtask] running the inflate-path benchmark (release build)");
    let output = Command::new(cargo())
        .current_dir(&root)
        .args([
            "bench",
            "--quiet",
            "-p",
            "balloon-backend",
            "--bench",
            "inflate",
        ])
        .output()
        .context("running cargo bench")?;
    anyhow::ensure!(
        output.status.success(),
        "the benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let document = format!(
        "# Performance\n\n\
         Measured by `cargo xtask bench` on {date}: {cpu}, {cores} cores, kernel {kernel}.\n\
         Every row of a table comes from the same run; ratios compare rows of that run.\n\
         Reproduce with `cargo xtask bench` (it rewrites this file).\n\n\
         ## Inflate path, in process\n\n\
         1 GiB of guest RAM in a shmem file (as memfd guest RAM is), every page\n\
         resident before each run, PFNs fed in requests of 256 as the Linux driver\n\
         sends them. The device's path validates, sorts, dedupes and coalesces the\n\
         PFNs, updates the balloon bitmap and punches each run with one `fallocate`.\n\
         \"Scattered\" feeds every page of the range in a shuffled order, so almost no\n\
         two PFNs of a request are adjacent. Each figure is the median of 3 runs;\n\
         every run is checked to have freed the whole range.\n\n{table}\n\n\
         The real-guest comparison with QEMU's built-in balloon, free page reporting\n\
         and footprint figures are not measured yet (issue 6).\n",
        date = command_output("date", &["-u", "+%Y-%m-%d"]),
        cpu = cpu_model(),
        cores = std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel = command_output("uname", &["-r"]),
    );
    let path = root.join("docs/performance.md");
    std::fs::write(&path, document).with_context(|| format!("writing {}", path.display()))?;
    println!("{table}\n\nwritten to {}", path.display());
    Ok(())
}
