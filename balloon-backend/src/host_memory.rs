//! Guest RAM as files on the host: where each region lives in its memory
//! file, how to give a range back to the host, and how much is resident.
//!
//! `madvise(MADV_DONTNEED)` frees nothing on a shared file mapping, so memory
//! is returned with `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the region's file.
//! A punched page reads back as zeros, which is what the guest expects.

use std::fs::File;
use std::io;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};
use vmm_sys_util::seek_hole::SeekHole;

use crate::pfn::{ByteRun, RamRegion, PAGE_SIZE_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum HostMemoryError {
    #[error("guest RAM region at {gpa:#x} is not backed by a file; use a memfd or hugetlbfs memory backend with share=on")]
    NotFileBacked { gpa: u64 },
    #[error("cannot read the page size of guest RAM region at {gpa:#x}: {source}")]
    PageSize { gpa: u64, source: io::Error },
    #[error("range {offset_bytes:#x}+{len_bytes:#x} is outside region {region}")]
    OutsideRegion {
        region: usize,
        offset_bytes: u64,
        len_bytes: u64,
    },
    #[error("punching a hole at file offset {file_offset:#x} ({len_bytes} bytes): {source}")]
    Punch {
        file_offset: u64,
        len_bytes: u64,
        source: io::Error,
    },
    #[error("measuring resident memory: {0}")]
    Seek(io::Error),
}

/// One region of guest RAM and where it lives on the host.
#[derive(Clone, Debug)]
struct BackedRegion {
    ram: RamRegion,
    file: Arc<File>,
    file_offset: u64,
    host_page_bytes: u64,
}

/// How residency is measured. When guest RAM covers its files exactly (as
/// QEMU's memory backends do), a file's allocated blocks are guest RAM's:
/// one `statx` per file, whatever the RAM size. Otherwise (a file with other
/// data in it) each region's data and holes are walked.
#[derive(Clone, Debug, Default)]
enum Residency {
    WholeFiles(Vec<Arc<File>>),
    #[default]
    Walk,
}

/// Guest RAM as the device sees it after SET_MEM_TABLE. Cloning shares the
/// files (cheap), so slow measurements can run without the device lock.
#[derive(Clone, Debug, Default)]
pub struct GuestRam {
    regions: Vec<BackedRegion>,
    residency: Residency,
}

impl GuestRam {
    pub fn from_memory<B: Bitmap>(memory: &GuestMemoryMmap<B>) -> Result<Self, HostMemoryError> {
        let mut regions = Vec::new();
        for region in memory.iter() {
            let gpa = region.start_addr().0;
            let file_offset = region
                .file_offset()
                .ok_or(HostMemoryError::NotFileBacked { gpa })?;
            let host_page_bytes = block_size(file_offset.file())
                .map_err(|source| HostMemoryError::PageSize { gpa, source })?;
            regions.push(BackedRegion {
                ram: RamRegion {
                    start_gpa: gpa,
                    size_bytes: region.len(),
                },
                file: file_offset.arc().clone(),
                file_offset: file_offset.start(),
                host_page_bytes,
            });
        }
        let residency = whole_files(&regions).map_or(Residency::Walk, Residency::WholeFiles);
        Ok(GuestRam { regions, residency })
    }

    pub fn layout(&self) -> Vec<RamRegion> {
        self.regions.iter().map(|r| r.ram).collect()
    }

    /// (size, host page size) per region, for the balloon tracker.
    pub fn tracker_regions(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.ram.size_bytes, r.host_page_bytes))
            .collect()
    }

    /// (start, size, host page size) per region: what a saved state must
    /// match to be taken over.
    pub fn shape(&self) -> Vec<(u64, u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.ram.start_gpa, r.ram.size_bytes, r.host_page_bytes))
            .collect()
    }

    /// (device, inode) of each region's memory file; (0, 0) where the file
    /// cannot be read (it then matches nothing real).
    pub fn file_identities(&self) -> Vec<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.regions
            .iter()
            .map(|r| r.file.metadata().map_or((0, 0), |m| (m.dev(), m.ino())))
            .collect()
    }

    /// Whether `other` is the same guest RAM: the same regions in the same
    /// files (QEMU sends its memory table again on every device start).
    pub fn same_ram_as(&self, other: &GuestRam) -> bool {
        !self.regions.is_empty()
            && self.shape() == other.shape()
            && self.file_identities() == other.file_identities()
            && self
                .regions
                .iter()
                .zip(&other.regions)
                .all(|(a, b)| a.file_offset == b.file_offset)
    }

    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.ram.size_bytes).sum()
    }

    /// Host page size of a region (4 KiB for memfd, larger for hugetlbfs).
    pub fn host_page_bytes(&self, region: usize) -> u64 {
        self.regions
            .get(region)
            .map_or(PAGE_SIZE_BYTES, |r| r.host_page_bytes)
    }

    /// Returns a range of a region to the host. The range is checked against
    /// the region, so nothing outside guest RAM can ever be freed.
    pub fn discard(&self, run: &ByteRun) -> Result<(), HostMemoryError> {
        let outside = || HostMemoryError::OutsideRegion {
            region: run.region,
            offset_bytes: run.offset_bytes,
            len_bytes: run.len_bytes,
        };
        let region = self.regions.get(run.region).ok_or_else(outside)?;
        let end = run
            .offset_bytes
            .checked_add(run.len_bytes)
            .ok_or_else(outside)?;
        if end > region.ram.size_bytes || run.len_bytes == 0 {
            return Err(outside());
        }
        let file_offset = region.file_offset + run.offset_bytes;
        punch_hole(&region.file, file_offset, run.len_bytes).map_err(|source| {
            HostMemoryError::Punch {
                file_offset,
                len_bytes: run.len_bytes,
                source,
            }
        })
    }

    /// Bytes of guest RAM that are allocated on the host right now.
    pub fn resident_bytes(&self) -> Result<u64, HostMemoryError> {
        match &self.residency {
            Residency::WholeFiles(files) => files
                .iter()
                .map(|file| allocated_blocks_bytes(file))
                .sum::<io::Result<u64>>(),
            Residency::Walk => self
                .regions
                .iter()
                .map(|r| allocated_bytes(&r.file, r.file_offset, r.ram.size_bytes))
                .sum::<io::Result<u64>>(),
        }
        .map_err(HostMemoryError::Seek)
    }
}

