//! The host's memory, from /proc/meminfo or a file of the same format
//! (`host_reader` reads the file).

/// MemTotal and MemAvailable, in bytes, from meminfo text.
pub fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let fields = balloon_protocol::meminfo::parse_meminfo(text);
    (
        fields.get("MemTotal").copied(),
        fields.get("MemAvailable").copied(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_two_fields_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   12288000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            (Some(24576000 * 1024), Some(12288000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: x kB\n"), (None, None));
    }
}
