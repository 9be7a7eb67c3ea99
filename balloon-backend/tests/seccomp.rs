//! The filters bite: a process that has installed a thread's filter and
//! then makes a call outside its allow-list dies of SIGSYS, with one line
//! naming the thread and the call. Each case runs in a child process (this
//! test binary run again, selecting `confined_child`), because a filter
//! cannot be taken off again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use balloon_backend::seccomp::{self, SeccompMode, ThreadRole};

const CHILD_ENV: &str = "BALLOON_SECCOMP_CHILD";
/// The name of the child's confined thread, which the SIGSYS line must give.
const CHILD_THREAD: &str = "bite-test";

/// Runs `confined_child` in a new process as `role` under `mode`, making `call`.
fn run_child(role: ThreadRole, mode: SeccompMode, call: &str) -> Output {
    let mode = match mode {
        SeccompMode::Enforce => "enforce",
        SeccompMode::Log => "log",
        SeccompMode::Off => "off",
    };
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .args(["--exact", "confined_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{}:{mode}:{call}", role.name()))
        .output()
        .expect("running the child")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_killed_naming(output: &Output, call: &str) {
    let text = stderr(output);
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGSYS),
        "status {:?}, stderr: {text}",
        output.status
    );
    let line = text
        .lines()
        .find(|line| line.contains("seccomp: thread"))
        .unwrap_or_else(|| panic!("no seccomp line in: {text}"));
    assert!(
        line.contains(&format!("({call})")) && line.contains(&format!("thread '{CHILD_THREAD}'")),
        "{line}"
    );
    assert!(
        text.contains("confined"),
        "the child died before confining itself: {text}"
    );
}

#[test]
fn a_forbidden_call_kills_every_kind_of_thread_with_sigsys() {
    for role in ThreadRole::ALL {
        let output = run_child(role, SeccompMode::Enforce, "socket");
        assert_killed_naming(&output, "socket");
    }
}

#[test]
fn fallocate_is_allowed_only_to_punch_holes() {
    let punch = run_child(ThreadRole::VringWorker, SeccompMode::Enforce, "punch");
    assert_eq!(punch.status.code(), Some(0), "{}", stderr(&punch));
    assert!(stderr(&punch).contains("punched"), "{}", stderr(&punch));
    let allocate = run_child(ThreadRole::VringWorker, SeccompMode::Enforce, "allocate");
    assert_killed_naming(&allocate, "fallocate");
    // The control thread may not touch guest RAM's files at all.
    let control = run_child(ThreadRole::Control, SeccompMode::Enforce, "punch");
    assert_killed_naming(&control, "fallocate");
}

#[test]
fn opening_a_file_fails_with_enosys_instead_of_killing() {
    let output = run_child(ThreadRole::Vhost, SeccompMode::Enforce, "open");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("open failed: {}", libc::ENOSYS)),
        "{}",
        stderr(&output)
    );
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    let output = run_child(ThreadRole::Signals, SeccompMode::Log, "socket");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("socket made"),
        "{}",
        stderr(&output)
    );
}

/// The child's side; does nothing unless started by `run_child`.
#[test]
#[ignore = "run by the other tests in a child process"]
fn confined_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split(':');
    let (Some(role), Some(mode), Some(call)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {CHILD_ENV}: {spec}");
    };
    let role = ThreadRole::ALL
        .into_iter()
        .find(|r| r.name() == role)
        .expect("known role");
    let mode = match mode {
        "enforce" => SeccompMode::Enforce,
        "log" => SeccompMode::Log,
        _ => panic!("mode {mode}"),
    };
    let call = call.to_string();
    let confined = std::thread::Builder::new()
        .name(CHILD_THREAD.into())
        .spawn(move || confined_thread(role, mode, &call))
        .expect("starting the confined thread");
    // The thread exits the process; only a panic comes back.
    if confined.join().is_err() {
        std::process::exit(2);
    }
}

fn confined_thread(role: ThreadRole, mode: SeccompMode, call: &str) {
    // Made before confinement: files cannot be opened afterwards.
    let file = tempfile::tempfile().expect("temporary file");
    let len = 1024 * 1024;
    file.set_len(len).expect("sizing the file");
    seccomp::install_sigsys_reporter().expect("reporter");
    seccomp::confine_current_thread(role, mode).expect("confining");
    eprintln!("confined as {}", role.name());
    match call {
        "socket" => {
            // SAFETY: socket has no memory-safety preconditions.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            eprintln!("socket made: {fd}");
        }
        "punch" | "allocate" => {
            use std::os::fd::AsRawFd;
            let mode = if call == "punch" {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                0
            };
            // SAFETY: fallocate on our own file descriptor.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, 4096) };
            assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
            eprintln!("punched");
        }
        "open" => match std::fs::File::open("/etc/hostname") {
            Ok(_) => eprintln!("open succeeded"),
            Err(error) => eprintln!("open failed: {}", error.raw_os_error().unwrap_or(0)),
        },
        other => panic!("call {other}"),
    }
    // Leave before the test harness does anything the filter forbids.
    std::process::exit(0);
}
