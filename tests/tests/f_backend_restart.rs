//! (f) Backend restart: kill -9 the backend while the guest runs and start
//! it again; QEMU reconnects, the guest keeps running, a new target works;
//! with `--state-file` the balloon's accounting survives the restart.

use std::time::Duration;

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
        Ok((status["connected"] == true && status["config_notify"] == true).then_some(()))
    })?;
    assert_eq!(stack.vm.sh("echo alive")?, "alive");
    assert!(stack.vm.is_running());

    let reply = control.set_target(128 * MIB)?;
    assert_eq!(reply["notified"], true, "{reply}");
    control.wait_actual(128 * MIB, TARGET_DEADLINE)?;
    control.set_target(0)?;
    control.wait_actual(0, TARGET_DEADLINE)?;
    Ok(())
}

/// Pages ballooned, per the state file (the sum of its runs).
fn ballooned_bytes_in(state_file: &std::path::Path) -> anyhow::Result<Option<u64>> {
    let text = std::fs::read_to_string(state_file).unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(None);
    }
    let state: serde_json::Value = serde_json::from_str(&text)?;
    let pages = state["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|region| region["ballooned"].as_array().into_iter().flatten())
        .map(|run| run[1].as_u64().unwrap_or(0))
        .try_fold(0u64, |sum, pages| sum.checked_add(pages));
    Ok(pages.and_then(|pages| pages.checked_mul(4096)))
}

#[test]
fn a_restarted_backend_keeps_its_balloon_through_the_state_file() -> anyhow::Result<()> {
    let state_dir = tempfile::tempdir()?;
    let state_file = state_dir.path().join("state.json");
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
    wait_for(
        "the state file to hold the balloon",
        Duration::from_secs(10),
        || Ok((ballooned_bytes_in(&state_file)? == Some(128 * MIB)).then_some(())),
    )?;

    stack.backend.kill_and_restart()?;
    let mut control = stack.backend.client()?;
    let after = wait_for("QEMU to reconnect", Duration::from_secs(60), || {
        let status = control.status()?;
        Ok((status["connected"] == true && status["guest_ram_bytes"] != 0).then_some(status))
    })?;
    for field in [
        "target_bytes",
        "ballooned_bytes",
        "discarded_bytes",
        "actual_bytes",
    ] {
        assert_eq!(after[field], before[field], "{field}: {after}");
    }
    assert_eq!(after["discarded_bytes"], 128 * MIB, "{after}");

    // Pages ballooned before the restart deflate without an error.
    control.set_target(0)?;
    let status = control.wait_actual(0, TARGET_DEADLINE)?;
    assert_eq!(status["ballooned_bytes"], 0, "{status}");
    assert_eq!(
        status["errors"]["deflate_not_inflated"]
            .as_u64()
            .unwrap_or(0),
        0,
        "{status}"
    );
    assert_eq!(stack.vm.sh("echo alive")?, "alive");
    Ok(())
}
