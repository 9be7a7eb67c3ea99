//! The device's state leaving and arriving: QEMU's device-state transfer
//! for migration (SAVE on the source, LOAD on the destination). Encoding
//! is in `saved_state`. (A restarted backend takes its balloon over from
//! the state file instead: `state_file`.)
//!
//! A state that arrives before guest RAM does (the destination loads it
//! before QEMU sends the memory table) waits in `DeviceState::incoming`
//! and is taken over by `update_memory`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::thread::JoinHandle;

use log::error;
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

use super::*;
use crate::saved_state::{self, SavedRegion, SavedState, StateError, MAX_STATE_BYTES};

/// A loaded state waiting for guest RAM.
#[derive(Debug)]
pub(super) struct Incoming {
    pub state: SavedState,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("device state transfer in phase {0:?} is not supported (only STOPPED)")]
    Phase(VhostTransferStatePhase),
    #[error("writing the device state to QEMU: {0}")]
    Write(io::Error),
    #[error("reading the device state from QEMU: {0}")]
    Read(io::Error),
    #[error("device state from QEMU refused: {0}")]
    Refused(StateError),
    #[error("starting the device state transfer thread: {0}")]
    Spawn(io::Error),
    #[error("no device state transfer was started")]
    NotStarted,
    #[error("the device state transfer thread panicked")]
    Panicked,
}

impl From<TransferError> for io::Error {
    fn from(error: TransferError) -> io::Error {
        io::Error::other(error)
    }
}

/// A transfer in progress on its own thread (the vhost-user thread must not
/// block on the pipe); `check_device_state` joins it.
pub(super) type Transfer = JoinHandle<Result<Option<SavedState>, TransferError>>;

fn write_state(mut file: File, bytes: Vec<u8>) -> Result<Option<SavedState>, TransferError> {
    file.write_all(&bytes).map_err(TransferError::Write)?;
    Ok(None)
}

fn read_state(file: File, version: u32) -> Result<Option<SavedState>, TransferError> {
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(TransferError::Read)?;
    saved_state::decode(&bytes, version)
        .map(Some)
        .map_err(TransferError::Refused)
}

impl BalloonDevice {
    /// The state as it is now, with pending punches carried out first so
    /// that every wholly ballooned page counts as returned.
    pub fn snapshot(&self) -> SavedState {
        let mut state = self.state();
        self.punch_locked(&mut state);
        self.snapshot_locked(&state)
    }

    fn snapshot_locked(&self, state: &DeviceState) -> SavedState {
        let runs = state.tracker.ballooned_runs();
        let regions = state
            .ram
            .shape()
            .into_iter()
            .zip(runs)
            .map(
                |((start_gpa, size_bytes, host_page_bytes), ballooned)| SavedRegion {
                    start_gpa,
                    size_bytes,
                    host_page_bytes,
                    ballooned,
                },
            )
            .collect();
        let errors: BTreeMap<String, u64> = self
            .faults
            .snapshot()
            .into_iter()
            .map(|(name, n)| (name.to_string(), n))
            .collect();
        SavedState {
            format: saved_state::STATE_FORMAT.to_string(),
            version: self.settings.state_version,
            regions,
            files: state.ram.file_identities(),
            config: state.config.to_bytes(),
            acked_features: state.acked_features,
            pinned: state.pinned,
            reported_bytes_total: state.reported_bytes_total,
            discard_cpu_us: state.discard_cpu.as_micros() as u64,
            errors,
        }
    }

    /// Starts a transfer QEMU asked for: the state goes out through `file`
    /// (SAVE) or comes in from it (LOAD) on a thread of its own.
    pub(super) fn start_transfer(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> Result<(), TransferError> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(TransferError::Phase(phase));
        }
        let version = self.settings.state_version;
        let work: Box<dyn FnOnce() -> Result<Option<SavedState>, TransferError> + Send> =
            match direction {
                VhostTransferStateDirection::SAVE => {
                    // The source keeps its state: a cancelled migration
                    // resumes the guest here.
                    let bytes =
                        saved_state::encode(&self.snapshot()).map_err(TransferError::Refused)?;
                    info!("device state: sending {} bytes", bytes.len());
                    Box::new(move || write_state(file, bytes))
                }
                VhostTransferStateDirection::LOAD => Box::new(move || read_state(file, version)),
            };
        let handle = std::thread::Builder::new()
            .name("state-transfer".into())
            .spawn(work)
            .map_err(TransferError::Spawn)?;
        *self.transfer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// Waits for the transfer to end; a loaded state is taken over.
    pub(super) fn finish_transfer(&self) -> Result<(), TransferError> {
        let handle = self
            .transfer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(TransferError::NotStarted)?;
        let result = handle.join().map_err(|_| TransferError::Panicked)?;
        match result {
            Ok(Some(state)) => {
                self.adopt(state);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) => {
                // QEMU only learns that the check failed: say why here.
                error!("{error}");
                Err(error)
            }
        }
    }

    /// Takes over a migrated state: the guest's own, so its config space,
    /// pin and counters apply at once, its bitmap when guest RAM arrives.
    pub fn adopt(&self, saved: SavedState) {
        let mut state = self.state();
        info!(
            "device state received: balloon of {} MiB",
            saved.ballooned_pages().saturating_mul(PAGE_SIZE_BYTES) >> 20
        );
        self.apply_settings(&mut state, &saved);
        state.incoming = Some(Incoming { state: saved });
        state.keep_settings();
        if state.connected && state.ram.total_bytes() > 0 {
            self.take_incoming_bitmap(&mut state);
        }
    }

    fn apply_settings(&self, state: &mut DeviceState, saved: &SavedState) {
        state.config = ConfigSpace::from_bytes(saved.config);
        state.pinned = saved.pinned;
        state.reported_bytes_total = saved.reported_bytes_total;
        state.discard_cpu = Duration::from_micros(saved.discard_cpu_us);
        self.faults
            .add_counts(saved.errors.iter().map(|(name, n)| (name.as_str(), *n)));
    }

    /// Gives the tracker the waiting state's bitmap if it describes this
    /// guest RAM; a state that does not fit is dropped with a warning.
    pub(super) fn take_incoming_bitmap(&self, state: &mut DeviceState) {
        let Some(incoming) = state.incoming.take() else {
            return;
        };
        if !incoming.state.fits(&state.ram.shape()) {
            warn!("the migrated balloon state does not describe this guest RAM (other regions); starting with an empty balloon");
            return;
        }
        info!(
            "balloon taken over: target {} MiB, {} pages ballooned",
            (u64::from(state.config.num_pages()) * PAGE_SIZE_BYTES) >> 20,
            incoming.state.ballooned_pages()
        );
        state.start_empty_balloon();
        state.tracker.inflate_runs(&incoming.state.ballooned_runs());
        state.keep_settings();
        // The destination's RAM was loaded page by page, refilling the
        // balloon: return it before the guest runs.
        let pending_bytes = state.tracker.pending_bytes();
        self.punch_locked(state);
        info!(
            "returned {} MiB of ballooned guest RAM after migration",
            pending_bytes >> 20
        );
    }
}
