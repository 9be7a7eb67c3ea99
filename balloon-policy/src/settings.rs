//! One VM's settings as the policies read them, resolved from
//! host-policy.toml's `[defaults]` and `[[vm]]` (or a scenario's) by
//! host-policy-config; the defaults are the documented ones.

/// Bytes in a MiB: the unit of every size in the settings' files.
pub const MIB: u64 = 1 << 20;

/// Resolved settings of one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmPolicy {
    pub max_reclaim_percent: u64,
    pub min_free_bytes: u64,
    pub min_free_percent: u64,
    pub shares: u64,
    pub inflate_step_bytes: u64,
    pub hard_inflate_step_bytes: u64,
    pub deflate_step_bytes: u64,
    pub pressure_cooldown_s: u64,
    pub stats_max_age_s: u64,
    pub min_change_bytes: u64,
    pub major_faults_per_tick: u64,
    pub psi_some_avg10: f64,
}

impl Default for VmPolicy {
    fn default() -> Self {
        VmPolicy {
            max_reclaim_percent: 65,
            min_free_bytes: 128 * MIB,
            min_free_percent: 10,
            shares: 1000,
            inflate_step_bytes: 64 * MIB,
            hard_inflate_step_bytes: 256 * MIB,
            deflate_step_bytes: 256 * MIB,
            pressure_cooldown_s: 60,
            stats_max_age_s: 30,
            min_change_bytes: 8 * MIB,
            major_faults_per_tick: 1000,
            psi_some_avg10: 10.0,
        }
    }
}
