//! host-policy: sets balloon targets for every VM on a host from the host's
//! memory state and each guest's statistics, within each VM's limit.

#![forbid(unsafe_code)]

pub mod baselines;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod family;
pub mod guest_model;
pub mod links;
pub mod meminfo_reader;
pub mod metrics;
pub mod plot;
pub mod policy;
pub mod simulate;
pub mod status;
