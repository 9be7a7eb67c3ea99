//! The device's state as bytes: what a migration carries from the source
//! backend to the destination's (through QEMU's device-state transfer) and
//! what the state file keeps across a backend restart. Pure encoding and
//! checks; the device decides what to do with a decoded state.
//!
//! The encoding is JSON (readable with `jq` when debugging a migration),
//! with the balloon bitmap as runs of ballooned pages. It carries a format
//! name and a version: a reader refuses a version it does not know, naming
//! both, instead of guessing at fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `format` field of every saved state.
pub const STATE_FORMAT: &str = "balloon-backend-state";
/// The version this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Largest state a reader accepts: a 1 TiB guest whose every other page is
/// ballooned needs about 2 GiB of runs, far beyond any real balloon; real
/// states are kilobytes to a few megabytes.
pub const MAX_STATE_BYTES: usize = 256 << 20;

/// One region of guest RAM and its ballooned pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRegion {
    pub start_gpa: u64,
    pub size_bytes: u64,
    pub host_page_bytes: u64,
    /// (first 4 KiB page, pages) runs, relative to the region's start.
    pub ballooned: Vec<(u64, u64)>,
}

/// Everything the device must not lose when it moves or restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub format: String,
    pub version: u32,
    pub regions: Vec<SavedRegion>,
    /// (device, inode) of each region's memory file: a restarted backend
    /// takes its bitmap back only for the very same guest RAM.
    pub files: Vec<(u64, u64)>,
    /// The 16-byte config space (`num_pages`, `actual`, `poison_val`).
    pub config: [u8; 16],
    pub acked_features: u64,
    pub pinned: bool,
    pub reported_bytes_total: u64,
    pub discard_cpu_us: u64,
    /// Fault counters by name.
    pub errors: BTreeMap<String, u64>,
}

/// Why saved bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("device state of {0} bytes is larger than the {MAX_STATE_BYTES} bytes accepted")]
    TooLarge(usize),
    #[error("device state is not a balloon-backend state: {0}")]
    NotAState(String),
    #[error("device state version {found} is not supported: this balloon-backend reads version {supported}")]
    Version { found: u32, supported: u32 },
    #[error("device state version {version} is malformed: {source}")]
    Malformed {
        version: u32,
        source: serde_json::Error,
    },
    #[error("encoding the device state: {0}")]
    Encode(serde_json::Error),
}

/// The fields read before anything else, so that any version's header can
/// be read and named in the error.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// Serialises `state`; its header carries `state.version`.
pub fn encode(state: &SavedState) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(state).map_err(StateError::Encode)
}

/// Reads a state written by a backend speaking `supported`.
pub fn decode(bytes: &[u8], supported: u32) -> Result<SavedState, StateError> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err(StateError::TooLarge(bytes.len()));
    }
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| StateError::NotAState(e.to_string()))?;
    if header.format != STATE_FORMAT {
        return Err(StateError::NotAState(format!(
            "format {:?}, expected {STATE_FORMAT:?}",
            header.format
        )));
    }
    if header.version != supported {
        return Err(StateError::Version {
            found: header.version,
            supported,
        });
    }
    serde_json::from_slice(bytes).map_err(|source| StateError::Malformed {
        version: header.version,
        source,
    })
}

impl SavedState {
    /// (size, host page size) per region, as the tracker takes them.
    pub fn tracker_regions(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.size_bytes, r.host_page_bytes))
            .collect()
    }

    /// The ballooned runs per region, as the tracker takes them.
    pub fn ballooned_runs(&self) -> Vec<Vec<(u64, u64)>> {
        self.regions.iter().map(|r| r.ballooned.clone()).collect()
    }

    /// Pages in the balloon (as the runs say; overlapping runs count twice).
    pub fn ballooned_pages(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.ballooned.iter())
            .fold(0u64, |sum, (_, pages)| sum.saturating_add(*pages))
    }

    /// Whether guest RAM of this shape (start, size, host page size per
    /// region) is what the state describes.
    pub fn fits(&self, layout: &[(u64, u64, u64)]) -> bool {
        self.regions.len() == layout.len()
            && self
                .regions
                .iter()
                .zip(layout)
                .all(|(r, &(start, size, page))| {
                    (r.start_gpa, r.size_bytes, r.host_page_bytes) == (start, size, page)
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(version: u32) -> SavedState {
        SavedState {
            format: STATE_FORMAT.into(),
            version,
            regions: vec![SavedRegion {
                start_gpa: 0,
                size_bytes: 512 << 20,
                host_page_bytes: 4096,
                ballooned: vec![(10, 4), (100, 1)],
            }],
            files: vec![(5, 77)],
            config: [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0, 0, 0],
            acked_features: 1 << 32,
            pinned: true,
            reported_bytes_total: 4 << 20,
            discard_cpu_us: 1234,
            errors: BTreeMap::from([("deflate_not_inflated".to_string(), 2)]),
        }
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let bytes = encode(&sample(2)).unwrap();
        let error = decode(&bytes, STATE_VERSION).unwrap_err();
        assert!(matches!(
            error,
            StateError::Version {
                found: 2,
                supported: 1
            }
        ));
        assert_eq!(
            error.to_string(),
            "device state version 2 is not supported: this balloon-backend reads version 1"
        );
        assert_eq!(decode(&bytes, 2).unwrap(), sample(2));
    }

    #[test]
    fn foreign_and_damaged_bytes_are_refused() {
        assert!(matches!(
            decode(b"\x00\x01garbage", STATE_VERSION),
            Err(StateError::NotAState(_))
        ));
        assert!(matches!(
            decode(br#"{"format":"virtiofsd","version":1}"#, STATE_VERSION),
            Err(StateError::NotAState(_))
        ));
        assert!(matches!(
            decode(
                br#"{"format":"balloon-backend-state","version":1}"#,
                STATE_VERSION
            ),
            Err(StateError::Malformed { version: 1, .. })
        ));
        let mut bytes = encode(&sample(1)).unwrap();
        bytes.truncate(bytes.len() / 2);
        assert!(decode(&bytes, STATE_VERSION).is_err());
    }

    #[test]
    fn layout_must_match_exactly() {
        let state = sample(1);
        assert!(state.fits(&[(0, 512 << 20, 4096)]));
        assert!(!state.fits(&[(0, 256 << 20, 4096)]));
        assert!(!state.fits(&[(0, 512 << 20, 2 << 20)]));
        assert!(!state.fits(&[(0, 512 << 20, 4096), (1 << 32, 4096, 4096)]));
    }

    proptest! {
        /// Whatever the state, it reads back as written.
        #[test]
        fn round_trips(
            runs in proptest::collection::vec((0u64..1 << 20, 1u64..1000), 0..50),
            config in any::<[u8; 16]>(),
            features in any::<u64>(),
            pinned in any::<bool>(),
            counters in any::<(u64, u64)>(),
        ) {
            let mut state = sample(STATE_VERSION);
            state.regions[0].ballooned = runs;
            state.config = config;
            state.acked_features = features;
            state.pinned = pinned;
            state.reported_bytes_total = counters.0;
            state.discard_cpu_us = counters.1;
            let bytes = encode(&state).unwrap();
            prop_assert_eq!(decode(&bytes, STATE_VERSION).unwrap(), state);
        }
    }
}
