//! Host-side measurement: how much of a QEMU process's guest RAM is really
//! allocated, read from its memfd through /proc, independently of the
//! backend's own accounting.

use std::fs::File;
use std::path::PathBuf;

use anyhow::Context;
use vmm_sys_util::seek_hole::SeekHole;

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

/// Bytes allocated in a file, by walking its data extents.
pub fn allocated_bytes(path: &PathBuf) -> anyhow::Result<u64> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let end = file.metadata()?.len();
    let mut total = 0;
    let mut position = 0;
    while position < end {
        let Some(data) = file.seek_data(position)? else {
            break;
        };
        let hole = file.seek_hole(data)?.unwrap_or(end).min(end);
        total += hole.saturating_sub(data);
        position = hole.max(data + 1);
    }
    Ok(total)
}
