//! A unit's `SystemCallFilter=` as the target's systemd reads it, and the
//! check that balloon-backend@.service's filter allows every call of the
//! backend's own seccomp lists.
//!
//! systemd's sets differ between versions (on Debian 12's 252 `seccomp`
//! is in no set that `@system-service` includes; 254 added `@sandbox`), so
//! the sets always come from the target's own systemd: `systemd-analyze
//! syscall-filter` run inside the Debian root, never the host's. In a booted
//! root `systemctl show -p SystemCallFilter` gives the filter systemd
//! itself compiled for the unit, which is checked too.

use std::collections::{BTreeMap, BTreeSet};

use balloon_backend::seccomp::{allow_list, answered_enosys, ThreadRole};

/// The named sets of one systemd (`@system-service` and so on), from the
/// text `systemd-analyze syscall-filter` prints.
#[derive(Debug, Default)]
pub struct Sets(BTreeMap<String, Vec<String>>);

impl Sets {
    pub fn parse(listing: &str) -> Sets {
        let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in listing.lines() {
            if line.starts_with('@') {
                let name = line.split_whitespace().next().unwrap_or_default();
                sets.insert(name.to_string(), Vec::new());
                current = Some(name.to_string());
            } else if line.starts_with('#') {
                // The "ungrouped" and "unlisted" lists belong to no set.
                current = None;
            } else if let (Some(name), Some(item)) = (&current, line.split_whitespace().next()) {
                if !item.starts_with('#') {
                    sets.entry(name.clone()).or_default().push(item.to_string());
                }
            }
        }
        Sets(sets)
    }

    /// The calls `item` names: a set (`@…`, nested sets expanded), or a
    /// single call.
    pub fn expand(&self, item: &str) -> anyhow::Result<BTreeSet<String>> {
        let mut calls = BTreeSet::new();
        if !item.starts_with('@') {
            calls.insert(item.to_string());
            return Ok(calls);
        }
        anyhow::ensure!(
            self.0.contains_key(item),
            "this systemd has no system-call set {item}"
        );
        let mut pending = vec![item.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(set) = pending.pop() {
            if !seen.insert(set.clone()) {
                continue;
            }
            for member in self.0.get(&set).into_iter().flatten() {
                if member.starts_with('@') {
                    pending.push(member.clone());
                } else {
                    calls.insert(member.clone());
                }
            }
        }
        Ok(calls)
    }
}

/// A compiled filter: either the calls allowed (an allow list) or the
/// calls refused (a deny list).
#[derive(Debug, PartialEq, Eq)]
pub struct Filter {
    pub allow_list: bool,
    pub calls: BTreeSet<String>,
}

impl Filter {
    pub fn allows(&self, call: &str) -> bool {
        self.calls.contains(call) == self.allow_list
    }

    /// The filter of a unit's `SystemCallFilter=` lines, read in order as
    /// systemd does: the first line decides allow list (`@default` is then
    /// always in) or deny list (`~`); after it, a plain line adds to an
    /// allow list and a `~` line takes away, or the other way round for a
    /// deny list; an empty assignment starts over.
    pub fn of_unit(unit: &str, sets: &Sets) -> anyhow::Result<Option<Filter>> {
        let mut filter: Option<Filter> = None;
        for value in unit
            .lines()
            .filter_map(|l| l.trim().strip_prefix("SystemCallFilter="))
        {
            let value = value.trim();
            if value.is_empty() {
                filter = None;
                continue;
            }
            let (inverted, names) = match value.strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, value),
            };
            let current = filter.get_or_insert_with(|| Filter {
                allow_list: !inverted,
                calls: BTreeSet::new(),
            });
            if current.allow_list && current.calls.is_empty() && !inverted {
                current.calls.extend(sets.expand("@default")?);
            }
            // Added when the line's sense matches the list's.
            let adds = inverted != current.allow_list;
            for name in names.split_whitespace() {
                // An errno (`name:EPERM`) belongs to the call, not its name.
                let name = name.split(':').next().unwrap_or(name);
                for call in sets.expand(name)? {
                    if adds {
                        current.calls.insert(call);
                    } else {
                        current.calls.remove(&call);
                    }
                }
            }
        }
        Ok(filter)
    }

    /// The filter `systemctl show -p SystemCallFilter UNIT` prints (what
    /// the running systemd compiled): `SystemCallFilter=a b c` allows
    /// those, `SystemCallFilter=~a b c` refuses them.
    pub fn of_systemctl_show(text: &str) -> anyhow::Result<Filter> {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix("SystemCallFilter="))
            .ok_or_else(|| anyhow::anyhow!("no SystemCallFilter= in {text:?}"))?;
        let (allow_list, names) = match value.strip_prefix('~') {
            Some(rest) => (false, rest),
            None => (true, value),
        };
        anyhow::ensure!(
            !(allow_list && names.trim().is_empty()),
            "the unit has no system-call filter"
        );
        Ok(Filter {
            allow_list,
            calls: names
                .split_whitespace()
                .map(|n| n.split(':').next().unwrap_or(n).to_string())
                .collect(),
        })
    }
}

/// Every call balloon-backend's own seccomp lists allow, on any thread,
/// and the calls they answer with ENOSYS (systemd's filter must let those
/// through too, or glibc would see EPERM where it expects ENOSYS).
pub fn backend_calls() -> BTreeSet<&'static str> {
    ThreadRole::ALL
        .iter()
        .flat_map(|role| allow_list(*role))
        .chain(answered_enosys())
        .map(|call| call.name)
        .collect()
}

