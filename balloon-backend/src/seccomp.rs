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

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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

/// The jobs the backend's threads do; each has its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// Waits for SIGINT/SIGTERM, removes the socket files, exits.
    Signals,
    /// Accepts control clients and serves each on a thread of its own.
    Control,
    /// The main thread: accepts frontends and starts vhost-user-backend's
    /// request handler and vring worker for each (they inherit this list).
    Vhost,
    /// Handles queue events and the stats timers: reads eventfds and the
    /// interval timerfd, punches holes, signals the guest.
    VringWorker,
}

impl ThreadRole {
    pub const ALL: [ThreadRole; 4] = [
        ThreadRole::Signals,
        ThreadRole::Control,
        ThreadRole::Vhost,
        ThreadRole::VringWorker,
    ];

    /// The name used in logs and in docs/balloon-backend.md.
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Signals => "signals",
            ThreadRole::Control => "control",
            ThreadRole::Vhost => "vhost",
            ThreadRole::VringWorker => "vring-worker",
        }
    }
}

/// A restriction on one argument of an allowed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgLimit {
    /// Any arguments.
    Any,
    /// Argument `index` is one of `values`.
    OneOf { index: u8, values: &'static [u64] },
    /// Argument `index` has none of the bits of `mask` set.
    BitsClear { index: u8, mask: u64 },
    /// Argument `index` has every bit of `mask` set.
    BitsSet { index: u8, mask: u64 },
}

/// One system call a thread may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The call's name without the `SYS_` prefix.
    pub name: &'static str,
    pub number: i64,
    pub limit: ArgLimit,
}

macro_rules! allow {
    ($sys:ident) => {
        allow!($sys, ArgLimit::Any)
    };
    ($sys:ident, $limit:expr) => {
        Allowed {
            name: match stringify!($sys).split_at_checked(4) {
                Some((_, name)) => name,
                None => stringify!($sys),
            },
            number: libc::$sys,
            limit: $limit,
        }
    };
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const PUNCH_HOLE_KEEP_SIZE: u64 = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;
const THREAD_NAME_OPTIONS: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64];
/// SIGABRT for a panic that aborts, SIGSYS for `report_blocked_call`.
const SELF_SIGNALS: &[u64] = &[libc::SIGABRT as u64, libc::SIGSYS as u64];
const FREE_ADVICE: &[u64] = &[libc::MADV_DONTNEED as u64];
/// SEEK_SET rewinds the fd directory; SEEK_DATA/SEEK_HOLE measure residency.
const SEEKS: &[u64] = &[
    libc::SEEK_SET as u64,
    libc::SEEK_DATA as u64,
    libc::SEEK_HOLE as u64,
];
const SOCKET_LEVEL: &[u64] = &[libc::SOL_SOCKET as u64];
const FCNTL_COMMANDS: &[u64] = &[
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
];

/// What every thread needs to run Rust code at all: memory, locks, its
/// signal stack, logging to stderr, and ending.
fn runtime() -> Vec<Allowed> {
    vec![
        allow!(SYS_brk),
        allow!(
            SYS_mmap,
            ArgLimit::BitsClear {
                index: 2,
                mask: PROT_EXEC
            }
        ),
        allow!(
            SYS_mprotect,
            ArgLimit::BitsClear {
                index: 2,
                mask: PROT_EXEC
            }
        ),
        allow!(SYS_munmap),
        allow!(
            SYS_madvise,
            ArgLimit::OneOf {
                index: 2,
                values: FREE_ADVICE
            }
        ),
        allow!(SYS_futex),
        allow!(SYS_sched_yield),
        allow!(SYS_sched_getaffinity),
        allow!(SYS_sigaltstack),
        allow!(SYS_rt_sigprocmask),
        allow!(SYS_rt_sigreturn),
        allow!(SYS_clock_gettime),
        allow!(SYS_getrandom),
        allow!(SYS_gettid),
        allow!(SYS_getpid),
        allow!(
            SYS_tgkill,
            ArgLimit::OneOf {
                index: 2,
                values: SELF_SIGNALS
            }
        ),
        allow!(
            SYS_prctl,
            ArgLimit::OneOf {
                index: 0,
                values: THREAD_NAME_OPTIONS
            }
        ),
        allow!(SYS_write),
        allow!(SYS_close),
        allow!(SYS_exit),
        allow!(SYS_exit_group),
    ]
}

