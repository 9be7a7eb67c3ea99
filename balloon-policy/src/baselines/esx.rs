//! VMware ESX's idle-memory tax with min-funding revocation (Waldspurger,
//! "Memory Resource Management in VMware ESX Server", OSDI 2002, section 5).
//!
//! Each VM's shares per page are taxed for its idle pages:
//! `rho = S / (P * (f + k * (1 - f)))`, `k = 1 / (1 - tau)`; memory is
//! reclaimed from the VM with the lowest rho first, recomputed after every
//! chunk, and handed back to the one with the highest.
//!
//! ESX samples the active fraction `f` by watching a random set of pages
//! being touched; we have no such sampling, so `f` is estimated from the
//! guest's statistics, the same way for every policy that needs it:
//! `active_fraction` = memory the guest uses and cannot give back (its
//! memory less available) over its memory. ESX balloons in its "soft" host
//! state; so that all policies answer the same host, the states here are
//! host-policy's thresholds: reclaim below `reclaim_start_percent` until
//! the midpoint to `give_back_percent`, give back above the latter. Each
//! VM moves at most its inflate step (hard step below the hard threshold)
//! or deflate step per tick, as ESX's balloon driver is rate-limited.

use crate::policy::{
    limit_bytes, next_mode, Decision, HostMode, HostState, HostThresholds, PolicyMemory, VmInput,
    PAGE_BYTES,
};

use super::{assemble, memory_of};

/// The idle-memory tax rate (ESX's `Mem.IdleTax` default, 75 %).
pub const TAX_RATE: f64 = 0.75;
/// Memory moves in chunks of this size between rho recomputations.
pub const CHUNK_BYTES: u64 = 16 << 20;

/// The share of its memory a VM actively uses, estimated from its
/// statistics (see the module comment); 1 without statistics (nothing idle
/// is assumed).
pub fn active_fraction(vm: &VmInput, memory: u64) -> f64 {
    let Some(sample) = vm.sample else { return 1.0 };
    if memory == 0 {
        return 1.0;
    }
    let active = memory.saturating_sub(sample.available_bytes.min(memory));
    active as f64 / memory as f64
}

/// Shares per page after the idle tax.
pub fn adjusted_shares_per_page(shares: u64, pages: u64, active: f64) -> f64 {
    let k = 1.0 / (1.0 - TAX_RATE);
    let idle = 1.0 - active;
    shares as f64 / (pages.max(1) as f64 * (active + k * idle))
}

pub fn decide(
    host: &HostState,
    thresholds: &HostThresholds,
    vms: &[VmInput],
    memory: &PolicyMemory,
) -> Decision {
    let available_percent = host.available_percent();
    let mode = next_mode(memory.mode, available_percent, thresholds);
    let mut balloons: Vec<u64> = vms.iter().map(|vm| vm.target_bytes).collect();
    // Each VM's room this tick, and the budget to move.
    let (mut budget, inflating) = match mode {
        HostMode::Reclaim | HostMode::Hard => (thresholds.shortfall_bytes(host), true),
        HostMode::Normal => (thresholds.excess_bytes(host), false),
    };
    let room: Vec<u64> = vms
        .iter()
        .map(|vm| {
            if vm.pinned || (inflating && vm.sample.is_none()) {
                return 0;
            }
            if inflating {
                let step = if mode == HostMode::Hard {
                    vm.policy.hard_inflate_step_bytes
                } else {
                    vm.policy.inflate_step_bytes
                };
                limit_bytes(vm).saturating_sub(vm.target_bytes).min(step)
            } else {
                vm.target_bytes.min(vm.policy.deflate_step_bytes)
            }
        })
        .collect();
    let mut moved = vec![0u64; vms.len()];
    // Min-funding revocation: take from the lowest rho (give to the
    // highest), a chunk at a time, recomputing rho as pages move.
    while budget >= PAGE_BYTES {
        let rho = |i: usize| {
            let vm = &vms[i];
            let mem = vm.guest_ram_bytes.saturating_sub(balloons[i]);
            adjusted_shares_per_page(vm.policy.shares, mem / PAGE_BYTES, active_fraction(vm, mem))
        };
        let candidates = (0..vms.len()).filter(|&i| moved[i] < room[i]);
        let pick = if inflating {
            candidates.min_by(|&a, &b| rho(a).total_cmp(&rho(b)))
        } else {
            candidates.max_by(|&a, &b| rho(a).total_cmp(&rho(b)))
        };
        let Some(i) = pick else { break };
        let chunk = CHUNK_BYTES.min(budget).min(room[i] - moved[i]);
        let chunk = chunk - chunk % PAGE_BYTES;
        if chunk == 0 {
            break;
        }
        moved[i] += chunk;
        budget -= chunk;
        balloons[i] = if inflating {
            balloons[i].saturating_add(chunk)
        } else {
            balloons[i].saturating_sub(chunk)
        };
    }
    let wishes = vms
        .iter()
        .zip(&balloons)
        .map(|(vm, &balloon)| {
            let mem = memory_of(vm);
            (
                balloon,
                format!(
                    "esx-idle-tax: active {:.0} %, shares per page after tax {:.3e}",
                    active_fraction(vm, mem) * 100.0,
                    adjusted_shares_per_page(
                        vm.policy.shares,
                        mem / PAGE_BYTES,
                        active_fraction(vm, mem)
                    )
                ),
            )
        })
        .collect();
    assemble(vms, mode, available_percent, wishes, Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::tests::{thresholds, vm, GIB};
    use proptest::prelude::*;

    #[test]
    fn the_idle_vm_pays_the_tax() {
        // Same RAM and shares; one uses little of its memory. The host is
        // 614 MiB short of its goal (27.5 % of 64 GiB available).
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: 17 * GIB,
            psi_some_avg10: None,
        };
        let mut idle = vm("idle", 8 * GIB, 0, 6 * GIB, 7 * GIB);
        let mut busy = vm("busy", 8 * GIB, 0, GIB / 4, GIB / 2);
        for vm in [&mut idle, &mut busy] {
            vm.policy.inflate_step_bytes = GIB;
        }
        let memory = PolicyMemory {
            mode: HostMode::Reclaim,
            ..PolicyMemory::default()
        };
        let d = decide(&host, &thresholds(), &[idle, busy], &memory);
        let shortfall = (64 * GIB) * 275 / 1000 - 17 * GIB;
        assert_eq!(
            d.vms[0].target_bytes,
            shortfall - shortfall % PAGE_BYTES,
            "{:?}",
            d.vms
        );
        assert_eq!(
            d.vms[1].target_bytes, 0,
            "the busy VM keeps its memory: {:?}",
            d.vms
        );
    }

    proptest! {
        /// The tax lowers an idle VM's shares per page: with f < 1 the
        /// adjusted shares are below the untaxed S / P, and fall as f does.
        #[test]
        fn idle_pages_lower_the_adjusted_shares(shares in 1u64..100_000, pages in 1u64..(1 << 24), f in 0.0f64..1.0, g in 0.0f64..1.0) {
            let taxed = adjusted_shares_per_page(shares, pages, f);
            prop_assert!(taxed <= shares as f64 / pages as f64 * (1.0 + 1e-9));
            let (low, high) = if f < g { (f, g) } else { (g, f) };
            prop_assert!(adjusted_shares_per_page(shares, pages, low) <= adjusted_shares_per_page(shares, pages, high) * (1.0 + 1e-9));
        }
    }
}
