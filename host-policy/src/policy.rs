//! The policy: a pure function from the host's memory, every VM's state, the
//! configuration and what the previous tick remembered, to a balloon target
//! and a reason for each VM. No I/O here, so it is property-tested and the
//! simulator runs exactly the code the daemon runs.
//!
//! - Host modes with hysteresis: `Reclaim` below `reclaim_start_percent`,
//!   `Hard` below `reclaim_hard_percent`, back to `Normal` only at or above
//!   `give_back_percent`.
//! - Reclaim takes at most the shortfall to the middle of the dead band, from
//!   VMs in proportion to idle memory (guest available above its floor)
//!   divided by shares (shares are a claim to keep memory, as in ESX), one
//!   step per tick, never past a VM's limit or below its floor. Give-back
//!   goes first to VMs with larger balloons times shares.
//! - Give-back (Normal, at or above `give_back_percent`) returns at most the
//!   excess above that threshold, so it cannot push the host back into
//!   reclaim: no oscillation.
//! - Guest pressure deflates that VM at once by its deflate step and blocks
//!   inflation for a cool-down; stale or missing statistics never inflate.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::config::VmPolicy;

pub const PAGE_BYTES: u64 = 4096;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostMode {
    #[default]
    Normal,
    Reclaim,
    Hard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostState {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl HostState {
    /// Available memory in percent of the total (0 for an empty host).
    pub fn available_percent(&self) -> f64 {
        percent(self.available_bytes, self.total_bytes)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostThresholds {
    pub reclaim_start_percent: u64,
    pub reclaim_hard_percent: u64,
    pub give_back_percent: u64,
}

impl HostThresholds {
    /// Reclaim aims at the middle of the dead band, in percent.
    pub fn reclaim_goal_percent(&self) -> f64 {
        (self.reclaim_start_percent + self.give_back_percent) as f64 / 2.0
    }

    /// Memory to reclaim to bring the host to the goal.
    pub fn shortfall_bytes(&self, host: &HostState) -> u64 {
        let goal = (host.total_bytes as f64 * self.reclaim_goal_percent() / 100.0) as u64;
        goal.saturating_sub(host.available_bytes)
    }

    /// Memory the host has above the give-back threshold.
    pub fn excess_bytes(&self, host: &HostState) -> u64 {
        let threshold = (host.total_bytes as f64 * self.give_back_percent as f64 / 100.0) as u64;
        host.available_bytes.saturating_sub(threshold)
    }
}

/// Guest counters that only grow; a rise means the guest works to find memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCounters {
    pub swap_in: Option<u64>,
    pub major_faults: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub direct_reclaims: Option<u64>,
    pub oom_kills: Option<u64>,
}

/// What the VM's statistics (and guest agent, when present) said.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuestSample {
    pub available_bytes: u64,
    /// The guest's MemFree (page cache counts as used), for the baseline
    /// policies that read it (MOM, Proxmox); None when the guest sent none.
    pub free_bytes: Option<u64>,
    pub counters: GuestCounters,
    /// Seconds since the guest last sent statistics.
    pub age_s: u64,
    /// PSI memory `some` avg10 from the guest agent.
    pub psi_some_avg10: Option<f64>,
    /// The balloon's size when the guest measured these values, when the
    /// backend says (ours does).
    pub balloon_bytes: Option<u64>,
}

impl GuestSample {
    /// The guest's available memory once the current target has landed:
    /// what the guest measured, less what the balloon will still take
    /// beyond its size at that moment.
    pub fn available_after_landing(&self, target_bytes: u64) -> u64 {
        let still_to_take = self
            .balloon_bytes
            .map_or(0, |seen| target_bytes.saturating_sub(seen));
        self.available_bytes.saturating_sub(still_to_take)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VmInput {
    pub name: String,
    pub guest_ram_bytes: u64,
    /// The balloon size now asked of the guest.
    pub target_bytes: u64,
    /// The balloon size the guest reports having reached.
    pub actual_bytes: u64,
    /// The device's own limit (its `--max-reclaim-percent`).
    pub device_max_reclaim_bytes: u64,
    pub sample: Option<GuestSample>,
    pub policy: VmPolicy,
    /// An operator pinned the target (`balloonctl set`): the policy holds it.
    pub pinned: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmMemory {
    pub counters: Option<GuestCounters>,
    pub cooldown_until_s: u64,
    /// When this VM's target last changed (policy seconds).
    #[serde(default)]
    pub last_change_s: Option<u64>,
}

/// What one tick hands to the next.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyMemory {
    pub mode: HostMode,
    /// Hashed, not ordered: a tick looks every VM up once, and with
    /// thousands of VMs ordered string keys made that the tick's main cost.
    pub vms: HashMap<String, VmMemory>,
    /// Recent samples a baseline policy averages (MOM: the host's free
    /// memory under "", each guest's free memory under its name).
    #[serde(default)]
    pub samples: HashMap<String, Vec<u64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmDecision {
    pub name: String,
    pub previous_bytes: u64,
    pub target_bytes: u64,
    /// The guest showed memory pressure this tick.
    pub pressure: bool,
    pub reason: String,
    /// What decided the target, in one word (metrics count changes by it).
    #[serde(default)]
    pub cause: Cause,
}

/// What decided a VM's target this tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Nothing moved it.
    #[default]
    Hold,
    /// The host is short of memory: idle guest memory taken.
    Reclaim,
    /// The same below the hard threshold, with the larger step.
    HardReclaim,
    /// The host has memory to spare: given back.
    GiveBack,
    /// The guest showed pressure: deflated at once.
    Pressure,
    /// The guest is below its floor: the deficit given back.
    Floor,
    /// The target was above the VM's limit.
    Limit,
    /// An operator pinned the target.
    Pinned,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::Hold => "hold",
            Cause::Reclaim => "reclaim",
            Cause::HardReclaim => "hard_reclaim",
            Cause::GiveBack => "give_back",
            Cause::Pressure => "pressure",
            Cause::Floor => "floor",
            Cause::Limit => "limit",
            Cause::Pinned => "pinned",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub mode: HostMode,
    pub host_available_percent: f64,
    pub vms: Vec<VmDecision>,
    pub memory: PolicyMemory,
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn page_floor(bytes: u64) -> u64 {
    bytes - bytes % PAGE_BYTES
}

/// The host mode after this tick, with hysteresis.
pub fn next_mode(previous: HostMode, available_percent: f64, t: &HostThresholds) -> HostMode {
    let below = |p: u64| available_percent < p as f64;
    if below(t.reclaim_hard_percent) {
        return HostMode::Hard;
    }
    match previous {
        HostMode::Normal if below(t.reclaim_start_percent) => HostMode::Reclaim,
        HostMode::Normal => HostMode::Normal,
        _ if !below(t.give_back_percent) => HostMode::Normal,
        HostMode::Hard if !below(t.reclaim_start_percent) => HostMode::Reclaim,
        HostMode::Hard => HostMode::Hard,
        HostMode::Reclaim => HostMode::Reclaim,
    }
}

/// The largest balloon of a VM: the smaller of the device's and the policy's.
pub fn limit_bytes(vm: &VmInput) -> u64 {
    let policy_limit = vm.guest_ram_bytes * vm.policy.max_reclaim_percent / 100;
    page_floor(policy_limit.min(vm.device_max_reclaim_bytes))
}

/// The guest memory a VM always keeps available.
pub fn floor_bytes(vm: &VmInput) -> u64 {
    vm.policy
        .min_free_bytes
        .max(vm.guest_ram_bytes * vm.policy.min_free_percent / 100)
}

/// How many ticks a steady host may take before every target stops
/// changing (the bound `docs/host-policy.md` states):
/// `max over VMs of ceil(limit / smaller step) + number of VMs + 2`.
///
/// While the shortfall (or excess) is larger than what all VMs may move in
/// a tick, each VM moves by its whole cap: a step, or the rest to its floor
/// or limit, so no VM needs more than `ceil(limit / step)` such ticks. Once
/// it is smaller, one tick hands it out in full; what the `min_change` dead
/// band held back is below `min_change` per VM, and every later move takes
/// at least `min_change` of it, so at most one tick per VM follows.
pub fn settling_ticks(vms: &[VmInput]) -> u64 {
    let steps = vms
        .iter()
        .map(|vm| {
            let step = vm
                .policy
                .inflate_step_bytes
                .min(vm.policy.deflate_step_bytes)
                .max(PAGE_BYTES);
            limit_bytes(vm).div_ceil(step)
        })
        .max()
        .unwrap_or(0);
    let vm_count = u64::try_from(vms.len()).unwrap_or(u64::MAX);
    steps.saturating_add(vm_count).saturating_add(2)
}

/// Room kept above the floor when inflating: a guest's available memory
/// moves a little as a balloon step lands, and a step that ends exactly on
/// the floor would dip below it. An eighth of the floor, at least 8 MiB.
pub fn floor_margin_bytes(vm: &VmInput) -> u64 {
    page_floor((floor_bytes(vm) / 8).max(8 * MIB))
}

/// How much a VM may give this tick: its inflate step when the host has
/// just fallen below `reclaim_start_percent`, rising linearly to its hard
/// step as the host nears `reclaim_hard_percent`, so that reclaim speeds up
/// before the host is overloaded rather than after; the hard step below it.
pub fn reclaim_step(
    vm: &VmInput,
    mode: HostMode,
    available_percent: f64,
    thresholds: &HostThresholds,
) -> u64 {
    let (normal, hard) = (
        vm.policy.inflate_step_bytes,
        vm.policy
            .hard_inflate_step_bytes
            .max(vm.policy.inflate_step_bytes),
    );
    if mode == HostMode::Hard {
        return hard;
    }
    let start = thresholds.reclaim_start_percent as f64;
    let span = start - thresholds.reclaim_hard_percent as f64;
    if span <= 0.0 {
        return normal;
    }
    let depth = ((start - available_percent) / span).clamp(0.0, 1.0);
    page_floor(normal + ((hard - normal) as f64 * depth) as u64).max(normal.min(hard))
}

/// Memory the guest can give without going below floor and margin.
fn idle_bytes(vm: &VmInput, sample: &GuestSample) -> u64 {
    sample
        .available_after_landing(vm.target_bytes)
        .saturating_sub(floor_bytes(vm).saturating_add(floor_margin_bytes(vm)))
}

/// Splits `total` in proportion to `weights`, each share at most its cap,
/// handing what a capped VM cannot take to the others (water-filling).
///
/// Handing the remainder on is what makes the closed loop settle: with a
/// plain proportional split, a VM of small weight next to VMs at their caps
/// got only its small fraction of the shortfall each tick, so the shortfall
/// shrank geometrically and the balloon crept on for hundreds of ticks.
/// Here a tick hands out `min(total, sum of caps)` in full (less at most a
/// page per VM of rounding).
///
/// VMs are visited in order of cap per weight: at the water level
/// `left / sum of open weights`, a VM is capped when its proportional share
/// reaches its cap; capping one raises the level for the rest, and the first
/// VM not capped leaves every later one uncapped too. O(n log n).
pub fn share_out(total: u64, weights: &[(u128, u64)]) -> Vec<u64> {
    let mut shares = vec![0u64; weights.len()];
    let mut open: Vec<(usize, u128, u64)> = weights
        .iter()
        .enumerate()
        .filter(|(_, &(w, cap))| w > 0 && cap > 0)
        .map(|(i, &(w, cap))| (i, w, cap))
        .collect();
    // Ascending cap / weight, compared without division.
    open.sort_by(|a, b| (u128::from(a.2) * b.1).cmp(&(u128::from(b.2) * a.1)));
    let mut left = u128::from(total);
    let mut sum: u128 = open.iter().map(|&(_, w, _)| w).sum();
    let mut uncapped_from = open.len();
    for (position, &(i, w, cap)) in open.iter().enumerate() {
        if left == 0 || sum == 0 {
            uncapped_from = position;
            break;
        }
        if left * w / sum < u128::from(cap) {
            uncapped_from = position;
            break;
        }
        if let Some(share) = shares.get_mut(i) {
            *share = cap;
        }
        left = left.saturating_sub(u128::from(cap));
        sum -= w;
    }
    for &(i, w, _) in open.iter().skip(uncapped_from) {
        if let (Some(share), Some(part)) = (shares.get_mut(i), (left * w).checked_div(sum)) {
            *share = u64::try_from(part).unwrap_or(u64::MAX);
        }
    }
    shares.into_iter().map(page_floor).collect()
}

/// Why a VM is under pressure, if it is: only the guest's own signals
/// (PSI, OOM kills, stalls, direct reclaim, swap-ins, major faults) count.
/// A guest below its floor because of our own last step is corrected, not
/// treated as pressure (see `decide`).
fn pressure(vm: &VmInput, sample: &GuestSample, before: Option<&GuestCounters>) -> Option<String> {
    if let Some(psi) = sample.psi_some_avg10 {
        if psi > vm.policy.psi_some_avg10 {
            return Some(format!(
                "guest agent: PSI memory some avg10 {psi:.1}% (threshold {}%)",
                vm.policy.psi_some_avg10
            ));
        }
    }
    let before = before?;
    let now = &sample.counters;
    let rise = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    for (name, delta) in [
        ("OOM kills", rise(before.oom_kills, now.oom_kills)),
        (
            "allocation stalls",
            rise(before.alloc_stalls, now.alloc_stalls),
        ),
        (
            "direct reclaims",
            rise(before.direct_reclaims, now.direct_reclaims),
        ),
        ("swap-ins", rise(before.swap_in, now.swap_in)),
    ] {
        if delta > 0 {
            return Some(format!("guest {name} rose by {delta}"));
        }
    }
    let faults = rise(before.major_faults, now.major_faults);
    (faults > vm.policy.major_faults_per_tick).then(|| {
        format!(
            "guest major faults rose by {faults} (threshold {})",
            vm.policy.major_faults_per_tick
        )
    })
}

/// One policy tick.
pub fn decide(
    now_s: u64,
    host: &HostState,
    thresholds: &HostThresholds,
    vms: &[VmInput],
    memory: &PolicyMemory,
) -> Decision {
    let available_percent = host.available_percent();
    let mode = next_mode(memory.mode, available_percent, thresholds);
    let mut vm_memories: Vec<VmMemory> = Vec::with_capacity(vms.len());

    // First pass: limits, pressure, and who may take part in reclaim or give-back.
    struct Plan {
        current: u64,
        target: u64,
        reason: Option<String>,
        may_inflate: bool,
        pressure: bool,
        /// Returning memory to bring the guest back above its floor.
        floor_correction: bool,
        cause: Cause,
    }
    let mut plans: Vec<Plan> = Vec::with_capacity(vms.len());
    for vm in vms {
        let limit = limit_bytes(vm);
        let current = vm.target_bytes.min(limit);
        let remembered = memory.vms.get(&vm.name);
        let mut vm_memory = remembered.cloned().unwrap_or_default();
        let fresh = vm.sample.filter(|s| s.age_s <= vm.policy.stats_max_age_s);
        let mut plan = Plan {
            current,
            target: current,
            reason: (current < vm.target_bytes)
                .then(|| format!("above the VM's limit of {} MiB", limit / MIB)),
            may_inflate: false,
            pressure: false,
            floor_correction: false,
            cause: if current < vm.target_bytes {
                Cause::Limit
            } else {
                Cause::Hold
            },
        };
        if vm.pinned {
            // The operator's target holds whatever the host or guest do
            // (the guest can still deflate on OOM by itself).
            plan.current = vm.target_bytes;
            plan.target = vm.target_bytes;
            plan.cause = Cause::Pinned;
            plan.reason = Some(format!(
                "pinned at {} MiB by an operator; `balloonctl unpin {}` hands it back",
                vm.target_bytes / MIB,
                vm.name
            ));
            if let Some(sample) = fresh {
                vm_memory.counters = Some(sample.counters);
            }
            vm_memories.push(vm_memory);
            plans.push(plan);
            continue;
        }
        match fresh {
            None => {
                plan.reason.get_or_insert_with(|| {
                    "statistics missing or stale: not inflating".to_string()
                });
            }
            Some(sample) => {
                if let Some(why) =
                    pressure(vm, &sample, remembered.and_then(|m| m.counters.as_ref()))
                {
                    plan.target = current.saturating_sub(vm.policy.deflate_step_bytes);
                    plan.pressure = true;
                    plan.cause = Cause::Pressure;
                    vm_memory.cooldown_until_s = now_s + vm.policy.pressure_cooldown_s;
                    plan.reason = Some(match vm.policy.pressure_cooldown_s {
                        0 => format!("{why}: deflating at once"),
                        cooldown => {
                            format!("{why}: deflating at once, no inflation for {cooldown} s")
                        }
                    });
                } else if sample.available_after_landing(vm.target_bytes) < floor_bytes(vm)
                    && current > 0
                {
                    // Below the floor, most likely because our last step
                    // landed heavier than measured: give back the deficit
                    // and the margin, without a cool-down.
                    let floor = floor_bytes(vm);
                    let available = sample.available_after_landing(vm.target_bytes);
                    let back = floor
                        .saturating_sub(available)
                        .saturating_add(floor_margin_bytes(vm))
                        .min(vm.policy.deflate_step_bytes);
                    plan.target = current.saturating_sub(back);
                    plan.floor_correction = true;
                    plan.cause = Cause::Floor;
                    plan.reason = Some(format!(
                        "guest available {} MiB is below its floor of {} MiB: returning {} MiB",
                        available / MIB,
                        floor / MIB,
                        back.div_ceil(MIB)
                    ));
                } else if now_s < vm_memory.cooldown_until_s {
                    plan.reason.get_or_insert_with(|| {
                        format!(
                            "cooling down after guest pressure ({} s left)",
                            vm_memory.cooldown_until_s - now_s
                        )
                    });
                } else if sample.balloon_bytes.is_none()
                    && (vm.actual_bytes != vm.target_bytes
                        || remembered
                            .and_then(|m| m.last_change_s)
                            .is_some_and(|changed| now_s.saturating_sub(sample.age_s) <= changed))
                {
                    // Without the balloon's size at measurement time,
                    // statistics from before the last step landed would
                    // count that step's memory as still available: wait.
                    plan.reason.get_or_insert_with(|| {
                        "waiting for the last step to land and for statistics after it".to_string()
                    });
                } else {
                    plan.may_inflate = true;
                }
                vm_memory.counters = Some(sample.counters);
            }
        }
        vm_memories.push(vm_memory);
        plans.push(plan);
    }

    match mode {
        HostMode::Reclaim | HostMode::Hard => {
            let goal_percent = thresholds.reclaim_goal_percent();
            let shortfall = thresholds.shortfall_bytes(host);
            let weights: Vec<(u128, u64)> = vms
                .iter()
                .zip(&plans)
                .map(|(vm, plan)| {
                    let Some(sample) = vm.sample.filter(|_| plan.may_inflate) else {
                        return (0, 0);
                    };
                    let idle = idle_bytes(vm, &sample);
                    let step = reclaim_step(vm, mode, available_percent, thresholds);
                    let cap = idle
                        .min(step)
                        .min(limit_bytes(vm).saturating_sub(plan.current));
                    // Shares are a claim to keep memory: more shares, less taken.
                    (
                        u128::from(idle) * 1_000_000 / u128::from(vm.policy.shares.max(1)),
                        cap,
                    )
                })
                .collect();
            let shares = share_out(shortfall, &weights);
            for ((plan, add), vm) in plans.iter_mut().zip(shares).zip(vms) {
                if plan.may_inflate && add > 0 {
                    plan.target = plan.current + add;
                    plan.cause = if mode == HostMode::Hard {
                        Cause::HardReclaim
                    } else {
                        Cause::Reclaim
                    };
                    plan.reason = Some(format!(
                        "host {available_percent:.1}% available, below {}% ({}): taking {} MiB of idle guest memory",
                        if mode == HostMode::Hard { thresholds.reclaim_hard_percent } else { thresholds.reclaim_start_percent },
                        if mode == HostMode::Hard { "hard" } else { "reclaim" },
                        add / MIB
                    ));
                } else if plan.may_inflate {
                    plan.reason.get_or_insert_with(|| {
                        if shortfall == 0 {
                            format!("host {available_percent:.1}% available: reclaim goal of {goal_percent:.1}% met")
                        } else {
                            format!("no idle memory above the floor or at the limit of {} MiB", limit_bytes(vm) / MIB)
                        }
                    });
                }
            }
        }
        HostMode::Normal => {
            let excess = thresholds.excess_bytes(host);
            let weights: Vec<(u128, u64)> = vms
                .iter()
                .zip(&plans)
                .map(|(vm, plan)| {
                    let deflating = plan.target < plan.current;
                    if deflating || plan.current == 0 || plan.cause == Cause::Pinned {
                        return (0, 0);
                    }
                    let cap = plan.current.min(vm.policy.deflate_step_bytes);
                    (u128::from(plan.current) * u128::from(vm.policy.shares), cap)
                })
                .collect();
            let returns = share_out(excess, &weights);
            for (plan, back) in plans.iter_mut().zip(returns) {
                if back > 0 {
                    plan.target = plan.current - back;
                    plan.cause = Cause::GiveBack;
                    plan.reason = Some(format!(
                        "host {available_percent:.1}% available, at or above the give-back threshold of {}%: returning {} MiB",
                        thresholds.give_back_percent,
                        back / MIB
                    ));
                } else if plan.target == plan.current && plan.current > 0 {
                    plan.reason.get_or_insert_with(|| {
                        format!(
                            "host {available_percent:.1}% available, inside the dead band: holding"
                        )
                    });
                }
            }
        }
    }

    let decisions: Vec<VmDecision> = vms
        .iter()
        .zip(plans)
        .map(|(vm, plan)| {
            if plan.cause == Cause::Pinned {
                return VmDecision {
                    name: vm.name.clone(),
                    previous_bytes: vm.target_bytes,
                    target_bytes: vm.target_bytes,
                    pressure: false,
                    reason: plan.reason.unwrap_or_default(),
                    cause: Cause::Pinned,
                };
            }
            let mut target = page_floor(plan.target.min(limit_bytes(vm)));
            let change = target.abs_diff(plan.current);
            let mut reason = plan.reason.unwrap_or_else(|| "nothing to do".to_string());
            if change > 0
                && change < vm.policy.min_change_bytes
                && target != 0
                && plan.current == vm.target_bytes
                && !plan.floor_correction
            {
                reason = format!(
                    "change of {change} bytes is inside the dead band of {} MiB: holding",
                    vm.policy.min_change_bytes / MIB
                );
                target = plan.current;
            }
            VmDecision {
                name: vm.name.clone(),
                previous_bytes: vm.target_bytes,
                target_bytes: target,
                pressure: plan.pressure,
                reason,
                cause: if target == vm.target_bytes {
                    Cause::Hold
                } else {
                    plan.cause
                },
            }
        })
        .collect();
    let mut next_vms = HashMap::with_capacity(vms.len());
    for ((decision, mut vm_memory), vm) in decisions.iter().zip(vm_memories).zip(vms) {
        if decision.target_bytes != decision.previous_bytes {
            vm_memory.last_change_s = Some(now_s);
        }
        next_vms.insert(vm.name.clone(), vm_memory);
    }
    Decision {
        mode,
        host_available_percent: available_percent,
        vms: decisions,
        memory: PolicyMemory {
            mode,
            vms: next_vms,
            samples: HashMap::new(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    /// `vms` named vm0, vm1, … (the generators leave names alike).
    pub(crate) fn numbered(mut vms: Vec<VmInput>) -> Vec<VmInput> {
        for (i, vm) in vms.iter_mut().enumerate() {
            vm.name = format!("vm{i}");
        }
        vms
    }

    /// A host of `total_gib` GiB with `avail_pct` % of it available.
    pub(crate) fn host_with(total_gib: u64, avail_pct: u64) -> HostState {
        HostState {
            total_bytes: total_gib * GIB,
            available_bytes: total_gib * GIB * avail_pct / 100,
        }
    }

    fn thresholds() -> HostThresholds {
        HostThresholds {
            reclaim_start_percent: 20,
            reclaim_hard_percent: 10,
            give_back_percent: 35,
        }
    }

    fn vm(name: &str, ram: u64, target: u64, available: Option<u64>) -> VmInput {
        VmInput {
            name: name.into(),
            guest_ram_bytes: ram,
            target_bytes: target,
            actual_bytes: target,
            device_max_reclaim_bytes: ram * 75 / 100,
            sample: available.map(|a| GuestSample {
                available_bytes: a,
                free_bytes: Some(a),
                counters: GuestCounters::default(),
                age_s: 1,
                psi_some_avg10: None,
                balloon_bytes: None,
            }),
            policy: VmPolicy::default(),
            pinned: false,
        }
    }

    #[test]
    fn modes_have_hysteresis() {
        let t = thresholds();
        assert_eq!(next_mode(HostMode::Normal, 25.0, &t), HostMode::Normal);
        assert_eq!(next_mode(HostMode::Normal, 19.0, &t), HostMode::Reclaim);
        assert_eq!(next_mode(HostMode::Reclaim, 25.0, &t), HostMode::Reclaim);
        assert_eq!(next_mode(HostMode::Reclaim, 9.0, &t), HostMode::Hard);
        assert_eq!(next_mode(HostMode::Hard, 15.0, &t), HostMode::Hard);
        assert_eq!(next_mode(HostMode::Hard, 21.0, &t), HostMode::Reclaim);
        assert_eq!(next_mode(HostMode::Reclaim, 35.0, &t), HostMode::Normal);
    }

    #[test]
    fn reclaim_takes_idle_memory_weighted_by_shares() {
        // 64 MiB short of the reclaim goal (27.5 % of 64 GiB), already reclaiming.
        let goal = 64 * GIB * 275 / 1000;
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: goal - 64 * MIB,
        };
        let memory = PolicyMemory {
            mode: HostMode::Reclaim,
            ..Default::default()
        };
        let busy = vm("busy", 8 * GIB, 0, Some(GIB));
        let idle = vm("idle", 8 * GIB, 0, Some(6 * GIB));
        let decision = decide(100, &host, &thresholds(), &[busy, idle], &memory);
        assert_eq!(decision.mode, HostMode::Reclaim);
        let (busy, idle) = (&decision.vms[0], &decision.vms[1]);
        assert!(idle.target_bytes > 10 * busy.target_bytes, "{decision:?}");
        assert!(
            idle.target_bytes + busy.target_bytes <= 64 * MIB,
            "no more than the shortfall"
        );
        assert!(idle.reason.contains("idle guest memory"), "{}", idle.reason);

        // Shares are a claim to keep memory: the same VMs, the idle one with
        // far more shares, now give more evenly.
        let mut privileged = vm("idle", 8 * GIB, 0, Some(6 * GIB));
        privileged.policy.shares = 100_000;
        let weighted = decide(
            100,
            &host,
            &thresholds(),
            &[vm("busy", 8 * GIB, 0, Some(GIB)), privileged],
            &memory,
        );
        assert!(
            weighted.vms[1].target_bytes < idle.target_bytes,
            "{weighted:?}"
        );
        assert!(
            weighted.vms[0].target_bytes > busy.target_bytes,
            "{weighted:?}"
        );
    }

    #[test]
    fn pressure_deflates_at_once_and_blocks_inflation() {
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: 5 * GIB,
        };
        let mut input = vm("web", 8 * GIB, 2 * GIB, Some(4 * GIB));
        let mut memory = PolicyMemory::default();
        memory.vms.insert(
            "web".into(),
            VmMemory {
                counters: Some(GuestCounters {
                    alloc_stalls: Some(5),
                    ..Default::default()
                }),
                cooldown_until_s: 0,
                last_change_s: None,
            },
        );
        if let Some(sample) = input.sample.as_mut() {
            sample.counters.alloc_stalls = Some(9);
        }
        let decision = decide(
            100,
            &host,
            &thresholds(),
            std::slice::from_ref(&input),
            &memory,
        );
        assert_eq!(decision.vms[0].target_bytes, 2 * GIB - 256 * MIB);
        assert!(
            decision.vms[0]
                .reason
                .contains("allocation stalls rose by 4"),
            "{}",
            decision.vms[0].reason
        );
        // Next tick: no new pressure, the host still short, but cooling down.
        input.target_bytes = decision.vms[0].target_bytes;
        let next = decide(110, &host, &thresholds(), &[input], &decision.memory);
        assert_eq!(next.vms[0].target_bytes, 2 * GIB - 256 * MIB);
        assert!(
            next.vms[0].reason.contains("cooling down"),
            "{}",
            next.vms[0].reason
        );
    }

    #[test]
    fn give_back_returns_only_the_excess() {
        let host = HostState {
            total_bytes: 10 * GIB,
            available_bytes: 3584 * MIB + 100 * MIB,
        };
        let input = vm("web", 8 * GIB, 2 * GIB, Some(4 * GIB));
        let decision = decide(0, &host, &thresholds(), &[input], &PolicyMemory::default());
        assert_eq!(decision.mode, HostMode::Normal);
        let back = 2 * GIB - decision.vms[0].target_bytes;
        assert!(
            back > 0 && back <= 100 * MIB + PAGE_BYTES,
            "returned {back}"
        );
    }

    #[test]
    fn agent_psi_counts_as_pressure() {
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: 5 * GIB,
        };
        let mut input = vm("web", 8 * GIB, GIB, Some(4 * GIB));
        if let Some(sample) = input.sample.as_mut() {
            sample.psi_some_avg10 = Some(42.0);
        }
        let decision = decide(0, &host, &thresholds(), &[input], &PolicyMemory::default());
        assert!(decision.vms[0].target_bytes < GIB);
        assert!(
            decision.vms[0].reason.contains("guest agent"),
            "{}",
            decision.vms[0].reason
        );
    }

    fn arbitrary_vm() -> impl Strategy<Value = VmInput> {
        (
            1u64..64,
            0u64..100,
            proptest::option::of((0u64..100, 0u64..120, 0u64..3)),
            0u64..=75,
            1u64..5000,
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(ram_gib, target_pct, sample, max_pct, shares, pinned)| {
                let ram = ram_gib * GIB;
                let mut input = vm(
                    "x",
                    ram,
                    ram * target_pct / 100 / PAGE_BYTES * PAGE_BYTES,
                    None,
                );
                input.policy.max_reclaim_percent = max_pct;
                input.policy.shares = shares;
                input.pinned = pinned;
                input.sample = sample.map(|(avail_pct, age_s, stalls)| GuestSample {
                    available_bytes: ram * avail_pct / 100,
                    free_bytes: Some(ram * avail_pct / 200),
                    counters: GuestCounters {
                        alloc_stalls: Some(stalls),
                        ..Default::default()
                    },
                    age_s,
                    psi_some_avg10: None,
                    balloon_bytes: None,
                });
                input
            })
    }

    proptest! {
        #[test]
        fn limits_floors_and_staleness_are_respected(
            vms in proptest::collection::vec(arbitrary_vm(), 1..8),
            total_gib in 1u64..512,
            avail_pct in 0u64..100,
            mode in 0u8..3,
            now_s in 0u64..1000,
        ) {
            let vms = numbered(vms);
            let host = host_with(total_gib, avail_pct);
            let memory = PolicyMemory {
                mode: [HostMode::Normal, HostMode::Reclaim, HostMode::Hard][mode as usize],
                vms: HashMap::new(),
                samples: HashMap::new(),
            };
            let decision = decide(now_s, &host, &thresholds(), &vms, &memory);
            prop_assert_eq!(decision.vms.len(), vms.len());
            for (vm, d) in vms.iter().zip(&decision.vms) {
                if vm.pinned {
                    // An operator's pin holds, whatever the host or guest.
                    prop_assert_eq!(d.target_bytes, vm.target_bytes, "{:?}", d);
                    prop_assert_eq!(d.cause, Cause::Pinned);
                    continue;
                }
                // Never past the limit.
                prop_assert!(d.target_bytes <= limit_bytes(vm), "{:?}", d);
                prop_assert_eq!(d.target_bytes % PAGE_BYTES, 0);
                if d.target_bytes > vm.target_bytes {
                    // Only with fresh statistics, and never below the floor.
                    let sample = vm.sample.expect("inflated without statistics");
                    prop_assert!(sample.age_s <= vm.policy.stats_max_age_s, "stale stats inflated: {:?}", d);
                    let taken = d.target_bytes - vm.target_bytes;
                    prop_assert!(sample.available_bytes.saturating_sub(taken) >= floor_bytes(vm), "floor broken: {:?}", d);
                    prop_assert!(taken <= vm.policy.hard_inflate_step_bytes);
                }
            }
        }
    }

    /// The closed loop of the convergence property: ballooned memory leaves
    /// the guest and returns to the host. Returns every tick's targets.
    fn run_closed_loop(
        guests: &[(u64, u64, u64)],
        total_gib: u64,
        other_use_pct: u64,
        ticks: u64,
    ) -> (Vec<VmInput>, Vec<Vec<u64>>) {
        let total = total_gib * GIB;
        let host_base = total.saturating_sub(total * other_use_pct / 100);
        let mut targets = vec![0u64; guests.len()];
        let mut history: Vec<Vec<u64>> = Vec::new();
        let mut memory = PolicyMemory::default();
        let inputs = |targets: &[u64]| -> Vec<VmInput> {
            guests
                .iter()
                .zip(targets)
                .enumerate()
                .map(|(i, (&(ram_gib, avail_pct, shares), &target))| {
                    let ram = ram_gib * GIB;
                    let mut input = vm(
                        &format!("vm{i}"),
                        ram,
                        target,
                        Some((ram * avail_pct / 100).saturating_sub(target)),
                    );
                    input.policy.shares = shares;
                    input
                })
                .collect()
        };
        for tick in 0..ticks {
            let vms = inputs(&targets);
            let host = HostState {
                total_bytes: total,
                available_bytes: (host_base + targets.iter().sum::<u64>()).min(total),
            };
            let decision = decide(tick * 5, &host, &thresholds(), &vms, &memory);
            memory = decision.memory;
            targets = decision.vms.iter().map(|d| d.target_bytes).collect();
            history.push(targets.clone());
        }
        (inputs(&vec![0; guests.len()]), history)
    }

    /// Checks the convergence claim on one closed-loop run.
    fn assert_settles(
        guests: &[(u64, u64, u64)],
        total_gib: u64,
        other_use_pct: u64,
    ) -> Result<(), TestCaseError> {
        let (vms, _) = run_closed_loop(guests, total_gib, other_use_pct, 0);
        let bound = settling_ticks(&vms);
        let (_, history) = run_closed_loop(guests, total_gib, other_use_pct, bound + 20);
        let settled_from = usize::try_from(bound)
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        for i in 0..guests.len() {
            let series: Vec<u64> = history.iter().map(|t| t[i]).collect();
            let ups = series.windows(2).filter(|w| w[1] > w[0]).count();
            let downs = series.windows(2).filter(|w| w[1] < w[0]).count();
            prop_assert!(ups == 0 || downs == 0, "vm{} oscillates: {:?}", i, series);
            let tail = series.get(settled_from..).unwrap_or_default();
            prop_assert!(
                tail.windows(2).all(|w| w[0] == w[1]),
                "vm{} still changes after the bound of {} ticks: {:?}",
                i,
                bound,
                tail
            );
        }
        Ok(())
    }

    /// The case issue #9 reported: vm1 (many shares) still grew by about
    /// 8 MiB per tick after 380 ticks, next to two VMs at their caps.
    #[test]
    fn the_reported_creep_settles() {
        let guests = [(25, 78, 1), (23, 78, 3277), (22, 57, 1)];
        assert_settles(&guests, 170, 93).unwrap();
        let (vms, history) = run_closed_loop(&guests, 170, 93, 400);
        let bound = usize::try_from(settling_ticks(&vms)).unwrap();
        let last = history.last().unwrap();
        assert_eq!(history.get(bound).unwrap(), last, "{:?}", &history[..bound]);
    }

    #[test]
    fn below_the_floor_without_guest_signals_is_corrected_not_pressure() {
        // Issue #18: 512 MiB guest, floor 128 MiB, our last step landed it
        // at 127 MiB available. Give back the deficit and the margin, with
        // no cool-down and no pressure flag.
        let host = HostState {
            total_bytes: 16 * GIB,
            available_bytes: 16 * GIB * 15 / 100,
        };
        let mut input = vm("guest", 512 * MIB, 305 * MIB, Some(127 * MIB));
        input.policy.min_free_percent = 0;
        let memory = PolicyMemory {
            mode: HostMode::Reclaim,
            ..Default::default()
        };
        let decision = decide(100, &host, &thresholds(), &[input.clone()], &memory);
        let d = &decision.vms[0];
        assert!(!d.pressure, "{d:?}");
        let margin = floor_margin_bytes(&input);
        assert_eq!(d.target_bytes, 305 * MIB - (MIB + margin), "{d:?}");
        assert!(d.reason.contains("below its floor"), "{}", d.reason);
        assert_eq!(decision.memory.vms["guest"].cooldown_until_s, 0);
        // A deficit smaller than min_change is still corrected.
        let mut small = input.clone();
        small.policy.min_change_bytes = 64 * MIB;
        let decision = decide(100, &host, &thresholds(), &[small], &memory);
        assert!(decision.vms[0].target_bytes < 305 * MIB);
        // Next tick, back above the floor by the margin: no inflation yet
        // (inside floor + margin), no deflation either.
        let mut after = input.clone();
        after.target_bytes = 305 * MIB - (MIB + margin);
        after.actual_bytes = after.target_bytes;
        if let Some(sample) = after.sample.as_mut() {
            sample.available_bytes = 128 * MIB + margin;
        }
        let next = decide(
            200,
            &host,
            &thresholds(),
            &[after.clone()],
            &decision.memory,
        );
        assert_eq!(
            next.vms[0].target_bytes, after.target_bytes,
            "{:?}",
            next.vms[0]
        );
    }

    #[test]
    fn inflation_waits_for_the_last_step_to_land_and_for_later_statistics() {
        let host = HostState {
            total_bytes: 64 * GIB,
            available_bytes: 5 * GIB,
        };
        let memory = PolicyMemory {
            mode: HostMode::Reclaim,
            ..Default::default()
        };
        // Not landed yet: actual below target.
        let mut input = vm("web", 8 * GIB, GIB, Some(4 * GIB));
        input.actual_bytes = GIB / 2;
        let d = decide(100, &host, &thresholds(), &[input.clone()], &memory);
        assert_eq!(d.vms[0].target_bytes, GIB, "{:?}", d.vms[0]);
        assert!(d.vms[0].reason.contains("land"), "{}", d.vms[0].reason);
        // Landed, but the statistics predate the last change (at 98 s).
        input.actual_bytes = GIB;
        let mut changed = memory.clone();
        changed.vms.insert(
            "web".into(),
            VmMemory {
                last_change_s: Some(98),
                ..Default::default()
            },
        );
        if let Some(sample) = input.sample.as_mut() {
            sample.age_s = 5;
        }
        let d = decide(100, &host, &thresholds(), &[input.clone()], &changed);
        assert_eq!(d.vms[0].target_bytes, GIB, "{:?}", d.vms[0]);
        // Statistics taken after the change: inflate.
        if let Some(sample) = input.sample.as_mut() {
            sample.age_s = 1;
        }
        let d = decide(100, &host, &thresholds(), &[input], &changed);
        assert!(d.vms[0].target_bytes > GIB, "{:?}", d.vms[0]);
        assert_eq!(d.memory.vms["web"].last_change_s, Some(100));
    }

    #[test]
    fn share_out_hands_a_capped_vms_part_to_the_others() {
        // A heavy VM capped at 10 MiB: the light one takes the rest.
        let shares = share_out(100 * MIB, &[(1_000_000, 10 * MIB), (1, GIB)]);
        assert_eq!(shares, vec![10 * MIB, 90 * MIB]);
        // Everything capped: each takes its cap, the rest stays.
        assert_eq!(
            share_out(GIB, &[(5, 10 * MIB), (7, 20 * MIB), (0, GIB)]),
            vec![10 * MIB, 20 * MIB, 0]
        );
        assert_eq!(share_out(GIB, &[]), Vec::<u64>::new());
        assert_eq!(share_out(0, &[(1, GIB)]), vec![0]);
    }

    proptest! {
        #[test]
        fn share_out_is_capped_proportional_and_complete(
            total in 0u64..(64 * GIB),
            weights in proptest::collection::vec((0u128..1_000_000_000_000, 0u64..(8 * GIB)), 0..8),
        ) {
            let shares = share_out(total, &weights);
            prop_assert_eq!(shares.len(), weights.len());
            let handed: u64 = shares.iter().sum();
            prop_assert!(handed <= total, "handed out {} of {}", handed, total);
            for (share, &(weight, cap)) in shares.iter().zip(&weights) {
                prop_assert!(*share <= cap);
                prop_assert_eq!(share % PAGE_BYTES, 0);
                if weight == 0 {
                    prop_assert_eq!(*share, 0);
                }
            }
            // Complete: all of the total, or every VM at its cap, less a page
            // of rounding per VM.
            let open_caps: u64 = weights.iter().filter(|(w, _)| *w > 0).map(|(_, c)| *c).sum();
            let slack = PAGE_BYTES * weights.len() as u64;
            prop_assert!(
                handed + slack >= total.min(open_caps),
                "handed out {} of {} with caps summing to {}", handed, total, open_caps
            );
        }
    }

    proptest! {
        /// Issue #18: statistics arrive while a step is still landing, so
        /// they may count part of it as available. The policy must never
        /// call that guest pressure (no deflate-at-once, no cool-down), may
        /// dip below a floor by at most part of one step, and ends at or
        /// above every floor.
        #[test]
        fn landing_steps_are_never_taken_for_pressure(
            guests in proptest::collection::vec((1u64..16, 20u64..95), 1..5),
            landed_percent in proptest::collection::vec(0u64..=100, 64),
            total_gib in 16u64..128,
            other_use_pct in 80u64..99,
        ) {
            let total = total_gib * GIB;
            let host_base = total.saturating_sub(total * other_use_pct / 100);
            let mut targets = vec![0u64; guests.len()];
            let mut actuals = vec![0u64; guests.len()];
            let mut memory = PolicyMemory::default();
            let true_available = |i: usize, balloon: u64| {
                let (ram_gib, avail_pct) = guests[i];
                (ram_gib * GIB * avail_pct / 100).saturating_sub(balloon)
            };
            // The statistics were taken while the last step was landing:
            // they saw the balloon only part of the way from its previous
            // size, although it has landed by the time the policy decides.
            let inputs_at = |targets: &[u64], actuals: &[u64], before: &[u64], tick: usize| -> Vec<VmInput> {
                guests.iter().enumerate().map(|(i, &(ram_gib, _))| {
                    let landed = landed_percent[tick % landed_percent.len()];
                    let seen = before[i] + actuals[i].saturating_sub(before[i]) * landed / 100;
                    let mut input = vm(&format!("vm{i}"), ram_gib * GIB, targets[i], Some(true_available(i, seen)));
                    input.actual_bytes = actuals[i];
                    if let Some(sample) = input.sample.as_mut() {
                        sample.balloon_bytes = Some(seen);
                    }
                    input
                }).collect()
            };
            let mut before = actuals.clone();
            let probe = inputs_at(&targets, &actuals, &before, 0);
            let ticks = settling_ticks(&probe) * 2 + 40;
            let mut corrections = 0;
            for tick in 0..ticks {
                let vms = inputs_at(&targets, &actuals, &before, tick as usize);
                let host = HostState {
                    total_bytes: total,
                    available_bytes: (host_base + actuals.iter().sum::<u64>()).min(total),
                };
                let decision = decide(tick * 5, &host, &thresholds(), &vms, &memory);
                memory = decision.memory;
                for (i, d) in decision.vms.iter().enumerate() {
                    prop_assert!(!d.pressure, "tick {}: {:?}", tick, d);
                    corrections += usize::from(d.reason.contains("below its floor"));
                    // The new target lands within the tick.
                    before[i] = actuals[i];
                    actuals[i] = d.target_bytes;
                    targets[i] = d.target_bytes;
                    let floor = floor_bytes(&vms[i]);
                    let available = true_available(i, actuals[i]);
                    prop_assert!(
                        available + vms[i].policy.hard_inflate_step_bytes >= floor,
                        "tick {}: vm{} at {} MiB available, floor {} MiB", tick, i, available / MIB, floor / MIB
                    );
                }
            }
            // Knowing the balloon's size at measurement time, the policy
            // never overshoots a floor, so it never has to correct.
            prop_assert_eq!(corrections, 0);
            for (i, vm) in inputs_at(&targets, &actuals, &actuals, 0).iter().enumerate() {
                prop_assert!(
                    true_available(i, targets[i]) >= floor_bytes(vm),
                    "vm{} ends below its floor: target {} MiB", i, targets[i] / MIB
                );
            }
        }
    }

    proptest! {
        // Enough cases to find a convergence fault in CI (PROPTEST_CASES
        // may raise it; 100,000 were run once, see docs/host-policy.md).
        #![proptest_config(ProptestConfig {
            cases: ProptestConfig::default().cases.max(2_000),
            ..ProptestConfig::default()
        })]

        #[test]
        fn a_steady_host_never_oscillates(
            guests in proptest::collection::vec((1u64..32, 10u64..95, 1u64..4000), 1..6),
            total_gib in 16u64..256,
            other_use_pct in 30u64..99,
        ) {
            assert_settles(&guests, total_gib, other_use_pct)?;
        }
    }
}
