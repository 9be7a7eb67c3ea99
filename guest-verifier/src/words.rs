//! Memory as 8-byte words: viewing a mapping as words, and the volatile
//! loads and stores that make every check a real read of guest memory (the
//! compiler may not assume a word still holds what it wrote). The only
//! `unsafe` of the crate lives here, one line per function.

/// The 8-byte words of `bytes`, or None when the slice is not 8-byte
/// aligned or not a whole number of words (a mapping always is both).
pub fn as_words(bytes: &mut [u8]) -> Option<&mut [u64]> {
    // SAFETY: every bit pattern is a valid u64, and `align_to_mut` returns
    // as its middle part only memory that is aligned and sized for u64.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<u64>() };
    (head.is_empty() && tail.is_empty()).then_some(words)
}

/// Reads a word from memory, always.
pub fn load(word: &u64) -> u64 {
    // SAFETY: a reference is non-null, aligned and valid for reads.
    unsafe { std::ptr::read_volatile(word) }
}

/// Writes a word to memory, always.
pub fn store(word: &mut u64, value: u64) {
    // SAFETY: a mutable reference is non-null, aligned and valid for writes.
    unsafe { std::ptr::write_volatile(word, value) }
}

/// Writes `expected(i)` into word `i` of `words`.
pub fn fill(words: &mut [u64], expected: impl Fn(u64) -> u64) {
    for (index, word) in (0u64..).zip(words.iter_mut()) {
        store(word, expected(index));
    }
}

/// A word that did not hold what it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WordMismatch {
    pub index: u64,
    /// Its virtual address in this process.
    pub addr: usize,
    pub want: u64,
    pub got: u64,
}

/// Re-reads every word; calls `on_mismatch` for each that differs from
/// `expected(i)` and then writes the expected value back, so a corruption
/// is reported once and the next one is seen afresh. Returns how many
/// differed.
pub fn verify(
    words: &mut [u64],
    expected: impl Fn(u64) -> u64,
    mut on_mismatch: impl FnMut(WordMismatch),
) -> u64 {
    let mut mismatches = 0u64;
    for (index, word) in (0u64..).zip(words.iter_mut()) {
        let want = expected(index);
        let got = load(word);
        if got != want {
            mismatches = mismatches.saturating_add(1);
            on_mismatch(WordMismatch {
                index,
                addr: std::ptr::from_ref::<u64>(word) as usize,
                want,
                got,
            });
            store(word, want);
        }
    }
    mismatches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_whole_words_are_viewed_and_others_refused() {
        assert_eq!(as_words(&mut []).map(|w| w.len()), Some(0));
        let mut buffer = [0u8; 64];
        let offset = buffer.as_ptr().align_offset(8);
        let aligned = &mut buffer[offset..offset + 32];
        assert_eq!(as_words(aligned).map(|w| w.len()), Some(4));
        let aligned = &mut buffer[offset..offset + 31];
        assert!(as_words(aligned).is_none(), "not whole words");
        let misaligned = &mut buffer[offset + 1..offset + 17];
        assert!(as_words(misaligned).is_none(), "not aligned");
    }

    #[test]
    fn a_filled_buffer_verifies_clean() {
        let mut words = vec![0u64; 100];
        fill(&mut words, |i| i * 3 + 1);
        let mut seen = Vec::new();
        assert_eq!(verify(&mut words, |i| i * 3 + 1, |m| seen.push(m)), 0);
        assert!(seen.is_empty());
    }

    #[test]
    fn each_changed_word_is_reported_once_with_its_address_and_repaired() {
        let mut words = vec![0u64; 100];
        fill(&mut words, |i| i + 1000);
        words[7] = 0;
        words[42] = 0xdead;
        let base = words.as_ptr() as usize;
        let mut seen = Vec::new();
        assert_eq!(verify(&mut words, |i| i + 1000, |m| seen.push(m)), 2);
        assert_eq!(
            seen,
            vec![
                WordMismatch {
                    index: 7,
                    addr: base + 7 * 8,
                    want: 1007,
                    got: 0
                },
                WordMismatch {
                    index: 42,
                    addr: base + 42 * 8,
                    want: 1042,
                    got: 0xdead
                },
            ]
        );
        // Repaired: the next pass is clean.
        assert_eq!(verify(&mut words, |i| i + 1000, |_| {}), 0);
    }
}
