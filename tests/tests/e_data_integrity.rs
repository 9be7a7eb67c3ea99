//! (e) Data integrity: a 128 MiB pattern survives the balloon taking most
//! free memory and giving it back, three times.

use guest_tests::backend::ControlWaits;
use guest_tests::{Stack, MIB, TARGET_DEADLINE};

#[test]
fn guest_data_survives_inflate_and_deflate_cycles() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &[], |_| {})?;
    stack
        .vm
        .sh("dd if=/dev/urandom of=/mnt/data/pattern bs=1M count=128 2>/dev/null")?;
    let checksum = stack.vm.sh("md5sum /mnt/data/pattern")?;
    for round in 1..=3 {
        let free = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
        let limit = stack.control.status()?.max_reclaim_bytes;
        // Most of the free memory, leaving 24 MiB so the guest keeps working.
        let target = (free.saturating_sub(24 * MIB)).min(limit) / 4096 * 4096;
        stack.control.set_target(target)?;
        stack.control.wait_actual(target, TARGET_DEADLINE)?;
        stack.control.set_target(0)?;
        stack.control.wait_actual(0, TARGET_DEADLINE)?;
        let now = stack.vm.sh("md5sum /mnt/data/pattern")?;
        assert_eq!(now, checksum, "pattern changed in round {round}");
        eprintln!(
            "[e] round {round}: ballooned {} MiB, checksum unchanged",
            target / MIB
        );
    }
    Ok(())
}
