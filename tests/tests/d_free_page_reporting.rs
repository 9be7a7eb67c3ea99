//! (d) Free page reporting: with no target set, the guest fills and frees
//! 256 MiB; host-resident guest RAM falls by at least 200 MiB within 10 s.

use std::time::{Duration, Instant};

use guest_tests::{wait_for, Stack, MIB};

#[test]
fn freed_guest_memory_returns_to_the_host() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &[], |_| {})?;
    stack
        .vm
        .sh("dd if=/dev/zero of=/mnt/data/fill bs=1M count=256 2>/dev/null")?;
    let filled = stack.vm.host_resident_bytes()?;
    stack.vm.sh("rm /mnt/data/fill")?;
    let freed_at = Instant::now();
    let after = wait_for("200 MiB back on the host", Duration::from_secs(10), || {
        let now = stack.vm.host_resident_bytes()?;
        Ok((filled.saturating_sub(now) >= 200 * MIB).then_some(now))
    })?;
    eprintln!(
        "[d] resident {} MiB filled, {} MiB {:.1} s after the free",
        filled / MIB,
        after / MIB,
        freed_at.elapsed().as_secs_f64()
    );
    let status = stack.control.status()?;
    assert!(status.reported_bytes_total >= 200 * MIB, "{status:?}");
    Ok(())
}
