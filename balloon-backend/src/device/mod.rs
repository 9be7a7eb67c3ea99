//! The virtio-balloon device: its state and the operator's API (targets,
//! status, statistics on request). The queue handlers are in `queues`, the
//! vhost-user backend trait in `vhost`. Decisions come from the pure modules
//! (`pfn`, `tracker`, `stats`, `virtio_config`); memory is freed through
//! `host_memory`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use std::os::fd::{AsRawFd, RawFd};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::chain::{bounded_chain, ChainCut, MAX_CHAIN_DESCRIPTORS};
use crate::config_change::{find_backend_channel, ConfigChangeNotifier, FdDirectory};
use crate::faults::{Fault, FaultLog};
use crate::features::{self, FeatureSwitches, QueueRole, MAX_QUEUES};
use crate::host_memory::GuestRam;
use crate::pfn::{self, RamRegion, RangeError, PAGE_SIZE_BYTES};
use crate::seccomp::SeccompMode;
use crate::state_file::{KeptRegion, KeptSettings, StateFile};
use crate::stats::{self, GuestStats};
use crate::tracker::{punch_due, BalloonTracker, PageBits, PUNCH_DELAY};
use crate::virtio_config::ConfigSpace;

mod queues;
mod transfer;
mod vhost_backend;

pub use transfer::TransferError;

/// Guest RAM as the backend maps it: every write the device makes to it
/// (used rings) is marked in QEMU's dirty log while a migration runs.
pub type GuestRamMap = GuestMemoryMmap<BitmapMmapRegion>;
type GuestMemory = GuestMemoryAtomic<GuestRamMap>;
type ChainMemory = GuestMemoryLoadGuard<GuestRamMap>;
/// A vring over guest RAM with the migration dirty log.
pub type BalloonVring = VringRwLock<GuestMemory>;

/// Event id of a statistics request (the eventfd `request_stats` writes):
/// ids up to `MAX_QUEUES` are the queues and the exit event, so custom
/// events start above that.
pub const STATS_REQUEST_EVENT: u16 = MAX_QUEUES as u16 + 1;
/// Event id of the `--stats-interval` timerfd.
pub const STATS_INTERVAL_EVENT: u16 = MAX_QUEUES as u16 + 2;
/// Event id of the timer that carries out deferred punches.
pub const PUNCH_EVENT: u16 = MAX_QUEUES as u16 + 3;
/// Largest queue the device accepts (the reporting queue needs 32 entries).
const MAX_QUEUE_SIZE: usize = 1024;
/// Bytes read from one request at most: Linux sends 256 PFNs (1 KiB).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Bytes read from one stats buffer at most (Linux sends 16 records).
const MAX_STATS_BYTES: usize = 4096;

/// Settings fixed for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSettings {
    pub switches: FeatureSwitches,
    pub max_reclaim_percent: u8,
    /// How vring worker threads confine themselves on their first event.
    pub seccomp: SeccompMode,
    /// Seconds between statistics refreshes; 0 refreshes only on request.
    pub stats_interval_s: u64,
    /// The saved-state version written and accepted
    /// (`saved_state::STATE_VERSION` but in compatibility tests).
    pub state_version: u32,
}

/// The outcome of a set-target request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetOutcome {
    pub target_bytes: u64,
    pub clamped: bool,
    pub notified: bool,
    pub pinned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no guest is attached yet, so guest RAM size is unknown")]
    NoGuest,
    #[error(
        "the target is pinned by an operator (balloonctl set); only a pinning set-target changes it until `balloonctl unpin` hands it back"
    )]
    Pinned,
}

