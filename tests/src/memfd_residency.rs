//! Host-side measurement: how much of a QEMU process's guest RAM is really
//! allocated, read from its memfd through /proc, independently of the
//! backend's own accounting.

use std::fs::File;
use std::path::PathBuf;

use anyhow::Context;

/// The memfd backing guest RAM in process `pid`: its largest memfd.
pub fn guest_ram_memfd(pid: u32) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if best.as_ref().is_none_or(|(s, _)| size > *s) {
            best = Some((size, path));
        }
    }
    best.map(|(_, path)| path)
        .with_context(|| format!("no memfd among the descriptors of process {pid}"))
}

/// Bytes allocated in a file (the walk over its data extents that the
/// backend's own `status` uses, applied to QEMU's descriptor).
pub fn allocated_bytes(path: &PathBuf) -> anyhow::Result<u64> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let end = file.metadata()?.len();
    test_support::memory::allocated(&file, 0, end)
        .with_context(|| format!("walking the extents of {}", path.display()))
}
