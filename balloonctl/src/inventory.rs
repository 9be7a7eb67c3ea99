//! Which VMs this host has: control sockets named `<vm>.ctl` under the
//! runtime directory, and the VMs of host-policy's configuration (which
//! also says which of them host-policy manages and where its last
//! decisions are).

use std::path::{Path, PathBuf};

use host_policy_config::{classify_discovered, managed_vms, Config, StateFile};

/// Control sockets in the runtime directory end with this.
pub const CONTROL_SUFFIX: &str = ".ctl";

#[derive(Clone, Debug, PartialEq)]
pub struct VmEntry {
    pub name: String,
    pub control: PathBuf,
    /// host-policy's configuration manages this VM.
    pub managed: bool,
    /// host-policy's configuration names a guest-agent socket for it, or
    /// this user finds libvirt's channel for it (as host-policy would).
    pub has_agent: bool,
}

pub struct Inventory {
    pub vms: Vec<VmEntry>,
    /// host-policy's state file, when it has one.
    pub state: Option<StateFile>,
    /// Where VMs were looked for, for error messages.
    pub searched: String,
}

/// The VMs found in `runtime_dir` and `config`, sorted by name; a VM in
/// both takes the configuration's control path.
pub fn find(runtime_dir: &Path, config: Option<&Config>) -> Inventory {
    let mut vms: Vec<VmEntry> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(runtime_dir) {
        for entry in entries.filter_map(Result::ok) {
            let file = entry.file_name().to_string_lossy().to_string();
            let is_socket = std::fs::metadata(entry.path())
                .is_ok_and(|meta| std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
            if let Some(Ok(name)) = classify_discovered(&file, CONTROL_SUFFIX, is_socket) {
                vms.push(VmEntry {
                    name,
                    control: entry.path(),
                    managed: false,
                    has_agent: false,
                });
            }
        }
    }
    let mut searched = runtime_dir.display().to_string();
    let mut state = None;
    if let Some(config) = config {
        searched.push_str(&format!(" and {}", config.path.display()));
        for vm in managed_vms(config) {
            vms.retain(|known| known.name != vm.name);
            vms.push(VmEntry {
                name: vm.name,
                control: vm.control,
                managed: true,
                has_agent: vm.agent.is_some(),
            });
        }
        state = config.host.state_file.as_deref().and_then(StateFile::read);
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Inventory {
        vms,
        state,
        searched,
    }
}

impl Inventory {
    pub fn get(&self, name: &str) -> Option<&VmEntry> {
        self.vms.iter().find(|vm| vm.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.vms.iter().map(|vm| vm.name.as_str()).collect()
    }

    /// host-policy's last decision for a VM: (pressure, reason).
    pub fn last_decision(&self, name: &str) -> Option<(bool, &str)> {
        let state = self.state.as_ref()?;
        let decision = state.decision.vms.iter().find(|d| d.name == name)?;
        Some((decision.pressure, decision.reason.as_str()))
    }

    /// Whether host-policy had a guest-agent report for the VM at its last
    /// tick; None without a state file, or one older than `max_age_s`.
    pub fn agent_reporting(&self, name: &str, now_unix_s: u64, max_age_s: u64) -> Option<bool> {
        let state = self.state.as_ref()?;
        if now_unix_s.saturating_sub(state.unix_s) > max_age_s {
            return None;
        }
        Some(state.agents.contains_key(name))
    }
}
