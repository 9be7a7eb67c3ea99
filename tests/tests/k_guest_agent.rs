//! The guest agent: its reports reach host-policy over virtio-serial; a
//! reclaim request drops the guest's page cache; a memory hog raises PSI and
//! host-policy deflates that VM on the agent's word.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use guest_tests::host_policy_process::PolicyProcess;
use guest_tests::{wait_for, Stack, MIB};

/// host-policy `[defaults]`: small steps, no floor (so pressure is seen
/// through PSI), the lowest PSI threshold, and no cool-down (so a stall
/// while the test fills the page cache does not block inflation for long).
/// The 40 % limit (204 MiB) is one hard step, more than the guest's free
/// memory (so the agent is asked first), and leaves the guest enough that
/// the balloon itself does not squeeze it into allocation stalls before
/// the hog runs.
const POLICY: &str = "inflate_step_mib = 64\nhard_inflate_step_mib = 256\ndeflate_step_mib = 256\nmin_free_mib = 0\nmin_free_percent = 0\npsi_some_avg10 = 1\npressure_cooldown_s = 0\nmax_reclaim_percent = 40";

/// Waits for a host-policy log line containing `needle`; on timeout the
/// error carries the whole log.
fn wait_log_line(log_path: &Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    wait_for(needle, timeout, || {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        Ok(log.lines().find(|l| l.contains(needle)).map(str::to_string))
    })
    .with_context(|| {
        format!(
            "host-policy log:\n{}",
            std::fs::read_to_string(log_path).unwrap_or_default()
        )
    })
}

/// The agent's CPU time (utime + stime) and the guest's uptime, both in
/// clock ticks (USER_HZ is 100 on x86_64).
struct AgentCpu {
    cpu_ticks: u64,
    uptime_ticks: u64,
}

fn agent_cpu(vm: &mut guest_tests::vm::Vm) -> anyhow::Result<AgentCpu> {
    let line = vm.sh(
        "set -- $(cut -d' ' -f14,15 /proc/$(pidof guest-agent)/stat); \
         up=$(cut -d' ' -f1 /proc/uptime); echo $(($1 + $2)) ${up%.*}${up#*.}",
    )?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("agent CPU line {line:?}"))?;
    let [cpu_ticks, uptime_ticks] = fields[..] else {
        anyhow::bail!("agent CPU line {line:?}");
    };
    Ok(AgentCpu {
        cpu_ticks,
        uptime_ticks,
    })
}

fn page_cache_bytes(meminfo: &std::collections::HashMap<String, u64>) -> u64 {
    let get = |k: &str| meminfo.get(k).copied().unwrap_or(0);
    (get("Cached") + get("Buffers")).saturating_sub(get("Shmem"))
}

