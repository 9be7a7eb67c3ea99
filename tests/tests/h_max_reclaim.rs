//! (h) Maximum reclaim: a target above the VM's limit is clamped, and the
//! guest never loses more than the limit.

use std::time::{Duration, Instant};

use guest_tests::{Stack, MIB, TARGET_DEADLINE};

#[test]
fn targets_above_the_limit_are_clamped() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &["--max-reclaim-percent", "30"], |_| {})?;
    let free_before = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
    let limit = (512 * MIB * 30 / 100) / 4096 * 4096;
    let reply = stack.control.set_target(400 * MIB)?;
    assert_eq!(reply["clamped"], true, "{reply}");
    assert_eq!(reply["target_bytes"], limit);
    stack.control.wait_actual(limit, TARGET_DEADLINE)?;
    // Watch for a while: the balloon never grows past the limit.
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let status = stack.control.status()?;
        assert!(
            status["actual_bytes"].as_u64().unwrap_or(0) <= limit,
            "{status}"
        );
        assert!(
            status["ballooned_bytes"].as_u64().unwrap_or(0) <= limit,
            "{status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The guest lost about the limit, not more.
    let free_after = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
    let lost = free_before.saturating_sub(free_after);
    eprintln!(
        "[h] limit {} MiB, guest free fell by {} MiB",
        limit / MIB,
        lost / MIB
    );
    assert!(
        lost <= limit + 16 * MIB,
        "guest lost {lost} bytes, limit {limit}"
    );
    assert!(lost + 16 * MIB >= limit, "guest lost only {lost} bytes");
    Ok(())
}
