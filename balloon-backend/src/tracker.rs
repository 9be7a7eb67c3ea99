//! Which 4 KiB guest pages are in the balloon, and which host pages that
//! makes free. Pure bookkeeping: it decides what to discard, `discard` does it.
//!
//! When guest RAM is backed by host pages larger than 4 KiB (hugetlbfs), a
//! host page can be given back only once every 4 KiB piece of it is in the
//! balloon, possibly across many requests.

use crate::pfn::{ByteRun, PageRun, PAGE_SIZE_BYTES};

#[derive(Debug)]
struct RegionPages {
    pages: u64,
    pages_per_host_page: u64,
    bits: Vec<u64>,
}

impl RegionPages {
    fn is_set(&self, page: u64) -> bool {
        let word = self.bits.get((page / 64) as usize).copied().unwrap_or(0);
        word & (1 << (page % 64)) != 0
    }

    /// Sets or clears one bit; returns whether it changed.
    fn update(&mut self, page: u64, ballooned: bool) -> bool {
        let Some(word) = self.bits.get_mut((page / 64) as usize) else {
            return false;
        };
        let mask = 1u64 << (page % 64);
        let was = *word & mask != 0;
        if ballooned {
            *word |= mask;
        } else {
            *word &= !mask;
        }
        was != ballooned
    }

    fn host_page_full(&self, host_page: u64) -> bool {
        let first = host_page * self.pages_per_host_page;
        let end = (first + self.pages_per_host_page).min(self.pages);
        (first..end).all(|page| self.is_set(page))
    }
}

/// What one inflate run changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InflateOutcome {
    /// Pages newly put in the balloon.
    pub added_pages: u64,
    /// Pages that were in the balloon already (a guest fault).
    pub already_ballooned: u64,
    /// Host pages that became wholly ballooned, coalesced, to discard.
    pub discard: Vec<ByteRun>,
}

/// What one deflate run changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeflateOutcome {
    pub removed_pages: u64,
    /// Pages that were not in the balloon.
    pub not_ballooned: u64,
}

/// Balloon membership of every 4 KiB page of guest RAM.
#[derive(Debug, Default)]
pub struct BalloonTracker {
    regions: Vec<RegionPages>,
    ballooned_pages: u64,
    full_host_pages_bytes: u64,
}

impl BalloonTracker {
    /// One entry per region: its size in bytes and its host page size.
    pub fn new(regions: &[(u64, u64)]) -> Self {
        let regions = regions
            .iter()
            .map(|&(size_bytes, host_page_bytes)| {
                let pages = size_bytes / PAGE_SIZE_BYTES;
                RegionPages {
                    pages,
                    pages_per_host_page: (host_page_bytes / PAGE_SIZE_BYTES).max(1),
                    bits: vec![0; pages.div_ceil(64) as usize],
                }
            })
            .collect();
        BalloonTracker {
            regions,
            ballooned_pages: 0,
            full_host_pages_bytes: 0,
        }
    }

    pub fn ballooned_pages(&self) -> u64 {
        self.ballooned_pages
    }

    /// Host memory freed for pages that are still in the balloon.
    pub fn discarded_bytes(&self) -> u64 {
        self.full_host_pages_bytes
    }

    fn host_page_bytes(region: &RegionPages) -> u64 {
        region.pages_per_host_page * PAGE_SIZE_BYTES
    }

    /// Host pages (first, end) touched by a run.
    fn host_pages_of(region: &RegionPages, run: &PageRun) -> (u64, u64) {
        let per = region.pages_per_host_page;
        let end = run.first_page.saturating_add(run.pages).min(region.pages);
        (run.first_page / per, end.div_ceil(per))
    }

    pub fn inflate(&mut self, run: &PageRun) -> InflateOutcome {
        let mut outcome = InflateOutcome::default();
        let Some(region) = self.regions.get_mut(run.region) else {
            return outcome;
        };
        let (host_first, host_end) = Self::host_pages_of(region, run);
        let full_before: Vec<bool> = (host_first..host_end)
            .map(|h| region.host_page_full(h))
            .collect();
        let end = run.first_page.saturating_add(run.pages).min(region.pages);
        for page in run.first_page..end {
            if region.update(page, true) {
                outcome.added_pages += 1;
            } else {
                outcome.already_ballooned += 1;
            }
        }
        let host_bytes = Self::host_page_bytes(region);
        for (host_page, was_full) in (host_first..host_end).zip(full_before) {
            if was_full || !region.host_page_full(host_page) {
                continue;
            }
            self.full_host_pages_bytes += host_bytes;
            let offset_bytes = host_page * host_bytes;
            match outcome.discard.last_mut() {
                Some(last) if last.offset_bytes + last.len_bytes == offset_bytes => {
                    last.len_bytes += host_bytes
                }
                _ => outcome.discard.push(ByteRun {
                    region: run.region,
                    offset_bytes,
                    len_bytes: host_bytes,
                }),
            }
        }
        self.ballooned_pages += outcome.added_pages;
        outcome
    }

