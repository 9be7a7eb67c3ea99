//! The host's memory files as pure functions, text in, numbers out: a
//! memory cgroup's (v1 and v2) and the kernel's PSI. `host_reader` reads
//! the files; nothing here touches the file system.
//!
//! A cgroup as the host: its total is its limit, its available memory what
//! the limit leaves above its usage plus the file pages the kernel can
//! reclaim (the file LRUs of its `memory.stat`). QEMU's guest RAM is
//! memfd (shmem), which sits on the anon LRU and is not reclaimable file
//! cache, so `file`, `shmem` or v1's `cache` are not counted wholesale.

use std::collections::BTreeMap;

/// From this size up, a v1 `memory.limit_in_bytes` means no limit: the
/// kernel's page-counter maximum is `i64::MAX` rounded down to a page
/// (9223372036854771712 with 4 KiB pages), far above any real limit.
pub const V1_UNLIMITED_BYTES: u64 = 1 << 62;

/// A memory cgroup read as the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The limit: the host's total.
    pub limit_bytes: u64,
    /// `memory.current` (v2) or `memory.usage_in_bytes` (v1).
    pub usage_bytes: u64,
    /// Active and inactive file pages: what the kernel can reclaim.
    pub reclaimable_file_bytes: u64,
}

impl CgroupMemory {
    /// The limit less the usage, plus reclaimable file pages, at most the
    /// limit (saturating: usage may exceed a lowered limit).
    pub fn available_bytes(&self) -> u64 {
        self.limit_bytes
            .saturating_sub(self.usage_bytes)
            .saturating_add(self.reclaimable_file_bytes)
            .min(self.limit_bytes)
    }
}

/// Why a cgroup's files do not make a host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupParseError {
    #[error("no limit set: memory.max and memory.high are both \"max\" (set one, e.g. `systemctl set-property machine.slice MemoryMax=...`)")]
    NoLimitV2,
    #[error("no limit set: memory.limit_in_bytes is {0} (unlimited); set a limit in memory.limit_in_bytes")]
    NoLimitV1(u64),
    #[error("{file}: expected a number of bytes{or_max}, found {found:?}")]
    NotANumber {
        file: &'static str,
        /// ` or "max"` where the file may say so.
        or_max: &'static str,
        found: String,
    },
    #[error("memory.stat has no {0} line")]
    MissingStat(&'static str),
}

/// A cgroup file's one number; `max` is `None` where the file may say
/// so (v2 limits).
fn number(
    file: &'static str,
    text: &str,
    max_allowed: bool,
) -> Result<Option<u64>, CgroupParseError> {
    let word = text.trim();
    if max_allowed && word == "max" {
        return Ok(None);
    }
    word.parse()
        .map(Some)
        .map_err(|_| CgroupParseError::NotANumber {
            file,
            or_max: if max_allowed { " or \"max\"" } else { "" },
            // An unexpected file can be large: its start says enough.
            found: word.chars().take(40).collect(),
        })
}

/// `key value` lines (memory.stat, memory.events, memory.oom_control);
/// lines that are not are left out.
pub fn key_values(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse().ok()?;
            Some((key, value))
        })
        .collect()
}

/// The sum of two `memory.stat` lines, both required.
fn file_pages(
    stat: &str,
    active: &'static str,
    inactive: &'static str,
) -> Result<u64, CgroupParseError> {
    let values = key_values(stat);
    let get = |key: &'static str| {
        values
            .get(key)
            .copied()
            .ok_or(CgroupParseError::MissingStat(key))
    };
    Ok(get(active)?.saturating_add(get(inactive)?))
}

/// A cgroup v2 directory's files: `memory.max`, `memory.high` (None when
/// absent), `memory.current`, `memory.stat`. The limit is `memory.max`,
/// or `memory.high` where only that is set, or the lower of the two.
pub fn parse_v2(
    max: &str,
    high: Option<&str>,
    current: &str,
    stat: &str,
) -> Result<CgroupMemory, CgroupParseError> {
    let max = number("memory.max", max, true)?;
    let high = match high {
        Some(text) => number("memory.high", text, true)?,
        None => None,
    };
    let limit_bytes = match (max, high) {
        (Some(max), Some(high)) => max.min(high),
        (Some(limit), None) | (None, Some(limit)) => limit,
        (None, None) => return Err(CgroupParseError::NoLimitV2),
    };
    Ok(CgroupMemory {
        limit_bytes,
        usage_bytes: number("memory.current", current, false)?.unwrap_or(0),
        reclaimable_file_bytes: file_pages(stat, "active_file", "inactive_file")?,
    })
}

