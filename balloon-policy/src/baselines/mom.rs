//! oVirt MOM's balloon policy: `doc/balloon.rules` of oVirt/mom, as VDSM
//! ships it in `static/etc/vdsm/mom.d/02-balloon.policy`.
//!
//! Host pressure is the host's free share, averaged over the last samples;
//! under pressure every guest shrinks by up to 5 % of its memory per run,
//! never below what it uses plus a free share that scales with the host's;
//! otherwise every guest grows by up to 5 %. A guest's "unused" memory is
//! its MemFree (page cache counts as used), also averaged.
//!
//! Inputs we do not have as MOM does: MOM's host free is MemFree + Buffers
//! + Cached; host-policy reads MemAvailable, which every policy here uses.

use std::collections::HashMap;

use crate::policy::{Decision, HostMode, HostState, PolicyMemory, VmInput};

use super::{assemble, balloon_for_memory, memory_of, minimum_of};

/// Host free share below which the host is under pressure (shrink).
pub const PRESSURE_THRESHOLD: f64 = 0.20;
/// Below this the pressure is critical: guests are squeezed below their free share.
pub const PRESSURE_CRITICAL: f64 = 0.05;
/// The free share of its memory an unconstrained guest keeps.
pub const MIN_GUEST_FREE_PERCENT: f64 = 0.20;
/// A run changes a guest's memory by at most this share of it.
pub const MAX_BALLOON_CHANGE_PERCENT: f64 = 0.05;
/// Changes smaller than this share of a guest's memory are not applied.
pub const MIN_BALLOON_CHANGE_PERCENT: f64 = 0.0025;
/// Inputs are averaged over this many samples (MOM's collectors keep 10).
pub const SAMPLES: usize = 10;

/// The key of the host's free-memory samples in `PolicyMemory::samples`.
const HOST_KEY: &str = "";

/// Appends a sample, keeping the last `SAMPLES`; returns their average.
fn averaged(samples: &mut HashMap<String, Vec<u64>>, key: &str, value: u64) -> u64 {
    let list = samples.entry(key.to_string()).or_default();
    list.push(value);
    if list.len() > SAMPLES {
        list.remove(0);
    }
    // Summed wide: the samples are the guest's and the host's sizes.
    let count = u128::try_from(list.len()).unwrap_or(1).max(1);
    let sum: u128 = list.iter().map(|&sample| u128::from(sample)).sum();
    u64::try_from(sum / count).unwrap_or(u64::MAX)
}

/// The guest memory MOM wants for one VM: `cur` now, `unused` its
/// averaged MemFree, `host_free` the averaged host free share.
pub fn wanted_memory(cur: u64, max: u64, min: u64, unused: u64, host_free: f64) -> u64 {
    let guest_free_share = if host_free < PRESSURE_CRITICAL {
        // Negative: the guest is pushed below what it uses.
        host_free - PRESSURE_CRITICAL
    } else {
        MIN_GUEST_FREE_PERCENT * host_free / PRESSURE_THRESHOLD
    };
    let used = cur.saturating_sub(unused) as f64;
    let floor = (used + guest_free_share * cur as f64)
        .max(min as f64)
        .max(0.0) as u64;
    let wanted = if host_free < PRESSURE_THRESHOLD {
        // Shrink, applied only if it does not grow the guest.
        let shrunk = ((cur as f64 * (1.0 - MAX_BALLOON_CHANGE_PERCENT)) as u64).max(floor);
        if shrunk <= cur {
            shrunk
        } else {
            cur
        }
    } else if cur < max {
        ((cur as f64 * (1.0 + MAX_BALLOON_CHANGE_PERCENT)) as u64)
            .max(floor)
            .min(max)
    } else {
        cur
    };
    let big_enough = wanted.abs_diff(cur) as f64 > MIN_BALLOON_CHANGE_PERCENT * cur as f64;
    if big_enough {
        wanted.max(min)
    } else {
        cur
    }
}

