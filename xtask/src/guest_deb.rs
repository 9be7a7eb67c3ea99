//! `cargo xtask guest-deb` (root): the guest side of the stack, installed
//! the way a distribution's guest agent is.
//!
//! Builds `target/deb/balloon-stack-guest_<version>_amd64.deb`: the static
//! agent as `/usr/sbin/balloon-guest-agent` (not `guest-agent`, a name
//! too plain to keep to ourselves), its sandboxed systemd unit, the udev
//! rule that starts it when the host gives the guest the port (and never
//! without), a man page, the cloud-init snippet as an example; and
//! `target/deb/balloon-stack-guest_<version>_x86_64.tar.gz` with the
//! program, unit, rule, man page and a README for any x86_64 Linux.
//!
//! Then checks them: the package's contents, lintian (no errors), the man
//! page against the agent's `--help`, an install, removal and purge with
//! dpkg in a clean Debian 12 root (debootstrap, cached) whose own
//! `systemd-analyze` verifies the unit and scores its sandbox, and every
//! system call the agent makes (run under strace on a pseudo-terminal
//! standing in for the port: hello, a request, a bad line, a timer
//! report, the host side going away) against the unit's
//! `SystemCallFilter=` read with the sets of Debian 12's systemd 252 and
//! of bookworm-backports' 254.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::deb::{
    changelog, copy, dpkg_deb_build, gzip, installed_kib, md5sums, strip, write, COPYRIGHT,
    MAINTAINER,
};
use crate::nspawn::Booted;
use crate::package_test::{
    check_contents, debian_root, debian_root_backports_systemd, exposure_score, lintian,
    MAX_EXPOSURE,
};
use crate::provision::{
    build_static_programs, ensure_packages, is_root, output, succeed, workspace_root,
};
use crate::syscall_filter::{Filter, Sets};

pub const PACKAGE: &str = "balloon-stack-guest";
/// The agent's name as installed.
pub const AGENT: &str = "balloon-guest-agent";
pub const UNIT: &str = "balloon-guest-agent.service";

/// packaging/guest/FILE, where the package installs it, its mode.
const PACKAGE_FILES: [(&str, &str, u32); 4] = [
    (
        "balloon-guest-agent.service",
        "lib/systemd/system/balloon-guest-agent.service",
        0o644,
    ),
    (
        "60-balloon-guest-agent.rules",
        "usr/lib/udev/rules.d/60-balloon-guest-agent.rules",
        0o644,
    ),
    ("README", "usr/share/doc/balloon-stack-guest/README", 0o644),
    (
        "cloud-init.yaml",
        "usr/share/doc/balloon-stack-guest/examples/cloud-init.yaml",
        0o644,
    ),
];
/// packaging/guest/FILE in the tarball, and its mode (the agent too).
const TARBALL_FILES: [(&str, u32); 5] = [
    ("balloon-guest-agent.service", 0o644),
    ("60-balloon-guest-agent.rules", 0o644),
    ("balloon-guest-agent.8", 0o644),
    ("README", 0o644),
    ("cloud-init.yaml", 0o644),
];

/// Paths `dpkg-deb --contents` must list.
pub const PROMISED: &[&str] = &[
    "./usr/sbin/balloon-guest-agent",
    "./lib/systemd/system/balloon-guest-agent.service",
    "./usr/lib/udev/rules.d/60-balloon-guest-agent.rules",
    "./usr/share/man/man8/balloon-guest-agent.8.gz",
    "./usr/share/doc/balloon-stack-guest/copyright",
    "./usr/share/doc/balloon-stack-guest/changelog.Debian.gz",
    "./usr/share/doc/balloon-stack-guest/README",
    "./usr/share/doc/balloon-stack-guest/examples/cloud-init.yaml",
];

/// Lintian's tags that this package carries on purpose, each with why.
const LINTIAN_OVERRIDES: &str = "\
# The agent is a static PIE on purpose (it must run on any x86_64 Linux
# guest, whatever its C library); lintian reads a static PIE as a shared
# library without its dependencies.
balloon-stack-guest: shared-library-lacks-prerequisites [usr/sbin/balloon-guest-agent]
# Built locally from a checkout, never uploaded: there is no bug to close.
balloon-stack-guest: initial-upload-closes-no-bugs [usr/share/doc/balloon-stack-guest/changelog.Debian.gz:1]
# No [Install] section on purpose: udev starts the unit when the port
# appears (SYSTEMD_WANTS in the package's rule); enabling it would only
# make a guest without the port wait for a device that never comes.
balloon-stack-guest: systemd-service-file-missing-install-key [lib/systemd/system/balloon-guest-agent.service]
";

