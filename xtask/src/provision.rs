//! Finding or building what the real-guest tests and the demo need: a QEMU
//! with the generic vhost-user device, the guest image, the accelerator that
//! really works here, and the release backend binary. Slow artefacts are
//! cached outside the checkout, keyed by a hash of the recipe that made them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Context;
use guest_tests::env::TestEnv;
use guest_tests::vm::{Vm, VmConfig};
use sha2::{Digest, Sha256};

pub fn workspace_root() -> PathBuf {
    guest_tests::env::workspace_root()
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// `$XDG_CACHE_HOME/balloon-stack`, or `~/.cache/balloon-stack`.
pub fn cache_root() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("balloon-stack"))
}

/// A short hash of the files that make an artefact.
fn recipe_hash(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut hasher = Sha256::new();
    for file in files {
        hasher.update(std::fs::read(file).with_context(|| format!("reading {}", file.display()))?);
    }
    Ok(hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The device only our patched QEMU has (the tests use it and the
/// generic `vhost-user-test-device-pci`, which it has too).
const QEMU_DEVICE: &str = "vhost-user-balloon-pci";
const QEMU_APT_PACKAGES: &str = "libglib2.0-dev ninja-build pkg-config flex bison libpixman-1-dev zlib1g-dev libfdt-dev seabios qemu-system-data dpkg-dev xz-utils patch python3 python3-venv";

fn has_balloon_device(qemu: &Path) -> bool {
    Command::new(qemu)
        .args(["-device", "help"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(QEMU_DEVICE))
        .unwrap_or(false)
}

/// A QEMU that can attach the backend: `$BALLOON_QEMU`, then `PATH`, then
/// the cache, building it there from Debian's source package if needed.
pub fn ensure_qemu() -> anyhow::Result<PathBuf> {
    if let Some(qemu) = std::env::var_os("BALLOON_QEMU") {
        let qemu = PathBuf::from(qemu);
        anyhow::ensure!(
            has_balloon_device(&qemu),
            "BALLOON_QEMU={} has no {QEMU_DEVICE} (QEMU 10.2 with xtask/qemu-patches is needed)",
            qemu.display()
        );
        return Ok(qemu);
    }
    let on_path = PathBuf::from("qemu-system-x86_64");
    if has_balloon_device(&on_path) {
        return Ok(on_path);
    }
    let root = workspace_root();
    let script = root.join("xtask/scripts/build-qemu.sh");
    // The recipe: the build script and every patch it applies.
    let mut recipe: Vec<PathBuf> = std::fs::read_dir(root.join("xtask/qemu-patches"))
        .context("listing xtask/qemu-patches")?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    recipe.sort();
    recipe.insert(0, script.clone());
    let prefix = cache_root()?.join(format!("qemu-{}", recipe_hash(&recipe)?));
    let qemu = prefix.join("bin/qemu-system-x86_64");
    if has_balloon_device(&qemu) {
        eprintln!("[xtask] QEMU: {} (cached)", qemu.display());
        return Ok(qemu);
    }
    if !is_root() {
        anyhow::bail!(
            "no QEMU with {QEMU_DEVICE} found and building one needs root.\n\
             As root, run `cargo xtask qemu`: it installs Debian's packages ({QEMU_APT_PACKAGES},\n\
             and meson and python3-pycotap from bookworm-backports) and builds QEMU,\n\
             or point BALLOON_QEMU at a QEMU 10.2 built with xtask/qemu-patches."
        );
    }
    eprintln!(
        "[xtask] building QEMU into {} (about 5 minutes)",
        prefix.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .arg(&prefix)
        .status()
        .context("running build-qemu.sh")?;
    anyhow::ensure!(
        status.success() && has_balloon_device(&qemu),
        "building QEMU failed ({status})"
    );
    Ok(qemu)
}

/// The programs the guest image carries in /bin (the agent, the
/// benchmark's workload and the tests' memory verifier), built as static
/// binaries.
pub fn build_guest_programs() -> anyhow::Result<Vec<PathBuf>> {
    build_static_programs(&["guest-agent", "guest-workload", "guest-verifier"])
}

/// Builds the workspace's binary crates `programs` as static x86_64 Linux
/// executables (glibc, +crt-static) and returns their paths.
pub fn build_static_programs(programs: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let root = workspace_root();
    // --target keeps +crt-static away from build scripts and proc macros.
    let target = "x86_64-unknown-linux-gnu";
    let status = Command::new(cargo())
        .current_dir(&root)
        // The remap keeps the checkout's path out of the binary, so the
        // guest image's cache key is the same from any clone.
        .env(
            "RUSTFLAGS",
            format!(
                "-C target-feature=+crt-static --remap-path-prefix={}=.",
                root.display()
            ),
        )
        .args(["build", "--release", "--quiet", "--target", target])
        .args(programs.iter().flat_map(|p| ["-p", *p]))
        .status()
        .context("building the guest programs")?;
    anyhow::ensure!(
        status.success(),
        "building the static guest programs failed"
    );
    let release = root.join("target").join(target).join("release");
    Ok(programs.iter().map(|p| release.join(p)).collect())
}

/// Which Debian cloud kernel a guest image carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelSuite {
    /// Debian 11's 5.10.
    Bullseye,
    /// Debian 12's 6.1.
    Bookworm,
    /// Debian 12 backports' 6.12.
    BookwormBackports,
    /// Debian unstable's newest.
    Unstable,
}

impl KernelSuite {
    pub const ALL: [KernelSuite; 4] = [
        KernelSuite::Bullseye,
        KernelSuite::Bookworm,
        KernelSuite::BookwormBackports,
        KernelSuite::Unstable,
    ];

    /// The suite's name in Debian's archive (and build-guest.sh's argument).
    pub fn name(self) -> &'static str {
        match self {
            KernelSuite::Bullseye => "bullseye",
            KernelSuite::Bookworm => "bookworm",
            KernelSuite::BookwormBackports => "bookworm-backports",
            KernelSuite::Unstable => "unstable",
        }
    }
}

/// The guest image directory (vmlinuz, initramfs.gz), built if needed:
/// the default kernel (6.12, else 6.1), or `suite`'s.
pub fn ensure_guest(suite: Option<KernelSuite>) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let script = root.join("xtask/scripts/build-guest.sh");
    let init = root.join("xtask/guest/init.sh");
    let programs = build_guest_programs()?;
    let mut recipe = vec![script.clone(), init];
    recipe.extend(programs.iter().cloned());
    let hash = recipe_hash(&recipe)?;
    let dir = cache_root()?.join(match suite {
        None => format!("guest-{hash}"),
        Some(suite) => format!("guest-{hash}-{}", suite.name()),
    });
    if dir.join("initramfs.gz").is_file() && dir.join("vmlinuz").is_file() {
        eprintln!("[xtask] guest image: {} (cached)", dir.display());
        return Ok(dir);
    }
    anyhow::ensure!(
        is_root(),
        "building the guest image needs root (apt-get install busybox-static cpio; apt-get download of the kernel)"
    );
    eprintln!("[xtask] building the guest image into {}", dir.display());
    let mut command = Command::new("bash");
    command
        .arg(&script)
        .arg(&dir)
        .arg(suite.map_or("", KernelSuite::name))
        .args(&programs);
    let status = command.status().context("running build-guest.sh")?;
    anyhow::ensure!(
        status.success(),
        "building the guest image failed ({status})"
    );
    Ok(dir)
}

pub fn firmware_dirs() -> Vec<PathBuf> {
    ["/usr/share/seabios", "/usr/share/qemu"]
        .iter()
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir())
        .collect()
}

/// KVM only when a guest really boots with it; `BALLOON_ACCEL` forces one.
fn choose_accel(env: &TestEnv) -> anyhow::Result<String> {
    match std::env::var("BALLOON_ACCEL").unwrap_or_default().as_str() {
        "" => {}
        forced @ ("kvm" | "tcg") => {
            eprintln!("[xtask] accelerator: {forced} (BALLOON_ACCEL)");
            return Ok(forced.to_string());
        }
        other => anyhow::bail!("BALLOON_ACCEL must be kvm or tcg, got {other:?}"),
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("[xtask] accelerator: tcg (no /dev/kvm)");
        return Ok("tcg".into());
    }
    let mut probe_env = env.clone();
    probe_env.accel = "kvm".into();
    let config = VmConfig {
        mem_mib: 256,
        quiet: true,
        ..VmConfig::default()
    };
    // A working KVM boots this guest in well under a second; a broken one
    // stops the VM with an emulation failure and QEMU waits forever.
    let works = Vm::boot_within(&probe_env, &config, std::time::Duration::from_secs(30))
        .and_then(|mut vm| vm.sh("echo probe").map(|out| out.contains("probe")))
        .unwrap_or(false);
    let accel = if works { "kvm" } else { "tcg" };
    eprintln!(
        "[xtask] accelerator: {accel} (KVM probe boot {})",
        if works { "succeeded" } else { "failed" }
    );
    Ok(accel.into())
}

/// Release builds of the binaries the real-guest tests and the demo run.
fn build_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = workspace_root();
    let status = Command::new(cargo())
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "balloon-backend",
            "-p",
            "host-policy",
            "-p",
            "balloonctl",
        ])
        .status()
        .context("building balloon-backend, host-policy and balloonctl")?;
    anyhow::ensure!(
        status.success(),
        "building balloon-backend, host-policy and balloonctl failed"
    );
    let release = root.join("target/release");
    Ok((release.join("balloon-backend"), release.join("host-policy")))
}

