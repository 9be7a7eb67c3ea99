//! `cargo xtask guest-deb-test` (root): the guest package in a real
//! Debian 12 guest. A debootstrap Debian 12 root (systemd 252 as PID 1,
//! plus udev) with `balloon-stack-guest` installed by dpkg is the guest's
//! disk; Debian's cloud kernel boots it under QEMU (a busybox initramfs
//! loads virtio_blk, which that kernel has as a module, and hands over to
//! systemd). Booted twice:
//!
//! - with the port `org.balloon.agent.0`: udev must start the agent
//!   (nothing enabled it), which must send its hello, answer a ping, and
//!   reclaim page cache through its sandbox with the root cgroup's
//!   `memory.reclaim`, with its PSI trigger armed;
//! - without the port: the agent must never start.
//!
//! A oneshot unit in the guest prints the agent unit's state and journal
//! to a second serial port every two seconds; the host reads them there.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::deb::write;
use crate::guest_deb::{PACKAGE, UNIT};
use crate::package_test::debian_root;
use crate::provision::{
    cache_root, ensure_guest, ensure_packages, ensure_qemu, firmware_dirs, is_root, output, succeed,
};

const PORT: &str = balloon_protocol::agent::DEFAULT_PORT_NAME;
/// How long a boot to the first state report may take under TCG.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);

/// Prints the agent unit's state and journal to the second serial port
/// every two seconds, between markers the host looks for.
const REPORTER: &str = "[Unit]
Description=balloon-stack guest-deb-test: report the agent's state
After=multi-user.target

[Service]
Type=simple
ExecStart=/bin/sh -c 'while true; do \
{ echo \"=== begin\"; \
  echo \"system=$(systemctl is-system-running)\"; \
  systemctl show -p ActiveState,SubState,NRestarts,ExecMainStartTimestampMonotonic balloon-guest-agent.service; \
  ls /sys/fs/cgroup/memory.reclaim /proc/pressure/memory 2>&1; \
  echo \"--- journal\"; \
  journalctl -u balloon-guest-agent.service -o cat --no-pager; \
  echo \"=== end\"; } > /dev/ttyS1; sleep 2; done'

[Install]
WantedBy=multi-user.target
";

/// The initramfs's /init: load virtio_blk, mount the disk, hand over to
/// systemd.
const INIT: &str = "#!/bin/busybox sh
/bin/busybox mkdir -p /dev /proc /newroot
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox insmod /virtio_blk.ko
for i in $(/bin/busybox seq 1 100); do
  [ -b /dev/vda ] && break
  /bin/busybox sleep 0.1
done
/bin/busybox mount -t ext4 -o rw /dev/vda /newroot || /bin/busybox sh
/bin/busybox umount /dev
exec /bin/busybox switch_root /newroot /lib/systemd/systemd
";

/// The guest's disk image and boot files, made once and cached: a copy
/// of the Debian 12 root with udev, the package and the reporter unit,
/// and an initramfs with busybox and the kernel's virtio_blk module.
struct Guest {
    kernel: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
}

