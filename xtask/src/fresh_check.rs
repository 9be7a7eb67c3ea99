//! `cargo xtask fresh-check` (root): the README's two commands on a new
//! machine. A new Debian 12 root (debootstrap bookworm, its default
//! variant, from the archive this machine's apt uses) holds only what the
//! README says a user brings: Debian's gcc as the linker, rustup's stable
//! toolchain (rustup-init from static.rust-lang.org), root, and a copy of
//! this checkout (its files as a commit of the working tree would hold
//! them); and, to reach the network as this machine does, its resolver,
//! its locally added certificate authorities and apt's `Acquire::`
//! settings. It is booted with systemd as PID 1, as a machine runs, and the
//! commands of the README's "Two commands" block run in it in their
//! order, each timed; nothing an earlier run installed on this host is
//! there. Prints pass or fail and the time of each.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::nspawn::Booted;
use crate::provision::{ensure_packages, is_root, succeed, workspace_root};

/// Where the checkout goes in the root.
const CHECKOUT: &str = "/root/balloon-stack";
/// What a user brings besides the base system (README: "Rust (rustup's
/// toolchain, and Debian's gcc as its linker)"); ca-certificates for
/// rustup and cargo's HTTPS, systemd as the machine's init.
const BROUGHT: &str = "gcc,libc6-dev,ca-certificates,systemd-sysv";
const RUSTUP_INIT: &str =
    "https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init";
/// The longest one README command may take (the QEMU build and the whole
/// suite under TCG on 2 cores included).
const COMMAND_DEADLINE: Duration = Duration::from_secs(4 * 3600);

/// The commands of the README's first ```sh block after "## Two
/// commands", without their comments.
pub fn readme_commands(readme: &str) -> anyhow::Result<Vec<String>> {
    let section = readme
        .split("## Two commands")
        .nth(1)
        .context("the README has no \"## Two commands\" section")?;
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .context("no ```sh block in the README's \"Two commands\"")?;
    let commands: Vec<String> = block
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.trim().is_empty())
        .map(|l| l.split('#').next().unwrap_or_default().trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    anyhow::ensure!(!commands.is_empty(), "no command in the README's block");
    Ok(commands)
}

fn minutes(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    format!("{}m{:02}s", seconds / 60, seconds % 60)
}

/// The checkout's files: tracked and untracked, not ignored (what a
/// commit of the working tree holds), copied into `to`.
fn copy_checkout(to: &Path) -> anyhow::Result<usize> {
    let workspace = workspace_root();
    let listing = succeed(Command::new("git").current_dir(&workspace).args([
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ]))?;
    let mut copied = 0;
    for name in listing.split('\0').filter(|n| !n.is_empty()) {
        let from = workspace.join(name);
        // Deleted in the working tree: not part of it.
        let Ok(meta) = std::fs::symlink_metadata(&from) else {
            continue;
        };
        let target = to.join(name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &target)?;
        } else {
            std::fs::copy(&from, &target).with_context(|| format!("copying {name}"))?;
        }
        copied += 1;
    }
    Ok(copied)
}

