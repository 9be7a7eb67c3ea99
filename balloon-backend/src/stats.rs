//! Parsing the guest's memory statistics buffer: packed `{le16 tag; le64 val}`
//! records. Unknown tags are ignored, as the spec requires.

/// Size of one packed record.
pub const RECORD_BYTES: usize = 10;

/// Tags defined by the spec and Linux (10-15 since Linux 6.12).
mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILL: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
    pub const ASYNC_SCAN: u16 = 12;
    pub const DIRECT_SCAN: u16 = 13;
    pub const ASYNC_RECLAIM: u16 = 14;
    pub const DIRECT_RECLAIM: u16 = 15;
}

pub use balloon_protocol::control::GuestStats;

/// What parsing found besides the values.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParseNotes {
    pub unknown_tags: usize,
    /// Bytes left over after the last whole record.
    pub trailing_bytes: usize,
}

/// Parses a stats buffer. Later records with the same tag win.
pub fn parse(bytes: &[u8], updated_unix_ms: u64) -> (GuestStats, ParseNotes) {
    let mut stats = GuestStats {
        updated_unix_ms,
        ..GuestStats::default()
    };
    let mut notes = ParseNotes::default();
    let records = bytes.chunks_exact(RECORD_BYTES);
    notes.trailing_bytes = records.remainder().len();
    for record in records {
        let (tag_bytes, value_bytes) = record.split_at(2);
        let tag = u16::from_le_bytes([tag_bytes[0], tag_bytes[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(value_bytes);
        let value = Some(u64::from_le_bytes(value));
        let field = match tag {
            tag::SWAP_IN => &mut stats.swap_in,
            tag::SWAP_OUT => &mut stats.swap_out,
            tag::MAJFLT => &mut stats.major_faults,
            tag::MINFLT => &mut stats.minor_faults,
            tag::MEMFREE => &mut stats.free_bytes,
            tag::MEMTOT => &mut stats.total_bytes,
            tag::AVAIL => &mut stats.available_bytes,
            tag::CACHES => &mut stats.disk_caches_bytes,
            tag::HTLB_PGALLOC => &mut stats.hugetlb_allocations,
            tag::HTLB_PGFAIL => &mut stats.hugetlb_failures,
            tag::OOM_KILL => &mut stats.oom_kills,
            tag::ALLOC_STALL => &mut stats.alloc_stalls,
            tag::ASYNC_SCAN => &mut stats.async_scans,
            tag::DIRECT_SCAN => &mut stats.direct_scans,
            tag::ASYNC_RECLAIM => &mut stats.async_reclaims,
            tag::DIRECT_RECLAIM => &mut stats.direct_reclaims,
            _ => {
                notes.unknown_tags += 1;
                continue;
            }
        };
        *field = value;
    }
    (stats, notes)
}

/// Encodes records the way the Linux driver does (used by tests and fuzzing).
pub fn encode(records: &[(u16, u64)]) -> Vec<u8> {
    records
        .iter()
        .flat_map(|(tag, value)| tag.to_le_bytes().into_iter().chain(value.to_le_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_linux_tag() {
        let records: Vec<(u16, u64)> = (0..16).map(|t| (t, 1000 + u64::from(t))).collect();
        let (stats, notes) = parse(&encode(&records), 42);
        assert_eq!(notes, ParseNotes::default());
        assert_eq!(stats.swap_in, Some(1000));
        assert_eq!(stats.free_bytes, Some(1004));
        assert_eq!(stats.total_bytes, Some(1005));
        assert_eq!(stats.available_bytes, Some(1006));
        assert_eq!(stats.disk_caches_bytes, Some(1007));
        assert_eq!(stats.oom_kills, Some(1010));
        assert_eq!(stats.direct_reclaims, Some(1015));
        assert_eq!(stats.updated_unix_ms, 42);
    }

    #[test]
    fn ignores_unknown_tags_and_counts_trailing_bytes() {
        let mut bytes = encode(&[(4, 7), (99, 1), (0xffff, 2)]);
        bytes.extend_from_slice(&[1, 2, 3]);
        let (stats, notes) = parse(&bytes, 0);
        assert_eq!(stats.free_bytes, Some(7));
        assert_eq!(
            notes,
            ParseNotes {
                unknown_tags: 2,
                trailing_bytes: 3
            }
        );
    }

    #[test]
    fn empty_buffer_gives_no_values() {
        let (stats, notes) = parse(&[], 5);
        assert_eq!(
            stats,
            GuestStats {
                updated_unix_ms: 5,
                ..GuestStats::default()
            }
        );
        assert_eq!(notes, ParseNotes::default());
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let (_, notes) = parse(&bytes, 0);
            prop_assert_eq!(notes.trailing_bytes, bytes.len() % RECORD_BYTES);
        }
    }
}
