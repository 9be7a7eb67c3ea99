//! One side of a migration: a backend and a QEMU with `vhost-user-balloon-pci`
//! and a QMP socket, either booting a guest (the source) or waiting for
//! one (`-incoming`, the destination).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use balloon_protocol::control::{ControlClient, StatusReply};

use crate::backend::{BackendProcess, ControlWaits};
use crate::env::TestEnv;
use crate::qmp::Qmp;
use crate::vm::{Balloon, Vm, VmConfig};
use crate::{wait_for, MIB};

/// Guest RAM of the migration tests.
pub const GUEST_MIB: u64 = 512;
/// The balloon they migrate.
pub const BALLOON_BYTES: u64 = 256 * MIB;
/// Host memory a destination may hold beyond guest RAM minus the balloon
/// (page tables of the guest's own, rounding): "a small margin".
pub const RESIDENT_MARGIN_BYTES: u64 = 8 * MIB;
/// Longest a migration of a 512 MiB guest may take under TCG.
pub const MIGRATION_DEADLINE: Duration = Duration::from_secs(180);

pub struct Side {
    pub vm: Vm,
    pub qmp: Qmp,
    pub backend: BackendProcess,
    pub control: ControlClient,
}

/// Where each side keeps its sockets.
pub fn side_dir(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

fn config(backend: &BackendProcess, qmp: PathBuf, incoming: Option<String>) -> VmConfig {
    VmConfig {
        mem_mib: GUEST_MIB,
        balloon: Balloon::VhostUser {
            socket: backend.socket.clone(),
            reconnect_ms: None,
            migratable: true,
        },
        qmp_socket: Some(qmp),
        incoming,
        ..VmConfig::default()
    }
}

impl Side {
    /// A backend with `backend_args` and a guest booted on it, its driver
    /// negotiated.
    pub fn boot(env: &TestEnv, dir: &Path, backend_args: &[&str]) -> anyhow::Result<Side> {
        Self::boot_with(env, dir, backend_args, None, |_| {})
    }

    /// Like `boot`, with the backend's log in `log` and the VM's
    /// configuration changed by `tweak` (its size, a disk; the destination
    /// must get the same).
    pub fn boot_with(
        env: &TestEnv,
        dir: &Path,
        backend_args: &[&str],
        log: Option<&Path>,
        tweak: impl FnOnce(&mut VmConfig),
    ) -> anyhow::Result<Side> {
        let backend = BackendProcess::start_logged(env, dir, backend_args, log)?;
        let mut config = config(&backend, dir.join("qmp.sock"), None);
        tweak(&mut config);
        let vm = Vm::boot(env, &config)?;
        let qmp = Qmp::connect(&dir.join("qmp.sock"))?;
        let mut control = backend.client()?;
        control.wait_negotiated(Duration::from_secs(60))?;
        Ok(Side {
            vm,
            qmp,
            backend,
            control,
        })
    }

    /// A backend with `backend_args` and a QEMU waiting on `incoming`.
    pub fn incoming(
        env: &TestEnv,
        dir: &Path,
        backend_args: &[&str],
        incoming: &str,
    ) -> anyhow::Result<Side> {
        Self::incoming_logged(env, dir, backend_args, incoming, None)
    }

    /// Like `incoming`, with the backend's log in `log`.
    pub fn incoming_logged(
        env: &TestEnv,
        dir: &Path,
        backend_args: &[&str],
        incoming: &str,
        log: Option<&Path>,
    ) -> anyhow::Result<Side> {
        Self::incoming_with(env, dir, backend_args, incoming, log, |_| {})
    }

    /// Like `incoming_logged`, with the VM's configuration changed by
    /// `tweak` (as the source's was).
    pub fn incoming_with(
        env: &TestEnv,
        dir: &Path,
        backend_args: &[&str],
        incoming: &str,
        log: Option<&Path>,
        tweak: impl FnOnce(&mut VmConfig),
    ) -> anyhow::Result<Side> {
        let backend = BackendProcess::start_logged(env, dir, backend_args, log)?;
        let mut config = config(&backend, dir.join("qmp.sock"), Some(incoming.into()));
        tweak(&mut config);
        let vm = Vm::start_incoming(env, &config)?;
        let mut qmp = Qmp::connect(&dir.join("qmp.sock"))?;
        if has_return_path(incoming) {
            set_capabilities(&mut qmp, &[])?;
        }
        let control = backend.client()?;
        Ok(Side {
            vm,
            qmp,
            backend,
            control,
        })
    }

    /// Waits until the migrated guest runs here.
    pub fn wait_running(&mut self) -> anyhow::Result<()> {
        let qmp = &mut self.qmp;
        wait_for("the destination to run", MIGRATION_DEADLINE, || {
            Ok((qmp.run_state()? == "running").then_some(()))
        })
    }
}

/// Whether a migration to `uri` can have a return path (a socket can, a
/// file cannot).
fn has_return_path(uri: &str) -> bool {
    uri.starts_with("unix:") || uri.starts_with("tcp:")
}

/// Where the migration tests write their data pattern in the guest.
pub const PATTERN: &str = "/mnt/data/pattern";

/// Writes `mib` MiB of random data to `PATTERN` in the guest; its checksum.
pub fn write_pattern(vm: &mut Vm, mib: u64) -> anyhow::Result<String> {
    vm.sh(&format!(
        "dd if=/dev/urandom of={PATTERN} bs=1M count={mib} 2>/dev/null"
    ))?;
    vm.sh(&format!("md5sum {PATTERN}"))
}

/// Turns on `capabilities` and the return path on one QEMU. With a return
/// path the source waits for the destination to load the state, so a
/// destination that refuses it fails the migration and the source resumes
/// (without, the source stops in `postmigrate`).
pub fn set_capabilities(qmp: &mut Qmp, capabilities: &[&str]) -> anyhow::Result<()> {
    let list: Vec<serde_json::Value> = capabilities
        .iter()
        .chain(&["return-path"])
        .map(|name| serde_json::json!({"capability": name, "state": true}))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        serde_json::json!({ "capabilities": list }),
    )?;
    Ok(())
}

