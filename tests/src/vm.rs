//! A QEMU virtual machine running the test guest, driven over its serial
//! console: the guest's /init runs each line as a shell command and frames
//! the output between `@@B<id>` and `@@E<id> <status>`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::env::TestEnv;
use crate::memfd_residency;

/// How the balloon device is attached.
#[derive(Clone, Debug, Default)]
pub enum Balloon {
    #[default]
    None,
    /// Our vhost-user backend on this socket.
    VhostUser {
        socket: PathBuf,
        reconnect_ms: Option<u32>,
        /// Our QEMU's `vhost-user-balloon-pci` (migratable) instead of the
        /// generic `vhost-user-test-device-pci` a stock QEMU has.
        migratable: bool,
    },
    /// QEMU's built-in virtio-balloon-pci (for comparisons).
    BuiltIn { free_page_reporting: bool },
}

#[derive(Clone, Debug, Default)]
pub struct VmConfig {
    pub mem_mib: u64,
    pub balloon: Balloon,
    /// Back guest RAM with 2 MiB hugetlbfs pages.
    pub hugetlb: bool,
    /// Allocate all guest RAM on the host up front (QEMU prealloc=on).
    pub prealloc: bool,
    /// QMP socket, for the built-in balloon.
    pub qmp_socket: Option<PathBuf>,
    /// Discard QEMU's stderr (the KVM probe, whose failure dumps registers).
    pub quiet: bool,
    /// A virtio-serial port for the guest agent, served by QEMU on this socket.
    pub agent_socket: Option<PathBuf>,
    /// A raw disk image, attached as virtio-blk (/dev/vda in the guest).
    pub disk: Option<PathBuf>,
    /// Wait for a migration from this URI (QEMU's `-incoming`).
    pub incoming: Option<String>,
    /// Let a guest reboot restart it (no `-no-reboot`).
    pub allow_reboot: bool,
}

impl VmConfig {
    pub fn with_backend(mem_mib: u64, socket: PathBuf) -> Self {
        VmConfig {
            mem_mib,
            balloon: Balloon::VhostUser {
                socket,
                reconnect_ms: None,
                migratable: false,
            },
            ..VmConfig::default()
        }
    }
}

#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    /// Set when QEMU's stdout closed (the VM is gone).
    closed: std::sync::atomic::AtomicBool,
    changed: Condvar,
}

pub struct Vm {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Console>,
    next_id: u64,
}

/// The QEMU command line for a config (also shown by `cargo xtask demo`).
pub fn qemu_args(env: &TestEnv, config: &VmConfig) -> Vec<String> {
    let mem = config.mem_mib;
    let mut backend = format!("memory-backend-memfd,id=mem,size={mem}M,share=on");
    if config.hugetlb {
        backend.push_str(",hugetlb=on,hugetlbsize=2M");
    }
    if config.prealloc {
        backend.push_str(",prealloc=on");
    }
    let mut args: Vec<String> = vec![
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        env.accel.clone(),
        "-m".into(),
        format!("{mem}M"),
        "-object".into(),
        backend,
        "-numa".into(),
        "node,memdev=mem".into(),
        "-kernel".into(),
        env.kernel().display().to_string(),
        "-initrd".into(),
        env.initramfs().display().to_string(),
        "-append".into(),
        "console=ttyS0 quiet loglevel=1 panic=-1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
    ];
    if !config.allow_reboot {
        args.push("-no-reboot".into());
    }
    for dir in &env.firmware_dirs {
        args.push("-L".into());
        args.push(dir.display().to_string());
    }
    match &config.balloon {
        Balloon::None => {}
        Balloon::VhostUser {
            socket,
            reconnect_ms,
            migratable,
        } => {
            let mut chardev = format!("socket,id=bal0,path={}", socket.display());
            if let Some(ms) = reconnect_ms {
                chardev.push_str(&format!(",reconnect-ms={ms}"));
            }
            let device = if *migratable {
                "vhost-user-balloon-pci,chardev=bal0"
            } else {
                "vhost-user-test-device-pci,chardev=bal0,virtio-id=5,num_vqs=5,config_size=16"
            };
            args.extend(["-chardev".into(), chardev, "-device".into(), device.into()]);
        }
        Balloon::BuiltIn {
            free_page_reporting,
        } => {
            let reporting = if *free_page_reporting { "on" } else { "off" };
            args.extend([
                "-device".into(),
                format!("virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting={reporting}"),
            ]);
        }
    }
    if let Some(agent) = &config.agent_socket {
        args.extend([
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent0,path={},server=on,wait=off",
                agent.display()
            ),
            "-device".into(),
            "virtserialport,chardev=agent0,name=org.balloon.agent.0".into(),
        ]);
    }
    if let Some(disk) = &config.disk {
        args.extend([
            "-drive".into(),
            format!("file={},format=raw,if=virtio", disk.display()),
        ]);
    }
    if let Some(qmp) = &config.qmp_socket {
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
    }
    if let Some(uri) = &config.incoming {
        args.extend(["-incoming".into(), uri.clone()]);
    }
    args
}

