//! Random sequences of guest requests, well-formed and hostile, fed to the
//! device as descriptor chains over memfd guest RAM. After every request the
//! balloon tracking matches a simple model and every request was completed;
//! at the end nothing outside guest RAM was freed or changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use test_support::rig::Rig;
use test_support::{
    assert_outside_ram_intact, BUFFER_AREA_GPA, MIB, REGION0_BYTES, REGION1_BYTES, REGION1_GPA,
};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const REPORTING: usize = 3;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

#[derive(Clone, Debug)]
enum Request {
    Inflate(Vec<u32>),
    Deflate(Vec<u32>),
    /// A PFN buffer the device must ignore (write-only).
    WriteOnlyInflate(Vec<u32>),
    Report(Vec<(u64, u32)>),
    Stats(Vec<u8>),
    /// Raw descriptors on the reporting or stats queue.
    Raw(usize, Vec<(u64, u32, u16, u16)>),
    Config(u32, Vec<u8>),
}

fn is_ram_page(pfn: u32) -> bool {
    let gpa = u64::from(pfn) * PAGE;
    gpa < REGION0_BYTES || (REGION1_GPA..REGION1_GPA + REGION1_BYTES).contains(&gpa)
}

fn pfns() -> impl Strategy<Value = Vec<u32>> {
    // Mostly guest RAM, some in the hole, beyond the end, or absurd.
    let pfn = prop_oneof![
        8 => 0u32..(16 * MIB / PAGE) as u32,
        2 => ((REGION1_GPA / PAGE) as u32)..((REGION1_GPA + 12 * MIB) / PAGE) as u32,
        1 => ((REGION0_BYTES / PAGE) as u32)..((REGION1_GPA / PAGE) as u32),
        1 => any::<u32>(),
    ];
    proptest::collection::vec(pfn, 0..300)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        4 => pfns().prop_map(Request::Inflate),
        3 => pfns().prop_map(Request::Deflate),
        1 => pfns().prop_map(Request::WriteOnlyInflate),
        2 => proptest::collection::vec((any::<u64>().prop_map(|a| a % (80 * MIB)), any::<u32>().prop_map(|l| l % (8 * MIB as u32))), 0..8)
            .prop_map(Request::Report),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Request::Stats),
        2 => (prop_oneof![Just(STATS), Just(REPORTING)], proptest::collection::vec((any::<u64>(), any::<u32>(), any::<u16>(), any::<u16>()), 1..70))
            .prop_map(|(q, d)| Request::Raw(q, d)),
        1 => (0u32..24, proptest::collection::vec(any::<u8>(), 0..10)).prop_map(|(o, b)| Request::Config(o, b)),
    ]
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn tracking_stays_consistent_and_nothing_outside_ram_is_touched(
        requests in proptest::collection::vec(request(), 1..40)
    ) {
        let mut rig = Rig::new();
        let mut model: BTreeSet<u32> = BTreeSet::new();
        let mut expected_used = [0u16; 4];
        let buffer = GuestAddress(BUFFER_AREA_GPA);
        for request in &requests {
            match request {
                Request::Inflate(pfns) | Request::Deflate(pfns) => {
                    let bytes = pfn_bytes(pfns);
                    rig.mem.write_slice(&bytes, buffer).unwrap();
                    let inflate = matches!(request, Request::Inflate(_));
                    let queue = if inflate { INFLATE } else { DEFLATE };
                    rig.submit(queue, &[(BUFFER_AREA_GPA, bytes.len() as u32, 0, 0)]);
                    expected_used[queue] += 1;
                    for pfn in pfns.iter().copied().filter(|p| is_ram_page(*p)) {
                        if inflate { model.insert(pfn); } else { model.remove(&pfn); }
                    }
                }
                Request::WriteOnlyInflate(pfns) => {
                    let bytes = pfn_bytes(pfns);
                    rig.mem.write_slice(&bytes, buffer).unwrap();
                    rig.submit(INFLATE, &[(BUFFER_AREA_GPA, bytes.len() as u32, WRITE, 0)]);
                    expected_used[INFLATE] += 1;
                }
                Request::Report(ranges) if !ranges.is_empty() => {
                    let descs: Vec<_> = ranges.iter().enumerate().map(|(i, &(gpa, len))| {
                        let last = i + 1 == ranges.len();
                        let index = (rig.queues[REPORTING].next_desc() + i as u16) % 64;
                        (gpa, len, WRITE | if last { 0 } else { NEXT }, (index + 1) % 64)
                    }).collect();
                    rig.submit(REPORTING, &descs);
                    expected_used[REPORTING] += 1;
                }
                Request::Report(_) => {}
                Request::Stats(bytes) => {
                    rig.mem.write_slice(bytes, buffer).unwrap();
                    rig.submit(STATS, &[(BUFFER_AREA_GPA, bytes.len() as u32, 0, 0)]);
                }
                Request::Raw(queue, descs) => {
                    rig.submit(*queue, descs);
                    if *queue == REPORTING {
                        expected_used[REPORTING] += 1;
                    }
                }
                Request::Config(offset, bytes) => {
                    use vhost_user_backend::VhostUserBackend;
                    rig.device.set_config(*offset, bytes).unwrap();
                }
            }
            // Before the punch timer's work: a guest that balloons the page
            // of its own rings gets them back zeroed (its loss, not ours).
            for queue in [INFLATE, DEFLATE, REPORTING] {
                prop_assert_eq!(rig.used(queue), expected_used[queue], "queue {} stalled after {:?}", queue, request);
            }
            let status = rig.status();
            prop_assert_eq!(status.ballooned_bytes, model.len() as u64 * PAGE, "after {:?}", request);
            // Inflated pages wait for the punch timer; what it punches is
            // then exactly the balloon.
            prop_assert!(status.discarded_bytes <= status.ballooned_bytes);
            rig.device.punch_pending();
            let status = rig.status();
            prop_assert_eq!(status.discarded_bytes, status.ballooned_bytes);
            prop_assert_eq!(status.target_bytes, 0, "the guest changed the target");
        }
        assert_outside_ram_intact(&rig.memfd);
    }
}

