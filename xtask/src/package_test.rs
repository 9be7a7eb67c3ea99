//! `cargo xtask package-test` (root; CI runs it): the Debian package and
//! what it installs, checked with Debian's own tools. Builds the package;
//! its contents must list every file it promises; lintian must report no
//! error; in a clean Debian 12 root (debootstrap, cached) `dpkg -i`
//! installs it with only its declared dependencies, `systemd-analyze
//! verify` and `security` and the root's own `systemd-analyze
//! syscall-filter` judge its units, the programs run, the user and
//! directories exist, the libvirt hook starts and stops a domain's backend
//! (without systemd: its pid-file path) and leaves other domains alone,
//! and `dpkg -r` / `dpkg -P` remove it cleanly. Then the same root is
//! booted with systemd as PID 1, once with Debian 12's systemd 252 and
//! once with bookworm-backports' 254+, and the units run for real with a
//! guest attached (`systemd_test`). Last, the package is installed on this
//! host and run under a real libvirt (`libvirt_test`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::Context;

use crate::deb::PACKAGE;
use crate::provision::{cache_root, ensure_packages, is_root, output, succeed, workspace_root};

/// Paths `dpkg-deb --contents` must list.
const PROMISED: &[&str] = &[
    "./usr/bin/balloon-backend",
    "./usr/bin/host-policy",
    "./usr/bin/balloonctl",
    "./usr/share/balloon-stack/guest/guest-agent",
    "./lib/systemd/system/balloon-backend@.service",
    "./lib/systemd/system/host-policy.service",
    "./usr/lib/tmpfiles.d/balloon-stack.conf",
    "./etc/balloon-stack/host-policy.toml",
    "./etc/balloon-stack/vm.d/",
    "./etc/libvirt/hooks/qemu.d/balloon-stack",
    "./usr/share/man/man1/balloon-backend.1.gz",
    "./usr/share/man/man1/host-policy.1.gz",
    "./usr/share/man/man1/balloonctl.1.gz",
    "./usr/share/bash-completion/completions/balloonctl",
    "./usr/share/bash-completion/completions/host-policy",
    "./usr/share/bash-completion/completions/balloon-backend",
    "./usr/share/zsh/vendor-completions/_balloonctl",
    "./usr/share/fish/vendor_completions.d/balloonctl.fish",
    "./usr/share/doc/balloon-stack/copyright",
    "./usr/share/doc/balloon-stack/changelog.Debian.gz",
    "./usr/share/doc/balloon-stack/install.md",
    "./usr/share/doc/balloon-stack/host-policy.md",
    "./usr/share/balloon-stack/prometheus/balloon-stack-alerts.yml",
];

/// The most systemd-analyze's exposure score (0 safest, 10 most exposed)
/// a unit may have.
pub const MAX_EXPOSURE: f64 = 2.5;

/// The real user id of process `pid`.
pub fn process_uid(pid: u32) -> anyhow::Result<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no Uid in /proc/{pid}/status"))
}

/// Waits until process `pid` has exited (a stopped backend).
pub fn wait_exited(pid: u32, timeout: Duration) -> anyhow::Result<()> {
    test_support::wait::wait_for_every(
        &format!("process {pid} to exit"),
        timeout,
        Duration::from_millis(100),
        || Ok((!Path::new(&format!("/proc/{pid}")).exists()).then_some(())),
    )
}

/// Fails naming the first of `paths` that still exists.
pub fn ensure_gone(paths: &[PathBuf]) -> anyhow::Result<()> {
    match paths.iter().find(|p| p.exists()) {
        Some(left) => anyhow::bail!("{} is left after the backend stopped", left.display()),
        None => Ok(()),
    }
}

