//! The policies on real guests (`cargo xtask bench`): three 512 MiB guests
//! run guest-workload's out-of-phase script under host-policy, once with
//! each policy compared. The host is a fixed budget: each second its
//! available memory is the budget less the guests' real host-resident RAM
//! (their memfds, read through /proc), written to the meminfo file
//! host-policy reads. What the guests suffered is read in the guests.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use balloon_policy::PolicyKind;
use guest_tests::host_policy_process::{write_meminfo, PolicyProcess};
use guest_tests::{Stack, MIB};
use policy_sim::plot::colors::{BLUE, GREEN, RED};
use policy_sim::plot::{grid_svg, Line, Panel, RGBColor};

const GUESTS: usize = 3;
pub const GUEST_MIB: u64 = 512;
/// The host: what the three guests may have resident between them.
pub const HOST_BUDGET_MIB: u64 = 900;
const RECLAIM_START_PERCENT: u64 = 20;
const RECLAIM_HARD_PERCENT: u64 = 10;
const GIVE_BACK_PERCENT: u64 = 35;

/// The script: every guest idles at `IDLE_MIB` of working set and is busy
/// at `BUSY_MIB` twice, for `BUSY_S` each, `SHIFT_S` after the guest
/// before it, so one guest is busy at a time.
pub const IDLE_MIB: u64 = 48;
pub const BUSY_MIB: u64 = 288;
const LEAD_S: u64 = 15;
pub const BUSY_S: u64 = 30;
const IDLE_S: u64 = 60;
const SHIFT_S: u64 = 30;
pub const RUN_S: u64 = LEAD_S + (GUESTS as u64 - 1) * SHIFT_S + 2 * BUSY_S + IDLE_S + LEAD_S;
/// Page cache: read once at the start from a disk, the hot part re-read
/// every second.
pub const DISK_MIB: u64 = 160;
pub const CACHE_MIB: u64 = 128;
pub const HOT_CACHE_MIB: u64 = 32;

/// guest-workload's `--phases` for guest `index`: SECONDS:MIB, summing to
/// `RUN_S`.
pub fn phases(index: u64) -> String {
    let before = LEAD_S + index * SHIFT_S;
    let after = RUN_S - before - 2 * BUSY_S - IDLE_S;
    format!("{before}:{IDLE_MIB},{BUSY_S}:{BUSY_MIB},{IDLE_S}:{IDLE_MIB},{BUSY_S}:{BUSY_MIB},{after}:{IDLE_MIB}")
}

/// Cumulative guest counters, read from /proc and /sys in the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCounters {
    pub oom_kills: u64,
    pub alloc_stalls: u64,
    pub major_faults: u64,
    /// PSI memory `some`: microseconds some task stalled on memory.
    pub psi_some_us: u64,
    /// Bytes read from the disk (the page cache's misses).
    pub disk_read_bytes: u64,
}

/// The shell command whose output `GuestCounters::parse` reads.
const COUNTERS_COMMAND: &str = "cat /proc/vmstat /proc/pressure/memory /sys/block/vda/stat";

impl GuestCounters {
    pub fn parse(text: &str) -> Self {
        let mut counters = GuestCounters::default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            match fields.first().copied() {
                Some("oom_kill") => counters.oom_kills = number(1).unwrap_or(0),
                Some("pgmajfault") => counters.major_faults = number(1).unwrap_or(0),
                Some(name) if name.starts_with("allocstall_") => {
                    counters.alloc_stalls += number(1).unwrap_or(0)
                }
                Some("some") => {
                    counters.psi_some_us = fields
                        .iter()
                        .find_map(|f| f.strip_prefix("total=")?.parse().ok())
                        .unwrap_or(0)
                }
                // /sys/block/vda/stat: only numbers; the third is sectors read.
                Some(_) if fields.len() > 3 && fields.iter().all(|f| f.parse::<u64>().is_ok()) => {
                    counters.disk_read_bytes = number(2).unwrap_or(0).saturating_mul(512)
                }
                _ => {}
            }
        }
        counters
    }

    fn since(self, start: GuestCounters) -> GuestCounters {
        GuestCounters {
            oom_kills: self.oom_kills.saturating_sub(start.oom_kills),
            alloc_stalls: self.alloc_stalls.saturating_sub(start.alloc_stalls),
            major_faults: self.major_faults.saturating_sub(start.major_faults),
            psi_some_us: self.psi_some_us.saturating_sub(start.psi_some_us),
            disk_read_bytes: self.disk_read_bytes.saturating_sub(start.disk_read_bytes),
        }
    }

    fn add(self, other: GuestCounters) -> GuestCounters {
        GuestCounters {
            oom_kills: self.oom_kills + other.oom_kills,
            alloc_stalls: self.alloc_stalls + other.alloc_stalls,
            major_faults: self.major_faults + other.major_faults,
            psi_some_us: self.psi_some_us + other.psi_some_us,
            disk_read_bytes: self.disk_read_bytes + other.disk_read_bytes,
        }
    }
}

