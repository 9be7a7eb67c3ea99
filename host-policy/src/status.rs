//! `host-policy status`: one row per VM, from its backend and the daemon's
//! last decision.

/// Appends a line; writing into a String cannot fail.
macro_rules! push_line {
    ($out:expr, $($arg:tt)*) => {
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    };
}

use balloon_policy::policy::limit_bytes;
use balloon_protocol::control::ControlClient;
use host_policy_config::state_file::HostReport;
use host_policy_config::{managed_vms, Config, StateFile};

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{}", b >> 20))
}

/// The host's source, memory, PSI and (a cgroup's) OOM kills.
fn host_line(host: &HostReport) -> String {
    let percent = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.2}%"));
    let oom = match host.cgroup_oom_kills {
        Some(kills) => format!(", cgroup OOM kills {kills}"),
        None => String::new(),
    };
    format!(
        "host source: {} {}: total {} MiB, available {} MiB; PSI some avg10 {}, full avg10 {} from {}{oom}",
        host.source,
        host.path.display(),
        host.total_bytes >> 20,
        host.available_bytes >> 20,
        percent(host.psi_some_avg10),
        percent(host.psi_full_avg10),
        host.pressure
    )
}

pub fn render(config: &Config) -> String {
    let state = config.host.state_file.as_deref().and_then(StateFile::read);
    let mut out = String::new();
    if let Some(state) = &state {
        push_line!(
            out,
            "host: {:?}, {:.1}% available at the last tick{}",
            state.decision.mode,
            state.decision.host_available_percent,
            if state.dry_run { " (dry run)" } else { "" }
        );
        if let Some(host) = &state.host {
            push_line!(out, "{}", host_line(host));
        }
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

    #[test]
    fn the_host_line_names_its_source_psi_and_oom_kills() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let state_path = dir.path().join("state.json");
        let state = StateFile {
            unix_s: 1,
            dry_run: false,
            decision: balloon_policy::policy::Decision {
                mode: balloon_policy::policy::HostMode::Reclaim,
                host_available_percent: 25.0,
                vms: Vec::new(),
                memory: Default::default(),
            },
            agents: Default::default(),
            errors: Default::default(),
            tick_ms: 1,
            host: Some(HostReport {
                source: "cgroup v2".into(),
                path: "/sys/fs/cgroup/machine.slice".into(),
                total_bytes: 4 << 30,
                available_bytes: 1 << 30,
                psi_some_avg10: Some(12.5),
                psi_full_avg10: Some(3.0),
                pressure: "/sys/fs/cgroup/machine.slice/memory.pressure".into(),
                cgroup_oom_kills: Some(2),
            }),
        };
        state.write(&state_path).unwrap_or_else(|e| panic!("{e}"));
        let config = Config::parse(
            Path::new("host-policy.toml"),
            &format!("[host]\nstate_file = {state_path:?}\n[[vm]]\nname = \"web\"\ncontrol = \"/nonexistent/web.ctl\"\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let table = render(&config);
        assert!(
            table.contains("host source: cgroup v2 /sys/fs/cgroup/machine.slice: total 4096 MiB, available 1024 MiB; PSI some avg10 12.50%, full avg10 3.00% from /sys/fs/cgroup/machine.slice/memory.pressure, cgroup OOM kills 2"),
            "{table}"
        );
    }
}
