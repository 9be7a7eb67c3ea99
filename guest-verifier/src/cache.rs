//! Page cache beside the owned memory: a file (or block device) holding a
//! known pattern, read back each round twice: once from the page cache it
//! has sat in since the last round, then again after the guest dropped its
//! caches. Every few rounds it is written afresh (a new generation) and
//! synced. Each read is compared word by word and summed up.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::pattern::{checksum, mix, Checksum, Pattern};
use crate::report::CacheMismatch;

/// The guest kernel's knob; "3" drops clean page cache and slab objects.
pub const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";

/// A round rewrites the file every this many rounds (and after a mismatch).
pub const REWRITE_EVERY: u64 = 4;

/// Keeps the file's patterns apart from the chunks' (same seed).
const CACHE_DOMAIN: u64 = 0xcace_0000_0000_0001;

/// Reads and writes in pieces of this size.
const PIECE_BYTES: usize = 1 << 20;

/// What one round found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheRound {
    pub round: u64,
    pub generation: u64,
    pub bytes: u64,
    pub rewritten: bool,
    /// The checksum the file should have, and what the two reads gave.
    pub want: u64,
    pub cached: u64,
    pub reread: u64,
    /// Whether dropping the caches worked.
    pub dropped: bool,
    pub mismatches: u64,
}

impl CacheRound {
    pub fn line(&self, path: &Path) -> String {
        format!(
            "@@VERIFY cache round={} file={} generation={} bytes={} rewritten={} want=0x{:016x} cached=0x{:016x} reread=0x{:016x} dropped={} mismatches={}",
            self.round,
            path.display(),
            self.generation,
            self.bytes,
            self.rewritten,
            self.want,
            self.cached,
            self.reread,
            self.dropped,
            self.mismatches
        )
    }
}

pub struct CacheCheck {
    path: PathBuf,
    file: File,
    bytes: u64,
    pattern_seed: u64,
    generation: u64,
    next_round: u64,
    /// Written at least once, and no mismatch since.
    intact: bool,
    drop_caches: Option<PathBuf>,
}

/// Compares one piece read at byte `offset` of the file with `pattern`;
/// adds its words to `sum`; reports each differing word. Returns how many
/// differed.
pub fn compare_piece(
    piece: &[u8],
    offset: u64,
    pattern: Pattern,
    sum: &mut Checksum,
    mut on_mismatch: impl FnMut(u64, u64, u64),
) -> u64 {
    let mut bad = 0u64;
    let first_word = offset / 8;
    for (index, bytes) in (first_word..).zip(piece.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        let got = u64::from_le_bytes(word);
        sum.add(got);
        let want = pattern.word(index);
        if got != want {
            bad = bad.saturating_add(1);
            on_mismatch(index.saturating_mul(8), want, got);
        }
    }
    bad
}

/// The bytes of `pattern`'s words from byte `offset` on, `len` of them.
fn pattern_piece(pattern: Pattern, offset: u64, len: usize) -> Vec<u8> {
    (offset / 8..)
        .take(len / 8)
        .flat_map(|index| pattern.word(index).to_le_bytes())
        .collect()
}