fn chroot(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    succeed(
        Command::new("chroot")
            .arg(root)
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn prepare(deb: &Path, work: &Path) -> anyhow::Result<Guest> {
    ensure_packages(&[
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("mkfs.ext4", "e2fsprogs"),
        ("xz", "xz-utils"),
    ])?;
    let guest_dir = ensure_guest(None)?;
    let kernel_package = std::fs::read_to_string(guest_dir.join("kernel-package"))?
        .trim()
        .to_string();

    // The root: udev on top of the cached Debian 12 root (once), then
    // the package (every run, fresh).
    let with_udev = cache_root()?.join("debootstrap-bookworm-systemd-udev");
    if !with_udev.join("usr/bin/udevadm").is_file() {
        let staging = with_udev.with_extension("work");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        succeed(
            Command::new("cp")
                .arg("-a")
                .arg(debian_root()?)
                .arg(&staging),
        )?;
        std::fs::copy("/etc/resolv.conf", staging.join("etc/resolv.conf"))?;
        eprintln!("[guest-deb-test] installing udev into a Debian 12 root (once)");
        chroot(&staging, &["apt-get", "update", "-qq"])?;
        chroot(
            &staging,
            &[
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "udev",
            ],
        )?;
        std::fs::rename(&staging, &with_udev)?;
    }
    let root = work.join("root");
    succeed(Command::new("cp").arg("-a").arg(&with_udev).arg(&root))?;
    std::fs::copy(deb, root.join("var/tmp/guest.deb"))?;
    chroot(&root, &["dpkg", "-i", "/var/tmp/guest.deb"])?;
    write(
        &root.join("etc/systemd/system/guest-deb-test-report.service"),
        REPORTER.as_bytes(),
        0o644,
    )?;
    std::fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants"))?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/guest-deb-test-report.service",
        root.join("etc/systemd/system/multi-user.target.wants/guest-deb-test-report.service"),
    )?;
    // No root password prompt, no network wait: nothing else to do.
    write(&root.join("etc/hostname"), b"guest\n", 0o644)?;
    let disk = work.join("disk.img");
    succeed(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&root)
            .arg(&disk)
            .arg("2G"),
    )?;
    std::fs::remove_dir_all(&root)?;

    // The initramfs: busybox, virtio_blk (a module in the cloud kernel).
    let kernel_deb_dir = work.join("kernel");
    std::fs::create_dir_all(&kernel_deb_dir)?;
    succeed(
        Command::new("apt-get")
            .current_dir(&kernel_deb_dir)
            .args(["download", &kernel_package]),
    )?;
    let kernel_deb = std::fs::read_dir(&kernel_deb_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let unpacked = work.join("kernel-files");
    succeed(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&kernel_deb)
            .arg(&unpacked),
    )?;
    let module = succeed(
        Command::new("find")
            .arg(&unpacked)
            .args(["-name", "virtio_blk.ko*"]),
    )?;
    let module = PathBuf::from(
        module
            .lines()
            .next()
            .context("the kernel package has no virtio_blk module")?,
    );
    let initramfs_dir = work.join("initramfs");
    std::fs::create_dir_all(initramfs_dir.join("bin"))?;
    std::fs::copy("/bin/busybox", initramfs_dir.join("bin/busybox"))?;
    let ko = if module.extension().is_some_and(|x| x == "xz") {
        let out = output(Command::new("xz").arg("-dc").arg(&module))?;
        anyhow::ensure!(out.status.success(), "xz -dc {} failed", module.display());
        out.stdout
    } else {
        std::fs::read(&module)?
    };
    write(&initramfs_dir.join("virtio_blk.ko"), &ko, 0o644)?;
    write(&initramfs_dir.join("init"), INIT.as_bytes(), 0o755)?;
    let initramfs = work.join("initramfs.gz");
    succeed(
        Command::new("sh")
            .current_dir(&initramfs_dir)
            .arg("-c")
            .arg(format!(
                "find . | cpio -o -H newc --quiet | gzip -9 > {}",
                initramfs.display()
            )),
    )?;
    Ok(Guest {
        kernel: guest_dir.join("vmlinuz"),
        initramfs,
        disk,
    })
}

/// A running guest: QEMU, its report port's log, the agent's socket.
struct Vm {
    qemu: Child,
    reports: PathBuf,
    console: PathBuf,
    agent: Option<PathBuf>,
}

impl Vm {
    fn start(guest: &Guest, work: &Path, label: &str, with_port: bool) -> anyhow::Result<Vm> {
        let qemu = ensure_qemu()?;
        let reports = work.join(format!("{label}.reports"));
        let console = work.join(format!("{label}.console"));
        let agent = with_port.then(|| work.join(format!("{label}.agent")));
        let accel = std::env::var("BALLOON_ACCEL").unwrap_or_else(|_| "tcg".into());
        let mut command = Command::new(qemu);
        for dir in firmware_dirs() {
            command.arg("-L").arg(dir);
        }
        command
            .args([
                "-machine", "pc", "-accel", &accel, "-m", "1024", "-smp", "1",
            ])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initramfs)
            .args([
                "-append",
                "console=ttyS0 panic=-1 systemd.show_status=0 systemd.unified_cgroup_hierarchy=1",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,snapshot=on",
                guest.disk.display()
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", reports.display()));
        if let Some(socket) = &agent {
            command
                .args(["-device", "virtio-serial-pci"])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=agent0,path={},server=on,wait=off",
                    socket.display()
                ))
                .arg("-device")
                .arg(format!("virtserialport,chardev=agent0,name={PORT}"));
        }
        let qemu = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                work.join(format!("{label}.qemu.err")),
            )?))
            .spawn()
            .context("starting QEMU")?;
        Ok(Vm {
            qemu,
            reports,
            console,
            agent,
        })
    }

    /// The newest complete state report from the guest.
    fn latest_report(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.reports).ok()?;
        let text = text.replace('\r', "");
        let end = text.rfind("=== end")?;
        let begin = text.get(..end)?.rfind("=== begin")?;
        text.get(begin..end).map(str::to_string)
    }

    /// Waits for a report the guest's boot has finished in, which
    /// `done` accepts.
    fn wait_report(
        &mut self,
        what: &str,
        mut done: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            if let Some(status) = self.qemu.try_wait()? {
                anyhow::bail!(
                    "QEMU ended ({status}) before {what}:\n{}",
                    self.console_tail()
                );
            }
            if let Some(report) = self.latest_report() {
                let booted =
                    report.contains("system=running") || report.contains("system=degraded");
                if booted && done(&report) {
                    return Ok(report);
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "no report with {what} in {BOOT_DEADLINE:?}; last: {:?}\nconsole:\n{}",
                    self.latest_report(),
                    self.console_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(error) = self.qemu.kill().and_then(|()| self.qemu.wait().map(|_| ())) {
            eprintln!("[guest-deb-test] stopping QEMU: {error}");
        }
    }
}

/// Reads lines from the agent until one contains `needle`.
fn line_with(
    reader: &mut BufReader<UnixStream>,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => anyhow::bail!("the agent's port closed"),
            Ok(_) if line.contains(needle) => return Ok(line.trim().to_string()),
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => return Err(error.into()),
        }
    }
    anyhow::bail!("no line with {needle:?} from the agent in {timeout:?}")
}

