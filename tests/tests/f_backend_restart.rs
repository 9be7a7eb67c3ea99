//! (f) Backend restart: kill -9 the backend while the guest runs and start
//! it again; QEMU reconnects, the guest keeps running, a new target works;
//! with `--state-file` the balloon's accounting survives the restart; a
//! guest driver that reads and writes the balloon's config while the
//! backend is gone does not bring QEMU down.

use std::time::{Duration, Instant};

use guest_tests::backend::ControlWaits;
use guest_tests::qmp::Qmp;
use guest_tests::vm::Balloon;
use guest_tests::{wait_for, Stack, MIB, TARGET_DEADLINE};

#[test]
fn qemu_reconnects_after_the_backend_is_killed() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &[], |config| {
        if let Balloon::VhostUser { reconnect_ms, .. } = &mut config.balloon {
            *reconnect_ms = Some(500);
        }
    })?;
    stack.control.set_target(64 * MIB)?;
    stack.control.wait_actual(64 * MIB, TARGET_DEADLINE)?;

    stack.backend.kill_and_restart()?;
    let mut control = stack.backend.client()?;
    wait_for("QEMU to reconnect", Duration::from_secs(60), || {
        let status = control.status()?;
        Ok((status.connected && status.config_notify).then_some(()))
    })?;
    assert_eq!(stack.vm.sh("echo alive")?, "alive");
    assert!(stack.vm.is_running());

    let reply = control.set_target(128 * MIB)?;
    assert!(reply.notified, "{reply:?}");
    control.wait_actual(128 * MIB, TARGET_DEADLINE)?;
    control.set_target(0)?;
    control.wait_actual(0, TARGET_DEADLINE)?;
    Ok(())
}

#[test]
fn a_restarted_backend_keeps_its_balloon_through_the_state_file() -> anyhow::Result<()> {
    let state_dir = tempfile::tempdir()?;
    let state_file = state_dir.path().join("balloon.state");
    // The backend runs as an unprivileged user when the tests run as root.
    if let Some(account) = guest_tests::backend::backend_account()? {
        std::os::unix::fs::chown(state_dir.path(), Some(account.uid), Some(account.gid))?;
    }
    let state_arg = state_file.display().to_string();
    let mut stack = Stack::start(512, &["--state-file", &state_arg], |config| {
        if let Balloon::VhostUser { reconnect_ms, .. } = &mut config.balloon {
            *reconnect_ms = Some(500);
        }
    })?;
    stack.control.set_target(128 * MIB)?;
    let before = stack.control.wait_actual(128 * MIB, TARGET_DEADLINE)?;
    // Killed at once: the state file holds every change as it is made.
    stack.backend.kill_and_restart()?;
    let mut control = stack.backend.client()?;
    let after = wait_for("QEMU to reconnect", Duration::from_secs(60), || {
        let status = control.status()?;
        Ok((status.connected && status.guest_ram_bytes != 0).then_some(status))
    })?;
    for (field, after_value, before_value) in [
        ("target_bytes", after.target_bytes, before.target_bytes),
        (
            "ballooned_bytes",
            after.ballooned_bytes,
            before.ballooned_bytes,
        ),
        (
            "discarded_bytes",
            after.discarded_bytes,
            before.discarded_bytes,
        ),
        ("actual_bytes", after.actual_bytes, before.actual_bytes),
    ] {
        assert_eq!(after_value, before_value, "{field}: {after:?}");
    }
    assert_eq!(after.discarded_bytes, 128 * MIB, "{after:?}");

    // Pages ballooned before the restart deflate without an error.
    control.set_target(0)?;
    let status = control.wait_actual(0, TARGET_DEADLINE)?;
    assert_eq!(status.ballooned_bytes, 0, "{status:?}");
    assert_eq!(
        status
            .errors
            .get("deflate_not_inflated")
            .copied()
            .unwrap_or(0),
        0,
        "{status:?}"
    );
    assert_eq!(stack.vm.sh("echo alive")?, "alive");
    Ok(())
}