fn control(version: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Recommends: udev\n\
         Section: admin\n\
         Priority: optional\n\
         Description: memory-pressure agent for guests of a balloon-stack host\n \
         Runs inside a KVM/QEMU virtual machine whose memory the host reclaims\n \
         with balloon-stack's virtio balloon. It reports the guest's memory\n \
         pressure (PSI), page cache and reclaim activity to the host's balloon\n \
         policy over a virtio-serial port, and drops page cache when the host\n \
         asks before the balloon grows. udev starts it when the host gives the\n \
         guest the port org.balloon.agent.0; without the port it never runs.\n \
         The program is static and has no dependencies.\n"
    )
}

/// What `guest-deb` made.
pub struct Built {
    pub deb: PathBuf,
    pub tarball: PathBuf,
    /// The stripped agent, as packaged.
    pub agent: PathBuf,
}

/// Fails unless `binary` is a static executable (no program interpreter,
/// no shared library needed).
fn ensure_static(binary: &Path) -> anyhow::Result<()> {
    let headers = succeed(Command::new("readelf").args(["-l", "-d", "-W"]).arg(binary))?;
    anyhow::ensure!(
        !headers.contains("INTERP") && !headers.contains("(NEEDED)"),
        "{} is not static:\n{headers}",
        binary.display()
    );
    Ok(())
}

/// Builds the package and the tarball.
pub fn build() -> anyhow::Result<Built> {
    let workspace = workspace_root();
    let upstream = env!("CARGO_PKG_VERSION");
    let version = format!("{upstream}-1");
    eprintln!("[guest-deb] building the static agent");
    let built = build_static_programs(&["guest-agent"])?;
    let agent = built.first().context("the agent was not built")?;
    let out = workspace.join("target/deb");
    let root = out.join(format!("{PACKAGE}_{version}_amd64"));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let installed_agent = root.join("usr/sbin").join(AGENT);
    copy(agent, &installed_agent, 0o755)?;
    strip(&installed_agent)?;
    ensure_static(&installed_agent)?;
    let guest = workspace.join("packaging/guest");
    for (from, to, mode) in PACKAGE_FILES {
        copy(&guest.join(from), &root.join(to), mode)?;
    }
    let man = root.join(format!("usr/share/man/man8/{AGENT}.8"));
    copy(&guest.join(format!("{AGENT}.8")), &man, 0o644)?;
    gzip(&man)?;
    let doc = root.join(format!("usr/share/doc/{PACKAGE}"));
    write(&doc.join("copyright"), COPYRIGHT.as_bytes(), 0o644)?;
    write(
        &doc.join("changelog.Debian"),
        changelog(PACKAGE, &version, "guest-deb")?.as_bytes(),
        0o644,
    )?;
    gzip(&doc.join("changelog.Debian"))?;
    write(
        &root.join(format!("usr/share/lintian/overrides/{PACKAGE}")),
        LINTIAN_OVERRIDES.as_bytes(),
        0o644,
    )?;
    let size = installed_kib(&root)?;
    let sums = md5sums(&root)?;
    let debian = root.join("DEBIAN");
    write(
        &debian.join("control"),
        control(&version, size).as_bytes(),
        0o644,
    )?;
    write(&debian.join("md5sums"), sums.as_bytes(), 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(&guest.join(script), &debian.join(script), 0o755)?;
    }
    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    dpkg_deb_build(&root, &deb)?;

    let tarball = out.join(format!("{PACKAGE}_{version}_x86_64.tar.gz"));
    let top = format!("{PACKAGE}-{version}");
    let staging = tempfile::tempdir()?;
    let dir = staging.path().join(&top);
    copy(&installed_agent, &dir.join(AGENT), 0o755)?;
    for (file, mode) in TARBALL_FILES {
        copy(&guest.join(file), &dir.join(file), mode)?;
    }
    // Owned by root, sorted, dated by the source (the newest packaging
    // file): the same tree makes the same archive.
    let newest = TARBALL_FILES
        .iter()
        .filter_map(|(file, _)| std::fs::metadata(guest.join(file)).ok()?.modified().ok())
        .max()
        .unwrap_or(std::time::UNIX_EPOCH)
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    succeed(
        Command::new("tar")
            .args([
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--sort=name",
                &format!("--mtime=@{newest}"),
                "-czf",
            ])
            .arg(&tarball)
            .arg("-C")
            .arg(staging.path())
            .arg(&top),
    )?;
    Ok(Built {
        deb,
        tarball,
        agent: installed_agent,
    })
}

