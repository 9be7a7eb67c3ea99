//! The state file (`--state-file`): the balloon's bitmap and the device's
//! settings kept in a file mapped into the backend (`MAP_SHARED`), so that
//! a backend restarted under a running guest (a crash, `systemctl
//! restart`) takes the balloon over exactly as it was.
//!
//! Nothing is written behind: the tracker's page bits live in the mapping
//! itself, so an inflate or deflate is in the file (the kernel's page cache)
//! the moment the device records it, before the guest's request completes.
//! A SIGKILL cannot lose it; only the host's own crash can, and that takes
//! the guest with it. A stale bitmap, which could let a deferred punch span
//! pages the guest took back, cannot arise.
//!
//! Layout, in native-endian u64 words (the file never leaves this host):
//! a header page (magic, layout version, a valid flag, the region count,
//! the 16-byte config space, the pin, the reported-bytes counter, then per
//! region its start, size, host page size, memory file identity and the
//! offset and length of its bits), then the bits of every region. The
//! valid flag is cleared while the regions are laid out anew and set once
//! they are, so a crash in between leaves a file that is not taken over.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

/// "BLNSTATE", read as a little-endian u64.
const MAGIC: u64 = u64::from_le_bytes(*b"BLNSTATE");
/// The layout this build writes and reads; another layout is not taken over.
pub const LAYOUT_VERSION: u64 = 1;
/// The header takes one 4 KiB page.
const HEADER_WORDS: usize = 512;
const WORD_MAGIC: usize = 0;
const WORD_VERSION: usize = 1;
const WORD_VALID: usize = 2;
const WORD_REGIONS: usize = 3;
const WORD_CONFIG: usize = 4; // and 5
const WORD_PINNED: usize = 6;
const WORD_REPORTED: usize = 7;
const WORD_TABLE: usize = 8;
/// start, size, host page size, device, inode, bits offset, bits length.
const REGION_WORDS: usize = 7;
/// Regions the header has room for (QEMU sends at most a few dozen).
pub const MAX_REGIONS: usize = (HEADER_WORDS - WORD_TABLE) / REGION_WORDS;
/// Guest RAM the file has room for: 16 TiB, one bit per 4 KiB page.
pub const MAX_KEPT_RAM_BYTES: u64 = 16 << 40;
/// The file's size, set once when it is opened (before the backend
/// confines itself, so no thread needs `ftruncate` later, a call that
/// could also shrink guest RAM's files). It is sparse: only the header and
/// the bits of the guest RAM it describes take memory or disk.
pub const FILE_BYTES: u64 =
    (HEADER_WORDS as u64) * 8 + MAX_KEPT_RAM_BYTES / crate::pfn::PAGE_SIZE_BYTES / 8;

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("--state-file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("--state-file {path}: mapping it: {source}")]
    Map {
        path: PathBuf,
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// One region of guest RAM as the state file records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptRegion {
    pub start_gpa: u64,
    pub size_bytes: u64,
    pub host_page_bytes: u64,
    /// (device, inode) of its memory file.
    pub file: (u64, u64),
}

impl KeptRegion {
    /// Words of page bits the region needs (one bit per 4 KiB page).
    pub fn bit_words(&self) -> u64 {
        (self.size_bytes / crate::pfn::PAGE_SIZE_BYTES).div_ceil(64)
    }
}

/// The device's settings the file keeps beside the bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeptSettings {
    pub config: [u8; 16],
    pub pinned: bool,
    pub reported_bytes_total: u64,
}

/// The mapped file. Its header is read and written only through it; the
/// bits are handed out as `KeptBits`, one per region, never two over the
/// same words.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    map: Arc<MmapRegion<()>>,
}

/// One region's page bits inside the state file's mapping.
#[derive(Debug)]
pub struct KeptBits {
    map: Arc<MmapRegion<()>>,
    first_word: usize,
    words: usize,
}

impl Deref for KeptBits {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        // SAFETY: `StateFile::bits` made this range inside the mapping
        // (checked against its size), 8-byte aligned (the mapping is
        // page-aligned), past the header, and disjoint from every other
        // KeptBits alive; the mapping lives as long as `self.map`.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().cast::<u64>().add(self.first_word),
                self.words,
            )
        }
    }
}

impl DerefMut for KeptBits {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `deref`; `&mut self` is the only way to these words,
        // since no other KeptBits or header access covers them.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.map.as_ptr().cast::<u64>().add(self.first_word),
                self.words,
            )
        }
    }
}