/// Whether QEMU's chardev `bal0` (the backend's socket) is connected, per
/// `query-chardev`: a disconnected socket chardev's filename starts with
/// `disconnected:`.
fn balloon_chardev_connected(qmp: &mut Qmp) -> anyhow::Result<bool> {
    let chardevs = qmp.execute("query-chardev", serde_json::json!({}))?;
    let filename = chardevs
        .as_array()
        .into_iter()
        .flatten()
        .find(|chardev| chardev["label"] == "bal0")
        .and_then(|chardev| chardev["filename"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no chardev bal0 in {chardevs}"))?;
    Ok(!filename.starts_with("disconnected:"))
}

/// The guest's driver keeps reading `num_pages` (before every batch) and
/// writing `actual` (after it) while the backend is gone. Stock QEMU 10.2
/// aborted at the first such access ("vhost_dev_set_config: Assertion
/// `hdev->vhost_ops' failed"); with xtask/qemu-patches it answers from its
/// copy of the config and keeps the write for the restarted backend, and
/// the guest and the balloon carry on.
#[test]
fn config_access_while_the_backend_is_gone_keeps_qemu_alive() -> anyhow::Result<()> {
    let state_dir = tempfile::tempdir()?;
    let state_file = state_dir.path().join("balloon.state");
    let qmp_socket = state_dir.path().join("qmp.sock");
    if let Some(account) = guest_tests::backend::backend_account()? {
        std::os::unix::fs::chown(state_dir.path(), Some(account.uid), Some(account.gid))?;
    }
    let state_arg = state_file.display().to_string();
    let mut stack = Stack::start(512, &["--state-file", &state_arg], |config| {
        if let Balloon::VhostUser {
            reconnect_ms,
            migratable,
            ..
        } = &mut config.balloon
        {
            *reconnect_ms = Some(500);
            *migratable = true;
        }
        config.qmp_socket = Some(qmp_socket.clone());
    })?;
    let mut qmp = Qmp::connect(&qmp_socket)?;

    // Pin all but 96 MiB of the guest's free memory in tmpfs, then ask for
    // more than that: the driver inflates until it runs out of pages and
    // then retries every 200 ms, each time reading `num_pages` and writing
    // `actual`, with no request in its queues to wait for.
    let free = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
    let hog_mib = (free / MIB)
        .checked_sub(96)
        .ok_or_else(|| anyhow::anyhow!("the guest has only {free} bytes free"))?;
    stack.vm.sh(&format!(
        "dd if=/dev/zero of=/mnt/data/hog bs=1M count={hog_mib} 2>/dev/null"
    ))?;
    let target = stack.control.status()?.max_reclaim_bytes;
    stack.control.set_target(target)?;
    // Starved: `actual` has stood still below the target for a second
    // (five retries; a growing balloon moves it every few milliseconds).
    let mut last: Option<(u64, Instant)> = None;
    let starved_at = wait_for("the driver to run out of pages", TARGET_DEADLINE, || {
        let actual = stack.control.status()?.actual_bytes;
        match last {
            Some((seen, since)) if seen == actual => {
                Ok((actual > 0 && since.elapsed() >= Duration::from_secs(1)).then_some(actual))
            }
            _ => {
                last = Some((actual, Instant::now()));
                Ok(None)
            }
        }
    })?;
    assert!(starved_at < target, "the balloon reached {target} bytes");
    eprintln!(
        "[f] driver starved at {} MiB of a {} MiB target",
        starved_at / MIB,
        target / MIB
    );

    // Kill the backend; once QEMU has seen it go, start it again. QEMU
    // reconnects only after `reconnect-ms` (500 ms): the starved driver
    // retries at least twice while it is disconnected.
    stack.backend.kill()?;
    wait_for(
        "QEMU to see the backend gone",
        Duration::from_secs(10),
        || {
            anyhow::ensure!(stack.vm.is_running(), "QEMU exited");
            Ok((!balloon_chardev_connected(&mut qmp)?).then_some(()))
        },
    )?;
    stack.backend.start_again()?;
    let mut control = stack.backend.client()?;
    wait_for("QEMU to reconnect", Duration::from_secs(60), || {
        anyhow::ensure!(stack.vm.is_running(), "QEMU exited");
        let status = control.status()?;
        let backend_connected = status.connected && status.config_notify;
        Ok((backend_connected && balloon_chardev_connected(&mut qmp)?).then_some(()))
    })?;
    assert!(stack.vm.is_running(), "QEMU exited");
    assert_eq!(
        qmp.execute("query-status", serde_json::json!({}))?["status"],
        "running"
    );

    // The restarted backend drives the balloon to a new target.
    let new_target = starved_at / 2 / MIB * MIB;
    let reply = control.set_target(new_target)?;
    assert!(reply.notified, "{reply:?}");
    control.wait_actual(new_target, TARGET_DEADLINE)?;
    assert_eq!(stack.vm.sh("rm /mnt/data/hog && echo alive")?, "alive");
    assert!(stack.vm.is_running(), "QEMU exited");
    Ok(())
}
