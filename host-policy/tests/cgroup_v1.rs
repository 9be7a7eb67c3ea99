//! `[host] cgroup` on a real cgroup v1 memory controller: a child group
//! of /sys/fs/cgroup/memory with a limit, shmem (what QEMU's memfd guest
//! RAM is) and page cache charged to it by processes put into it, read by
//! `host_reader` and by `host-policy check`; then an OOM kill in it. Needs
//! root; skips, saying why, where the v1 memory controller is not mounted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host_policy::host_reader::{self, PressureReading, SourceKind};
use host_policy_config::config::HostSection;

const V1_MEMORY: &str = "/sys/fs/cgroup/memory";
const MIB: u64 = 1 << 20;
const LIMIT_BYTES: u64 = 256 * MIB;

/// The test's cgroup and shmem file, removed however the test ends.
struct Cleanup {
    cgroup: PathBuf,
    shm: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.shm);
        // Its processes have ended; charged pages do not keep a v1 group.
        for _ in 0..50 {
            if !self.cgroup.exists() || std::fs::remove_dir(&self.cgroup).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.cgroup.display());
    }
}

/// Runs `command` (a shell command line) inside the cgroup, to its end.
fn run_in(cgroup: &Path, command: &str) -> std::process::ExitStatus {
    let procs = cgroup.join("cgroup.procs");
    Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {} && exec {command}", procs.display()))
        .stdin(Stdio::null())
        .status()
        .unwrap()
}

fn host(cgroup: &Path) -> HostSection {
    HostSection {
        cgroup: Some(cgroup.to_path_buf()),
        ..HostSection::default()
    }
}

#[test]
fn a_v1_memory_cgroup_is_read_as_the_host() {
    if !Path::new(V1_MEMORY).join("memory.usage_in_bytes").exists() {
        eprintln!("skipped: no cgroup v1 memory controller at {V1_MEMORY}");
        return;
    }
    let name = format!("balloon-test-{}", std::process::id());
    let cleanup = Cleanup {
        cgroup: Path::new(V1_MEMORY).join(&name),
        shm: Path::new("/dev/shm").join(&name),
    };
    let cgroup = cleanup.cgroup.clone();
    match std::fs::create_dir(&cgroup) {
        Ok(()) => {}
        // A container (systemd-nspawn mounts the controllers read-only):
        // there is no memory cgroup to make here.
        Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
            eprintln!(
                "skipped: the cgroup v1 memory hierarchy at {V1_MEMORY} is read-only here (a container?): {e}"
            );
            return;
        }
        Err(e) => panic!("creating {} (needs root): {e}", cgroup.display()),
    }

    // No limit yet: an error that names the key and says so.
    let error = host_reader::read(&host(&cgroup)).unwrap_err().to_string();
    assert!(
        error.starts_with("[host] cgroup ") && error.contains("no limit set"),
        "{error}"
    );

    std::fs::write(
        cgroup.join("memory.limit_in_bytes"),
        LIMIT_BYTES.to_string(),
    )
    .unwrap();
    // 64 MiB of shmem (on the anon LRU: not reclaimable) and 32 MiB of
    // page cache (reclaimable), both charged to the group.
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let shm = cleanup.shm.display().to_string();
    assert!(run_in(
        &cgroup,
        &format!("dd if=/dev/zero of={shm} bs=1M count=64 status=none")
    )
    .success());
    let cache = scratch.path().join("cache");
    assert!(run_in(
        &cgroup,
        &format!(
            "dd if=/dev/zero of={} bs=1M count=32 status=none",
            cache.display()
        )
    )
    .success());

    let reading = host_reader::read(&host(&cgroup)).unwrap();
    let memory = reading.cgroup.expect("a cgroup's parts");
    eprintln!("{reading:#?}");
    for line in reading.describe() {
        eprintln!("{line}");
    }
    assert_eq!(reading.kind, SourceKind::CgroupV1);
    assert_eq!(reading.state.total_bytes, LIMIT_BYTES);
    assert_eq!(memory.limit_bytes, LIMIT_BYTES);
    // Usage counts both (the kernel's per-CPU charge batches blur it by
    // a few pages).
    assert!(memory.usage_bytes >= 90 * MIB, "{memory:?}");
    assert!(memory.usage_bytes <= LIMIT_BYTES, "{memory:?}");
    // The page cache is reclaimable, the shmem is not.
    assert!(
        (24 * MIB..=48 * MIB).contains(&memory.reclaimable_file_bytes),
        "{memory:?}"
    );
    let available = reading.state.available_bytes;
    assert_eq!(available, memory.available_bytes());
    assert!(available <= LIMIT_BYTES - 60 * MIB, "{reading:?}");
    assert!(available >= LIMIT_BYTES - memory.usage_bytes, "{reading:?}");
    // v1 has no per-cgroup PSI: the host's, and it says so.
    if let PressureReading::Read { path, note, .. } = &reading.pressure {
        assert_eq!(path, Path::new("/proc/pressure/memory"));
        assert!(note.is_some_and(|n| n.contains("no per-cgroup PSI")));
        assert!(reading.state.psi_some_avg10.is_some());
    }

    // `check` shows the same source.
    let config = scratch.path().join("host-policy.toml");
    std::fs::write(
        &config,
        format!(
            "[host]\ncgroup = {:?}\n\n[[vm]]\nname = \"a\"\ncontrol = \"/nonexistent.ctl\"\n",
            cgroup
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_host-policy"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "host-policy check:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    assert!(
        text.contains(&format!(
            "host source: cgroup v1 {}: limit 256 MiB",
            cgroup.display()
        )),
        "{text}"
    );
    assert!(text.contains("cgroup v1 has no per-cgroup PSI"), "{text}");

    // An OOM kill in the group: a process that buffers /dev/zero forever.
    match reading.cgroup_oom_kills {
        None => eprintln!("this kernel's memory.oom_control counts no OOM kills: not checked"),
        Some(before) => {
            let started = Instant::now();
            let status = run_in(&cgroup, "tail /dev/zero");
            assert!(!status.success(), "tail /dev/zero ended by itself");
            assert!(started.elapsed() < Duration::from_secs(60));
            let after = host_reader::read(&host(&cgroup)).unwrap();
            assert_eq!(after.cgroup_oom_kills, Some(before + 1), "{after:?}");
        }
    }
    drop(scratch);
    drop(cleanup);
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
}
