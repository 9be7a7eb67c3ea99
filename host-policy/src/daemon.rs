//! The daemon: every tick, read the host, ask every VM's backend for its
//! state, run the policy, apply and log the changes, and record them for
//! `host-policy status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use balloon_policy::policy::{
    limit_bytes, Decision, GuestCounters, GuestSample, PolicyMemory, VmDecision, VmInput,
};
use balloon_protocol::control::StatusReply;
use host_policy_config::config::MetricsListen;
use host_policy_config::{managed_vms, Config, ManagedVm, StateFile};

use crate::host_reader::{HostReading, PressureReading};
use crate::links::{tick_reply_timeout, VmLink};

pub fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The policy input for one VM from its backend's status.
pub fn vm_input(vm: &ManagedVm, status: &StatusReply, now_unix_s: u64) -> VmInput {
    let sample = status.stats.as_ref().and_then(|stats| {
        let available_bytes = stats.available_bytes.or(stats.free_bytes)?;
        Some(GuestSample {
            available_bytes,
            free_bytes: stats.free_bytes,
            counters: GuestCounters {
                swap_in: stats.swap_in,
                major_faults: stats.major_faults,
                alloc_stalls: stats.alloc_stalls,
                direct_reclaims: stats.direct_reclaims,
                oom_kills: stats.oom_kills,
            },
            age_s: now_unix_s.saturating_sub(stats.updated_unix_ms / 1000),
            psi_some_avg10: None,
            balloon_bytes: stats.balloon_bytes,
        })
    });
    VmInput {
        name: vm.name.clone(),
        guest_ram_bytes: status.guest_ram_bytes,
        target_bytes: status.target_bytes,
        actual_bytes: status.actual_bytes,
        device_max_reclaim_bytes: status.max_reclaim_bytes,
        sample,
        policy: vm.policy.clone(),
        pinned: status.pinned,
        free_page_reporting: (!status.features.is_empty())
            .then(|| status.features.iter().any(|f| f == "REPORTING")),
        resident_bytes: status.guest_ram_resident_bytes,
        agent_page_cache_bytes: None,
        agent_reclaim: Default::default(),
    }
}

pub struct Daemon {
    config: Config,
    memory: PolicyMemory,
    dry_run: bool,
    started: Instant,
    links: BTreeMap<String, VmLink>,
    /// Set when `[metrics]` is on.
    metrics: Option<crate::metrics::Recorder>,
    /// Why the host's PSI could not be read at the last tick, to log a
    /// change once.
    psi_missing: Option<String>,
}