/// A snapshot for the control socket.
#[derive(Clone, Debug)]
pub struct DeviceStatus {
    pub connected: bool,
    pub guest_ram_bytes: u64,
    pub target_bytes: u64,
    pub actual_bytes: u64,
    pub max_reclaim_bytes: u64,
    pub ballooned_bytes: u64,
    pub discarded_bytes: u64,
    pub pending_punch_bytes: u64,
    pub reported_bytes_total: u64,
    pub resident_bytes: Option<u64>,
    pub acked_features: u64,
    pub config_notify: bool,
    pub stats: Option<GuestStats>,
    pub errors: Vec<(&'static str, u64)>,
    pub pinned: bool,
    pub discard_cpu: Duration,
}

#[derive(Default)]
struct DeviceState {
    acked_features: u64,
    event_idx: bool,
    roles: Vec<QueueRole>,
    memory: Option<GuestMemory>,
    ram: GuestRam,
    layout: Vec<RamRegion>,
    tracker: BalloonTracker,
    config: ConfigSpace,
    stats: Option<GuestStats>,
    /// Bumped on every stats update, so waiters can tell fresh from old.
    stats_generation: u64,
    /// Head index of the stats buffer the device is holding.
    held_stats: Option<u16>,
    /// The vrings, kept to rewind the stats queue when it is stopped.
    vrings: Vec<BalloonVring>,
    reported_bytes_total: u64,
    connected: bool,
    /// An operator's target holds until it is unpinned.
    pinned: bool,
    /// CPU time spent inside discard calls (the kernel freeing memory).
    discard_cpu: Duration,
    /// When the oldest pending punch was queued.
    pending_since: Option<Instant>,
    /// The punch timer will fire for the pending punches.
    punch_timer_armed: bool,
    /// A loaded state whose bitmap waits for guest RAM.
    incoming: Option<transfer::Incoming>,
    /// The device restarted with a balloon: the first event checks that
    /// the guest did not start over (`check_restart`).
    restart_check: bool,
    /// With `--state-file`: where the tracker's bits live and the settings
    /// are kept (`state_file`).
    state_file: Option<StateFile>,
    /// The balloon was taken over from the state file: once the first
    /// event shows the guest still holds it, it is punched again.
    taken_over: bool,
}

impl DeviceState {
    /// Keeps what the state file holds beside the bitmap (config space,
    /// pin, counter): call after changing any of them.
    fn keep_settings(&mut self) {
        if let Some(file) = &mut self.state_file {
            file.keep_settings(&KeptSettings {
                config: self.config.to_bytes(),
                pinned: self.pinned,
                reported_bytes_total: self.reported_bytes_total,
            });
        }
    }

    /// Guest RAM as the state file records it.
    fn kept_regions(&self) -> Vec<KeptRegion> {
        self.ram
            .shape()
            .into_iter()
            .zip(self.ram.file_identities())
            .map(
                |((start_gpa, size_bytes, host_page_bytes), file)| KeptRegion {
                    start_gpa,
                    size_bytes,
                    host_page_bytes,
                    file,
                },
            )
            .collect()
    }

    /// An empty balloon for the current guest RAM, its bits in the state
    /// file when there is one.
    fn start_empty_balloon(&mut self) {
        // Any bits the old tracker holds in the file must go first.
        self.tracker = BalloonTracker::default();
        let regions = self.ram.tracker_regions();
        let kept = self.kept_regions();
        let storage = match self.state_file.as_mut().map(|file| file.lay_out(&kept)) {
            Some(Some(bits)) => bits
                .into_iter()
                .map(|b| Box::new(b) as Box<dyn PageBits>)
                .collect(),
            Some(None) => {
                warn!(
                    "the state file has no room for this guest RAM ({} regions, {} MiB; it keeps at most {} regions and {} GiB): this balloon is not kept across a restart",
                    kept.len(),
                    self.ram.total_bytes() >> 20,
                    crate::state_file::MAX_REGIONS,
                    crate::state_file::MAX_KEPT_RAM_BYTES >> 30
                );
                Vec::new()
            }
            None => Vec::new(),
        };
        self.tracker = BalloonTracker::kept_in(&regions, storage, false);
    }

