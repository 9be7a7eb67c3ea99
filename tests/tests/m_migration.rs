//! (m) Migration: a guest carrying our balloon (`vhost-user-balloon-pci`)
//! moves to another QEMU and backend on this host, live over a Unix socket
//! or through a file (`virsh save`/`restore`'s path), and keeps its balloon,
//! its data and the memory the balloon returned. A destination that cannot
//! read the state refuses it and the source runs on. The device's other
//! stops and starts on the same guest RAM: a pause keeps the balloon, a
//! guest reset empties it.

use std::time::Duration;

use guest_tests::backend::ControlWaits;
use guest_tests::env::TestEnv;
use guest_tests::host_policy_process::{write_meminfo, PolicyProcess};
use guest_tests::migration::{
    error_counters, migrate, migrate_with_capabilities, side_dir, write_pattern, Side,
    BALLOON_BYTES, GUEST_MIB, PATTERN, RESIDENT_MARGIN_BYTES,
};
use guest_tests::{wait_for, Stack, MIB, TARGET_DEADLINE};

/// The guest's data, written before the balloon fills.
const PATTERN_MIB: u64 = 128;

/// A source guest with the data pattern written and the balloon full;
/// the pattern's checksum.
fn source_with_balloon(env: &TestEnv, dir: &std::path::Path) -> anyhow::Result<(Side, String)> {
    let mut source = Side::boot(env, dir, &[])?;
    let checksum = write_pattern(&mut source.vm, PATTERN_MIB)?;
    source.control.set_target(BALLOON_BYTES)?;
    source.control.wait_actual(BALLOON_BYTES, TARGET_DEADLINE)?;
    Ok((source, checksum))
}

/// Everything a destination must show after taking the guest over: the
/// guest runs with its data, the balloon and its target are as they were,
/// its memory is returned here too, and the balloon still works both ways.
fn check_destination(destination: &mut Side, checksum: &str) -> anyhow::Result<()> {
    destination.wait_running()?;
    let status = destination
        .control
        .wait_actual(BALLOON_BYTES, TARGET_DEADLINE)?;
    assert_eq!(status.target_bytes, BALLOON_BYTES, "{status:?}");
    assert_eq!(status.ballooned_bytes, BALLOON_BYTES, "{status:?}");
    let resident = destination.vm.host_resident_bytes()?;
    let limit = (GUEST_MIB * MIB)
        .checked_sub(BALLOON_BYTES)
        .and_then(|bytes| bytes.checked_add(RESIDENT_MARGIN_BYTES))
        .unwrap_or(0);
    eprintln!(
        "[m] destination: guest RAM resident {} MiB (limit {} MiB)",
        resident / MIB,
        limit / MIB
    );
    assert!(
        resident <= limit,
        "the destination holds {} MiB of guest RAM, more than {} MiB: the balloon's memory came back",
        resident / MIB,
        limit / MIB
    );
    assert_eq!(
        destination.vm.sh(&format!("md5sum {PATTERN}"))?,
        checksum,
        "guest data changed across the migration"
    );
    destination.control.set_target(0)?;
    destination.control.wait_actual(0, TARGET_DEADLINE)?;
    destination.control.set_target(BALLOON_BYTES)?;
    let status = destination
        .control
        .wait_actual(BALLOON_BYTES, TARGET_DEADLINE)?;
    assert_eq!(
        error_counters(&status),
        vec![],
        "the destination counted errors: {status:?}"
    );
    Ok(())
}

/// host-policy's latest decision for `vm`, with the tick it was made in.
fn decision_for(policy: &PolicyProcess, vm: &str) -> Option<(u64, serde_json::Value)> {
    let state = policy.state()?;
    let tick = state["unix_s"].as_u64()?;
    let decision = state["decision"]["vms"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == vm)?
        .clone();
    Some((tick, decision))
}

