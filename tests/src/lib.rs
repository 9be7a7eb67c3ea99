//! Harness for tests that boot a real Linux guest under a real QEMU with the
//! real `balloon-backend` binary: where the provisioned artefacts are, the
//! backend process and its control socket, the VM and its serial console,
//! and host-side measurement of guest RAM.

pub mod backend;
pub mod env;
pub mod host;
pub mod vm;

use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// Polls `probe` until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
