//! One live migration of a 512 MiB guest holding a 256 MiB balloon, with
//! our `vhost-user-balloon-pci` and with QEMU's built-in
//! `virtio-balloon-pci` on the same QEMU build and guest image: how long
//! it took, how much RAM was sent, and how much guest RAM the destination
//! holds on the host afterwards; each as a plain precopy migration and
//! with multifd (which leaves pages sent as zero alone on the destination).

use std::path::Path;
use std::time::Duration;

use guest_tests::backend::ControlWaits;
use guest_tests::env::TestEnv;
use guest_tests::migration::{
    migrate_with_capabilities, set_capabilities, side_dir, write_pattern, MigrationCost, Side,
    BALLOON_BYTES, GUEST_MIB,
};
use guest_tests::qmp::Qmp;
use guest_tests::vm::{Balloon, Vm, VmConfig};
use guest_tests::{wait_for, MIB, TARGET_DEADLINE};
use serde_json::json;

/// The guest's own data, written before the balloon fills.
const PATTERN_MIB: u64 = 128;

struct Outcome {
    cost: MigrationCost,
    destination_resident_bytes: u64,
    balloon_after_bytes: u64,
}

/// The migration capabilities of a run (the return path is always on).
fn capabilities(multifd: bool) -> &'static [&'static str] {
    if multifd {
        &["multifd"]
    } else {
        &[]
    }
}

fn ours(env: &TestEnv, dir: &Path, multifd: bool) -> anyhow::Result<Outcome> {
    let mut source = Side::boot(env, &side_dir(dir, "ours-source")?, &[])?;
    write_pattern(&mut source.vm, PATTERN_MIB)?;
    source.control.set_target(BALLOON_BYTES)?;
    source.control.wait_actual(BALLOON_BYTES, TARGET_DEADLINE)?;
    let uri = format!("unix:{}", dir.join("ours.sock").display());
    let mut destination = Side::incoming(env, &side_dir(dir, "ours-destination")?, &[], "defer")?;
    let cost =
        migrate_with_capabilities(&mut source, &mut destination, &uri, capabilities(multifd))?;
    destination.wait_running()?;
    let status = destination
        .control
        .wait_actual(BALLOON_BYTES, TARGET_DEADLINE)?;
    Ok(Outcome {
        cost,
        destination_resident_bytes: destination.vm.host_resident_bytes()?,
        balloon_after_bytes: status.actual_bytes,
    })
}

fn builtin_config(qmp: &Path, incoming: Option<String>) -> VmConfig {
    VmConfig {
        mem_mib: GUEST_MIB,
        balloon: Balloon::BuiltIn {
            free_page_reporting: false,
        },
        qmp_socket: Some(qmp.to_path_buf()),
        incoming,
        ..VmConfig::default()
    }
}

/// Bytes in QEMU's built-in balloon (`query-balloon` reports guest RAM
/// minus the balloon).
fn builtin_balloon_bytes(qmp: &mut Qmp) -> anyhow::Result<u64> {
    let actual = qmp.execute("query-balloon", json!({}))?["actual"]
        .as_u64()
        .unwrap_or(0);
    Ok((GUEST_MIB * MIB).saturating_sub(actual))
}

fn builtin(env: &TestEnv, dir: &Path, multifd: bool) -> anyhow::Result<Outcome> {
    let source_qmp = dir.join("builtin-source.qmp");
    let mut source = Vm::boot(env, &builtin_config(&source_qmp, None))?;
    let mut qmp = Qmp::connect(&source_qmp)?;
    write_pattern(&mut source, PATTERN_MIB)?;
    qmp.execute("balloon", json!({"value": GUEST_MIB * MIB - BALLOON_BYTES}))?;
    wait_for("the built-in balloon to fill", TARGET_DEADLINE, || {
        Ok((builtin_balloon_bytes(&mut qmp)? >= BALLOON_BYTES).then_some(()))
    })?;
    let uri = format!("unix:{}", dir.join("builtin.sock").display());
    let destination_qmp = dir.join("builtin-destination.qmp");
    let destination =
        Vm::start_incoming(env, &builtin_config(&destination_qmp, Some("defer".into())))?;
    let mut destination_control = Qmp::connect(&destination_qmp)?;
    set_capabilities(&mut destination_control, capabilities(multifd))?;
    set_capabilities(&mut qmp, capabilities(multifd))?;
    destination_control.execute("migrate-incoming", json!({ "uri": uri }))?;
    let info = qmp.migrate(&uri, guest_tests::migration::MIGRATION_DEADLINE)?;
    anyhow::ensure!(info["status"] == "completed", "migration failed: {info}");
    wait_for("the destination to run", Duration::from_secs(60), || {
        Ok((destination_control.run_state()? == "running").then_some(()))
    })?;
    Ok(Outcome {
        cost: MigrationCost {
            total_time_ms: info["total-time"].as_u64().unwrap_or(0),
            transferred_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        },
        destination_resident_bytes: destination.host_resident_bytes()?,
        balloon_after_bytes: builtin_balloon_bytes(&mut destination_control)?,
    })
}

/// Runs both migrations; the markdown table.
pub fn run(env: &TestEnv) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for multifd in [false, true] {
        let how = if multifd { "multifd" } else { "precopy" };
        // A fresh directory per pair: the sockets' names repeat.
        let dir = tempfile::tempdir()?;
        eprintln!("[xtask] migrating with our balloon ({how})");
        let ours = ours(env, dir.path(), multifd)?;
        eprintln!("[xtask] migrating with QEMU's virtio-balloon-pci ({how})");
        let builtin = builtin(env, dir.path(), multifd)?;
        runs.push((how, ours, builtin));
    }
    let row = |name: &str, o: &Outcome| {
        format!(
            "| {name} | {:.2} s | {} MiB | {} MiB | {} MiB |",
            o.cost.total_time_ms as f64 / 1000.0,
            o.cost.transferred_bytes / MIB,
            o.balloon_after_bytes / MIB,
            o.destination_resident_bytes / MIB,
        )
    };
    let ratio = |ours: u64, theirs: u64| {
        if theirs == 0 {
            "-".to_string()
        } else {
            format!("{:.2}x", ours as f64 / theirs as f64)
        }
    };
    let mut table = String::from(
        "| migration | device | migration time | RAM sent | balloon on the destination | destination guest RAM resident |\n\
         |---|---|---|---|---|---|",
    );
    for (how, ours, builtin) in &runs {
        table.push_str(&format!(
            "\n| {how} {}\n| {how} {}\n| {how} | ours / built-in | {} | {} | | {} |",
            row("vhost-user-balloon-pci + balloon-backend", ours),
            row("virtio-balloon-pci (QEMU's)", builtin),
            ratio(ours.cost.total_time_ms, builtin.cost.total_time_ms),
            ratio(ours.cost.transferred_bytes, builtin.cost.transferred_bytes),
            ratio(
                ours.destination_resident_bytes,
                builtin.destination_resident_bytes
            ),
        ));
    }
    Ok(table)
}
