//! The real balloon-backend binary driven by an in-process vhost-user
//! frontend over memfd guest RAM: inflate, deflate, reporting, statistics,
//! targets and hostile input, checked against the memfd's allocated pages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use balloon_backend::chain::MAX_CHAIN_DESCRIPTORS;
use balloon_backend::features::{self, bit};
use test_support::*;

fn backend() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_balloon-backend"))
}

const PAGE: u64 = 4096;

fn pfn(gpa: u64) -> u32 {
    (gpa / PAGE) as u32
}

#[test]
fn negotiates_features_and_finds_the_backend_channel() {
    let mut h = Harness::start(backend(), &[]);
    let status = h.status();
    assert_eq!(status["guest_ram_bytes"], GUEST_RAM_BYTES);
    assert_eq!(status["config_notify"], true, "{status}");
    let features: Vec<&str> = status["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for name in [
        "VERSION_1",
        "STATS_VQ",
        "DEFLATE_ON_OOM",
        "REPORTING",
        "RING_EVENT_IDX",
    ] {
        assert!(features.contains(&name), "{name} missing from {features:?}");
    }
    assert_eq!(
        status["max_reclaim_bytes"],
        (GUEST_RAM_BYTES * 65 / 100) / PAGE * PAGE
    );
}

#[test]
fn feature_switches_remove_features_from_the_offer() {
    let h = Harness::start(
        backend(),
        &[
            "--no-stats",
            "--no-reporting",
            "--no-deflate-on-oom",
            "--no-page-poison",
        ],
    );
    let offered = {
        use vhost::VhostBackend;
        h.frontend.get_features().unwrap()
    };
    for feature in [
        features::STATS_VQ,
        features::DEFLATE_ON_OOM,
        features::PAGE_POISON,
        features::REPORTING,
    ] {
        assert_eq!(
            offered & bit(feature),
            0,
            "feature bit {feature} still offered"
        );
    }
    assert_ne!(offered & bit(features::VERSION_1), 0);
}

