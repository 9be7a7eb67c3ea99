//! `/proc/meminfo` and files of its format (a host-policy test or a
//! simulation hands one in).

use std::collections::BTreeMap;

/// Every `Key: value [kB]` line, in bytes (`kB` values converted), keyed by
/// field name. Lines that do not parse, and values that would overflow, are
/// left out.
pub fn parse_meminfo(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let mut parts = rest.split_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            let bytes = match parts.next() {
                Some("kB") => value.checked_mul(1024)?,
                _ => value,
            };
            Some((key.trim().to_string(), bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_kib_fields_as_bytes_and_counts_as_counts() {
        let m = parse_meminfo(
            "MemTotal:        2000 kB\nMemAvailable: 1000 kB\nHugePages_Total:       3\nbroken line\nX: -1 kB\n",
        );
        assert_eq!(m.get("MemTotal"), Some(&(2000 * 1024)));
        assert_eq!(m.get("MemAvailable"), Some(&(1000 * 1024)));
        assert_eq!(m.get("HugePages_Total"), Some(&3));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn overflowing_values_are_left_out() {
        let m = parse_meminfo(&format!("Big: {} kB\n", u64::MAX));
        assert!(m.is_empty());
    }

    proptest! {
        #[test]
        fn any_text_parses_without_panic(text in ".{0,400}") {
            let _ = parse_meminfo(&text);
        }
    }
}