impl Daemon {
    pub fn new(config: Config, dry_run: bool) -> Self {
        Daemon {
            config,
            memory: PolicyMemory::default(),
            dry_run,
            started: Instant::now(),
            links: BTreeMap::new(),
            metrics: None,
            psi_missing: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Swaps in a new configuration, keeping what the policy remembered.
    pub fn reload(&mut self, config: Config) {
        if config.metrics != self.config.metrics {
            warn!("[metrics] changed: it takes effect when host-policy restarts");
        }
        self.config = config;
    }

    /// Records every tick's figures from now on.
    pub fn set_metrics(&mut self, recorder: crate::metrics::Recorder) {
        self.metrics = Some(recorder);
    }

    /// Each VM's fault counters so far.
    pub fn errors(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.links
            .iter()
            .map(|(name, link)| (name.clone(), link.faults.counts()))
            .filter(|(_, counts)| !counts.is_empty())
            .collect()
    }

    /// One tick. Each backend's status was asked for when the last tick
    /// ended, so its reply is normally waiting and the tick reads every VM
    /// without sleeping (one wake-up per tick in all); a VM without a
    /// request in flight (new, or after an error) is asked now. Replies are
    /// awaited under one common deadline, so a silent backend costs the tick
    /// that deadline once, not once per VM; agents are read without
    /// waiting. Backends that do not answer are skipped this tick.
    pub fn tick(&mut self) -> anyhow::Result<Decision> {
        let tick_started = Instant::now();
        let reading = crate::host_reader::read(&self.config.host)?;
        self.log_pressure_source(&reading.pressure);
        let host = reading.state;
        let now_unix_s = unix_now_s();
        let vms = managed_vms(&self.config);
        self.links
            .retain(|name, _| vms.iter().any(|vm| vm.name == *name));
        for vm in &vms {
            let link = self
                .links
                .entry(vm.name.clone())
                .or_insert_with(|| VmLink::new(&vm.name));
            if !link.status_requested() {
                link.request_status(&vm.control);
            }
        }
        let reply_timeout = tick_reply_timeout(Duration::from_secs(self.config.host.interval_s.0));
        let deadline = Instant::now() + reply_timeout;
        let mut inputs = Vec::new();
        let mut agents = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        for vm in &vms {
            let Some(link) = self.links.get_mut(&vm.name) else {
                continue;
            };
            let report = vm.agent.as_ref().and_then(|path| link.poll_agent(path));
            if let Some(report) = &report {
                agents.insert(vm.name.clone(), report.clone());
            }
            match link.take_status(deadline) {
                Some(status) if !status.connected => {
                    debug!("vm {}: no guest attached yet", vm.name);
                    statuses.insert(vm.name.clone(), status);
                }
                Some(status) => {
                    let mut input = vm_input(vm, &status, now_unix_s);
                    if let (Some(report), Some(sample)) = (&report, input.sample.as_mut()) {
                        sample.psi_some_avg10 = report.psi.map(|p| p.some.avg10);
                    }
                    if let Some(report) = &report {
                        input.agent_page_cache_bytes = Some(report.meminfo.page_cache_bytes);
                    }
                    // A dry run asks the agent nothing: the gate lets every
                    // inflation through, as it will be logged.
                    if !self.dry_run {
                        input.agent_reclaim = link.agent_reclaim();
                    }
                    inputs.push(input);
                    statuses.insert(vm.name.clone(), status);
                }
                None => debug!("vm {}: skipped this tick", vm.name),
            }
        }
        let thresholds = self.config.host.thresholds();
        let now_s = self.started.elapsed().as_secs();
        let decision = balloon_policy::decide_with(
            self.config.host.policy,
            now_s,
            &host,
            &thresholds,
            &inputs,
            &self.memory,
        );
        if decision.mode != self.memory.mode {
            let psi = host
                .psi_some_avg10
                .map_or(String::new(), |psi| format!(", PSI some avg10 {psi:.1}%"));
            info!(
                "host mode {:?} -> {:?} ({:.1}% available{psi})",
                self.memory.mode, decision.mode, decision.host_available_percent
            );
        }
        // The decision's outputs, applied as they are: the page cache to
        // ask each guest agent to drop (before an inflation the gate holds,
        // or the policy's own drop), then the targets.
        let mut sent = Vec::new();
        for vm in &decision.vms {
            let Some(link) = self.links.get_mut(&vm.name) else {
                continue;
            };
            if vm.agent_reclaim_bytes > 0 && !self.dry_run {
                let why = if vm.held_target_bytes.is_some() {
                    "before inflating"
                } else {
                    "while the host reclaims (the balloon is held)"
                };
                link.ask_reclaim(vm.agent_reclaim_bytes, why);
            }
            if vm.held_target_bytes.is_some() {
                info!(
                    "vm {}: holding the balloon at {} MiB: {}",
                    vm.name,
                    vm.previous_bytes >> 20,
                    vm.reason
                );
                continue;
            }
            if vm.target_bytes == vm.previous_bytes {
                debug!(
                    "vm {}: holding {} MiB: {}",
                    vm.name,
                    vm.target_bytes >> 20,
                    vm.reason
                );
                continue;
            }
            let prefix = if self.dry_run { "[dry-run] " } else { "" };
            info!(
                "{prefix}vm {}: balloon {} MiB -> {} MiB: {}",
                vm.name,
                vm.previous_bytes >> 20,
                vm.target_bytes >> 20,
                vm.reason
            );
            if !self.dry_run && link.send_target(vm.target_bytes) {
                sent.push(vm.name.clone());
            }
        }
        // Targets are applied within the tick (a change is rare once
        // settled, so this wait costs the idle daemon nothing).
        let deadline = Instant::now() + reply_timeout;
        for name in sent {
            if let Some(link) = self.links.get_mut(&name) {
                link.take_target(deadline);
            }
        }
        // The next tick's status requests, sent now on open connections
        // (a closed one is retried at the next tick): their replies wait
        // in the sockets instead of waking this thread.
        for vm in &vms {
            if let Some(link) = self.links.get_mut(&vm.name).filter(|l| l.connected()) {
                link.request_status(&vm.control);
            }
        }
        self.memory = decision.memory.clone();
        if self.metrics.is_some() {
            self.record_metrics(
                &vms,
                &reading,
                &decision,
                &inputs,
                &statuses,
                tick_started.elapsed(),
            );
        }
        if let Some(path) = &self.config.host.state_file {
            let state = StateFile {
                unix_s: now_unix_s,
                dry_run: self.dry_run,
                decision: decision.clone(),
                agents,
                errors: self.errors(),
                tick_ms: u64::try_from(tick_started.elapsed().as_millis()).unwrap_or(u64::MAX),
                host: Some(reading.report()),
            };
            if let Err(error) = state.write(path) {
                warn!("writing the state file {}: {error}", path.display());
            }
        }
        Ok(decision)
    }
}

impl Daemon {
    /// Logs when the host's PSI becomes unavailable, or available again.
    fn log_pressure_source(&mut self, pressure: &PressureReading) {
        let missing = match pressure {
            PressureReading::Read { .. } => None,
            PressureReading::Unavailable { why } => Some(why.clone()),
        };
        if missing != self.psi_missing {
            match &missing {
                Some(why) => {
                    info!("no host PSI: the policy goes by available memory alone ({why})")
                }
                None => info!("host PSI read from {}", pressure.describe()),
            }
            self.psi_missing = missing;
        }
    }

    fn record_metrics(
        &mut self,
        vms: &[ManagedVm],
        reading: &HostReading,
        decision: &Decision,
        inputs: &[VmInput],
        statuses: &BTreeMap<String, StatusReply>,
        duration: Duration,
    ) {
        // By name once, not searched per VM: ticks may have thousands.
        let limits: std::collections::HashMap<&str, u64> = inputs
            .iter()
            .map(|input| (input.name.as_str(), limit_bytes(input)))
            .collect();
        let decisions: std::collections::HashMap<&str, &VmDecision> =
            decision.vms.iter().map(|d| (d.name.as_str(), d)).collect();
        let reports = vms
            .iter()
            .map(|vm| {
                let link = self.links.get(&vm.name);
                crate::metrics::VmReport {
                    name: &vm.name,
                    status: statuses.get(&vm.name),
                    limit_bytes: limits.get(vm.name.as_str()).copied(),
                    decision: decisions.get(vm.name.as_str()).copied(),
                    agent_connected: vm
                        .agent
                        .as_ref()
                        .map(|_| link.is_some_and(VmLink::agent_connected)),
                    faults: link.map(|l| l.faults.counts()).unwrap_or_default(),
                }
            })
            .collect();
        let report = crate::metrics::TickReport {
            host: reading,
            mode: decision.mode,
            vms: reports,
            duration,
            now_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        if let Some(recorder) = self.metrics.as_mut() {
            recorder.record(&report);
        }
    }
}

/// Removes a socket file this process bound when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.0) {
            warn!("removing {}: {error}", self.0.display());
        }
    }
}