#[test]
fn inflate_punches_holes_and_deflate_tracks() {
    let mut h = Harness::start(backend(), &[]);
    let before = h.resident();
    // 8 MiB in region 0 and 2 MiB in region 1, shuffled, with duplicates.
    let mut pfns: Vec<u32> = (pfn(4 * MIB)..pfn(12 * MIB)).collect();
    pfns.extend(pfn(REGION1_GPA)..pfn(REGION1_GPA + 2 * MIB));
    pfns.reverse();
    pfns.swap(3, 700);
    for chunk in pfns.chunks(256) {
        h.send_pfns(INFLATE, chunk);
    }
    h.send_pfns(INFLATE, &pfns[..10]);
    h.punched();
    let freed = before - h.resident();
    assert_eq!(freed, 10 * MIB, "host bytes freed by inflating 10 MiB");
    assert_eq!(allocated(&h.memfd, 4 * MIB, 8 * MIB), 0);
    let status = h.status();
    assert_eq!(status["discarded_bytes"], 10 * MIB);
    assert_eq!(status["ballooned_bytes"], 10 * MIB);
    assert_eq!(status["errors"]["already_inflated"], 10);
    // Freeing 10 MiB costs the kernel CPU time, and the backend counts it.
    assert!(
        status["discard_cpu_us"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );

    // Deflate 4 MiB: the tracking follows; punched pages read back as zeros.
    let back: Vec<u32> = (pfn(4 * MIB)..pfn(8 * MIB)).collect();
    for chunk in back.chunks(256) {
        h.send_pfns(DEFLATE, chunk);
    }
    let status = h.status();
    assert_eq!(status["discarded_bytes"], 6 * MIB);
    assert_eq!(status["ballooned_bytes"], 6 * MIB);
    let mut page = vec![1u8; PAGE as usize];
    use std::os::unix::fs::FileExt;
    h.memfd.read_exact_at(&mut page, 5 * MIB).unwrap();
    assert!(page.iter().all(|b| *b == 0));
    h.assert_outside_ram_intact();
}

#[test]
fn set_target_notifies_the_frontend_and_clamps_to_the_limit() {
    let mut h = Harness::start(backend(), &["--max-reclaim-percent", "50"]);
    let channel = h.channel.try_clone().unwrap();
    let answer = std::thread::spawn(move || {
        let mut h2 = ChannelAnswerer { channel };
        (h2.answer(), h2.answer())
    });
    let reply = h.request(r#"{"cmd":"set-target","bytes":16777216}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["target_bytes"], 16 * MIB);
    assert_eq!(reply["clamped"], false);
    assert_eq!(reply["notified"], true);
    let config = h.get_config();
    assert_eq!(
        u32::from_le_bytes(config[0..4].try_into().unwrap()),
        (16 * MIB / PAGE) as u32
    );

    let reply = h.request(r#"{"cmd":"set-target","bytes":1000000000}"#);
    assert_eq!(reply["clamped"], true, "{reply}");
    assert_eq!(reply["target_bytes"], GUEST_RAM_BYTES / 2);
    let (first, second) = answer.join().unwrap();
    assert_ne!(first & 0x8, 0, "NEED_REPLY set");
    assert_eq!(first & 0x1, 1);
    assert_eq!(second, first);
    assert_eq!(h.status()["target_bytes"], GUEST_RAM_BYTES / 2);

    // The driver writes num_pages and actual together; only actual is taken.
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;
    let mut write = 7u32.to_le_bytes().to_vec();
    write.extend_from_slice(&1234u32.to_le_bytes());
    h.frontend
        .set_config(0, VhostUserConfigFlags::WRITABLE, &write)
        .unwrap();
    let status = h.wait_status("actual written", |s| s["actual_bytes"] != 0);
    assert_eq!(status["actual_bytes"], 1234 * PAGE);
    assert_eq!(status["target_bytes"], GUEST_RAM_BYTES / 2);
}

struct ChannelAnswerer {
    channel: std::os::unix::net::UnixStream,
}

impl ChannelAnswerer {
    fn answer(&mut self) -> u32 {
        use std::io::{Read, Write};
        let mut header = [0u8; 12];
        self.channel.read_exact(&mut header).unwrap();
        assert_eq!(u32::from_le_bytes(header[0..4].try_into().unwrap()), 2);
        let flags = u32::from_le_bytes(header[4..8].try_into().unwrap());
        let mut reply = 2u32.to_le_bytes().to_vec();
        reply.extend_from_slice(&5u32.to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        self.channel.write_all(&reply).unwrap();
        flags
    }
}

/// A driver that did not ack MUST_TELL_HOST may use a page it deflates
/// before telling the device: its inflated pages are punched before the
/// request completes, never deferred.
#[test]
fn without_must_tell_host_inflated_pages_are_punched_at_once() {
    let mut h = Harness::start_with_features(
        backend(),
        &[],
        DRIVER_FEATURES & !bit(features::MUST_TELL_HOST),
    );
    let before = h.resident();
    let pfns: Vec<u32> = (pfn(4 * MIB)..pfn(5 * MIB)).collect();
    h.send_pfns(INFLATE, &pfns);
    assert_eq!(before - h.resident(), MIB);
    let status = h.status();
    assert_eq!(status["pending_punch_bytes"], 0);
    assert_eq!(status["discarded_bytes"], MIB);
}

#[test]
fn reported_free_ranges_are_returned_to_the_host() {
    let mut h = Harness::start(backend(), &[]);
    let before = h.resident();
    let ranges = [
        (2 * MIB, 2 * MIB as u32, true),
        (16 * MIB, 4 * MIB as u32, true),
        (REGION1_GPA, 2 * MIB as u32, true),
    ];
    h.push(REPORTING, &ranges);
    let used = h.wait_used(REPORTING, 1);
    assert_eq!(used[0].1, 0, "reporting buffers are used with length 0");
    assert_eq!(before - h.resident(), 8 * MIB);
    assert_eq!(h.status()["reported_bytes_total"], 8 * MIB);
    h.assert_outside_ram_intact();
}

#[test]
fn statistics_are_held_and_refreshed_on_request() {
    let mut h = Harness::start(backend(), &[]);
    let records = |free: u64| {
        let mut bytes = Vec::new();
        for (tag, value) in [
            (4u16, free),
            (5, GUEST_RAM_BYTES),
            (6, free + MIB),
            (7, 3 * MIB),
            (10, 2),
            (11, 9),
            (42, 1),
        ] {
            bytes.extend_from_slice(&tag.to_le_bytes());
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    };
    let buffer = h.buffer(&records(20 * MIB));
    h.push(STATS, &[(buffer, 70, false)]);
    let stats = h.wait_status("statistics", |s| !s["stats"].is_null())["stats"].clone();
    assert_eq!(stats["free_bytes"], 20 * MIB);
    assert_eq!(stats["total_bytes"], GUEST_RAM_BYTES);
    assert_eq!(stats["oom_kills"], 2);
    assert_eq!(stats["alloc_stalls"], 9);
    assert!(stats["updated_unix_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        h.used_idx(STATS),
        0,
        "the stats buffer is held, not returned"
    );
    assert_eq!(h.error_count("stats_unknown_tag"), 1);

    // refresh-stats: the device returns the buffer, the "driver" refills it.
    let mut control = h.control_clone();
    let refresh = std::thread::spawn(move || control.refresh_stats(10_000));
    h.wait_used(STATS, 1);
    use vm_memory::{Bytes, GuestAddress};
    h.mem
        .write_slice(&records(10 * MIB), GuestAddress(buffer))
        .unwrap();
    h.push(STATS, &[(buffer, 70, false)]);
    let reply = refresh.join().unwrap().unwrap();
    assert_eq!(reply.stats.free_bytes, Some(10 * MIB));
}

/// Every counter in `status.errors`, so a test can say which ones moved.
fn error_counts(h: &mut Harness) -> serde_json::Map<String, serde_json::Value> {
    h.status()["errors"].as_object().unwrap().clone()
}

/// Asserts that exactly these counters rose by exactly these amounts since
/// `before`, and no other counter moved.
fn assert_counted(
    h: &mut Harness,
    before: &serde_json::Map<String, serde_json::Value>,
    expected: &[(&str, u64)],
) -> serde_json::Map<String, serde_json::Value> {
    let after = error_counts(h);
    for (name, value) in &after {
        let was = before.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
        let now = value.as_u64().unwrap();
        let rise = now.checked_sub(was).unwrap();
        let wanted = expected
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, n)| *n);
        assert_eq!(
            rise, wanted,
            "counter {name}: {was} -> {now}; all: {after:?}"
        );
    }
    for (name, _) in expected {
        assert!(
            after.contains_key(*name),
            "no counter named {name}: {after:?}"
        );
    }
    after
}

#[test]
fn hostile_requests_are_counted_and_the_queues_keep_working() {
    let mut h = Harness::start(backend(), &[]);
    let before = h.resident();
    let counts = error_counts(&mut h);
    // PFNs in the hole, beyond RAM, and the largest u32.
    h.send_pfns(INFLATE, &[pfn(40 * MIB), pfn(100 * MIB), u32::MAX]);
    let counts = assert_counted(&mut h, &counts, &[("pfn_outside_ram", 3)]);
    // A write-only descriptor where a readable one belongs.
    let gpa = h.buffer(&pfn(MIB).to_le_bytes());
    h.push(INFLATE, &[(gpa, 4, true)]);
    h.wait_used(INFLATE, 1);
    let counts = assert_counted(&mut h, &counts, &[("write_only_descriptor", 1)]);
    // A length that is not a multiple of 4 (the whole PFN before the tail is
    // inflated, so one page goes).
    let gpa = h.buffer(&[1, 2, 3, 4, 5, 6]);
    h.push(INFLATE, &[(gpa, 6, false)]);
    h.wait_used(INFLATE, 1);
    let counts = assert_counted(
        &mut h,
        &counts,
        &[("trailing_bytes", 1), ("pfn_outside_ram", 1)],
    );
    // A descriptor pointing outside guest RAM (the hole).
    h.push(INFLATE, &[(40 * MIB, 4096, false)]);
    h.wait_used(INFLATE, 1);
    let counts = assert_counted(&mut h, &counts, &[("descriptor_outside_ram", 1)]);
    // An oversized descriptor: more than a request may hold.
    h.push(INFLATE, &[(BUFFER_AREA_GPA, u32::MAX, false)]);
    h.wait_used(INFLATE, 1);
    let counts = assert_counted(&mut h, &counts, &[("request_too_long", 1)]);
    // Deflating pages never inflated.
    h.send_pfns(DEFLATE, &[pfn(MIB), pfn(MIB) + 1]);
    let counts = assert_counted(&mut h, &counts, &[("deflate_not_inflated", 2)]);
    // Reports: empty, unaligned, crossing from region 0 into the hole,
    // starting beyond RAM, read-only.
    h.push(
        REPORTING,
        &[
            (2 * MIB, 0, true),
            (2 * MIB + 1, 4096, true),
            (30 * MIB, 4 * MIB as u32, true),
            (80 * MIB, 2 * MIB as u32, true),
            (4 * MIB, 2 * MIB as u32, false),
        ],
    );
    h.wait_used(REPORTING, 1);
    let counts = assert_counted(
        &mut h,
        &counts,
        &[
            ("report_empty_range", 1),
            ("report_unaligned_range", 1),
            ("report_crosses_region_end", 1),
            ("report_outside_ram", 1),
            ("read_only_descriptor", 1),
        ],
    );
    // Two stats buffers: the older is handed straight back.
    let stats = h.buffer(&[4, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    h.push(STATS, &[(stats, 10, false)]);
    h.push(STATS, &[(stats, 0, false)]);
    h.wait_used(STATS, 1);
    let counts = assert_counted(&mut h, &counts, &[("stats_extra_buffer", 1)]);
    // A config write past the 16 bytes: refused, counted, and the frontend
    // connection stays up. (Without NEED_REPLY the frontend's call succeeds;
    // the counter is what shows the refusal.)
    {
        use vhost::vhost_user::message::VhostUserConfigFlags;
        use vhost::vhost_user::VhostUserFrontend;
        h.frontend
            .set_config(14, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
            .unwrap();
    }
    let status = h.wait_status("config fault counted", |s| {
        s["errors"]["config_out_of_range"] == 1
    });
    assert_eq!(
        status["connected"], true,
        "a bad config write must not drop the frontend"
    );
    let counts = assert_counted(&mut h, &counts, &[("config_out_of_range", 1)]);

    // A descriptor that chains to itself: cut at once, its one PFN (in the
    // hole) read once.
    let looped = h.next_desc(INFLATE);
    let gpa = h.buffer(&pfn(40 * MIB).to_le_bytes());
    h.push_raw(INFLATE, &[(gpa, 4, 1, looped)]);
    h.wait_used(INFLATE, 1);
    let counts = assert_counted(
        &mut h,
        &counts,
        &[("descriptor_chain_loop", 1), ("pfn_outside_ram", 1)],
    );
    // A chain of the whole queue without a loop: cut at the cap; the kept
    // descriptors carry the same PFN, counted once outside RAM and as
    // duplicates after that.
    let start = h.next_desc(INFLATE);
    let long: Vec<(u64, u32, u16, u16)> = (0..QUEUE_SIZE)
        .map(|i| {
            let flags = if i + 1 < QUEUE_SIZE { 1 } else { 0 };
            (gpa, 4, flags, (start + i + 1) % QUEUE_SIZE)
        })
        .collect();
    h.push_raw(INFLATE, &long);
    h.wait_used(INFLATE, 1);
    let kept = MAX_CHAIN_DESCRIPTORS as u64;
    assert_counted(
        &mut h,
        &counts,
        &[("descriptor_chain_too_long", 1), ("pfn_outside_ram", kept)],
    );

    // Nothing was freed so far, and nothing outside RAM ever.
    assert_eq!(h.resident(), before);
    h.assert_outside_ram_intact();
    // The device still works.
    h.send_pfns(INFLATE, &(0..256).collect::<Vec<u32>>());
    h.punched();
    assert_eq!(before - h.resident(), MIB);
    assert!(
        h.child.try_wait().unwrap().is_none(),
        "backend still running"
    );
}

#[test]
fn the_backend_accepts_a_new_frontend_after_a_disconnect() {
    let mut h = Harness::start(backend(), &[]);
    h.send_pfns(INFLATE, &(0..256).collect::<Vec<u32>>());
    let socket = h.dir.path().join("balloon.sock");
    // Drop the frontend connection, then connect a new one to the same listener.
    let old = std::mem::replace(&mut h.frontend, {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        vhost::vhost_user::Frontend::from_stream(a, 5)
    });
    drop(old);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.status()["connected"] == true {
        assert!(
            std::time::Instant::now() < deadline,
            "disconnect not noticed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A frontend going away is the normal end of a connection: logged at
    // info, not as a warning.
    while !h.log().contains("frontend closed the connection") {
        assert!(
            std::time::Instant::now() < deadline,
            "no info line for the disconnect: {}",
            h.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = h.log();
    assert!(!log.contains(" WARN "), "{log}");
    let frontend = vhost::vhost_user::Frontend::connect(&socket, 5).unwrap();
    use vhost::VhostBackend;
    frontend.set_owner().unwrap();
    assert_ne!(
        frontend.get_features().unwrap() & bit(features::VERSION_1),
        0
    );
}

#[test]
fn reports_are_not_discarded_while_the_guest_poisons_free_pages() {
    let mut h =
        Harness::start_with_features(backend(), &[], DRIVER_FEATURES | bit(features::PAGE_POISON));
    assert!(h.status()["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "PAGE_POISON"));
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;
    h.frontend
        .set_config(
            12,
            VhostUserConfigFlags::WRITABLE,
            &0xaaaa_aaaau32.to_le_bytes(),
        )
        .unwrap();
    // GET_CONFIG is answered after the earlier SET_CONFIG: the value is in.
    assert_eq!(h.get_config()[12..16], 0xaaaa_aaaau32.to_le_bytes());
    let before = h.resident();
    h.push(REPORTING, &[(2 * MIB, 2 * MIB as u32, true)]);
    h.wait_used(REPORTING, 1);
    assert_eq!(
        h.resident(),
        before,
        "a poisoned free page must keep its contents"
    );
    assert_eq!(h.status()["reported_bytes_total"], 0);

    // Poison value 0 reads back as zeros after a punch: discarding is safe again.
    h.frontend
        .set_config(12, VhostUserConfigFlags::WRITABLE, &0u32.to_le_bytes())
        .unwrap();
    assert_eq!(h.get_config()[12..16], [0; 4]);
    h.push(REPORTING, &[(4 * MIB, 2 * MIB as u32, true)]);
    h.wait_used(REPORTING, 1);
    assert_eq!(before - h.resident(), 2 * MIB);
}

#[test]
fn the_held_stats_buffer_survives_a_ring_stop_and_start() {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    let mut h = Harness::start(backend(), &[]);
    let buffer = h.buffer(&[4, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    h.push(STATS, &[(buffer, 10, false)]);
    h.wait_status("statistics", |s| s["stats"]["free_bytes"] == 1u64 << 24);
    // Stopping the ring hands back the position before the held buffer.
    let base = h.frontend.get_vring_base(STATS).unwrap();
    assert_eq!(
        base, 0,
        "the held buffer must be popped again after a restart"
    );
    // The guest's buffer now holds new values; restart the ring where the
    // device said and kick: the device pops the same buffer again.
    use vm_memory::{Bytes, GuestAddress};
    h.mem
        .write_slice(&[4, 0, 0, 0, 0, 2, 0, 0, 0, 0], GuestAddress(buffer))
        .unwrap();
    h.frontend.set_vring_base(STATS, base as u16).unwrap();
    h.frontend
        .set_vring_call(STATS, &h.queues[STATS].call)
        .unwrap();
    h.frontend
        .set_vring_kick(STATS, &h.queues[STATS].kick)
        .unwrap();
    h.frontend.set_vring_enable(STATS, true).unwrap();
    h.queues[STATS].kick.write(1).unwrap();
    h.wait_status("the re-popped buffer", |s| {
        s["stats"]["free_bytes"] == 2u64 << 24
    });
    // And holds it: a refresh returns it, the "driver" refills it.
    let mut control = h.control_clone();
    let refresh = std::thread::spawn(move || control.refresh_stats(10_000));
    h.wait_used(STATS, 1);
    h.mem
        .write_slice(&[4, 0, 0, 0, 0, 3, 0, 0, 0, 0], GuestAddress(buffer))
        .unwrap();
    h.push(STATS, &[(buffer, 10, false)]);
    let reply = refresh.join().unwrap().unwrap();
    assert_eq!(reply.stats.free_bytes, Some(3u64 << 24), "{reply:?}");
}
