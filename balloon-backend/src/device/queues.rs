//! The four queues: inflate and deflate requests, free page reports and the
//! statistics buffer, each read defensively (see docs/balloon-backend.md,
//! "Guest trust").

use super::*;

impl BalloonDevice {
    pub(super) fn process_queue(&self, index: usize, vring: &BalloonVring) -> io::Result<()> {
        let (role, event_idx, memory) = {
            let state = self.state();
            (
                state.roles.get(index).copied(),
                state.event_idx,
                state.memory.clone(),
            )
        };
        let (Some(role), Some(memory)) = (role, memory) else {
            return Ok(());
        };
        // A stopped ring (QEMU stopped the device: a pause, a migration)
        // waits for its restart; a stats timer may still fire meanwhile.
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            self.drain(role, vring, &memory)?;
            if role == QueueRole::Inflate {
                self.schedule_punches();
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    fn drain(&self, role: QueueRole, vring: &BalloonVring, memory: &GuestMemory) -> io::Result<()> {
        let mut used_any = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(memory.memory());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match role {
                QueueRole::Inflate | QueueRole::Deflate => {
                    self.handle_pfn_request(role, chain);
                    used_any |= self.complete(vring, head);
                }
                QueueRole::Reporting => {
                    self.handle_report(chain);
                    used_any |= self.complete(vring, head);
                }
                QueueRole::Stats => used_any |= self.handle_stats_buffer(vring, chain),
                QueueRole::FreePageHint => used_any |= self.complete(vring, head),
            }
        }
        if used_any {
            self.signal(vring);
        }
        Ok(())
    }

    /// Puts a chain in the used ring with length 0 (nothing written back).
    fn complete(&self, vring: &BalloonVring, head: u16) -> bool {
        match vring.add_used(head, 0) {
            Ok(()) => true,
            Err(error) => {
                self.faults.record(Fault::QueueFailure, 1, || {
                    format!("add_used({head}): {error}")
                });
                false
            }
        }
    }

    fn signal(&self, vring: &BalloonVring) {
        let needed = vring.needs_notification().unwrap_or(true);
        if needed {
            if let Err(error) = vring.signal_used_queue() {
                self.faults.record(Fault::QueueFailure, 1, || {
                    format!("signalling the guest: {error}")
                });
            }
        }
    }

    /// The descriptors of a chain, cut at a loop or at
    /// `MAX_CHAIN_DESCRIPTORS`, each cut counted under its own name.
    fn descriptors(&self, chain: DescriptorChain<ChainMemory>) -> Vec<Descriptor> {
        let head = chain.head_index();
        let (descriptors, cut) = bounded_chain(head, chain);
        match cut {
            Some(ChainCut::Loop) => self.faults.record(Fault::DescriptorChainLoop, 1, || {
                format!("descriptor chain at head {head} loops; the rest is ignored")
            }),
            Some(ChainCut::TooLong) => self.faults.record(Fault::DescriptorChainTooLong, 1, || {
                format!(
                    "descriptor chain at head {head} has more than {MAX_CHAIN_DESCRIPTORS} descriptors; the rest is ignored"
                )
            }),
            None => {}
        }
        descriptors
    }

    /// Reads the readable descriptors of a chain, up to `limit` bytes.
    fn read_chain(&self, chain: DescriptorChain<ChainMemory>, limit: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        let memory = chain.memory().clone();
        for descriptor in self.descriptors(chain) {
            if descriptor.is_write_only() {
                self.faults.record(Fault::WriteOnlyDescriptor, 1, || {
                    format!(
                        "write-only descriptor at {:#x} in a device-readable request",
                        descriptor.addr().0
                    )
                });
                continue;
            }
            let len = descriptor.len() as usize;
            if bytes.len().saturating_add(len) > limit {
                self.faults.record(Fault::RequestTooLong, 1, || {
                    format!("request longer than {limit} bytes; the rest is ignored")
                });
                break;
            }
            let start = bytes.len();
            bytes.resize(start + len, 0);
            if let Err(error) = memory.read_slice(&mut bytes[start..], descriptor.addr()) {
                bytes.truncate(start);
                self.faults.record(Fault::DescriptorOutsideRam, 1, || {
                    format!(
                        "descriptor {:#x}+{len} is not in guest RAM: {error}",
                        descriptor.addr().0
                    )
                });
            }
        }
        bytes
    }

    fn handle_pfn_request(&self, role: QueueRole, chain: DescriptorChain<ChainMemory>) {
        let bytes = self.read_chain(chain, MAX_REQUEST_BYTES);
        let (pfns, trailing) = pfn::parse_pfns(&bytes);
        if trailing {
            self.faults.record(Fault::TrailingBytes, 1, || {
                format!(
                    "PFN request of {} bytes is not a multiple of 4",
                    bytes.len()
                )
            });
        }
        let mut state = self.state();
        let batch = pfn::compact_pfns(&state.layout, pfns);
        self.faults
            .record(Fault::PfnOutsideRam, batch.outside_ram as u64, || {
                format!("{} PFNs outside guest RAM skipped", batch.outside_ram)
            });
        self.faults
            .record(Fault::DuplicatePfn, batch.duplicates as u64, || {
                format!("{} duplicate PFNs in one request", batch.duplicates)
            });
        let state = &mut *state;
        for run in &batch.runs {
            if role == QueueRole::Deflate {
                let outcome = state.tracker.deflate(run);
                self.faults
                    .record(Fault::DeflateNotInflated, outcome.not_ballooned, || {
                        format!(
                            "{} deflated pages were not in the balloon",
                            outcome.not_ballooned
                        )
                    });
                continue;
            }
            // Punched later, coalesced with other requests' pages
            // (`schedule_punches`).
            let outcome = state.tracker.inflate(run);
            self.faults
                .record(Fault::AlreadyInflated, outcome.already_ballooned, || {
                    format!("{} pages inflated twice", outcome.already_ballooned)
                });
        }
    }

    fn poison_blocks_discard(&self, state: &DeviceState) -> bool {
        features::has(state.acked_features, features::PAGE_POISON) && state.config.poison_val() != 0
    }

    fn handle_report(&self, chain: DescriptorChain<ChainMemory>) {
        let mut state = self.state();
        let skip_discard = self.poison_blocks_discard(&state);
        for descriptor in self.descriptors(chain) {
            if !descriptor.is_write_only() {
                self.faults.record(Fault::ReadOnlyDescriptor, 1, || {
                    format!(
                        "read-only descriptor at {:#x} in a free page report",
                        descriptor.addr().0
                    )
                });
                continue;
            }
            let run = match pfn::locate_range(
                &state.layout,
                descriptor.addr().0,
                u64::from(descriptor.len()),
            ) {
                Ok(run) => run,
                Err(error) => {
                    let fault = match error {
                        RangeError::Empty => Fault::ReportEmptyRange,
                        RangeError::Unaligned => Fault::ReportUnalignedRange,
                        RangeError::OutsideRam => Fault::ReportOutsideRam,
                        RangeError::CrossesRegionEnd => Fault::ReportCrossesRegionEnd,
                    };
                    self.faults.record(fault, 1, || {
                        format!(
                            "reported range {:#x}+{:#x} refused",
                            descriptor.addr().0,
                            descriptor.len()
                        )
                    });
                    continue;
                }
            };
            if skip_discard {
                continue;
            }
            // Only whole host pages can be freed.
            let Some(range) = pfn::whole_host_pages(&run, state.ram.host_page_bytes(run.region))
            else {
                continue;
            };
            if self.discard(&mut state, &range) {
                state.reported_bytes_total += range.len_bytes;
                state.keep_settings();
            }
        }
    }

    /// Parses a stats buffer and holds it; returns whether a chain was used.
    fn handle_stats_buffer(
        &self,
        vring: &BalloonVring,
        chain: DescriptorChain<ChainMemory>,
    ) -> bool {
        let head = chain.head_index();
        let bytes = self.read_chain(chain, MAX_STATS_BYTES);
        let (stats, notes) = stats::parse(&bytes, now_unix_ms());
        self.faults
            .record(Fault::StatsUnknownTag, notes.unknown_tags as u64, || {
                format!("{} unknown stats tags ignored", notes.unknown_tags)
            });
        self.faults.record(
            Fault::TrailingBytes,
            notes.trailing_bytes.min(1) as u64,
            || {
                format!(
                    "stats buffer has {} bytes after the last record",
                    notes.trailing_bytes
                )
            },
        );
        let previous = {
            let mut state = self.state();
            // What the balloon held when the guest measured these values,
            // so a policy can tell memory a landing step already took.
            let balloon_bytes = u64::from(state.config.actual()) * PAGE_SIZE_BYTES;
            state.stats = Some(GuestStats {
                balloon_bytes: Some(balloon_bytes),
                ..stats
            });
            state.stats_generation += 1;
            state.held_stats.replace(head)
        };
        self.stats_updated.notify_all();
        debug!("guest statistics updated");
        // The driver has one stats buffer; give back any older one at once.
        match previous {
            Some(old) => {
                self.faults.record(Fault::StatsExtraBuffer, 1, || {
                    "guest queued a second stats buffer; returning the older one".to_string()
                });
                self.complete(vring, old)
            }
            None => false,
        }
    }

    /// A statistics request or the interval timer: hand the held stats
    /// buffer back so the guest refreshes it, or pick up a buffer that is
    /// waiting (after a rewind).
    pub(super) fn stats_wanted(&self, event: u16, vrings: &[BalloonVring]) -> io::Result<()> {
        if event == STATS_INTERVAL_EVENT {
            self.drain_stats_interval();
        } else {
            // Drain the eventfd; a spurious wake-up is harmless.
            let _drained = self.stats_request.read();
        }
        let (index, held) = {
            let mut state = self.state();
            let index = state.roles.iter().position(|r| *r == QueueRole::Stats);
            (index, state.held_stats.take())
        };
        let Some(vring) = index.and_then(|i| vrings.get(i)) else {
            return Ok(());
        };
        match held {
            Some(head) => {
                if self.complete(vring, head) {
                    self.signal(vring);
                }
                Ok(())
            }
            None => match index {
                Some(i) => self.process_queue(i, vring),
                None => Ok(()),
            },
        }
    }
}