#[test]
fn agent_reports_reclaim_and_psi_drive_host_policy() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(640 * MIB)?;
    let agent_socket = dir.path().join("agent.sock");
    // Without free page reporting: what the guest frees stays on the host
    // until a balloon takes it, so host-policy inflates this guest (after
    // its agent dropped the cache the balloon would take). With reporting
    // and an agent, host-policy drops cache and never inflates: a balloon
    // there would buy the host nothing (docs/host-policy.md).
    let mut stack = Stack::start(512, &["--stats-interval", "1", "--no-reporting"], |c| {
        c.agent_socket = Some(agent_socket.clone());
        c.disk = Some(disk.clone());
    })?;
    stack
        .vm
        .wait_line(|l| l == "@@AGENT started", Duration::from_secs(10))?;
    let start_policy = |stack: &Stack| {
        PolicyProcess::start_with_agent(
            &stack.env,
            stack.dir.path(),
            &stack.backend.control,
            Some(&agent_socket),
            POLICY,
        )
    };
    let mut policy = start_policy(&stack)?;
    let log_path = stack.dir.path().join("host-policy.log");

    // 1. Reports reach host-policy.
    let report = wait_for(
        "an agent report in host-policy's state",
        Duration::from_secs(30),
        || {
            let Some(state) = policy.state() else {
                return Ok(None);
            };
            Ok(state["agents"]["guest"]["seq"]
                .as_u64()
                .filter(|seq| *seq >= 2)
                .map(|_| state["agents"]["guest"].clone()))
        },
    )?;
    assert!(
        report["meminfo"]["available_bytes"].as_u64().unwrap_or(0) > 100 * MIB,
        "{report}"
    );
    assert!(report["psi"]["some"]["avg10"].is_number(), "{report}");
    // A small static agent: under 4 MiB resident, almost no CPU when idle.
    let rss_kib: u64 = stack
        .vm
        .sh("grep VmRSS /proc/$(pidof guest-agent)/status | tr -s ' ' | cut -d' ' -f2")?
        .trim()
        .parse()?;
    assert!(rss_kib < 4096, "guest-agent uses {rss_kib} KiB");
    // Its CPU use is measured from here over the restart below (idle
    // reports every 2 s plus one reconnect).
    let cpu_start = agent_cpu(&mut stack.vm)?;

    // The host side goes away and comes back: the agent reconnects.
    policy.stop()?;
    std::fs::remove_file(&policy.state_file)?;
    let mut policy = start_policy(&stack)?;
    wait_for(
        "reports after host-policy restarted",
        Duration::from_secs(30),
        || {
            let Some(state) = policy.state() else {
                return Ok(None);
            };
            Ok(state["agents"]["guest"]["seq"].as_u64().map(drop))
        },
    )?;
    // A second connection, not the first one's line: the new host-policy
    // logs it, and the agent logged two connections.
    wait_log_line(&log_path, "guest agent connected", Duration::from_secs(30))?;
    let console = stack.vm.sh("cat /tmp/guest-agent.log")?;
    let connections = console.matches("connected on").count();
    assert!(connections >= 2, "one connection only:\n{console}");
    assert!(console.contains("reconnecting"), "{console}");

    // Idle cost: the agent reports every 2 s and sleeps otherwise; it uses
    // far below 3 % of a CPU even under TCG. At least 10 s are measured.
    wait_for("10 s of agent life", Duration::from_secs(60), || {
        let now = agent_cpu(&mut stack.vm)?;
        Ok((now.uptime_ticks >= cpu_start.uptime_ticks + 1000).then_some(()))
    })?;
    let cpu_end = agent_cpu(&mut stack.vm)?;
    let used = cpu_end
        .cpu_ticks
        .checked_sub(cpu_start.cpu_ticks)
        .context("agent CPU time went backwards")?;
    let elapsed = cpu_end
        .uptime_ticks
        .checked_sub(cpu_start.uptime_ticks)
        .context("guest uptime went backwards")?;
    eprintln!("[k] guest-agent: {used} CPU ticks in {elapsed} ticks");
    assert!(
        used.saturating_mul(100) <= elapsed.saturating_mul(3),
        "guest-agent used {used} CPU ticks in {elapsed} ticks (over 3 %)"
    );

    // 2. Page cache from the disk; host pressure: host-policy asks the agent
    //    to reclaim cache before it inflates.
    // The device must stay open, or its page cache is dropped on close. A
    // disk larger than the guest's RAM leaves its free memory at the
    // watermarks, so the inflation reaches into the cache (host-policy
    // asks the agent only for what free memory does not cover).
    stack.vm.sh("sync; echo 3 > /proc/sys/vm/drop_caches")?;
    stack
        .vm
        .sh("sleep 100000 </dev/vda & dd if=/dev/vda of=/dev/null bs=1M count=600 2>/dev/null")?;
    let cache_before = page_cache_bytes(&stack.vm.meminfo()?);
    assert!(cache_before >= 250 * MIB, "page cache {cache_before}");
    wait_for(
        "the agent to report the page cache",
        Duration::from_secs(20),
        || {
            let state = policy.state().unwrap_or_default();
            Ok((state["agents"]["guest"]["meminfo"]["page_cache_bytes"]
                .as_u64()
                .unwrap_or(0)
                >= 250 * MIB)
                .then_some(()))
        },
    )?;
    policy.set_host(16384, 1310)?;
    // The first move: the agent asked for the cache the inflation would take
    // beyond the guest's free memory, or (when free memory covers it all)
    // the balloon inflating with no request.
    let line = wait_for(
        "a reclaim request or an inflation",
        Duration::from_secs(60),
        || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Ok(log
                .lines()
                .find(|l| {
                    l.contains("asked the guest agent to reclaim") || l.contains("balloon 0 MiB ->")
                })
                .map(str::to_string))
        },
    )?;
    eprintln!("[k] {line}");
    if line.contains("asked the guest agent to reclaim") {
        // Then "guest agent reclaimed N MiB of page cache (method), M MiB
        // asked": what the agent itself measured around its own reclaim, before
        // host-policy set any target (the inflation waits for this answer).
        let reply_line =
            wait_log_line(&log_path, "guest agent reclaimed", Duration::from_secs(60))?;
        eprintln!("[k] {reply_line}");
        let reclaimed_mib: u64 = reply_line
            .split("guest agent reclaimed ")
            .nth(1)
            .and_then(|rest| rest.split(" MiB").next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no reclaimed MiB in {reply_line:?}"))?;
        // What the balloon would have taken beyond the guest's free memory.
        let asked_mib: u64 = reply_line
            .rsplit(", ")
            .next()
            .and_then(|rest| rest.split(" MiB asked").next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no asked MiB in {reply_line:?}"))?;
        assert!(asked_mib >= 1, "asked {asked_mib} MiB");
        assert!(
            reclaimed_mib.saturating_mul(2) >= asked_mib,
            "asked {asked_mib} MiB, the agent reclaimed {reclaimed_mib} MiB"
        );
        // The reclaim came before any inflation: no balloon change is logged
        // before the reclaim line.
        let log = std::fs::read_to_string(&log_path)?;
        let reclaim_at = log
            .find("guest agent reclaimed")
            .context("reclaim line vanished")?;
        let first_inflate = log.find("balloon 0 MiB ->").unwrap_or(usize::MAX);
        assert!(
            reclaim_at < first_inflate,
            "the balloon inflated before the agent answered its reclaim:\n{log}"
        );
        let cache_after = page_cache_bytes(&stack.vm.meminfo()?);
        let cache_drop = cache_before
            .checked_sub(cache_after)
            .with_context(|| format!("page cache grew: {cache_before} -> {cache_after} bytes"))?;
        eprintln!(
            "[k] guest page cache {} MiB -> {} MiB",
            cache_before / MIB,
            cache_after / MIB
        );
        assert!(
            cache_drop.saturating_mul(2) >= asked_mib.saturating_mul(MIB),
            "asked {asked_mib} MiB, page cache fell only by {cache_drop} bytes"
        );
    } else {
        eprintln!("[k] free memory covered the inflation: no reclaim request");
    }
    let inflated = wait_for("the balloon to grow", Duration::from_secs(60), || {
        let status = stack.control.status()?;
        let actual = status.actual_bytes;
        Ok((actual >= 128 * MIB && actual == status.target_bytes).then_some(actual))
    })?;

    // (No cache trim at the limit here: without free page reporting the
    // dropped cache would stay on the host; host-policy trims the cache of
    // reporting guests only, which policy tests cover.)

    // 3. The host inside the dead band (30 % available: no more reclaim,
    //    no give-back), then a memory hog in the guest: PSI rises and
    //    host-policy takes the agent's report for pressure. The hog also
    //    raises the allocation-stall counter of the balloon's statistics,
    //    which may deflate the balloon a tick before PSI's 2 s averages
    //    catch up; so the test watches every tick's decision (the state
    //    file) for the PSI reason while the hog runs, and the balloon for
    //    the deflation, whichever signal comes first.
    policy.set_host(16384, 4915)?;
    let free = stack.vm.meminfo()?.get("MemFree").copied().unwrap_or(0);
    // A sustained hog: fill tmpfs past free memory (reclaiming the page
    // cache), free it, read the disk back into the cache, again, so that
    // the guest keeps stalling on reclaim and PSI's averages climb well
    // past the threshold rather than graze it.
    stack.vm.sh(&format!(
        "(while :; do dd if=/dev/zero of=/mnt/data/hog bs=1M count={} 2>/dev/null; \
          rm -f /mnt/data/hog; dd if=/dev/vda of=/dev/null bs=1M count=300 2>/dev/null; done) &",
        (free + 192 * MIB) / MIB
    ))?;
    let mut psi_reason: Option<String> = None;
    let deflated_to = wait_for(
        "a PSI decision from the agent's report and a deflated balloon",
        Duration::from_secs(60),
        || {
            let reason = policy
                .state()
                .and_then(|s| {
                    s["decision"]["vms"][0]["reason"]
                        .as_str()
                        .map(str::to_string)
                })
                .unwrap_or_default();
            if reason.contains("guest agent: PSI") {
                psi_reason.get_or_insert(reason);
            }
            let actual = stack.control.status()?.actual_bytes;
            Ok((psi_reason.is_some() && actual < inflated).then_some(actual))
        },
    )
    .with_context(|| {
        format!(
            "host-policy log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    })?;
    eprintln!(
        "[k] balloon {} MiB -> {} MiB; decision: {}",
        inflated / MIB,
        deflated_to / MIB,
        psi_reason.unwrap_or_default()
    );
    assert!(inflated >= 128 * MIB);
    policy.stop()?;
    Ok(())
}
