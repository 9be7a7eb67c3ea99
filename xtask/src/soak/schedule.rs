//! The soak's schedule: a seeded stream of steps (an operation or a fault,
//! then a pause), drawn from the seed alone, never from what the run saw,
//! so that `--seed S` replays the same steps in the same order.

/// SplitMix64: a small seeded generator, so a seed gives one schedule.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high` (modulo bias is irrelevant here).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        let span = high.saturating_sub(low).saturating_add(1);
        low.saturating_add(self.next_u64() % span)
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// An index below `len` (0 for an empty range).
    pub fn index(&mut self, len: usize) -> usize {
        let len = u64::try_from(len).unwrap_or(u64::MAX).max(1);
        usize::try_from(self.next_u64() % len).unwrap_or(0)
    }
}

/// A size as balloonctl takes it.
pub fn size(mib: u64) -> String {
    if mib == 0 {
        "0".to_string()
    } else {
        format!("{mib}M")
    }
}

/// How a control client misbehaves for a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RudeClient {
    /// Sends half a request line and vanishes.
    HalfLine,
    /// Sends a whole request and vanishes before the reply.
    LeavesBeforeReply,
    /// Connects and vanishes without a byte.
    Silent,
}

/// One thing the soak does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    // Operations.
    /// `balloonctl set` (pins the target), waiting for the guest or not.
    PinnedTarget { guest: usize, mib: u64, wait: bool },
    /// `balloonctl set HIGH --no-wait`, then `gap_ms` later `set LOW`:
    /// a deflate that catches the inflate still landing.
    Bounce {
        guest: usize,
        high_mib: u64,
        low_mib: u64,
        gap_ms: u64,
    },
    /// `balloonctl unpin`: host-policy takes the VM back.
    Unpin { guest: usize },
    /// `set-target` without a pin (what host-policy sends), from a control
    /// client: refused while pinned.
    UnpinnedTarget { guest: usize, mib: u64 },
    /// The host's memory used outside the guests, as host-policy reads it
    /// (in percent of the host): 0 gives back, higher levels reclaim.
    HostMemory { other_percent: u64 },
    /// `guest-verifier --oom-push MIB` in the guest: deflate-on-OOM.
    OomPush { guest: usize, mib: u64 },
    /// Hold the host in host-policy's dead band until every balloon
    /// settles, then check every invariant.
    Quiet,
    // Faults.
    /// SIGKILL the backend, start it again `down_ms` later; with
    /// `reset`, the guest is reset (QMP `system_reset`) while its backend
    /// is down, so the restarted backend sees the reset only in the rings.
    KillBackend {
        guest: usize,
        down_ms: u64,
        reset: bool,
    },
    /// SIGSTOP the backend, SIGCONT `hold_ms` later.
    StopBackend { guest: usize, hold_ms: u64 },
    /// QMP `stop`, `cont` `hold_ms` later.
    PauseGuest { guest: usize, hold_ms: u64 },
    /// Live migration to the guest's other QEMU and backend.
    Migrate { guest: usize },
    /// QMP `system_reset` (the verifier is started again after the boot).
    Reset { guest: usize },
    /// SIGKILL host-policy, start it again `down_ms` later.
    KillPolicy { down_ms: u64 },
    /// A control client that misbehaves once and vanishes.
    Rude { guest: usize, how: RudeClient },
    /// A control client that sends requests and never reads the replies,
    /// holding its connection `hold_ms`.
    NeverReads { guest: usize, hold_ms: u64 },
}

