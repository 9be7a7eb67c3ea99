//! What keeping the balloon in the state file (`--state-file`) costs: the
//! request path's bookkeeping (validate, coalesce, track) for 1 GiB of
//! scattered PFNs inflated and then deflated in requests of 256, with the
//! tracker's bits on the heap (no state file) and in the mapped state file
//! on a tmpfs (as `/run/balloon` is); no punches, so only the bookkeeping
//! is compared. Then what a restart adds: taking a 64 GiB guest's balloon
//! over from the file, and punching a 1 GiB balloon again over its holes.
//! Prints Markdown tables.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use balloon_backend::host_memory::{allocated_bytes, punch_hole, GuestRam};
use balloon_backend::pfn::{compact_pfns, RamRegion};
use balloon_backend::state_file::{KeptRegion, StateFile};
use balloon_backend::tracker::{BalloonTracker, PageBits};

// Shared with the inflate benches, of which this one needs only the mapping.
#[allow(dead_code)]
mod common;
use common::map_file;

const RAM_BYTES: u64 = 1 << 30;
const LARGE_RAM_BYTES: u64 = 64 << 30;
const PAGE: u64 = 4096;
const BATCH: usize = 256;
const REPEATS: usize = 5;

/// A deterministic shuffle (xorshift), so runs are comparable.
fn shuffled(mut pfns: Vec<u32>) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..pfns.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        pfns.swap(i, (state % (i as u64 + 1)) as usize);
    }
    pfns
}

fn region(size_bytes: u64) -> KeptRegion {
    KeptRegion {
        start_gpa: 0,
        size_bytes,
        host_page_bytes: PAGE,
        file: (1, 1),
    }
}

fn storage(file: &mut StateFile, size_bytes: u64) -> Vec<Box<dyn PageBits>> {
    file.lay_out(&[region(size_bytes)])
        .unwrap()
        .into_iter()
        .map(|bits| Box::new(bits) as Box<dyn PageBits>)
        .collect()
}

/// Inflates then deflates every PFN, a request at a time; the time taken.
fn requests(mut tracker: BalloonTracker, layout: &[RamRegion], pfns: &[u32]) -> Duration {
    let start = Instant::now();
    for batch in pfns.chunks(BATCH) {
        for run in compact_pfns(layout, batch.iter().copied()).runs {
            tracker.inflate(&run);
        }
    }
    assert_eq!(tracker.ballooned_pages() * PAGE, RAM_BYTES);
    for batch in pfns.chunks(BATCH) {
        for run in compact_pfns(layout, batch.iter().copied()).runs {
            tracker.deflate(&run);
        }
    }
    assert_eq!(tracker.ballooned_pages(), 0);
    start.elapsed()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut file = StateFile::open(&dir.path().join("balloon.state")).unwrap();
    let layout = [RamRegion {
        start_gpa: 0,
        size_bytes: RAM_BYTES,
    }];
    let regions = [(RAM_BYTES, PAGE)];
    let pfns = shuffled((0..(RAM_BYTES / PAGE) as u32).collect());

    let heap = median(
        (0..REPEATS)
            .map(|_| requests(BalloonTracker::new(&regions), &layout, &pfns))
            .collect(),
    );
    let kept = median(
        (0..REPEATS)
            .map(|_| {
                let bits = storage(&mut file, RAM_BYTES);
                requests(
                    BalloonTracker::kept_in(&regions, bits, false),
                    &layout,
                    &pfns,
                )
            })
            .collect(),
    );
    let requests_made = 2 * pfns.len().div_ceil(BATCH);
    println!("| 1 GiB scattered, inflated then deflated ({requests_made} requests of {BATCH} PFNs), bookkeeping only | time | per request | vs bits on the heap |");
    println!("|---|---|---|---|");
    for (name, time) in [
        ("baseline: bits on the heap (no `--state-file`)", heap),
        ("bits in the mapped state file (tmpfs)", kept),
    ] {
        println!(
            "| {name} | {:.3} s | {:.2} µs | {:.2}x |",
            time.as_secs_f64(),
            time.as_secs_f64() * 1e6 / requests_made as f64,
            time.as_secs_f64() / heap.as_secs_f64(),
        );
    }

    // A restart: the bits of a 64 GiB guest, 65 % ballooned, taken over.
    let large = [(LARGE_RAM_BYTES, PAGE)];
    let mut bits = storage(&mut file, LARGE_RAM_BYTES);
    let ballooned_words = bits[0].len() * 65 / 100;
    bits[0][..ballooned_words].fill(u64::MAX);
    drop(bits);
    let take_over = median(
        (0..REPEATS)
            .map(|_| {
                let start = Instant::now();
                let bits = file
                    .take_over(&[region(LARGE_RAM_BYTES)])
                    .unwrap()
                    .into_iter()
                    .map(|bits| Box::new(bits) as Box<dyn PageBits>)
                    .collect();
                let tracker = BalloonTracker::kept_in(&large, bits, true);
                let elapsed = start.elapsed();
                assert_eq!(tracker.ballooned_pages(), ballooned_words as u64 * 64);
                elapsed
            })
            .collect(),
    );
    // Punching a 1 GiB balloon again over its holes (what the restarted
    // backend does once the guest's first request shows it kept it).
    let memfd = test_support::memory::memfd("state-file-bench", RAM_BYTES).unwrap();
    let memory = map_file(&memfd, RAM_BYTES);
    let ram = GuestRam::from_memory(&memory).unwrap();
    let punch_again = median(
        (0..REPEATS)
            .map(|_| {
                let mut tracker = BalloonTracker::new(&ram.tracker_regions());
                for batch in pfns.chunks(BATCH) {
                    for run in compact_pfns(&layout, batch.iter().copied()).runs {
                        tracker.inflate(&run);
                    }
                }
                tracker.take_punches();
                punch_hole(&memfd, 0, RAM_BYTES).unwrap();
                let start = Instant::now();
                tracker.punch_all_again();
                for run in tracker.take_punches() {
                    ram.discard(&run).unwrap();
                }
                let elapsed = start.elapsed();
                assert_eq!(allocated_bytes(&memfd, 0, RAM_BYTES).unwrap(), 0);
                elapsed
            })
            .collect(),
    );
    println!();
    println!("| after a restart | time |");
    println!("|---|---|");
    println!(
        "| taking over a 64 GiB guest's balloon (65 %) from the state file | {:.1} ms |",
        take_over.as_secs_f64() * 1e3
    );
    println!(
        "| punching a 1 GiB balloon again over its holes | {:.1} ms |",
        punch_again.as_secs_f64() * 1e3
    );
}
