//! Proxmox VE's auto-ballooning: `PVE/AutoBalloon.pm` of
//! proxmox/pve-manager, run by `pvestatd` every 10 s.
//!
//! The host aims at `TARGET_PERCENT` of its memory in use. The difference
//! (the goal) is handed out or taken back by shares, water-filling between
//! each VM's minimum and its RAM, every VM moving at most `MAX_CHANGE` per
//! run: when memory is handed out the "poor" VMs (little free, or below
//! their minimum) come first, when it is taken the "rich" ones do.
//!
//! Mapping: a Proxmox VM's memory is guest RAM less our balloon; its
//! minimum (the configured `balloon` minimum) is guest RAM less the VM's
//! limit, so the 0-75 % limit holds; its guest free memory is MemFree.

use crate::policy::{Decision, HostState, HostThresholds, PolicyMemory, VmInput};

use super::{assemble, balloon_for_memory, memory_of, minimum_of};

const MIB: u64 = 1 << 20;
/// The share of host memory Proxmox aims to have in use (`ballooning-target`).
pub const TARGET_PERCENT: u64 = 80;
/// Goals this small are left alone.
pub const DEAD_BAND_BYTES: u64 = 10 * MIB;
/// A VM's memory moves at most this much per run.
pub const MAX_CHANGE_BYTES: u64 = 100 * MIB;
/// A VM is "rich" when its free memory exceeds this share of its minimum.
pub const RICH_FREE_SHARE: f64 = 0.25;

/// One VM as the algorithm sees it.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub memory: u64,
    pub minimum: u64,
    pub maximum: u64,
    pub shares: u64,
}

/// Moves `goal` bytes (positive: to the VMs, negative: from them) among
/// `members` (indices into `new`), water-filling by shares, each moving at
/// most `MAX_CHANGE_BYTES` from where it started this run; returns what is
/// left of the goal.
pub fn change(members: &[Member], group: &[usize], new: &mut [u64], goal: i128) -> i128 {
    let mut rest = goal;
    let mut done = vec![false; members.len()];
    loop {
        if rest == 0 {
            return rest;
        }
        let open: Vec<usize> = group.iter().copied().filter(|&i| !done[i]).collect();
        let shares: u128 = open
            .iter()
            .map(|&i| u128::from(members[i].shares.max(1)))
            .sum();
        if open.is_empty() || shares == 0 {
            return rest;
        }
        let allocated: i128 = open
            .iter()
            .map(|&i| i128::from(new[i]) - i128::from(members[i].minimum))
            .sum::<i128>()
            + rest;
        let mut progress = false;
        for &i in &open {
            let m = members[i];
            let share = allocated.saturating_mul(i128::from(m.shares.max(1)))
                / i128::try_from(shares).unwrap_or(1);
            let desired =
                (i128::from(m.minimum) + share).clamp(i128::from(m.minimum), i128::from(m.maximum));
            let start = i128::from(m.memory);
            let step = i128::from(MAX_CHANGE_BYTES);
            let target = if goal > 0 && desired > start {
                desired.min(start + step)
            } else if desired < start && goal < 0 {
                desired.max(start - step)
            } else {
                start
            };
            let moved = target - i128::from(new[i]);
            if moved == 0 {
                done[i] = true;
                continue;
            }
            // Never past the goal's sign.
            let moved = if goal > 0 {
                moved.clamp(0, rest)
            } else {
                moved.clamp(rest, 0)
            };
            if moved == 0 {
                done[i] = true;
                continue;
            }
            new[i] = u64::try_from(i128::from(new[i]) + moved).unwrap_or(new[i]);
            rest -= moved;
            progress = true;
            if rest == 0 {
                return rest;
            }
        }
        if !progress {
            return rest;
        }
    }
}

