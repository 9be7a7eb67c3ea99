//! `cargo xtask bench`: runs the benchmarks and writes their tables, with
//! the machine and date, to docs/performance.md.

use std::process::Command;
use std::time::Duration;

use guest_tests::host_policy_process::PolicyProcess;
use guest_tests::vm::Vm;
use guest_tests::Stack;

use anyhow::Context;

use crate::provision::{cargo, workspace_root};

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Runs one Cargo bench (harness = false) and returns the table it prints.
fn cargo_bench(package: &str, bench: &str) -> anyhow::Result<String> {
    eprintln!("[xtask] running {package}/{bench} (release build)");
    let output = Command::new(cargo())
        .current_dir(workspace_root())
        .args(["bench", "--quiet", "-p", package, "--bench", bench])
        .output()
        .context("running cargo bench")?;
    anyhow::ensure!(
        output.status.success(),
        "the benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The seconds in the time column (the second) of the row of a bench table
/// that starts with `row`.
fn table_seconds(table: &str, row: &str) -> anyhow::Result<f64> {
    table
        .lines()
        .find(|line| line.starts_with(row))
        .and_then(|line| line.split('|').nth(2))
        .and_then(|cell| cell.trim().trim_end_matches(" s").parse().ok())
        .with_context(|| format!("no time in the row {row:?} of:\n{table}"))
}

/// A field of a /proc status file.
fn status_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// (resident KiB, context switches) of a host process, summed over threads.
fn process_sample(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
        switches += status_field(&text, "voluntary_ctxt_switches:")
            + status_field(&text, "nonvoluntary_ctxt_switches:");
    }
    Ok((status_field(&status, "VmRSS:"), switches))
}

/// The same for the guest agent, read inside the guest.
fn agent_sample(vm: &mut Vm) -> anyhow::Result<(u64, u64)> {
    let text = vm.sh("cat /proc/$(pidof guest-agent)/status")?;
    Ok((
        status_field(&text, "VmRSS:"),
        status_field(&text, "voluntary_ctxt_switches:")
            + status_field(&text, "nonvoluntary_ctxt_switches:"),
    ))
}

/// (voluntary, involuntary) context switches of each thread of `pid`, by
/// thread name (threads of the same name summed).
fn thread_switches(pid: u32) -> anyhow::Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let mut threads = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let text = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let entry: &mut (u64, u64) = threads.entry(name.trim().to_string()).or_default();
        entry.0 += status_field(&text, "voluntary_ctxt_switches:");
        entry.1 += status_field(&text, "nonvoluntary_ctxt_switches:");
    }
    Ok(threads)
}

/// Context switches of `pid` per second over `window`.
fn wakeups_per_s(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = process_sample(pid)?.1;
    std::thread::sleep(window);
    let after = process_sample(pid)?.1;
    Ok(after.saturating_sub(before) as f64 / window.as_secs_f64())
}

/// Seconds between statistics refreshes in the footprint runs (the
/// backend's default).
const STATS_INTERVAL_S: u64 = 5;
/// At most this many wake-ups per second for host-policy at a 1 s tick.
const POLICY_WAKEUPS_LIMIT: f64 = 2.0;