#[test]
fn live_migration_keeps_the_balloon_and_the_returned_memory() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let dir = tempfile::tempdir()?;
    let source_dir = side_dir(dir.path(), "source")?;
    let destination_dir = side_dir(dir.path(), "destination")?;
    let (mut source, checksum) = source_with_balloon(&env, &source_dir)?;
    // An operator's balloon (`balloonctl set`): host-policy holds it as it
    // finds it, and the pin travels with the device's state. (Unpinned,
    // host-policy would give back the part of it over free memory that
    // the reporting guest keeps off the host anyway: it buys the host
    // nothing.)
    source.control.pin_target(BALLOON_BYTES)?;

    // host-policy watches both ends; the host sits in its dead band (25 %
    // available) and the guests' floor is low.
    let policy_dir = side_dir(dir.path(), "policy")?;
    write_meminfo(&policy_dir.join("host-meminfo"), 16384, 4096)?;
    let mut policy = PolicyProcess::start_config(
        &env,
        &policy_dir,
        &format!(
            "[host]\ninterval_s = 1\nmeminfo = {:?}\nstate_file = {:?}\n\n[defaults]\nmin_free_mib = 16\nmin_free_percent = 0\n\n[[vm]]\nname = \"source\"\ncontrol = {:?}\n\n[[vm]]\nname = \"destination\"\ncontrol = {:?}\n",
            policy_dir.join("host-meminfo"),
            policy_dir.join("host-policy.json"),
            source_dir.join("control.sock"),
            destination_dir.join("control.sock"),
        ),
    )?;
    wait_for(
        "host-policy to hold the source's balloon",
        TARGET_DEADLINE,
        || {
            Ok(decision_for(&policy, "source")
                .filter(|(_, d)| d["target_bytes"] == BALLOON_BYTES)
                .map(drop))
        },
    )?;

    let uri = format!("unix:{}", dir.path().join("migration.sock").display());
    let mut destination = Side::incoming(&env, &destination_dir, &[], &uri)?;
    let cost = migrate(&mut source, &uri)?;
    assert!(cost.transferred_bytes > 0);
    destination.wait_running()?;
    // The source QEMU ends after a migration (libvirt quits it); its
    // backend stays until its unit is stopped.
    drop(source.vm);

    // The arriving VM is taken as it is: its first decision starts from the
    // migrated balloon and holds it; the VM that left has no decision and
    // no error counters.
    let (first_tick, first) = wait_for(
        "host-policy to see the destination",
        TARGET_DEADLINE,
        || {
            Ok(decision_for(&policy, "destination")
                .filter(|(_, d)| d["previous_bytes"].as_u64().unwrap_or(0) > 0))
        },
    )?;
    assert_eq!(first["previous_bytes"], BALLOON_BYTES, "{first}");
    assert_eq!(first["target_bytes"], BALLOON_BYTES, "{first}");
    let (_, later) = wait_for("three more ticks", TARGET_DEADLINE, || {
        Ok(decision_for(&policy, "destination")
            .filter(|(tick, _)| *tick >= first_tick.saturating_add(3)))
    })?;
    assert_eq!(later["target_bytes"], BALLOON_BYTES, "{later}");
    let state = wait_for("host-policy to let the source go", TARGET_DEADLINE, || {
        Ok(policy
            .state()
            .filter(|_| decision_for(&policy, "source").is_none()))
    })?;
    assert!(
        state["errors"]["source"]
            .as_object()
            .is_none_or(|errors| errors.values().all(|n| n == 0)),
        "{state}"
    );

    let arrived = destination.control.status()?;
    assert!(arrived.pinned, "the pin did not travel: {arrived:?}");
    // The operator hands the VM back (host-policy stopped first, so that
    // the checks below own its target).
    policy.stop()?;
    destination.control.unpin()?;
    check_destination(&mut destination, &checksum)?;
    assert_eq!(error_counters(&source.control.status()?), vec![]);
    Ok(())
}

