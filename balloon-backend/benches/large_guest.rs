//! A 64 GiB guest: its RAM a sparse memfd (nothing allocated, no real
//! guest), inflated in process to its 65 % limit through the device's path
//! (validate, coalesce, track, defer and punch), 256 PFNs per request from
//! the top of RAM down, as the Linux driver allocates them. Prints a
//! Markdown table: time, this process's peak RSS, and the bookkeeping's
//! share of guest RAM, which must stay under 0.01 %.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use balloon_backend::host_memory::GuestRam;

mod common;
use common::{map_file, InflatePath};

const RAM_BYTES: u64 = 64 << 30;
const PAGE: u64 = 4096;
const LIMIT_PERCENT: u64 = 65;
const BATCH: u32 = 256;
/// The bookkeeping may hold at most this share of guest RAM.
const BOOKKEEPING_LIMIT_PERCENT: f64 = 0.01;

/// A field of /proc/self/status, in KiB.
fn status_kib(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn main() {
    let file = test_support::memory::memfd("large-guest", RAM_BYTES).unwrap();
    let memory = map_file(&file, RAM_BYTES);
    let ram = GuestRam::from_memory(&memory).unwrap();
    let rss_before_kib = status_kib("VmRSS:");

    let start = Instant::now();
    let mut path = InflatePath::new(&ram);
    let total_pages = (RAM_BYTES / PAGE) as u32;
    let target_pages = (RAM_BYTES * LIMIT_PERCENT / 100 / PAGE) as u32;
    let mut next = total_pages;
    while next > total_pages - target_pages {
        let first = next.saturating_sub(BATCH).max(total_pages - target_pages);
        path.request((first..next).rev());
        next = first;
    }
    path.finish();
    let elapsed = start.elapsed();
    let (tracker, punches) = (&path.tracker, path.punches);

    let ballooned_bytes = tracker.ballooned_pages() * PAGE;
    assert_eq!(ballooned_bytes, u64::from(target_pages) * PAGE);
    assert_eq!(tracker.discarded_bytes(), ballooned_bytes);
    let bookkeeping_bytes = tracker.heap_bytes();
    let share_percent = bookkeeping_bytes as f64 * 100.0 / RAM_BYTES as f64;
    assert!(
        share_percent < BOOKKEEPING_LIMIT_PERCENT,
        "the balloon's bookkeeping holds {bookkeeping_bytes} bytes, {share_percent:.4} % of guest RAM"
    );
    let peak_kib = status_kib("VmHWM:");
    println!("| 64 GiB guest RAM (sparse memfd), inflated in process to its {LIMIT_PERCENT} % limit | figure | limit |");
    println!("|---|---|---|");
    println!(
        "| time to inflate {:.1} GiB ({} requests of {BATCH} PFNs, {punches} punches) | {:.2} s | |",
        ballooned_bytes as f64 / (1u64 << 30) as f64,
        target_pages.div_ceil(BATCH),
        elapsed.as_secs_f64()
    );
    println!(
        "| balloon bitmap and punch bookkeeping | {:.1} MiB = {share_percent:.4} % of guest RAM | < {BOOKKEEPING_LIMIT_PERCENT} % |",
        bookkeeping_bytes as f64 / (1u64 << 20) as f64
    );
    println!(
        "| peak RSS of the process (before inflating: {:.1} MiB) | {:.1} MiB | |",
        rss_before_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
}
