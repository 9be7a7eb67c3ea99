//! Cooperative reclaim: drop page cache on the host's request, so that a
//! later inflate takes cold cache rather than warm anonymous memory.
//!
//! With cgroup v2, bytes are written to the root `memory.reclaim` (Linux
//! 5.19+), which reclaims about that much. Without it the fallback is
//! `vm.drop_caches = 1`, which drops all clean page cache: coarser, but it
//! only discards what can be read back.

use std::io::Write;
use std::path::Path;

use balloon_protocol::agent::ReclaimOutcome;

use crate::report::{meminfo, Sources};

#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error("neither {cgroup} nor {drop_caches} could be written: {source}")]
    Unavailable {
        cgroup: String,
        drop_caches: String,
        source: std::io::Error,
    },
}

/// Reclaims about `bytes` of page cache; reports the method and the page
/// cache before and after.
pub fn reclaim(sources: &Sources, bytes: u64) -> Result<ReclaimOutcome, ReclaimError> {
    let before = meminfo(sources).page_cache_bytes;
    let knob = sources.cgroup_dir.join("memory.reclaim");
    let method = match write_knob(&knob, &bytes.to_string()) {
        // EAGAIN: the kernel reclaimed less than asked; what it got is kept.
        Ok(()) => "memory.reclaim",
        Err(error) if error.raw_os_error() == Some(libc::EAGAIN) => "memory.reclaim (partial)",
        Err(_) => {
            let drop_caches = sources.proc_dir.join("sys/vm/drop_caches");
            write_knob(&drop_caches, "1").map_err(|source| ReclaimError::Unavailable {
                cgroup: knob.display().to_string(),
                drop_caches: drop_caches.display().to_string(),
                source,
            })?;
            "drop_caches"
        }
    };
    let after = meminfo(sources).page_cache_bytes;
    Ok(ReclaimOutcome {
        method: method.to_string(),
        requested_bytes: bytes,
        page_cache_before_bytes: before,
        page_cache_after_bytes: after,
        reclaimed_bytes: before.saturating_sub(after),
    })
}

fn write_knob(path: &Path, value: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}
