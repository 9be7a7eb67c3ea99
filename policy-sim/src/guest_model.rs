//! The simulator's guest, one second at a time. Its RAM is split into the
//! balloon, the workload's resident working set, page cache, and free
//! memory; free memory is either clean (never touched, or handed back to
//! the host: by free page reporting or a deflated balloon) or dirty
//! (freed by the guest and still resident on the host).
//!
//! What the real guests taught the model, and how Linux does it:
//!
//! - **Free page reporting.** Memory the guest frees goes back to the host
//!   `REPORTING_DELAY_S` after it was freed (Linux's `page_reporting`
//!   works two seconds after the first free). Without reporting, memory
//!   the guest once used stays on the host until a balloon takes it.
//!   Reported pages go to the tail of the free lists, so allocations (the
//!   balloon's too) take freshly freed (dirty) pages first: a balloon on
//!   an idle reporting guest takes clean pages and returns nothing.
//! - **The balloon driver.** A new target starts the driver, which moves
//!   at most `INFLATE_BYTES_PER_S` / `DEFLATE_BYTES_PER_S`. Inflating takes
//!   free memory, then page cache (cold before hot), then working set into
//!   swap while swap has room; it never OOM-kills (`__GFP_NORETRY`): what
//!   it cannot take it tries again next second (direct reclaim).
//! - **Deflate-on-OOM.** When the workload needs memory that neither free
//!   memory, page cache nor swap can give, the driver hands balloon pages
//!   back, `OOM_DEFLATE_BYTES` per out-of-memory event (Linux's
//!   `VIRTIO_BALLOON_OOM_NR_PAGES`, 256 pages), and stops moving towards
//!   the target until the host sets a new one (the device's `actual` stays
//!   below its target). Past an empty balloon (or without the feature):
//!   an OOM kill.
//! - **Demand faster than a tick.** The workload's wishes are read every
//!   second, so a working set that grows by a GiB per second plays out
//!   between two policy ticks. The workload touches at most
//!   `WORKING_SET_GROWTH_BYTES_PER_S` of new working set per second; it
//!   reads its hot page cache back at up to `CACHE_READ_BYTES_PER_S`, and
//!   its cold page cache builds up over `COLD_CACHE_FILL_S` (it reads new
//!   files now and then): cache a balloon or the agent took comes back
//!   that slowly.
//! - **The guest agent's reclaim** (`drop_cache`) drops page cache, cold
//!   before hot; the freed pages are reported like any others.
//! - **Stalls.** Each second a guest stalls for a share of it, as PSI
//!   `some` measures: all of it while working set is swapped out or an OOM
//!   event happens, the missing share of its hot page cache while that is
//!   re-read from disk, a tenth of it while its allocations hit the low
//!   watermark. `psi_some_avg10` is that share's 10-second average, what
//!   the guest agent reports.
//!
//! Pure: no I/O; one call of `Guest::second` is one second.

use balloon_policy::policy::GuestCounters;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Seconds from a free to its report (Linux: `PAGE_REPORTING_DELAY`, 2 s).
pub const REPORTING_DELAY_S: usize = 2;
/// Freed memory by whole seconds since its free: reported when it leaves
/// the last bucket.
const DIRTY_BUCKETS: usize = REPORTING_DELAY_S + 1;
/// The most the balloon driver inflates per second.
pub const INFLATE_BYTES_PER_S: u64 = 1 << 30;
/// The most it deflates per second when asked to.
pub const DEFLATE_BYTES_PER_S: u64 = 4 << 30;
/// The most page cache a guest reads in per second (a disk's bandwidth),
/// for the hot part the workload keeps reading...
pub const CACHE_READ_BYTES_PER_S: u64 = 256 << 20;
/// ...while its cold part, read once, builds up over this long (the
/// workload reads new files now and then)...
pub const COLD_CACHE_FILL_S: u64 = 600;
/// ...but at least at this pace.
pub const COLD_CACHE_READ_MIN_BYTES_PER_S: u64 = 1 << 20;
/// The most working set a guest's workload touches per second.
pub const WORKING_SET_GROWTH_BYTES_PER_S: u64 = 2 << 30;
/// What one out-of-memory event takes back from the balloon.
pub const OOM_DEFLATE_BYTES: u64 = MIB;
/// When the working set and hot cache leave less than this share (percent)
/// of its memory, a guest's allocations stall (direct reclaim), as Linux's
/// low watermark makes them.
pub const LOW_WATERMARK_SHARE: u64 = 2;
/// The stall share of a second in which allocations hit the watermark.
const WATERMARK_STALL: f64 = 0.1;
/// PSI's `avg10` window.
const PSI_WINDOW_S: f64 = 10.0;

