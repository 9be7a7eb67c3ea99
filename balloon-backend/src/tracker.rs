//! Which 4 KiB guest pages are in the balloon, which host pages that makes
//! free, and which of those still wait to be punched. Pure bookkeeping: it
//! decides what to discard, `host_memory` does it.
//!
//! When guest RAM is backed by host pages larger than 4 KiB (hugetlbfs), a
//! host page can be given back only once every 4 KiB piece of it is in the
//! balloon, possibly across many requests.
//!
//! Punches are deferred: a host page that becomes wholly ballooned is marked
//! pending, and `take_punches` later returns the pending pages as runs that
//! also span the wholly ballooned pages between them (punching those again
//! is harmless), so pages a guest inflates in scattered order coalesce
//! across requests into few calls. A deflate clears the pending mark of every host
//! page it breaks, so a page given back to the guest is never punched later.

use std::fmt::Debug;
use std::ops::DerefMut;
use std::time::Duration;

use crate::pfn::{ByteRun, PageRun, PAGE_SIZE_BYTES};

/// Where a region's page bits live: the heap, or the state file's mapping
/// (`state_file::KeptBits`), where every change is kept the moment it is
/// made.
pub trait PageBits: DerefMut<Target = [u64]> + Send + Debug {}
impl<T: DerefMut<Target = [u64]> + Send + Debug> PageBits for T {}

/// Pending punches are carried out once they cover this much guest RAM...
pub const PUNCH_PENDING_CAP_BYTES: u64 = 256 << 20;
/// ...or once the oldest has waited this long, whichever comes first.
pub const PUNCH_DELAY: Duration = Duration::from_millis(20);

/// Whether pending punches are due: `pending_bytes` have waited
/// `pending_for` since the first of them.
pub fn punch_due(pending_bytes: u64, pending_for: Duration) -> bool {
    pending_bytes >= PUNCH_PENDING_CAP_BYTES || (pending_bytes > 0 && pending_for >= PUNCH_DELAY)
}

#[derive(Debug)]
struct RegionPages {
    pages: u64,
    pages_per_host_page: u64,
    /// One bit per 4 KiB page: in the balloon.
    bits: Box<dyn PageBits>,
    /// One bit per host page: wholly ballooned and not punched yet.
    pending: Vec<u64>,
}

/// Words of page bits a region of `size_bytes` needs.
fn bit_words(size_bytes: u64) -> usize {
    (size_bytes / PAGE_SIZE_BYTES).div_ceil(64) as usize
}

fn bit_is_set(words: &[u64], index: u64) -> bool {
    let word = words.get((index / 64) as usize).copied().unwrap_or(0);
    word & (1 << (index % 64)) != 0
}

/// Sets or clears one bit; returns whether it changed.
fn update_bit(words: &mut [u64], index: u64, set: bool) -> bool {
    let Some(word) = words.get_mut((index / 64) as usize) else {
        return false;
    };
    let mask = 1u64 << (index % 64);
    let was = *word & mask != 0;
    if set {
        *word |= mask;
    } else {
        *word &= !mask;
    }
    was != set
}

impl RegionPages {
    fn host_pages(&self) -> u64 {
        self.pages.div_ceil(self.pages_per_host_page)
    }

    fn host_page_full(&self, host_page: u64) -> bool {
        let first = host_page * self.pages_per_host_page;
        let end = (first + self.pages_per_host_page).min(self.pages);
        if self.pages_per_host_page == 1 {
            return first < end && bit_is_set(&self.bits, first);
        }
        (first..end).all(|page| bit_is_set(&self.bits, page))
    }

    /// The first host page at or after `host_page` that is not wholly
    /// ballooned.
    fn full_stretch_end(&self, mut host_page: u64) -> u64 {
        let end = self.host_pages();
        while host_page < end {
            if self.pages_per_host_page == 1 {
                let bit = host_page % 64;
                let word = self
                    .bits
                    .get((host_page / 64) as usize)
                    .copied()
                    .unwrap_or(0);
                let ones = u64::from((!(word >> bit)).trailing_zeros()).min(64 - bit);
                host_page += ones;
                if ones < 64 - bit {
                    break;
                }
            } else if self.host_page_full(host_page) {
                host_page += 1;
            } else {
                break;
            }
        }
        host_page.min(end)
    }
}

