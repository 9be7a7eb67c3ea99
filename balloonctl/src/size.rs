//! Sizes an operator types: `2G`, `512M`, `1.5GiB`, `25%` of guest RAM, or
//! `0`. Pure: parsing and resolving against a VM are tested apart from I/O.

use parse_size::Config;

/// A balloon size as typed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    Bytes(u64),
    /// A share of the VM's guest RAM, 0-100.
    Percent(f64),
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("size {given:?}: expected a size such as 512M, 2G, 1.5GiB (binary units), a share of guest RAM such as 25%, or 0")]
pub struct SizeError {
    pub given: String,
}

/// Parses what an operator typed; units are binary (1G = 1 GiB).
pub fn parse(text: &str) -> Result<Size, SizeError> {
    let error = || SizeError {
        given: text.to_string(),
    };
    let trimmed = text.trim();
    if let Some(number) = trimmed.strip_suffix('%') {
        let percent: f64 = number.trim().parse().map_err(|_| error())?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(error());
        }
        return Ok(Size::Percent(percent));
    }
    if trimmed == "0" {
        return Ok(Size::Bytes(0));
    }
    // A bare number is refused: bytes or MiB? The operator says which.
    if trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(error());
    }
    Config::new()
        .with_binary()
        .parse_size(trimmed)
        .map(Size::Bytes)
        .map_err(|_| error())
}

/// The bytes a size stands for in a VM of `guest_ram_bytes`.
pub fn resolve(size: Size, guest_ram_bytes: u64) -> u64 {
    match size {
        Size::Bytes(bytes) => bytes,
        Size::Percent(percent) => (guest_ram_bytes as f64 * percent / 100.0) as u64,
    }
}

/// Bytes for people: `512 MiB`, `1.5 GiB`, `0`.
pub fn human(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let value = bytes as f64;
    if bytes == 0 {
        "0".into()
    } else if value >= GIB {
        format!("{:.1} GiB", value / GIB)
    } else if value >= MIB {
        format!("{:.0} MiB", value / MIB)
    } else {
        format!("{:.0} KiB", value / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units_are_binary_and_percent_is_of_guest_ram() {
        assert_eq!(parse("2G"), Ok(Size::Bytes(2 << 30)));
        assert_eq!(parse("512M"), Ok(Size::Bytes(512 << 20)));
        assert_eq!(parse("1.5GiB"), Ok(Size::Bytes(3 << 29)));
        assert_eq!(parse("0"), Ok(Size::Bytes(0)));
        assert_eq!(parse("25%"), Ok(Size::Percent(25.0)));
        assert_eq!(resolve(Size::Percent(25.0), 2 << 30), 512 << 20);
    }

    #[test]
    fn nonsense_names_what_is_accepted() {
        for bad in ["", "12", "abc", "-1G", "150%", "x%", "1Q"] {
            let error = parse(bad).unwrap_err();
            assert!(
                error.to_string().contains("expected a size such as 512M"),
                "{error}"
            );
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0");
        assert_eq!(human(512 << 20), "512 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    proptest! {
        #[test]
        fn mebibytes_round_trip(mib in 1u64..(1 << 20)) {
            prop_assert_eq!(parse(&format!("{mib}M")), Ok(Size::Bytes(mib << 20)));
        }

        #[test]
        fn a_percentage_never_exceeds_guest_ram(percent in 0.0f64..=100.0, ram in 0u64..(1 << 50)) {
            prop_assert!(resolve(Size::Percent(percent), ram) <= ram);
        }
    }
}
