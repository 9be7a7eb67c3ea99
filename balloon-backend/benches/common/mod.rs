//! What the inflate benches share: guest RAM mapped from a file, and the
//! device's inflate path with its punch rule.

use std::fs::File;
use std::time::Instant;

use balloon_backend::host_memory::GuestRam;
use balloon_backend::pfn::{compact_pfns, RamRegion};
use balloon_backend::tracker::{punch_due, BalloonTracker};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// `bytes` of guest RAM at address 0, backed by `file`.
pub fn map_file(file: &File, bytes: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        bytes as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap()
}

/// The device's inflate path (validate, coalesce, track) with its punch
/// rule: after each request, pending punches are carried out when
/// `punch_due` says so (the device's timer is not needed here: requests
/// come faster than its delay), and what is left by `finish`.
pub struct InflatePath<'a> {
    ram: &'a GuestRam,
    layout: Vec<RamRegion>,
    pub tracker: BalloonTracker,
    pending_since: Option<Instant>,
    /// `fallocate` calls made.
    pub punches: u64,
}

impl<'a> InflatePath<'a> {
    pub fn new(ram: &'a GuestRam) -> Self {
        InflatePath {
            ram,
            layout: ram.layout(),
            tracker: BalloonTracker::new(&ram.tracker_regions()),
            pending_since: None,
            punches: 0,
        }
    }

    fn punch(&mut self) {
        for run in self.tracker.take_punches() {
            self.ram.discard(&run).unwrap();
            self.punches += 1;
        }
        self.pending_since = None;
    }

    /// One inflate request of `pfns`.
    pub fn request(&mut self, pfns: impl IntoIterator<Item = u32>) {
        for run in compact_pfns(&self.layout, pfns).runs {
            self.tracker.inflate(&run);
        }
        let since = *self.pending_since.get_or_insert_with(Instant::now);
        if punch_due(self.tracker.pending_bytes(), since.elapsed()) {
            self.punch();
        }
    }

    /// Punches what is still pending.
    pub fn finish(&mut self) {
        self.punch();
    }
}
