//! The invariant of docs/balloon-backend.md ("a page is punched only while
//! the guest has given it"), checked across backend restarts: an honest
//! guest inflates, deflates, reports free pages and gets targets, and the
//! backend is killed (dropped with no shutdown) at random steps, sometimes
//! with its last request handled but not completed, and started again from
//! its state file. After every step every page the guest owns still holds
//! what the guest last wrote there, and the restarted backend's balloon,
//! target and pin are exactly the guest's and the operator's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use test_support::rig::Rig;
use test_support::{BUFFER_AREA_GPA, DEFLATE, INFLATE, MIB, REGION0_BYTES, REPORTING};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;
/// The guest's pages under test: all of region 0 (the rig's rings and
/// request buffers live in region 1).
const PAGES: u32 = (REGION0_BYTES / PAGE) as u32;
/// VRING_DESC_F_WRITE: a report's buffers are device-writable.
const WRITE: u16 = 2;

#[derive(Clone, Debug)]
enum Op {
    /// Up to `count` pages from `start` on, every `stride`-th, that the
    /// guest owns.
    Inflate {
        start: u32,
        count: u16,
        stride: u8,
    },
    /// Up to `count` ballooned pages from the `pick`-th on.
    Deflate {
        pick: u16,
        count: u16,
    },
    /// Free pages the guest owns from `start` on, reported as one range
    /// per run, then used again by the guest.
    Report {
        start: u32,
        pages: u16,
    },
    /// The punch timer fires.
    Punch,
    Target {
        mib: u8,
        pin: bool,
    },
    Unpin,
    /// SIGKILL and a restart; with `unanswered`, the last inflate or
    /// deflate was handled but its completion never reached the guest.
    Kill {
        unanswered: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..PAGES, 1u16..300, 1u8..4).prop_map(|(start, count, stride)| Op::Inflate { start, count, stride }),
        4 => (any::<u16>(), 1u16..300).prop_map(|(pick, count)| Op::Deflate { pick, count }),
        2 => (0..PAGES, 1u16..1024).prop_map(|(start, pages)| Op::Report { start, pages }),
        2 => Just(Op::Punch),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(mib, pin)| Op::Target { mib, pin }),
        1 => Just(Op::Unpin),
        3 => any::<bool>().prop_map(|unanswered| Op::Kill { unanswered }),
    ]
}

/// What the guest writes into the first word of a page it owns; never 0,
/// which is what a punched page reads.
fn pattern(pfn: u32, generation: u64) -> u64 {
    (1 << 63) | (u64::from(pfn) << 24) | (generation & 0xff_ffff)
}

struct Guest {
    rig: Rig,
    ballooned: BTreeSet<u32>,
    /// What each owned page holds.
    written: BTreeMap<u32, u64>,
    generation: u64,
    target_bytes: u64,
    pinned: bool,
    /// The queue of the last inflate or deflate, if it was the last request.
    last_pfn_queue: Option<usize>,
}

impl Guest {
    fn new(rig: Rig) -> Guest {
        let mut guest = Guest {
            rig,
            ballooned: BTreeSet::new(),
            written: BTreeMap::new(),
            generation: 0,
            target_bytes: 0,
            pinned: false,
            last_pfn_queue: None,
        };
        let all: Vec<u32> = (0..PAGES).collect();
        guest.write(&all);
        guest
    }

    /// The guest uses `pfns` again: a fresh pattern in each.
    fn write(&mut self, pfns: &[u32]) {
        self.generation += 1;
        for &pfn in pfns {
            let value = pattern(pfn, self.generation);
            self.rig
                .mem
                .write_obj(value, GuestAddress(u64::from(pfn) * PAGE))
                .unwrap();
            self.written.insert(pfn, value);
        }
    }