impl Action {
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Action::KillBackend { .. }
                | Action::StopBackend { .. }
                | Action::PauseGuest { .. }
                | Action::Migrate { .. }
                | Action::Reset { .. }
                | Action::KillPolicy { .. }
                | Action::Rude { .. }
                | Action::NeverReads { .. }
        )
    }

    /// A short name of the kind, for the counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::PinnedTarget { .. } => "pinned target (balloonctl set)",
            Action::Bounce { .. } => "bounce (up, then down at once)",
            Action::Unpin { .. } => "unpin (balloonctl unpin)",
            Action::UnpinnedTarget { .. } => "unpinned set-target",
            Action::HostMemory { .. } => "host memory change",
            Action::OomPush { .. } => "deflate-on-OOM push",
            Action::Quiet => "quiet period",
            Action::KillBackend { .. } => "backend SIGKILL and restart",
            Action::StopBackend { .. } => "backend SIGSTOP/SIGCONT",
            Action::PauseGuest { .. } => "QEMU stop/cont",
            Action::Migrate { .. } => "live migration",
            Action::Reset { .. } => "guest reset",
            Action::KillPolicy { .. } => "host-policy SIGKILL and restart",
            Action::Rude { .. } => "rude control client",
            Action::NeverReads { .. } => "control client that never reads",
        }
    }

    pub fn describe(&self) -> String {
        let g = |guest: &usize| format!("g{guest}");
        match self {
            Action::PinnedTarget { guest, mib, wait } => format!(
                "{}: balloonctl set {}{}",
                g(guest),
                size(*mib),
                if *wait { "" } else { " --no-wait" }
            ),
            Action::Bounce {
                guest,
                high_mib,
                low_mib,
                gap_ms,
            } => format!(
                "{}: balloonctl set {} --no-wait, {gap_ms} ms later set {} --no-wait",
                g(guest),
                size(*high_mib),
                size(*low_mib)
            ),
            Action::Unpin { guest } => format!("{}: balloonctl unpin", g(guest)),
            Action::UnpinnedTarget { guest, mib } => {
                format!("{}: set-target {mib} MiB without a pin", g(guest))
            }
            Action::HostMemory { other_percent } => {
                format!("host: {other_percent}% of its memory used outside the guests")
            }
            Action::OomPush { guest, mib } => {
                format!("{}: guest-verifier --oom-push {mib}", g(guest))
            }
            Action::Quiet => "quiet period: host in the dead band, every invariant".to_string(),
            Action::KillBackend {
                guest,
                down_ms,
                reset,
            } => format!(
                "{}: SIGKILL the backend, {}restart {down_ms} ms later",
                g(guest),
                if *reset {
                    "QMP system_reset while it is down, "
                } else {
                    ""
                }
            ),
            Action::StopBackend { guest, hold_ms } => format!(
                "{}: SIGSTOP the backend, SIGCONT {hold_ms} ms later",
                g(guest)
            ),
            Action::PauseGuest { guest, hold_ms } => {
                format!("{}: QMP stop, cont {hold_ms} ms later", g(guest))
            }
            Action::Migrate { guest } => {
                format!("{}: live migration to its other QEMU and backend", g(guest))
            }
            Action::Reset { guest } => format!("{}: QMP system_reset", g(guest)),
            Action::KillPolicy { down_ms } => {
                format!("host-policy: SIGKILL, restart {down_ms} ms later")
            }
            Action::Rude { guest, how } => format!(
                "{}: control client {}",
                g(guest),
                match how {
                    RudeClient::HalfLine => "sends half a line and vanishes",
                    RudeClient::LeavesBeforeReply => "sends a request and vanishes",
                    RudeClient::Silent => "connects and vanishes",
                }
            ),
            Action::NeverReads { guest, hold_ms } => format!(
                "{}: control client sends requests, never reads, holds {hold_ms} ms",
                g(guest)
            ),
        }
    }
}

/// One step: an action, then a pause before the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub then_ms: u64,
}

/// Host-policy levels of memory used outside the guests, in percent of
/// the host: none (give back), dead band, reclaim, hard reclaim (with the
/// guests' own resident memory on top).
pub const HOST_LEVELS: [u64; 4] = [0, 40, 55, 65];

/// Relative weights of the actions.
const WEIGHTS: [(u64, &str); 15] = [
    (12, "pinned"),
    (10, "bounce"),
    (12, "unpin"),
    (6, "unpinned"),
    (9, "host"),
    (4, "oom"),
    (7, "quiet"),
    (6, "kill-backend"),
    (5, "stop-backend"),
    (5, "pause"),
    (2, "migrate"),
    (2, "reset"),
    (3, "kill-policy"),
    (4, "rude"),
    (3, "never-reads"),
];

/// The schedule of `seed` for `guests` guests, one step at a time.
pub struct Schedule {
    rng: SplitMix64,
    guests: usize,
}

impl Schedule {
    pub fn new(seed: u64, guests: usize) -> Self {
        Schedule {
            rng: SplitMix64::new(seed),
            guests: guests.max(1),
        }
    }

    fn target_mib(&mut self) -> u64 {
        if self.rng.percent(40) {
            self.rng.between(0, 64)
        } else {
            self.rng.between(128, 300)
        }
    }