/// What one inflate run changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InflateOutcome {
    /// Pages newly put in the balloon.
    pub added_pages: u64,
    /// Pages that were in the balloon already (a guest fault).
    pub already_ballooned: u64,
    /// Host memory that became wholly ballooned and now waits to be punched.
    pub newly_pending_bytes: u64,
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
    pending_bytes: u64,
}

impl BalloonTracker {
    /// One entry per region: its size in bytes and its host page size.
    pub fn new(regions: &[(u64, u64)]) -> Self {
        let storage = regions
            .iter()
            .map(|&(size_bytes, _)| {
                Box::new(vec![0u64; bit_words(size_bytes)]) as Box<dyn PageBits>
            })
            .collect();
        Self::kept_in(regions, storage, false)
    }

    /// A tracker whose page bits live in `storage`, one entry per region
    /// (an entry of the wrong length is replaced by heap storage). With
    /// `keep`, the pages the storage marks are in the balloon and their
    /// host memory taken as freed already (a restarted backend on the same
    /// guest RAM); without, the storage is cleared.
    pub fn kept_in(regions: &[(u64, u64)], storage: Vec<Box<dyn PageBits>>, keep: bool) -> Self {
        let mut storage = storage.into_iter();
        let regions: Vec<RegionPages> = regions
            .iter()
            .map(|&(size_bytes, host_page_bytes)| {
                let pages = size_bytes / PAGE_SIZE_BYTES;
                let pages_per_host_page = (host_page_bytes / PAGE_SIZE_BYTES).max(1);
                let words = bit_words(size_bytes);
                let mut bits = storage
                    .next()
                    .filter(|bits| bits.len() == words)
                    .unwrap_or_else(|| Box::new(vec![0u64; words]));
                if !keep {
                    bits.fill(0);
                }
                // Bits past the region's last page are never ballooned.
                if let (Some(last), tail @ 1..) = (bits.last_mut(), pages % 64) {
                    *last &= (1u64 << tail) - 1;
                }
                RegionPages {
                    pages,
                    pages_per_host_page,
                    bits,
                    pending: vec![0; pages.div_ceil(pages_per_host_page).div_ceil(64) as usize],
                }
            })
            .collect();
        let mut tracker = BalloonTracker {
            regions,
            ..BalloonTracker::default()
        };
        for region in &tracker.regions {
            let pages: u64 = region.bits.iter().map(|w| u64::from(w.count_ones())).sum();
            let full = if region.pages_per_host_page == 1 {
                pages
            } else {
                (0..region.host_pages())
                    .filter(|&h| region.host_page_full(h))
                    .count() as u64
            };
            tracker.ballooned_pages += pages;
            tracker.full_host_pages_bytes += full * Self::host_page_bytes(region);
        }
        tracker
    }

    /// Marks every wholly ballooned host page as waiting to be punched, so
    /// the next `take_punches` frees it again (what a backend that died
    /// with punches pending had not freed yet). Call only once the guest is
    /// known to still hold this balloon.
    pub fn punch_all_again(&mut self) {
        let mut pending_bytes = 0;
        for region in &mut self.regions {
            let host_bytes = Self::host_page_bytes(region);
            for host_page in 0..region.host_pages() {
                if region.host_page_full(host_page)
                    && update_bit(&mut region.pending, host_page, true)
                {
                    pending_bytes += host_bytes;
                }
            }
        }
        self.pending_bytes += pending_bytes;
    }

    /// Puts the pages of `runs` (per region, as `ballooned_runs` gives
    /// them) in the balloon, pending: a migration's destination, whose
    /// guest RAM was refilled, frees them again at the next punch.
    pub fn inflate_runs(&mut self, runs: &[Vec<(u64, u64)>]) {
        for (region, region_runs) in runs.iter().enumerate() {
            for &(first_page, pages) in region_runs {
                self.inflate(&PageRun {
                    region,
                    first_page,
                    pages,
                });
            }
        }
    }

