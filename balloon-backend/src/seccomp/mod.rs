//! System-call allow-lists. The backend maps all of guest RAM and parses
//! guest input; if it were ever compromised, the damage must stop at the
//! guest. After start-up each thread confines itself to the calls its job
//! needs (`allow_list` says which, per role), so that a hijacked thread can
//! neither start programs nor open files nor make new sockets.
//!
//! Threads inherit their creator's filter, and filters only ever narrow, so
//! the threads that vhost-user-backend starts for each frontend (the request
//! handler and the vring worker) run under the `Vhost` filter that the main
//! thread installs; the worker narrows itself further on its first event.
//!
//! In `enforce` mode a forbidden call traps: `report_blocked_call` writes one
//! line naming the thread and the call's number, then the process dies of
//! SIGSYS. In `log` mode the kernel logs forbidden calls (audit type 1326)
//! and lets them run, which is how a missing call is found.
//!
//! Three jobs, one file each: `allow_lists` (which calls each thread role
//! may make), `filter` (turning a list into a BPF program and installing
//! it) and `sigsys` (the signal-safe report of a trapped call).

mod allow_lists;
mod filter;
mod sigsys;

pub use allow_lists::{allow_list, answered_enosys, Allowed, ArgLimit, ThreadRole};
pub use filter::{
    confine_current_thread, confine_or_exit, confine_vring_worker_once, filter, SeccompError,
};
pub use sigsys::install_sigsys_reporter;

/// What `--seccomp` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// A call outside the allow-list kills the process with SIGSYS.
    #[default]
    Enforce,
    /// A call outside the allow-list is allowed and logged by the kernel.
    Log,
    /// No filter is installed.
    Off,
}
