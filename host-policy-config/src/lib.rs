//! host-policy-config: host-policy's files, for the daemon, its simulator
//! (scenarios take the same `[host]` and `[defaults]` keys) and balloonctl.
//!
//! - `config`: `host-policy.toml` parsed into balloon-policy's types and
//!   validated, errors naming file, line and key.
//! - `discovery`: the VMs a configuration manages, `[[vm]]` entries and
//!   sockets found in `[discover]`, and each one's guest agent (`agent =`,
//!   else the socket libvirt made for the domain's agent channel).
//! - `state_file`: what `host-policy run` leaves for `status` and
//!   balloonctl.

#![forbid(unsafe_code)]

pub mod config;
pub mod discovery;
pub mod state_file;

pub use config::Config;
pub use discovery::{classify_discovered, discovered_vms, managed_vms, ManagedVm};
pub use state_file::StateFile;