/// Runs `script` with bash inside the root, in a scope of its own with
/// its cgroup delegated (as a login's commands run; systemd-nspawn inside
/// needs that), its output shown with `tag` and kept in `log`.
fn run_inside(booted: &Booted, tag: &str, script: &str, log: &Path) -> anyhow::Result<bool> {
    let mut child = booted
        .command("systemd-run")
        .args([
            "--scope",
            "--quiet",
            "-p",
            "Delegate=yes",
            "--",
            "bash",
            "-lc",
            script,
        ])
        .env("HOME", "/root")
        .env(
            "PATH",
            "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {script}"))?;
    let file = std::sync::Arc::new(std::sync::Mutex::new(std::fs::File::create(log)?));
    let mut readers = Vec::new();
    let pipes: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(child.stdout.take().context("stdout")?),
        Box::new(child.stderr.take().context("stderr")?),
    ];
    for pipe in pipes {
        let file = file.clone();
        let tag = tag.to_string();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                if let Ok(mut file) = file.lock() {
                    // The log is a convenience: a failed write loses a line.
                    let _ = writeln!(file, "{line}");
                }
            }
        }));
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > COMMAND_DEADLINE {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    for reader in readers {
        if reader.join().is_err() {
            eprintln!("[{tag}] the output reader panicked");
        }
    }
    match status {
        Some(status) => Ok(status.success()),
        None => {
            eprintln!(
                "[{tag}] not done after {}: stopped",
                minutes(COMMAND_DEADLINE)
            );
            Ok(false)
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "cargo xtask fresh-check needs root (debootstrap, systemd-nspawn)"
    );
    ensure_packages(&[("debootstrap", "debootstrap"), ("curl", "curl")])?;
    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    let commands = readme_commands(&readme)?;
    let logs = workspace_root().join("target/fresh-check");
    std::fs::create_dir_all(&logs)?;

    let prepared = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("fresh-check")
        .tempdir_in("/var/tmp")?;
    let root = scratch.path().join("root");
    let mirror =
        succeed(Command::new("bash").arg(workspace_root().join("xtask/scripts/debian-mirror.sh")))?;
    eprintln!("[fresh] debootstrap bookworm with {BROUGHT}");
    succeed(
        Command::new("debootstrap")
            .arg(format!("--include={BROUGHT}"))
            .arg("bookworm")
            .arg(&root)
            .arg(mirror.trim()),
    )?;
    succeed(
        Command::new("curl")
            .args(["--proto", "=https", "--tlsv1.2", "-sSf", "-o"])
            .arg(root.join("var/tmp/rustup-init"))
            .arg(RUSTUP_INIT),
    )?;
    std::fs::set_permissions(
        root.join("var/tmp/rustup-init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    // The network as this machine reaches it: the certificate authorities
    // added to it locally (a proxy's), as its administrator would add
    // them to a new machine.
    let local_cas = Path::new("/usr/local/share/ca-certificates");
    if local_cas.is_dir() {
        succeed(
            Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", local_cas.display()))
                .arg(root.join("usr/local/share/ca-certificates")),
        )?;
    }
    // And apt's settings for reaching the archive (proxies, the validity
    // of a mirror's Release files), the files that hold any.
    for entry in std::fs::read_dir("/etc/apt/apt.conf.d")?.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if text.contains("Acquire::") {
            std::fs::copy(
                entry.path(),
                root.join("etc/apt/apt.conf.d").join(entry.file_name()),
            )?;
        }
    }
    let files = copy_checkout(&root.join(CHECKOUT.trim_start_matches('/')))?;
    eprintln!("[fresh] copied {files} files of the checkout to {CHECKOUT}");
    // A machine as root has it: /proc/sys and /sys writable (huge pages),
    // every capability.
    let booted = Booted::boot_root(
        scratch,
        root,
        None,
        "fresh Debian 12",
        &["--capability=all".to_string()],
        &[("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "1")],
    )?;
    let setup = "set -e; update-ca-certificates >/dev/null; apt-get update -qq; /var/tmp/rustup-init -y --profile minimal; rm /var/tmp/rustup-init; . \"$HOME/.cargo/env\"; rustc --version; gcc --version | head -n 1";
    anyhow::ensure!(
        run_inside(&booted, "fresh setup", setup, &logs.join("setup.log"))?,
        "preparing the fresh root failed (see {})",
        logs.join("setup.log").display()
    );
    let prepared = prepared.elapsed();

    let mut results = Vec::new();
    for command in &commands {
        let started = Instant::now();
        let log = logs.join(format!("{}.log", command.replace(' ', "-")));
        let passed = run_inside(
            &booted,
            command,
            &format!("cd {CHECKOUT} && {command}"),
            &log,
        )?;
        results.push((command.clone(), passed, started.elapsed(), log));
    }
    booted.poweroff()?;

    println!(
        "fresh-check: a new Debian 12 root (debootstrap bookworm + {BROUGHT}, rustup's stable toolchain), booted with systemd as PID 1; prepared in {}",
        minutes(prepared)
    );
    for (command, passed, elapsed, log) in &results {
        println!(
            "  {command:<20} {}  {:>8}   (log: {})",
            if *passed { "pass" } else { "FAIL" },
            minutes(*elapsed),
            log.display()
        );
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, passed, _, _)| !passed)
        .map(|(command, _, _, _)| command.as_str())
        .collect();
    anyhow::ensure!(failed.is_empty(), "failed on a fresh machine: {failed:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readmes_two_commands_are_found_in_order() {
        let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
        assert_eq!(
            readme_commands(&readme).unwrap(),
            ["cargo xtask demo", "cargo xtask test"]
        );
    }
}