#[test]
fn migration_while_inflating_and_reporting_free_pages() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let dir = tempfile::tempdir()?;
    let mut source = Side::boot(&env, &side_dir(dir.path(), "source")?, &[])?;
    let checksum = write_pattern(&mut source.vm, PATTERN_MIB)?;
    // Freed guest memory that free page reporting is returning while the
    // balloon fills from 0 to its target: both move during the migration.
    source.vm.sh(
        "dd if=/dev/zero of=/mnt/data/scratch bs=1M count=96 2>/dev/null && rm /mnt/data/scratch",
    )?;
    source.control.set_target(BALLOON_BYTES)?;
    wait_for("the balloon to start filling", TARGET_DEADLINE, || {
        let actual = source.control.status()?.actual_bytes;
        Ok((actual > 0).then_some(()))
    })?;
    let actual_at_start = source.control.status()?.actual_bytes;
    eprintln!("[m] migrating with {} MiB ballooned", actual_at_start / MIB);

    let uri = format!("unix:{}", dir.path().join("migration.sock").display());
    let mut destination = Side::incoming(&env, &side_dir(dir.path(), "destination")?, &[], &uri)?;
    migrate(&mut source, &uri)?;
    check_destination(&mut destination, &checksum)?;
    assert_eq!(error_counters(&source.control.status()?), vec![]);
    Ok(())
}

#[test]
fn with_multifd_every_returned_page_stays_returned() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let dir = tempfile::tempdir()?;
    let mut source = Side::boot(&env, &side_dir(dir.path(), "source")?, &[])?;
    let checksum = write_pattern(&mut source.vm, PATTERN_MIB)?;
    // Memory the guest freed goes back through free page reporting, which
    // the balloon's state does not describe.
    source.vm.sh(
        "dd if=/dev/urandom of=/mnt/data/scratch bs=1M count=160 2>/dev/null && rm /mnt/data/scratch",
    )?;
    wait_for("free page reporting", TARGET_DEADLINE, || {
        let reported = source.control.status()?.reported_bytes_total;
        Ok((reported >= 100 * MIB).then_some(()))
    })?;
    source.control.set_target(128 * MIB)?;
    source.control.wait_actual(128 * MIB, TARGET_DEADLINE)?;
    let source_resident = source.vm.host_resident_bytes()?;

    let uri = format!("unix:{}", dir.path().join("migration.sock").display());
    let mut destination =
        Side::incoming(&env, &side_dir(dir.path(), "destination")?, &[], "defer")?;
    migrate_with_capabilities(&mut source, &mut destination, &uri, &["multifd"])?;
    destination.wait_running()?;
    let status = destination
        .control
        .wait_actual(128 * MIB, TARGET_DEADLINE)?;
    assert_eq!(status.ballooned_bytes, 128 * MIB, "{status:?}");
    // Multifd leaves pages the source sends as zero alone, so the holes of
    // reported pages stay holes too (without it: all 512 MiB).
    let resident = destination.vm.host_resident_bytes()?;
    eprintln!(
        "[m] multifd: source {} MiB resident, destination {} MiB",
        source_resident / MIB,
        resident / MIB
    );
    assert!(
        resident <= source_resident.saturating_add(RESIDENT_MARGIN_BYTES),
        "the destination holds {} MiB, the source held {} MiB",
        resident / MIB,
        source_resident / MIB
    );
    assert_eq!(destination.vm.sh(&format!("md5sum {PATTERN}"))?, checksum);
    Ok(())
}

#[test]
fn save_to_a_file_and_restore() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let dir = tempfile::tempdir()?;
    let (mut source, checksum) = source_with_balloon(&env, &side_dir(dir.path(), "source")?)?;

    let image = dir.path().join("guest.state");
    let uri = format!("file:{}", image.display());
    migrate(&mut source, &uri)?;
    // Saved: the source is done with (as `virsh save` stops the domain).
    drop(source);
    let image_bytes = std::fs::metadata(&image)?.len();
    eprintln!("[m] saved image: {} MiB", image_bytes / MIB);

    let mut restored = Side::incoming(&env, &side_dir(dir.path(), "restored")?, &[], &uri)?;
    check_destination(&mut restored, &checksum)
}