impl CacheCheck {
    /// Opens (creating a regular file if missing) `path` for `mib` MiB of
    /// pattern; `drop_caches` is the knob written between the two reads
    /// (None: never dropped, for tests on a shared host).
    pub fn open(
        path: &Path,
        mib: u64,
        seed: u64,
        drop_caches: Option<PathBuf>,
    ) -> io::Result<Self> {
        let bytes = mib
            .checked_mul(PIECE_BYTES as u64)
            .ok_or_else(|| io::Error::other("--cache-mib is too large"))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.is_file() {
            file.set_len(bytes)?;
        }
        Ok(CacheCheck {
            path: path.to_path_buf(),
            file,
            bytes,
            pattern_seed: mix(seed ^ CACHE_DOMAIN),
            generation: 0,
            next_round: 1,
            intact: false,
            drop_caches,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn pattern(&self) -> Pattern {
        Pattern::new(self.pattern_seed, 0, self.generation)
    }

    /// Offsets and lengths of the pieces of the file.
    fn pieces(&self) -> impl Iterator<Item = (u64, usize)> {
        let bytes = self.bytes;
        (0..bytes).step_by(PIECE_BYTES).map(move |offset| {
            let len = (bytes - offset).min(PIECE_BYTES as u64);
            (offset, usize::try_from(len).unwrap_or(PIECE_BYTES))
        })
    }

    fn write_all(&self) -> io::Result<()> {
        let pattern = self.pattern();
        for (offset, len) in self.pieces() {
            self.file
                .write_all_at(&pattern_piece(pattern, offset, len), offset)?;
        }
        self.file.sync_all()
    }

    /// Reads the whole file, comparing it; returns (checksum, mismatches).
    fn read_and_compare(
        &self,
        round: u64,
        read: &'static str,
        on_mismatch: &mut impl FnMut(&CacheMismatch),
    ) -> io::Result<(u64, u64)> {
        let pattern = self.pattern();
        let mut sum = Checksum::default();
        let mut bad = 0u64;
        let mut buffer = vec![0u8; PIECE_BYTES];
        for (offset, len) in self.pieces() {
            let piece = buffer
                .get_mut(..len)
                .ok_or_else(|| io::Error::other("piece larger than its buffer"))?;
            self.file.read_exact_at(piece, offset)?;
            let found = compare_piece(piece, offset, pattern, &mut sum, |offset, want, got| {
                on_mismatch(&CacheMismatch {
                    path: self.path.clone(),
                    round,
                    read,
                    offset,
                    want,
                    got,
                })
            });
            bad = bad.saturating_add(found);
        }
        Ok((sum.value(), bad))
    }

    fn drop_caches(&self) -> bool {
        self.drop_caches
            .as_ref()
            .is_some_and(|knob| std::fs::write(knob, "3\n").is_ok())
    }

    /// One round: rewrite when due, read from the cache, drop the caches,
    /// read again.
    pub fn round(&mut self, mut on_mismatch: impl FnMut(&CacheMismatch)) -> io::Result<CacheRound> {
        let round = self.next_round;
        self.next_round = round.saturating_add(1);
        let rewrite = !self.intact || round.is_multiple_of(REWRITE_EVERY);
        if rewrite {
            self.generation = self.generation.wrapping_add(1);
            self.write_all()?;
        }
        let pattern = self.pattern();
        let want = checksum((0..self.bytes / 8).map(|index| pattern.word(index)));
        let (cached, bad_cached) = self.read_and_compare(round, "cached", &mut on_mismatch)?;
        let dropped = self.drop_caches();
        let (reread, bad_reread) = self.read_and_compare(round, "reread", &mut on_mismatch)?;
        let mismatches = bad_cached.saturating_add(bad_reread);
        self.intact = mismatches == 0;
        Ok(CacheRound {
            round,
            generation: self.generation,
            bytes: self.bytes,
            rewritten: rewrite,
            want,
            cached,
            reread,
            dropped,
            mismatches,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("guest-verifier-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_piece_compares_word_by_word_at_its_offset() {
        let pattern = Pattern::new(1, 0, 1);
        let mut piece = pattern_piece(pattern, 4096, 64);
        let mut sum = Checksum::default();
        let bad = compare_piece(&piece, 4096, pattern, &mut sum, |o, w, g| {
            panic!("{o} {w} {g}")
        });
        assert_eq!(bad, 0);
        piece[16..24].fill(0);
        let mut seen = Vec::new();
        let mut other = Checksum::default();
        let bad = compare_piece(&piece, 4096, pattern, &mut other, |o, w, g| {
            seen.push((o, w, g))
        });
        assert_eq!(bad, 1);
        assert_eq!(seen, vec![(4096 + 16, pattern.word(512 + 2), 0)]);
        assert_ne!(sum, other);
    }

    #[test]
    fn rounds_read_back_what_was_written_and_rewrite_every_few() {
        let path = temp_path("rounds");
        let knob = temp_path("knob");
        let mut check = CacheCheck::open(&path, 2, 30, Some(knob.clone())).unwrap();
        let mut rewritten = Vec::new();
        for _ in 0..REWRITE_EVERY + 1 {
            let round = check.round(|m| panic!("{m:?}")).unwrap();
            assert_eq!(round.mismatches, 0);
            assert_eq!((round.cached, round.reread), (round.want, round.want));
            assert!(round.dropped);
            assert_eq!(round.bytes, 2 << 20);
            rewritten.push(round.rewritten);
        }
        assert_eq!(rewritten, vec![true, false, false, true, false]);
        assert_eq!(std::fs::read_to_string(&knob).unwrap(), "3\n");
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&knob).unwrap();
    }

    #[test]
    fn a_changed_file_is_reported_then_written_afresh() {
        let path = temp_path("changed");
        let mut check = CacheCheck::open(&path, 1, 30, None).unwrap();
        let first = check.round(|m| panic!("{m:?}")).unwrap();
        assert!(!first.dropped, "no knob, no drop");
        // Zero one page behind the check's back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0u8; 4096], 8192)
            .unwrap();
        let mut seen = Vec::new();
        let second = check.round(|m| seen.push(m.clone())).unwrap();
        assert!(!second.rewritten);
        // 512 words, once from the cache and once re-read.
        assert_eq!(second.mismatches, 1024);
        assert_ne!(second.cached, second.want);
        assert_eq!(seen[0].offset, 8192);
        assert_eq!((seen[0].read, seen[0].got), ("cached", 0));
        let third = check.round(|m| panic!("{m:?}")).unwrap();
        assert!(third.rewritten, "a mismatch makes the next round rewrite");
        assert_eq!(third.mismatches, 0);
        std::fs::remove_file(&path).unwrap();
    }
}