pub fn check_contents(deb: &Path, promised: &[&str]) -> anyhow::Result<()> {
    let listing = succeed(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .collect();
    let missing: Vec<&&str> = promised.iter().filter(|p| !paths.contains(p)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the package lacks {missing:?}; it holds:\n{listing}"
    );
    eprintln!(
        "[package] contents: {} paths, all promised ones",
        paths.len()
    );
    Ok(())
}

/// lintian's tags by severity letter.
pub fn lintian(deb: &Path) -> anyhow::Result<Vec<String>> {
    ensure_packages(&[("lintian", "lintian")])?;
    // lintian exits non-zero for errors; its report is what is judged.
    let out = output(
        Command::new("lintian")
            .args(["--no-tag-display-limit", "--display-info"])
            .arg(deb),
    )?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !stderr.contains("internal error"),
        "lintian failed: {stderr}"
    );
    let errors: Vec<String> = report
        .lines()
        .filter(|l| l.starts_with("E: "))
        .map(str::to_string)
        .collect();
    anyhow::ensure!(errors.is_empty(), "lintian reports errors:\n{report}");
    for line in report.lines().filter(|l| !l.starts_with("N: ")) {
        eprintln!("[package] lintian {line}");
    }
    eprintln!(
        "[package] lintian {}: no errors, {} warnings, {} notes",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        report.lines().filter(|l| l.starts_with("W: ")).count(),
        report.lines().filter(|l| l.starts_with("I: ")).count()
    );
    Ok(report.lines().map(str::to_string).collect())
}

/// The backend unit's system-call filter, read with the sets of the
/// root's own systemd (never the host's: the sets differ between
/// versions), must allow every call of the backend's seccomp lists, or the
/// backend would fail under systemd only.
fn check_backend_syscalls(chroot: &Chroot) -> anyhow::Result<()> {
    let sets =
        crate::syscall_filter::Sets::parse(&chroot.run("systemd-analyze", &["syscall-filter"])?);
    let version = chroot.run("systemctl", &["--version"])?;
    let version = version.lines().next().unwrap_or_default();
    let unit =
        std::fs::read_to_string(chroot.path("/lib/systemd/system/balloon-backend@.service"))?;
    let calls =
        crate::syscall_filter::check_backend_unit(&unit, &sets, &format!("the root's {version}"))?;
    eprintln!(
        "[package] the backend unit's system-call filter allows all {calls} calls of the backend's seccomp lists (sets of the root's {version})"
    );
    Ok(())
}

/// The exposure score `systemd-analyze security` gives `unit`.
pub fn exposure_score(security: &str, unit: &str) -> anyhow::Result<f64> {
    security
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("no exposure level for {unit} in:\n{security}"))
}

/// `systemd-analyze verify` on the units as installed in the root `root`
/// (which has systemd, as a host has), and each unit's exposure score from
/// `systemd-analyze security`.
fn systemd_checks(root: &Path) -> anyhow::Result<Vec<(String, f64)>> {
    let units = root.join("lib/systemd/system");
    // An instance of the template, as systemd would load it.
    let instance = units.join("balloon-backend@vm1.service");
    std::fs::copy(units.join("balloon-backend@.service"), &instance)?;
    let mut scores = Vec::new();
    for unit in ["balloon-backend@vm1.service", "host-policy.service"] {
        let path = units.join(unit);
        let verify = output(
            Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(format!("--root={}", root.display()))
                .arg(&path),
        )?;
        let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
        anyhow::ensure!(
            verify.status.success() && complaints.trim().is_empty(),
            "systemd-analyze verify {unit}:\n{complaints}"
        );
        let security = succeed(
            Command::new("systemd-analyze")
                .args(["security", "--no-pager", "--offline=true"])
                .arg(format!("--root={}", root.display()))
                .arg(&path),
        )?;
        let score = exposure_score(&security, unit)?;
        eprintln!("[package] systemd-analyze security {unit}: {score}");
        anyhow::ensure!(
            score <= MAX_EXPOSURE,
            "{unit}: exposure {score}, more than {MAX_EXPOSURE}:\n{security}"
        );
        scores.push((unit.to_string(), score));
    }
    std::fs::remove_file(&instance)?;
    Ok(scores)
}

/// A minimal Debian 12 root with systemd (as a host has; the package does
/// not depend on it), made once with debootstrap from the machine's own
/// apt source and kept in the cache.
pub fn debian_root() -> anyhow::Result<PathBuf> {
    let cached = cache_root()?.join("debootstrap-bookworm-systemd");
    if cached.join("usr/bin/dpkg").is_file() {
        return Ok(cached);
    }
    ensure_packages(&[("debootstrap", "debootstrap")])?;
    let mirror =
        succeed(Command::new("bash").arg(workspace_root().join("xtask/scripts/debian-mirror.sh")))?;
    let work = cached.with_extension("work");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    eprintln!(
        "[package] debootstrap --variant=minbase --include=systemd bookworm (once, a few minutes)"
    );
    succeed(
        Command::new("debootstrap")
            .args(["--variant=minbase", "--include=systemd", "bookworm"])
            .arg(&work)
            .arg(mirror.trim()),
    )?;
    std::fs::rename(&work, &cached)?;
    Ok(cached)
}