/// One handle per distinct file when the regions cover every file exactly
/// (no gap, no overlap, nothing past the end); None otherwise.
fn whole_files(regions: &[BackedRegion]) -> Option<Vec<Arc<File>>> {
    use std::os::unix::fs::MetadataExt;
    /// One distinct file and the (offset, size) ranges regions map of it.
    struct MappedFile {
        device_inode: (u64, u64),
        handle: Arc<File>,
        len: u64,
        ranges: Vec<(u64, u64)>,
    }
    let mut files: Vec<MappedFile> = Vec::new();
    for region in regions {
        let meta = region.file.metadata().ok()?;
        let device_inode = (meta.dev(), meta.ino());
        let range = (region.file_offset, region.ram.size_bytes);
        match files.iter_mut().find(|f| f.device_inode == device_inode) {
            Some(file) => file.ranges.push(range),
            None => files.push(MappedFile {
                device_inode,
                handle: region.file.clone(),
                len: meta.len(),
                ranges: vec![range],
            }),
        }
    }
    let mut handles = Vec::new();
    for MappedFile {
        handle,
        len,
        mut ranges,
        ..
    } in files
    {
        ranges.sort_unstable();
        let mut covered_to = 0u64;
        for (offset, size) in ranges {
            if offset != covered_to {
                return None;
            }
            covered_to = offset.checked_add(size)?;
        }
        if covered_to != len {
            return None;
        }
        handles.push(handle);
    }
    Some(handles)
}

