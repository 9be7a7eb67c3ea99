//! Parsers for the kernel's memory files: /proc/vmstat,
//! /proc/pressure/memory and cgroup v2 memory.stat (/proc/meminfo's is the
//! protocol crate's). Pure, tested on recorded samples.

use std::collections::BTreeMap;

pub use balloon_protocol::meminfo::parse_meminfo;

/// `key value` lines, as in /proc/vmstat and memory.stat.
pub fn parse_key_values(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let key = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

pub use balloon_protocol::agent::{Psi, PsiLine};

fn parse_psi_line(rest: &str) -> Option<PsiLine> {
    let mut line = PsiLine::default();
    for field in rest.split_whitespace() {
        let (key, value) = field.split_once('=')?;
        match key {
            "avg10" => line.avg10 = value.parse().ok()?,
            "avg60" => line.avg60 = value.parse().ok()?,
            "avg300" => line.avg300 = value.parse().ok()?,
            "total" => line.total_us = value.parse().ok()?,
            _ => {}
        }
    }
    Some(line)
}

/// /proc/pressure/memory; `None` when the `some` line is missing or malformed.
pub fn parse_psi(text: &str) -> Option<Psi> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("some ") {
            some = parse_psi_line(rest);
        } else if let Some(rest) = line.strip_prefix("full ") {
            full = parse_psi_line(rest);
        }
    }
    Some(Psi { some: some?, full })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded in the test guest (Linux 6.12, 512 MiB).
    const MEMINFO: &str = "MemTotal:         476036 kB\nMemFree:          445180 kB\nMemAvailable:     441312 kB\nBuffers:               0 kB\nCached:            10844 kB\nShmem:             10844 kB\nHugePages_Total:       0\n";
    const VMSTAT: &str = "nr_free_pages 111295\npgmajfault 0\npswpin 0\nallocstall_normal 3\nallocstall_movable 4\noom_kill 0\n";
    const PSI: &str = "some avg10=1.25 avg60=0.40 avg300=0.08 total=123456\nfull avg10=0.50 avg60=0.10 avg300=0.02 total=45678\n";
    const MEMORY_STAT: &str =
        "anon 221184\nfile 43991040\nkernel 0\nshmem 43991040\nfile_mapped 0\n";

    #[test]
    fn meminfo_in_bytes() {
        let m = parse_meminfo(MEMINFO);
        assert_eq!(m["MemTotal"], 476036 * 1024);
        assert_eq!(m["Cached"], 10844 * 1024);
        assert_eq!(m["HugePages_Total"], 0);
        assert_eq!(m.len(), 7);
    }

    #[test]
    fn vmstat_and_memory_stat() {
        let v = parse_key_values(VMSTAT);
        assert_eq!(v["allocstall_movable"], 4);
        assert_eq!(parse_key_values(MEMORY_STAT)["file"], 43991040);
        assert!(parse_key_values("garbage\nx y\n").is_empty());
    }

    #[test]
    fn psi_some_and_full() {
        let psi = parse_psi(PSI).unwrap();
        assert_eq!(psi.some.avg10, 1.25);
        assert_eq!(psi.some.total_us, 123456);
        assert_eq!(psi.full.unwrap().avg60, 0.10);
        assert_eq!(parse_psi("full avg10=1 avg60=1 avg300=1 total=1\n"), None);
        assert_eq!(parse_psi("some avg10=x\n"), None);
    }
}