/// Fails naming every call of the backend's seccomp lists that `filter`
/// (the backend unit's) refuses.
pub fn check_backend(filter: &Filter, whose: &str) -> anyhow::Result<usize> {
    let calls = backend_calls();
    let refused: Vec<&str> = calls
        .iter()
        .copied()
        .filter(|call| !filter.allows(call))
        .collect();
    anyhow::ensure!(
        refused.is_empty(),
        "balloon-backend@.service's SystemCallFilter ({whose}) refuses calls the backend makes: {refused:?}"
    );
    Ok(calls.len())
}

/// The backend unit's file checked against the sets of one systemd.
pub fn check_backend_unit(unit: &str, sets: &Sets, whose: &str) -> anyhow::Result<usize> {
    let filter = Filter::of_unit(unit, sets)?.ok_or_else(|| {
        anyhow::anyhow!("balloon-backend@.service has no SystemCallFilter= ({whose})")
    })?;
    check_backend(&filter, whose)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets shaped like systemd's listing (made up, not any version's):
    /// `seccomp` is in no set `@system-service` includes, as on 252.
    const LISTING: &str = "\
@default
    # System calls that are always permitted
    brk
    exit

@chown
    # Change ownership of files and directories
    chown
    fchown

@privileged
    # All system calls which need super-user capabilities
    @chown
    setuid

@system-service
    # General system service operations
    @chown
    @default
    fallocate
    read

@sandbox
    seccomp

# Ungrouped System Calls (known but not included in any of the groups except @known):
#   seccomp
";

    #[test]
    fn lines_apply_in_order_as_systemd_reads_them() {
        let sets = Sets::parse(LISTING);
        let unit = "[Service]\n\
                    SystemCallFilter=@system-service\n\
                    SystemCallFilter=~@privileged\n\
                    SystemCallFilter=chown seccomp\n";
        let filter = Filter::of_unit(unit, &sets).unwrap().unwrap();
        assert!(filter.allow_list);
        for allowed in ["brk", "exit", "fallocate", "read", "chown", "seccomp"] {
            assert!(filter.allows(allowed), "{allowed}: {filter:?}");
        }
        for refused in ["fchown", "setuid", "socket"] {
            assert!(!filter.allows(refused), "{refused}: {filter:?}");
        }
    }

    #[test]
    fn a_set_taken_away_after_a_call_was_given_takes_it_again() {
        let sets = Sets::parse(LISTING);
        let unit = "SystemCallFilter=@system-service\n\
                    SystemCallFilter=chown\n\
                    SystemCallFilter=~@privileged\n";
        let filter = Filter::of_unit(unit, &sets).unwrap().unwrap();
        assert!(!filter.allows("chown"));
    }

    #[test]
    fn a_deny_list_refuses_only_what_it_names() {
        let sets = Sets::parse(LISTING);
        let filter = Filter::of_unit("SystemCallFilter=~@privileged\n", &sets)
            .unwrap()
            .unwrap();
        assert!(!filter.allow_list);
        assert!(filter.allows("seccomp") && filter.allows("read"));
        assert!(!filter.allows("chown") && !filter.allows("setuid"));
        let reset =
            Filter::of_unit("SystemCallFilter=~@privileged\nSystemCallFilter=\n", &sets).unwrap();
        assert_eq!(reset, None);
    }

    #[test]
    fn an_unknown_set_is_an_error_not_an_empty_set() {
        let sets = Sets::parse(LISTING);
        let error = Filter::of_unit("SystemCallFilter=@no-such-set\n", &sets).unwrap_err();
        assert!(error.to_string().contains("@no-such-set"), "{error}");
    }

    #[test]
    fn a_filter_that_takes_a_call_the_backend_makes_is_caught() {
        let sets = Sets::parse(LISTING);
        let unit = "SystemCallFilter=@system-service\nSystemCallFilter=~fallocate\n";
        let error = check_backend_unit(unit, &sets, "test")
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"fallocate\""), "{error}");
    }

    #[test]
    fn systemctls_compiled_filter_is_read_both_ways() {
        let allow = Filter::of_systemctl_show("SystemCallFilter=read write seccomp\n").unwrap();
        assert!(allow.allows("seccomp") && !allow.allows("socket"));
        let deny = Filter::of_systemctl_show("SystemCallFilter=~reboot swapon\n").unwrap();
        assert!(deny.allows("socket") && !deny.allows("reboot"));
        assert!(Filter::of_systemctl_show("SystemCallFilter=\n").is_err());
        assert!(Filter::of_systemctl_show("Other=1\n").is_err());
    }

    /// The calls of the backend's lists the shipped unit must give back by
    /// name, because systemd's sets do not hold them everywhere: `seccomp`
    /// (in no set of 252's `@system-service`) and `chown` (in `@chown`,
    /// part of the `@privileged` the unit takes away). The sets' full
    /// contents are checked with the target's systemd by package-test.
    #[test]
    fn the_shipped_unit_gives_back_seccomp_and_chown_after_taking_privileged() {
        let unit = std::fs::read_to_string(
            crate::provision::workspace_root().join("packaging/systemd/balloon-backend@.service"),
        )
        .unwrap();
        let lines: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("SystemCallFilter="))
            .collect();
        let privileged = lines
            .iter()
            .position(|l| l.starts_with('~') && l.contains("@privileged"))
            .unwrap();
        let given_back = lines
            .iter()
            .rposition(|l| {
                let names: Vec<&str> = l.split_whitespace().collect();
                !l.starts_with('~') && names.contains(&"seccomp") && names.contains(&"chown")
            })
            .unwrap();
        assert!(given_back > privileged, "{lines:?}");
        assert!(backend_calls().contains("seccomp"));
    }
}