/// What the workload wants this second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Want {
    pub working_set_bytes: u64,
    pub cache_bytes: u64,
    /// The part of `cache_bytes` the workload keeps reading.
    pub hot_cache_bytes: u64,
}

/// The guest's balloon features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub free_page_reporting: bool,
    pub deflate_on_oom: bool,
}

impl Default for Features {
    /// What balloon-backend offers and a current Linux guest accepts.
    fn default() -> Self {
        Features {
            free_page_reporting: true,
            deflate_on_oom: true,
        }
    }
}

/// What happened to the guest in one second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Second {
    /// Share of the second some task of the guest stalled on memory (0-1).
    pub stall: f64,
    pub oom_kills: u64,
    /// Out-of-memory events the balloon answered by deflating (each
    /// `OOM_DEFLATE_BYTES`).
    pub oom_deflate_events: u64,
    /// Working set that did not fit in memory (swapped or killed).
    pub missing_working_set_bytes: u64,
    /// Hot page cache that had to be read again from disk.
    pub reread_bytes: u64,
}

/// One guest: its RAM, swap, features and the state of its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Guest {
    ram: u64,
    swap: u64,
    features: Features,
    /// The balloon's size (`actual`).
    balloon: u64,
    /// The host's target.
    target: u64,
    /// The driver works towards the target.
    moving: bool,
    working_set: u64,
    swapped: u64,
    cache: u64,
    clean: u64,
    /// Freed memory still on the host, by seconds since it was freed.
    dirty: [u64; DIRTY_BUCKETS],
    counters: GuestCounters,
    psi_some_avg10: f64,
    /// Seconds over which the cold page cache builds up the first time...
    cold_cache_fill_s: u64,
    /// ...and comes back after it was lost.
    cold_cache_refill_s: u64,
    /// The page cache has reached what the workload keeps once.
    cache_filled: bool,
}

/// Takes up to `want` from `pool`; returns what it took.
fn take(pool: &mut u64, want: u64) -> u64 {
    let got = want.min(*pool);
    *pool -= got;
    got
}

fn add(counter: &mut Option<u64>, amount: u64) {
    *counter = Some(counter.unwrap_or(0).saturating_add(amount));
}

impl Guest {
    /// A guest that has just booted: nothing of its RAM touched yet.
    pub fn new(ram_bytes: u64, swap_bytes: u64, features: Features) -> Self {
        Guest {
            ram: ram_bytes,
            swap: swap_bytes,
            features,
            balloon: 0,
            target: 0,
            moving: false,
            working_set: 0,
            swapped: 0,
            cache: 0,
            clean: ram_bytes,
            dirty: [0; DIRTY_BUCKETS],
            counters: GuestCounters {
                swap_in: Some(0),
                major_faults: Some(0),
                alloc_stalls: Some(0),
                direct_reclaims: Some(0),
                oom_kills: Some(0),
            },
            psi_some_avg10: 0.0,
            cold_cache_fill_s: COLD_CACHE_FILL_S,
            cold_cache_refill_s: COLD_CACHE_FILL_S,
            cache_filled: false,
        }
    }

    /// A workload that builds its cold page cache up over `fill_s` the
    /// first time and brings back what it lost over `refill_s` (each at
    /// least 1: at once, at the disk's pace).
    pub fn with_cold_cache_pace(mut self, fill_s: u64, refill_s: u64) -> Self {
        self.cold_cache_fill_s = fill_s.max(1);
        self.cold_cache_refill_s = refill_s.max(1);
        self
    }

