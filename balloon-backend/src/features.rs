//! virtio-balloon feature bits and the queue layout they imply.

/// Guest must tell the host before reusing deflated pages.
pub const MUST_TELL_HOST: u32 = 0;
/// A statistics queue exists.
pub const STATS_VQ: u32 = 1;
/// The guest may deflate on its own when it runs out of memory.
pub const DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting (a migration helper; not offered).
pub const FREE_PAGE_HINT: u32 = 3;
/// The guest reports the value it writes into free pages.
pub const PAGE_POISON: u32 = 4;
/// Free page reporting queue.
pub const REPORTING: u32 = 5;
/// Transport: indirect descriptors.
pub const RING_INDIRECT_DESC: u32 = 28;
/// Transport: event index suppression.
pub const RING_EVENT_IDX: u32 = 29;
/// vhost: the backend logs its writes to guest RAM for migration (never
/// acked by a guest driver; QEMU sets it while a migration runs).
pub const LOG_ALL: u32 = 26;
/// vhost-user only: protocol features are negotiated (never shown to the guest).
pub const PROTOCOL_FEATURES: u32 = 30;
/// Modern (virtio 1.x) device.
pub const VERSION_1: u32 = 32;

/// Names used in `status.features`, in bit order.
const NAMES: &[(u32, &str)] = &[
    (MUST_TELL_HOST, "MUST_TELL_HOST"),
    (STATS_VQ, "STATS_VQ"),
    (DEFLATE_ON_OOM, "DEFLATE_ON_OOM"),
    (FREE_PAGE_HINT, "FREE_PAGE_HINT"),
    (PAGE_POISON, "PAGE_POISON"),
    (REPORTING, "REPORTING"),
    (RING_INDIRECT_DESC, "RING_INDIRECT_DESC"),
    (RING_EVENT_IDX, "RING_EVENT_IDX"),
    (VERSION_1, "VERSION_1"),
];

/// The bit mask of one feature.
pub const fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// Whether `features` has `feature` set.
pub fn has(features: u64, feature: u32) -> bool {
    features & bit(feature) != 0
}

/// Names of the known features set in `features` (vhost-user's own bit left out).
pub fn names(features: u64) -> Vec<&'static str> {
    NAMES
        .iter()
        .filter(|(feature, _)| has(features, *feature))
        .map(|(_, name)| *name)
        .collect()
}

/// Which optional balloon features the operator allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureSwitches {
    pub stats: bool,
    pub deflate_on_oom: bool,
    pub page_poison: bool,
    pub reporting: bool,
}

impl Default for FeatureSwitches {
    fn default() -> Self {
        FeatureSwitches {
            stats: true,
            deflate_on_oom: true,
            page_poison: true,
            reporting: true,
        }
    }
}

/// The device features offered to the frontend for these switches.
pub fn offered(switches: FeatureSwitches) -> u64 {
    // MUST_TELL_HOST lets inflated pages be punched later (coalesced): a
    // driver that acks it never uses a page before its deflate completes.
    let mut features = bit(VERSION_1)
        | bit(RING_EVENT_IDX)
        | bit(RING_INDIRECT_DESC)
        | bit(PROTOCOL_FEATURES)
        | bit(MUST_TELL_HOST)
        // The device's writes to guest RAM (used rings) go into QEMU's
        // dirty log (vhost-user-backend's BitmapMmapRegion), so QEMU may
        // migrate the VM.
        | bit(LOG_ALL);
    for (enabled, feature) in [
        (switches.stats, STATS_VQ),
        (switches.deflate_on_oom, DEFLATE_ON_OOM),
        (switches.page_poison, PAGE_POISON),
        (switches.reporting, REPORTING),
    ] {
        if enabled {
            features |= bit(feature);
        }
    }
    features
}

/// What a virtqueue is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    Inflate,
    Deflate,
    Stats,
    FreePageHint,
    Reporting,
}

/// The most queues a balloon can have (inflate, deflate, stats, hint, reporting).
pub const MAX_QUEUES: usize = 5;

/// Queue roles by index for the acked features. Linux and the PCI transport
/// number only the queues whose feature was negotiated, in spec order, so the
/// reporting queue is index 2 when STATS_VQ is off.
pub fn queue_roles(acked: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if has(acked, STATS_VQ) {
        roles.push(QueueRole::Stats);
    }
    if has(acked, FREE_PAGE_HINT) {
        roles.push(QueueRole::FreePageHint);
    }
    if has(acked, REPORTING) {
        roles.push(QueueRole::Reporting);
    }
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reporting_queue_moves_down_without_stats() {
        let all = bit(STATS_VQ) | bit(REPORTING);
        assert_eq!(queue_roles(all).get(3), Some(&QueueRole::Reporting));
        assert_eq!(
            queue_roles(bit(REPORTING)).get(2),
            Some(&QueueRole::Reporting)
        );
        assert_eq!(queue_roles(0).len(), 2);
    }

    #[test]
    fn switches_remove_their_features() {
        let none = FeatureSwitches {
            stats: false,
            deflate_on_oom: false,
            page_poison: false,
            reporting: false,
        };
        let features = offered(none);
        for feature in [STATS_VQ, DEFLATE_ON_OOM, PAGE_POISON, REPORTING] {
            assert!(!has(features, feature));
            assert!(has(offered(FeatureSwitches::default()), feature));
        }
        assert!(has(features, VERSION_1));
    }

    #[test]
    fn names_skip_the_vhost_user_bit() {
        let names = names(offered(FeatureSwitches::default()));
        assert!(names.contains(&"REPORTING"));
        assert!(!names.iter().any(|n| n.contains("PROTOCOL")));
    }
}
