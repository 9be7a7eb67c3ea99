//! A state file holding any bytes (a file of another program, a damaged
//! one): opening it never panics, and what it is taken over as is a
//! balloon inside the regions its header names.

#![no_main]

use balloon_backend::state_file::StateFile;
use balloon_backend::tracker::{BalloonTracker, PageBits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("balloon.state");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(mut file) = StateFile::open(&path) else {
        return;
    };
    let _settings = file.kept_settings();
    let Some(regions) = file.kept_regions() else {
        return;
    };
    // Keep the fuzzer's time on the header, not on giant bitmaps.
    if regions.iter().any(|r| r.size_bytes > 1 << 32) {
        return;
    }
    let Some(bits) = file.take_over(&regions) else {
        return;
    };
    let shape: Vec<(u64, u64)> = regions
        .iter()
        .map(|r| (r.size_bytes, r.host_page_bytes))
        .collect();
    let storage = bits
        .into_iter()
        .map(|b| Box::new(b) as Box<dyn PageBits>)
        .collect();
    let tracker = BalloonTracker::kept_in(&shape, storage, true);
    let pages: u64 = shape.iter().map(|(size, _)| size / 4096).sum();
    assert!(tracker.ballooned_pages() <= pages);
    assert!(tracker.discarded_bytes() <= shape.iter().map(|(size, _)| *size).sum::<u64>());
});
