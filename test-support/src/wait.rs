//! Waiting for a condition with a deadline, never a fixed sleep.

use std::time::{Duration, Instant};

/// How often `wait_for` asks its probe again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `probe` every `POLL_INTERVAL` until it returns `Some`, or fails
/// after `timeout` naming `what` it waited for. An error from the probe
/// ends the wait at once.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    wait_for_every(what, timeout, POLL_INTERVAL, probe)
}

/// `wait_for` with its own polling interval, for probes that cost the
/// process they ask (a backend's `status` walks guest RAM's file).
pub fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    poll_every: Duration,
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
        std::thread::sleep(poll_every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_or_names_what_it_waited_for() {
        let mut calls = 0;
        let value = wait_for("the third call", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        });
        assert_eq!(value.ok(), Some(3));
        let error = wait_for("nothing", Duration::from_millis(50), || Ok(None::<()>));
        let message = error.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("waiting for nothing"), "{message}");
        let failed = wait_for("a probe error", Duration::from_secs(5), || {
            anyhow::bail!("probe broke") as anyhow::Result<Option<()>>
        });
        assert!(failed.is_err());
    }
}
