//! The host's memory, from /proc/meminfo or a file of the same format.

use std::path::Path;

use crate::policy::HostState;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no {field} line")]
    Missing { path: String, field: &'static str },
}

/// MemTotal and MemAvailable, in bytes, from meminfo text.
pub fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let fields = balloon_protocol::meminfo::parse_meminfo(text);
    (
        fields.get("MemTotal").copied(),
        fields.get("MemAvailable").copied(),
    )
}

pub fn read_host(path: &Path) -> Result<HostState, HostError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| HostError::Read {
        path: shown.clone(),
        source,
    })?;
    match parse_meminfo(&text) {
        (None, _) => Err(HostError::Missing {
            path: shown,
            field: "MemTotal",
        }),
        (_, None) => Err(HostError::Missing {
            path: shown,
            field: "MemAvailable",
        }),
        (Some(total_bytes), Some(available_bytes)) => Ok(HostState {
            total_bytes,
            available_bytes,
        }),
    }
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
