//! Guest-RAM-like memory for in-process tests: a memfd, and how much of a
//! file is really allocated.

use std::fs::File;

/// A memfd of `bytes`, as QEMU's memory-backend-memfd makes guest RAM.
pub fn memfd(name: &str, bytes: u64) -> std::io::Result<File> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(bytes)?;
    Ok(file)
}

/// Bytes allocated in `file` between `start` and `start + len`.
pub fn allocated(file: &File, start: u64, len: u64) -> std::io::Result<u64> {
    balloon_backend::host_memory::allocated_bytes(file, start, len)
}