impl Vm {
    /// Starts QEMU and waits until the guest's shell is ready.
    pub fn boot(env: &TestEnv, config: &VmConfig) -> anyhow::Result<Vm> {
        Self::boot_within(env, config, Duration::from_secs(180))
    }

    /// Like `boot`, with a deadline for the guest's shell to appear.
    pub fn boot_within(env: &TestEnv, config: &VmConfig, timeout: Duration) -> anyhow::Result<Vm> {
        let vm = Self::spawn(env, config)?;
        let started = Instant::now();
        vm.wait_line(|l| l == "@@READY", timeout)
            .context("the guest did not boot to its shell")?;
        let kernel = vm
            .console()
            .into_iter()
            .find_map(|l| l.strip_prefix("@@GUEST kernel=").map(str::to_string))
            .unwrap_or_else(|| "?".into());
        eprintln!(
            "[guest-tests] guest booted in {:.1} s ({}, kernel {kernel})",
            started.elapsed().as_secs_f64(),
            env.accel
        );
        Ok(vm)
    }

    /// Starts a QEMU that waits for a migration (`config.incoming`); its
    /// console carries the migrated guest's shell once it runs.
    pub fn start_incoming(env: &TestEnv, config: &VmConfig) -> anyhow::Result<Vm> {
        anyhow::ensure!(config.incoming.is_some(), "no -incoming URI");
        Self::spawn(env, config)
    }

