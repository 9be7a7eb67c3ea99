//! The values the verifier expects: one 64-bit value for every word it
//! owns, derived from the seed, the chunk, the word's index and the chunk's
//! generation, and never zero (a page the host freed reads back as zeros,
//! so zero must always be a mismatch). Also the seeded generator that picks
//! which chunks are replaced. Pure functions only.

/// SplitMix64's finaliser: a bijection on u64 that spreads every input bit.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64's increment (the golden ratio).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Stands in for a computed zero, so that no expected value is zero.
const NOT_ZERO: u64 = 0x5a5a_5a5a_a5a5_a5a5;

/// What one region's words hold: a base drawn once per (seed, region,
/// generation), then one mix per word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    base: u64,
}

impl Pattern {
    /// The pattern of chunk `chunk` in its generation `generation`.
    pub fn new(seed: u64, chunk: u64, generation: u64) -> Self {
        let base = mix(seed ^ mix(chunk.wrapping_add(GOLDEN)) ^ mix(generation ^ !GOLDEN));
        Pattern { base }
    }

    /// The value of word `word`; never zero.
    pub fn word(self, word: u64) -> u64 {
        match mix(self.base.wrapping_add(word.wrapping_mul(GOLDEN))) {
            0 => NOT_ZERO,
            value => value,
        }
    }
}

/// A small seeded generator (SplitMix64): the same seed gives the same
/// choices on every run.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// True with probability 1 / `n` (never for n = 0).
    pub fn one_in(&mut self, n: u64) -> bool {
        n != 0 && self.next_u64().is_multiple_of(n)
    }
}

/// A running checksum of a sequence of words (FNV-1a over the words), to
/// print beside the word-by-word comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    pub fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

/// The checksum of a whole sequence.
pub fn checksum(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut sum = Checksum::default();
    words.into_iter().for_each(|word| sum.add(word));
    sum.value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_same_inputs_give_the_same_words() {
        let a = Pattern::new(7, 3, 2);
        let b = Pattern::new(7, 3, 2);
        assert_eq!(a, b);
        assert!((0..1000).all(|w| a.word(w) == b.word(w)));
    }

    #[test]
    fn seed_chunk_generation_and_word_each_change_the_value() {
        let reference = Pattern::new(1, 1, 1).word(1);
        assert_ne!(Pattern::new(2, 1, 1).word(1), reference, "seed");
        assert_ne!(Pattern::new(1, 2, 1).word(1), reference, "chunk");
        assert_ne!(Pattern::new(1, 1, 2).word(1), reference, "generation");
        assert_ne!(Pattern::new(1, 1, 1).word(2), reference, "word");
        // Swapping chunk and generation is a different pattern too.
        assert_ne!(Pattern::new(1, 5, 9), Pattern::new(1, 9, 5));
    }

    #[test]
    fn words_of_a_chunk_are_distinct_and_never_zero() {
        let pattern = Pattern::new(30, 0, 0);
        let words: Vec<u64> = (0..131_072).map(|w| pattern.word(w)).collect();
        assert!(words.iter().all(|&w| w != 0));
        let distinct: HashSet<u64> = words.iter().copied().collect();
        assert_eq!(distinct.len(), words.len());
    }

    #[test]
    fn generations_of_one_chunk_do_not_repeat_each_other() {
        // A page that kept an old generation's data must not pass.
        for generation in 0..64 {
            let old = Pattern::new(30, 4, generation);
            let new = Pattern::new(30, 4, generation + 1);
            assert!((0..512).all(|w| old.word(w) != new.word(w)));
        }
    }

    #[test]
    fn the_generator_is_seeded_and_one_in_four_is_about_a_quarter() {
        let a: Vec<u64> = {
            let mut rng = Rng::new(30);
            (0..8).map(|_| rng.next_u64()).collect()
        };
        let mut rng = Rng::new(30);
        assert!(a.iter().all(|&v| v == rng.next_u64()));
        let mut rng = Rng::new(31);
        assert_ne!(rng.next_u64(), a[0]);

        let mut rng = Rng::new(1);
        let hits = (0..40_000).filter(|_| rng.one_in(4)).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
        assert!(!Rng::new(1).one_in(0));
        assert!(Rng::new(1).one_in(1));
    }

    #[test]
    fn the_checksum_sees_order_and_value() {
        assert_ne!(checksum([1, 2]), checksum([2, 1]));
        assert_ne!(checksum([1, 2]), checksum([1, 3]));
        assert_eq!(checksum([5, 6, 7]), checksum(vec![5, 6, 7]));
    }
}