/// host-policy's wake-ups per second at a 1 s tick managing 10 VMs: ten
/// balloon-backend processes, each driven by an in-process vhost-user
/// frontend holding guest statistics, on an idle host.
fn policy_wakeups_ten_vms(env: &guest_tests::env::TestEnv) -> anyhow::Result<String> {
    const VMS: usize = 10;
    let dir = tempfile::tempdir()?;
    let mut backends: Vec<test_support::Harness> = (0..VMS)
        .map(|_| test_support::Harness::start(&env.backend_binary, &[]))
        .collect();
    let mut config = format!(
        "[host]\ninterval_s = 1\nmeminfo = {:?}\n",
        dir.path().join("meminfo")
    );
    guest_tests::host_policy_process::write_meminfo(&dir.path().join("meminfo"), 16384, 8192)?;
    for (i, backend) in backends.iter_mut().enumerate() {
        let mib = 1 << 20;
        backend.send_stats(&[(4, 30 * mib), (5, 48 * mib), (6, 30 * mib)]);
        config.push_str(&format!(
            "\n[[vm]]\nname = \"vm{i}\"\ncontrol = {:?}\n",
            backend.dir.path().join("control.sock")
        ));
    }
    let config_path = dir.path().join("host-policy.toml");
    std::fs::write(&config_path, config)?;
    let child = Command::new(&env.host_policy_binary)
        .args(["run", "--config"])
        .arg(&config_path)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting host-policy")?;
    let policy = test_support::ChildGuard::new("host-policy", child);
    // Let the connections open; the window is what counts.
    std::thread::sleep(Duration::from_secs(5));
    let rate = wakeups_per_s(policy.pid(), Duration::from_secs(20))?;
    drop(backends);
    Ok(format!(
        "| host-policy at a 1 s tick | wake-ups per second (all threads) | limit | ratio |\n|---|---|---|---|\n\
         | {VMS} VMs (balloon-backend processes with in-process frontends), counted over 20 s | {rate:.2} | {POLICY_WAKEUPS_LIMIT:.1} | {:.2}x |",
        rate / POLICY_WAKEUPS_LIMIT
    ))
}

/// RSS and idle wake-ups of the three programs, with a 512 MiB guest
/// attached, statistics every 5 s, host-policy ticking every second on an
/// idle host and the guest agent reporting every 2 s. Before host-policy
/// starts, the backend's wake-ups with no client are counted alone.
fn footprint() -> anyhow::Result<(String, String)> {
    let window = Duration::from_secs(20);
    let dir = tempfile::tempdir()?;
    let agent_socket = dir.path().join("agent.sock");
    let mut stack = Stack::start(512, &[], |c| c.agent_socket = Some(agent_socket.clone()))?;
    stack
        .vm
        .wait_line(|l| l == "@@AGENT started", Duration::from_secs(10))?;
    // The guest has settled after boot once the agent runs.
    std::thread::sleep(Duration::from_secs(2));
    let idle_window = Duration::from_secs(4 * STATS_INTERVAL_S);
    let idle_before = thread_switches(stack.backend.pid())?;
    std::thread::sleep(idle_window);
    let idle_after = thread_switches(stack.backend.pid())?;
    let intervals = (idle_window.as_secs() / STATS_INTERVAL_S) as f64;
    let mut idle_table = format!(
        "| balloon-backend thread, guest idle, no control client, over {} s | voluntary wake-ups per {STATS_INTERVAL_S} s statistics interval | preempted per interval | expected |\n|---|---|---|---|\n",
        idle_window.as_secs()
    );
    for (name, (voluntary, involuntary)) in &idle_after {
        let (v0, i0) = idle_before.get(name).copied().unwrap_or_default();
        let expected = if name == "vring_worker" {
            "2 (the timer; the guest's refilled buffer), plus any free page report the guest sends"
        } else {
            "0"
        };
        idle_table.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {expected} |\n",
            voluntary.saturating_sub(v0) as f64 / intervals,
            involuntary.saturating_sub(i0) as f64 / intervals,
        ));
    }
    let idle_table = idle_table.trim_end().to_string();
    let policy = PolicyProcess::start_with_agent(
        &stack.env,
        stack.dir.path(),
        &stack.backend.control,
        Some(&agent_socket),
        "",
    )?;
    // Let start-up settle; the measurement window is what counts.
    std::thread::sleep(Duration::from_secs(5));
    let before = [
        process_sample(stack.backend.pid())?,
        process_sample(policy.pid())?,
        agent_sample(&mut stack.vm)?,
    ];
    std::thread::sleep(window);
    let after = [
        process_sample(stack.backend.pid())?,
        process_sample(policy.pid())?,
        agent_sample(&mut stack.vm)?,
    ];
    let mut table = String::from(
        "| program | RSS | wake-ups per second (context switches, all threads) |\n|---|---|---|\n",
    );
    let names = [
        "balloon-backend (stats every 5 s)",
        "host-policy (a tick every 1 s)",
        "guest-agent (a report every 2 s; measured in the guest)",
    ];
    for ((name, b), a) in names.iter().zip(before).zip(after) {
        let rate = a.1.saturating_sub(b.1) as f64 / window.as_secs_f64();
        table.push_str(&format!(
            "| {name} | {:.1} MiB | {rate:.1} |\n",
            a.0 as f64 / 1024.0
        ));
    }
    Ok((table.trim_end().to_string(), idle_table))
}

