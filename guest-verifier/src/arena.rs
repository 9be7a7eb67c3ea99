//! The memory the verifier owns: 1 MiB chunks of anonymous memory, each
//! its own mapping, each word holding its chunk's pattern. A pass re-reads
//! every word of every chunk and then replaces about one chunk in four
//! (unmapped, so its pages go back to the guest's free pool, and a fresh
//! mapping in the next generation written in its place): pages keep
//! cycling through the guest's allocator, the balloon and back.

use std::io;

use memmap2::MmapMut;

use crate::pattern::{Pattern, Rng};
use crate::report::{MemoryMismatch, Region};
use crate::words;

pub const CHUNK_BYTES: usize = 1 << 20;
const WORDS_PER_CHUNK: u64 = (CHUNK_BYTES / 8) as u64;

struct Chunk {
    /// None only while the chunk is being replaced.
    map: Option<MmapMut>,
    generation: u64,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    pub words: u64,
    pub mismatches: u64,
    pub replaced: u64,
}

pub struct Arena {
    seed: u64,
    chunks: Vec<Chunk>,
}

/// A fresh anonymous mapping of one chunk, written with `pattern`.
fn fresh_chunk(pattern: Pattern) -> io::Result<MmapMut> {
    let mut map = MmapMut::map_anon(CHUNK_BYTES)?;
    let words = words::as_words(&mut map).ok_or_else(not_words)?;
    words::fill(words, |index| pattern.word(index));
    Ok(map)
}

fn not_words() -> io::Error {
    io::Error::other("an anonymous mapping is not a whole number of aligned words")
}

impl Arena {
    /// Maps and writes `chunks` chunks, all in generation 0.
    pub fn new(seed: u64, chunks: u64) -> io::Result<Self> {
        let chunks = (0..chunks)
            .map(|index| {
                Ok(Chunk {
                    map: Some(fresh_chunk(Pattern::new(seed, index, 0))?),
                    generation: 0,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Arena { seed, chunks })
    }

    /// Words owned.
    pub fn words(&self) -> u64 {
        (self.chunks.len() as u64).saturating_mul(WORDS_PER_CHUNK)
    }

    /// Verifies every word (reporting and repairing each bad one through
    /// `on_mismatch`); then each chunk is replaced with probability
    /// 1 / `replace_one_in` as drawn from `rng` (never for 0).
    pub fn pass(
        &mut self,
        pass: u64,
        rng: &mut Rng,
        replace_one_in: u64,
        mut on_mismatch: impl FnMut(&MemoryMismatch),
    ) -> io::Result<PassStats> {
        let mut stats = PassStats::default();
        for (index, chunk) in (0u64..).zip(self.chunks.iter_mut()) {
            let generation = chunk.generation;
            if let Some(map) = chunk.map.as_mut() {
                let words = words::as_words(map).ok_or_else(not_words)?;
                let pattern = Pattern::new(self.seed, index, generation);
                let bad = words::verify(
                    words,
                    |word| pattern.word(word),
                    |word| {
                        on_mismatch(&MemoryMismatch {
                            region: Region::Chunk(index),
                            generation,
                            pass,
                            word,
                        })
                    },
                );
                stats.words = stats.words.saturating_add(words.len() as u64);
                stats.mismatches = stats.mismatches.saturating_add(bad);
            }
            if rng.one_in(replace_one_in) {
                // Unmapped first, so the new mapping may take the same pages
                // back from the free pool (or any others).
                chunk.map = None;
                chunk.generation = generation.wrapping_add(1);
                chunk.map = Some(fresh_chunk(Pattern::new(
                    self.seed,
                    index,
                    chunk.generation,
                ))?);
                stats.replaced = stats.replaced.saturating_add(1);
            }
        }
        Ok(stats)
    }

    /// Overwrites one word, as a fault would (for tests).
    #[cfg(test)]
    pub fn corrupt(&mut self, chunk: usize, word: usize, value: u64) {
        let map = self.chunks[chunk].map.as_mut().unwrap();
        let words = words::as_words(map).unwrap();
        words::store(&mut words[word], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_arena_verifies_every_word_and_replaces_about_a_quarter() {
        let mut arena = Arena::new(30, 8).unwrap();
        assert_eq!(arena.words(), 8 * WORDS_PER_CHUNK);
        let mut rng = Rng::new(30);
        let mut replaced = 0;
        for pass in 1..=8 {
            let stats = arena
                .pass(pass, &mut rng, 4, |m| panic!("unexpected {m:?}"))
                .unwrap();
            assert_eq!(stats.words, arena.words());
            assert_eq!(stats.mismatches, 0);
            replaced += stats.replaced;
        }
        // 64 draws at one in four.
        assert!((6..=30).contains(&replaced), "{replaced}");
    }

    #[test]
    fn a_zeroed_word_is_reported_with_its_chunk_word_and_values_then_repaired() {
        let mut arena = Arena::new(7, 3).unwrap();
        let mut rng = Rng::new(1);
        arena.corrupt(2, 100, 0);
        let mut seen = Vec::new();
        let stats = arena.pass(1, &mut rng, 0, |m| seen.push(*m)).unwrap();
        assert_eq!(stats.mismatches, 1);
        assert_eq!(seen.len(), 1);
        let m = seen[0];
        assert_eq!(m.region, Region::Chunk(2));
        assert_eq!(
            (m.word.index, m.word.got, m.generation, m.pass),
            (100, 0, 0, 1)
        );
        assert_eq!(m.word.want, Pattern::new(7, 2, 0).word(100));
        assert_eq!(m.word.addr % 8, 0);
        let stats = arena
            .pass(2, &mut rng, 0, |m| panic!("not repaired: {m:?}"))
            .unwrap();
        assert_eq!(stats.mismatches, 0);
    }

    #[test]
    fn a_replaced_chunk_holds_its_next_generation() {
        let mut arena = Arena::new(9, 2).unwrap();
        let mut rng = Rng::new(2);
        // One in one: every chunk is replaced after its check.
        let stats = arena.pass(1, &mut rng, 1, |_| {}).unwrap();
        assert_eq!(stats.replaced, 2);
        assert!(arena.chunks.iter().all(|c| c.generation == 1));
        // Old-generation data written now is a mismatch.
        let stale = Pattern::new(9, 0, 0).word(3);
        arena.corrupt(0, 3, stale);
        let mut seen = Vec::new();
        arena.pass(2, &mut rng, 0, |m| seen.push(*m)).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].word.got, seen[0].generation), (stale, 1));
    }
}