/// What a thread that starts threads needs (`clone3` is in
/// `answered_enosys`, so glibc uses `clone`, whose flags a filter can read).
fn thread_spawning() -> Vec<Allowed> {
    vec![
        allow!(
            SYS_clone,
            ArgLimit::BitsSet {
                index: 0,
                mask: libc::CLONE_THREAD as u64
            }
        ),
        allow!(SYS_set_robust_list),
        allow!(SYS_rseq),
    ]
}

/// Calls that fail with ENOSYS in every confined thread instead of killing
/// it. glibc copes: it falls back from `clone3` to `clone`, and when
/// `openat` of /sys/devices/system/cpu/online fails (as it does on a new
/// malloc arena) it counts CPUs with sched_getaffinity. No file can be
/// opened.
pub fn answered_enosys() -> Vec<Allowed> {
    let mut list = vec![allow!(SYS_clone3), allow!(SYS_openat)];
    #[cfg(target_arch = "x86_64")]
    list.push(allow!(SYS_open));
    list
}

/// Reading and writing connected sockets and eventfds.
fn stream_io() -> Vec<Allowed> {
    vec![
        allow!(SYS_read),
        allow!(SYS_recvfrom),
        allow!(SYS_sendto),
        allow!(
            SYS_getsockopt,
            ArgLimit::OneOf {
                index: 1,
                values: SOCKET_LEVEL
            }
        ),
        allow!(
            SYS_setsockopt,
            ArgLimit::OneOf {
                index: 1,
                values: SOCKET_LEVEL
            }
        ),
        allow!(
            SYS_fcntl,
            ArgLimit::OneOf {
                index: 1,
                values: FCNTL_COMMANDS
            }
        ),
        allow!(
            SYS_lseek,
            ArgLimit::OneOf {
                index: 2,
                values: SEEKS
            }
        ),
    ]
}

/// What a vring worker does: wait for kicks, read eventfds, punch holes
/// in guest RAM's files (and nothing else to them).
fn queue_work() -> Vec<Allowed> {
    let mut list = vec![
        allow!(SYS_read),
        allow!(SYS_epoll_pwait),
        // Arms the timer of deferred punches.
        allow!(SYS_timerfd_settime),
        allow!(
            SYS_fallocate,
            ArgLimit::OneOf {
                index: 1,
                values: &[PUNCH_HOLE_KEEP_SIZE]
            }
        ),
    ];
    #[cfg(target_arch = "x86_64")]
    list.push(allow!(SYS_epoll_wait));
    list
}