    pub fn ram_bytes(&self) -> u64 {
        self.ram
    }

    /// The balloon's size now (the device's `actual`).
    pub fn balloon_bytes(&self) -> u64 {
        self.balloon
    }

    /// The host's target (the device's `target`).
    pub fn target_bytes(&self) -> u64 {
        self.target
    }

    /// The host sets a target; a changed one starts the driver.
    pub fn set_target(&mut self, bytes: u64) {
        let bytes = bytes.min(self.ram);
        if bytes != self.target {
            self.target = bytes;
            self.moving = true;
        }
    }

    /// MemFree.
    pub fn free_bytes(&self) -> u64 {
        self.clean.saturating_add(self.dirty.iter().sum::<u64>())
    }

    /// MemAvailable: free memory and page cache.
    pub fn available_bytes(&self) -> u64 {
        self.free_bytes().saturating_add(self.cache)
    }

    pub fn cache_bytes(&self) -> u64 {
        self.cache
    }

    /// Working set resident in memory.
    pub fn working_set_bytes(&self) -> u64 {
        self.working_set
    }

    /// What the host holds for this guest: everything but the balloon and
    /// clean free memory.
    pub fn resident_bytes(&self) -> u64 {
        self.working_set
            .saturating_add(self.cache)
            .saturating_add(self.dirty.iter().sum::<u64>())
    }

    pub fn counters(&self) -> GuestCounters {
        self.counters
    }

    /// PSI memory `some` avg10, percent.
    pub fn psi_some_avg10(&self) -> f64 {
        self.psi_some_avg10
    }

    /// The guest agent reclaims up to `bytes` of page cache (cold first,
    /// as `memory.reclaim` takes the inactive list first); returns what it
    /// dropped.
    pub fn drop_cache(&mut self, bytes: u64) -> u64 {
        let dropped = take(&mut self.cache, bytes);
        self.free_dirty(dropped);
        dropped
    }

    /// Takes free memory: freshly freed pages first (reported ones sit at
    /// the tail of the free lists), then clean ones.
    fn take_free(&mut self, want: u64) -> u64 {
        let mut got = 0;
        for bucket in self.dirty.iter_mut() {
            got += take(bucket, want - got);
        }
        got + take(&mut self.clean, want - got)
    }

    fn free_dirty(&mut self, bytes: u64) {
        if let Some(fresh) = self.dirty.first_mut() {
            *fresh = fresh.saturating_add(bytes);
        }
    }

    /// The balloon driver's second.
    fn drive_balloon(&mut self) {
        if !self.moving {
            return;
        }
        if self.target < self.balloon {
            let back = (self.balloon - self.target).min(DEFLATE_BYTES_PER_S);
            self.balloon -= back;
            self.clean += back;
        } else if self.target > self.balloon {
            let mut need = (self.target - self.balloon).min(INFLATE_BYTES_PER_S);
            let mut got = self.take_free(need);
            need -= got;
            let from_cache = take(&mut self.cache, need);
            need -= from_cache;
            let swap_room = self.swap.saturating_sub(self.swapped);
            let from_working_set = take(&mut self.working_set, need.min(swap_room));
            self.swapped += from_working_set;
            need -= from_working_set;
            got += from_cache + from_working_set;
            self.balloon += got;
            if need > 0 {
                // Nothing left to take: the driver retries next second.
                add(&mut self.counters.direct_reclaims, 1);
            }
        }
        if self.balloon == self.target {
            self.moving = false;
        }
    }