    pub fn deflate(&mut self, run: &PageRun) -> DeflateOutcome {
        let mut outcome = DeflateOutcome::default();
        let Some(region) = self.regions.get_mut(run.region) else {
            return outcome;
        };
        let (host_first, host_end) = Self::host_pages_of(region, run);
        let host_bytes = Self::host_page_bytes(region);
        let full_before = (host_first..host_end)
            .filter(|&h| region.host_page_full(h))
            .count() as u64;
        let end = run.first_page.saturating_add(run.pages).min(region.pages);
        for page in run.first_page..end {
            if region.update(page, false) {
                outcome.removed_pages += 1;
            } else {
                outcome.not_ballooned += 1;
            }
        }
        let full_after = (host_first..host_end)
            .filter(|&h| region.host_page_full(h))
            .count() as u64;
        self.full_host_pages_bytes -= (full_before - full_after) * host_bytes;
        self.ballooned_pages -= outcome.removed_pages;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HUGE: u64 = 2 << 20;

    fn run(first_page: u64, pages: u64) -> PageRun {
        PageRun {
            region: 0,
            first_page,
            pages,
        }
    }

    #[test]
    fn small_pages_discard_what_was_added() {
        let mut tracker = BalloonTracker::new(&[(1 << 20, 4096)]);
        let outcome = tracker.inflate(&run(4, 3));
        assert_eq!(outcome.added_pages, 3);
        assert_eq!(
            outcome.discard,
            vec![ByteRun {
                region: 0,
                offset_bytes: 4 * 4096,
                len_bytes: 3 * 4096
            }]
        );
        let again = tracker.inflate(&run(6, 2));
        assert_eq!((again.added_pages, again.already_ballooned), (1, 1));
        assert_eq!(tracker.discarded_bytes(), 4 * 4096);
        let back = tracker.deflate(&run(0, 8));
        assert_eq!((back.removed_pages, back.not_ballooned), (4, 4));
        assert_eq!(tracker.discarded_bytes(), 0);
        assert_eq!(tracker.ballooned_pages(), 0);
    }

    #[test]
    fn huge_page_freed_only_when_complete_across_requests() {
        let mut tracker = BalloonTracker::new(&[(4 * HUGE, HUGE)]);
        let first = tracker.inflate(&run(512, 300));
        assert!(first.discard.is_empty());
        let second = tracker.inflate(&run(812, 212));
        assert_eq!(
            second.discard,
            vec![ByteRun {
                region: 0,
                offset_bytes: HUGE,
                len_bytes: HUGE
            }]
        );
        assert_eq!(tracker.discarded_bytes(), HUGE);
        tracker.deflate(&run(600, 1));
        assert_eq!(tracker.discarded_bytes(), 0);
        // Putting the one page back completes the host page again.
        assert_eq!(tracker.inflate(&run(600, 1)).discard.len(), 1);
    }

    #[test]
    fn out_of_range_runs_change_nothing() {
        let mut tracker = BalloonTracker::new(&[(64 * 4096, 4096)]);
        assert_eq!(
            tracker.inflate(&PageRun {
                region: 3,
                first_page: 0,
                pages: 1
            }),
            InflateOutcome::default()
        );
        assert_eq!(tracker.inflate(&run(64, 10)).added_pages, 0);
        assert_eq!(tracker.ballooned_pages(), 0);
    }

    proptest! {
        #[test]
        fn tracking_matches_a_simple_model(
            ops in proptest::collection::vec((any::<bool>(), 0u64..2048, 1u64..600), 1..60),
            huge in any::<bool>(),
        ) {
            let host_page = if huge { HUGE } else { 4096 };
            let pages = 2048u64;
            let mut tracker = BalloonTracker::new(&[(pages * 4096, host_page)]);
            let mut model = vec![false; pages as usize];
            let mut discarded_host_pages = std::collections::BTreeSet::new();
            for (inflate, first, count) in ops {
                let r = run(first, count);
                if inflate {
                    let outcome = tracker.inflate(&r);
                    for d in &outcome.discard {
                        prop_assert_eq!(d.offset_bytes % host_page, 0);
                        prop_assert_eq!(d.len_bytes % host_page, 0);
                        for h in (d.offset_bytes / host_page)..((d.offset_bytes + d.len_bytes) / host_page) {
                            prop_assert!(discarded_host_pages.insert(h), "host page discarded twice");
                        }
                    }
                } else {
                    tracker.deflate(&r);
                }
                for p in first..(first + count).min(pages) {
                    model[p as usize] = inflate;
                }
                // A host page counts as discarded only while all its pieces are ballooned.
                let per = (host_page / 4096) as usize;
                discarded_host_pages.retain(|h| model[*h as usize * per..(*h as usize + 1) * per].iter().all(|b| *b));
                prop_assert_eq!(tracker.ballooned_pages(), model.iter().filter(|b| **b).count() as u64);
                prop_assert_eq!(tracker.discarded_bytes(), discarded_host_pages.len() as u64 * host_page);
                // Every discarded byte belongs to a ballooned page.
                for h in &discarded_host_pages {
                    prop_assert!(model[*h as usize * per..(*h as usize + 1) * per].iter().all(|b| *b));
                }
            }
        }
    }
}
