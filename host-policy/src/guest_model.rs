//! The simulator's guest: its RAM split into the workload's anonymous
//! working set, page cache and free memory. A balloon takes free memory
//! first, then page cache (the guest re-reads what it loses: major
//! faults), then working set: what of the working set does not fit is
//! swapped (swap-ins, major faults) and, past the guest's swap, an OOM
//! kill. The guest's LRU keeps the hot part of its page cache last: what
//! the workload keeps re-reading (`hot_cache_bytes`) is lost only after the
//! cold cache, and while it does not fit it is read again every tick.
//! Pure: one call is one tick.

use crate::policy::GuestCounters;

const PAGE: u64 = 4096;
/// When the working set and hot cache leave less than this share of its
/// memory, a guest's allocations stall (direct reclaim), as Linux's low
/// watermark makes them.
pub const LOW_WATERMARK_SHARE: u64 = 2;

/// What the workload wants this tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Want {
    pub working_set_bytes: u64,
    pub cache_bytes: u64,
    /// The part of `cache_bytes` the workload keeps reading.
    pub hot_cache_bytes: u64,
}

/// What the guest looks like after a tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    pub free_bytes: u64,
    pub cache_bytes: u64,
    /// Working set that does not fit in the guest's memory.
    pub missing_working_set_bytes: u64,
    /// The working set is not fully resident.
    pub pressure: bool,
    pub oom_kill: bool,
}

impl Tick {
    /// What Linux reports as available: free memory and page cache.
    pub fn available_bytes(&self) -> u64 {
        self.free_bytes + self.cache_bytes
    }
}

/// Cumulative counters as the guest's statistics report them.
pub fn fresh_counters() -> GuestCounters {
    GuestCounters {
        swap_in: Some(0),
        major_faults: Some(0),
        alloc_stalls: Some(0),
        direct_reclaims: Some(0),
        oom_kills: Some(0),
    }
}

fn add(counter: &mut Option<u64>, amount: u64) {
    *counter = Some(counter.unwrap_or(0).saturating_add(amount));
}

/// One tick of a guest of `ram_bytes` with a balloon of `balloon_bytes`
/// and `swap_bytes` of swap; updates its cumulative counters.
pub fn step(
    ram_bytes: u64,
    balloon_bytes: u64,
    swap_bytes: u64,
    want: Want,
    counters: &mut GuestCounters,
) -> Tick {
    let memory = ram_bytes.saturating_sub(balloon_bytes);
    let resident_working_set = want.working_set_bytes.min(memory);
    let missing = want.working_set_bytes - resident_working_set;
    let oom_kill = missing > swap_bytes;
    if missing > 0 {
        let swapped = missing.min(swap_bytes);
        add(&mut counters.swap_in, swapped);
        add(&mut counters.major_faults, swapped / PAGE);
    }
    if oom_kill {
        add(&mut counters.oom_kills, 1);
    }
    let cache = want.cache_bytes.min(memory - resident_working_set);
    // Hot cache that no longer fits is read again, every tick.
    let hot = want.hot_cache_bytes.min(want.cache_bytes);
    add(&mut counters.major_faults, hot.saturating_sub(cache) / PAGE);
    let free = memory - resident_working_set - cache;
    // Allocations stall when what the workload really uses (its working
    // set and hot cache) leaves less than the low watermark: cold cache is
    // dropped without a stall.
    let watermark = memory * LOW_WATERMARK_SHARE / 100;
    if want.working_set_bytes + hot > memory.saturating_sub(watermark) {
        add(&mut counters.alloc_stalls, 1);
        add(&mut counters.direct_reclaims, 1);
    }
    Tick {
        free_bytes: free,
        cache_bytes: cache,
        missing_working_set_bytes: missing,
        pressure: missing > 0,
        oom_kill,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_balloon_takes_free_then_cache_then_working_set() {
        let want = Want {
            working_set_bytes: 512 * MIB,
            cache_bytes: 256 * MIB,
            hot_cache_bytes: 64 * MIB,
        };
        let mut counters = fresh_counters();
        // 1 GiB guest: 256 MiB free.
        let t = step(1024 * MIB, 0, 0, want, &mut counters);
        assert_eq!(
            (t.free_bytes, t.cache_bytes, t.pressure),
            (256 * MIB, 256 * MIB, false)
        );
        // A 384 MiB balloon: the free memory, then 128 MiB of cold cache,
        // which nobody reads again.
        let t = step(1024 * MIB, 384 * MIB, 0, want, &mut counters);
        assert_eq!(
            (t.free_bytes, t.cache_bytes, t.pressure),
            (0, 128 * MIB, false)
        );
        assert_eq!(counters.major_faults, Some(0));
        // 480 MiB: 32 MiB of the hot cache no longer fits and is read again.
        step(1024 * MIB, 480 * MIB, 0, want, &mut counters);
        assert_eq!(counters.major_faults, Some(32 * MIB / PAGE));
        // 640 MiB: the working set no longer fits; no swap: an OOM kill.
        let t = step(1024 * MIB, 640 * MIB, 0, want, &mut counters);
        assert!(t.pressure && t.oom_kill);
        assert_eq!(t.missing_working_set_bytes, 128 * MIB);
        assert_eq!(counters.oom_kills, Some(1));
        // With 256 MiB of swap it swaps instead.
        let t = step(1024 * MIB, 640 * MIB, 256 * MIB, want, &mut counters);
        assert!(t.pressure && !t.oom_kill);
        assert_eq!(counters.swap_in, Some(128 * MIB));
    }

    proptest! {
        /// Memory is conserved and the order holds: cache is only lost
        /// once nothing is free, working set only once no cache is left.
        #[test]
        fn memory_adds_up_and_the_order_holds(
            ram_mib in 1u64..65536, balloon_pct in 0u64..=100, ws_pct in 0u64..150, cache_pct in 0u64..150, swap_mib in 0u64..4096,
        ) {
            let ram = ram_mib * MIB;
            let balloon = ram * balloon_pct / 100;
            let want = Want { working_set_bytes: ram * ws_pct / 100, cache_bytes: ram * cache_pct / 100, hot_cache_bytes: ram * cache_pct / 400 };
            let mut counters = fresh_counters();
            let t = step(ram, balloon, swap_mib * MIB, want, &mut counters);
            let memory = ram - balloon;
            let resident = want.working_set_bytes - t.missing_working_set_bytes;
            prop_assert_eq!(resident + t.cache_bytes + t.free_bytes, memory);
            if t.cache_bytes < want.cache_bytes { prop_assert_eq!(t.free_bytes, 0); }
            if t.pressure { prop_assert_eq!(t.cache_bytes, 0); prop_assert_eq!(t.free_bytes, 0); }
            prop_assert_eq!(t.oom_kill, t.missing_working_set_bytes > swap_mib * MIB);
        }
    }
}
