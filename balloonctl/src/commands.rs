//! The subcommands: each asks the backends through their control sockets
//! and prints for people (or JSON with `--json`).

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use balloon_protocol::control::{ControlClient, StatusReply};
use serde_json::json;

use crate::error::CtlError;
use crate::inventory::{Inventory, VmEntry};
use crate::size::{self, human};
use crate::table::{self, Row};

/// How long a backend has to answer one request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// An agent counts as reporting when host-policy's state is this fresh.
const STATE_MAX_AGE_S: u64 = 30;

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn vm<'a>(inventory: &'a Inventory, name: &str) -> Result<&'a VmEntry, CtlError> {
    inventory.get(name).ok_or_else(|| CtlError::UnknownVm {
        name: name.to_string(),
        searched: inventory.searched.clone(),
        known: match inventory.names().join(", ") {
            names if names.is_empty() => "none".to_string(),
            names => names,
        },
    })
}

fn connect(vm: &VmEntry) -> Result<ControlClient, CtlError> {
    ControlClient::connect(&vm.control, REPLY_TIMEOUT)
        .map_err(|error| CtlError::from_control(&vm.name, &vm.control, error))
}

fn status_of(vm: &VmEntry) -> Result<StatusReply, CtlError> {
    connect(vm)?
        .status()
        .map_err(|error| CtlError::from_control(&vm.name, &vm.control, error))
}

/// Who sets the VM's target: an operator's pin, host-policy, or by hand.
fn target_by(vm: &VmEntry, status: &StatusReply) -> &'static str {
    if status.pinned {
        "pinned"
    } else if vm.managed {
        "host-policy"
    } else {
        "manual"
    }
}

/// The `AGENT` column: a report in host-policy's state counts even when
/// this user cannot see the agent's socket (libvirt's channel directory is
/// QEMU's group's), so an agent host-policy found shows as reporting.
fn agent_column(has_agent: bool, reporting: Option<bool>) -> &'static str {
    match reporting {
        Some(true) => "reporting",
        _ if !has_agent => "-",
        Some(false) => "silent",
        None => "?",
    }
}

/// One table row for a VM, asking its backend.
pub fn row(inventory: &Inventory, vm: &VmEntry) -> Row {
    let pressure = inventory
        .last_decision(&vm.name)
        .map_or("-".to_string(), |(pressure, _)| {
            if pressure { "yes" } else { "no" }.to_string()
        });
    let agent = agent_column(
        vm.has_agent,
        inventory.agent_reporting(&vm.name, now_unix_s(), STATE_MAX_AGE_S),
    )
    .to_string();
    match status_of(vm) {
        Ok(status) => {
            let stats = status.stats.as_ref();
            Row {
                name: vm.name.clone(),
                ram_bytes: Some(status.guest_ram_bytes),
                target_bytes: Some(status.target_bytes),
                actual_bytes: Some(status.actual_bytes),
                returned_bytes: Some(status.discarded_bytes),
                guest_available_bytes: stats.and_then(|s| s.available_bytes.or(s.free_bytes)),
                limit_bytes: Some(status.max_reclaim_bytes),
                pressure,
                backend: if status.connected { "ok" } else { "no guest" }.to_string(),
                agent,
                control: target_by(vm, &status).to_string(),
            }
        }
        Err(error) => Row {
            name: vm.name.clone(),
            pressure,
            backend: match error {
                CtlError::Permission { .. } => "denied",
                _ => "unreachable",
            }
            .to_string(),
            agent,
            control: if vm.managed { "host-policy" } else { "manual" }.to_string(),
            ..Row::default()
        },
    }
}

pub fn list(inventory: &Inventory) -> String {
    let rows: Vec<Row> = inventory.vms.iter().map(|vm| row(inventory, vm)).collect();
    if rows.is_empty() {
        return format!("no VMs found in {}\n", inventory.searched);
    }
    table::render(&rows)
}

pub fn status(inventory: &Inventory, name: &str, as_json: bool) -> Result<String, CtlError> {
    let vm = vm(inventory, name)?;
    let status = status_of(vm)?;
    let decision = inventory.last_decision(name);
    let agent = agent_column(
        vm.has_agent,
        inventory.agent_reporting(name, now_unix_s(), STATE_MAX_AGE_S),
    );
    if as_json {
        let value = json!({
            "vm": vm.name,
            "control": vm.control,
            "managed_by_host_policy": vm.managed,
            "target_by": target_by(vm, &status),
            "last_decision": decision.map(|(pressure, reason)| json!({"pressure": pressure, "reason": reason})),
            "agent": agent,
            "backend": status,
        });
        return serde_json::to_string_pretty(&value)
            .map(|text| text + "\n")
            .map_err(|error| CtlError::Other(error.to_string()));
    }
    let stats = status.stats.as_ref();
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<22}{value}\n"));
    line("VM", vm.name.clone());
    line("control socket", vm.control.display().to_string());
    line(
        "guest",
        if status.connected {
            format!("attached, {} of RAM", human(status.guest_ram_bytes))
        } else {
            "none attached".to_string()
        },
    );
    line("target", human(status.target_bytes));
    line("actual", human(status.actual_bytes));
    line(
        "limit",
        format!(
            "{} ({} % of guest RAM)",
            human(status.max_reclaim_bytes),
            status.max_reclaim_percent
        ),
    );
    line("returned to the host", human(status.discarded_bytes));
    line(
        "guest RAM resident",
        status
            .guest_ram_resident_bytes
            .map_or("-".to_string(), human),
    );
    line(
        "free page reporting",
        format!("{} returned so far", human(status.reported_bytes_total)),
    );
    line(
        "guest available",
        stats
            .and_then(|s| s.available_bytes.or(s.free_bytes))
            .map_or("-".to_string(), human),
    );
    line("target set by", target_by(vm, &status).to_string());
    if let Some((pressure, reason)) = decision {
        line(
            "host-policy",
            format!(
                "{}{reason}",
                if pressure {
                    "guest under pressure: "
                } else {
                    ""
                }
            ),
        );
    }
    line("guest agent", agent.to_string());
    line("features", status.features.join(" "));
    if !status.errors.is_empty() {
        let errors: Vec<String> = status
            .errors
            .iter()
            .map(|(name, count)| format!("{name}={count}"))
            .collect();
        line("errors", errors.join(" "));
    }
    Ok(out)
}

