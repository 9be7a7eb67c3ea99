//! Which system calls each thread role may make, with the limits on their
//! arguments: data only, compiled into filters by `filter`.

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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(role: ThreadRole) -> Vec<&'static str> {
        allow_list(role).iter().map(|a| a.name).collect()
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