/// The scenario family the policy goals are asserted on (issue 26): its
/// seed and size, as `policy_sim::family`'s goal test runs it.
const FAMILY_SEED: u64 = 26;
const FAMILY_SCENARIOS: u64 = 200;

/// Every policy on `FAMILY_SCENARIOS` generated scenarios: the summary of
/// `simulate --family` (shares where ours does no more harm, the safe
/// density distribution).
fn policy_family() -> anyhow::Result<String> {
    use balloon_policy::PolicyKind;
    use policy_sim::family;
    let rows = family::run_family(FAMILY_SEED, FAMILY_SCENARIOS, &PolicyKind::ALL)?;
    let text = family::table(FAMILY_SEED, &rows);
    let head = text.split("| # |").next().unwrap_or_default();
    Ok(head
        .lines()
        .skip_while(|line| line.starts_with('#') || line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string())
}

/// Every policy on every scenario of host-policy/scenarios/ in the
/// simulator: one table per scenario, safe density for `phases`, and the
/// `phases` runs side by side as docs/policy-comparison-phases.svg.
fn policy_comparison() -> anyhow::Result<String> {
    use balloon_policy::PolicyKind;
    use policy_sim::simulate;
    let root = workspace_root();
    let mut text = String::new();
    for name in [
        "phases",
        "burst",
        "cache",
        "squeeze",
        "boot-storm",
        "real-guests",
    ] {
        let path = root.join(format!("host-policy/scenarios/{name}.toml"));
        let scenario = simulate::load(&path)?;
        let runs = simulate::compare_runs(&scenario, &PolicyKind::ALL);
        if name == "phases" {
            simulate::compare_svg(
                &scenario,
                &runs,
                &root.join("docs/policy-comparison-phases.svg"),
            )?;
        }
        text.push_str(&format!("`{name}`:\n\n{}\n", simulate::table(&runs)));
    }
    Ok(text.trim_end().to_string())
}

/// host-policy's idle wake-ups per second in `footprint()`'s setup when it
/// still reconnected every tick (the committed docs/performance.md of
/// f2dea55), kept so the document shows before and after.
const HOST_POLICY_WAKEUPS_BEFORE: &str = "15.0";

/// The heading of the state file's section.
const STATE_FILE_HEADING: &str = "## State file";

/// The state file's cost (heading, text, tables).
fn state_file_section() -> anyhow::Result<String> {
    let tables = cargo_bench("balloon-backend", "state_file")?;
    Ok(format!(
        "{STATE_FILE_HEADING}\n\n\
         With `--state-file` the balloon's bits live in a file mapped into the\n\
         backend, so every inflate and deflate is kept before its request\n\
         completes (docs/balloon-backend.md, \"State across restarts\"). What that\n\
         costs on the request path, in process, bookkeeping only (no punches),\n\
         median of 5 runs; and what a restart adds.\n\n{tables}"
    ))
}

/// `--only-state-file`: measures the state file's cost and replaces its
/// section of docs/performance.md (appended when missing), noting the date.
pub fn run_state_file_only() -> anyhow::Result<()> {
    let section = format!(
        "{}\n\nThis section was measured on its own by `cargo xtask bench\n\
         --only-state-file` on {} ({}, {} cores).\n",
        state_file_section()?,
        command_output("date", &["-u", "+%Y-%m-%d"]),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let path = workspace_root().join("docs/performance.md");
    let document =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let document = replace_section(&document, STATE_FILE_HEADING, &section);
    std::fs::write(&path, document).with_context(|| format!("writing {}", path.display()))?;
    println!("{section}\nwritten to {}", path.display());
    Ok(())
}

/// The heading of the migration comparison's section.
const MIGRATION_HEADING: &str = "## Migration";

/// The migration comparison's section (heading, text, table).
fn migration_section(env: &guest_tests::env::TestEnv) -> anyhow::Result<String> {
    let table = crate::migration_comparison::run(env)?;
    Ok(format!(
        "{MIGRATION_HEADING}\n\n\
         One live migration over a Unix socket on this host: a {} MiB guest\n\
         (Linux 6.12, {}) that wrote 128 MiB of random data and then gave\n\
         {} MiB to its balloon, to a QEMU started with `-incoming defer` (return\n\
         path on, then `migrate-incoming`, as libvirt does).\n\
         Same QEMU build and guest image for both devices. Time and RAM sent are\n\
         QEMU's `query-migrate` (`total-time`, `ram.transferred`); resident is\n\
         the destination's guest-RAM memfd once the guest runs there. In a\n\
         precopy migration loading guest RAM allocates every page of a shared\n\
         memfd; ours then punches the ballooned pages again before the guest\n\
         runs, QEMU's balloon does not. With multifd (on both sides) the\n\
         destination leaves pages sent as zero alone, so every hole survives\n\
         with either balloon.\n\n{table}",
        guest_tests::migration::GUEST_MIB,
        env.accel,
        guest_tests::migration::BALLOON_BYTES / guest_tests::MIB,
    ))
}

/// `--only-migration`: measures the migration comparison and replaces its
/// section of docs/performance.md (appended when missing), noting the date.
pub fn run_migration_only(env: &guest_tests::env::TestEnv) -> anyhow::Result<()> {
    let section = migration_section(env)?;
    let section = format!(
        "{section}\n\nThis section was measured on its own by `cargo xtask bench\n\
         --only-migration` on {} ({}, {} cores).\n",
        command_output("date", &["-u", "+%Y-%m-%d"]),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let path = workspace_root().join("docs/performance.md");
    let document =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let document = replace_section(&document, MIGRATION_HEADING, &section);
    std::fs::write(&path, document).with_context(|| format!("writing {}", path.display()))?;
    println!("{section}\nwritten to {}", path.display());
    Ok(())
}

/// `document` with the section under `heading` (up to the next `## `
/// heading) replaced by `section`, or with `section` appended.
fn replace_section(document: &str, heading: &str, section: &str) -> String {
    let start = document
        .lines()
        .scan(0usize, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line))
        })
        .find(|(_, line)| *line == heading)
        .map(|(at, _)| at);
    let Some(start) = start else {
        return format!("{}\n\n{}", document.trim_end(), section);
    };
    let after = start + heading.len();
    let end = document
        .get(after..)
        .and_then(|rest| rest.find("\n## "))
        .map_or(document.len(), |at| after + at + 1);
    format!(
        "{}{}{}",
        document.get(..start).unwrap_or_default(),
        section.trim_end(),
        document
            .get(end..)
            .map(|rest| if rest.is_empty() {
                "\n".to_string()
            } else {
                format!("\n\n{rest}")
            })
            .unwrap_or_default()
    )
}

