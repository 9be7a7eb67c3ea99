//! The virtio-balloon device: the vhost-user backend trait implementation
//! and the request handling for each queue. Decisions come from the pure
//! modules (`pfn`, `tracker`, `stats`, `config_space`); memory is freed
//! through `host_memory`.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;
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

use crate::chain::{bounded_chain, ChainCut, MAX_CHAIN_DESCRIPTORS};
use crate::config_notify::{find_backend_channel, ConfigNotifier, FdDirectory};
use crate::config_space::ConfigSpace;
use crate::faults::{Fault, FaultLog};
use crate::features::{self, FeatureSwitches, QueueRole, MAX_QUEUES};
use crate::host_memory::GuestRam;
use crate::pfn::{self, RamRegion, RangeError, PAGE_SIZE_BYTES};
use crate::seccomp::SeccompMode;
use crate::stats::{self, GuestStats};
use crate::tracker::BalloonTracker;

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type ChainMemory = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// Event id of the stats timer: ids up to `MAX_QUEUES` are the queues and
/// the exit event, so custom events start above that.
pub const STATS_TIMER_EVENT: u16 = MAX_QUEUES as u16 + 1;
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
}

/// The outcome of a set-target request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetOutcome {
    pub target_bytes: u64,
    pub clamped: bool,
    pub notified: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no guest is attached yet, so guest RAM size is unknown")]
    NoGuest,
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
    pub reported_bytes_total: u64,
    pub resident_bytes: Option<u64>,
    pub acked_features: u64,
    pub config_notify: bool,
    pub stats: Option<GuestStats>,
    pub errors: Vec<(&'static str, u64)>,
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
    vrings: Vec<VringRwLock>,
    reported_bytes_total: u64,
    connected: bool,
}

/// The balloon device, shared by the vhost-user worker and the control socket.
pub struct BalloonDevice {
    settings: DeviceSettings,
    state: Mutex<DeviceState>,
    stats_updated: Condvar,
    notifier: Mutex<Option<ConfigNotifier>>,
    /// Where the backend request channel is looked for.
    open_fds: FdDirectory,
    stats_timer: EventFd,
    faults: FaultLog,
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
            stats_timer: EventFd::new(EFD_NONBLOCK)?,
            faults: FaultLog::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, DeviceState> {
        // A panic while holding the lock would be a bug; keep serving anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn faults(&self) -> &FaultLog {
        &self.faults
    }

    /// The eventfd the stats timer writes to ask for fresh statistics.
    pub fn stats_timer(&self) -> &EventFd {
        &self.stats_timer
    }

