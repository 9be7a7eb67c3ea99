//! The `VhostUserBackend` implementation: what vhost-user-backend calls on
//! the request-handler and vring-worker threads.

use std::fs::File;

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

use super::*;

impl VhostUserBackend for BalloonDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = BalloonVring;

    fn num_queues(&self) -> usize {
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        features::offered(self.settings.switches)
    }

    fn acked_features(&self, acked: u64) {
        let mut state = self.state();
        state.acked_features = acked;
        state.roles = features::queue_roles(acked);
        info!(
            "guest acked features: {}",
            features::names(acked).join(", ")
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        let mut state = self.state();
        self.punch_locked(&mut state);
        // The guest was reset: its balloon is gone and its pages are its
        // own again (they read as zeros where they were punched).
        state.tracker.clear();
        state.config.driver_reset();
        state.keep_settings();
        state.acked_features = 0;
        state.roles.clear();
        state.held_stats = None;
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state().event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match self.state().config.read(offset, size as usize) {
            Ok(bytes) => bytes,
            Err(error) => {
                self.faults
                    .record(Fault::ConfigOutOfRange, 1, || error.to_string());
                Vec::new()
            }
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        match state.config.write(offset, buf) {
            Ok(effect) => {
                if effect.actual_changed || effect.poison_changed {
                    state.keep_settings();
                }
                if effect.poison_changed {
                    info!(
                        "guest page poison value is {:#x}",
                        state.config.poison_val()
                    );
                }
                Ok(())
            }
            Err(error) => {
                // Counted, not returned: an error here makes the vhost crate
                // drop the whole frontend connection.
                self.faults
                    .record(Fault::ConfigOutOfRange, 1, || error.to_string());
                Ok(())
            }
        }
    }

    fn update_memory(&self, memory: GuestMemory) -> io::Result<()> {
        let ram = GuestRam::from_memory(&memory.memory())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut state = self.state();
        // Pending punches belong to the old table's files.
        self.punch_locked(&mut state);
        info!(
            "guest RAM: {} MiB in {} region(s)",
            ram.total_bytes() >> 20,
            ram.layout().len()
        );
        // QEMU sends its memory table again on every device start (a
        // resumed VM, a cancelled migration): the balloon of the same guest
        // RAM stays. Other RAM starts empty, unless the state file holds a
        // balloon for it (this backend restarted under a running guest).
        let new_ram = !state.ram.same_ram_as(&ram);
        state.layout = ram.layout();
        state.ram = ram;
        state.memory = Some(memory);
        state.connected = true;
        if new_ram {
            state.taken_over = state.take_over_kept_balloon();
            if state.taken_over {
                info!(
                    "balloon taken over from the state file: target {} MiB, {} MiB ballooned",
                    (u64::from(state.config.num_pages()) * PAGE_SIZE_BYTES) >> 20,
                    (state.tracker.ballooned_pages() * PAGE_SIZE_BYTES) >> 20
                );
            } else {
                state.start_empty_balloon();
                state.keep_settings();
            }
        }
        self.take_incoming_bitmap(&mut state);
        state.restart_check = state.tracker.ballooned_pages() > 0;
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let mut notifier = self.notifier.lock().unwrap_or_else(|e| e.into_inner());
        // Our copy of an older channel would make the search ambiguous.
        *notifier = None;
        match find_backend_channel(&self.open_fds) {
            Ok(stream) => {
                info!("backend request channel found: config-change notifications enabled");
                *notifier = Some(ConfigChangeNotifier::new(stream));
            }
            Err(error) => {
                self.faults.record(Fault::ConfigNotifyFailed, 1, || {
                    format!("{error}; the guest will see new targets only when it reads its config")
                });
            }
        }
        // Our duplicate (if any) keeps the channel open.
        drop(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair per daemon instance: the daemon's worker thread
        // exits only when its own exit event fires.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(error) => {
                warn!("cannot create an exit event: {error}");
                None
            }
        }
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        self.start_transfer(direction, phase, file)?;
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        Ok(self.finish_transfer()?)
    }

    fn stop_vring(&self, index: u32) -> io::Result<()> {
        let mut state = self.state();
        // Before the frontend goes on (a reset, a reboot): nothing pending
        // may be punched once the guest may use its pages again.
        self.punch_locked(&mut state);
        if state.roles.get(index as usize) != Some(&QueueRole::Stats) {
            return Ok(());
        }
        // Rewind over the held stats buffer so that it is popped again once
        // the ring restarts, instead of being lost (as QEMU does).
        if state.held_stats.take().is_some() {
            if let Some(vring) = state.vrings.get(index as usize) {
                let next = vring.queue_next_avail();
                vring.set_queue_next_avail(next.wrapping_sub(1));
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[BalloonVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        crate::seccomp::confine_vring_worker_once(self.settings.seccomp);
        if evset != EventSet::IN {
            return Ok(());
        }
        {
            let mut state = self.state();
            if state.vrings.is_empty() {
                state.vrings = vrings.to_vec();
            }
            self.check_restart(&mut state, vrings);
        }
        if device_event == PUNCH_EVENT {
            self.punch_timer_fired();
            return Ok(());
        }
        if device_event == STATS_REQUEST_EVENT || device_event == STATS_INTERVAL_EVENT {
            return self.stats_wanted(device_event, vrings);
        }
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        if let Err(error) = self.process_queue(index, vring) {
            self.faults
                .record(Fault::QueueFailure, 1, || format!("queue {index}: {error}"));
        }
        Ok(())
    }
}
