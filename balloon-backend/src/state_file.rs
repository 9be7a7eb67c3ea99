//! The state file (`--state-file`): the device's saved state on disk, so
//! that a backend restarted under a running guest (a crash, `systemctl
//! restart`) keeps the balloon's accounting. Read once at start-up;
//! rewritten by a thread of its own within `WRITE_INTERVAL` of a change
//! (it sleeps while nothing changes), in place through a descriptor opened at start-up. The thread may open,
//! truncate or write at an offset nothing (its seccomp list), so a shorter
//! state is padded with spaces, which JSON ignores, and an all-blank file
//! means no state. A torn write (a crash mid-write) fails to decode and
//! the next backend starts with an empty balloon, which is safe.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::warn;

use crate::device::BalloonDevice;
use crate::saved_state::{self, SavedState, StateError, MAX_STATE_BYTES};

/// The writer wakes only when the state changed, and writes at most once
/// per interval, so a burst of requests costs one write.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("--state-file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("--state-file {path}: {source}")]
    Decode { path: PathBuf, source: StateError },
}

/// Opens (creating, mode 0600) the state file and reads the state in it:
/// None when it is new or empty.
pub fn open(
    path: &Path,
    version: u32,
) -> Result<(File, Result<Option<SavedState>, StateFileError>), StateFileError> {
    let open_error = |source| StateFileError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(open_error)?;
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_STATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(open_error)?;
    let state = if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(None)
    } else {
        saved_state::decode(&bytes, version)
            .map(Some)
            .map_err(|source| StateFileError::Decode {
                path: path.to_path_buf(),
                source,
            })
    };
    Ok((file, state))
}

/// Replaces the file's contents with `bytes` (empty: no state), padded
/// with spaces over what the file held before; returns the file's length.
fn rewrite(mut file: &File, bytes: &[u8], length: usize) -> io::Result<usize> {
    file.seek(SeekFrom::Start(0))?;
    file.write_all(bytes)?;
    let padding = length.saturating_sub(bytes.len());
    file.write_all(&vec![b' '; padding])?;
    Ok(length.max(bytes.len()))
}

/// Writes the device's state whenever it changed, and empties the file
/// once the guest it described has gone. Runs forever.
pub fn keep_written(device: Arc<BalloonDevice>, file: File) {
    let mut written: Option<SavedState> = None;
    let mut length = file.metadata().map_or(0, |m| m.len() as usize);
    // Set while writes fail: retried every interval, logged once.
    let mut failing = false;
    let mut seen = 0;
    loop {
        if !failing {
            seen = device.wait_saved_change(seen);
        }
        // Let a burst of changes settle into one write.
        std::thread::sleep(WRITE_INTERVAL);
        let now = device.snapshot_if_attached();
        if now == written {
            failing = false;
            continue;
        }
        let result = match &now {
            Some(state) => saved_state::encode(state)
                .map_err(io::Error::other)
                .and_then(|bytes| rewrite(&file, &bytes, length)),
            None => rewrite(&file, &[], length),
        };
        match result {
            Ok(new_length) => {
                length = new_length;
                written = now;
                failing = false;
            }
            Err(error) => {
                if !failing {
                    warn!("writing the state file: {error}; retrying every {WRITE_INTERVAL:?}");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saved_state::{encode, SavedRegion, STATE_FORMAT, STATE_VERSION};

    fn state(runs: Vec<(u64, u64)>) -> SavedState {
        SavedState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            regions: vec![SavedRegion {
                start_gpa: 0,
                size_bytes: 1 << 30,
                host_page_bytes: 4096,
                ballooned: runs,
            }],
            files: vec![(1, 2)],
            config: [0; 16],
            acked_features: 0,
            pinned: false,
            reported_bytes_total: 0,
            discard_cpu_us: 0,
            errors: Default::default(),
        }
    }

    fn reopen(path: &Path) -> Option<SavedState> {
        let (_, loaded) = open(path, STATE_VERSION).unwrap();
        loaded.unwrap()
    }

    #[test]
    fn a_shorter_state_is_padded_and_a_blank_file_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (file, loaded) = open(&path, STATE_VERSION).unwrap();
        assert!(loaded.unwrap().is_none());
        let long = state((0..50).map(|i| (i * 10, 5)).collect());
        let short = state(vec![(7, 1)]);
        let length = rewrite(&file, &encode(&long).unwrap(), 0).unwrap();
        assert_eq!(reopen(&path), Some(long));
        let padded = rewrite(&file, &encode(&short).unwrap(), length).unwrap();
        assert_eq!(padded, length, "the file never shrinks");
        assert_eq!(reopen(&path), Some(short));
        rewrite(&file, &[], padded).unwrap();
        assert_eq!(reopen(&path), None);
    }

    #[test]
    fn a_torn_file_is_an_error_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let bytes = encode(&state(vec![(1, 2)])).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let (_, loaded) = open(&path, STATE_VERSION).unwrap();
        let error = loaded.unwrap_err();
        assert!(error.to_string().starts_with("--state-file "), "{error}");
        let missing_dir = dir.path().join("no/such/dir/state.json");
        assert!(matches!(
            open(&missing_dir, STATE_VERSION),
            Err(StateFileError::Open { .. })
        ));
    }
}
