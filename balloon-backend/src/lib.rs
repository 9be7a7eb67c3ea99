//! A vhost-user virtio-balloon device that returns inflated and reported
//! guest pages to the host by punching holes in guest RAM.

pub mod chain;
pub mod cli;
pub mod config_change;
pub mod control;
pub mod cpu_clock;
pub mod daemon;
pub mod device;
pub mod faults;
pub mod features;
pub mod host_memory;
pub mod pfn;
pub mod saved_state;
pub mod seccomp;
pub mod state_file;
pub mod stats;
pub mod tracker;
pub mod virtio_config;