pub fn decide(host: &HostState, vms: &[VmInput], memory: &PolicyMemory) -> Decision {
    let mut samples = memory.samples.clone();
    samples.retain(|key, _| key == HOST_KEY || vms.iter().any(|vm| vm.name == *key));
    let host_free = averaged(&mut samples, HOST_KEY, host.available_bytes) as f64
        / host.total_bytes.max(1) as f64;
    let mode = if host_free < PRESSURE_CRITICAL {
        HostMode::Hard
    } else if host_free < PRESSURE_THRESHOLD {
        HostMode::Reclaim
    } else {
        HostMode::Normal
    };
    let wishes = vms
        .iter()
        .map(|vm| {
            let Some(sample) = vm.sample else {
                // MOM skips guests without statistics.
                return (
                    vm.target_bytes,
                    "mom: no guest statistics: skipped".to_string(),
                );
            };
            let unused = averaged(
                &mut samples,
                &vm.name,
                sample.free_bytes.unwrap_or(sample.available_bytes),
            );
            let cur = memory_of(vm);
            let wanted = wanted_memory(cur, vm.guest_ram_bytes, minimum_of(vm), unused, host_free);
            (
                balloon_for_memory(vm, wanted),
                format!(
                    "mom: host free {:.1} %, guest unused {} MiB: memory {} -> {} MiB",
                    host_free * 100.0,
                    unused >> 20,
                    cur >> 20,
                    wanted >> 20
                ),
            )
        })
        .collect();
    assemble(vms, mode, host.available_percent(), wishes, samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::tests::{vm, GIB};
    use proptest::prelude::*;

    #[test]
    fn under_pressure_guests_shrink_by_five_percent_then_stop_at_their_floor() {
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: 6 * GIB,
            psi_some_avg10: None,
        };
        // 4 GiB guest, 3 GiB free: the floor (used + 9.4 % of 4 GiB) is far.
        let idle = vm("idle", 4 * GIB, 0, 3 * GIB, 3 * GIB);
        let d = decide(&host, &[idle], &PolicyMemory::default());
        let taken = d.vms[0].target_bytes;
        assert!(
            taken > 0 && taken as f64 <= 0.05 * (4 * GIB) as f64 + 4096.0,
            "{:?}",
            d.vms[0]
        );
        // A busy guest with nothing free gives nothing: used + its share is above cur.
        let busy = vm("busy", 4 * GIB, 0, 0, 0);
        let d = decide(&host, &[busy], &PolicyMemory::default());
        assert_eq!(d.vms[0].target_bytes, 0, "{:?}", d.vms[0]);
    }

    #[test]
    fn without_pressure_guests_grow_back() {
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: 40 * GIB,
            psi_some_avg10: None,
        };
        let ballooned = vm("b", 4 * GIB, GIB, GIB, GIB);
        let d = decide(&host, &[ballooned], &PolicyMemory::default());
        assert!(d.vms[0].target_bytes < GIB, "{:?}", d.vms[0]);
        assert_eq!(d.vms[0].cause, crate::policy::Cause::GiveBack);
    }

    proptest! {
        /// MOM's documented behaviour: a run moves a guest by at most 5 %
        /// of its memory (or to the floor when shrinking would cross it),
        /// shrinks only under pressure and grows only without it.
        #[test]
        fn one_run_moves_at_most_five_percent_in_the_pressure_direction(
            cur_mib in 256u64..65536,
            unused_pct in 0u64..100,
            host_free_pct in 0u64..100,
        ) {
            let cur = cur_mib << 20;
            let max = cur * 2;
            let unused = cur * unused_pct / 100;
            let host_free = host_free_pct as f64 / 100.0;
            let wanted = wanted_memory(cur, max, 0, unused, host_free);
            if host_free < PRESSURE_THRESHOLD {
                prop_assert!(wanted <= cur);
                prop_assert!((cur - wanted) as f64 <= MAX_BALLOON_CHANGE_PERCENT * cur as f64 + 1.0);
            } else {
                prop_assert!(wanted >= cur);
                prop_assert!(wanted <= max);
            }
        }
    }
}
