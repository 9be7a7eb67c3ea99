//! (c) Guest statistics arrive and agree within 5 % with the guest's own
//! /proc/meminfo at the same moment.

use guest_tests::Stack;

fn within_5_percent(reported: u64, truth: u64) -> bool {
    reported.abs_diff(truth) * 20 <= truth
}

#[test]
fn statistics_match_the_guest_meminfo() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &["--stats-interval", "1"], |_| {})?;
    let stats = stack.control.refresh_stats(20_000)?.stats;
    let meminfo = stack.vm.meminfo()?;
    let free = stats.free_bytes.unwrap_or(0);
    let total = stats.total_bytes.unwrap_or(0);
    let guest_free = meminfo.get("MemFree").copied().unwrap_or(0);
    let guest_total = meminfo.get("MemTotal").copied().unwrap_or(0);
    eprintln!("[c] stats free {free} total {total}; meminfo free {guest_free} total {guest_total}");
    assert!(
        within_5_percent(free, guest_free),
        "free {free} vs MemFree {guest_free}"
    );
    assert!(
        within_5_percent(total, guest_total),
        "total {total} vs MemTotal {guest_total}"
    );
    assert!(stats.available_bytes.is_some());
    // Linux 6.12 added tags 10-15 (OOM kills, stalls, scans, reclaims):
    // newer guests must send them, older ones cannot.
    let newer_tags = [
        ("oom_kills", stats.oom_kills),
        ("alloc_stalls", stats.alloc_stalls),
        ("async_scans", stats.async_scans),
        ("direct_scans", stats.direct_scans),
        ("async_reclaims", stats.async_reclaims),
        ("direct_reclaims", stats.direct_reclaims),
    ];
    let version = stack.vm.kernel_version()?;
    if version >= (6, 12) {
        for (tag, value) in newer_tags {
            assert!(
                value.is_some(),
                "no {tag} from a {version:?} guest: {stats:?}"
            );
        }
    } else {
        for (tag, value) in newer_tags {
            assert!(value.is_none(), "{tag} from a {version:?} guest: {stats:?}");
        }
        eprintln!("[absent] stats tags 10-15 (before Linux 6.12)");
    }
    assert!(stats.updated_unix_ms > 0);

    // The timer keeps them fresh without asking.
    let updated = |status: balloon_protocol::control::StatusReply| {
        status.stats.map_or(0, |stats| stats.updated_unix_ms)
    };
    let first = updated(stack.control.status()?);
    guest_tests::wait_for(
        "a timer-driven refresh",
        std::time::Duration::from_secs(30),
        || {
            let now = updated(stack.control.status()?);
            Ok((now > first).then_some(()))
        },
    )?;
    Ok(())
}
