//! host-policy: the daemon that sets balloon targets for every VM on a
//! host. Each tick it reads the host's memory and PSI (`host_reader`: a
//! meminfo file or a memory cgroup, parsed by `meminfo_reader` and
//! `host_memory`) and every VM's backend and guest agent (`links`), runs
//! balloon-policy's pure `decide_with`, and applies the decision's
//! outputs (targets, the guest agent's page-cache drops); `metrics` and
//! `status` report. Its files (configuration, discovery, state file) are
//! host-policy-config's; its `simulate` command is policy-sim's.

#![forbid(unsafe_code)]

pub mod cli;
pub mod daemon;
pub mod host_memory;
pub mod host_reader;
pub mod links;
pub mod meminfo_reader;
pub mod metrics;
pub mod status;