/// How `set` waits for the guest.
pub struct Wait {
    pub enabled: bool,
    pub timeout: Duration,
}

pub fn set(
    inventory: &Inventory,
    name: &str,
    size_text: &str,
    wait: &Wait,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let vm = vm(inventory, name)?;
    let size = size::parse(size_text)?;
    let mut client = connect(vm)?;
    let fail = |error| CtlError::from_control(&vm.name, &vm.control, error);
    let before = client.status().map_err(fail)?;
    let asked = size::resolve(size, before.guest_ram_bytes);
    let reply = client.pin_target(asked).map_err(fail)?;
    let write = |out: &mut dyn Write, text: String| {
        writeln!(out, "{text}").map_err(|error| CtlError::Other(error.to_string()))
    };
    write(
        out,
        format!(
            "{}: asked {} ({size_text}), granted {}{}",
            vm.name,
            human(asked),
            human(reply.target_bytes),
            if reply.clamped {
                format!(
                    " (clamped to the VM's limit of {} % of guest RAM)",
                    before.max_reclaim_percent
                )
            } else {
                String::new()
            }
        ),
    )?;
    if vm.managed {
        write(
            out,
            format!(
                "{}: pinned: host-policy holds this target until `balloonctl unpin {}`",
                vm.name, vm.name
            ),
        )?;
    }
    if !wait.enabled {
        return Ok(());
    }
    wait_for_actual(
        &mut client,
        vm,
        reply.target_bytes,
        before.actual_bytes,
        wait.timeout,
        out,
    )
}

fn wait_for_actual(
    client: &mut ControlClient,
    vm: &VmEntry,
    target: u64,
    start: u64,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let distance = target.abs_diff(start);
    let bar = indicatif::ProgressBar::new(distance.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(vm.name.clone());
    let deadline = Instant::now() + timeout;
    let mut actual = start;
    loop {
        bar.set_position(distance.saturating_sub(target.abs_diff(actual)));
        bar.set_message(format!("actual {} of {}", human(actual), human(target)));
        if actual == target {
            bar.finish_and_clear();
            return writeln!(out, "{}: actual reached {}", vm.name, human(target))
                .map_err(|error| CtlError::Other(error.to_string()));
        }
        if Instant::now() >= deadline {
            bar.abandon();
            return Err(CtlError::Timeout {
                vm: vm.name.clone(),
                actual: human(actual),
                target: human(target),
                waited_s: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        actual = client
            .status()
            .map_err(|error| CtlError::from_control(&vm.name, &vm.control, error))?
            .actual_bytes;
    }
}

pub fn unpin(inventory: &Inventory, name: &str) -> Result<String, CtlError> {
    let vm = vm(inventory, name)?;
    let reply = connect(vm)?
        .unpin()
        .map_err(|error| CtlError::from_control(&vm.name, &vm.control, error))?;
    Ok(match (reply.was_pinned, vm.managed) {
        (true, true) => format!("{}: unpinned; host-policy sets its target again\n", vm.name),
        (true, false) => format!("{}: unpinned\n", vm.name),
        (false, _) => format!("{}: was not pinned\n", vm.name),
    })
}

pub fn stats(inventory: &Inventory, name: &str) -> Result<String, CtlError> {
    let vm = vm(inventory, name)?;
    let reply = connect(vm)?
        .refresh_stats(REPLY_TIMEOUT.as_millis() as u64 - 500)
        .map_err(|error| CtlError::from_control(&vm.name, &vm.control, error))?;
    let stats = reply.stats;
    let bytes = |v: Option<u64>| v.map_or("-".to_string(), human);
    let count = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let rows = [
        ("total memory", bytes(stats.total_bytes)),
        ("free memory", bytes(stats.free_bytes)),
        ("available memory", bytes(stats.available_bytes)),
        ("page cache", bytes(stats.disk_caches_bytes)),
        ("balloon when measured", bytes(stats.balloon_bytes)),
        ("swapped in", bytes(stats.swap_in)),
        ("swapped out", bytes(stats.swap_out)),
        ("major faults", count(stats.major_faults)),
        ("minor faults", count(stats.minor_faults)),
        ("OOM kills", count(stats.oom_kills)),
        ("allocation stalls", count(stats.alloc_stalls)),
        ("direct reclaims", count(stats.direct_reclaims)),
        ("direct scans", count(stats.direct_scans)),
        ("hugetlb allocations", count(stats.hugetlb_allocations)),
        ("hugetlb failures", count(stats.hugetlb_failures)),
    ];
    let mut out = format!("{}: guest statistics, just refreshed\n", vm.name);
    for (label, value) in rows {
        out.push_str(&format!("  {label:<24}{value:>12}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::agent_column;

    #[test]
    fn a_reporting_agent_shows_even_where_its_socket_is_hidden() {
        assert_eq!(agent_column(true, Some(true)), "reporting");
        assert_eq!(agent_column(false, Some(true)), "reporting");
        assert_eq!(agent_column(true, Some(false)), "silent");
        assert_eq!(agent_column(false, Some(false)), "-");
        assert_eq!(agent_column(true, None), "?");
        assert_eq!(agent_column(false, None), "-");
    }
}