/// A cgroup v1 memory-controller directory's files:
/// `memory.limit_in_bytes`, `memory.usage_in_bytes`, `memory.stat` (its
/// hierarchical `total_` lines, so that child groups count).
pub fn parse_v1(
    limit_in_bytes: &str,
    usage_in_bytes: &str,
    stat: &str,
) -> Result<CgroupMemory, CgroupParseError> {
    let limit_bytes = number("memory.limit_in_bytes", limit_in_bytes, false)?.unwrap_or(0);
    if limit_bytes >= V1_UNLIMITED_BYTES {
        return Err(CgroupParseError::NoLimitV1(limit_bytes));
    }
    Ok(CgroupMemory {
        limit_bytes,
        usage_bytes: number("memory.usage_in_bytes", usage_in_bytes, false)?.unwrap_or(0),
        reclaimable_file_bytes: file_pages(stat, "total_active_file", "total_inactive_file")?,
    })
}

/// The `oom_kill` count of a v2 `memory.events` or a v1
/// `memory.oom_control` (kernels before 4.13 have none there).
pub fn oom_kills(events: &str) -> Option<u64> {
    key_values(events).get("oom_kill").copied()
}

/// The memory PSI averages over 10 s, in percent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pressure {
    pub some_avg10: f64,
    /// Older kernels' files have no `full` line.
    pub full_avg10: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsiParseError {
    #[error("no \"some avg10=...\" line: not a PSI file")]
    NoSome,
    #[error("{0:?} is not a percentage between 0 and 100")]
    BadAverage(String),
}

/// The `avg10` of one PSI line's fields (`avg10=1.25 avg60=... total=...`).
fn avg10(fields: &str) -> Option<Result<f64, PsiParseError>> {
    let value = fields
        .split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))?;
    Some(
        value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && (0.0..=100.0).contains(v))
            .ok_or_else(|| PsiParseError::BadAverage(value.chars().take(40).collect())),
    )
}

