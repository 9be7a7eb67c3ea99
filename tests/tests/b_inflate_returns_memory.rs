//! (b) A 256 MiB target on a 512 MiB guest: `actual` reaches it and the
//! host-resident size of guest RAM, measured on QEMU's memfd, falls by at
//! least 95 % of 256 MiB; target 0 gives it all back.

use guest_tests::backend::ControlWaits;
use guest_tests::{Stack, MIB, TARGET_DEADLINE};

#[test]
fn inflate_returns_memory_to_the_host_and_deflate_gives_it_back() -> anyhow::Result<()> {
    // Preallocated RAM: every page the balloon takes is really resident.
    let mut stack = Stack::start(512, &["--no-reporting"], |c| c.prealloc = true)?;
    let before = stack.vm.host_resident_bytes()?;
    assert!(
        before >= 500 * MIB,
        "guest RAM should be preallocated, {before} bytes resident"
    );

    let reply = stack.control.set_target(256 * MIB)?;
    assert_eq!(reply.target_bytes, 256 * MIB);
    assert!(reply.notified);
    let status = stack.control.wait_actual(256 * MIB, TARGET_DEADLINE)?;
    let after = stack.vm.host_resident_bytes()?;
    let returned = before.saturating_sub(after);
    eprintln!(
        "[b] resident before {} MiB, after {} MiB: {} MiB returned of 256 MiB ballooned; backend says discarded {} MiB",
        before / MIB,
        after / MIB,
        returned / MIB,
        status.discarded_bytes / MIB
    );
    assert!(
        returned * 100 >= 256 * MIB * 95,
        "only {returned} bytes returned to the host"
    );
    assert_eq!(status.discarded_bytes, 256 * MIB);
    // The backend's own residency figure agrees with the host's measurement
    // of QEMU's memfd (within 8 MiB: the guest keeps running in between).
    let reported = stack
        .control
        .status()?
        .guest_ram_resident_bytes
        .unwrap_or(0);
    let measured = stack.vm.host_resident_bytes()?;
    assert!(
        reported.abs_diff(measured) <= 8 * MIB,
        "backend says {reported} bytes resident, the host measures {measured}"
    );

    stack.control.set_target(0)?;
    let status = stack.control.wait_actual(0, TARGET_DEADLINE)?;
    assert_eq!(status.ballooned_bytes, 0);
    // The guest can use all of it again.
    stack
        .vm
        .sh("dd if=/dev/zero of=/mnt/data/fill bs=1M count=384 2>/dev/null && rm /mnt/data/fill")?;
    Ok(())
}
