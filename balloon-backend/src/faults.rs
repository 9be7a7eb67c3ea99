//! Counting and rate-limited logging of everything that went wrong in the
//! device: guest mistakes (or attacks) and host-side failures. The guest is
//! untrusted, so each fault is counted, logged at most once per interval per
//! kind, and the device keeps going.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every fault the device counts. The snake_case name is the key in
/// `status.errors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    PfnOutsideRam,
    DuplicatePfn,
    AlreadyInflated,
    DeflateNotInflated,
    WriteOnlyDescriptor,
    ReadOnlyDescriptor,
    TrailingBytes,
    DescriptorOutsideRam,
    RequestTooLong,
    DescriptorChainLoop,
    DescriptorChainTooLong,
    StatsUnknownTag,
    StatsExtraBuffer,
    ReportEmptyRange,
    ReportUnalignedRange,
    ReportOutsideRam,
    ReportCrossesRegionEnd,
    ConfigOutOfRange,
    DiscardFailed,
    /// The used ring or the guest notifier could not be written.
    QueueFailure,
    /// The punch timer or the stats interval timer could not be armed or
    /// read.
    TimerFailed,
    /// The stats-request eventfd could not be written.
    StatsRequestFailed,
    ConfigNotifyFailed,
}

const ALL: [Fault; 23] = [
    Fault::PfnOutsideRam,
    Fault::DuplicatePfn,
    Fault::AlreadyInflated,
    Fault::DeflateNotInflated,
    Fault::WriteOnlyDescriptor,
    Fault::ReadOnlyDescriptor,
    Fault::TrailingBytes,
    Fault::DescriptorOutsideRam,
    Fault::RequestTooLong,
    Fault::DescriptorChainLoop,
    Fault::DescriptorChainTooLong,
    Fault::StatsUnknownTag,
    Fault::StatsExtraBuffer,
    Fault::ReportEmptyRange,
    Fault::ReportUnalignedRange,
    Fault::ReportOutsideRam,
    Fault::ReportCrossesRegionEnd,
    Fault::ConfigOutOfRange,
    Fault::DiscardFailed,
    Fault::QueueFailure,
    Fault::TimerFailed,
    Fault::StatsRequestFailed,
    Fault::ConfigNotifyFailed,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::PfnOutsideRam => "pfn_outside_ram",
            Fault::DuplicatePfn => "duplicate_pfn",
            Fault::AlreadyInflated => "already_inflated",
            Fault::DeflateNotInflated => "deflate_not_inflated",
            Fault::WriteOnlyDescriptor => "write_only_descriptor",
            Fault::ReadOnlyDescriptor => "read_only_descriptor",
            Fault::TrailingBytes => "trailing_bytes",
            Fault::DescriptorOutsideRam => "descriptor_outside_ram",
            Fault::RequestTooLong => "request_too_long",
            Fault::DescriptorChainLoop => "descriptor_chain_loop",
            Fault::DescriptorChainTooLong => "descriptor_chain_too_long",
            Fault::StatsUnknownTag => "stats_unknown_tag",
            Fault::StatsExtraBuffer => "stats_extra_buffer",
            Fault::ReportEmptyRange => "report_empty_range",
            Fault::ReportUnalignedRange => "report_unaligned_range",
            Fault::ReportOutsideRam => "report_outside_ram",
            Fault::ReportCrossesRegionEnd => "report_crosses_region_end",
            Fault::ConfigOutOfRange => "config_out_of_range",
            Fault::DiscardFailed => "discard_failed",
            Fault::QueueFailure => "queue_failure",
            Fault::TimerFailed => "timer_failed",
            Fault::StatsRequestFailed => "stats_request_failed",
            Fault::ConfigNotifyFailed => "config_notify_failed",
        }
    }

    fn index(self) -> usize {
        ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// How often one kind of fault may be logged.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Fault counters with a per-kind log rate limit.
pub struct FaultLog {
    counts: [AtomicU64; ALL.len()],
    last_logged: Mutex<[Option<Instant>; ALL.len()]>,
}

impl Default for FaultLog {
    fn default() -> Self {
        FaultLog {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            last_logged: Mutex::new([None; ALL.len()]),
        }
    }
}

impl FaultLog {
    /// Counts `n` occurrences of `fault` and logs `detail` unless this kind
    /// was logged within the last interval.
    pub fn record(&self, fault: Fault, n: u64, detail: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        let index = fault.index();
        let total = match self.counts.get(index) {
            Some(count) => count.fetch_add(n, Ordering::Relaxed) + n,
            None => return,
        };
        let now = Instant::now();
        let should_log = match self.last_logged.lock() {
            Ok(mut last) => match last.get_mut(index) {
                Some(slot) if slot.is_none_or(|t| now.duration_since(t) >= LOG_INTERVAL) => {
                    *slot = Some(now);
                    true
                }
                _ => false,
            },
            Err(_) => true,
        };
        if should_log {
            log::warn!("{}: {} (total {total})", fault.name(), detail());
        }
    }

    pub fn count(&self, fault: Fault) -> u64 {
        self.counts
            .get(fault.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Adds saved counters (by name) to these; unknown names are skipped.
    pub fn add_counts<'a>(&self, counts: impl IntoIterator<Item = (&'a str, u64)>) {
        for (name, n) in counts {
            if let Some(count) = ALL
                .iter()
                .position(|f| f.name() == name)
                .and_then(|index| self.counts.get(index))
            {
                count.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Non-zero counters by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        ALL.iter()
            .map(|f| (f.name(), self.count(*f)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_occurrence_and_names_are_unique() {
        let log = FaultLog::default();
        for _ in 0..100 {
            log.record(Fault::PfnOutsideRam, 2, || "test".into());
        }
        log.record(Fault::ConfigNotifyFailed, 0, || unreachable!());
        assert_eq!(log.count(Fault::PfnOutsideRam), 200);
        assert_eq!(log.snapshot(), vec![("pfn_outside_ram", 200)]);
        let mut names: Vec<_> = ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for (i, f) in ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
        }
    }
}