    /// Whether one 4 KiB page of a region is in the balloon.
    pub fn is_ballooned(&self, region: usize, page: u64) -> bool {
        self.regions
            .get(region)
            .is_some_and(|r| bit_is_set(&r.bits, page))
    }

    pub fn ballooned_pages(&self) -> u64 {
        self.ballooned_pages
    }

    /// Host memory freed for pages that are still in the balloon.
    pub fn discarded_bytes(&self) -> u64 {
        self.full_host_pages_bytes
            .saturating_sub(self.pending_bytes)
    }

    /// Host memory wholly ballooned but not punched yet.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Heap bytes the bookkeeping holds (for the footprint bench).
    pub fn heap_bytes(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| ((r.bits.len() + r.pending.capacity()) * 8) as u64)
            .sum()
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

    /// The ballooned pages of each region as (first page, pages) runs, in
    /// order: what a saved state carries.
    pub fn ballooned_runs(&self) -> Vec<Vec<(u64, u64)>> {
        self.regions
            .iter()
            .map(|region| {
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for (word_index, word) in region.bits.iter().enumerate() {
                    let mut word = *word;
                    while word != 0 {
                        let page = word_index as u64 * 64 + u64::from(word.trailing_zeros());
                        word &= word - 1;
                        match runs.last_mut() {
                            Some((first, pages)) if *first + *pages == page => *pages += 1,
                            _ => runs.push((page, 1)),
                        }
                    }
                }
                runs
            })
            .collect()
    }

    /// Forgets every ballooned page (the guest was reset: its balloon is
    /// gone and its driver starts over).
    pub fn clear(&mut self) {
        for region in &mut self.regions {
            region.bits.fill(0);
            region.pending.fill(0);
        }
        self.ballooned_pages = 0;
        self.full_host_pages_bytes = 0;
        self.pending_bytes = 0;
    }

    pub fn inflate(&mut self, run: &PageRun) -> InflateOutcome {
        let mut outcome = InflateOutcome::default();
        let Some(region) = self.regions.get_mut(run.region) else {
            return outcome;
        };
        let end = run.first_page.saturating_add(run.pages).min(region.pages);
        let per = region.pages_per_host_page;
        let host_bytes = Self::host_page_bytes(region);
        let (host_first, host_end) = Self::host_pages_of(region, run);
        for host_page in host_first..host_end {
            let was_full = region.host_page_full(host_page);
            let first = (host_page * per).max(run.first_page);
            let last = ((host_page + 1) * per).min(end);
            for page in first..last {
                if update_bit(&mut region.bits, page, true) {
                    outcome.added_pages += 1;
                } else {
                    outcome.already_ballooned += 1;
                }
            }
            if !was_full && region.host_page_full(host_page) {
                update_bit(&mut region.pending, host_page, true);
                outcome.newly_pending_bytes += host_bytes;
            }
        }
        self.full_host_pages_bytes += outcome.newly_pending_bytes;
        self.pending_bytes += outcome.newly_pending_bytes;
        self.ballooned_pages += outcome.added_pages;
        outcome
    }

    pub fn deflate(&mut self, run: &PageRun) -> DeflateOutcome {
        let mut outcome = DeflateOutcome::default();
        let Some(region) = self.regions.get_mut(run.region) else {
            return outcome;
        };
        let end = run.first_page.saturating_add(run.pages).min(region.pages);
        let per = region.pages_per_host_page;
        let host_bytes = Self::host_page_bytes(region);
        let (host_first, host_end) = Self::host_pages_of(region, run);
        let (mut broken_bytes, mut cancelled_bytes) = (0, 0);
        for host_page in host_first..host_end {
            let was_full = region.host_page_full(host_page);
            let first = (host_page * per).max(run.first_page);
            let last = ((host_page + 1) * per).min(end);
            for page in first..last {
                if update_bit(&mut region.bits, page, false) {
                    outcome.removed_pages += 1;
                } else {
                    outcome.not_ballooned += 1;
                }
            }
            if was_full && !region.host_page_full(host_page) {
                broken_bytes += host_bytes;
                // The guest gets this page back: it must never be punched.
                if update_bit(&mut region.pending, host_page, false) {
                    cancelled_bytes += host_bytes;
                }
            }
        }
        self.full_host_pages_bytes -= broken_bytes;
        self.pending_bytes -= cancelled_bytes;
        self.ballooned_pages -= outcome.removed_pages;
        outcome
    }

