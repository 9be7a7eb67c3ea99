//! (g) Deflate-on-OOM: with the balloon holding most guest memory, a guest
//! program allocates more than is free; the balloon deflates and the
//! program completes with no OOM kill.

use guest_tests::backend::ControlWaits;
use guest_tests::{Stack, MIB, TARGET_DEADLINE};

#[test]
fn the_balloon_deflates_instead_of_an_oom_kill() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &["--max-reclaim-percent", "75"], |_| {})?;
    let limit = stack.control.status()?.max_reclaim_bytes;
    stack.control.set_target(limit)?;
    stack.control.wait_actual(limit, TARGET_DEADLINE)?;
    let free = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
    let want = free + 128 * MIB;
    eprintln!(
        "[g] balloon {} MiB, guest free {} MiB, allocating {} MiB",
        limit / MIB,
        free / MIB,
        want / MIB
    );
    // tmpfs pages cannot be reclaimed or swapped: only the balloon can give.
    stack.vm.sh(&format!(
        "dd if=/dev/zero of=/mnt/data/hog bs=1M count={} 2>/dev/null",
        want / MIB
    ))?;
    let oom_kills = stack.vm.sh("grep oom_kill /proc/vmstat")?;
    assert!(oom_kills.lines().any(|l| l == "oom_kill 0"), "{oom_kills}");
    let status = stack.control.status()?;
    let actual = status.actual_bytes;
    assert!(actual < limit, "the balloon did not deflate: {status:?}");
    eprintln!("[g] balloon deflated to {} MiB; no OOM kill", actual / MIB);
    Ok(())
}