/// What guest-workload's report lines say, summed over its phases.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkloadTimes {
    /// The script ran to its end (it was not killed).
    pub completed: bool,
    /// Growing and shrinking the working set.
    pub ramp_s: f64,
    /// Touching the working set every second.
    pub pass_s: f64,
    /// Re-reading the hot cache every second.
    pub cache_read_s: f64,
}

impl WorkloadTimes {
    pub fn parse(report: &str) -> Self {
        let mut times = WorkloadTimes::default();
        for line in report.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if value["event"] == "done" {
                times.completed = true;
            }
            let seconds = |key: &str| value[key].as_f64().unwrap_or(0.0);
            times.ramp_s += seconds("ramp_s");
            times.pass_s += seconds("pass_total_s");
            times.cache_read_s += seconds("cache_read_s");
        }
        times
    }

    fn total_s(&self) -> f64 {
        self.ramp_s + self.pass_s + self.cache_read_s
    }
}

/// One second of a run, seen from the host.
struct HostSample {
    t_s: f64,
    available_mib: f64,
    returned_mib: f64,
    /// The guests' PSI memory `some` avg10 (%), from their agents' reports,
    /// summed.
    psi_some_avg10: f64,
}

struct GuestOutcome {
    counters: GuestCounters,
    workload: WorkloadTimes,
}

struct RealRun {
    policy: PolicyKind,
    samples: Vec<HostSample>,
    overload_s: u64,
    min_available_mib: f64,
    returned_gib_s: f64,
    target_changes: u64,
    guests: Vec<GuestOutcome>,
}