/// With the port: udev starts the agent; it talks and reclaims.
fn with_port(guest: &Guest, work: &Path) -> anyhow::Result<String> {
    let mut vm = Vm::start(guest, work, "with-port", true)?;
    let socket = vm.agent.clone().context("no agent socket")?;
    let started = Instant::now();
    let stream = loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(error) => return Err(error).context("connecting to QEMU's agent socket"),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    line_with(&mut reader, "\"reason\":\"hello\"", BOOT_DEADLINE)
        .with_context(|| format!("console:\n{}", vm.console_tail()))?;
    let boot = started.elapsed();
    writer.write_all(b"{\"v\":1,\"id\":1,\"cmd\":\"ping\"}\n")?;
    line_with(&mut reader, "\"pong\":true", Duration::from_secs(30))?;
    writer.write_all(b"{\"v\":1,\"id\":2,\"cmd\":\"reclaim\",\"bytes\":16777216}\n")?;
    let reclaim = line_with(&mut reader, "\"id\":2", Duration::from_secs(60))?;
    let report = vm.wait_report("the agent running", |r| {
        r.contains("ActiveState=active") && r.contains("SubState=running")
    })?;
    anyhow::ensure!(
        reclaim.contains("\"ok\":true") && reclaim.contains("\"method\":\"memory.reclaim"),
        "the agent did not reclaim with memory.reclaim through its sandbox: {reclaim}\n{report}"
    );
    anyhow::ensure!(
        report.contains("NRestarts=0"),
        "the agent restarted:\n{report}"
    );
    anyhow::ensure!(
        !report.contains("no PSI trigger"),
        "the sandbox kept the agent from arming its PSI trigger:\n{report}"
    );
    Ok(format!(
        "hello {:.0} s after QEMU started; pong; reclaim: {reclaim}",
        boot.as_secs_f64()
    ))
}

/// Without the port: the agent never starts.
fn without_port(guest: &Guest, work: &Path) -> anyhow::Result<()> {
    let mut vm = Vm::start(guest, work, "without-port", false)?;
    let report = vm.wait_report("the boot finished", |_| true)?;
    // The journal comes last: nothing may be there.
    let journal = report
        .split_once("--- journal")
        .map_or(report.as_str(), |(_, rest)| rest)
        .trim();
    anyhow::ensure!(
        report.contains("ActiveState=inactive")
            && report.contains("ExecMainStartTimestampMonotonic=0")
            && (journal.is_empty() || journal.contains("-- No entries --")),
        "without the port the agent must never start:\n{report}"
    );
    Ok(())
}

/// `cargo xtask guest-deb-test`.
pub fn run() -> anyhow::Result<()> {
    anyhow::ensure!(is_root(), "cargo xtask guest-deb-test needs root");
    let built = crate::guest_deb::build()?;
    let scratch = tempfile::tempdir()?;
    let started = Instant::now();
    let guest = prepare(&built.deb, scratch.path())?;
    eprintln!(
        "[guest-deb-test] guest disk with {PACKAGE} ready in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let talked = with_port(&guest, scratch.path())?;
    eprintln!("[guest-deb-test] with the port, udev started {UNIT}: {talked}");
    without_port(&guest, scratch.path())?;
    eprintln!("[guest-deb-test] without the port, {UNIT} never started");
    Ok(())
}
