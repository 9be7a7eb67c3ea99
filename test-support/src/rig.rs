//! The device in this process, without vhost-user: `BalloonDevice` with
//! vrings over memfd guest RAM, fed descriptor chains directly. Fast enough
//! for property tests over long random request sequences.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use balloon_backend::device::{BalloonDevice, DeviceSettings, DeviceStatus, STATS_REQUEST_EVENT};
use balloon_backend::device::{BalloonVring, GuestRamMap};
use balloon_backend::features::{queue_roles, FeatureSwitches};
use balloon_backend::state_file::StateFile;
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::{
    fill_outside_ram, guest_memory, DriverQueue, DRIVER_FEATURES, MEMFD_BYTES, QUEUE_SIZE,
};

pub struct Rig {
    pub device: Arc<BalloonDevice>,
    pub memfd: File,
    pub mem: GuestRamMap,
    pub queues: Vec<DriverQueue>,
    vrings: Vec<BalloonVring>,
    atomic: GuestMemoryAtomic<GuestRamMap>,
    version: u32,
    state_file: Option<PathBuf>,
}

/// The features the rig's driver acks: all but event index.
fn rig_features() -> u64 {
    DRIVER_FEATURES & !(1 << 29)
}

/// A device as a backend process would start it, attached to `atomic`.
fn start_device(
    atomic: &GuestMemoryAtomic<GuestRamMap>,
    version: u32,
    state_file: Option<&Path>,
) -> Arc<BalloonDevice> {
    let device = Arc::new(
        BalloonDevice::new(DeviceSettings {
            switches: FeatureSwitches::default(),
            max_reclaim_percent: 75,
            // Test threads run the device in-process; they must stay free.
            seccomp: balloon_backend::seccomp::SeccompMode::Off,
            // Tests ask for statistics themselves.
            stats_interval_s: 0,
            state_version: version,
        })
        .unwrap(),
    );
    if let Some(path) = state_file {
        device.keep_state_in(StateFile::open(path).unwrap());
    }
    device.acked_features(rig_features());
    device.set_event_idx(false);
    device.update_memory(atomic.clone()).unwrap();
    device
}

/// Vrings over the rig's queues, started where the guest's used rings are
/// (as vhost-user-backend does at SET_VRING_ADDR) with the avail index
/// QEMU would send.
fn start_vrings(
    atomic: &GuestMemoryAtomic<GuestRamMap>,
    queues: &[DriverQueue],
    next_avail: impl Fn(usize) -> u16,
) -> Vec<BalloonVring> {
    queues
        .iter()
        .enumerate()
        .map(|(index, queue)| {
            let vring = BalloonVring::new(atomic.clone(), QUEUE_SIZE).unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            let (desc, avail, used) = queue.addresses();
            vring.set_queue_info(desc, avail, used).unwrap();
            let used_idx = vring.queue_used_idx().unwrap();
            vring.set_queue_next_used(used_idx);
            vring.set_queue_next_avail(next_avail(index));
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vring
        })
        .collect()
}

impl Rig {
    /// A device with every feature acked but event index, over guest RAM
    /// whose non-RAM parts of the file hold a sentinel.
    pub fn new() -> Rig {
        Self::with_state_version(balloon_backend::saved_state::STATE_VERSION)
    }

    /// Like `new`, speaking saved-state `version`.
    pub fn with_state_version(version: u32) -> Rig {
        Self::build(version, None)
    }

    /// Like `new`, keeping the balloon in a state file at `path`.
    pub fn with_state_file(path: &Path) -> Rig {
        Self::build(
            balloon_backend::saved_state::STATE_VERSION,
            Some(path.to_path_buf()),
        )
    }

    fn build(version: u32, state_file: Option<PathBuf>) -> Rig {
        let memfd = crate::memory::memfd("rig-ram", MEMFD_BYTES).unwrap();
        fill_outside_ram(&memfd);
        let mem = guest_memory(&memfd);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let device = start_device(&atomic, version, state_file.as_deref());
        let queues: Vec<DriverQueue> = (0..queue_roles(rig_features()).len())
            .map(|index| DriverQueue::new(&mem, index))
            .collect();
        let vrings = start_vrings(&atomic, &queues, |_| 0);
        Rig {
            device,
            memfd,
            mem,
            queues,
            vrings,
            atomic,
            version,
            state_file,
        }
    }

    /// The backend killed (the device dropped with no shutdown, no
    /// disconnect) and a new one started with the same flags, taking over
    /// the same guest RAM, as QEMU's reconnect brings it: each ring
    /// restarts at the guest's used index (QEMU syncs its avail index to
    /// it when the old backend cannot answer). With `unanswered`, the last
    /// request on that queue counts as handled by the old process but never
    /// completed, so the new one gets it again. Then one event, which runs
    /// the device's restart check.
    pub fn kill_and_restart(&mut self, unanswered: Option<usize>) {
        if let Some(queue) = unanswered {
            let used = self.queues[queue].used_addr() + 2;
            let idx: u16 = self.mem.read_obj(GuestAddress(used)).unwrap();
            self.mem
                .write_obj(idx.wrapping_sub(1), GuestAddress(used))
                .unwrap();
        }
        self.vrings.clear();
        let old = std::mem::replace(
            &mut self.device,
            start_device(&self.atomic, self.version, self.state_file.as_deref()),
        );
        drop(old);
        let mem = self.mem.clone();
        self.vrings = start_vrings(&self.atomic, &self.queues, |index| {
            let used = self.queues[index].used_addr() + 2;
            mem.read_obj(GuestAddress(used)).unwrap()
        });
        let event = unanswered.map_or(STATS_REQUEST_EVENT, |q| q as u16);
        self.device
            .handle_event(event, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }

    /// Puts a raw chain on a queue and lets the device handle the kick.
    pub fn submit(&mut self, queue: usize, descs: &[(u64, u32, u16, u16)]) {
        self.queues[queue].write_chain(&self.mem, descs);
        self.device
            .handle_event(queue as u16, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }

    /// QEMU stopping and starting the device on the same guest RAM, as a
    /// pause or a guest reset does: GET_VRING_BASE on every ring, the
    /// memory table again, the inflate ring restarted at `inflate_next`
    /// (where it stopped after a pause, 0 after a reset), then an event.
    pub fn restart(&mut self, inflate_next: u16) {
        for (index, vring) in self.vrings.iter().enumerate() {
            vring.set_queue_ready(false);
            self.device.stop_vring(index as u32).unwrap();
        }
        self.device.update_memory(self.atomic.clone()).unwrap();
        if let Some(inflate) = self.vrings.first() {
            inflate.set_queue_next_avail(inflate_next);
        }
        for vring in &self.vrings {
            vring.set_queue_ready(true);
        }
        self.device
            .handle_event(STATS_REQUEST_EVENT, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }

    /// Where the device will read the inflate ring next.
    pub fn inflate_next(&self) -> u16 {
        self.vrings.first().map_or(0, |v| v.queue_next_avail())
    }

    pub fn used(&self, queue: usize) -> u16 {
        self.queues[queue].used_idx(&self.mem)
    }

    pub fn status(&self) -> DeviceStatus {
        self.device.status()
    }
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}