    fn draw_action(&mut self) -> Action {
        let total: u64 = WEIGHTS.iter().map(|(w, _)| w).sum();
        let mut pick = self.rng.between(0, total.saturating_sub(1));
        let mut name = "quiet";
        for (weight, kind) in WEIGHTS {
            if pick < weight {
                name = kind;
                break;
            }
            pick -= weight;
        }
        let guest = self.rng.index(self.guests);
        match name {
            "pinned" => Action::PinnedTarget {
                guest,
                mib: self.target_mib(),
                wait: self.rng.percent(50),
            },
            "bounce" => Action::Bounce {
                guest,
                high_mib: self.rng.between(160, 300),
                low_mib: if self.rng.percent(50) {
                    0
                } else {
                    self.rng.between(8, 64)
                },
                gap_ms: self.rng.between(0, 400),
            },
            "unpin" => Action::Unpin { guest },
            "unpinned" => Action::UnpinnedTarget {
                guest,
                mib: self.target_mib(),
            },
            "host" => Action::HostMemory {
                other_percent: HOST_LEVELS[self.rng.index(HOST_LEVELS.len())],
            },
            "oom" => Action::OomPush {
                guest,
                mib: self.rng.between(16, 64),
            },
            "kill-backend" => Action::KillBackend {
                guest,
                down_ms: self.rng.between(0, 1500),
                reset: self.rng.percent(25),
            },
            "stop-backend" => Action::StopBackend {
                guest,
                hold_ms: self.rng.between(100, 3000),
            },
            "pause" => Action::PauseGuest {
                guest,
                hold_ms: self.rng.between(200, 5000),
            },
            "migrate" => Action::Migrate { guest },
            "reset" => Action::Reset { guest },
            "kill-policy" => Action::KillPolicy {
                down_ms: self.rng.between(0, 3000),
            },
            "rude" => Action::Rude {
                guest,
                how: match self.rng.between(0, 2) {
                    0 => RudeClient::HalfLine,
                    1 => RudeClient::LeavesBeforeReply,
                    _ => RudeClient::Silent,
                },
            },
            "never-reads" => Action::NeverReads {
                guest,
                hold_ms: self.rng.between(2000, 12_000),
            },
            _ => Action::Quiet,
        }
    }

    pub fn next_step(&mut self) -> Step {
        let action = self.draw_action();
        // A third of the steps follow the previous one at once, so that
        // faults land while the balloon is still moving.
        let then_ms = if self.rng.percent(33) {
            0
        } else {
            self.rng.between(50, 2500)
        };
        Step { action, then_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(seed: u64, n: usize) -> Vec<Step> {
        let mut schedule = Schedule::new(seed, 2);
        (0..n).map(|_| schedule.next_step()).collect()
    }

    #[test]
    fn a_seed_gives_one_schedule() {
        assert_eq!(steps(28, 300), steps(28, 300));
        assert_ne!(steps(28, 300), steps(29, 300));
    }

    #[test]
    fn every_kind_of_step_comes_within_bounds() {
        let plan = steps(28, 2000);
        let kinds: std::collections::BTreeSet<&str> =
            plan.iter().map(|s| s.action.kind()).collect();
        assert_eq!(kinds.len(), WEIGHTS.len(), "{kinds:?}");
        let faults = plan.iter().filter(|s| s.action.is_fault()).count();
        assert!((400..1000).contains(&faults), "{faults} faults of 2000");
        for step in &plan {
            assert!(step.then_ms <= 2500, "{step:?}");
            match step.action {
                Action::PinnedTarget { guest, mib, .. } | Action::UnpinnedTarget { guest, mib } => {
                    assert!(guest < 2 && mib <= 300, "{step:?}")
                }
                Action::Bounce {
                    high_mib,
                    low_mib,
                    gap_ms,
                    ..
                } => assert!(
                    (160..=300).contains(&high_mib) && low_mib <= 64 && gap_ms <= 400,
                    "{step:?}"
                ),
                Action::HostMemory { other_percent } => {
                    assert!(HOST_LEVELS.contains(&other_percent))
                }
                Action::OomPush { mib, .. } => assert!((16..=64).contains(&mib)),
                Action::NeverReads { hold_ms, .. } => {
                    assert!((2000..=12_000).contains(&hold_ms))
                }
                _ => {}
            }
            assert!(!step.action.describe().is_empty());
        }
        // Small and large targets both come.
        let targets: Vec<u64> = plan
            .iter()
            .filter_map(|s| match s.action {
                Action::PinnedTarget { mib, .. } => Some(mib),
                _ => None,
            })
            .collect();
        assert!(targets.iter().any(|&m| m <= 64) && targets.iter().any(|&m| m >= 128));
    }

    #[test]
    fn the_generator_stays_in_its_ranges() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..1000 {
            assert!((5..=9).contains(&rng.between(5, 9)));
            assert!(rng.index(3) < 3);
        }
        assert_eq!(rng.index(0), 0);
        assert_eq!(rng.between(7, 7), 7);
    }
}