fn map_file(path: &Path, file: &File, bytes: usize) -> Result<MmapRegion<()>, StateFileError> {
    let file = file.try_clone().map_err(|source| StateFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    MmapRegion::from_file(FileOffset::new(file, 0), bytes).map_err(|source| StateFileError::Map {
        path: path.to_path_buf(),
        source,
    })
}

impl StateFile {
    /// Opens (creating, mode 0600) and maps the state file; what it holds
    /// is taken over later, when guest RAM arrives (`take_over`).
    pub fn open(path: &Path) -> Result<Self, StateFileError> {
        let open_error = |source| StateFileError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(open_error)?;
        let length = file.metadata().map_err(open_error)?.len();
        if length < FILE_BYTES {
            file.set_len(FILE_BYTES).map_err(open_error)?;
        }
        let bytes = usize::try_from(length.max(FILE_BYTES))
            .map_err(|_| open_error(io::Error::from(io::ErrorKind::FileTooLarge)))?;
        let map = Arc::new(map_file(path, &file, bytes)?);
        Ok(StateFile {
            path: path.to_path_buf(),
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn mapped_words(&self) -> usize {
        self.map.size() / 8
    }

    fn word(&self, index: usize) -> u64 {
        if index >= HEADER_WORDS.min(self.mapped_words()) {
            return 0;
        }
        // SAFETY: `index` is inside the header, which is mapped (checked
        // above) and never handed out as KeptBits.
        unsafe { self.map.as_ptr().cast::<u64>().add(index).read_volatile() }
    }

    fn set_word(&mut self, index: usize, value: u64) {
        if index >= HEADER_WORDS.min(self.mapped_words()) {
            return;
        }
        // SAFETY: as in `word`; `&mut self` serialises header writes.
        unsafe {
            self.map
                .as_ptr()
                .cast::<u64>()
                .add(index)
                .write_volatile(value)
        }
    }

    /// The regions a valid file describes; None for a new, cleared,
    /// half-written or foreign file.
    pub fn kept_regions(&self) -> Option<Vec<KeptRegion>> {
        if self.word(WORD_MAGIC) != MAGIC
            || self.word(WORD_VERSION) != LAYOUT_VERSION
            || self.word(WORD_VALID) != 1
        {
            return None;
        }
        let count = usize::try_from(self.word(WORD_REGIONS)).ok()?;
        if count > MAX_REGIONS {
            return None;
        }
        let mut next_word = HEADER_WORDS as u64;
        let mut regions = Vec::with_capacity(count);
        for index in 0..count {
            let at = WORD_TABLE + index * REGION_WORDS;
            let region = KeptRegion {
                start_gpa: self.word(at),
                size_bytes: self.word(at + 1),
                host_page_bytes: self.word(at + 2),
                file: (self.word(at + 3), self.word(at + 4)),
            };
            // Bits are laid out back to back, and host pages are whole
            // powers of two inside the region; anything else is not ours.
            let page = region.host_page_bytes;
            if self.word(at + 5) != next_word
                || self.word(at + 6) != region.bit_words()
                || !page.is_power_of_two()
                || page < crate::pfn::PAGE_SIZE_BYTES
                || !region.size_bytes.is_multiple_of(page)
            {
                return None;
            }
            next_word = next_word.checked_add(region.bit_words())?;
            regions.push(region);
        }
        (next_word <= self.mapped_words() as u64).then_some(regions)
    }

    /// The settings the file holds (meaningful when `kept_regions` is).
    pub fn kept_settings(&self) -> KeptSettings {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.word(WORD_CONFIG).to_le_bytes());
        config[8..].copy_from_slice(&self.word(WORD_CONFIG + 1).to_le_bytes());
        KeptSettings {
            config,
            pinned: self.word(WORD_PINNED) == 1,
            reported_bytes_total: self.word(WORD_REPORTED),
        }
    }

    /// Records the settings (a few stores into the mapping).
    pub fn keep_settings(&mut self, settings: &KeptSettings) {
        let (low, high) = settings.config.split_at(8);
        let word = |bytes: &[u8]| {
            let mut array = [0u8; 8];
            array.copy_from_slice(bytes);
            u64::from_le_bytes(array)
        };
        self.set_word(WORD_CONFIG, word(low));
        self.set_word(WORD_CONFIG + 1, word(high));
        self.set_word(WORD_PINNED, u64::from(settings.pinned));
        self.set_word(WORD_REPORTED, settings.reported_bytes_total);
    }

    /// Page bits over the words the file holds for `regions`, when it
    /// describes exactly those regions; the caller must have dropped every
    /// KeptBits it was given before (None otherwise).
    pub fn take_over(&mut self, regions: &[KeptRegion]) -> Option<Vec<KeptBits>> {
        if self.kept_regions().as_deref() != Some(regions) {
            return None;
        }
        self.bits(regions)
    }

    /// Lays the file out for `regions` with no page ballooned and default
    /// settings, and returns their page bits; None (and a cleared file)
    /// when the file has no room for them (more than `MAX_REGIONS`
    /// regions, more than `MAX_KEPT_RAM_BYTES`) or KeptBits handed out
    /// before are still alive.
    pub fn lay_out(&mut self, regions: &[KeptRegion]) -> Option<Vec<KeptBits>> {
        self.forget();
        if regions.len() > MAX_REGIONS || Arc::strong_count(&self.map) != 1 {
            return None;
        }
        let mut next_word = HEADER_WORDS as u64;
        for (index, region) in regions.iter().enumerate() {
            let at = WORD_TABLE + index * REGION_WORDS;
            for (offset, value) in [
                region.start_gpa,
                region.size_bytes,
                region.host_page_bytes,
                region.file.0,
                region.file.1,
                next_word,
                region.bit_words(),
            ]
            .into_iter()
            .enumerate()
            {
                self.set_word(at + offset, value);
            }
            next_word += region.bit_words();
        }
        self.set_word(WORD_REGIONS, regions.len() as u64);
        self.keep_settings(&KeptSettings::default());
        let mut bits = self.bits(regions)?;
        for region_bits in &mut bits {
            region_bits.fill(0);
        }
        self.set_word(WORD_MAGIC, MAGIC);
        self.set_word(WORD_VERSION, LAYOUT_VERSION);
        self.set_word(WORD_VALID, 1);
        Some(bits)
    }

    /// Marks the file as holding no state (the guest went away).
    pub fn forget(&mut self) {
        self.set_word(WORD_VALID, 0);
    }

    /// The bits of each region, back to back after the header.
    fn bits(&self, regions: &[KeptRegion]) -> Option<Vec<KeptBits>> {
        if Arc::strong_count(&self.map) != 1 {
            return None;
        }
        let mut first_word = HEADER_WORDS;
        let mut all = Vec::with_capacity(regions.len());
        for region in regions {
            let words = usize::try_from(region.bit_words()).ok()?;
            let end = first_word.checked_add(words)?;
            if end > self.mapped_words() {
                return None;
            }
            all.push(KeptBits {
                map: self.map.clone(),
                first_word,
                words,
            });
            first_word = end;
        }
        Some(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(size_mib: u64, inode: u64) -> KeptRegion {
        KeptRegion {
            start_gpa: 0,
            size_bytes: size_mib << 20,
            host_page_bytes: 4096,
            file: (9, inode),
        }
    }

    #[test]
    fn bits_written_are_there_for_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let regions = [
            region(8, 1),
            KeptRegion {
                start_gpa: 1 << 32,
                ..region(2, 2)
            },
        ];
        let settings = KeptSettings {
            config: [7; 16],
            pinned: true,
            reported_bytes_total: 12345,
        };
        {
            let mut file = StateFile::open(&path).unwrap();
            assert_eq!(file.kept_regions(), None, "a new file holds no state");
            let mut bits = file.lay_out(&regions).unwrap();
            assert_eq!(bits.len(), 2);
            assert_eq!((bits[0].len(), bits[1].len()), (32, 8));
            bits[0][3] = 0xf0;
            bits[1][7] = 1;
            file.keep_settings(&settings);
            // A second set of bits while these live would alias them.
            assert!(file.take_over(&regions).is_none());
            // Dropped without any orderly shutdown, as a SIGKILL would.
        }
        let mut file = StateFile::open(&path).unwrap();
        assert_eq!(file.kept_regions().as_deref(), Some(&regions[..]));
        assert_eq!(file.kept_settings(), settings);
        assert!(
            file.take_over(&[region(8, 1)]).is_none(),
            "other RAM is not taken over"
        );
        let bits = file.take_over(&regions).unwrap();
        assert_eq!(bits[0][3], 0xf0);
        assert_eq!(bits[1][7], 1);
        drop(bits);
        file.forget();
        assert_eq!(file.kept_regions(), None);
    }

    #[test]
    fn a_new_layout_starts_empty_in_a_sparse_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mut file = StateFile::open(&path).unwrap();
        let mut bits = file.lay_out(&[region(64, 1)]).unwrap();
        bits[0].fill(u64::MAX);
        drop(bits);
        let bits = file.lay_out(&[region(4, 2)]).unwrap();
        assert!(bits[0].iter().all(|w| *w == 0));
        assert_eq!(file.kept_settings(), KeptSettings::default());
        drop(bits);
        // The size is fixed; only the header and the bits used take blocks
        // (a 64 MiB guest's bits are 2 KiB).
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.len(), FILE_BYTES);
        assert!(
            metadata.blocks() * 512 <= 64 << 10,
            "{} blocks",
            metadata.blocks()
        );
        let too_large = KeptRegion {
            size_bytes: MAX_KEPT_RAM_BYTES + (1 << 20),
            ..region(0, 3)
        };
        assert!(file.lay_out(&[too_large]).is_none());
        assert_eq!(file.kept_regions(), None);
    }

    #[test]
    fn foreign_or_damaged_files_are_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::write(&path, br#"{"format":"balloon-backend-state","version":1}"#).unwrap();
        let mut file = StateFile::open(&path).unwrap();
        assert_eq!(file.kept_regions(), None);
        drop(file.lay_out(&[region(4, 1)]).unwrap());
        // A table whose bits do not follow one another.
        file.set_word(WORD_TABLE + 5, 4);
        assert_eq!(file.kept_regions(), None);
        let too_many: Vec<KeptRegion> = (0..=MAX_REGIONS as u64).map(|i| region(1, i)).collect();
        assert!(file.lay_out(&too_many).is_none());
        assert_eq!(file.kept_regions(), None);
    }
}