/// Debian's packages the tests drive, by a program each installs: the
/// Prometheus server and promtool, tmux for the terminal view, curl for
/// HTTP over a Unix socket.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("promtool", "prometheus"),
    ("tmux", "tmux"),
    ("curl", "curl"),
];

/// Installs the packages of `wanted` whose program is missing, from the
/// machine's configured apt sources.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(program, _)| {
            !std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
            })
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("[xtask] installing {}", missing.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("installing {} (apt-get install)", missing.join(" ")))?;
    anyhow::ensure!(
        status.success(),
        "apt-get install {} failed",
        missing.join(" ")
    );
    Ok(())
}

/// Everything, recorded in `target/balloon-env.json` for the tests.
pub fn ensure_all() -> anyhow::Result<TestEnv> {
    ensure_packages(TEST_PACKAGES)?;
    let qemu = ensure_qemu()?;
    let guest_dir = ensure_guest(None)?;
    let (backend_binary, host_policy_binary) = build_binaries()?;
    let mut env = TestEnv {
        qemu,
        guest_dir,
        accel: "tcg".into(),
        backend_binary,
        host_policy_binary,
        firmware_dirs: firmware_dirs(),
    };
    env.accel = choose_accel(&env)?;
    env.save(&workspace_root())?;
    Ok(env)
}

/// Runs `command` and returns what it did, whatever its exit status.
pub fn output(command: &mut Command) -> anyhow::Result<Output> {
    command
        .output()
        .with_context(|| format!("running {command:?}"))
}

/// Runs `command`; its stdout, or an error with its status and output.
pub fn succeed(command: &mut Command) -> anyhow::Result<String> {
    let out = output(command)?;
    anyhow::ensure!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
