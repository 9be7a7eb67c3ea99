//! Guest RAM on 2 MiB hugetlbfs pages: a host page goes back to the host
//! only once every 4 KiB piece of it is in the balloon, and what the backend
//! reports as discarded is exactly what the host got back.

use guest_tests::backend::ControlWaits;
use guest_tests::{Stack, MIB, TARGET_DEADLINE};

const HUGE_PAGE: u64 = 2 * MIB;

fn host_hugepages_free() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HugePages_Free in /proc/meminfo"))
}

/// Reserves host huge pages for the test and gives them back afterwards.
struct HugePageReservation {
    previous: String,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePageReservation {
    fn new(extra: u64) -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(NR_HUGEPAGES)?.trim().to_string();
        let wanted = previous.parse::<u64>()? + extra;
        std::fs::write(NR_HUGEPAGES, wanted.to_string())
            .map_err(|e| anyhow::anyhow!("reserving huge pages needs root: {e}"))?;
        let got: u64 = std::fs::read_to_string(NR_HUGEPAGES)?.trim().parse()?;
        anyhow::ensure!(got >= wanted, "the host gave {got} of {wanted} huge pages");
        Ok(HugePageReservation { previous })
    }
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(NR_HUGEPAGES, &self.previous) {
            eprintln!("restoring {NR_HUGEPAGES}: {error}");
        }
    }
}

#[test]
fn hugetlbfs_pages_are_freed_whole() -> anyhow::Result<()> {
    let _reservation = HugePageReservation::new(272)?;
    let mut stack = Stack::start(512, &["--no-reporting"], |c| {
        c.hugetlb = true;
        c.prealloc = true;
    })?;
    let free_before = host_hugepages_free()?;

    stack.control.set_target(256 * MIB)?;
    let status = stack.control.wait_actual(256 * MIB, TARGET_DEADLINE)?;
    let freed_bytes = (host_hugepages_free()? - free_before) * HUGE_PAGE;
    let discarded = status.discarded_bytes;
    eprintln!(
        "[i] 256 MiB ballooned in 4 KiB pages: {} MiB of 2 MiB host pages freed (backend: {} MiB)",
        freed_bytes / MIB,
        discarded / MIB
    );
    assert_eq!(
        freed_bytes, discarded,
        "the host got back exactly what the backend says"
    );
    assert!(
        freed_bytes >= 200 * MIB,
        "only {freed_bytes} bytes of huge pages freed"
    );
    assert!(freed_bytes <= 256 * MIB);

    stack.control.set_target(0)?;
    let status = stack.control.wait_actual(0, TARGET_DEADLINE)?;
    assert_eq!(status.discarded_bytes, 0);
    // The guest can use its memory again (huge pages fault back in).
    stack
        .vm
        .sh("dd if=/dev/zero of=/mnt/data/fill bs=1M count=384 2>/dev/null && rm /mnt/data/fill")?;
    Ok(())
}
