//! A device state as a migration stream delivers it: any
//! bytes decode to a state or an error without panicking, and a state that
//! fits guest RAM restores a balloon that lies inside it.

#![no_main]

use balloon_backend::saved_state::{decode, STATE_VERSION};
use balloon_backend::tracker::BalloonTracker;
use libfuzzer_sys::fuzz_target;

/// Guest RAM of the target: two regions, 4 KiB and 2 MiB host pages.
const LAYOUT: [(u64, u64, u64); 2] = [(0, 8 << 20, 4096), (1 << 32, 16 << 20, 2 << 20)];

fuzz_target!(|data: &[u8]| {
    let Ok(state) = decode(data, STATE_VERSION) else {
        return;
    };
    if !state.fits(&LAYOUT) {
        return;
    }
    let mut tracker = BalloonTracker::new(&state.tracker_regions());
    tracker.inflate_runs(&state.ballooned_runs());
    let pages: u64 = LAYOUT.iter().map(|(_, size, _)| size / 4096).sum();
    assert!(tracker.ballooned_pages() <= pages);
    for (region, runs) in tracker.ballooned_runs().iter().enumerate() {
        let region_pages = LAYOUT[region].1 / 4096;
        assert!(runs.iter().all(|(first, n)| first + n <= region_pages));
    }
});
