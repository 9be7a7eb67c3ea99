//! balloon-policy: the balloon policies as pure functions, from the host's
//! memory, every VM's state and what earlier ticks remembered to a
//! decision per VM. No I/O, no configuration files: host-policy's daemon
//! and its simulator (policy-sim) call the same `decide_with` and apply
//! its outputs (targets, the guest agent's page-cache drops), nothing else.
//!
//! - `settings`: one VM's resolved settings (`VmPolicy`).
//! - `policy`: the types every policy shares and our own `decide`, in
//!   named phases.
//! - `baselines`: the peers' policies (oVirt MOM, Proxmox VE, VMware ESX).
//! - `gate`: the last step of every tick, whatever the policy: an
//!   inflation waits for the guest agent to drop page cache first, and
//!   what the agent is asked to drop.

#![forbid(unsafe_code)]

pub mod baselines;
pub mod gate;
pub mod policy;
pub mod settings;

use serde::{Deserialize, Serialize};

pub use settings::{VmPolicy, MIB};

use policy::{Decision, HostState, HostThresholds, PolicyMemory, VmInput};

/// Which policy sets the targets (`[host] policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// host-policy's own (`policy::decide`).
    #[default]
    BalloonStack,
    /// oVirt MOM's balloon rules (`baselines::mom`).
    Mom,
    /// Proxmox VE's auto-ballooning (`baselines::proxmox`).
    Proxmox,
    /// VMware ESX's idle-memory tax with min-funding revocation
    /// (`baselines::esx`).
    EsxIdleTax,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::BalloonStack,
        PolicyKind::Mom,
        PolicyKind::Proxmox,
        PolicyKind::EsxIdleTax,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::BalloonStack => "balloon-stack",
            PolicyKind::Mom => "mom",
            PolicyKind::Proxmox => "proxmox",
            PolicyKind::EsxIdleTax => "esx-idle-tax",
        }
    }
}

/// One tick of the chosen policy, then the guest-agent gate (`gate::gate`)
/// on its decision: the whole of what the daemon applies and the
/// simulator models.
pub fn decide_with(
    kind: PolicyKind,
    now_s: u64,
    host: &HostState,
    thresholds: &HostThresholds,
    vms: &[VmInput],
    memory: &PolicyMemory,
) -> Decision {
    let decision = match kind {
        PolicyKind::BalloonStack => policy::decide(now_s, host, thresholds, vms, memory),
        PolicyKind::Mom => baselines::mom::decide(host, vms, memory),
        PolicyKind::Proxmox => baselines::proxmox::decide(host, thresholds, vms, memory),
        PolicyKind::EsxIdleTax => baselines::esx::decide(host, thresholds, vms, memory),
    };
    gate::gate(vms, decision)
}
