//! The balloon policies operators already run, as alternatives to ours
//! behind the same pure interface (`crate::decide_with`): oVirt MOM's balloon
//! rules, Proxmox VE's auto-ballooning, and VMware ESX's idle-memory tax
//! with min-funding revocation. Each lives in its own module with its
//! source and every constant named. What holds for all of them: the VM's
//! limit (0-75 % of guest RAM, the smaller of host-policy's and the
//! backend's), an operator's pin, and page-aligned targets.

pub mod esx;
pub mod mom;
pub mod proxmox;

use std::collections::HashMap;

use crate::policy::{
    limit_bytes, Cause, Decision, HostMode, PolicyMemory, VmDecision, VmInput, VmMemory, PAGE_BYTES,
};

const MIB: u64 = 1 << 20;

/// The guest memory a VM has now: guest RAM less its balloon.
fn memory_of(vm: &VmInput) -> u64 {
    vm.guest_ram_bytes.saturating_sub(vm.target_bytes)
}

/// The least memory a VM may be left with: guest RAM less its limit.
fn minimum_of(vm: &VmInput) -> u64 {
    vm.guest_ram_bytes.saturating_sub(limit_bytes(vm))
}

/// A baseline's wish for a VM, as guest memory, turned into a balloon
/// target within the VM's limit, page aligned.
fn balloon_for_memory(vm: &VmInput, memory_bytes: u64) -> u64 {
    let balloon = vm.guest_ram_bytes.saturating_sub(memory_bytes);
    let balloon = balloon.min(limit_bytes(vm));
    balloon - balloon % PAGE_BYTES
}

/// Assembles a baseline's decision: a pinned VM holds; every other gets
/// its wished target with a reason; no memory but the samples carries on.
fn assemble(
    vms: &[VmInput],
    mode: HostMode,
    available_percent: f64,
    wishes: Vec<(u64, String)>,
    samples: HashMap<String, Vec<u64>>,
) -> Decision {
    // A growing balloon is reclaim (hard below the hard threshold), a
    // shrinking one give-back: the baselines have no other causes.
    let cause_of = |previous: u64, target: u64| match (target > previous, mode) {
        (true, HostMode::Hard) => Cause::HardReclaim,
        (true, _) => Cause::Reclaim,
        (false, _) => Cause::GiveBack,
    };
    let decisions = vms
        .iter()
        .zip(wishes)
        .map(|(vm, (target, reason))| {
            if vm.pinned {
                return VmDecision {
                    name: vm.name.clone(),
                    previous_bytes: vm.target_bytes,
                    target_bytes: vm.target_bytes,
                    pressure: false,
                    reason: format!("pinned at {} MiB by an operator", vm.target_bytes / MIB),
                    cause: Cause::Pinned,
                    reclaim_cache_bytes: 0,
                    agent_reclaim_bytes: 0,
                    held_target_bytes: None,
                };
            }
            let target = target.min(limit_bytes(vm));
            let target = target - target % PAGE_BYTES;
            VmDecision {
                name: vm.name.clone(),
                previous_bytes: vm.target_bytes,
                target_bytes: target,
                pressure: false,
                reason,
                cause: if target == vm.target_bytes {
                    Cause::Hold
                } else {
                    cause_of(vm.target_bytes, target)
                },
                reclaim_cache_bytes: 0,
                agent_reclaim_bytes: 0,
                held_target_bytes: None,
            }
        })
        .collect();
    Decision {
        mode,
        host_available_percent: available_percent,
        vms: decisions,
        memory: PolicyMemory {
            mode,
            vms: vms
                .iter()
                .map(|vm| (vm.name.clone(), VmMemory::default()))
                .collect(),
            samples,
            ..PolicyMemory::default()
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::{GuestCounters, GuestSample, HostThresholds};
    use crate::{decide_with, PolicyKind, VmPolicy};
    use proptest::prelude::*;

    pub const GIB: u64 = 1 << 30;

    pub fn vm(name: &str, ram: u64, balloon: u64, free: u64, available: u64) -> VmInput {
        VmInput {
            name: name.into(),
            guest_ram_bytes: ram,
            target_bytes: balloon,
            actual_bytes: balloon,
            device_max_reclaim_bytes: ram * 75 / 100,
            sample: Some(GuestSample {
                available_bytes: available,
                free_bytes: Some(free),
                counters: GuestCounters::default(),
                age_s: 1,
                psi_some_avg10: None,
                balloon_bytes: Some(balloon),
            }),
            policy: VmPolicy::default(),
            pinned: false,
            free_page_reporting: None,
            resident_bytes: None,
            agent_page_cache_bytes: None,
            agent_reclaim: Default::default(),
        }
    }

    pub fn thresholds() -> HostThresholds {
        HostThresholds {
            reclaim_start_percent: 20,
            reclaim_hard_percent: 10,
            give_back_percent: 35,
            psi_some_avg10: 10.0,
        }
    }

    fn arbitrary_vm() -> impl Strategy<Value = VmInput> {
        (
            1u64..32,
            0u64..=75,
            0u64..100,
            0u64..100,
            0u64..=75,
            any::<bool>(),
            1u64..5000,
        )
            .prop_map(
                |(ram_gib, balloon_pct, free_pct, extra_pct, limit_pct, pinned, shares)| {
                    let ram = ram_gib * GIB;
                    let balloon = ram * balloon_pct / 100 / PAGE_BYTES * PAGE_BYTES;
                    let left = ram - balloon;
                    let free = left * free_pct / 100;
                    let available = (free + left * extra_pct / 100).min(left);
                    let mut input = vm("x", ram, balloon, free, available);
                    input.policy.max_reclaim_percent = limit_pct;
                    input.policy.shares = shares;
                    input.pinned = pinned;
                    input
                },
            )
    }

    proptest! {
        /// Every policy keeps every VM within its limit, page aligned, and
        /// holds a pinned VM; whatever the host and the guests.
        #[test]
        fn every_policy_keeps_limits_and_pins(
            vms in proptest::collection::vec(arbitrary_vm(), 1..8),
            total_gib in 1u64..256,
            avail_pct in 0u64..100,
            ticks in 1usize..4,
        ) {
            let vms = crate::policy::tests::numbered(vms);
            let host = crate::policy::tests::host_with(total_gib, avail_pct);
            for kind in PolicyKind::ALL {
                let mut memory = PolicyMemory::default();
                for tick in 0..ticks {
                    let decision = decide_with(kind, tick as u64, &host, &thresholds(), &vms, &memory);
                    prop_assert_eq!(decision.vms.len(), vms.len());
                    for (vm, d) in vms.iter().zip(&decision.vms) {
                        if vm.pinned {
                            prop_assert_eq!(d.target_bytes, vm.target_bytes, "{}: {:?}", kind.name(), d);
                            continue;
                        }
                        prop_assert!(d.target_bytes <= limit_bytes(vm),
                            "{}: past the limit: {:?}", kind.name(), d);
                        prop_assert_eq!(d.target_bytes % PAGE_BYTES, 0);
                    }
                    memory = decision.memory;
                }
            }
        }
    }
}