/// Every long option of the agent's `--help` must be in its man page.
fn check_man_page(agent: &Path) -> anyhow::Result<()> {
    let help = succeed(Command::new(agent).arg("--help"))?;
    let page =
        std::fs::read_to_string(workspace_root().join(format!("packaging/guest/{AGENT}.8")))?;
    let flags = long_options(&help);
    anyhow::ensure!(flags.len() >= 5, "too few options in --help:\n{help}");
    let missing: Vec<&String> = flags
        .iter()
        .filter(|flag| !page.contains(&flag.replace('-', "\\-")))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the man page lacks the options {missing:?} of the agent's --help"
    );
    eprintln!(
        "[guest-deb] man page: all {} options of --help",
        flags.len()
    );
    Ok(())
}

/// The `--long-option` names in a `--help` text.
fn long_options(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(|word| {
            word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect()
}

/// A copy of a cached Debian root, deleted on drop.
struct Root {
    path: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Root {
    fn copy_of(template: &Path) -> anyhow::Result<Root> {
        let scratch = tempfile::tempdir()?;
        let path = scratch.path().join("root");
        succeed(Command::new("cp").arg("-a").arg(template).arg(&path))?;
        Ok(Root {
            path,
            _scratch: scratch,
        })
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        succeed(
            Command::new("chroot")
                .arg(&self.path)
                .arg(program)
                .args(args)
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        )
    }

    fn has(&self, inside: &str) -> bool {
        self.path
            .join(inside.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    }
}

/// Installs, checks and removes the package in a copy of the clean
/// Debian 12 root; returns the unit's exposure score and the root's
/// system-call sets.
fn check_install(deb: &Path) -> anyhow::Result<(f64, Sets, String)> {
    let root = Root::copy_of(&debian_root()?)?;
    copy(deb, &root.path.join("tmp/guest.deb"), 0o644)?;
    // No udev and no running systemd in the root: the maintainer scripts
    // must still succeed (as in an image being built).
    root.run("dpkg", &["-i", "/tmp/guest.deb"])?;
    for path in PROMISED {
        anyhow::ensure!(
            root.has(path.trim_start_matches('.')),
            "{path} is not installed"
        );
    }
    let version = root.run(&format!("/usr/sbin/{AGENT}"), &["--version"])?;
    let unit = format!("/lib/systemd/system/{UNIT}");
    let verify = output(
        Command::new("chroot")
            .arg(&root.path)
            .args(["systemd-analyze", "verify", "--man=no", &unit])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    )?;
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    anyhow::ensure!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify {UNIT}:\n{complaints}"
    );
    let security = root.run(
        "systemd-analyze",
        &["security", "--no-pager", "--offline=true", &unit],
    )?;
    let score = exposure_score(&security, &unit)?;
    anyhow::ensure!(
        score <= MAX_EXPOSURE,
        "{UNIT}: exposure {score}, more than {MAX_EXPOSURE}:\n{security}"
    );
    let sets = Sets::parse(&root.run("systemd-analyze", &["syscall-filter"])?);
    let systemd = root.run("systemctl", &["--version"])?;
    root.run("dpkg", &["-r", PACKAGE])?;
    for path in PROMISED.iter().filter(|p| !p.contains("/doc/")) {
        anyhow::ensure!(
            !root.has(path.trim_start_matches('.')),
            "{path} is left after dpkg -r"
        );
    }
    root.run("dpkg", &["-P", PACKAGE])?;
    anyhow::ensure!(
        !root.has(&format!("/usr/share/doc/{PACKAGE}")),
        "/usr/share/doc/{PACKAGE} is left after dpkg -P"
    );
    eprintln!(
        "[guest-deb] dpkg -i / -r / -P in a clean Debian 12 root: ok ({}); systemd-analyze verify: clean; security --offline: {score}",
        version.trim()
    );
    Ok((
        score,
        sets,
        systemd.lines().next().unwrap_or_default().to_string(),
    ))
}

/// A pseudo-terminal standing in for the virtio-serial port: the agent
/// opens the terminal side, this end plays the host.
struct FakePort {
    host: std::fs::File,
    device: PathBuf,
}

impl FakePort {
    /// A new pseudo-terminal of the devpts instance whose multiplexer is
    /// `ptmx` (this machine's /dev/ptmx, or a booted root's).
    fn open(ptmx: &Path) -> anyhow::Result<FakePort> {
        let host = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(ptmx)
            .with_context(|| format!("opening {}", ptmx.display()))?;
        let fd = host.as_raw_fd();
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one c_int from the pointer, which
        // points at a live local; fd is our open master.
        if unsafe { libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) } != 0 {
            return Err(std::io::Error::last_os_error()).context("unlocking the pty");
        }
        let mut number: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one c_uint through the pointer, which
        // points at a live local; fd is our open master.
        if unsafe { libc::ioctl(fd, libc::TIOCGPTN, &mut number) } != 0 {
            return Err(std::io::Error::last_os_error()).context("naming the pty");
        }
        // Raw: no echo, no line editing, no newline translation, as a
        // virtio-serial port passes bytes. On Linux the master's
        // terminal settings are the terminal side's.
        // SAFETY: termios is plain data; zeroed is a valid value that
        // tcgetattr overwrites.
        let mut settings: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is our open master; the pointer is to a live local.
        if unsafe { libc::tcgetattr(fd, &mut settings) } != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the pty's settings");
        }
        // SAFETY: the pointer is to a live, initialised termios.
        unsafe { libc::cfmakeraw(&mut settings) };
        // SAFETY: fd is our open master; the pointer is to a live termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &settings) } != 0 {
            return Err(std::io::Error::last_os_error()).context("making the pty raw");
        }
        Ok(FakePort {
            host,
            device: PathBuf::from(format!("/dev/pts/{number}")),
        })
    }

    /// Reads until a line containing `needle` arrives; returns that line.
    fn line_with(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = String::new();
        let mut buffer = [0u8; 4096];
        while Instant::now() < deadline {
            match self.host.read(&mut buffer) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(
                    buffer.get(..n).unwrap_or_default(),
                )),
                // Nothing yet (or no one has the terminal side open yet).
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            if let Some(line) = seen
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains(needle))
            {
                return Ok(line.trim().to_string());
            }
        }
        anyhow::bail!("no line with {needle:?} from the agent in {timeout:?}; it sent:\n{seen}")
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.host.write_all(format!("{line}\n").as_bytes())?;
        Ok(())
    }
}