    fn spawn(env: &TestEnv, config: &VmConfig) -> anyhow::Result<Vm> {
        let mut child = Command::new(&env.qemu)
            .args(qemu_args(env, config))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if config.quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .with_context(|| format!("starting {}", env.qemu.display()))?;
        let stdin = child.stdin.take().context("QEMU stdin")?;
        let stdout = child.stdout.take().context("QEMU stdout")?;
        let console = Arc::new(Console::default());
        let reader_console = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if std::env::var_os("BALLOON_SHOW_CONSOLE").is_some() {
                    eprintln!("[guest] {text}");
                }
                if let Ok(mut lines) = reader_console.lines.lock() {
                    lines.push(text);
                }
                reader_console.changed.notify_all();
            }
            reader_console
                .closed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            reader_console.changed.notify_all();
        });
        Ok(Vm {
            child,
            stdin,
            console,
            next_id: 1,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line matching `matches`; returns it.
    pub fn wait_line(
        &self,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        self.wait_nth_line(matches, 1, timeout)
    }

    /// Waits for the `n`th console line matching `matches`; returns it
    /// (a background program's `n`th report line, say).
    pub fn wait_nth_line(
        &self,
        matches: impl Fn(&str) -> bool,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self
            .console
            .lines
            .lock()
            .map_err(|_| anyhow::anyhow!("console lock"))?;
        loop {
            if let Some(line) = lines.iter().filter(|l| matches(l)).nth(n.saturating_sub(1)) {
                return Ok(line.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let closed = self
                .console
                .closed
                .load(std::sync::atomic::Ordering::SeqCst);
            if left.is_zero() || closed {
                let tail: Vec<&String> = lines.iter().rev().take(30).collect();
                let why = if closed {
                    "QEMU exited".to_string()
                } else {
                    format!("timed out after {timeout:?}")
                };
                anyhow::bail!("{why}; last console lines (newest first): {tail:#?}");
            }
            lines = self
                .console
                .changed
                .wait_timeout(lines, left.min(Duration::from_millis(500)))
                .map_err(|_| anyhow::anyhow!("console lock"))?
                .0;
        }
    }

    /// Waits until the guest's shell has come up `times` times (after
    /// reboots).
    pub fn wait_ready_count(&self, times: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_nth_line(|l| l == "@@READY", times, timeout)
            .map(drop)
    }

    /// Sends a command to the guest's shell without waiting for it (a
    /// reboot never reports back); its id.
    pub fn send(&mut self, command: &str) -> anyhow::Result<u64> {
        anyhow::ensure!(!command.contains('\n'), "one line per command");
        let id = self.next_id;
        self.next_id += 1;
        writeln!(self.stdin, "{id} {command}")?;
        self.stdin.flush()?;
        Ok(id)
    }

    /// Runs a shell command in the guest; returns its exit status and output.
    pub fn run(&mut self, command: &str, timeout: Duration) -> anyhow::Result<(i32, String)> {
        let id = self.send(command)?;
        let end_prefix = format!("@@E{id} ");
        let end = self
            .wait_line(|l| l.starts_with(&end_prefix), timeout)
            .with_context(|| format!("guest command `{command}`"))?;
        let status: i32 = end[end_prefix.len()..].trim().parse().unwrap_or(-1);
        let begin = format!("@@B{id}");
        let lines = self
            .console
            .lines
            .lock()
            .map_err(|_| anyhow::anyhow!("console lock"))?;
        let output = lines
            .iter()
            .skip_while(|l| **l != begin)
            .skip(1)
            .take_while(|l| !l.starts_with(&end_prefix))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        Ok((status, output))
    }

    /// Runs a command that must succeed; returns its output.
    pub fn sh(&mut self, command: &str) -> anyhow::Result<String> {
        let (status, output) = self.run(command, Duration::from_secs(300))?;
        anyhow::ensure!(
            status == 0,
            "guest command `{command}` exited {status}: {output}"
        );
        Ok(output)
    }

    /// The guest's /proc/meminfo, in bytes.
    pub fn meminfo(&mut self) -> anyhow::Result<HashMap<String, u64>> {
        let text = self.sh("cat /proc/meminfo")?;
        Ok(balloon_protocol::meminfo::parse_meminfo(&text)
            .into_iter()
            .collect())
    }

    /// Bytes of guest RAM allocated on the host, measured on QEMU's memfd.
    /// The guest kernel's (major, minor) version, from `uname -r`.
    pub fn kernel_version(&mut self) -> anyhow::Result<(u32, u32)> {
        let release = self.sh("uname -r")?;
        let mut numbers = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|part| part.parse::<u32>().ok());
        match (numbers.next(), numbers.next()) {
            (Some(major), Some(minor)) => Ok((major, minor)),
            _ => anyhow::bail!("cannot read a kernel version from {release:?}"),
        }
    }

    pub fn host_resident_bytes(&self) -> anyhow::Result<u64> {
        memfd_residency::allocated_bytes(&memfd_residency::guest_ram_memfd(self.pid())?)
    }

    /// The console lines so far that match `matches` (the report lines of
    /// a program running in the background, say).
    pub fn lines_matching(&self, matches: impl Fn(&str) -> bool) -> Vec<String> {
        self.console
            .lines
            .lock()
            .map(|lines| lines.iter().filter(|l| matches(l)).cloned().collect())
            .unwrap_or_default()
    }

    /// Every console line so far.
    pub fn console(&self) -> Vec<String> {
        self.console
            .lines
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(error) = self.child.kill() {
            eprintln!("stopping QEMU: {error}");
        }
        if let Err(error) = self.child.wait() {
            eprintln!("reaping QEMU: {error}");
        }
    }
}
