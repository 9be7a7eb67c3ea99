//! Harness for tests that boot a real Linux guest under a real QEMU with the
//! real `balloon-backend` binary: where the provisioned artefacts are, the
//! backend process and its control socket, the VM and its serial console,
//! and host-side measurement of guest RAM.

pub mod backend;
pub mod env;
pub mod host_policy_process;
pub mod memfd_residency;
pub mod migration;
pub mod qmp;
pub mod verifier;
pub mod vm;

use std::time::Duration;

use backend::ControlWaits;

pub const MIB: u64 = 1 << 20;

/// Deadline for the balloon to reach a target under TCG.
pub const TARGET_DEADLINE: Duration = Duration::from_secs(120);

/// How often the real-guest harness polls: a backend's `status` costs it
/// CPU (it measures guest RAM's file), and the device-CPU figures in
/// docs/performance.md are taken at this pace.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `probe` every `POLL_INTERVAL` until it returns `Some`, or fails
/// after `timeout` (see `test_support::wait`).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    test_support::wait::wait_for_every(what, timeout, POLL_INTERVAL, probe)
}

/// A backend process and a guest attached to it, in a private directory.
pub struct Stack {
    pub env: env::TestEnv,
    pub vm: vm::Vm,
    pub control: balloon_protocol::control::ControlClient,
    pub backend: backend::BackendProcess,
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// Starts the backend with `backend_args`, boots a guest of `mem_mib`
    /// (adjusted by `tweak`), and waits for the driver to negotiate.
    pub fn start(
        mem_mib: u64,
        backend_args: &[&str],
        tweak: impl FnOnce(&mut vm::VmConfig),
    ) -> anyhow::Result<Stack> {
        let env = env::TestEnv::load()?;
        let dir = tempfile::tempdir()?;
        let backend = backend::BackendProcess::start(&env, dir.path(), backend_args)?;
        let mut config = vm::VmConfig::with_backend(mem_mib, backend.socket.clone());
        tweak(&mut config);
        let vm = vm::Vm::boot(&env, &config)?;
        let mut control = backend.client()?;
        control.wait_negotiated(Duration::from_secs(60))?;
        Ok(Stack {
            env,
            vm,
            control,
            backend,
            dir,
        })
    }
}