/// A copy of the cached root to install into, with /proc mounted for the
/// backend; unmounted and deleted on drop.
struct Chroot {
    root: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Chroot {
    fn new(template: &Path) -> anyhow::Result<Self> {
        // Not in /tmp: a tmpfs mounted nodev there (systemd's tmp.mount,
        // Debian 13's default; any systemd-nspawn container) makes the
        // root's /dev/null unopenable (EACCES) and every shell redirect
        // fails.
        let scratch = tempfile::Builder::new()
            .prefix("balloon-chroot")
            .tempdir_in("/var/tmp")?;
        let root = scratch.path().join("root");
        succeed(Command::new("cp").arg("-a").arg(template).arg(&root))?;
        succeed(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(root.join("proc")),
        )?;
        Ok(Chroot {
            root,
            _scratch: scratch,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("chroot");
        command
            .arg(&self.root)
            .arg(program)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        command
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        succeed(self.command(program).args(args))
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        // Backends the hook started and a failed test left behind, by
        // their pid files.
        let pids = std::fs::read_dir(self.path("/run/balloon"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok());
        for pid in pids {
            if let Err(error) = Command::new("kill").arg(pid.trim()).status() {
                eprintln!("[package] stopping a leftover backend: {error}");
            }
        }
        if let Err(error) = Command::new("umount")
            .arg("-l")
            .arg(self.root.join("proc"))
            .status()
        {
            eprintln!("[package] unmounting the chroot's /proc: {error}");
        }
    }
}

const DOMAIN_XML: &str =
    "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
<name>NAME</name><qemu:commandline><qemu:arg value='-chardev'/>\
<qemu:arg value='socket,id=bal0,path=/run/balloon/NAME/balloon.sock,reconnect-ms=1000'/>\
<qemu:arg value='-device'/>\
<qemu:arg value='vhost-user-test-device-pci,chardev=bal0,virtio-id=5,num_vqs=5,config_size=16'/>\
</qemu:commandline>METADATA</domain>";

/// The libvirt hook as installed.
pub const HOOK: &str = "/etc/libvirt/hooks/qemu.d/balloon-stack";

/// Runs the installed hook as libvirt would, with `xml` on stdin.
fn hook(chroot: &Chroot, domain: &str, operation: &str, xml: &str) -> anyhow::Result<Output> {
    run_hook(chroot.command(HOOK), domain, operation, xml)
}

/// Runs `command` (the hook, in a root) as libvirt runs a hook:
/// `DOMAIN OPERATION begin -` with the domain's XML on stdin.
pub fn run_hook(
    mut command: Command,
    domain: &str,
    operation: &str,
    xml: &str,
) -> anyhow::Result<Output> {
    use std::io::Write;
    let mut child = command
        .args([domain, operation, "begin", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let written = child
        .stdin
        .take()
        .context("the hook's stdin")?
        .write_all(xml.as_bytes());
    // For operations it ignores the hook exits without reading the XML,
    // as libvirt allows: a closed pipe is not a failure.
    match written {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => return Err(error.into()),
        _ => {}
    }
    Ok(child.wait_with_output()?)
}

pub fn domain_xml(name: &str, metadata: &str) -> String {
    DOMAIN_XML
        .replace("NAME", name)
        .replace("METADATA", metadata)
}

fn check_hook(chroot: &Chroot) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    // libvirt's QEMU group, as its package would create it.
    chroot.run("groupadd", &["--system", "libvirt-qemu"])?;
    let gid: u32 = chroot
        .run("getent", &["group", "libvirt-qemu"])?
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .context("libvirt-qemu's gid")?;

    // A domain with our device: its backend starts before QEMU would.
    let xml = domain_xml(
        "vm1",
        "<metadata><balloon:backend xmlns:balloon='urn:balloon-stack:libvirt:1' max-reclaim-percent='40'/></metadata>",
    );
    let out = hook(chroot, "vm1", "prepare", &xml)?;
    anyhow::ensure!(
        out.status.success(),
        "hook prepare failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = chroot.path("/run/balloon/vm1/balloon.sock");
    let meta = std::fs::metadata(&socket).context("the backend's socket")?;
    anyhow::ensure!(meta.file_type().is_socket(), "not a socket");
    anyhow::ensure!(
        meta.gid() == gid && meta.permissions().mode() & 0o777 == 0o660,
        "the socket is {:o} gid {} (want 0660, libvirt-qemu {gid})",
        meta.permissions().mode() & 0o777,
        meta.gid()
    );
    let mut control = guest_tests::backend::connect(&chroot.path("/run/balloon/vm1.ctl"))?;
    let status = control.status()?;
    anyhow::ensure!(
        status.max_reclaim_percent == 40,
        "the metadata's limit did not reach the backend: {status:?}"
    );
    let pid: u32 = std::fs::read_to_string(chroot.path("/run/balloon/vm1.pid"))?
        .trim()
        .parse()?;
    let user = process_uid(pid)?.to_string();
    let balloon_uid = chroot.run("id", &["-u", "balloon"])?.trim().to_string();
    anyhow::ensure!(
        user == balloon_uid,
        "the backend runs as uid {user}, not balloon's {balloon_uid}"
    );
    drop(control);

    // Release: the backend stops and its sockets go.
    let out = hook(chroot, "vm1", "release", &xml)?;
    anyhow::ensure!(out.status.success(), "hook release failed");
    wait_exited(pid, Duration::from_secs(10))?;
    ensure_gone(&[
        chroot.path("/run/balloon/vm1/balloon.sock"),
        chroot.path("/run/balloon/vm1.ctl"),
        chroot.path("/run/balloon/vm1"),
    ])?;

    // Another domain: nothing happens, whatever the operation.
    let plain = "<domain type='kvm'><name>plain</name><devices><memballoon model='virtio'/></devices></domain>";
    for operation in ["prepare", "start", "release"] {
        let out = hook(chroot, "plain", operation, plain)?;
        anyhow::ensure!(
            out.status.success(),
            "hook {operation} of a plain domain failed"
        );
    }
    anyhow::ensure!(
        !chroot.path("/run/balloon/plain").exists(),
        "the hook acted on a plain domain"
    );

    // A bad limit in the metadata: the domain does not start, and the
    // message names the attribute and the accepted values.
    let bad = domain_xml(
        "vm2",
        "<metadata><balloon:backend xmlns:balloon='urn:balloon-stack:libvirt:1' max-reclaim-percent='90'/></metadata>",
    );
    let out = hook(chroot, "vm2", "prepare", &bad)?;
    let message = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success()
            && message.contains("max-reclaim-percent")
            && message.contains("0 to 75"),
        "a limit of 90 was not refused clearly: {message}"
    );
    anyhow::ensure!(
        !chroot.path("/run/balloon/vm2").exists(),
        "a refused domain left a directory"
    );
    eprintln!("[package] libvirt hook (no systemd): starts, stops, ignores, refuses");
    Ok(())
}

fn check_install(deb: &Path) -> anyhow::Result<()> {
    let template = debian_root()?;
    let chroot = Chroot::new(&template)?;
    let inside = format!(
        "/tmp/{}",
        deb.file_name().and_then(|n| n.to_str()).unwrap_or("x.deb")
    );
    std::fs::copy(deb, chroot.path(&inside))?;
    chroot.run("dpkg", &["-i", &inside])?;
    for program in ["balloon-backend", "host-policy", "balloonctl"] {
        let version = chroot.run(program, &["--version"])?;
        anyhow::ensure!(version.contains(program), "{program} --version: {version}");
        chroot.run(program, &["--help"])?;
    }
    chroot.run("getent", &["passwd", "balloon"])?;
    for path in [
        "/run/balloon",
        "/etc/balloon-stack/host-policy.toml",
        "/etc/balloon-stack/vm.d",
    ] {
        anyhow::ensure!(chroot.path(path).exists(), "{path} missing after install");
    }
    chroot.run(
        "host-policy",
        &["check", "--config", "/etc/balloon-stack/host-policy.toml"],
    )?;
    systemd_checks(&chroot.root)?;
    check_backend_syscalls(&chroot)?;
    check_hook(&chroot)?;
    // Remove keeps the configuration; purge takes it and the user.
    chroot.run("dpkg", &["-r", PACKAGE])?;
    anyhow::ensure!(
        !chroot.path("/usr/bin/balloon-backend").exists(),
        "remove left the binary"
    );
    anyhow::ensure!(
        chroot.path("/etc/balloon-stack/host-policy.toml").exists(),
        "remove took the conffile"
    );
    chroot.run("dpkg", &["-P", PACKAGE])?;
    anyhow::ensure!(
        !chroot.path("/etc/balloon-stack/host-policy.toml").exists(),
        "purge left the conffile"
    );
    anyhow::ensure!(
        output(chroot.command("getent").args(["passwd", "balloon"]))?
            .status
            .code()
            == Some(2),
        "purge left the balloon user"
    );
    eprintln!("[package] debootstrap root: installed, ran, removed, purged");
    Ok(())
}

/// The Debian 12 root with bookworm-backports' systemd (254 or newer, as a
/// host gets when libvirt 11 comes from there), made once from the
/// bookworm root and kept in the cache.
pub fn debian_root_backports_systemd() -> anyhow::Result<PathBuf> {
    let cached = cache_root()?.join("debootstrap-bookworm-systemd-backports");
    if cached.join("usr/bin/dpkg").is_file() {
        return Ok(cached);
    }
    let template = debian_root()?;
    let work = cached.with_extension("work");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    eprintln!("[package] a root with bookworm-backports' systemd (once)");
    succeed(Command::new("cp").arg("-a").arg(&template).arg(&work))?;
    std::fs::copy("/etc/resolv.conf", work.join("etc/resolv.conf"))?;
    // The suite on the archive this machine's apt already uses.
    succeed(
        Command::new("bash")
            .arg(workspace_root().join("xtask/scripts/apt-source.sh"))
            .arg(work.join("etc/apt/sources.list.d/bookworm-backports.sources"))
            .args(["deb", "bookworm-backports"]),
    )?;
    let in_root = |args: &[&str]| {
        succeed(
            Command::new("chroot")
                .arg(&work)
                .args(args)
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    in_root(&["apt-get", "update", "-qq"])?;
    in_root(&[
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "-t",
        "bookworm-backports",
        "systemd",
    ])?;
    in_root(&["apt-get", "clean"])?;
    std::fs::rename(&work, &cached)?;
    Ok(cached)
}

/// The parts of the package test after the package's own checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Installed, run and removed in a Debian 12 root (chroot, no systemd).
    Root,
    /// Booted under systemd 252 and 254+ as PID 1, with a guest attached.
    Systemd,
    /// On this host under a real libvirt.
    Libvirt,
}

/// Every part, or only `only`'s.
pub fn run(only: Option<Part>) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "cargo xtask package-test needs root (debootstrap, chroot, dpkg -i, systemd-nspawn)"
    );
    let wanted = |part| only.is_none_or(|only| only == part);
    let deb = crate::deb::build()?;
    eprintln!("[package] built {}", deb.display());
    check_contents(&deb, PROMISED)?;
    lintian(&deb)?;
    // QEMU (packaged next) and the guest image for the guests below.
    let env = crate::provision::ensure_all()?;
    let qemu_deb = crate::qemu_deb::build(&env.qemu)?;
    eprintln!("[package] built {}", qemu_deb.display());
    check_contents(&qemu_deb, crate::qemu_deb::PROMISED)?;
    let warnings: Vec<String> = lintian(&qemu_deb)?
        .into_iter()
        .filter(|l| l.starts_with("W: "))
        .collect();
    anyhow::ensure!(
        warnings.is_empty(),
        "lintian warns about {}: {warnings:?}",
        crate::qemu_deb::PACKAGE
    );
    if wanted(Part::Root) {
        check_install(&deb)?;
        check_qemu_install(&qemu_deb, &env)?;
    }
    if wanted(Part::Systemd) {
        under_systemd(&deb, &env)?;
    }
    if wanted(Part::Libvirt) {
        crate::libvirt_test::run(&deb, &qemu_deb, &env)?;
    }
    Ok(())
}

/// balloon-stack-qemu in a clean Debian 12 root, installed the way an
/// operator does (`apt-get install ./PACKAGE.deb`: its Depends from the
/// archive): the emulator has our device, boots the test guest with no
/// `-L` (its data files found through the package's links), and a purge
/// takes its prefix.
fn check_qemu_install(qemu_deb: &Path, env: &guest_tests::env::TestEnv) -> anyhow::Result<()> {
    use crate::qemu_deb::{EMULATOR, PACKAGE as QEMU_PACKAGE, PREFIX};
    let chroot = Chroot::new(&debian_root()?)?;
    std::fs::copy("/etc/resolv.conf", chroot.path("/etc/resolv.conf"))?;
    let inside = format!(
        "/var/tmp/{}",
        qemu_deb
            .file_name()
            .and_then(|n| n.to_str())
            .context("the QEMU package's name")?
    );
    std::fs::copy(qemu_deb, chroot.path(&inside))?;
    chroot.run("apt-get", &["update", "-qq"])?;
    succeed(
        chroot
            .command("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", &inside])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let version = chroot.run(EMULATOR, &["--version"])?;
    let devices = chroot.run(EMULATOR, &["-device", "help"])?;
    anyhow::ensure!(
        devices.contains("\"vhost-user-balloon-pci\""),
        "{EMULATOR} has no vhost-user-balloon-pci"
    );
    // The test guest, booted by the packaged emulator inside the root
    // (TCG: the root has no /dev/kvm) with no firmware directory given.
    let guest = chroot.path("/var/tmp/guest");
    std::fs::create_dir_all(&guest)?;
    std::fs::copy(env.kernel(), guest.join("vmlinuz"))?;
    std::fs::copy(env.initramfs(), guest.join("initramfs.gz"))?;
    let scratch = tempfile::tempdir()?;
    let wrapper = scratch.path().join("qemu-in-root");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec chroot {} {EMULATOR} \"$@\"\n",
            chroot.root.display()
        ),
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let in_root = guest_tests::env::TestEnv {
        qemu: wrapper,
        guest_dir: PathBuf::from("/var/tmp/guest"),
        accel: "tcg".into(),
        firmware_dirs: Vec::new(),
        ..env.clone()
    };
    let config = guest_tests::vm::VmConfig {
        mem_mib: 256,
        ..Default::default()
    };
    let mut vm = guest_tests::vm::Vm::boot(&in_root, &config)?;
    anyhow::ensure!(vm.sh("echo alive")? == "alive", "the guest did not answer");
    drop(vm);
    succeed(
        chroot
            .command("apt-get")
            .args(["purge", "-y", "-qq", QEMU_PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    anyhow::ensure!(
        !chroot.path(PREFIX).exists(),
        "purging {QEMU_PACKAGE} left {PREFIX}"
    );
    eprintln!(
        "[package] {QEMU_PACKAGE} in a clean Debian 12 root: apt installed it with its Depends; {} has vhost-user-balloon-pci and booted the test guest without -L; purged",
        version.lines().next().unwrap_or_default()
    );
    Ok(())
}

/// The package booted under Debian 12's systemd and under
/// bookworm-backports'.
fn under_systemd(deb: &Path, env: &guest_tests::env::TestEnv) -> anyhow::Result<()> {
    let mut versions = Vec::new();
    for (template, label, wanted) in [
        (debian_root()?, "Debian 12, its own systemd", 252..=252),
        (
            debian_root_backports_systemd()?,
            "Debian 12, bookworm-backports' systemd",
            254..=u32::MAX,
        ),
    ] {
        let (major, version) = crate::systemd_test::run(&template, label, &[deb], env)?;
        anyhow::ensure!(
            wanted.contains(&major),
            "{label}: booted {version}, not the systemd this run is for ({wanted:?})"
        );
        versions.push(version);
    }
    eprintln!(
        "[package] both units ran under systemd as PID 1: {}",
        versions.join("; ")
    );
    Ok(())
}
