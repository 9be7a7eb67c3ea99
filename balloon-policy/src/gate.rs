//! The last step of every tick, whatever the policy: the guest-agent gate.
//! Its input is where each VM's guest agent stands with the page-cache
//! reclaims it was asked for (`VmInput::agent_reclaim`); its outputs are
//! in each VM's decision: an inflation held until the agent has dropped
//! cache (`held_target_bytes`, the target staying where it was), and the
//! page cache the agent is asked to drop now (`agent_reclaim_bytes`). The
//! daemon sends that request and nothing else; the simulator's agent
//! drops it.
//!
//! - Before an inflation larger than the guest's free memory, of a VM
//!   whose agent reports at least the difference in page cache, the agent
//!   is asked to drop that difference first, so that the balloon takes
//!   cold cache rather than warm anonymous memory; the inflation waits
//!   until it has answered (host-policy gives it 20 s,
//!   `RECLAIM_TIMEOUT`). After a reclaim, inflations go ahead
//!   without asking again for `RECLAIM_REPEAT_S`.
//! - The page cache a policy asks to drop (`reclaim_cache_bytes`) is asked
//!   for at most every `TRIM_REPEAT_S`, at most half the agent's cache,
//!   and not below `TRIM_MIN_BYTES`.

use crate::policy::{AgentReclaim, Decision, VmDecision, VmInput};

/// After a reclaim (answered or not), inflations go ahead without asking
/// the agent again for this long.
pub const RECLAIM_REPEAT_S: u64 = 30;
/// Cache drops a policy asks for come at most this often: sooner than
/// `RECLAIM_REPEAT_S`, as the host is short, and each takes at most half
/// of what is left.
pub const TRIM_REPEAT_S: u64 = 10;
/// Smaller cache drops are not worth the agent's work.
pub const TRIM_MIN_BYTES: u64 = 8 << 20;

/// Applies the gate to every VM of `decision` (in the order of `vms`, as
/// every policy decides them).
pub fn gate(vms: &[VmInput], mut decision: Decision) -> Decision {
    for (vm, d) in vms.iter().zip(decision.vms.iter_mut()) {
        if vm.name == d.name {
            gate_vm(vm, d);
        }
    }
    decision
}

/// Holds `d`'s inflation: the target stays where it was.
fn hold(d: &mut VmDecision, why: String) {
    d.held_target_bytes = Some(d.target_bytes);
    d.target_bytes = d.previous_bytes;
    d.reason = why;
}