pub fn run() -> anyhow::Result<()> {
    let root = workspace_root();
    let table = cargo_bench("balloon-backend", "inflate")?;
    let large_guest_table = cargo_bench("balloon-backend", "large_guest")?;
    let state_file = state_file_section()?;
    let policy_table = cargo_bench("balloon-policy", "decide")?;
    eprintln!("[xtask] comparing the policies in the simulator");
    let comparison_of_policies = policy_comparison()?;
    eprintln!(
        "[xtask] comparing the policies on {FAMILY_SCENARIOS} generated scenarios (a few minutes)"
    );
    let family_of_policies = policy_family()?;
    let env = crate::provision::ensure_all()?;
    let policies_on_guests =
        crate::policy_on_guests::run(&root.join("docs/policy-comparison-real-guests.svg"))?;
    eprintln!("[xtask] measuring footprints with a real guest (about 40 s)");
    let (footprint_table, idle_table) = footprint()?;
    eprintln!("[xtask] counting host-policy's wake-ups with 10 VMs (about 30 s)");
    let policy_wakeups_table = policy_wakeups_ten_vms(&env)?;
    let punch_limit_s = table_seconds(&table, "| limit, as guest RAM is")?;
    let punch_unmapped_s = table_seconds(&table, "| limit: one punch of the whole range")?;
    let comparison_table = crate::qemu_comparison::run(&env, punch_limit_s, punch_unmapped_s)?;
    let migration = migration_section(&env)?;
    let document = format!(
        "# Performance\n\n\
         Measured by `cargo xtask bench` on {date}: {cpu}, {cores} cores, kernel {kernel}.\n\
         Every row of a table comes from the same run; ratios compare rows of that run.\n\
         Reproduce with `cargo xtask bench` (it rewrites this file).\n\n\
         ## Inflate path, in process\n\n\
         1 GiB of guest RAM in a shmem file (as memfd guest RAM is), every page\n\
         resident before each run, PFNs fed in requests of 256 as the Linux driver\n\
         sends them. The device's path validates, sorts, dedupes and coalesces the\n\
         PFNs, updates the balloon bitmap, and punches what is pending with the\n\
         device's own rule (`tracker::punch_due`: 256 MiB pending, or 20 ms; the\n\
         requests here come faster than that), pending pages with only ballooned\n\
         pages between them sharing one `fallocate`.\n\
         \"Scattered\" feeds every page of the range in a shuffled order, so almost no\n\
         two PFNs of a request are adjacent. Goal: scattered at least 1.0x one\n\
         `fallocate` per page (aim 2x). Each figure is the median of 3 runs;\n\
         every run is checked to have freed the whole range.\n\n{table}\n\n\
         ## A 64 GiB guest, in process\n\n{large_guest_table}\n\n\
         {state_file}\n\n\
         ## host-policy decision time\n\n\
         One tick of the pure policy (`policy::decide`) for synthetic VMs, all with\n\
         fresh statistics, the host in reclaim. The ratio compares the cost per VM\n\
         with the 10-VM tick of the same run; the goal is at most 1.30x up to\n\
         1,000 VMs.\n\n{policy_table}\n\n\
         ## Policies compared in the simulator\n\n\
         Every policy (`[host] policy`) on {FAMILY_SCENARIOS} scenarios generated from the\n\
         documented distribution (`host-policy simulate --family {FAMILY_SCENARIOS} --seed {FAMILY_SEED}`;\n\
         docs/host-policy.md, \"A family of scenarios\"), with the guest model of\n\
         `host-policy simulate` (free page reporting, deflate-on-OOM, demand faster\n\
         than a tick). Goals, asserted by `policy-sim`'s tests on this seed: ours does\n\
         no more harm than the best baseline in at least 95 % of the scenarios, and\n\
         its median safe density is at least 1.3x the best baseline's.\n\n\
         {family_of_policies}\n\n\
         Then each scenario of `host-policy/scenarios/`. Safe density: the most `phases`\n\
         VMs (4 GiB each, 32 GiB host) held with no host overload, no OOM kill and guest\n\
         stalls under 1 % of VM-seconds. `real-guests` is the comparison on real guests\n\
         below, as a scenario (the guest model's calibration). The `phases` runs side\n\
         by side: [policy-comparison-phases.svg](policy-comparison-phases.svg).\n\n\
         {comparison_of_policies}\n\n\
         ## Policies compared on real guests\n\n\
         Three {guest_mib} MiB guests (Linux 6.12, {accel}) on balloon-backend, each with the\n\
         guest agent and a {disk_mib} MiB disk, run `guest-workload` for {run_s} s: a working set of\n\
         {idle_mib} MiB, busy at {busy_mib} MiB twice for {busy_s} s, one guest after the other, touched\n\
         every second; {cache_mib} MiB of the disk read into the page cache at the start, its first\n\
         {hot_mib} MiB re-read every second. The host is a budget of {budget_mib} MiB: each second its\n\
         available memory is the budget less the three guests' host-resident RAM\n\
         (their memfds), written to the meminfo file host-policy reads\n\
         (reclaim below 20 %, hard below 10 %, give back above 35 %). host-policy\n\
         runs each policy with its defaults. Host overload: seconds below the hard\n\
         threshold. Guest columns are summed over the three guests and read in\n\
         the guests (`/proc/vmstat`, `/proc/pressure/memory`, `/sys/block/vda/stat`);\n\
         disk re-reads are the disk reads beyond the first fill of the cache; workload\n\
         time is what `guest-workload` reports its phases took. The runs side by side\n\
         (host available memory, memory in balloons, the agents' PSI):\n\
         [policy-comparison-real-guests.svg](policy-comparison-real-guests.svg).\n\n\
         {policies_on_guests}\n\n\
         ## Wake-ups\n\n\
         host-policy asks every backend for its status when a tick ends, so the\n\
         replies wait in the sockets and the next tick reads them without sleeping:\n\
         one wake-up per tick, whatever the number of VMs.\n\n{policy_wakeups_table}\n\n\
         balloon-backend with a guest attached and nobody asking for its status:\n\
         its statistics timer (every {STATS_INTERVAL_S} s) hands the stats buffer back\n\
         and the guest's refilled buffer wakes the vring worker again; no other\n\
         thread should wake. \"Preempted\" counts the times a running thread was\n\
         switched out (the tcg guest keeps the CPUs busy), not wake-ups.\n\n{idle_table}\n\n\
         ## Footprint\n\n\
         A 512 MiB guest (Linux 6.12, {accel}) on balloon-backend, host-policy\n\
         managing it on an idle host, the guest agent reporting; counted over 20 s.\n\n{footprint_table}\n\n\
         host-policy keeps one connection per backend and per agent across ticks.\n\
         Before that (it reconnected to every backend each tick), this bench\n\
         measured {HOST_POLICY_WAKEUPS_BEFORE} wake-ups per second for host-policy in the same setup\n\
         (run of 2026-11-29, commit f2dea55).\n\n\
         ## Real guest: balloon-backend against QEMU's virtio-balloon\n\n\
         Both on the same QEMU build, guest image (Linux 6.12) and memfd guest RAM,\n\
         under {accel}. Targets: ours through the control socket, QEMU's through QMP\n\
         `balloon`. Discard calls are counted with `strace -c -f` in a second run of\n\
         each side (tracing slows the process, so times come from the untraced run).\n\n\
         {comparison_table}\n\n\
         {migration}\n",
        date = command_output("date", &["-u", "+%Y-%m-%d"]),
        cpu = cpu_model(),
        cores = std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel = command_output("uname", &["-r"]),
        accel = env.accel,
        guest_mib = crate::policy_on_guests::GUEST_MIB,
        disk_mib = crate::policy_on_guests::DISK_MIB,
        run_s = crate::policy_on_guests::RUN_S,
        idle_mib = crate::policy_on_guests::IDLE_MIB,
        busy_mib = crate::policy_on_guests::BUSY_MIB,
        busy_s = crate::policy_on_guests::BUSY_S,
        cache_mib = crate::policy_on_guests::CACHE_MIB,
        hot_mib = crate::policy_on_guests::HOT_CACHE_MIB,
        budget_mib = crate::policy_on_guests::HOST_BUDGET_MIB,
    );
    let path = root.join("docs/performance.md");
    std::fs::write(&path, document).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "{table}\n\n{policy_table}\n\n{footprint_table}\n\nwritten to {}",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_in_place_or_appended() {
        let document = "# T\n\n## A\n\nold a\n\n## Migration\n\nold m\n\n## B\n\nb\n";
        assert_eq!(
            replace_section(document, "## Migration", "## Migration\n\nnew m\n"),
            "# T\n\n## A\n\nold a\n\n## Migration\n\nnew m\n\n## B\n\nb\n"
        );
        let last = "# T\n\n## Migration\n\nold m\n";
        assert_eq!(
            replace_section(last, "## Migration", "## Migration\n\nnew\n"),
            "# T\n\n## Migration\n\nnew\n"
        );
        assert_eq!(
            replace_section("# T\n\n## A\n\na\n", "## Migration", "## Migration\n\nm\n"),
            "# T\n\n## A\n\na\n\n## Migration\n\nm\n"
        );
    }
}