#[test]
fn a_destination_of_another_state_version_refuses_and_the_source_runs_on() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let dir = tempfile::tempdir()?;
    let mut source = Side::boot(&env, &side_dir(dir.path(), "source")?, &[])?;
    source.control.set_target(BALLOON_BYTES)?;
    source.control.wait_actual(BALLOON_BYTES, TARGET_DEADLINE)?;

    let uri = format!("unix:{}", dir.path().join("migration.sock").display());
    let destination_dir = side_dir(dir.path(), "destination")?;
    let log = destination_dir.join("backend.log");
    let mut destination = Side::incoming_logged(
        &env,
        &destination_dir,
        &["--device-state-version", "2"],
        &uri,
        Some(&log),
    )?;
    let info = guest_tests::migration::try_migrate(&mut source, &uri)?;
    assert_eq!(info["status"], "failed", "{info}");
    eprintln!("[m] source's migration error: {}", info["error-desc"]);

    // The destination's backend said why, naming both versions.
    let reason = wait_for(
        "the destination backend's error",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text
                .lines()
                .find(|line| line.contains("device state version"))
                .map(str::to_string))
        },
    )?;
    assert!(
        reason.contains("version 1 is not supported") && reason.contains("reads version 2"),
        "{reason}"
    );
    // The destination QEMU gave up (it exits on a failed incoming migration).
    wait_for(
        "the destination QEMU to exit",
        Duration::from_secs(30),
        || Ok((!destination.vm.is_running()).then_some(())),
    )?;

    // The source runs on with its balloon, which still answers targets.
    wait_for("the source to run again", Duration::from_secs(30), || {
        Ok((source.qmp.run_state()? == "running").then_some(()))
    })?;
    assert_eq!(source.vm.sh("echo alive")?, "alive");
    let status = source.control.status()?;
    assert_eq!(status.actual_bytes, BALLOON_BYTES, "{status:?}");
    assert_eq!(status.ballooned_bytes, BALLOON_BYTES, "{status:?}");
    source.control.set_target(64 * MIB)?;
    let status = source.control.wait_actual(64 * MIB, TARGET_DEADLINE)?;
    assert_eq!(error_counters(&status), vec![], "{status:?}");
    Ok(())
}

#[test]
fn a_target_set_while_the_vm_is_paused_reaches_the_guest_when_it_resumes() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let dir = tempfile::tempdir()?;
    let mut side = Side::boot(&env, dir.path(), &[])?;
    side.qmp.execute("stop", serde_json::json!({}))?;
    // QEMU 10.2 dereferenced a stopped device here (our QEMU patch
    // vhost-user-base-config-notify fixes it).
    let reply = side.control.set_target(64 * MIB)?;
    assert!(reply.notified, "{reply:?}");
    assert_eq!(side.qmp.run_state()?, "paused");
    side.qmp.execute("cont", serde_json::json!({}))?;
    let status = side.control.wait_actual(64 * MIB, TARGET_DEADLINE)?;
    assert_eq!(status.ballooned_bytes, 64 * MIB, "{status:?}");
    // The device restarted with its balloon (the same guest RAM).
    side.qmp.execute("stop", serde_json::json!({}))?;
    side.qmp.execute("cont", serde_json::json!({}))?;
    side.control.set_target(0)?;
    let status = side.control.wait_actual(0, TARGET_DEADLINE)?;
    assert_eq!(error_counters(&status), vec![], "{status:?}");
    Ok(())
}

#[test]
fn a_guest_reset_empties_the_balloon_of_the_same_guest_ram() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &[], |config| config.allow_reboot = true)?;
    stack.control.set_target(128 * MIB)?;
    stack.control.wait_actual(128 * MIB, TARGET_DEADLINE)?;
    // The guest reboots: QEMU resets the device and starts it again on the
    // same guest RAM, and the new driver inflates to the target afresh.
    stack.vm.send("echo b > /proc/sysrq-trigger")?;
    stack.vm.wait_ready_count(2, Duration::from_secs(180))?;
    let status = wait_for("the rebooted guest's balloon", TARGET_DEADLINE, || {
        let status = stack.control.status()?;
        Ok((status.actual_bytes == 128 * MIB
            && status.pending_punch_bytes == 0
            && status.ballooned_bytes == 128 * MIB)
            .then_some(status))
    })?;
    // A bitmap kept from before the reset would count the new driver's
    // pages as inflated twice and hold twice the balloon.
    assert_eq!(
        status.errors.get("already_inflated").copied().unwrap_or(0),
        0,
        "{status:?}"
    );
    assert_eq!(stack.vm.sh("echo alive")?, "alive");
    Ok(())
}