/// Pages the guest takes back before their deferred punch keep what the
/// guest writes into them; the rest of the request is still punched.
#[test]
fn a_page_deflated_before_its_punch_is_never_punched() {
    let mut rig = Rig::new();
    let buffer = GuestAddress(BUFFER_AREA_GPA);
    let first = (4 * MIB / PAGE) as u32;
    let inflated: Vec<u32> = (first..first + 256).collect();
    let bytes = pfn_bytes(&inflated);
    rig.mem.write_slice(&bytes, buffer).unwrap();
    rig.submit(INFLATE, &[(BUFFER_AREA_GPA, bytes.len() as u32, 0, 0)]);
    let back = pfn_bytes(&inflated[100..110]);
    rig.mem.write_slice(&back, buffer).unwrap();
    rig.submit(DEFLATE, &[(BUFFER_AREA_GPA, back.len() as u32, 0, 0)]);
    // The guest uses its pages again at once, before the punch timer.
    let reused = GuestAddress(u64::from(first + 100) * PAGE);
    let pattern = vec![0x5au8; 10 * PAGE as usize];
    rig.mem.write_slice(&pattern, reused).unwrap();
    rig.device.punch_pending();
    let mut read_back = vec![0u8; pattern.len()];
    rig.mem.read_slice(&mut read_back, reused).unwrap();
    assert!(
        read_back == pattern,
        "a page given back to the guest was punched"
    );
    assert_eq!(test_support::allocated(&rig.memfd, 4 * MIB, MIB), 10 * PAGE);
    assert_eq!(rig.status().discarded_bytes, 246 * PAGE);
}