/// The system calls a thread of `role` may make (its filter allows exactly
/// these, with these argument limits).
pub fn allow_list(role: ThreadRole) -> Vec<Allowed> {
    let mut list = runtime();
    match role {
        ThreadRole::Signals => {
            list.push(allow!(SYS_read));
            #[cfg(target_arch = "x86_64")]
            list.push(allow!(SYS_unlink));
            list.push(allow!(SYS_unlinkat));
        }
        ThreadRole::Control => {
            list.extend(thread_spawning());
            list.extend(stream_io());
            list.push(allow!(SYS_accept4));
            list.push(allow!(SYS_geteuid));
            // The pause after a failed accept.
            list.push(allow!(SYS_clock_nanosleep));
            // `status` reads guest RAM's allocated blocks from the files'
            // own descriptors (AT_EMPTY_PATH), never a path's.
            list.push(allow!(
                SYS_statx,
                ArgLimit::BitsSet {
                    index: 2,
                    mask: libc::AT_EMPTY_PATH as u64
                }
            ));
        }
        ThreadRole::Vhost => {
            list.extend(thread_spawning());
            list.extend(stream_io());
            list.extend([
                allow!(SYS_accept4),
                allow!(SYS_recvmsg),
                allow!(SYS_sendmsg),
                allow!(SYS_getsockname),
                allow!(SYS_getpeername),
                allow!(SYS_shutdown),
                allow!(SYS_eventfd2),
                allow!(SYS_epoll_create1),
                allow!(SYS_epoll_ctl),
                allow!(SYS_getdents64),
                allow!(SYS_fstat),
                allow!(SYS_newfstatat),
                allow!(SYS_statx),
            ]);
            list.extend(queue_work());
            // Lets the vring worker add its narrower filter; a filter can
            // only take calls away, never give them back.
            list.push(allow!(
                SYS_prctl,
                ArgLimit::OneOf {
                    index: 0,
                    values: &[libc::PR_SET_NO_NEW_PRIVS as u64]
                }
            ));
            list.push(allow!(
                SYS_seccomp,
                ArgLimit::OneOf {
                    index: 0,
                    values: &[libc::SECCOMP_SET_MODE_FILTER as u64]
                }
            ));
        }
        ThreadRole::VringWorker => list.extend(queue_work()),
    }
    list
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filters are not supported on {0}")]
    UnsupportedArch(&'static str),
    #[error("building the {role} filter: {source}")]
    Build {
        role: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the {role} filter: {source}")]
    Install {
        role: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS reporter: {0}")]
    Reporter(io::Error),
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

fn condition(
    index: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::Error> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(Into::into)
}

/// The rules for one allowed call: an empty list allows any arguments.
fn rules_for(limit: ArgLimit) -> Result<Vec<SeccompRule>, seccompiler::Error> {
    let rule = |conditions| SeccompRule::new(conditions).map_err(seccompiler::Error::from);
    match limit {
        ArgLimit::Any => Ok(Vec::new()),
        ArgLimit::OneOf { index, values } => values
            .iter()
            .map(|value| rule(vec![condition(index, SeccompCmpOp::Eq, *value)?]))
            .collect(),
        ArgLimit::BitsClear { index, mask } => Ok(vec![rule(vec![condition(
            index,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?]),
        ArgLimit::BitsSet { index, mask } => Ok(vec![rule(vec![condition(
            index,
            SeccompCmpOp::MaskedEq(mask),
            mask,
        )?])?]),
    }
}

/// The compiled filter for `role`: calls on its list pass, others trap
/// (enforce) or are logged (log).
pub fn filter(role: ThreadRole, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        role: role.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // The ENOSYS calls pass this filter so that the companion's answer,
    // which outranks "allow", is the one taken.
    for allowed in allow_list(role).into_iter().chain(answered_enosys()) {
        let new_rules = rules_for(allowed.limit).map_err(build)?;
        // An empty rule list allows any arguments, so it absorbs the rest.
        match rules.get_mut(&allowed.number) {
            None => {
                rules.insert(allowed.number, new_rules);
            }
            Some(existing) if new_rules.is_empty() => existing.clear(),
            Some(existing) if !existing.is_empty() => existing.extend(new_rules),
            Some(_) => {}
        }
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Enforce | SeccompMode::Off => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()?)
        .map_err(|e| build(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| build(e.into()))
}

/// The companion filter: the `answered_enosys` calls fail with ENOSYS,
/// everything else is left to the role's filter.
fn enosys_companion() -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        role: "ENOSYS companion",
        source,
    };
    let rules = answered_enosys()
        .into_iter()
        .map(|call| (call.number, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch()?,
    )
    .map_err(|e| build(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| build(e.into()))
}

/// Confines the calling thread (and the threads it starts from now on) to
/// `role`'s allow-list. `Off` installs nothing.
pub fn confine_current_thread(role: ThreadRole, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let install = |program: &BpfProgram| {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            role: role.name(),
            source,
        })
    };
    // The fallback first: installing a filter needs prctl(NO_NEW_PRIVS),
    // which the role's own filter forbids.
    install(&enosys_companion()?)?;
    install(&filter(role, mode)?)?;
    log::debug!(
        "seccomp: {} thread confined ({mode:?}, {} calls allowed)",
        role.name(),
        allow_list(role).len()
    );
    Ok(())
}

/// For threads the backend starts itself: a thread that cannot confine
/// itself must not run unconfined, and has no caller to report to.
pub fn confine_or_exit(role: ThreadRole, mode: SeccompMode) {
    if let Err(error) = confine_current_thread(role, mode) {
        log::error!("{error}; exiting (--seccomp off runs without a filter)");
        std::process::exit(1);
    }
}

thread_local! {
    static CONFINED_AS_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Confines a vring worker thread on its first event (vhost-user-backend
/// starts these threads, so the device confines them from inside). A
/// failure is logged once per thread: the thread keeps the `Vhost` filter.
pub fn confine_vring_worker_once(mode: SeccompMode) {
    if mode == SeccompMode::Off || CONFINED_AS_WORKER.with(|done| done.replace(true)) {
        return;
    }
    if let Err(error) = confine_current_thread(ThreadRole::VringWorker, mode) {
        log::warn!("{error}; the vring worker keeps the wider vhost filter");
    }
}

/// Makes a trapped call print one line before the process dies of SIGSYS.
/// Installed once, before any thread confines itself.
pub fn install_sigsys_reporter() -> Result<(), SeccompError> {
    // Built now, read by the handler, which must not allocate.
    KNOWN_CALL_NAMES.get_or_init(|| {
        let mut names: Vec<(i64, &'static str)> = ThreadRole::ALL
            .into_iter()
            .flat_map(allow_list)
            .map(|allowed| (allowed.number, allowed.name))
            .chain(SOMETIMES_MISSED.iter().copied())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    });
    // SAFETY: sigaction is plain old data; all-zero is a valid value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = report_blocked_call as *const () as libc::sighandler_t;
    // RESETHAND: the handler runs once, then SIGSYS has its default action,
    // which the handler's own raise() takes. NODEFER: raise() is delivered
    // at once instead of after the handler returns.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
    // SAFETY: `action` is initialised and names a handler that only makes
    // async-signal-safe calls; the old action is not asked for.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(SeccompError::Reporter(io::Error::last_os_error()))
    }
}

/// Names for the trap message: every call some thread may make (a thread
/// may stray into another's list) and calls a change to the code or its
/// crates could plausibly add.
static KNOWN_CALL_NAMES: std::sync::OnceLock<Vec<(i64, &'static str)>> = std::sync::OnceLock::new();

const SOMETIMES_MISSED: &[(i64, &str)] = &[
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_seccomp, "seccomp"),
];

fn call_name(number: i64) -> &'static str {
    KNOWN_CALL_NAMES
        .get()
        .and_then(|names| {
            names
                .binary_search_by_key(&number, |(n, _)| *n)
                .ok()
                .and_then(|at| names.get(at))
        })
        .map_or("?", |(_, name)| name)
}

/// The SIGSYS part of siginfo_t (the kernel's `_sigsys` union member).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    #[cfg(target_pointer_width = "64")]
    padding: libc::c_int,
    call_address: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer for a message built inside a signal handler, where
/// allocating is not allowed.
struct StackLine {
    bytes: [u8; 320],
    len: usize,
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let end = self.len.saturating_add(text.len()).min(self.bytes.len());
        let room = end.saturating_sub(self.len);
        if let (Some(target), Some(source)) = (
            self.bytes.get_mut(self.len..end),
            text.as_bytes().get(..room),
        ) {
            target.copy_from_slice(source);
        }
        self.len = end;
        Ok(())
    }
}

extern "C" fn report_blocked_call(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    use std::fmt::Write;
    let number = blocked_call_number(info);
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|b| *b == 0).unwrap_or(0);
    let thread = std::str::from_utf8(name.get(..name_len).unwrap_or_default()).unwrap_or("?");
    let mut line = StackLine {
        bytes: [0; 320],
        len: 0,
    };
    // StackLine never fails; a message cut short still says what happened.
    if writeln!(
        line,
        "balloon-backend: seccomp: thread '{thread}' made system call {number} ({}), which its allow-list forbids; exiting with SIGSYS (see --seccomp in docs/balloon-backend.md)",
        call_name(number)
    )
    .is_err()
    {
        line.len = 0;
    }
    // SAFETY: write and raise are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        libc::raise(libc::SIGSYS);
    }
}

fn blocked_call_number(info: *mut libc::siginfo_t) -> i64 {
    if info.is_null() {
        return -1;
    }
    // SAFETY: the kernel passes a SIGSYS siginfo, whose layout SigsysInfo
    // mirrors; it is valid for the duration of the handler.
    let sigsys = unsafe { &*info.cast::<SigsysInfo>() };
    i64::from(sigsys.syscall)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(role: ThreadRole) -> Vec<&'static str> {
        allow_list(role).iter().map(|a| a.name).collect()
    }

    #[test]
    fn every_filter_compiles_in_both_modes() {
        for role in ThreadRole::ALL {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let program = filter(role, mode).unwrap();
                assert!(!program.is_empty(), "{role:?} {mode:?}");
            }
        }
        assert!(!enosys_companion().unwrap().is_empty());
    }

    #[test]
    fn no_thread_may_start_programs_open_files_or_make_sockets() {
        for role in ThreadRole::ALL {
            let names = names(role);
            for forbidden in [
                "execve",
                "execveat",
                "open",
                "openat",
                "openat2",
                "socket",
                "socketpair",
                "connect",
                "bind",
                "listen",
                "ptrace",
                "fork",
                "vfork",
                "kill",
                "mount",
                "memfd_create",
                "process_vm_writev",
                "pwrite64",
            ] {
                assert!(!names.contains(&forbidden), "{role:?} allows {forbidden}");
            }
        }
    }

    #[test]
    fn only_the_threads_that_need_them_get_the_dangerous_calls() {
        let with = |call: &str| -> Vec<ThreadRole> {
            ThreadRole::ALL
                .into_iter()
                .filter(|role| names(*role).contains(&call))
                .collect()
        };
        assert_eq!(with("unlinkat"), vec![ThreadRole::Signals]);
        assert_eq!(
            with("fallocate"),
            vec![ThreadRole::Vhost, ThreadRole::VringWorker]
        );
        assert_eq!(
            with("accept4"),
            vec![ThreadRole::Control, ThreadRole::Vhost]
        );
        assert_eq!(with("recvmsg"), vec![ThreadRole::Vhost]);
        for role in ThreadRole::ALL {
            for allowed in allow_list(role) {
                match allowed.name {
                    "fallocate" => assert_eq!(
                        allowed.limit,
                        ArgLimit::OneOf {
                            index: 1,
                            values: &[PUNCH_HOLE_KEEP_SIZE]
                        }
                    ),
                    "mmap" | "mprotect" => assert_eq!(
                        allowed.limit,
                        ArgLimit::BitsClear {
                            index: 2,
                            mask: PROT_EXEC
                        }
                    ),
                    "clone" => assert!(matches!(allowed.limit, ArgLimit::BitsSet { .. })),
                    _ => {}
                }
            }
        }
    }

    fn row(label: &str, calls: &[Allowed]) -> String {
        let mut names: Vec<&str> = calls.iter().map(|a| a.name).collect();
        names.sort_unstable();
        names.dedup();
        let names: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
        format!("| {label} | {} |", names.join(" "))
    }

    /// The rows of the allow-list table in docs/balloon-backend.md: what
    /// every thread may do, then what each role adds.
    fn documented_rows() -> Vec<String> {
        let common = runtime();
        let mut rows = vec![row("every thread", &common)];
        for role in ThreadRole::ALL {
            let extra: Vec<Allowed> = allow_list(role)
                .into_iter()
                .filter(|call| !common.iter().any(|c| c.name == call.name))
                .collect();
            rows.push(row(&format!("`{}`", role.name()), &extra));
        }
        rows.push(row("every thread, answered ENOSYS", &answered_enosys()));
        rows
    }

    #[test]
    fn the_documented_allow_lists_are_the_real_ones() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/balloon-backend.md");
        let docs = std::fs::read_to_string(path).unwrap();
        let rows = documented_rows();
        let missing: Vec<&String> = rows
            .iter()
            .filter(|row| !docs.lines().any(|line| line == row.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/balloon-backend.md must have these rows:\n{}",
            rows.join("\n")
        );
    }

    #[test]
    fn names_drop_the_sys_prefix() {
        assert!(names(ThreadRole::Signals).contains(&"read"));
        assert!(names(ThreadRole::Signals)
            .iter()
            .all(|n| !n.starts_with("SYS_")));
    }
}