fn gate_vm(vm: &VmInput, d: &mut VmDecision) {
    let inflation = d.target_bytes.saturating_sub(d.previous_bytes);
    let done_s_ago = match vm.agent_reclaim {
        AgentReclaim::Unavailable => return,
        AgentReclaim::Waiting { asked_s_ago } => {
            if inflation > 0 {
                hold(
                    d,
                    format!("waiting for the guest agent's reclaim (asked {asked_s_ago} s ago)"),
                );
            }
            return;
        }
        AgentReclaim::Idle { done_s_ago } => done_s_ago,
    };
    let within = |repeat_s: u64| done_s_ago.is_some_and(|ago| ago < repeat_s);
    // The balloon takes the guest's free memory first: only what the
    // inflation needs beyond it would come out of page cache or the
    // working set, and only that waits for the agent.
    let free = vm.sample.and_then(|s| s.free_bytes).unwrap_or(0);
    let beyond_free = inflation.saturating_sub(free);
    if beyond_free > 0
        && !within(RECLAIM_REPEAT_S)
        && vm
            .agent_page_cache_bytes
            .is_some_and(|cache| cache >= beyond_free)
    {
        d.agent_reclaim_bytes = beyond_free;
        hold(d, "waiting for the guest agent's reclaim".to_string());
        return;
    }
    if d.reclaim_cache_bytes > 0 && !within(TRIM_REPEAT_S) {
        let cache = vm.agent_page_cache_bytes.unwrap_or(0);
        let bytes = d.reclaim_cache_bytes.min(cache / 2);
        if bytes >= TRIM_MIN_BYTES {
            d.agent_reclaim_bytes = bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Cause, HostMode, PolicyMemory};
    use crate::VmPolicy;

    const MIB: u64 = 1 << 20;

    fn input(reclaim: AgentReclaim, cache_mib: Option<u64>) -> VmInput {
        VmInput {
            name: "web".into(),
            guest_ram_bytes: 4096 * MIB,
            target_bytes: 0,
            actual_bytes: 0,
            device_max_reclaim_bytes: 3072 * MIB,
            sample: None,
            policy: VmPolicy::default(),
            pinned: false,
            free_page_reporting: Some(true),
            resident_bytes: None,
            agent_page_cache_bytes: cache_mib.map(|mib| mib * MIB),
            agent_reclaim: reclaim,
        }
    }

    /// One VM's decision: the policy moves its balloon from 0 to
    /// `target_mib` and asks for `drop_mib` of page cache.
    fn decided(vm: &VmInput, target_mib: u64, drop_mib: u64) -> VmDecision {
        let decision = Decision {
            mode: HostMode::Reclaim,
            host_available_percent: 15.0,
            vms: vec![VmDecision {
                name: vm.name.clone(),
                previous_bytes: 0,
                target_bytes: target_mib * MIB,
                pressure: false,
                reason: "the policy's".into(),
                cause: Cause::Reclaim,
                reclaim_cache_bytes: drop_mib * MIB,
                agent_reclaim_bytes: 0,
                held_target_bytes: None,
            }],
            memory: PolicyMemory::default(),
        };
        let mut gated = gate(std::slice::from_ref(vm), decision);
        gated.vms.remove(0)
    }

    #[test]
    fn without_an_agent_nothing_changes() {
        let vm = input(AgentReclaim::Unavailable, Some(1024));
        let d = decided(&vm, 64, 32);
        assert_eq!((d.target_bytes, d.held_target_bytes), (64 * MIB, None));
        assert_eq!(d.agent_reclaim_bytes, 0);
        assert_eq!(d.reason, "the policy's");
    }

    #[test]
    fn an_inflation_waits_for_the_agent_to_drop_that_much_cache_first() {
        let never = input(AgentReclaim::Idle { done_s_ago: None }, Some(100));
        let d = decided(&never, 64, 0);
        assert_eq!(d.target_bytes, 0);
        assert_eq!(d.held_target_bytes, Some(64 * MIB));
        assert_eq!(d.agent_reclaim_bytes, 64 * MIB);
        assert_eq!(d.reason, "waiting for the guest agent's reclaim");
        assert_eq!(d.cause, Cause::Reclaim, "the policy's cause stays");
        // Less cache than the inflation, or a reclaim within 30 s: it goes
        // ahead.
        let small = input(AgentReclaim::Idle { done_s_ago: None }, Some(32));
        assert_eq!(decided(&small, 64, 0).target_bytes, 64 * MIB);
        let recent = input(
            AgentReclaim::Idle {
                done_s_ago: Some(RECLAIM_REPEAT_S - 1),
            },
            Some(100),
        );
        assert_eq!(decided(&recent, 64, 0).held_target_bytes, None);
        let due = input(
            AgentReclaim::Idle {
                done_s_ago: Some(RECLAIM_REPEAT_S),
            },
            Some(100),
        );
        assert_eq!(decided(&due, 64, 0).held_target_bytes, Some(64 * MIB));
    }

    #[test]
    fn only_what_free_memory_cannot_cover_waits_for_the_agent() {
        let with_free = |free_mib: u64| {
            let mut vm = input(AgentReclaim::Idle { done_s_ago: None }, Some(1024));
            vm.sample = Some(crate::policy::GuestSample {
                available_bytes: (free_mib + 1024) * MIB,
                free_bytes: Some(free_mib * MIB),
                counters: Default::default(),
                age_s: 0,
                balloon_bytes: None,
                psi_some_avg10: None,
            });
            vm
        };
        let covered = decided(&with_free(64), 64, 0);
        assert_eq!(
            (covered.target_bytes, covered.agent_reclaim_bytes),
            (64 * MIB, 0)
        );
        let partly = decided(&with_free(40), 64, 0);
        assert_eq!(partly.held_target_bytes, Some(64 * MIB));
        assert_eq!(partly.agent_reclaim_bytes, 24 * MIB);
    }

    #[test]
    fn while_a_reclaim_is_in_flight_inflations_hold_and_nothing_more_is_asked() {
        let vm = input(AgentReclaim::Waiting { asked_s_ago: 4 }, Some(1024));
        let d = decided(&vm, 64, 32);
        assert_eq!((d.target_bytes, d.agent_reclaim_bytes), (0, 0));
        assert_eq!(
            d.reason,
            "waiting for the guest agent's reclaim (asked 4 s ago)"
        );
        let d = decided(&vm, 0, 32);
        assert_eq!((d.held_target_bytes, d.agent_reclaim_bytes), (None, 0));
    }

    #[test]
    fn cache_drops_are_paced_halved_and_not_too_small() {
        let at = |done_s_ago, cache_mib| input(AgentReclaim::Idle { done_s_ago }, Some(cache_mib));
        assert_eq!(decided(&at(None, 100), 0, 32).agent_reclaim_bytes, 32 * MIB);
        assert_eq!(decided(&at(None, 40), 0, 32).agent_reclaim_bytes, 20 * MIB);
        assert_eq!(decided(&at(None, 14), 0, 32).agent_reclaim_bytes, 0);
        assert_eq!(
            decided(&at(Some(TRIM_REPEAT_S - 1), 100), 0, 32).agent_reclaim_bytes,
            0
        );
        assert_eq!(
            decided(&at(Some(TRIM_REPEAT_S), 100), 0, 32).agent_reclaim_bytes,
            32 * MIB
        );
    }
}
