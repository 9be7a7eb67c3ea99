//! PFN batches, inflated and deflated in any order, against guest RAM with a
//! hole and 4 KiB or 2 MiB host pages, with deferred punches taken at any
//! point: every run and every punch stays inside its region, every punched
//! page is in the balloon, and the tracking matches a plain set of pages.

#![no_main]

use std::collections::BTreeSet;

use balloon_backend::pfn::{compact_pfns, RamRegion};
use balloon_backend::tracker::BalloonTracker;
use libfuzzer_sys::fuzz_target;

const REGIONS: [RamRegion; 2] = [
    RamRegion { start_gpa: 0, size_bytes: 8 << 20 },
    RamRegion { start_gpa: 12 << 20, size_bytes: 4 << 20 },
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let host_page = if mode & 1 == 0 { 4096 } else { 2 << 20 };
    let mut tracker = BalloonTracker::new(&[(8 << 20, host_page), (4 << 20, host_page)]);
    let mut model: BTreeSet<(usize, u64)> = BTreeSet::new();
    // Each record: [op][n] then n little-endian u32 PFNs (biased into RAM).
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        let Some((&n, tail)) = tail.split_first() else { break };
        let take = (usize::from(n) * 4).min(tail.len() - tail.len() % 4);
        let (pfns, tail) = tail.split_at(take);
        rest = tail;
        let pfns = pfns.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 5000);
        let batch = compact_pfns(&REGIONS, pfns);
        for run in &batch.runs {
            let region = REGIONS[run.region];
            assert!((run.first_page + run.pages) * 4096 <= region.size_bytes);
            if op & 1 == 0 {
                tracker.inflate(run);
                model.extend((run.first_page..run.first_page + run.pages).map(|p| (run.region, p)));
            } else {
                tracker.deflate(run);
                for p in run.first_page..run.first_page + run.pages {
                    model.remove(&(run.region, p));
                }
            }
        }
        if op & 2 != 0 {
            for punch in tracker.take_punches() {
                assert!(punch.offset_bytes + punch.len_bytes <= REGIONS[punch.region].size_bytes);
                assert_eq!(punch.offset_bytes % host_page, 0);
                let first = punch.offset_bytes / 4096;
                for page in first..first + punch.len_bytes / 4096 {
                    assert!(model.contains(&(punch.region, page)), "punched a page outside the balloon");
                }
            }
            assert_eq!(tracker.pending_bytes(), 0);
        }
        assert_eq!(tracker.ballooned_pages(), model.len() as u64);
        assert!(tracker.discarded_bytes() <= tracker.ballooned_pages() * 4096);
    }
});