    fn send_pfns(&mut self, queue: usize, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.rig
            .mem
            .write_slice(&bytes, GuestAddress(BUFFER_AREA_GPA))
            .unwrap();
        self.rig
            .submit(queue, &[(BUFFER_AREA_GPA, bytes.len() as u32, 0, 0)]);
        self.last_pfn_queue = Some(queue);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Inflate {
                start,
                count,
                stride,
            } => {
                let pfns: Vec<u32> = (start..PAGES)
                    .step_by(usize::from(stride))
                    .filter(|p| !self.ballooned.contains(p))
                    .take(usize::from(count).min(256))
                    .collect();
                if pfns.is_empty() {
                    return;
                }
                // Given to the balloon: the guest no longer cares what
                // these pages hold.
                for pfn in &pfns {
                    self.written.remove(pfn);
                    self.ballooned.insert(*pfn);
                }
                self.send_pfns(INFLATE, &pfns);
            }
            Op::Deflate { pick, count } => {
                let len = self.ballooned.len();
                if len == 0 {
                    return;
                }
                let pfns: Vec<u32> = self
                    .ballooned
                    .iter()
                    .copied()
                    .skip(usize::from(pick) % len)
                    .take(usize::from(count).min(256))
                    .collect();
                for pfn in &pfns {
                    self.ballooned.remove(pfn);
                }
                self.send_pfns(DEFLATE, &pfns);
                // Linux reuses deflated pages as soon as the request is done.
                self.write(&pfns);
            }
            Op::Report { start, pages } => {
                let free: Vec<u32> = (start..PAGES.min(start.saturating_add(u32::from(pages))))
                    .take_while(|p| !self.ballooned.contains(p))
                    .collect();
                let (Some(&first), Some(_)) = (free.first(), free.last()) else {
                    return;
                };
                for pfn in &free {
                    self.written.remove(pfn);
                }
                let len = free.len() as u32 * PAGE as u32;
                self.rig
                    .submit(REPORTING, &[(u64::from(first) * PAGE, len, WRITE, 0)]);
                self.last_pfn_queue = None;
                // The reported pages are allocated again and written.
                self.write(&free);
            }
            Op::Punch => self.rig.device.punch_pending(),
            Op::Target { mib, pin } => {
                let requested = u64::from(mib) * MIB / 8;
                match self.rig.device.set_target(requested, pin) {
                    Ok(outcome) => {
                        self.target_bytes = outcome.target_bytes;
                        self.pinned |= pin;
                    }
                    Err(_) => assert!(self.pinned && !pin, "set_target refused unpinned"),
                }
            }
            Op::Unpin => {
                self.rig.device.unpin();
                self.pinned = false;
            }
            Op::Kill { unanswered } => {
                let queue = if unanswered {
                    self.last_pfn_queue
                } else {
                    None
                };
                self.rig.kill_and_restart(queue);
                self.last_pfn_queue = None;
            }
        }
    }

    /// Every owned page holds what the guest wrote; the backend's balloon,
    /// target and pin are the model's.
    fn check(&self, step: usize, op: &Op) -> Result<(), TestCaseError> {
        for (&pfn, &want) in &self.written {
            let got: u64 = self
                .rig
                .mem
                .read_obj(GuestAddress(u64::from(pfn) * PAGE))
                .unwrap();
            prop_assert_eq!(
                got,
                want,
                "step {} ({:?}): page {} the guest owns was changed",
                step,
                op,
                pfn
            );
        }
        let status = self.rig.status();
        prop_assert_eq!(
            status.ballooned_bytes,
            self.ballooned.len() as u64 * PAGE,
            "step {} ({:?})",
            step,
            op
        );
        prop_assert_eq!(status.target_bytes, self.target_bytes, "step {}", step);
        prop_assert_eq!(status.pinned, self.pinned, "step {}", step);
        prop_assert!(status.discarded_bytes <= status.ballooned_bytes);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_backend_killed_at_any_step_never_punches_a_page_the_guest_owns(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut guest = Guest::new(Rig::with_state_file(&dir.path().join("balloon.state")));
        for (step, op) in ops.iter().enumerate() {
            guest.apply(op);
            guest.check(step, op)?;
        }
        // Once punches are carried out, all of the balloon is returned.
        guest.rig.device.punch_pending();
        let status = guest.rig.status();
        prop_assert_eq!(status.discarded_bytes, status.ballooned_bytes);
        let resident = test_support::allocated(&guest.rig.memfd, 0, REGION0_BYTES);
        prop_assert_eq!(
            resident,
            REGION0_BYTES - guest.ballooned.len() as u64 * PAGE,
            "region 0 resident bytes"
        );
    }
}

/// The schedule of issue 30, in process: a deflate completes and the
/// backend is killed at once; the restarted one neither counts the
/// deflated pages nor punches them when new inflates arrive around them.
#[test]
fn a_deflate_just_before_a_kill_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut guest = Guest::new(Rig::with_state_file(&dir.path().join("balloon.state")));
    let ops = [
        Op::Target {
            mib: 80,
            pin: false,
        },
        Op::Inflate {
            start: 1000,
            count: 256,
            stride: 2,
        },
        Op::Punch,
        Op::Target { mib: 0, pin: false },
        Op::Deflate {
            pick: 0,
            count: 256,
        },
        Op::Kill { unanswered: false },
        // New pages between the ones just taken back.
        Op::Inflate {
            start: 1001,
            count: 256,
            stride: 2,
        },
        Op::Punch,
    ];
    for (step, op) in ops.iter().enumerate() {
        guest.apply(op);
        guest.check(step, op).unwrap();
    }
    assert_eq!(guest.rig.status().ballooned_bytes, 256 * PAGE);
    assert_eq!(guest.rig.status().discarded_bytes, 256 * PAGE);
}
