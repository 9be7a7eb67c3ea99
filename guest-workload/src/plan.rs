//! The workload's script: phases of a working-set size held for a time,
//! parsed and checked before anything is allocated.

use std::str::FromStr;

/// The largest working set one phase may ask for (the guests are small; a
/// typo should not ask for terabytes).
pub const MAX_WORKING_SET_MIB: u64 = 1 << 20;
/// The longest phase.
pub const MAX_PHASE_S: u64 = 86_400;

/// One phase: hold `working_set_mib` of anonymous memory, touched every
/// second, for `seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase {
    pub seconds: u64,
    pub working_set_mib: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PhaseError {
    #[error("a phase is SECONDS:MIB (as in 30:256), got {0:?}")]
    Shape(String),
    #[error("a phase's SECONDS must be 1-{MAX_PHASE_S}, got {0:?}")]
    Seconds(String),
    #[error("a phase's MIB must be 0-{MAX_WORKING_SET_MIB}, got {0:?}")]
    WorkingSet(String),
}

impl FromStr for Phase {
    type Err = PhaseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (seconds, mib) = text
            .split_once(':')
            .ok_or_else(|| PhaseError::Shape(text.to_string()))?;
        let seconds = seconds
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=MAX_PHASE_S).contains(s))
            .ok_or_else(|| PhaseError::Seconds(seconds.to_string()))?;
        let working_set_mib = mib
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|m| *m <= MAX_WORKING_SET_MIB)
            .ok_or_else(|| PhaseError::WorkingSet(mib.to_string()))?;
        Ok(Phase {
            seconds,
            working_set_mib,
        })
    }
}

/// Parses a comma-separated list of phases (`30:48,40:288`).
pub fn parse_phases(text: &str) -> Result<Vec<Phase>, PhaseError> {
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// The seconds the whole script runs.
pub fn total_seconds(phases: &[Phase]) -> u64 {
    phases.iter().map(|p| p.seconds).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_list_of_phases_parses_in_order() {
        assert_eq!(
            parse_phases("30:48, 40:288,").unwrap(),
            vec![
                Phase {
                    seconds: 30,
                    working_set_mib: 48
                },
                Phase {
                    seconds: 40,
                    working_set_mib: 288
                }
            ]
        );
    }

    #[test]
    fn bad_phases_name_what_is_wrong() {
        assert_eq!(parse_phases("30"), Err(PhaseError::Shape("30".to_string())));
        assert_eq!(
            parse_phases("0:10"),
            Err(PhaseError::Seconds("0".to_string()))
        );
        assert_eq!(
            parse_phases("5:-1"),
            Err(PhaseError::WorkingSet("-1".to_string()))
        );
        assert!(parse_phases("5:99999999").is_err());
    }

    proptest! {
        #[test]
        fn printed_phases_parse_back(phases in prop::collection::vec((1..=MAX_PHASE_S, 0..=MAX_WORKING_SET_MIB), 1..20)) {
            let text: Vec<String> = phases.iter().map(|(s, m)| format!("{s}:{m}")).collect();
            let parsed = parse_phases(&text.join(",")).unwrap();
            prop_assert_eq!(parsed.len(), phases.len());
            for (p, (s, m)) in parsed.iter().zip(&phases) {
                prop_assert_eq!((p.seconds, p.working_set_mib), (*s, *m));
            }
            prop_assert_eq!(total_seconds(&parsed), phases.iter().map(|(s, _)| s).sum::<u64>());
        }
    }
}