    /// One second of the workload wanting `want`.
    pub fn second(&mut self, want: Want) -> Second {
        let mut out = Second::default();
        self.drive_balloon();
        // Swapped working set comes back as soon as there is room (free
        // memory, then page cache).
        if self.swapped > 0 {
            let mut back = self.take_free(self.swapped);
            back += take(&mut self.cache, self.swapped - back);
            self.swapped -= back;
            self.working_set += back;
            add(&mut self.counters.swap_in, back);
            add(&mut self.counters.major_faults, back / PAGE);
        }
        // The working set moves to what the workload wants.
        let total = self.working_set + self.swapped;
        if want.working_set_bytes < total {
            let mut release = total - want.working_set_bytes;
            release -= take(&mut self.swapped, release);
            let freed = take(&mut self.working_set, release);
            self.free_dirty(freed);
        } else if want.working_set_bytes > total {
            let mut need = (want.working_set_bytes - total).min(WORKING_SET_GROWTH_BYTES_PER_S);
            let got = self.take_free(need);
            need -= got;
            let from_cache = take(&mut self.cache, need);
            need -= from_cache;
            self.working_set += got + from_cache;
            // Room made by swapping other working set out.
            let to_swap = need.min(self.swap.saturating_sub(self.swapped));
            self.swapped += to_swap;
            need -= to_swap;
            if need > 0 && self.features.deflate_on_oom && self.balloon > 0 {
                let events = need.div_ceil(OOM_DEFLATE_BYTES);
                let back = events.saturating_mul(OOM_DEFLATE_BYTES).min(self.balloon);
                self.balloon -= back;
                let used = back.min(need);
                self.working_set += used;
                self.clean += back - used;
                need -= used;
                out.oom_deflate_events = back.div_ceil(OOM_DEFLATE_BYTES);
                // The driver leaves the target alone until the host sets
                // a new one.
                self.moving = false;
                add(&mut self.counters.alloc_stalls, 1);
            }
            if need > 0 {
                out.oom_kills = 1;
                add(&mut self.counters.oom_kills, 1);
                out.missing_working_set_bytes = need;
            }
        }
        out.missing_working_set_bytes += self.swapped;
        if self.swapped > 0 {
            // The workload touches its swapped pages: they fault in and
            // push others out.
            add(&mut self.counters.swap_in, self.swapped);
            add(&mut self.counters.major_faults, self.swapped / PAGE);
        }
        // Page cache: read into free memory up to what the workload keeps;
        // what it no longer keeps is dropped.
        if self.cache > want.cache_bytes {
            let dropped = self.cache - want.cache_bytes;
            self.cache -= dropped;
            self.free_dirty(dropped);
        } else {
            let hot_gap = want
                .hot_cache_bytes
                .min(want.cache_bytes)
                .saturating_sub(self.cache)
                .min(CACHE_READ_BYTES_PER_S);
            let pace_s = if self.cache_filled {
                self.cold_cache_refill_s
            } else {
                self.cold_cache_fill_s
            };
            let cold_pace = (want.cache_bytes / pace_s.max(1)).max(COLD_CACHE_READ_MIN_BYTES_PER_S);
            let pace = hot_gap.saturating_add(cold_pace);
            let read = self.take_free((want.cache_bytes - self.cache).min(pace));
            self.cache += read;
            if self.cache >= want.cache_bytes {
                self.cache_filled = true;
            }
        }
        // Cold cache goes first, so the hot part is what is left of it.
        // Hot cache not read yet while memory is free is only being read
        // (the first time); with no free memory left it is re-read.
        let hot = want.hot_cache_bytes.min(want.cache_bytes);
        let memory_bound = self.free_bytes() == 0;
        let hot_missing = if memory_bound {
            hot.saturating_sub(self.cache)
        } else {
            0
        };
        out.reread_bytes = hot_missing;
        add(&mut self.counters.major_faults, hot_missing / PAGE);
        let memory = self.ram - self.balloon;
        let watermark = memory * LOW_WATERMARK_SHARE / 100;
        let tight = want.working_set_bytes.saturating_add(hot) > memory.saturating_sub(watermark);
        if tight {
            add(&mut self.counters.alloc_stalls, 1);
            add(&mut self.counters.direct_reclaims, 1);
        }
        out.stall = if out.missing_working_set_bytes > 0 || out.oom_deflate_events > 0 {
            1.0
        } else {
            let reread = if hot == 0 {
                0.0
            } else {
                hot_missing as f64 / hot as f64
            };
            reread.max(if tight { WATERMARK_STALL } else { 0.0 })
        };
        let decay = (-1.0 / PSI_WINDOW_S).exp();
        self.psi_some_avg10 = self.psi_some_avg10 * decay + 100.0 * out.stall * (1.0 - decay);
        self.report_free_pages();
        out
    }

