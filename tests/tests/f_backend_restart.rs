//! (f) Backend restart: kill -9 the backend while the guest runs and start
//! it again; QEMU reconnects, the guest keeps running, a new target works.

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