/// What one migration cost, from the source's `query-migrate`.
#[derive(Debug)]
pub struct MigrationCost {
    pub total_time_ms: u64,
    pub transferred_bytes: u64,
}

/// Migrates `source` to `uri`; the final `query-migrate`, whatever the
/// outcome.
pub fn try_migrate(source: &mut Side, uri: &str) -> anyhow::Result<serde_json::Value> {
    if has_return_path(uri) {
        set_capabilities(&mut source.qmp, &[])?;
    }
    source.qmp.migrate(uri, MIGRATION_DEADLINE)
}

/// For a destination started with `-incoming defer`: sets `capabilities`
/// (and the return path) on both sides, lets the destination listen on
/// `uri` (`migrate-incoming`, as libvirt does) and migrates.
pub fn migrate_with_capabilities(
    source: &mut Side,
    destination: &mut Side,
    uri: &str,
    capabilities: &[&str],
) -> anyhow::Result<MigrationCost> {
    for qmp in [&mut source.qmp, &mut destination.qmp] {
        set_capabilities(qmp, capabilities)?;
    }
    destination
        .qmp
        .execute("migrate-incoming", serde_json::json!({ "uri": uri }))?;
    migrate(source, uri)
}

/// Migrates `source` to `uri` and checks that it completed.
pub fn migrate(source: &mut Side, uri: &str) -> anyhow::Result<MigrationCost> {
    let started = Instant::now();
    let info = try_migrate(source, uri)?;
    anyhow::ensure!(info["status"] == "completed", "migration failed: {info}");
    let cost = MigrationCost {
        total_time_ms: info["total-time"]
            .as_u64()
            .unwrap_or(started.elapsed().as_millis() as u64),
        transferred_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
    };
    eprintln!(
        "[migration] to {uri}: {} ms, {} MiB sent",
        cost.total_time_ms,
        cost.transferred_bytes / MIB
    );
    Ok(cost)
}

/// Error counters of a backend's status, as (name, count) pairs.
pub fn error_counters(status: &StatusReply) -> Vec<(String, u64)> {
    status
        .errors
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| (name.clone(), *n))
        .collect()
}