/// Bytes allocated to a file (its blocks), never more than its length.
fn allocated_blocks_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok(meta.blocks().saturating_mul(512).min(meta.len()))
}

/// The file's block size: the host page size for shmem and hugetlbfs files.
fn block_size(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blksize().max(PAGE_SIZE_BYTES))
}

/// Frees `len` bytes of `file` at `offset`, keeping its size.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, FallocateMode::PunchHole, true, offset, len)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Bytes allocated in `file` between `start` and `start + len`.
pub fn allocated_bytes(file: &File, start: u64, len: u64) -> io::Result<u64> {
    // A duplicate descriptor: seeking needs `&mut File`, and the file
    // position is shared, which nothing else here relies on.
    let mut file = file.try_clone()?;
    let end = start + len;
    let mut total = 0;
    let mut position = start;
    while position < end {
        let Some(data) = file.seek_data(position)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = file.seek_hole(data)?.unwrap_or(end).min(end);
        total += hole - data;
        position = hole;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn ram(file: &File, ranges: &[(u64, u64, u64)]) -> GuestRam {
        use vm_memory::{FileOffset, GuestAddress};
        let memory = GuestMemoryMmap::<()>::from_ranges_with_files(ranges.iter().map(
            |&(gpa, len, offset)| {
                (
                    GuestAddress(gpa),
                    len as usize,
                    Some(FileOffset::new(file.try_clone().unwrap(), offset)),
                )
            },
        ))
        .unwrap();
        GuestRam::from_memory(&memory).unwrap()
    }

    #[test]
    fn residency_of_whole_files_is_read_from_their_blocks() {
        let page = 4096;
        // A memfd, as QEMU's guest RAM is: shmem counts blocks exactly.
        // SAFETY: the name is a valid C string; the new descriptor is owned
        // by the File at once.
        let file = unsafe {
            use std::os::fd::FromRawFd;
            let fd = libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            File::from_raw_fd(fd)
        };
        file.set_len(64 * page).unwrap();
        file.write_all_at(&vec![0xa5u8; 40 * page as usize], 0)
            .unwrap();
        // Two regions covering the file exactly: blocks.
        let whole = ram(&file, &[(0, 32 * page, 0), (1 << 30, 32 * page, 32 * page)]);
        assert!(matches!(whole.residency, Residency::WholeFiles(ref f) if f.len() == 1));
        // A gap in the file: walked.
        let partial = ram(&file, &[(0, 16 * page, 0), (1 << 30, 16 * page, 48 * page)]);
        assert!(matches!(partial.residency, Residency::Walk));
        for punched in [1, 8, 24] {
            punch_hole(&file, 0, punched * page).unwrap();
            let walked = allocated_bytes(&file, 0, 64 * page).unwrap();
            assert_eq!(whole.resident_bytes().unwrap(), walked, "punched {punched}");
            assert_eq!(
                partial.resident_bytes().unwrap(),
                allocated_bytes(&file, 0, 16 * page).unwrap()
                    + allocated_bytes(&file, 48 * page, 16 * page).unwrap()
            );
        }
    }

    #[test]
    fn punching_frees_exactly_the_range() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&vec![0xa5u8; 64 * 4096], 0).unwrap();
        assert_eq!(allocated_bytes(&file, 0, 64 * 4096).unwrap(), 64 * 4096);
        punch_hole(&file, 8 * 4096, 16 * 4096).unwrap();
        assert_eq!(allocated_bytes(&file, 0, 64 * 4096).unwrap(), 48 * 4096);
        assert_eq!(allocated_bytes(&file, 8 * 4096, 16 * 4096).unwrap(), 0);
        let mut page = vec![1u8; 4096];
        file.read_exact_at(&mut page, 8 * 4096).unwrap();
        assert!(page.iter().all(|b| *b == 0));
        file.read_exact_at(&mut page, 24 * 4096).unwrap();
        assert!(page.iter().all(|b| *b == 0xa5));
    }
}