/// The pid of the child of `parent` (strace's tracee).
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
}

/// The names of the system calls in an `strace -f` log.
fn traced_calls(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter_map(|line| {
            // "PID name(args..." ; resumed calls, signals and exits skipped.
            let call = line.split_once(' ')?.1.trim_start();
            let name: String = call
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let opens = call.get(name.len()..).is_some_and(|r| r.starts_with('('));
            (!name.is_empty() && opens).then_some(name)
        })
        .collect()
}

/// Runs the agent under strace against a fake port and returns every
/// system call it made.
fn agent_calls(agent: &Path) -> anyhow::Result<BTreeSet<String>> {
    ensure_packages(&[("strace", "strace")])?;
    let mut port = FakePort::open(Path::new("/dev/ptmx"))?;
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("strace.log");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&log)
        .arg(agent)
        .arg("--device")
        .arg(&port.device)
        .args(["--interval", "1"])
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running the agent under strace")?;
    let exchange = (|| -> anyhow::Result<()> {
        port.line_with("\"reason\":\"hello\"", Duration::from_secs(10))?;
        port.send(r#"{"v":1,"id":1,"cmd":"ping"}"#)?;
        port.line_with("\"pong\":true", Duration::from_secs(5))?;
        port.send("not a request")?;
        port.line_with("\"ok\":false", Duration::from_secs(5))?;
        port.line_with("\"reason\":\"timer\"", Duration::from_secs(5))?;
        Ok(())
    })();
    // The host side goes away: the agent closes the port and retries.
    drop(port);
    std::thread::sleep(Duration::from_millis(2500));
    let agent_pid = child_of(strace.id());
    if let Some(pid) = agent_pid {
        // SIGTERM, as systemd stops it.
        succeed(Command::new("kill").arg("-TERM").arg(pid.to_string()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while strace.try_wait()?.is_none() {
        if Instant::now() > deadline {
            strace.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    exchange?;
    anyhow::ensure!(agent_pid.is_some(), "found no agent under strace");
    let text = std::fs::read_to_string(&log)?;
    anyhow::ensure!(
        text.contains("+++ killed by SIGTERM +++"),
        "the agent did not end with the SIGTERM it was sent:\n{text}"
    );
    Ok(traced_calls(&text))
}

/// Fails naming each call in `calls` that the unit's filter refuses.
fn check_calls(
    unit: &str,
    sets: &Sets,
    calls: &BTreeSet<String>,
    whose: &str,
) -> anyhow::Result<()> {
    let filter =
        Filter::of_unit(unit, sets)?.with_context(|| format!("{UNIT} has no SystemCallFilter="))?;
    let refused: Vec<&String> = calls.iter().filter(|c| !filter.allows(c)).collect();
    anyhow::ensure!(
        refused.is_empty(),
        "{UNIT}'s SystemCallFilter ({whose}) refuses calls the agent makes: {refused:?}"
    );
    eprintln!(
        "[guest-deb] {UNIT}'s filter allows all {} calls the agent made ({whose})",
        calls.len()
    );
    Ok(())
}

/// Whether this process may use CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> anyhow::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")?;
    const CAP_SYS_RESOURCE: u32 = 24;
    Ok(effective & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The unit's sandbox under a real systemd as PID 1 (systemd-nspawn on
/// the cached root `template`): the package installed with dpkg, then a
/// copy of its unit started with a pseudo-terminal of the root standing
/// in for the port (a container has no virtio-serial port; the copy
/// differs only in that: no binding to the port's device, `--device`,
/// `--interval 1` and `DeviceAllow=char-pts rw`), and a hello, a ping
/// and a reclaim request answered through the sandbox. The shipped unit
/// itself must stay inactive: the root has no port. Returns what the
/// reclaim request got. Where the container has no cgroup v2
/// `memory.reclaim` (a host with the memory controller on cgroup v1) the
/// agent falls back to `vm.drop_caches`, which drops this machine's clean
/// page cache once: that is the fallback's check.
fn check_sandbox(deb: &Path, template: &Path, label: &str) -> anyhow::Result<String> {
    const TEST_UNIT: &str = "balloon-guest-agent-sandbox-test.service";
    let booted = Booted::boot(template, label)?;
    let (_, systemd) = booted.systemd_version()?;
    let inside = booted.inside_root();
    copy(deb, &inside.join("var/tmp/guest.deb"), 0o644)?;
    booted.run("dpkg", &["-i", "/var/tmp/guest.deb"])?;
    let state = booted.systemctl(&["show", "-p", "UnitFileState,ActiveState", UNIT])?;
    anyhow::ensure!(
        state.contains("UnitFileState=static") && state.contains("ActiveState=inactive"),
        "{label}: without the port {UNIT} must be static and inactive:\n{state}"
    );
    let mut port = FakePort::open(&inside.join("dev/ptmx"))?;
    let shipped = std::fs::read_to_string(inside.join("lib/systemd/system").join(UNIT))?;
    let mut copy_of_unit: Vec<String> = shipped
        .lines()
        .filter(|l| !l.starts_with("BindsTo=") && !l.starts_with("After="))
        .map(|l| match l.strip_prefix("ExecStart=") {
            Some(command) => format!(
                "ExecStart={command} --device {} --interval 1",
                port.device.display()
            ),
            None => l.to_string(),
        })
        .collect();
    copy_of_unit.push("DeviceAllow=char-pts rw".into());
    write(
        &inside.join("etc/systemd/system").join(TEST_UNIT),
        format!("{}\n", copy_of_unit.join("\n")).as_bytes(),
        0o644,
    )?;
    booted.systemctl(&["daemon-reload"])?;
    booted.systemctl(&["start", TEST_UNIT])?;
    let exchange = (|| -> anyhow::Result<String> {
        port.line_with("\"reason\":\"hello\"", Duration::from_secs(20))?;
        port.send(r#"{"v":1,"id":1,"cmd":"ping"}"#)?;
        port.line_with("\"pong\":true", Duration::from_secs(5))?;
        port.send(r#"{"v":1,"id":2,"cmd":"reclaim","bytes":1048576}"#)?;
        port.line_with("\"id\":2", Duration::from_secs(10))
    })();
    let journal = booted.journal(TEST_UNIT);
    let reclaim =
        exchange.with_context(|| format!("{label}: journalctl -u {TEST_UNIT}:\n{journal}"))?;
    let state = booted.unit_state(TEST_UNIT)?;
    anyhow::ensure!(
        state.running() && state.restarts == 0,
        "{label}: {TEST_UNIT} is {state:?}:\n{journal}"
    );
    // A 1 s trigger window needs CAP_SYS_RESOURCE (Linux 6.5+ refuses
    // other windows than multiples of 2 s without it): judged only where
    // this machine's root has it to give.
    let psi = if !inside.join("proc/pressure/memory").exists() {
        "no PSI in this kernel"
    } else if !has_cap_sys_resource()? {
        "PSI trigger not checked: this machine's root lacks CAP_SYS_RESOURCE"
    } else {
        anyhow::ensure!(
            !journal.contains("no PSI trigger"),
            "{label}: the sandbox keeps the agent from arming its PSI trigger:\n{journal}"
        );
        "PSI trigger armed"
    };
    booted.systemctl(&["stop", TEST_UNIT])?;
    let stopped = booted.unit_state(TEST_UNIT)?;
    anyhow::ensure!(
        stopped.active == "inactive",
        "{label}: {TEST_UNIT} did not stop cleanly: {stopped:?}"
    );
    booted.poweroff()?;
    eprintln!("[guest-deb] {label} ({systemd}): the sandboxed agent said hello, answered a ping and a reclaim ({psi}): {reclaim}");
    Ok(reclaim)
}

/// `cargo xtask guest-deb`.
pub fn run() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "cargo xtask guest-deb needs root (a clean Debian 12 root to install into)"
    );
    ensure_packages(&[("readelf", "binutils"), ("lintian", "lintian")])?;
    let built = build()?;
    check_contents(&built.deb, PROMISED)?;
    lintian(&built.deb)?;
    check_man_page(&built.agent)?;
    let listing = succeed(Command::new("tar").arg("-tzvf").arg(&built.tarball))?;
    for (file, _) in TARBALL_FILES.iter().chain(&[(AGENT, 0)]) {
        anyhow::ensure!(
            listing.lines().any(|l| l.ends_with(&format!("/{file}"))),
            "the tarball lacks {file}:\n{listing}"
        );
    }
    let (_, sets_252, systemd_252) = check_install(&built.deb)?;
    let unit = std::fs::read_to_string(workspace_root().join("packaging/guest").join(UNIT))?;
    let calls = agent_calls(&built.agent)?;
    eprintln!(
        "[guest-deb] the agent made {} distinct calls: {}",
        calls.len(),
        calls.iter().cloned().collect::<Vec<_>>().join(" ")
    );
    check_calls(&unit, &sets_252, &calls, &systemd_252)?;
    let backports = debian_root_backports_systemd()?;
    let sets_254 = Sets::parse(&succeed(
        Command::new("chroot")
            .arg(&backports)
            .args(["systemd-analyze", "syscall-filter"]),
    )?);
    let systemd_254 = succeed(
        Command::new("chroot")
            .arg(&backports)
            .args(["systemctl", "--version"]),
    )?;
    check_calls(
        &unit,
        &sets_254,
        &calls,
        systemd_254.lines().next().unwrap_or_default(),
    )?;
    check_sandbox(&built.deb, &debian_root()?, "Debian 12")?;
    check_sandbox(
        &built.deb,
        &backports,
        "Debian 12, bookworm-backports' systemd",
    )?;
    println!("{}", built.deb.display());
    println!("{}", built.tarball.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port the unit and the rule are for.
    const PORT: &str = balloon_protocol::agent::DEFAULT_PORT_NAME;

    fn read(path: &str) -> String {
        std::fs::read_to_string(workspace_root().join(path)).unwrap()
    }

    /// The ```yaml block of docs/install.md that starts with #cloud-config.
    fn cloud_init_in_docs() -> String {
        let docs = read("docs/install.md");
        docs.split("```yaml\n")
            .skip(1)
            .filter_map(|block| block.split_once("```").map(|(body, _)| body))
            .find(|body| body.starts_with("#cloud-config\n"))
            .expect("docs/install.md has a ```yaml block starting with #cloud-config")
            .to_string()
    }

    #[test]
    fn the_cloud_init_snippet_installs_the_package_and_starts_the_agent() {
        let text = read("packaging/guest/cloud-init.yaml");
        assert_eq!(
            cloud_init_in_docs(),
            text,
            "docs/install.md's snippet and packaging/guest/cloud-init.yaml differ"
        );
        assert!(
            text.starts_with("#cloud-config\n"),
            "cloud-init needs that first line"
        );
        let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
        assert_eq!(docs.len(), 1);
        let config = &docs[0];
        let hash = config.as_hash().unwrap();
        let keys: Vec<&str> = hash.keys().filter_map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            ["runcmd"],
            "only runcmd, nothing else of the VM changed"
        );
        let runcmd = config["runcmd"].as_vec().unwrap();
        assert_eq!(runcmd.len(), 1);
        let argv: Vec<&str> = runcmd[0]
            .as_vec()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let [shell, flags, script] = argv[..] else {
            panic!("runcmd's entry is not [sh, flags, script]: {argv:?}")
        };
        assert_eq!(shell, "sh");
        assert!(flags.contains('e') && flags.contains('c'), "{flags}");
        let lines: Vec<&str> = script.lines().map(str::trim).collect();
        let setting = lines
            .iter()
            .find_map(|l| l.strip_prefix("BALLOON_GUEST_DEB="))
            .unwrap();
        assert!(
            setting.contains(&format!("{PACKAGE}_")) && setting.ends_with("_amd64.deb"),
            "{setting}"
        );
        let install = lines
            .iter()
            .position(|l| l.contains("apt-get install -y"))
            .unwrap();
        let start = lines
            .iter()
            .position(|l| *l == format!("systemctl start {UNIT}"))
            .unwrap();
        let check = lines
            .iter()
            .position(|l| *l == format!("systemctl is-active {UNIT}"))
            .unwrap();
        assert!(install < start && start < check, "{lines:?}");
        assert!(
            script.contains(&format!("[ -e /dev/virtio-ports/{PORT} ]")),
            "the agent is started only where the port is"
        );
        // The script is valid sh.
        let status = Command::new("sh")
            .args(["-n", "-c", script])
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn the_unit_and_the_rule_name_the_same_port_and_unit() {
        let unit = read("packaging/guest/balloon-guest-agent.service");
        let rule = read("packaging/guest/60-balloon-guest-agent.rules");
        let device = format!("dev-virtio\\x2dports-{}.device", PORT.replace('-', "\\x2d"));
        assert!(unit.contains(&format!("BindsTo={device}")), "{device}");
        assert!(unit.contains(&format!("After={device}")), "{device}");
        assert!(unit.contains(&format!("ExecStart=/usr/sbin/{AGENT}\n")));
        assert!(
            !unit.contains("[Install]"),
            "udev starts it, nothing enables it"
        );
        let rules: Vec<&str> = rule
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            rules,
            [format!(
                "SUBSYSTEM==\"virtio-ports\", ATTR{{name}}==\"{PORT}\", TAG+=\"systemd\", ENV{{SYSTEMD_WANTS}}+=\"{UNIT}\""
            )]
        );
        let postinst = read("packaging/guest/postinst");
        assert!(postinst.contains(&format!("--attr-match=name={PORT}")));
    }

    #[test]
    fn help_options_and_strace_lines_are_read() {
        let help = "Usage: guest-agent [OPTIONS]\n\nOptions:\n      --port-name <PORT_NAME>  Name\n      --device <PATH>\n  -h, --help  Print help\n  -V, --version";
        let flags: Vec<String> = long_options(help).into_iter().collect();
        assert_eq!(flags, ["--device", "--help", "--port-name", "--version"]);
        let log = "101 execve(\"/a\", [\"/a\"], 0x7ffd /* 3 vars */) = 0\n\
                   101 epoll_wait(3,  <unfinished ...>\n\
                   101 <... epoll_wait resumed>[{events=EPOLLIN}], 4, -1) = 1\n\
                   101 --- SIGTERM {si_signo=SIGTERM} ---\n\
                   101 +++ killed by SIGTERM +++\n\
                   101 timerfd_settime(4, 0, {it_interval={tv_sec=1}}, NULL) = 0\n";
        let calls: Vec<String> = traced_calls(log).into_iter().collect();
        assert_eq!(calls, ["epoll_wait", "execve", "timerfd_settime"]);
    }
}
