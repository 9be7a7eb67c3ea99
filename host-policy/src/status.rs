//! `host-policy status`: one row per VM, from its backend and the daemon's
//! last decision.

/// Appends a line; writing into a String cannot fail.
macro_rules! push_line {
    ($out:expr, $($arg:tt)*) => {
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    };
}

use balloon_protocol::control::ControlClient;

use crate::config::Config;
use crate::daemon::{managed_vms, StateFile};
use crate::policy::limit_bytes;

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{}", b >> 20))
}

pub fn render(config: &Config) -> String {
    let state: Option<StateFile> = config
        .host
        .state_file
        .as_ref()
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let mut out = String::new();
    if let Some(state) = &state {
        push_line!(
            out,
            "host: {:?}, {:.1}% available at the last tick{}",
            state.decision.mode,
            state.decision.host_available_percent,
            if state.dry_run { " (dry run)" } else { "" }
        );
    }
    push_line!(
        out,
        "{:<12} {:>8} {:>9} {:>10} {:>10} {:>10} {:>11} {:>8}  last decision",
        "VM",
        "RAM MiB",
        "limit MiB",
        "target MiB",
        "actual MiB",
        "free MiB",
        "avail MiB",
        "pressure"
    );
    for vm in managed_vms(config) {
        let status = ControlClient::connect(&vm.control, crate::links::BACKEND_REPLY_TIMEOUT)
            .and_then(|mut c| c.status());
        let last = state
            .as_ref()
            .and_then(|s| s.decision.vms.iter().find(|d| d.name == vm.name));
        let pressure = last.map_or("-", |d| if d.pressure { "yes" } else { "no" });
        let last = last.map_or("-".to_string(), |d| d.reason.clone());
        match status {
            Ok(status) => {
                let input = crate::daemon::vm_input(&vm, &status, crate::daemon::unix_now_s());
                let stats = status.stats.as_ref();
                push_line!(
                    out,
                    "{:<12} {:>8} {:>9} {:>10} {:>10} {:>10} {:>11} {:>8}  {}",
                    vm.name,
                    mib(Some(status.guest_ram_bytes)),
                    mib(Some(limit_bytes(&input))),
                    mib(Some(status.target_bytes)),
                    mib(Some(status.actual_bytes)),
                    mib(stats.and_then(|s| s.free_bytes)),
                    mib(stats.and_then(|s| s.available_bytes)),
                    pressure,
                    last
                );
            }
            Err(error) => {
                push_line!(out, "{:<12} unreachable: {error}", vm.name);
            }
        }
        if let Some(errors) = state.as_ref().and_then(|s| s.errors.get(&vm.name)) {
            let listed: Vec<String> = errors
                .iter()
                .map(|(name, count)| format!("{name}={count}"))
                .collect();
            push_line!(out, "{:<12} errors: {}", "", listed.join(" "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_column_has_a_heading() {
        let config = Config::parse(
            Path::new("host-policy.toml"),
            "[host]\nstate_file = \"/nonexistent/state.json\"\n[[vm]]\nname = \"web\"\ncontrol = \"/nonexistent/web.ctl\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let table = render(&config);
        let heading = table.lines().next().unwrap_or_default();
        let words: Vec<&str> = heading.split_whitespace().collect();
        assert_eq!(
            words,
            [
                "VM", "RAM", "MiB", "limit", "MiB", "target", "MiB", "actual", "MiB", "free",
                "MiB", "avail", "MiB", "pressure", "last", "decision"
            ],
            "{table}"
        );
        assert!(table.contains("web"), "{table}");
    }
}