    /// Ages freed memory by a second; with free page reporting, what has
    /// waited `REPORTING_DELAY_S` goes back to the host.
    fn report_free_pages(&mut self) {
        if !self.features.free_page_reporting {
            // Nothing is reported: it all stays in the freshest bucket.
            let all: u64 = self.dirty.iter().sum();
            self.dirty = [0; DIRTY_BUCKETS];
            self.free_dirty(all);
            return;
        }
        let oldest = self.dirty.last().copied().unwrap_or(0);
        self.clean += oldest;
        self.dirty.rotate_right(1);
        if let Some(fresh) = self.dirty.first_mut() {
            *fresh = 0;
        }
    }

    /// RAM is conserved: balloon, working set, cache and free memory add
    /// up to it (the property tests check this after every second).
    pub fn conserved(&self) -> bool {
        self.balloon
            .checked_add(self.working_set)
            .and_then(|s| s.checked_add(self.cache))
            .and_then(|s| s.checked_add(self.free_bytes()))
            == Some(self.ram)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn want(ws_mib: u64, cache_mib: u64, hot_mib: u64) -> Want {
        Want {
            working_set_bytes: ws_mib * MIB,
            cache_bytes: cache_mib * MIB,
            hot_cache_bytes: hot_mib * MIB,
        }
    }

    #[test]
    fn freed_memory_goes_back_to_the_host_after_the_reporting_delay() {
        let mut guest = Guest::new(GIB, 0, Features::default());
        guest.second(want(600, 0, 0));
        assert_eq!(guest.resident_bytes(), 600 * MIB);
        guest.second(want(100, 0, 0));
        // Freed, still on the host for two seconds, then reported.
        assert_eq!(guest.resident_bytes(), 600 * MIB);
        guest.second(want(100, 0, 0));
        assert_eq!(guest.resident_bytes(), 600 * MIB);
        guest.second(want(100, 0, 0));
        assert_eq!(guest.resident_bytes(), 100 * MIB);
        // Without reporting it stays.
        let mut old = Guest::new(
            GIB,
            0,
            Features {
                free_page_reporting: false,
                deflate_on_oom: true,
            },
        );
        old.second(want(600, 0, 0));
        for _ in 0..10 {
            old.second(want(100, 0, 0));
        }
        assert_eq!(old.resident_bytes(), 600 * MIB);
        assert_eq!(old.free_bytes(), 924 * MIB);
    }

    #[test]
    fn a_balloon_on_reported_memory_returns_nothing_and_takes_cache_next() {
        let mut guest = Guest::new(GIB, 0, Features::default());
        // The cold cache builds up over ten minutes.
        for _ in 0..700 {
            guest.second(want(300, 400, 100));
        }
        // 324 MiB free, all clean (never touched).
        assert_eq!(guest.resident_bytes(), 700 * MIB);
        guest.set_target(324 * MIB);
        guest.second(want(300, 400, 100));
        assert_eq!(guest.resident_bytes(), 700 * MIB, "nothing returned");
        guest.set_target(624 * MIB);
        let s = guest.second(want(300, 400, 100));
        assert_eq!(guest.cache_bytes(), 100 * MIB);
        assert_eq!(guest.resident_bytes(), 400 * MIB);
        assert_eq!(s.reread_bytes, 0, "the cold cache went first");
        guest.set_target(700 * MIB);
        let s = guest.second(want(300, 400, 100));
        assert_eq!(s.reread_bytes, 76 * MIB);
        assert!(s.stall > 0.7 && s.stall < 0.8, "{s:?}");
    }

    #[test]
    fn deflate_on_oom_gives_balloon_pages_back_before_killing() {
        let mut guest = Guest::new(GIB, 0, Features::default());
        guest.second(want(200, 0, 0));
        guest.set_target(700 * MIB);
        guest.second(want(200, 0, 0));
        assert_eq!(guest.balloon_bytes(), 700 * MIB);
        // The working set grows by 300 MiB in one second: 124 MiB free,
        // 176 events of 1 MiB from the balloon.
        let s = guest.second(want(500, 0, 0));
        assert_eq!(s.oom_kills, 0);
        assert_eq!(s.oom_deflate_events, 176);
        assert_eq!(guest.balloon_bytes(), 524 * MIB);
        assert_eq!(guest.target_bytes(), 700 * MIB, "the target stays");
        assert_eq!(s.stall, 1.0);
        // The driver does not inflate again by itself.
        guest.second(want(500, 0, 0));
        assert_eq!(guest.balloon_bytes(), 524 * MIB);
        // Past an empty balloon: a kill.
        let s = guest.second(want(1100, 0, 0));
        assert_eq!(s.oom_kills, 1);
        assert_eq!(guest.balloon_bytes(), 0);
        // Without the feature: a kill at once.
        let mut plain = Guest::new(
            GIB,
            0,
            Features {
                free_page_reporting: true,
                deflate_on_oom: false,
            },
        );
        plain.set_target(700 * MIB);
        plain.second(want(200, 0, 0));
        let s = plain.second(want(500, 0, 0));
        assert_eq!((s.oom_kills, s.oom_deflate_events), (1, 0));
    }

    #[test]
    fn the_balloon_never_kills_it_swaps_or_waits() {
        let mut guest = Guest::new(GIB, 256 * MIB, Features::default());
        guest.second(want(900, 0, 0));
        guest.set_target(400 * MIB);
        let s = guest.second(want(900, 0, 0));
        // 124 MiB free, 256 MiB of working set swapped; the rest waits.
        assert_eq!(guest.balloon_bytes(), 380 * MIB);
        assert_eq!(s.oom_kills, 0);
        assert_eq!(s.missing_working_set_bytes, 256 * MIB);
        assert_eq!(s.stall, 1.0);
        // The host takes its target back: the working set returns.
        guest.set_target(0);
        let s = guest.second(want(900, 0, 0));
        assert_eq!(s.missing_working_set_bytes, 0);
        assert_eq!(guest.working_set_bytes(), 900 * MIB);
    }

    proptest! {
        /// Over any run: memory is conserved, the balloon stays within RAM,
        /// an OOM kill happens only when the balloon is empty (with
        /// deflate-on-OOM), and the guest's free memory that was reported
        /// is off the host.
        #[test]
        fn memory_adds_up_and_kills_wait_for_an_empty_balloon(
            ram_mib in 64u64..8192,
            swap_mib in 0u64..1024,
            fpr in any::<bool>(),
            steps in proptest::collection::vec((0u64..120, 0u64..120, 0u64..100, 0u64..100), 1..60),
        ) {
            let ram = ram_mib * MIB;
            let mut guest = Guest::new(ram, swap_mib * MIB, Features { free_page_reporting: fpr, deflate_on_oom: true });
            for (ws_pct, cache_pct, hot_pct, target_pct) in steps {
                guest.set_target(ram * target_pct / 100);
                let balloon_before = guest.balloon_bytes();
                let w = Want {
                    working_set_bytes: ram * ws_pct / 100,
                    cache_bytes: ram * cache_pct / 100,
                    hot_cache_bytes: ram * cache_pct / 100 * hot_pct / 100,
                };
                let s = guest.second(w);
                prop_assert!(guest.conserved(), "{:?}", guest);
                prop_assert!(guest.balloon_bytes() <= ram);
                prop_assert!(guest.resident_bytes() + guest.balloon_bytes() <= ram);
                if s.oom_kills > 0 {
                    prop_assert_eq!(guest.balloon_bytes(), 0, "killed with {} MiB ballooned (before {})", guest.balloon_bytes() / MIB, balloon_before / MIB);
                }
                prop_assert!((0.0..=1.0).contains(&s.stall));
            }
        }
    }
}
