//! The device in this process, without vhost-user: `BalloonDevice` with
//! vrings over memfd guest RAM, fed descriptor chains directly. Fast enough
//! for property tests over long random request sequences.

use std::fs::File;
use std::sync::Arc;

use balloon_backend::device::{BalloonDevice, DeviceSettings, DeviceStatus, STATS_REQUEST_EVENT};
use balloon_backend::device::{BalloonVring, GuestRamMap};
use balloon_backend::features::{queue_roles, FeatureSwitches};
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use crate::{fill_outside_ram, guest_memory, TestQueue, DRIVER_FEATURES, MEMFD_BYTES, QUEUE_SIZE};

pub struct Rig {
    pub device: Arc<BalloonDevice>,
    pub memfd: File,
    pub mem: GuestRamMap,
    pub queues: Vec<TestQueue>,
    vrings: Vec<BalloonVring>,
    atomic: GuestMemoryAtomic<GuestRamMap>,
}

impl Rig {
    /// A device with every feature acked but event index, over guest RAM
    /// whose non-RAM parts of the file hold a sentinel.
    pub fn new() -> Rig {
        Self::with_state_version(balloon_backend::saved_state::STATE_VERSION)
    }

    /// Like `new`, speaking saved-state `version`.
    pub fn with_state_version(version: u32) -> Rig {
        let memfd = crate::memory::memfd("rig-ram", MEMFD_BYTES).unwrap();
        fill_outside_ram(&memfd);
        let mem = guest_memory(&memfd);
        let atomic = GuestMemoryAtomic::new(mem.clone());
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
        let acked = DRIVER_FEATURES & !(1 << 29);
        device.acked_features(acked);
        device.set_event_idx(false);
        device.update_memory(atomic.clone()).unwrap();
        let mut queues = Vec::new();
        let mut vrings = Vec::new();
        for index in 0..queue_roles(acked).len() {
            let queue = TestQueue::new(index);
            let vring = BalloonVring::new(atomic.clone(), QUEUE_SIZE).unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            let (desc, avail, used) = queue.addresses();
            vring.set_queue_info(desc, avail, used).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            queues.push(queue);
            vrings.push(vring);
        }
        Rig {
            device,
            memfd,
            mem,
            queues,
            vrings,
            atomic,
        }
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
