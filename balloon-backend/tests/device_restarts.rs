//! QEMU stops and starts the device on the same guest RAM for a pause, a
//! cancelled migration and a guest reset, and vhost-user-base sends the
//! same messages for all of them. The balloon of a resumed guest stays;
//! a reset guest's, whose inflate ring starts over at 0, is dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use test_support::rig::Rig;
use test_support::{BUFFER_AREA_GPA, INFLATE, MIB};
use vhost_user_backend::VhostUserBackend;
use vm_memory::{Bytes, GuestAddress};

fn inflate_100_pages(rig: &mut Rig) {
    let bytes: Vec<u8> = (1000u32..1100).flat_map(u32::to_le_bytes).collect();
    rig.mem
        .write_slice(&bytes, GuestAddress(BUFFER_AREA_GPA))
        .unwrap();
    rig.submit(INFLATE, &[(BUFFER_AREA_GPA, bytes.len() as u32, 0, 0)]);
    assert_eq!(rig.status().ballooned_bytes, 100 * 4096);
    // The driver writes `actual` after each request.
    rig.device.set_config(4, &100u32.to_le_bytes()).unwrap();
    assert_eq!(rig.status().actual_bytes, 100 * 4096);
}

#[test]
fn a_resumed_guest_keeps_its_balloon() {
    let mut rig = Rig::new();
    rig.device.set_target(MIB, false).unwrap();
    inflate_100_pages(&mut rig);
    let next = rig.inflate_next();
    assert_eq!(next, 1);
    rig.restart(next);
    let status = rig.status();
    assert_eq!(status.ballooned_bytes, 100 * 4096);
    assert_eq!(status.discarded_bytes, 100 * 4096);
    assert_eq!(status.actual_bytes, 100 * 4096);
    assert_eq!(status.target_bytes, MIB);
}

#[test]
fn a_reset_guest_starts_with_an_empty_balloon() {
    let mut rig = Rig::new();
    inflate_100_pages(&mut rig);
    rig.device.set_target(MIB, false).unwrap();
    rig.restart(0);
    let status = rig.status();
    assert_eq!(status.ballooned_bytes, 0);
    assert_eq!(status.discarded_bytes, 0);
    // The new driver has no balloon yet and writes `actual` only after its
    // first request; the target stays.
    assert_eq!(status.actual_bytes, 0);
    assert_eq!(status.target_bytes, MIB);
}
