//! Allocation churn beside the owned memory: a short-lived anonymous
//! mapping, written, verified and unmapped each round, so the guest keeps
//! freeing whole blocks of memory and free page reporting has work.

use std::io;

use memmap2::MmapMut;

use crate::pattern::{mix, Pattern};
use crate::report::{MemoryMismatch, Region};
use crate::words;

/// Keeps the churn's patterns apart from the chunks' (same seed).
const CHURN_DOMAIN: u64 = 0xc4c4_0000_0000_0001;

/// Maps `bytes` (a multiple of 8), writes round `round`'s pattern, verifies
/// it, unmaps it. Returns how many words differed.
pub fn churn_round(
    seed: u64,
    round: u64,
    pass: u64,
    bytes: usize,
    mut on_mismatch: impl FnMut(&MemoryMismatch),
) -> io::Result<u64> {
    if bytes == 0 {
        return Ok(0);
    }
    let mut map = MmapMut::map_anon(bytes)?;
    let words = words::as_words(&mut map)
        .ok_or_else(|| io::Error::other("the churn mapping is not whole aligned words"))?;
    let pattern = Pattern::new(mix(seed ^ CHURN_DOMAIN), round, 0);
    words::fill(words, |index| pattern.word(index));
    let bad = words::verify(
        words,
        |index| pattern.word(index),
        |word| {
            on_mismatch(&MemoryMismatch {
                region: Region::Churn,
                generation: round,
                pass,
                word,
            })
        },
    );
    drop(map);
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_maps_writes_verifies_and_unmaps() {
        for round in 0..3 {
            let bad = churn_round(5, round, 1, 2 << 20, |m| panic!("{m:?}")).unwrap();
            assert_eq!(bad, 0);
        }
        assert_eq!(churn_round(5, 0, 1, 0, |m| panic!("{m:?}")).unwrap(), 0);
    }
}