    /// Asks the worker to return the held stats buffer to the guest.
    pub fn request_stats(&self) {
        if let Err(error) = self.stats_timer.write(1) {
            self.faults.record(Fault::QueueFailure, 1, || {
                format!("waking the stats timer: {error}")
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
    /// maximum reclaim, and tells the guest.
    pub fn set_target(&self, requested_bytes: u64) -> Result<TargetOutcome, TargetError> {
        let (target_bytes, clamped) = {
            let mut state = self.state();
            let ram = state.ram.total_bytes();
            if !state.connected || ram == 0 {
                return Err(TargetError::NoGuest);
            }
            let limit = self.max_reclaim_bytes(ram);
            let clamped = requested_bytes > limit;
            let bytes = requested_bytes.min(limit);
            let pages = u32::try_from(bytes / PAGE_SIZE_BYTES).unwrap_or(u32::MAX);
            state.config.set_num_pages(pages);
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
        })
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
            reported_bytes_total: state.reported_bytes_total,
            resident_bytes,
            acked_features: state.acked_features,
            config_notify: self.notifier.lock().map(|n| n.is_some()).unwrap_or(false),
            stats: state.stats.clone(),
            errors: self.faults.snapshot(),
        }
    }

    /// Marks the frontend gone (the vhost-user connection ended).
    pub fn disconnected(&self) {
        let mut state = self.state();
        state.connected = false;
        state.held_stats = None;
        state.vrings.clear();
        drop(state);
        if let Ok(mut notifier) = self.notifier.lock() {
            *notifier = None;
        }
    }

    fn process_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let (role, event_idx, memory) = {
            let state = self.state();
            (
                state.roles.get(index).copied(),
                state.event_idx,
                state.memory.clone(),
            )
        };
        let (Some(role), Some(memory)) = (role, memory) else {
            return Ok(());
        };
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            self.drain(role, vring, &memory)?;
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    fn drain(&self, role: QueueRole, vring: &VringRwLock, memory: &GuestMemory) -> io::Result<()> {
        let mut used_any = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(memory.memory());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match role {
                QueueRole::Inflate | QueueRole::Deflate => {
                    self.handle_pfn_request(role, chain);
                    used_any |= self.complete(vring, head);
                }
                QueueRole::Reporting => {
                    self.handle_report(chain);
                    used_any |= self.complete(vring, head);
                }
                QueueRole::Stats => used_any |= self.handle_stats_buffer(vring, chain),
                QueueRole::FreePageHint => used_any |= self.complete(vring, head),
            }
        }
        if used_any {
            self.signal(vring);
        }
        Ok(())
    }

    /// Puts a chain in the used ring with length 0 (nothing written back).
    fn complete(&self, vring: &VringRwLock, head: u16) -> bool {
        match vring.add_used(head, 0) {
            Ok(()) => true,
            Err(error) => {
                self.faults.record(Fault::QueueFailure, 1, || {
                    format!("add_used({head}): {error}")
                });
                false
            }
        }
    }

    fn signal(&self, vring: &VringRwLock) {
        let needed = vring.needs_notification().unwrap_or(true);
        if needed {
            if let Err(error) = vring.signal_used_queue() {
                self.faults.record(Fault::QueueFailure, 1, || {
                    format!("signalling the guest: {error}")
                });
            }
        }
    }

    /// The descriptors of a chain, cut at a loop or at
    /// `MAX_CHAIN_DESCRIPTORS`, each cut counted under its own name.
    fn descriptors(&self, chain: DescriptorChain<ChainMemory>) -> Vec<Descriptor> {
        let head = chain.head_index();
        let (descriptors, cut) = bounded_chain(head, chain);
        match cut {
            Some(ChainCut::Loop) => self.faults.record(Fault::DescriptorChainLoop, 1, || {
                format!("descriptor chain at head {head} loops; the rest is ignored")
            }),
            Some(ChainCut::TooLong) => self.faults.record(Fault::DescriptorChainTooLong, 1, || {
                format!(
                    "descriptor chain at head {head} has more than {MAX_CHAIN_DESCRIPTORS} descriptors; the rest is ignored"
                )
            }),
            None => {}
        }
        descriptors
    }

    /// Reads the readable descriptors of a chain, up to `limit` bytes.
    fn read_chain(&self, chain: DescriptorChain<ChainMemory>, limit: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        let memory = chain.memory().clone();
        for descriptor in self.descriptors(chain) {
            if descriptor.is_write_only() {
                self.faults.record(Fault::WriteOnlyDescriptor, 1, || {
                    format!(
                        "write-only descriptor at {:#x} in a device-readable request",
                        descriptor.addr().0
                    )
                });
                continue;
            }
            let len = descriptor.len() as usize;
            if bytes.len().saturating_add(len) > limit {
                self.faults.record(Fault::RequestTooLong, 1, || {
                    format!("request longer than {limit} bytes; the rest is ignored")
                });
                break;
            }
            let start = bytes.len();
            bytes.resize(start + len, 0);
            if let Err(error) = memory.read_slice(&mut bytes[start..], descriptor.addr()) {
                bytes.truncate(start);
                self.faults.record(Fault::DescriptorOutsideRam, 1, || {
                    format!(
                        "descriptor {:#x}+{len} is not in guest RAM: {error}",
                        descriptor.addr().0
                    )
                });
            }
        }
        bytes
    }

    fn handle_pfn_request(&self, role: QueueRole, chain: DescriptorChain<ChainMemory>) {
        let bytes = self.read_chain(chain, MAX_REQUEST_BYTES);
        let (pfns, trailing) = pfn::parse_pfns(&bytes);
        if trailing {
            self.faults.record(Fault::TrailingBytes, 1, || {
                format!(
                    "PFN request of {} bytes is not a multiple of 4",
                    bytes.len()
                )
            });
        }
        let mut state = self.state();
        let batch = pfn::compact_pfns(&state.layout, pfns);
        self.faults
            .record(Fault::PfnOutsideRam, batch.outside_ram as u64, || {
                format!("{} PFNs outside guest RAM skipped", batch.outside_ram)
            });
        self.faults
            .record(Fault::DuplicatePfn, batch.duplicates as u64, || {
                format!("{} duplicate PFNs in one request", batch.duplicates)
            });
        let state = &mut *state;
        for run in &batch.runs {
            if role == QueueRole::Deflate {
                let outcome = state.tracker.deflate(run);
                self.faults
                    .record(Fault::DeflateNotInflated, outcome.not_ballooned, || {
                        format!(
                            "{} deflated pages were not in the balloon",
                            outcome.not_ballooned
                        )
                    });
                continue;
            }
            let outcome = state.tracker.inflate(run);
            self.faults
                .record(Fault::AlreadyInflated, outcome.already_ballooned, || {
                    format!("{} pages inflated twice", outcome.already_ballooned)
                });
            for discard in &outcome.discard {
                if let Err(error) = state.ram.discard(discard) {
                    self.faults
                        .record(Fault::DiscardFailed, 1, || error.to_string());
                }
            }
        }
    }

    fn poison_blocks_discard(&self, state: &DeviceState) -> bool {
        features::has(state.acked_features, features::PAGE_POISON) && state.config.poison_val() != 0
    }

    fn handle_report(&self, chain: DescriptorChain<ChainMemory>) {
        let mut state = self.state();
        let skip_discard = self.poison_blocks_discard(&state);
        for descriptor in self.descriptors(chain) {
            if !descriptor.is_write_only() {
                self.faults.record(Fault::ReadOnlyDescriptor, 1, || {
                    format!(
                        "read-only descriptor at {:#x} in a free page report",
                        descriptor.addr().0
                    )
                });
                continue;
            }
            let run = match pfn::locate_range(
                &state.layout,
                descriptor.addr().0,
                u64::from(descriptor.len()),
            ) {
                Ok(run) => run,
                Err(error) => {
                    let fault = match error {
                        RangeError::Empty => Fault::ReportEmptyRange,
                        RangeError::Unaligned => Fault::ReportUnalignedRange,
                        RangeError::OutsideRam => Fault::ReportOutsideRam,
                        RangeError::CrossesRegionEnd => Fault::ReportCrossesRegionEnd,
                    };
                    self.faults.record(fault, 1, || {
                        format!(
                            "reported range {:#x}+{:#x} refused",
                            descriptor.addr().0,
                            descriptor.len()
                        )
                    });
                    continue;
                }
            };
            if skip_discard {
                continue;
            }
            // Only whole host pages can be freed.
            let host_page = state.ram.host_page_bytes(run.region);
            let start = (run.first_page * PAGE_SIZE_BYTES).next_multiple_of(host_page);
            let end = (run.first_page + run.pages) * PAGE_SIZE_BYTES;
            let end = end - end % host_page;
            if end <= start {
                continue;
            }
            let range = crate::tracker::ByteRun {
                region: run.region,
                offset_bytes: start,
                len_bytes: end - start,
            };
            match state.ram.discard(&range) {
                Ok(()) => state.reported_bytes_total += range.len_bytes,
                Err(error) => self
                    .faults
                    .record(Fault::DiscardFailed, 1, || error.to_string()),
            }
        }
    }

    /// Parses a stats buffer and holds it; returns whether a chain was used.
    fn handle_stats_buffer(
        &self,
        vring: &VringRwLock,
        chain: DescriptorChain<ChainMemory>,
    ) -> bool {
        let head = chain.head_index();
        let bytes = self.read_chain(chain, MAX_STATS_BYTES);
        let (stats, notes) = stats::parse(&bytes, now_unix_ms());
        self.faults
            .record(Fault::StatsUnknownTag, notes.unknown_tags as u64, || {
                format!("{} unknown stats tags ignored", notes.unknown_tags)
            });
        self.faults.record(
            Fault::TrailingBytes,
            notes.trailing_bytes.min(1) as u64,
            || {
                format!(
                    "stats buffer has {} bytes after the last record",
                    notes.trailing_bytes
                )
            },
        );
        let previous = {
            let mut state = self.state();
            // What the balloon held when the guest measured these values,
            // so a policy can tell memory a landing step already took.
            let balloon_bytes = u64::from(state.config.actual()) * PAGE_SIZE_BYTES;
            state.stats = Some(GuestStats {
                balloon_bytes: Some(balloon_bytes),
                ..stats
            });
            state.stats_generation += 1;
            state.held_stats.replace(head)
        };
        self.stats_updated.notify_all();
        debug!("guest statistics updated");
        // The driver has one stats buffer; give back any older one at once.
        match previous {
            Some(old) => {
                self.faults.record(Fault::StatsExtraBuffer, 1, || {
                    "guest queued a second stats buffer; returning the older one".to_string()
                });
                self.complete(vring, old)
            }
            None => false,
        }
    }

    /// The stats timer fired: hand the held buffer back so the guest
    /// refreshes it, or pick up a buffer that is waiting (after a rewind).
    fn stats_timer_fired(&self, vrings: &[VringRwLock]) -> io::Result<()> {
        // Drain the eventfd; a spurious wake-up is harmless.
        let _drained = self.stats_timer.read();
        let (index, held) = {
            let mut state = self.state();
            let index = state.roles.iter().position(|r| *r == QueueRole::Stats);
            (index, state.held_stats.take())
        };
        let Some(vring) = index.and_then(|i| vrings.get(i)) else {
            return Ok(());
        };
        match held {
            Some(head) => {
                if self.complete(vring, head) {
                    self.signal(vring);
                }
                Ok(())
            }
            None => match index {
                Some(i) => self.process_queue(i, vring),
                None => Ok(()),
            },
        }
    }
}

impl VhostUserBackend for BalloonDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        features::offered(self.settings.switches)
    }

    fn acked_features(&self, acked: u64) {
        let mut state = self.state();
        state.acked_features = acked;
        state.roles = features::queue_roles(acked);
        info!(
            "guest acked features: {}",
            features::names(acked).join(", ")
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        let mut state = self.state();
        state.acked_features = 0;
        state.roles.clear();
        state.held_stats = None;
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state().event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match self.state().config.read(offset, size as usize) {
            Ok(bytes) => bytes,
            Err(error) => {
                self.faults
                    .record(Fault::ConfigOutOfRange, 1, || error.to_string());
                Vec::new()
            }
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        match state.config.write(offset, buf) {
            Ok(effect) => {
                if effect.poison_changed {
                    info!(
                        "guest page poison value is {:#x}",
                        state.config.poison_val()
                    );
                }
                Ok(())
            }
            Err(error) => {
                // Counted, not returned: an error here makes the vhost crate
                // drop the whole frontend connection.
                self.faults
                    .record(Fault::ConfigOutOfRange, 1, || error.to_string());
                Ok(())
            }
        }
    }

    fn update_memory(&self, memory: GuestMemory) -> io::Result<()> {
        let ram = GuestRam::from_memory(&memory.memory())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut state = self.state();
        info!(
            "guest RAM: {} MiB in {} region(s)",
            ram.total_bytes() >> 20,
            ram.layout().len()
        );
        state.layout = ram.layout();
        state.tracker = BalloonTracker::new(&ram.tracker_regions());
        state.ram = ram;
        state.memory = Some(memory);
        state.connected = true;
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let mut notifier = self.notifier.lock().unwrap_or_else(|e| e.into_inner());
        // Our copy of an older channel would make the search ambiguous.
        *notifier = None;
        match find_backend_channel(&self.open_fds) {
            Ok(stream) => {
                info!("backend request channel found: config-change notifications enabled");
                *notifier = Some(ConfigNotifier::new(stream));
            }
            Err(error) => {
                self.faults.record(Fault::ConfigNotifyFailed, 1, || {
                    format!("{error}; the guest will see new targets only when it reads its config")
                });
            }
        }
        // Our duplicate (if any) keeps the channel open.
        drop(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair per daemon instance: the daemon's worker thread
        // exits only when its own exit event fires.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(error) => {
                warn!("cannot create an exit event: {error}");
                None
            }
        }
    }

    fn stop_vring(&self, index: u32) -> io::Result<()> {
        let mut state = self.state();
        if state.roles.get(index as usize) != Some(&QueueRole::Stats) {
            return Ok(());
        }
        // Rewind over the held stats buffer so that it is popped again once
        // the ring restarts, instead of being lost (as QEMU does).
        if state.held_stats.take().is_some() {
            if let Some(vring) = state.vrings.get(index as usize) {
                let next = vring.queue_next_avail();
                vring.set_queue_next_avail(next.wrapping_sub(1));
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        crate::seccomp::confine_vring_worker_once(self.settings.seccomp);
        if evset != EventSet::IN {
            return Ok(());
        }
        {
            let mut state = self.state();
            if state.vrings.is_empty() {
                state.vrings = vrings.to_vec();
            }
        }
        if device_event == STATS_TIMER_EVENT {
            return self.stats_timer_fired(vrings);
        }
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        if let Err(error) = self.process_queue(index, vring) {
            self.faults
                .record(Fault::QueueFailure, 1, || format!("queue {index}: {error}"));
        }
        Ok(())
    }
}
