//! The device's state moving from one device to another as QEMU moves it
//! in a migration (SAVE on the source, LOAD on the destination, each
//! through a pipe and checked with CHECK_DEVICE_STATE): the balloon, the
//! target and the counters arrive, the destination frees the ballooned
//! pages of its own (refilled) guest RAM again, the source keeps its state,
//! and a state of another version or damaged is refused without changing
//! anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use balloon_backend::device::{BalloonDevice, DeviceSettings};
use balloon_backend::features::FeatureSwitches;
use balloon_backend::saved_state::STATE_VERSION;
use balloon_backend::seccomp::SeccompMode;
use test_support::rig::Rig;
use test_support::{allocated, BUFFER_AREA_GPA, GUEST_RAM_BYTES, INFLATE, MIB, REGION0_BYTES};
use test_support::{guest_memory, MEMFD_BYTES};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost_user_backend::VhostUserBackend;
use vm_memory::GuestMemoryAtomic;
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;

fn inflate(rig: &mut Rig, pfns: std::ops::Range<u32>) {
    let bytes: Vec<u8> = pfns.flat_map(u32::to_le_bytes).collect();
    rig.mem
        .write_slice(&bytes, GuestAddress(BUFFER_AREA_GPA))
        .unwrap();
    rig.submit(INFLATE, &[(BUFFER_AREA_GPA, bytes.len() as u32, 0, 0)]);
}

fn pipe() -> (File, File) {
    let (reader, writer) = std::io::pipe().unwrap();
    (
        File::from(OwnedFd::from(reader)),
        File::from(OwnedFd::from(writer)),
    )
}

/// SAVE, as QEMU's vhost_save_backend_state does it.
fn save(rig: &Rig) -> Vec<u8> {
    let (mut reader, writer) = pipe();
    let drain = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map(|_| bytes)
    });
    let reply = rig
        .device
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            writer,
        )
        .unwrap();
    assert!(reply.is_none(), "the backend uses QEMU's pipe");
    rig.device.check_device_state().unwrap();
    drain.join().unwrap().unwrap()
}

/// LOAD, as QEMU's vhost_load_backend_state does it.
fn load(rig: &Rig, bytes: Vec<u8>) -> std::io::Result<()> {
    load_into(&rig.device, bytes)
}

fn load_into(device: &BalloonDevice, bytes: Vec<u8>) -> std::io::Result<()> {
    let (reader, mut writer) = pipe();
    let feed = std::thread::spawn(move || writer.write_all(&bytes));
    device.set_device_state_fd(
        VhostTransferStateDirection::LOAD,
        VhostTransferStatePhase::STOPPED,
        reader,
    )?;
    let checked = device.check_device_state();
    feed.join().unwrap().unwrap();
    checked
}

/// A source with a 2 MiB balloon (in region 0) and a 16 MiB target.
fn source() -> Rig {
    let mut rig = Rig::new();
    rig.device.set_target(16 * MIB, false).unwrap();
    inflate(&mut rig, 256..768);
    let status = rig.status();
    assert_eq!(status.ballooned_bytes, 2 * MIB);
    rig
}

/// A destination whose guest RAM was all loaded (allocated) by QEMU.
fn refilled_destination(version: u32) -> Rig {
    let rig = Rig::with_state_version(version);
    rig.mem
        .write_slice(&vec![0xa5; REGION0_BYTES as usize], GuestAddress(0))
        .unwrap();
    assert_eq!(allocated(&rig.memfd, 0, REGION0_BYTES), REGION0_BYTES);
    rig
}

#[test]
fn the_balloon_moves_and_is_freed_again_on_the_destination() {
    let source = source();
    let bytes = save(&source);
    // The source keeps everything (a cancelled migration resumes there).
    assert_eq!(source.status().ballooned_bytes, 2 * MIB);

    let destination = refilled_destination(STATE_VERSION);
    load(&destination, bytes).unwrap();
    let status = destination.status();
    assert_eq!(status.target_bytes, 16 * MIB);
    assert_eq!(status.ballooned_bytes, 2 * MIB);
    assert_eq!(status.discarded_bytes, 2 * MIB);
    assert_eq!(status.pending_punch_bytes, 0);
    // Exactly the ballooned pages were returned, nothing else.
    assert_eq!(allocated(&destination.memfd, 256 * PAGE, 512 * PAGE), 0);
    assert_eq!(
        allocated(&destination.memfd, 0, REGION0_BYTES),
        REGION0_BYTES - 2 * MIB
    );
    assert_eq!(status.guest_ram_bytes, GUEST_RAM_BYTES);
}

#[test]
fn another_version_or_damaged_bytes_are_refused_and_change_nothing() {
    let bytes = save(&source());
    let newer = refilled_destination(STATE_VERSION + 1);
    let error = load(&newer, bytes.clone()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("device state version 1 is not supported"),
        "{error}"
    );
    let damaged = refilled_destination(STATE_VERSION);
    let mut half = bytes;
    half.truncate(half.len() / 2);
    assert!(load(&damaged, half).is_err());
    for rig in [&newer, &damaged] {
        let status = rig.status();
        assert_eq!(status.ballooned_bytes, 0);
        assert_eq!(status.target_bytes, 0);
        assert_eq!(allocated(&rig.memfd, 0, REGION0_BYTES), REGION0_BYTES);
    }
}

#[test]
fn a_check_without_a_transfer_or_of_an_empty_one_is_an_error() {
    let rig = Rig::new();
    assert!(rig.device.check_device_state().is_err());
    assert!(load(&rig, Vec::new()).is_err());
    assert!(rig
        .device
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            tempfile::tempfile().unwrap(),
        )
        .is_ok());
    rig.device.check_device_state().unwrap();
}

#[test]
fn a_migrated_state_ends_with_the_connection_that_loaded_it() {
    let bytes = save(&source());
    // A destination backend that received the state before any guest RAM
    // (as QEMU orders it), whose QEMU then went away.
    let device = BalloonDevice::new(DeviceSettings {
        switches: FeatureSwitches::default(),
        max_reclaim_percent: 75,
        seccomp: SeccompMode::Off,
        stats_interval_s: 0,
        state_version: STATE_VERSION,
    })
    .unwrap();
    load_into(&device, bytes).unwrap();
    device.disconnected();
    // The next QEMU brings another guest with the same layout: none of its
    // pages may be punched for the old balloon.
    let memfd = test_support::memory::memfd("next-guest", MEMFD_BYTES).unwrap();
    let memory = guest_memory(&memfd);
    memory
        .write_slice(&vec![0x5a; REGION0_BYTES as usize], GuestAddress(0))
        .unwrap();
    device
        .update_memory(GuestMemoryAtomic::new(memory))
        .unwrap();
    assert_eq!(device.status().ballooned_bytes, 0);
    assert_eq!(allocated(&memfd, 0, REGION0_BYTES), REGION0_BYTES);
}
