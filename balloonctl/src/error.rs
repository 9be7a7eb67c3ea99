//! What can go wrong, each with its own exit code (documented in
//! docs/balloonctl.md).

use std::path::PathBuf;

use balloon_protocol::control::ControlError;
use balloon_protocol::lines::LineError;

use crate::size::SizeError;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("no VM named {name:?} in {searched} (known: {known})")]
    UnknownVm {
        name: String,
        searched: String,
        known: String,
    },
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("{vm}: cannot reach its backend at {}: {reason}", path.display())]
    Unreachable {
        vm: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{vm}: permission denied at {}: run balloonctl as the backend's user or as root ({reason})", path.display())]
    Permission {
        vm: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{vm}: the backend refused: {message}")]
    Refused { vm: String, message: String },
    #[error("{vm}: the balloon reached {actual} of {target} within {waited_s} s; the guest is still working on it (`balloonctl status {vm}` shows how far)")]
    Timeout {
        vm: String,
        actual: String,
        target: String,
        waited_s: u64,
    },
    #[error("{0}")]
    Other(String),
}

impl CtlError {
    /// The process's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Refused { .. } | CtlError::Other(_) => 1,
            CtlError::Size(_) => 2,
            CtlError::UnknownVm { .. } => 3,
            CtlError::Unreachable { .. } => 4,
            CtlError::Permission { .. } => 5,
            CtlError::Timeout { .. } => 6,
        }
    }

    /// A control-socket failure of `vm` at `path`, by kind.
    pub fn from_control(vm: &str, path: &std::path::Path, error: ControlError) -> CtlError {
        let vm = vm.to_string();
        let path = path.to_path_buf();
        match error {
            ControlError::Line(LineError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                CtlError::Permission {
                    vm,
                    path,
                    reason: source.to_string(),
                }
            }
            ControlError::Refused { message, .. }
                if message.starts_with("refused: not the backend's user") =>
            {
                CtlError::Permission {
                    vm,
                    path,
                    reason: message,
                }
            }
            ControlError::Refused { message, .. } => CtlError::Refused { vm, message },
            ControlError::Line(error) => CtlError::Unreachable {
                vm,
                path,
                reason: error.to_string(),
            },
            ControlError::Reply { .. } => CtlError::Unreachable {
                vm,
                path,
                reason: error.to_string(),
            },
        }
    }
}