/// /proc/pressure/memory or a v2 cgroup's memory.pressure.
pub fn parse_psi(text: &str) -> Result<Pressure, PsiParseError> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        if let Some(fields) = line.strip_prefix("some ") {
            some = avg10(fields);
        } else if let Some(fields) = line.strip_prefix("full ") {
            full = avg10(fields);
        }
    }
    Ok(Pressure {
        some_avg10: some.ok_or(PsiParseError::NoSome)??,
        full_avg10: full.transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    // A v2 memory.stat as Linux 6.1 writes it, shortened: guest RAM in
    // shmem (on the anon LRU), some page cache.
    const STAT_V2: &str = "anon 1048576\nfile 541065216\nkernel 8388608\nshmem 536870912\n\
        file_mapped 0\nactive_anon 537919488\ninactive_anon 1048576\nactive_file 2097152\n\
        inactive_file 2097152\nunevictable 0\n";
    // A v1 memory.stat, shortened: the group's own lines, then the
    // hierarchical totals.
    const STAT_V1: &str = "cache 540000000\nrss 1048576\nshmem 536870912\nactive_file 0\n\
        inactive_file 0\nhierarchical_memory_limit 1073741824\ntotal_cache 541065216\n\
        total_rss 1048576\ntotal_shmem 536870912\ntotal_active_anon 537919488\n\
        total_inactive_anon 0\ntotal_active_file 3145728\ntotal_inactive_file 1048576\n";

    #[test]
    fn a_v2_cgroup_counts_its_limit_usage_and_file_lrus_not_its_shmem() {
        let memory = parse_v2("1073741824\n", Some("max\n"), "541065216\n", STAT_V2).unwrap();
        assert_eq!(
            memory,
            CgroupMemory {
                limit_bytes: 1024 * MIB,
                usage_bytes: 541065216,
                reclaimable_file_bytes: 4 * MIB,
            }
        );
        assert_eq!(memory.available_bytes(), 1024 * MIB - 541065216 + 4 * MIB);
        // memory.high alone, or the lower of the two.
        let high = parse_v2("max", Some("536870912"), "0", STAT_V2).unwrap();
        assert_eq!(high.limit_bytes, 512 * MIB);
        let both = parse_v2("1073741824", Some("536870912"), "0", STAT_V2).unwrap();
        assert_eq!(both.limit_bytes, 512 * MIB);
        let no_high_file = parse_v2("1073741824", None, "0", STAT_V2).unwrap();
        assert_eq!(no_high_file.limit_bytes, 1024 * MIB);
    }

    #[test]
    fn a_v2_cgroup_without_a_limit_or_with_garbage_is_an_error_that_says_which() {
        assert_eq!(
            parse_v2("max\n", Some("max\n"), "0", STAT_V2),
            Err(CgroupParseError::NoLimitV2)
        );
        let error = parse_v2("max", None, "0", STAT_V2).unwrap_err().to_string();
        assert!(
            error.contains("no limit set") && error.contains("MemoryMax="),
            "{error}"
        );
        let error = parse_v2("lots", None, "0", STAT_V2)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("memory.max") && error.contains("\"lots\"") && error.contains("\"max\""),
            "{error}"
        );
        let error = parse_v2("1024", None, "-5", STAT_V2)
            .unwrap_err()
            .to_string();
        assert!(error.contains("memory.current"), "{error}");
        assert_eq!(
            parse_v2("1024", None, "0", "anon 5\nactive_file 1\n"),
            Err(CgroupParseError::MissingStat("inactive_file"))
        );
    }

    #[test]
    fn a_v1_cgroup_counts_the_hierarchical_file_lrus() {
        let memory = parse_v1("1073741824\n", "541065216\n", STAT_V1).unwrap();
        assert_eq!(memory.limit_bytes, 1024 * MIB);
        assert_eq!(memory.reclaimable_file_bytes, 4 * MIB);
        assert_eq!(memory.available_bytes(), 1024 * MIB - 541065216 + 4 * MIB);
        // The kernel's "unlimited" (PAGE_COUNTER_MAX pages of 4 KiB).
        assert_eq!(
            parse_v1("9223372036854771712\n", "0", STAT_V1),
            Err(CgroupParseError::NoLimitV1(9223372036854771712))
        );
        assert_eq!(
            parse_v1("1024", "0", "cache 5\n"),
            Err(CgroupParseError::MissingStat("total_active_file"))
        );
        assert!(parse_v1("", "0", STAT_V1).is_err());
    }

    #[test]
    fn usage_above_the_limit_leaves_only_file_pages_available() {
        let memory = CgroupMemory {
            limit_bytes: 100,
            usage_bytes: 150,
            reclaimable_file_bytes: 30,
        };
        assert_eq!(memory.available_bytes(), 30);
        let all_cache = CgroupMemory {
            limit_bytes: 100,
            usage_bytes: 50,
            reclaimable_file_bytes: 80,
        };
        assert_eq!(all_cache.available_bytes(), 100);
    }

    #[test]
    fn oom_kills_come_from_events_or_oom_control() {
        let events = "low 0\nhigh 12\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(events), Some(1));
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n";
        assert_eq!(oom_kills(oom_control), Some(4));
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[test]
    fn psi_reads_some_and_full_avg10() {
        let text = "some avg10=12.50 avg60=3.00 avg300=0.50 total=123456\n\
                    full avg10=4.25 avg60=1.00 avg300=0.10 total=45678\n";
        assert_eq!(
            parse_psi(text),
            Ok(Pressure {
                some_avg10: 12.5,
                full_avg10: Some(4.25)
            })
        );
        assert_eq!(
            parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"),
            Ok(Pressure {
                some_avg10: 0.0,
                full_avg10: None
            })
        );
        assert_eq!(parse_psi(""), Err(PsiParseError::NoSome));
        assert_eq!(parse_psi("MemTotal: 5 kB\n"), Err(PsiParseError::NoSome));
        assert!(parse_psi("some avg10=101.0 avg60=0\n").is_err());
        assert!(parse_psi("some avg10=nan\n").is_err());
        assert!(parse_psi("some avg10=1.0\nfull avg10=x\n").is_err());
    }

    proptest! {
        /// Whatever the numbers, available memory is at most the limit,
        /// at least the limit less the usage, and what the files say.
        #[test]
        fn cgroup_files_give_available_memory_within_the_limit(
            limit in 0u64..u64::MAX,
            usage in 0u64..u64::MAX,
            active in 0u64..u64::MAX,
            inactive in 0u64..u64::MAX,
            high in proptest::option::of(0u64..u64::MAX),
        ) {
            let stat = format!("anon 1\nactive_file {active}\ninactive_file {inactive}\nshmem 7\n");
            let high_text = high.map(|h| h.to_string());
            let memory = parse_v2(&limit.to_string(), high_text.as_deref(), &usage.to_string(), &stat)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(memory.limit_bytes, high.map_or(limit, |h| h.min(limit)));
            prop_assert_eq!(memory.reclaimable_file_bytes, active.saturating_add(inactive));
            let available = memory.available_bytes();
            prop_assert!(available <= memory.limit_bytes);
            prop_assert!(available >= memory.limit_bytes.saturating_sub(usage));
            let v1_stat = format!("total_active_file {active}\ntotal_inactive_file {inactive}\n");
            match parse_v1(&limit.to_string(), &usage.to_string(), &v1_stat) {
                Ok(v1) => {
                    prop_assert!(limit < V1_UNLIMITED_BYTES);
                    prop_assert!(v1.available_bytes() <= limit);
                }
                Err(error) => prop_assert_eq!(error, CgroupParseError::NoLimitV1(limit)),
            }
        }

        /// Arbitrary text never panics a parser.
        #[test]
        fn arbitrary_text_parses_or_errs(text in "\\PC{0,200}", other in "[a-z_ 0-9=.\\n]{0,120}") {
            let _ = parse_v2(&text, Some(&other), &text, &other);
            let _ = parse_v1(&other, &text, &text);
            let _ = parse_psi(&text);
            if let Ok(pressure) = parse_psi(&other) {
                prop_assert!((0.0..=100.0).contains(&pressure.some_avg10));
            }
            let _ = oom_kills(&other);
        }
    }
}
