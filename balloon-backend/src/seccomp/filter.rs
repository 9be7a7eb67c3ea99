//! Turns an allow-list into a BPF program (seccompiler) and installs it
//! on the calling thread.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::allow_lists::{allow_list, answered_enosys, ArgLimit, ThreadRole};
use super::SeccompMode;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