pub fn decide(
    host: &HostState,
    thresholds: &HostThresholds,
    vms: &[VmInput],
    memory: &PolicyMemory,
) -> Decision {
    let used = host.total_bytes.saturating_sub(host.available_bytes);
    let goal = i128::from(host.total_bytes) * i128::from(TARGET_PERCENT) / 100 - i128::from(used);
    // Skipped, as Proxmox skips VMs without a balloon driver or statistics.
    let eligible: Vec<usize> = (0..vms.len())
        .filter(|&i| vms[i].sample.is_some() && !vms[i].pinned)
        .collect();
    let members: Vec<Member> = vms
        .iter()
        .map(|vm| Member {
            memory: memory_of(vm),
            minimum: minimum_of(vm),
            maximum: vm.guest_ram_bytes,
            shares: vm.policy.shares,
        })
        .collect();
    let mut new: Vec<u64> = members.iter().map(|m| m.memory).collect();
    if goal.unsigned_abs() > u128::from(DEAD_BAND_BYTES) {
        let rich: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| {
                let free = vms[i]
                    .sample
                    .map_or(0, |s| s.free_bytes.unwrap_or(s.available_bytes));
                free as f64 > RICH_FREE_SHARE * members[i].minimum as f64
                    && members[i].memory >= members[i].minimum
            })
            .collect();
        let poor: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|i| !rich.contains(i))
            .collect();
        let first = if goal > 0 { &poor } else { &rich };
        let rest = change(&members, first, &mut new, goal);
        change(&members, &eligible, &mut new, rest);
    }
    let wishes = vms
        .iter()
        .zip(&new)
        .map(|(vm, &mem)| {
            (
                balloon_for_memory(vm, mem),
                format!(
                    "proxmox: goal {} MiB to reach {TARGET_PERCENT} % in use: memory {} -> {} MiB",
                    goal / i128::from(MIB),
                    memory_of(vm) >> 20,
                    mem >> 20
                ),
            )
        })
        .collect();
    let available_percent = host.available_percent();
    // Proxmox has no modes; ours are reported for comparison.
    let mode = crate::policy::next_mode(memory.mode, available_percent, thresholds);
    assemble(vms, mode, available_percent, wishes, Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::tests::{thresholds, vm, GIB};
    use proptest::prelude::*;

    #[test]
    fn a_host_over_its_target_takes_from_rich_vms_first() {
        // 64 GiB host, 4 GiB available: 60 in use, 8.8 GiB over 80 %.
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: 4 * GIB,
            psi_some_avg10: None,
        };
        let rich = vm("rich", 8 * GIB, 0, 6 * GIB, 6 * GIB);
        let poor = vm("poor", 8 * GIB, 0, 0, 0);
        let d = decide(
            &host,
            &thresholds(),
            &[rich, poor],
            &PolicyMemory::default(),
        );
        assert_eq!(d.vms[0].target_bytes, MAX_CHANGE_BYTES, "{:?}", d.vms);
        assert_eq!(
            d.vms[1].target_bytes, MAX_CHANGE_BYTES,
            "then from all: {:?}",
            d.vms
        );
    }

    #[test]
    fn a_goal_inside_the_dead_band_changes_nothing() {
        let total = 64 * GIB;
        let host = HostState {
            total_bytes: total,
            available_bytes: total / 5 + 5 * MIB,
            psi_some_avg10: None,
        };
        let a = vm("a", 8 * GIB, GIB, GIB, GIB);
        let d = decide(&host, &thresholds(), &[a], &PolicyMemory::default());
        assert_eq!(d.vms[0].target_bytes, GIB);
    }

    proptest! {
        /// The water-filling never moves a VM by more than MAX_CHANGE, never
        /// out of [minimum, maximum], and never more in total than the goal.
        #[test]
        fn change_stays_within_bounds_and_goal(
            vms in proptest::collection::vec((1u64..64, 0u64..100, 0u64..=75, 1u64..5000), 1..10),
            goal_mib in -100_000i64..100_000,
        ) {
            let members: Vec<Member> = vms.iter().map(|&(ram_gib, used_pct, limit_pct, shares)| {
                let maximum = ram_gib * GIB;
                let minimum = maximum - maximum * limit_pct / 100;
                let memory = (minimum + (maximum - minimum) * used_pct / 100).min(maximum);
                Member { memory, minimum, maximum, shares }
            }).collect();
            let all: Vec<usize> = (0..members.len()).collect();
            let mut new: Vec<u64> = members.iter().map(|m| m.memory).collect();
            let goal = i128::from(goal_mib) * i128::from(MIB);
            let rest = change(&members, &all, &mut new, goal);
            let moved: i128 = new.iter().zip(&members).map(|(n, m)| i128::from(*n) - i128::from(m.memory)).sum();
            prop_assert_eq!(moved + rest, goal);
            for (n, m) in new.iter().zip(&members) {
                prop_assert!(n.abs_diff(m.memory) <= MAX_CHANGE_BYTES);
                prop_assert!(*n >= m.minimum.min(m.memory) && *n <= m.maximum.max(m.memory));
                if goal > 0 { prop_assert!(*n >= m.memory) } else { prop_assert!(*n <= m.memory) }
            }
        }
    }
}
