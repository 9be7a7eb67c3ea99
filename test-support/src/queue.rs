//! The driver's side of the split virtqueues the tests drive, in guest RAM.
//!
//! Descriptors are written through virtio-queue's mock driver
//! (`virtio_queue::mock`, its `test-utils` feature): its descriptor table
//! and descriptor types; used-ring entries are read as its `VirtqUsedElem`.
//! The rest of the mock does not fit, so the layout and the avail ring are
//! kept here, at offsets taken from the virtio ring's own definitions:
//! - `MockSplitQueue::create` in virtio-queue 0.18 places the used ring
//!   inside the avail ring (`SplitQueueRing::end` counts elements as
//!   bytes), so a driver that fills more than half the avail ring
//!   overwrites the used index (upstream: rust-vmm/vm-virtio#400);
//! - it publishes at most one ring's worth of chains (`add_chain` fails,
//!   and `add_desc_chains` writes past the ring, once the avail index
//!   passes the queue size), while the property tests and the fuzz target
//!   send thousands of chains through one queue;
//! - it borrows guest RAM for its whole life and is not `Send`, so the
//!   harness and the rig, which own their guest RAM, cannot keep one.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{fence, Ordering};

use balloon_backend::device::GuestRamMap;
use virtio_bindings::bindings::virtio_ring::{vring_avail, vring_used};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::DescriptorTable;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::{QUEUE_AREA_GPA, QUEUE_SIZE};

/// Guest RAM set aside for each queue's rings, from `QUEUE_AREA_GPA` on.
const QUEUE_STRIDE: usize = 0x10000;
/// The used ring's alignment (virtio 1.x, split virtqueues).
const USED_ALIGN: u64 = 4;

/// One split virtqueue driven from the test.
pub struct DriverQueue {
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl DriverQueue {
    /// Queue `index`'s rings at the top of region 1, zeroed: the
    /// descriptor table, then the avail ring (with `used_event`), then the
    /// used ring.
    pub fn new(mem: &GuestRamMap, index: usize) -> Self {
        let start = GuestAddress(QUEUE_AREA_GPA + (index * QUEUE_STRIDE) as u64);
        mem.write_slice(&[0u8; QUEUE_STRIDE], start).unwrap();
        let size = usize::from(QUEUE_SIZE);
        let avail_ring = start.unchecked_add((size * size_of::<RawDescriptor>()) as u64);
        // flags, idx, ring[size], used_event: all 16-bit.
        let avail_bytes =
            offset_of!(vring_avail, ring) + size * size_of::<u16>() + size_of::<u16>();
        let used_ring = avail_ring
            .unchecked_add(avail_bytes as u64)
            .unchecked_align_up(USED_ALIGN);
        DriverQueue {
            desc_table: start,
            avail_ring,
            used_ring,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
        }
    }

    /// Guest physical addresses of the descriptor table, avail and used rings.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (
            self.desc_table.raw_value(),
            self.avail_ring.raw_value(),
            self.used_ring.raw_value(),
        )
    }

    /// Writes raw descriptors (addr, len, flags, next) at the next free
    /// slots and makes the first one available. Nothing is fixed up.
    pub fn write_chain(&mut self, mem: &GuestRamMap, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let table = DescriptorTable::new(mem, self.desc_table, QUEUE_SIZE);
        let head = self.next_desc;
        let mut index = head;
        for &(addr, len, flags, next) in descs {
            let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            table.store(index, desc).unwrap();
            index = (index + 1) % QUEUE_SIZE;
        }
        self.next_desc = index;
        let slot = offset_of!(vring_avail, ring)
            + size_of::<u16>() * usize::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head.to_le(), self.avail_ring.unchecked_add(slot as u64))
            .unwrap();
        // The entry before the index that makes it the guest's.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = offset_of!(vring_avail, idx) as u64;
        mem.write_obj(self.avail_idx.to_le(), self.avail_ring.unchecked_add(idx))
            .unwrap();
        fence(Ordering::SeqCst);
        head
    }

    /// Where the next chain's head descriptor will go.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    /// How many chains the device has used so far.
    pub fn used_idx(&self, mem: &GuestRamMap) -> u16 {
        let idx = offset_of!(vring_used, idx) as u64;
        u16::from_le(mem.read_obj(self.used_ring.unchecked_add(idx)).unwrap())
    }

    /// The used-ring entries the device added since the last call, if it
    /// has added at least `count`: (head, length) of the first `count`.
    pub fn take_used(&mut self, mem: &GuestRamMap, count: u16) -> Option<Vec<(u32, u32)>> {
        if self.used_idx(mem).wrapping_sub(self.used_seen) < count {
            return None;
        }
        let entries = (0..count)
            .map(|i| {
                let slot = usize::from(self.used_seen.wrapping_add(i) % QUEUE_SIZE);
                let at = offset_of!(vring_used, ring) + slot * size_of::<VirtqUsedElem>();
                let elem: VirtqUsedElem = mem
                    .read_obj(self.used_ring.unchecked_add(at as u64))
                    .unwrap();
                (elem.id(), elem.len())
            })
            .collect();
        self.used_seen = self.used_seen.wrapping_add(count);
        Some(entries)
    }

    /// Guest physical address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.used_ring.raw_value()
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::{Bytes, GuestAddress};

    use crate::rig::Rig;
    use crate::{BUFFER_AREA_GPA, DEFLATE, QUEUE_SIZE};

    /// Chains go round the descriptor table and both rings several times,
    /// as a driver's do, a chain crossing the table's end included; every
    /// one comes back in the used ring, and the rings never overlap.
    #[test]
    fn chains_wrap_around_the_rings() {
        let mut rig = Rig::new();
        rig.mem
            .write_obj(0u32, GuestAddress(BUFFER_AREA_GPA))
            .unwrap();
        let chains = 3 * QUEUE_SIZE + 5;
        for n in 0..chains {
            let head = rig.queues[DEFLATE].next_desc();
            assert_eq!(head, (2 * n) % QUEUE_SIZE);
            let next = (head + 1) % QUEUE_SIZE;
            rig.submit(
                DEFLATE,
                &[
                    (BUFFER_AREA_GPA, 4, VRING_DESC_F_NEXT as u16, next),
                    (BUFFER_AREA_GPA, 4, 0, 0),
                ],
            );
            let Rig { queues, mem, .. } = &mut rig;
            let used = queues[DEFLATE].take_used(mem, 1);
            assert_eq!(used, Some(vec![(u32::from(head), 0)]), "chain {n}");
            assert_eq!(queues[DEFLATE].take_used(mem, 1), None);
        }
        assert_eq!(rig.used(DEFLATE), chains);
    }
}
