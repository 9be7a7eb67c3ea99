//! The package on this host under a real libvirt (part of `cargo xtask
//! package-test`): installs Debian's libvirt (bookworm-backports) when
//! missing, our package and balloon-stack-qemu (`cargo xtask qemu-deb`),
//! starts virtlogd and libvirtd when they are not running, and checks with
//! a domain of the documented XML, the packaged QEMU as its emulator (no
//! `-L`: the package finds Debian's firmware) and libvirt's default
//! unprivileged QEMU user, that the
//! hook starts the domain's backend, that a target set over the control
//! socket is reached and the domain's host-resident RAM falls, that
//! `virsh save` and `virsh restore` keep the balloon and the memory it
//! returned (the device-state migration of `vhost-user-balloon-pci`),
//! that `virsh destroy` stops the backend and removes its sockets, and that
//! a domain without the device is left alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use balloon_protocol::control::ControlClient;
use guest_tests::backend::{self, ControlWaits};
use guest_tests::memfd_residency;

use crate::package_test::{ensure_gone, process_uid, wait_exited};
use crate::provision::succeed;

const DOMAIN: &str = "balloon-stack-test";
const PLAIN_DOMAIN: &str = "balloon-stack-test-plain";
/// Where the emulator and the guest image are copied: libvirt's QEMU user
/// cannot read root's cache.
const SHARED: &str = "/var/lib/balloon-stack-test";
const MIB: u64 = 1 << 20;
const GUEST_MIB: u64 = 512;
const TARGET_MIB: u64 = 256;

const LIBVIRT_PACKAGES: [&str; 3] = [
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
];

fn ensure_libvirt() -> anyhow::Result<()> {
    if Path::new("/usr/sbin/libvirtd").is_file() && Path::new("/usr/bin/virsh").is_file() {
        return Ok(());
    }
    // 11.x from bookworm-backports (build-guest.sh added that source);
    // bookworm's own 9.0 works too.
    eprintln!("[libvirt] installing {}", LIBVIRT_PACKAGES.join(" "));
    let backports = succeed(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "-t",
                "bookworm-backports",
                LIBVIRT_PACKAGES[0],
                LIBVIRT_PACKAGES[1],
                LIBVIRT_PACKAGES[2],
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if backports.is_err() {
        succeed(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(LIBVIRT_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

fn running(program: &str) -> bool {
    Command::new("pidof")
        .arg(program)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether systemd is this host's init (the hook then starts backends as
/// units), as the hook itself decides.
fn with_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn start_daemons() -> anyhow::Result<()> {
    for daemon in ["virtlogd", "libvirtd"] {
        if running(daemon) {
            continue;
        }
        // Under systemd its units own the sockets: start those.
        if with_systemd() {
            succeed(Command::new("systemctl").args(["start", &format!("{daemon}.service")]))?;
        } else {
            succeed(Command::new(daemon).arg("-d"))?;
        }
    }
    test_support::wait::wait_for_every(
        "libvirtd to answer",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            Ok(Command::new("virsh")
                .args(["-c", "qemu:///system", "version"])
                .output()
                .is_ok_and(|o| o.status.success())
                .then_some(()))
        },
    )
}

fn virsh(args: &[&str]) -> anyhow::Result<String> {
    succeed(
        Command::new("virsh")
            .args(["-c", "qemu:///system"])
            .args(args),
    )
}

/// The domain XML of docs/install.md for `name`, booting the test guest
/// with all its RAM allocated at start (so that ballooned memory shows).
fn domain_xml(name: &str, emulator: &Path, with_balloon: bool) -> String {
    let balloon = if with_balloon {
        format!(
            "<qemu:arg value='-chardev'/>\
             <qemu:arg value='socket,id=bal0,path=/run/balloon/{name}/balloon.sock,reconnect-ms=1000'/>\
             <qemu:arg value='-device'/>\
             <qemu:arg value='vhost-user-balloon-pci,chardev=bal0'/>"
        )
    } else {
        String::new()
    };
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
         <name>{name}</name><memory unit='MiB'>{GUEST_MIB}</memory><vcpu>1</vcpu>\
         <memoryBacking><source type='memfd'/><access mode='shared'/><allocation mode='immediate'/></memoryBacking>\
         <os><type arch='x86_64' machine='pc'>hvm</type>\
         <kernel>{SHARED}/vmlinuz</kernel><initrd>{SHARED}/initramfs.gz</initrd>\
         <cmdline>console=ttyS0 quiet loglevel=1 panic=-1</cmdline></os>\
         <cpu><numa><cell id='0' cpus='0' memory='{GUEST_MIB}' unit='MiB'/></numa></cpu>\
         <devices><emulator>{}</emulator>\
         <serial type='file'><source path='{SHARED}/{name}.console'/></serial>\
         <memballoon model='none'/></devices>\
         <qemu:commandline>{balloon}</qemu:commandline>\
         </domain>",
        emulator.display()
    )
}

fn define(name: &str, xml: &str) -> anyhow::Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), xml)?;
    // A domain left by an earlier failed run goes first.
    if virsh(&["dominfo", name]).is_ok() {
        if let Err(error) = virsh(&["destroy", name]) {
            eprintln!("[libvirt] {name} was not running: {error:#}");
        }
        virsh(&["undefine", name])?;
    }
    virsh(&["define", &file.path().display().to_string()])?;
    Ok(())
}

fn qemu_pid(name: &str) -> anyhow::Result<u32> {
    let path = format!("/run/libvirt/qemu/{name}.pid");
    std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("the pid in {path}"))
}

