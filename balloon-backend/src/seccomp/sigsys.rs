//! The report of a trapped call: a SIGSYS handler that names the thread
//! and the call in one line on stderr before the process dies, using only
//! async-signal-safe calls and no allocation.

use std::io;

use super::allow_lists::{allow_list, ThreadRole};
use super::filter::SeccompError;

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
