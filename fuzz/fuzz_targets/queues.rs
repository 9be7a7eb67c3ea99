//! Descriptor chains on every queue of the real device, over memfd guest
//! RAM with a hole: the device never panics, every inflate, deflate and
//! report request is completed, the tracking stays within guest RAM, and
//! nothing outside guest RAM is freed or changed.

#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use test_support::rig::Rig;
use test_support::{assert_outside_ram_intact, BUFFER_AREA_GPA, GUEST_RAM_BYTES};
use vm_memory::{Bytes, GuestAddress};

/// One rig for the process: building 72 MiB of guest RAM per input would
/// leave little time for fuzzing. State carries over between inputs, as it
/// would in a long-running guest.
/// The rig, the inputs run, and how many requests each queue has
/// completed: counted here, not read back before each input, since a guest
/// that balloons the page of its own rings gets them back zeroed.
static RIG: OnceLock<Mutex<(Rig, u64, Vec<u16>)>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rig = RIG.get_or_init(|| {
        let rig = Rig::new();
        let queues = rig.queues.len();
        Mutex::new((rig, 0, vec![0; queues]))
    });
    let mut guard = rig.lock().unwrap_or_else(|e| e.into_inner());
    let (rig, runs, completed) = &mut *guard;
    // Layout: [queue][count] then count × (addr u64, len u32, flags u16, next u16),
    // then the rest goes into the buffer area the descriptors may point at.
    let Some((&queue, rest)) = data.split_first() else { return };
    let queue = usize::from(queue) % rig.queues.len();
    let Some((&count, rest)) = rest.split_first() else { return };
    let count = usize::from(count % 70).max(1);
    let mut descs = Vec::new();
    let split = (count * 16).min(rest.len() - rest.len() % 16);
    let (table, payload) = rest.split_at(split);
    for chunk in table.chunks_exact(16) {
        let addr = u64::from_le_bytes(chunk[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(chunk[8..12].try_into().unwrap());
        let flags = u16::from_le_bytes(chunk[12..14].try_into().unwrap());
        let next = u16::from_le_bytes(chunk[14..16].try_into().unwrap());
        // Bias addresses into guest RAM and the buffer area half the time.
        let addr = if addr & 1 == 0 { BUFFER_AREA_GPA + (addr >> 1) % (2 << 20) } else { addr };
        descs.push((addr, len, flags, next));
    }
    if descs.is_empty() {
        return;
    }
    rig.mem.write_slice(payload, GuestAddress(BUFFER_AREA_GPA)).unwrap();
    rig.submit(queue, &descs);
    // Checked before the punch timer's work: a guest that balloons the
    // page holding its own rings gets them back zeroed, which is its loss.
    if queue != 2 {
        completed[queue] = completed[queue].wrapping_add(1);
        assert_eq!(rig.used(queue), completed[queue], "queue {queue} did not complete the request");
    }
    let status = rig.status();
    assert!(status.ballooned_bytes <= GUEST_RAM_BYTES);
    assert!(status.discarded_bytes <= status.ballooned_bytes);
    // What the punch timer would do now punches exactly the balloon.
    rig.device.punch_pending();
    let status = rig.status();
    assert_eq!(status.discarded_bytes, status.ballooned_bytes);
    assert_eq!(status.target_bytes, 0, "a guest request changed the target");
    *runs += 1;
    if *runs % 512 == 0 {
        assert_outside_ram_intact(&rig.memfd);
    }
});