fn process_user(pid: u32) -> anyhow::Result<String> {
    let uid = process_uid(pid)?.to_string();
    Ok(succeed(Command::new("getent").args(["passwd", &uid]))?
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string())
}

fn resident_bytes(name: &str) -> anyhow::Result<u64> {
    let memfd = memfd_residency::guest_ram_memfd(qemu_pid(name)?)?;
    memfd_residency::allocated_bytes(&memfd)
}

/// Copies the guest image where libvirt's QEMU user can read it.
fn share_guest(env: &guest_tests::env::TestEnv) -> anyhow::Result<()> {
    if Path::new(SHARED).exists() {
        std::fs::remove_dir_all(SHARED)?;
    }
    std::fs::create_dir_all(SHARED)?;
    std::fs::copy(env.kernel(), format!("{SHARED}/vmlinuz"))?;
    std::fs::copy(env.initramfs(), format!("{SHARED}/initramfs.gz"))?;
    succeed(Command::new("chmod").args(["-R", "a+rX", SHARED]))?;
    Ok(())
}

/// `apt-get install ./PACKAGE.deb` (its Depends from the archive).
fn apt_install(deb: &Path) -> anyhow::Result<()> {
    succeed(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .arg(deb)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

/// Installs both packages (balloon-stack-qemu for the domains' emulator),
/// runs the checks, and purges them again whatever the outcome.
pub fn run(deb: &Path, qemu_deb: &Path, env: &guest_tests::env::TestEnv) -> anyhow::Result<()> {
    ensure_libvirt()?;
    apt_install(qemu_deb)?;
    let result = succeed(Command::new("dpkg").arg("-i").arg(deb)).and_then(|_| checks(env));
    // The host as it was, but for libvirt.
    let purged = succeed(
        Command::new("dpkg")
            .args(["-P", crate::deb::PACKAGE, crate::qemu_deb::PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    result?;
    purged?;
    Ok(())
}

fn checks(env: &guest_tests::env::TestEnv) -> anyhow::Result<()> {
    // The packaged emulator, as docs/install.md has the domain use it.
    let emulator = PathBuf::from(crate::qemu_deb::EMULATOR);
    share_guest(env)?;
    start_daemons()?;

    define(DOMAIN, &domain_xml(DOMAIN, &emulator, true))?;
    // Without its backend QEMU waits for the socket: `virsh start` times
    // out and the paused domain is destroyed.
    let result = virsh(&["start", DOMAIN])
        .and_then(|_| check_balloon_domain())
        .and_then(|(_, qemu_user)| Ok((check_save_and_restore()?, qemu_user)));
    if let Err(error) = virsh(&["destroy", DOMAIN]) {
        eprintln!("[libvirt] destroying {DOMAIN}: {error:#}");
    }
    let (backend_pid, qemu_user) = result?;
    eprintln!("[libvirt] {DOMAIN}: QEMU ran as {qemu_user}, the backend as balloon");
    wait_exited(backend_pid, Duration::from_secs(15))?;
    ensure_gone(&[
        PathBuf::from(format!("/run/balloon/{DOMAIN}/balloon.sock")),
        PathBuf::from(format!("/run/balloon/{DOMAIN}.ctl")),
        PathBuf::from(format!("/run/balloon/{DOMAIN}")),
    ])?;
    virsh(&["undefine", DOMAIN])?;

    // A domain without the device: the hook leaves it alone.
    define(PLAIN_DOMAIN, &domain_xml(PLAIN_DOMAIN, &emulator, false))?;
    virsh(&["start", PLAIN_DOMAIN])?;
    let untouched = !Path::new(&format!("/run/balloon/{PLAIN_DOMAIN}")).exists()
        && !Path::new(&format!("/run/balloon/{PLAIN_DOMAIN}.pid")).exists()
        && !Path::new(&format!("/run/balloon/{PLAIN_DOMAIN}.ctl")).exists();
    virsh(&["destroy", PLAIN_DOMAIN])?;
    virsh(&["undefine", PLAIN_DOMAIN])?;
    anyhow::ensure!(untouched, "the hook acted on a domain without the balloon");
    eprintln!("[libvirt] a domain without the device was left alone");
    Ok(())
}

/// While the domain runs: its backend (started by the hook), QEMU as the
/// unprivileged user, a target reached and host-resident RAM falling.
fn check_balloon_domain() -> anyhow::Result<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let backend_pid = hook_backend_pid()?;
    anyhow::ensure!(
        process_user(backend_pid)? == "balloon",
        "the backend does not run as balloon"
    );
    let qemu_user = process_user(qemu_pid(DOMAIN)?)?;
    anyhow::ensure!(qemu_user != "root", "QEMU runs as root");
    let socket = std::fs::metadata(format!("/run/balloon/{DOMAIN}/balloon.sock"))?;
    anyhow::ensure!(
        socket.mode() & 0o777 == 0o660,
        "socket mode {:o}",
        socket.mode()
    );
    let mut control = backend::connect(Path::new(&format!("/run/balloon/{DOMAIN}.ctl")))?;
    control.wait_negotiated(Duration::from_secs(120))?;
    let before = resident_bytes(DOMAIN)?;
    control.set_target(TARGET_MIB * MIB)?;
    control.wait_actual(TARGET_MIB * MIB, Duration::from_secs(120))?;
    let after = resident_bytes(DOMAIN)?;
    eprintln!(
        "[libvirt] {DOMAIN}: host-resident guest RAM {} MiB -> {} MiB with a {TARGET_MIB} MiB balloon",
        before / MIB,
        after / MIB
    );
    anyhow::ensure!(
        after.saturating_add((TARGET_MIB - 32) * MIB) <= before,
        "host-resident RAM fell from {before} to {after} bytes only"
    );
    control.set_target(0)?;
    control.wait_actual(0, Duration::from_secs(120))?;
    check_packaged_policy(&mut control)?;
    Ok((backend_pid, qemu_user))
}

/// The hook's backend of the running domain: the main process of
/// `balloon-backend@DOMAIN` under systemd, else the hook's pid file.
fn hook_backend_pid() -> anyhow::Result<u32> {
    if with_systemd() {
        let unit = format!("balloon-backend@{DOMAIN}.service");
        let pid: u32 =
            succeed(Command::new("systemctl").args(["show", "-p", "MainPID", "--value", &unit]))?
                .trim()
                .parse()
                .with_context(|| format!("{unit}'s MainPID"))?;
        anyhow::ensure!(pid != 0, "{unit} does not run (the hook did not start it)");
        return Ok(pid);
    }
    Ok(
        std::fs::read_to_string(format!("/run/balloon/{DOMAIN}.pid"))
            .context("the hook's pid file (the backend did not start through the hook)")?
            .trim()
            .parse()?,
    )
}

/// `virsh save` with a 256 MiB balloon, then `virsh restore`: the restored
/// domain's new backend holds the same balloon and the restored QEMU's
/// guest RAM stays returned. The new backend's pid.
fn check_save_and_restore() -> anyhow::Result<u32> {
    let control_path = PathBuf::from(format!("/run/balloon/{DOMAIN}.ctl"));
    let mut control = backend::connect(&control_path)?;
    control.set_target(TARGET_MIB * MIB)?;
    control.wait_actual(TARGET_MIB * MIB, Duration::from_secs(120))?;
    let saved_backend = hook_backend_pid()?;
    let image = Path::new(SHARED).join(format!("{DOMAIN}.save"));
    let image_text = image.display().to_string();
    virsh(&["save", DOMAIN, &image_text])?;
    wait_exited(saved_backend, Duration::from_secs(15))?;
    let restored = virsh(&["restore", &image_text]);
    if let Err(error) = std::fs::remove_file(&image) {
        eprintln!("[libvirt] removing {}: {error}", image.display());
    }
    restored?;
    let mut control = test_support::wait::wait_for_every(
        "the restored domain's backend",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || Ok(backend::connect(&control_path).ok()),
    )?;
    let status = control.wait_actual(TARGET_MIB * MIB, Duration::from_secs(120))?;
    anyhow::ensure!(
        status.ballooned_bytes == TARGET_MIB * MIB && status.target_bytes == TARGET_MIB * MIB,
        "the restored balloon: {status:?}"
    );
    let resident = resident_bytes(DOMAIN)?;
    eprintln!(
        "[libvirt] {DOMAIN}: after virsh save and restore, balloon {TARGET_MIB} MiB, host-resident guest RAM {} MiB",
        resident / MIB
    );
    anyhow::ensure!(
        resident <= (GUEST_MIB - TARGET_MIB + 8) * MIB,
        "the restored domain holds {resident} bytes of guest RAM: the balloon's memory came back"
    );
    control.set_target(0)?;
    control.wait_actual(0, Duration::from_secs(120))?;
    hook_backend_pid()
}

/// host-policy as its unit runs it (the `balloon` user, the installed
/// configuration, which discovers the VM by its control socket) but with
/// host memory read from a file that says the host is short: it must find
/// the domain and reclaim from it.
fn check_packaged_policy(control: &mut ControlClient) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let meminfo = dir.path().join("meminfo");
    guest_tests::host_policy_process::write_meminfo(&meminfo, 16384, 1024)?;
    let installed = std::fs::read_to_string("/etc/balloon-stack/host-policy.toml")?;
    anyhow::ensure!(
        installed.contains("meminfo = \"/proc/meminfo\"") && installed.contains("interval_s = 5"),
        "the installed configuration changed; update this test:\n{installed}"
    );
    let config = dir.path().join("host-policy.toml");
    std::fs::write(
        &config,
        installed
            .replace(
                "meminfo = \"/proc/meminfo\"",
                &format!("meminfo = {meminfo:?}"),
            )
            .replace("interval_s = 5", "interval_s = 1")
            .replace(
                "state_file = \"/run/balloon/host-policy.json\"",
                &format!("state_file = {:?}", dir.path().join("state.json")),
            ),
    )?;
    succeed(
        Command::new("chown")
            .arg("-R")
            .arg("balloon:balloon")
            .arg(dir.path()),
    )?;
    let check = succeed(
        Command::new("setpriv")
            .args([
                "--reuid=balloon",
                "--regid=balloon",
                "--clear-groups",
                "host-policy",
                "check",
                "--config",
            ])
            .arg(&config),
    )?;
    anyhow::ensure!(
        check.contains(&format!("vm {DOMAIN}:")),
        "host-policy does not discover {DOMAIN}:\n{check}"
    );
    let child = Command::new("setpriv")
        .args([
            "--reuid=balloon",
            "--regid=balloon",
            "--clear-groups",
            "host-policy",
            "run",
            "--config",
        ])
        .arg(&config)
        .stderr(std::fs::File::create(dir.path().join("host-policy.log"))?)
        .spawn()
        .context("starting host-policy")?;
    let _policy = test_support::ChildGuard::new("host-policy", child);
    let reclaimed = test_support::wait::wait_for_every(
        "host-policy to reclaim from the domain",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let actual = control.status()?.actual_bytes;
            Ok((actual >= 64 * MIB).then_some(actual))
        },
    )
    .with_context(|| {
        let log = std::fs::read_to_string(dir.path().join("host-policy.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let status = control
            .status()
            .map(|s| format!("{s:?}"))
            .unwrap_or_default();
        format!(
            "the backend's status: {status}\nhost-policy's log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    })?;
    eprintln!(
        "[libvirt] host-policy (balloon user, installed configuration) found {DOMAIN} and reclaimed {} MiB",
        reclaimed / MIB
    );
    Ok(())
}