/// A TCP port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// host-policy's `balloon_vm_target_changes_total`, all series summed.
fn scrape_target_changes(port: u16) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with("balloon_vm_target_changes_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn run_policy(policy: PolicyKind) -> anyhow::Result<RealRun> {
    eprintln!(
        "[xtask] real guests under the {} policy (about {} s)",
        policy.name(),
        RUN_S + 90
    );
    let dir = tempfile::tempdir()?;
    let mut stacks = Vec::new();
    for index in 0..GUESTS {
        let agent = dir.path().join(format!("agent-{index}.sock"));
        let disk = dir.path().join(format!("disk-{index}.img"));
        std::fs::File::create(&disk)?.set_len(DISK_MIB * MIB)?;
        let stack = Stack::start(GUEST_MIB, &[], |c| {
            c.agent_socket = Some(agent.clone());
            c.disk = Some(disk.clone());
        })?;
        stack
            .vm
            .wait_line(|l| l == "@@AGENT started", Duration::from_secs(30))?;
        stacks.push((stack, agent));
    }
    let budget_bytes = HOST_BUDGET_MIB * MIB;
    let resident = |stacks: &[(Stack, std::path::PathBuf)]| -> anyhow::Result<u64> {
        stacks
            .iter()
            .map(|(s, _)| s.vm.host_resident_bytes())
            .sum::<anyhow::Result<u64>>()
    };
    let meminfo = dir.path().join("host-meminfo");
    let write_host = |resident_bytes: u64| -> anyhow::Result<u64> {
        let available = budget_bytes.saturating_sub(resident_bytes);
        write_meminfo(&meminfo, HOST_BUDGET_MIB, available / MIB)?;
        Ok(available)
    };
    write_host(resident(&stacks)?)?;
    let port = free_port()?;
    let mut config = format!(
        "[host]\ninterval_s = 1\nmeminfo = {meminfo:?}\nstate_file = {:?}\n\
         reclaim_start_percent = {RECLAIM_START_PERCENT}\nreclaim_hard_percent = {RECLAIM_HARD_PERCENT}\n\
         give_back_percent = {GIVE_BACK_PERCENT}\npolicy = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        dir.path().join("host-policy.json"),
        policy.name()
    );
    for (index, (stack, agent)) in stacks.iter().enumerate() {
        config.push_str(&format!(
            "\n[[vm]]\nname = \"g{index}\"\ncontrol = {:?}\nagent = {agent:?}\n",
            stack.backend.control
        ));
    }
    let mut daemon = PolicyProcess::start_config(&stacks[0].0.env, dir.path(), &config)?;
    let mut start_counters = Vec::new();
    for (stack, _) in &mut stacks {
        start_counters.push(GuestCounters::parse(&stack.vm.sh(COUNTERS_COMMAND)?));
    }
    for (index, (stack, _)) in stacks.iter_mut().enumerate() {
        stack.vm.sh(&format!(
            "guest-workload --phases {} --cache-file /dev/vda --cache-mib {CACHE_MIB} \
             --hot-cache-mib {HOT_CACHE_MIB} >/tmp/workload.jsonl 2>/tmp/workload.err &",
            phases(index as u64)
        ))?;
    }
    let hard_bytes = budget_bytes * RECLAIM_HARD_PERCENT / 100;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut overload_s = 0;
    let mut returned_gib_s = 0.0;
    for second in 1..=RUN_S {
        let available = write_host(resident(&stacks)?)?;
        if available < hard_bytes {
            overload_s += 1;
        }
        let mut balloons = Vec::new();
        for (stack, _) in &mut stacks {
            balloons.push(stack.control.status()?.actual_bytes);
        }
        let returned: u64 = balloons.iter().sum();
        returned_gib_s += returned as f64 / (1u64 << 30) as f64;
        let state = daemon.state().unwrap_or_default();
        let psi_some_avg10 = (0..GUESTS)
            .filter_map(|i| state["agents"][format!("g{i}")]["psi"]["some"]["avg10"].as_f64())
            .sum();
        samples.push(HostSample {
            t_s: started.elapsed().as_secs_f64(),
            available_mib: available as f64 / MIB as f64,
            returned_mib: returned as f64 / MIB as f64,
            psi_some_avg10,
        });
        let due = started + Duration::from_secs(second);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let target_changes = scrape_target_changes(port).context("scraping host-policy's metrics")?;
    let mut guests = Vec::new();
    for ((stack, _), start) in stacks.iter_mut().zip(start_counters) {
        // The script ends when its last phase does, a little after RUN_S if
        // its passes ran late; a killed one never ends.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut report = stack.vm.sh("cat /tmp/workload.jsonl")?;
        while !WorkloadTimes::parse(&report).completed
            && Instant::now() < deadline
            && stack.vm.sh("pidof guest-workload || true")?.trim() != ""
        {
            std::thread::sleep(Duration::from_secs(1));
            report = stack.vm.sh("cat /tmp/workload.jsonl")?;
        }
        let end = GuestCounters::parse(&stack.vm.sh(COUNTERS_COMMAND)?);
        guests.push(GuestOutcome {
            counters: end.since(start),
            workload: WorkloadTimes::parse(&report),
        });
    }
    daemon.stop()?;
    let min_available_mib = samples
        .iter()
        .map(|s| s.available_mib)
        .fold(f64::INFINITY, f64::min);
    Ok(RealRun {
        policy,
        samples,
        overload_s,
        min_available_mib,
        returned_gib_s,
        target_changes,
        guests,
    })
}

fn table(runs: &[RealRun]) -> String {
    let mut text = String::from(
        "| policy | host overload s | lowest host available | returned GiB x s | target changes \
         | OOM kills | allocation stalls | major faults | PSI memory some, s | disk re-reads | \
         workload time (ramp + passes + cache reads) | scripts completed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        let counters = run
            .guests
            .iter()
            .fold(GuestCounters::default(), |sum, g| sum.add(g.counters));
        let workload_s: f64 = run.guests.iter().map(|g| g.workload.total_s()).sum();
        let completed = run.guests.iter().filter(|g| g.workload.completed).count();
        // The first read of the cache is the script's, not a re-read.
        let rereads = counters
            .disk_read_bytes
            .saturating_sub(GUESTS as u64 * CACHE_MIB * MIB);
        text.push_str(&format!(
            "| {} | {} | {:.0} MiB | {:.1} | {} | {} | {} | {} | {:.2} | {} MiB | {:.1} s | {completed}/{GUESTS} |\n",
            run.policy.name(),
            run.overload_s,
            run.min_available_mib,
            run.returned_gib_s,
            run.target_changes,
            counters.oom_kills,
            counters.alloc_stalls,
            counters.major_faults,
            counters.psi_some_us as f64 / 1e6,
            rereads / MIB,
            workload_s,
        ));
    }
    text.trim_end().to_string()
}

fn svg(runs: &[RealRun], path: &Path) -> anyhow::Result<()> {
    let line = |run: &RealRun, name: &str, colour: RGBColor, value: fn(&HostSample) -> f64| Line {
        name: name.to_string(),
        colour,
        points: run.samples.iter().map(|s| (s.t_s, value(s))).collect(),
    };
    let columns: Vec<Vec<Panel>> = runs
        .iter()
        .map(|run| {
            vec![
                Panel {
                    title: run.policy.name().to_string(),
                    lines: vec![
                        line(run, "host available", BLUE, |s| s.available_mib),
                        line(run, "returned by balloons", GREEN, |s| s.returned_mib),
                    ],
                },
                Panel {
                    title: run.policy.name().to_string(),
                    lines: vec![line(run, "guests' PSI some avg10, summed", RED, |s| {
                        s.psi_some_avg10
                    })],
                },
            ]
        })
        .collect();
    grid_svg(path, RUN_S as f64, &["MiB", "%"], &columns)?;
    Ok(())
}

/// Runs ours, MOM's, Proxmox's and ESX's idle-tax policy on the real guests; writes the
/// side-by-side SVG to `svg_path` and returns the table.
pub fn run(svg_path: &Path) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for policy in [
        PolicyKind::BalloonStack,
        PolicyKind::Mom,
        PolicyKind::Proxmox,
        PolicyKind::EsxIdleTax,
    ] {
        runs.push(run_policy(policy)?);
    }
    svg(&runs, svg_path)?;
    Ok(table(&runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_runs_the_whole_time_busy_twice_out_of_phase() {
        let busy = |index: u64| -> Vec<(u64, u64)> {
            let mut t = 0;
            let mut spans = Vec::new();
            for phase in phases(index).split(',') {
                let (seconds, mib) = phase.split_once(':').unwrap();
                let (seconds, mib): (u64, u64) = (seconds.parse().unwrap(), mib.parse().unwrap());
                if mib == BUSY_MIB {
                    spans.push((t, t + seconds));
                }
                t += seconds;
            }
            assert_eq!(t, RUN_S);
            spans
        };
        let all: Vec<Vec<(u64, u64)>> = (0..GUESTS as u64).map(busy).collect();
        for spans in &all {
            assert_eq!(spans.len(), 2);
        }
        for (i, a) in all.iter().enumerate() {
            for b in all.iter().skip(i + 1) {
                for (s1, e1) in a {
                    for (s2, e2) in b {
                        assert!(e1 <= s2 || e2 <= s1, "{a:?} overlaps {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn guest_counters_are_read_from_proc_and_sys() {
        let text = "nr_free_pages 100\npgmajfault 7\nallocstall_dma32 2\nallocstall_normal 3\n\
                    oom_kill 1\nsome avg10=0.00 avg60=0.00 avg300=0.00 total=1234\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=99\n\
                    \x20    120        0     2048       10        0        0        0        0        0       10       10\n";
        assert_eq!(
            GuestCounters::parse(text),
            GuestCounters {
                oom_kills: 1,
                alloc_stalls: 5,
                major_faults: 7,
                psi_some_us: 1234,
                disk_read_bytes: 2048 * 512,
            }
        );
    }

    #[test]
    fn workload_times_sum_the_phases_and_see_the_end() {
        let report = "{\"event\":\"cache-filled\",\"bytes\":1,\"seconds\":0.5}\n\
                      {\"index\":0,\"ramp_s\":0.25,\"pass_total_s\":1.0,\"cache_read_s\":0.5}\n\
                      {\"index\":1,\"ramp_s\":0.25,\"pass_total_s\":2.0,\"cache_read_s\":0.5}\n";
        let times = WorkloadTimes::parse(report);
        assert!(!times.completed);
        assert_eq!(times.total_s(), 4.5);
        assert!(WorkloadTimes::parse(&format!("{report}{{\"event\":\"done\"}}\n")).completed);
    }
}
