//! (h) Maximum reclaim: a target above the VM's limit is clamped, and the
//! guest never loses more than the limit.

use anyhow::Context;
use guest_tests::backend::ControlWaits;
use guest_tests::{Stack, MIB, TARGET_DEADLINE};

#[test]
fn targets_above_the_limit_are_clamped() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &["--max-reclaim-percent", "30"], |_| {})?;
    let free_before = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
    let limit = (512 * MIB * 30 / 100) / 4096 * 4096;
    let reply = stack.control.set_target(400 * MIB)?;
    assert!(reply.clamped, "{reply:?}");
    assert_eq!(reply.target_bytes, limit);
    stack.control.wait_actual(limit, TARGET_DEADLINE)?;
    // The driver has acknowledged the limit. A full round trip through
    // the guest afterwards (fresh statistics: the device hands back the
    // stats buffer and the driver refills it) shows the driver has nothing
    // more queued; the balloon must still stand at the limit.
    stack
        .control
        .refresh_stats(60_000)
        .context("no fresh statistics")?;
    let status = stack.control.status()?;
    assert_eq!(status.actual_bytes, limit, "{status:?}");
    assert!(status.ballooned_bytes <= limit, "{status:?}");
    // The guest lost about the limit, not more.
    let free_after = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
    let lost = free_before
        .checked_sub(free_after)
        .ok_or_else(|| anyhow::anyhow!("guest free memory grew: {free_before} -> {free_after}"))?;
    eprintln!(
        "[h] limit {} MiB, guest free fell by {} MiB",
        limit / MIB,
        lost / MIB
    );
    assert!(
        lost <= limit.saturating_add(16 * MIB),
        "guest lost {lost} bytes, limit {limit}"
    );
    assert!(
        lost.saturating_add(16 * MIB) >= limit,
        "guest lost only {lost} bytes"
    );
    Ok(())
}