/// Runs until SIGINT or SIGTERM; SIGHUP reloads the configuration, keeping
/// the old one when the new file is invalid. A Unix `[metrics]` socket is
/// removed when it stops.
pub fn run(config_path: &Path, dry_run: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    // Signals arrive on a channel, so the loop sleeps until the next tick or
    // a signal, whichever comes first, instead of polling.
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (signal_tx, signal_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal_tx.send(signal).is_err() {
                    break;
                }
            }
        })?;
    info!(
        "managing {} VM(s) every {} s{}",
        managed_vms(&config).len(),
        config.host.interval_s.0,
        if dry_run {
            " (dry run: deciding and logging only)"
        } else {
            ""
        }
    );
    let metrics = match &config.metrics {
        Some(section) => {
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::new()?);
            crate::metrics::serve(&section.listen, metrics.clone())?;
            Some(metrics)
        }
        None => None,
    };
    // A Unix metrics socket goes when the daemon stops, however it stops.
    let _metrics_socket = config
        .metrics
        .as_ref()
        .and_then(|section| match &section.listen {
            MetricsListen::Unix(path) => Some(RemoveOnDrop(path.clone())),
            MetricsListen::Tcp(_) => None,
        });
    let mut daemon = Daemon::new(config, dry_run);
    if let Some(metrics) = &metrics {
        daemon.set_metrics(crate::metrics::Recorder::new(metrics.clone()));
    }
    loop {
        let tick_started = Instant::now();
        if let Err(error) = daemon.tick() {
            error!("tick failed: {error:#}");
        }
        // Paced from the tick's start, so slow peers do not stretch it.
        let next_tick = tick_started + Duration::from_secs(daemon.config().host.interval_s.0);
        loop {
            let left = next_tick.saturating_duration_since(Instant::now());
            match signal_rx.recv_timeout(left) {
                Ok(SIGHUP) => match Config::load(config_path) {
                    Ok(config) => {
                        info!("configuration reloaded from {}", config_path.display());
                        daemon.reload(config);
                        if let Some(metrics) = &metrics {
                            metrics.config_reloaded(true);
                        }
                        break;
                    }
                    Err(error) => {
                        error!("configuration not reloaded, keeping the old one: {error}");
                        if let Some(metrics) = &metrics {
                            metrics.config_reloaded(false);
                        }
                    }
                },
                Ok(_) => {
                    info!("stopping");
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => anyhow::bail!("the signal thread stopped"),
            }
        }
    }
}