    /// Takes over the balloon a backend before this one kept in the state
    /// file for this very guest RAM; says whether there was one.
    fn take_over_kept_balloon(&mut self) -> bool {
        let kept = self.kept_regions();
        let Some(file) = self.state_file.as_mut() else {
            return false;
        };
        self.tracker = BalloonTracker::default();
        let Some(bits) = file.take_over(&kept) else {
            return false;
        };
        let settings = file.kept_settings();
        let storage = bits
            .into_iter()
            .map(|b| Box::new(b) as Box<dyn PageBits>)
            .collect();
        self.tracker = BalloonTracker::kept_in(&self.ram.tracker_regions(), storage, true);
        self.config = ConfigSpace::from_bytes(settings.config);
        self.pinned = settings.pinned;
        self.reported_bytes_total = settings.reported_bytes_total;
        true
    }
}

/// The balloon device, shared by the vhost-user worker and the control socket.
pub struct BalloonDevice {
    settings: DeviceSettings,
    state: Mutex<DeviceState>,
    stats_updated: Condvar,
    notifier: Mutex<Option<ConfigChangeNotifier>>,
    /// Where the backend request channel is looked for.
    open_fds: FdDirectory,
    /// Written by `request_stats`; the worker hands the stats buffer back.
    stats_request: EventFd,
    /// Expires every `stats_interval_s`, in the worker's epoll set: one
    /// wake-up per interval and no thread of its own.
    stats_interval: Option<Mutex<TimerFd>>,
    /// One-shot timer, in the worker's epoll set, that punches what inflate
    /// requests left pending once `PUNCH_DELAY` has passed.
    punch_timer: Mutex<TimerFd>,
    /// Set when the punch timer could not join the worker's epoll set:
    /// then every inflate request is punched at once.
    punch_at_once: AtomicBool,
    faults: FaultLog,
    /// The device-state transfer QEMU started, until it checks it.
    transfer: Mutex<Option<transfer::Transfer>>,
}

/// A periodic timer of `interval_s` seconds, armed now; None for 0.
fn stats_interval_timer(interval_s: u64) -> io::Result<Option<TimerFd>> {
    if interval_s == 0 {
        return Ok(None);
    }
    let interval = Duration::from_secs(interval_s);
    let mut timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    timer
        .reset(interval, Some(interval))
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    Ok(Some(timer))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl BalloonDevice {
    pub fn new(settings: DeviceSettings) -> io::Result<Self> {
        Ok(BalloonDevice {
            settings,
            state: Mutex::new(DeviceState::default()),
            stats_updated: Condvar::new(),
            notifier: Mutex::new(None),
            open_fds: FdDirectory::open()?,
            stats_request: EventFd::new(EFD_NONBLOCK)?,
            stats_interval: stats_interval_timer(settings.stats_interval_s)?.map(Mutex::new),
            punch_timer: Mutex::new(
                TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?,
            ),
            punch_at_once: AtomicBool::new(false),
            faults: FaultLog::default(),
            transfer: Mutex::new(None),
        })
    }

    fn state(&self) -> MutexGuard<'_, DeviceState> {
        // A panic while holding the lock would be a bug; keep serving anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn faults(&self) -> &FaultLog {
        &self.faults
    }

    /// The eventfd written to ask for fresh statistics.
    pub fn stats_request(&self) -> &EventFd {
        &self.stats_request
    }

    /// The interval timer's descriptor, when statistics refresh on a timer.
    pub fn stats_interval_fd(&self) -> Option<RawFd> {
        let timer = self.stats_interval.as_ref()?;
        Some(timer.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd())
    }

    /// The punch timer's descriptor.
    pub fn punch_timer_fd(&self) -> RawFd {
        self.punch_timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd()
    }

    /// After inflate requests: punches what is pending if it is due, and
    /// otherwise makes sure the punch timer will.
    fn schedule_punches(&self) {
        let mut state = self.state();
        let pending_bytes = state.tracker.pending_bytes();
        if pending_bytes == 0 {
            return;
        }
        let since = *state.pending_since.get_or_insert_with(Instant::now);
        // A driver without MUST_TELL_HOST may use a page it deflates before
        // telling us, so nothing of its may wait to be punched.
        let may_defer = features::has(state.acked_features, features::MUST_TELL_HOST)
            && !self.punch_at_once.load(Ordering::Relaxed);
        if !may_defer || punch_due(pending_bytes, since.elapsed()) {
            self.punch_locked(&mut state);
            return;
        }
        if state.punch_timer_armed {
            return;
        }
        let left = PUNCH_DELAY.saturating_sub(since.elapsed());
        let mut timer = self.punch_timer.lock().unwrap_or_else(|e| e.into_inner());
        // A zero duration would disarm the timer.
        match timer.reset(left.max(Duration::from_micros(1)), None) {
            Ok(()) => state.punch_timer_armed = true,
            Err(error) => {
                self.faults.record(Fault::TimerFailed, 1, || {
                    format!("arming the punch timer: {error}; punching now")
                });
                drop(timer);
                self.punch_locked(&mut state);
            }
        }
    }

    /// Keeps the balloon and the settings in `file` from now on; a balloon
    /// it holds for the guest RAM that arrives next is taken over.
    pub fn keep_state_in(&self, file: StateFile) {
        self.state().state_file = Some(file);
    }

    /// Gives up deferring: inflate requests are punched as they complete.
    pub fn punch_without_timer(&self) {
        self.punch_at_once.store(true, Ordering::Relaxed);
    }

    /// The punch timer fired: take its expiration and punch.
    fn punch_timer_fired(&self) {
        {
            let mut timer = self.punch_timer.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(error) = timer.wait() {
                self.faults.record(Fault::TimerFailed, 1, || {
                    format!("reading the punch timer: {error}")
                });
            }
        }
        let mut state = self.state();
        state.punch_timer_armed = false;
        self.punch_locked(&mut state);
    }

    /// Punches every pending host page now (what the punch timer does;
    /// also before the rings stop, so a guest that is reset or rebooted
    /// never gets a page that is punched afterwards).
    pub fn punch_pending(&self) {
        let mut state = self.state();
        self.punch_locked(&mut state);
    }

    fn punch_locked(&self, state: &mut DeviceState) {
        state.pending_since = None;
        for run in state.tracker.take_punches() {
            self.discard(state, &run);
        }
    }

    /// Frees a run of guest RAM, counting the CPU time it takes; says
    /// whether it worked.
    fn discard(&self, state: &mut DeviceState, run: &pfn::ByteRun) -> bool {
        let started = crate::cpu_clock::thread_cpu_time();
        let result = state.ram.discard(run);
        state.discard_cpu += crate::cpu_clock::thread_cpu_time().saturating_sub(started);
        match result {
            Ok(()) => true,
            Err(error) => {
                self.faults
                    .record(Fault::DiscardFailed, 1, || error.to_string());
                false
            }
        }
    }

    /// Takes the interval timer's expirations (it is readable: the worker
    /// was woken for it), so that epoll stops reporting it.
    fn drain_stats_interval(&self) {
        if let Some(timer) = &self.stats_interval {
            let mut timer = timer.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(error) = timer.wait() {
                self.faults.record(Fault::TimerFailed, 1, || {
                    format!("reading the stats interval timer: {error}")
                });
            }
        }
    }

    /// Asks the worker to return the held stats buffer to the guest.
    pub fn request_stats(&self) {
        if let Err(error) = self.stats_request.write(1) {
            self.faults.record(Fault::StatsRequestFailed, 1, || {
                format!("asking for statistics: {error}")
            });
        }
    }

    /// Whether a guest is attached (a frontend sent its memory table).
    pub fn guest_attached(&self) -> bool {
        let state = self.state();
        state.connected && state.ram.total_bytes() > 0
    }

    /// Requests fresh statistics and waits up to `timeout` for them.
    pub fn refresh_stats(&self, timeout: Duration) -> Option<GuestStats> {
        let generation = self.state().stats_generation;
        self.request_stats();
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while state.stats_generation == generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = match self.stats_updated.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.stats.clone()
    }

    pub fn max_reclaim_bytes(&self, guest_ram_bytes: u64) -> u64 {
        let bytes = guest_ram_bytes * u64::from(self.settings.max_reclaim_percent) / 100;
        bytes - bytes % PAGE_SIZE_BYTES
    }

    /// Sets the balloon size (memory taken from the guest), clamped to the
    /// maximum reclaim, and tells the guest. With `pin`, the target holds
    /// against later requests without it until `unpin`.
    pub fn set_target(
        &self,
        requested_bytes: u64,
        pin: bool,
    ) -> Result<TargetOutcome, TargetError> {
        let (target_bytes, clamped) = {
            let mut state = self.state();
            let ram = state.ram.total_bytes();
            if !state.connected || ram == 0 {
                return Err(TargetError::NoGuest);
            }
            if state.pinned && !pin {
                return Err(TargetError::Pinned);
            }
            state.pinned |= pin;
            let limit = self.max_reclaim_bytes(ram);
            let clamped = requested_bytes > limit;
            let bytes = requested_bytes.min(limit);
            let pages = u32::try_from(bytes / PAGE_SIZE_BYTES).unwrap_or(u32::MAX);
            state.config.set_num_pages(pages);
            state.keep_settings();
            (u64::from(pages) * PAGE_SIZE_BYTES, clamped)
        };
        if clamped {
            info!("target of {requested_bytes} bytes clamped to the maximum reclaim of {target_bytes} bytes");
        }
        // Sent without holding the state lock: QEMU may read the config
        // (GET_CONFIG, served by the worker) before it acknowledges.
        let notified = self.notify_config_change();
        Ok(TargetOutcome {
            target_bytes,
            clamped,
            notified,
            pinned: pin,
        })
    }

    /// Releases an operator's pin; says whether there was one.
    pub fn unpin(&self) -> bool {
        let mut state = self.state();
        let was = std::mem::take(&mut state.pinned);
        state.keep_settings();
        was
    }

    fn notify_config_change(&self) -> bool {
        let mut notifier = self.notifier.lock().unwrap_or_else(|e| e.into_inner());
        let Some(channel) = notifier.as_mut() else {
            return false;
        };
        match channel.notify() {
            Ok(()) => true,
            Err(error) => {
                self.faults
                    .record(Fault::ConfigNotifyFailed, 1, || error.to_string());
                *notifier = None;
                false
            }
        }
    }

    pub fn status(&self) -> DeviceStatus {
        // Walking the memory file's extents can take a while on a fragmented
        // file: measure on a clone, outside the device lock.
        let (ram, connected) = {
            let state = self.state();
            (state.ram.clone(), state.connected)
        };
        let resident_bytes = match ram.resident_bytes() {
            Ok(bytes) if connected => Some(bytes),
            Ok(_) => None,
            Err(error) => {
                warn!("{error}");
                None
            }
        };
        let state = self.state();
        let guest_ram_bytes = state.ram.total_bytes();
        DeviceStatus {
            connected: state.connected,
            guest_ram_bytes,
            target_bytes: u64::from(state.config.num_pages()) * PAGE_SIZE_BYTES,
            actual_bytes: u64::from(state.config.actual()) * PAGE_SIZE_BYTES,
            max_reclaim_bytes: self.max_reclaim_bytes(guest_ram_bytes),
            ballooned_bytes: state.tracker.ballooned_pages() * PAGE_SIZE_BYTES,
            discarded_bytes: state.tracker.discarded_bytes(),
            pending_punch_bytes: state.tracker.pending_bytes(),
            reported_bytes_total: state.reported_bytes_total,
            resident_bytes,
            acked_features: state.acked_features,
            config_notify: self.notifier.lock().map(|n| n.is_some()).unwrap_or(false),
            stats: state.stats.clone(),
            errors: self.faults.snapshot(),
            pinned: state.pinned,
            discard_cpu: state.discard_cpu,
        }
    }

    /// vhost-user-base never sends RESET_DEVICE, so a guest reset looks to
    /// the backend like a pause: a stop, then the same memory table. The
    /// rings tell them apart: a reset guest's inflate queue starts again at
    /// index 0, a resumed one where it stopped. A kept bitmap of a reset
    /// guest would count its pages as ballooned and let a later punch run
    /// span them, so it is dropped here, before any request is read. (A
    /// resumed ring that wrapped to exactly 0 loses its bitmap too: the
    /// accounting, never a page.)
    fn check_restart(&self, state: &mut DeviceState, vrings: &[BalloonVring]) {
        // Until QEMU has set the ring up again (a timer may fire first) its
        // index is the one from before the stop.
        let Some(inflate) = vrings
            .first()
            .filter(|ring| state.restart_check && ring.get_ref().get_queue().ready())
        else {
            return;
        };
        state.restart_check = false;
        let taken_over = std::mem::take(&mut state.taken_over);
        if inflate.queue_next_avail() == 0 && state.tracker.ballooned_pages() > 0 {
            info!(
                "the guest's queues started over (a reset): its balloon of {} MiB is gone",
                (state.tracker.ballooned_pages() * PAGE_SIZE_BYTES) >> 20
            );
            state.tracker.clear();
            // The new driver starts with an empty balloon and writes
            // `actual` only after its first request.
            state.config.driver_reset();
            state.keep_settings();
        } else if taken_over {
            // The guest still holds the balloon a backend before us kept:
            // free what that one had not punched yet when it died.
            state.tracker.punch_all_again();
            self.punch_locked(state);
        }
    }

    /// Marks the frontend gone (the vhost-user connection ended). Its guest
    /// is gone with it (QEMU exited or restarts): the next frontend starts
    /// with an empty balloon, and the state file holds none.
    pub fn disconnected(&self) {
        let mut state = self.state();
        self.punch_locked(&mut state);
        state.tracker.clear();
        state.taken_over = false;
        if let Some(file) = &mut state.state_file {
            file.forget();
        }
        // A migrated state belongs to the QEMU that loaded it: the next
        // frontend may bring another guest, whose pages must never be
        // punched after it.
        state.incoming = None;
        state.restart_check = false;
        state.connected = false;
        state.keep_settings();
        state.held_stats = None;
        state.vrings.clear();
        drop(state);
        if let Ok(mut notifier) = self.notifier.lock() {
            *notifier = None;
        }
    }
}