    /// The pending punches as runs, in order; pending pages with only
    /// wholly ballooned host pages between them share one run (punching
    /// those again is harmless). Clears them.
    pub fn take_punches(&mut self) -> Vec<ByteRun> {
        let mut runs = Vec::new();
        if self.pending_bytes == 0 {
            return runs;
        }
        for (index, region) in self.regions.iter_mut().enumerate() {
            let host_bytes = Self::host_page_bytes(region);
            let to_run = |first: u64, end: u64| ByteRun {
                region: index,
                offset_bytes: first * host_bytes,
                len_bytes: (end - first) * host_bytes,
            };
            // The run being built: its first and one-past-last host page,
            // and where the ballooned stretch it lies in ends.
            let mut open: Option<(u64, u64, u64)> = None;
            for word_index in 0..region.pending.len() {
                let mut word = region.pending.get(word_index).copied().unwrap_or(0);
                while word != 0 {
                    let host_page = word_index as u64 * 64 + u64::from(word.trailing_zeros());
                    word &= word - 1;
                    match open.as_mut() {
                        Some((_, end, stretch_end)) if host_page < *stretch_end => {
                            *end = host_page + 1;
                        }
                        _ => {
                            if let Some((first, end, _)) = open {
                                runs.push(to_run(first, end));
                            }
                            let stretch_end = region.full_stretch_end(host_page);
                            open = Some((host_page, host_page + 1, stretch_end));
                        }
                    }
                }
            }
            if let Some((first, end, _)) = open {
                runs.push(to_run(first, end));
            }
            region.pending.fill(0);
        }
        self.pending_bytes = 0;
        runs
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

    impl BalloonTracker {
        /// A copy of the page bits, as a state file would keep them.
        fn bits_copy(&self) -> Vec<Box<dyn PageBits>> {
            self.regions
                .iter()
                .map(|r| Box::new(r.bits.to_vec()) as Box<dyn PageBits>)
                .collect()
        }
    }

    fn bytes(offset_bytes: u64, len_bytes: u64) -> ByteRun {
        ByteRun {
            region: 0,
            offset_bytes,
            len_bytes,
        }
    }

    #[test]
    fn small_pages_are_punched_once_taken() {
        let mut tracker = BalloonTracker::new(&[(1 << 20, 4096)]);
        let outcome = tracker.inflate(&run(4, 3));
        assert_eq!(outcome.added_pages, 3);
        assert_eq!(outcome.newly_pending_bytes, 3 * 4096);
        assert_eq!(tracker.discarded_bytes(), 0);
        assert_eq!(tracker.take_punches(), vec![bytes(4 * 4096, 3 * 4096)]);
        assert_eq!(tracker.discarded_bytes(), 3 * 4096);
        assert!(tracker.take_punches().is_empty());
        let again = tracker.inflate(&run(6, 2));
        assert_eq!((again.added_pages, again.already_ballooned), (1, 1));
        assert_eq!(tracker.take_punches(), vec![bytes(7 * 4096, 4096)]);
        assert_eq!(tracker.discarded_bytes(), 4 * 4096);
        let back = tracker.deflate(&run(0, 8));
        assert_eq!((back.removed_pages, back.not_ballooned), (4, 4));
        assert_eq!(tracker.discarded_bytes(), 0);
        assert_eq!(tracker.ballooned_pages(), 0);
    }

    #[test]
    fn scattered_pages_coalesce_across_requests() {
        let mut tracker = BalloonTracker::new(&[(1 << 20, 4096)]);
        for page in [9, 3, 7, 4, 8, 5, 6, 130, 129] {
            tracker.inflate(&run(page, 1));
        }
        assert_eq!(
            tracker.take_punches(),
            vec![bytes(3 * 4096, 7 * 4096), bytes(129 * 4096, 2 * 4096)]
        );
        // Pages between two new ones were punched before: one call spans
        // them; a gap that is not ballooned splits the run.
        for page in [2, 10, 12] {
            tracker.inflate(&run(page, 1));
        }
        assert_eq!(
            tracker.take_punches(),
            vec![bytes(2 * 4096, 9 * 4096), bytes(12 * 4096, 4096)]
        );
    }

    #[test]
    fn a_deflated_page_is_never_punched() {
        let mut tracker = BalloonTracker::new(&[(1 << 20, 4096)]);
        tracker.inflate(&run(10, 5));
        tracker.deflate(&run(12, 1));
        assert_eq!(tracker.pending_bytes(), 4 * 4096);
        assert_eq!(
            tracker.take_punches(),
            vec![bytes(10 * 4096, 2 * 4096), bytes(13 * 4096, 2 * 4096)]
        );
    }

    #[test]
    fn huge_page_freed_only_when_complete_across_requests() {
        let mut tracker = BalloonTracker::new(&[(4 * HUGE, HUGE)]);
        assert_eq!(tracker.inflate(&run(512, 300)).newly_pending_bytes, 0);
        assert_eq!(tracker.inflate(&run(812, 212)).newly_pending_bytes, HUGE);
        assert_eq!(tracker.take_punches(), vec![bytes(HUGE, HUGE)]);
        assert_eq!(tracker.discarded_bytes(), HUGE);
        tracker.deflate(&run(600, 1));
        assert_eq!(tracker.discarded_bytes(), 0);
        // Putting the one page back completes the host page again.
        assert_eq!(tracker.inflate(&run(600, 1)).newly_pending_bytes, HUGE);
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
        assert!(tracker.take_punches().is_empty());
    }

    #[test]
    fn punches_are_due_by_size_or_age() {
        assert!(!punch_due(0, Duration::from_secs(10)));
        assert!(!punch_due(4096, Duration::ZERO));
        assert!(punch_due(4096, PUNCH_DELAY));
        assert!(punch_due(PUNCH_PENDING_CAP_BYTES, Duration::ZERO));
    }

    #[test]
    fn kept_bits_are_taken_as_punched_and_migrated_runs_as_pending() {
        let regions = [(1 << 20, 4096), (4 * HUGE, HUGE)];
        let mut tracker = BalloonTracker::new(&regions);
        tracker.inflate(&run(3, 5));
        tracker.inflate(&PageRun {
            region: 1,
            first_page: 512,
            pages: 600,
        });
        let runs = tracker.ballooned_runs();
        assert_eq!(runs, vec![vec![(3, 5)], vec![(512, 600)]]);
        let mut refilled = BalloonTracker::new(&regions);
        refilled.inflate_runs(&runs);
        assert_eq!(refilled.pending_bytes(), 5 * 4096 + HUGE);
        assert_eq!(refilled.discarded_bytes(), 0);
        let mut same_ram = BalloonTracker::kept_in(&regions, tracker.bits_copy(), true);
        assert_eq!(same_ram.pending_bytes(), 0);
        assert_eq!(same_ram.discarded_bytes(), 5 * 4096 + HUGE);
        assert_eq!(same_ram.ballooned_pages(), 605);
        assert_eq!(same_ram.ballooned_runs(), runs);
        same_ram.punch_all_again();
        assert_eq!(same_ram.pending_bytes(), 5 * 4096 + HUGE);
        assert_eq!(
            same_ram.take_punches(),
            vec![
                bytes(3 * 4096, 5 * 4096),
                ByteRun {
                    region: 1,
                    offset_bytes: HUGE,
                    len_bytes: HUGE
                }
            ]
        );
        // Bits past a region's end are dropped; storage of the wrong
        // length is replaced; without `keep` the storage is cleared.
        let small = [(100 * 4096, 4096)];
        let past_end: Vec<Box<dyn PageBits>> = vec![Box::new(vec![u64::MAX, u64::MAX])];
        assert_eq!(
            BalloonTracker::kept_in(&small, past_end, true).ballooned_pages(),
            100
        );
        let wrong: Vec<Box<dyn PageBits>> = vec![Box::new(vec![u64::MAX])];
        assert_eq!(
            BalloonTracker::kept_in(&small, wrong, true).ballooned_pages(),
            0
        );
        let cleared: Vec<Box<dyn PageBits>> = vec![Box::new(vec![u64::MAX, u64::MAX])];
        assert_eq!(
            BalloonTracker::kept_in(&small, cleared, false).ballooned_pages(),
            0
        );
        let mut cleared = same_ram;
        cleared.clear();
        assert_eq!(cleared.ballooned_pages() + cleared.discarded_bytes(), 0);
        assert_eq!(cleared.ballooned_runs(), vec![vec![], vec![]]);
    }

    proptest! {
        /// Against a plain model: every punched byte is wholly ballooned
        /// when it is punched (so a page the guest got back is never
        /// punched), every wholly ballooned host page has been punched
        /// once punches were taken, and the counters match.
        #[test]
        fn tracking_matches_a_simple_model(
            ops in proptest::collection::vec((0u8..3, 0u64..2048, 1u64..600), 1..60),
            huge in any::<bool>(),
        ) {
            let host_page = if huge { HUGE } else { 4096 };
            let pages = 2048u64;
            let per = (host_page / 4096) as usize;
            let mut tracker = BalloonTracker::new(&[(pages * 4096, host_page)]);
            let mut model = vec![false; pages as usize];
            let full = |model: &[bool], h: u64| {
                model[h as usize * per..(h as usize + 1) * per].iter().all(|b| *b)
            };
            let mut punched = std::collections::BTreeSet::new();
            for (op, first, count) in ops {
                let r = run(first, count);
                if op == 2 {
                    for d in tracker.take_punches() {
                        prop_assert_eq!(d.offset_bytes % host_page, 0);
                        prop_assert_eq!(d.len_bytes % host_page, 0);
                        prop_assert!(d.len_bytes > 0);
                        for h in (d.offset_bytes / host_page)..((d.offset_bytes + d.len_bytes) / host_page) {
                            prop_assert!(full(&model, h), "host page {} punched while not wholly ballooned", h);
                            punched.insert(h);
                        }
                    }
                    for h in 0..pages / per as u64 {
                        prop_assert_eq!(full(&model, h), punched.contains(&h), "host page {}", h);
                    }
                    prop_assert_eq!(tracker.pending_bytes(), 0);
                    continue;
                }
                if op == 0 {
                    tracker.inflate(&r);
                } else {
                    tracker.deflate(&r);
                }
                for p in first..(first + count).min(pages) {
                    model[p as usize] = op == 0;
                }
                // A host page stays punched only while all its pieces are ballooned.
                punched.retain(|h| full(&model, *h));
                prop_assert_eq!(tracker.ballooned_pages(), model.iter().filter(|b| **b).count() as u64);
                prop_assert_eq!(tracker.discarded_bytes(), punched.len() as u64 * host_page);
                let full_count = (0..pages / per as u64).filter(|h| full(&model, *h)).count() as u64;
                prop_assert_eq!(tracker.discarded_bytes() + tracker.pending_bytes(), full_count * host_page);
            }
            // Kept bits restore the same pages and the same freed memory.
            let restored = BalloonTracker::kept_in(&[(pages * 4096, host_page)], tracker.bits_copy(), true);
            prop_assert_eq!(restored.ballooned_runs(), tracker.ballooned_runs());
            prop_assert_eq!(restored.ballooned_pages(), tracker.ballooned_pages());
            prop_assert_eq!(restored.discarded_bytes(), tracker.discarded_bytes() + tracker.pending_bytes());
            let expected: Vec<bool> = (0..pages).map(|p| restored.is_ballooned(0, p)).collect();
            prop_assert_eq!(expected, model);
        }
    }
}
