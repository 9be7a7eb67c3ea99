//! Prometheus metrics (`[metrics] listen`): what each tick saw and decided,
//! per VM and for the host, in Prometheus's text format (the `prometheus`
//! crate encodes it; `tiny_http` serves `/metrics`). The daemon records a
//! `TickReport` after every tick; the server thread only encodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use balloon_protocol::control::StatusReply;

use balloon_policy::policy::{Cause, HostMode, VmDecision};
use host_policy_config::config::MetricsListen;

use crate::host_reader::{HostReading, PressureReading};

/// What one VM looked like at a tick.
pub struct VmReport<'a> {
    pub name: &'a str,
    /// The backend's status this tick; None when it did not answer.
    pub status: Option<&'a StatusReply>,
    /// The policy's limit for this VM (its own and the device's, the lower).
    pub limit_bytes: Option<u64>,
    pub decision: Option<&'a VmDecision>,
    /// None when no agent is configured for the VM.
    pub agent_connected: Option<bool>,
    /// host-policy's own fault counters for the VM (cumulative).
    pub faults: BTreeMap<String, u64>,
}

/// What one tick saw and decided.
pub struct TickReport<'a> {
    pub host: &'a HostReading,
    pub mode: HostMode,
    pub vms: Vec<VmReport<'a>>,
    pub duration: Duration,
    pub now_unix_ms: u64,
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let metric = IntGauge::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let metric = IntCounter::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// Every metric host-policy serves.
pub struct Metrics {
    registry: Registry,
    vm_gauges: Vec<IntGaugeVec>,
    guest_ram: IntGaugeVec,
    target: IntGaugeVec,
    actual: IntGaugeVec,
    resident: IntGaugeVec,
    returned: IntGaugeVec,
    limit: IntGaugeVec,
    guest_free: IntGaugeVec,
    guest_available: IntGaugeVec,
    guest_cache: IntGaugeVec,
    stats_age: IntGaugeVec,
    backend_up: IntGaugeVec,
    agent_up: IntGaugeVec,
    guest_attached: IntGaugeVec,
    pinned: IntGaugeVec,
    pressure_events: IntCounterVec,
    target_changes: IntCounterVec,
    policy_errors: IntCounterVec,
    backend_errors: IntCounterVec,
    host_mode: IntGaugeVec,
    host_available: IntGauge,
    host_total: IntGauge,
    host_returned: IntGauge,
    /// No labels: absent while unknown.
    host_psi: GaugeVec,
    /// No labels: only with a cgroup source.
    host_oom_kills: IntCounterVec,
    host_source: IntGaugeVec,
    tick_duration: Histogram,
    ticks: IntCounter,
    reloads: IntCounter,
    reload_failures: IntCounter,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let vm = &["vm"];
        let guest_ram = gauge_vec(&r, "balloon_vm_guest_ram_bytes", "Guest RAM of the VM.", vm)?;
        let target = gauge_vec(
            &r,
            "balloon_vm_target_bytes",
            "Balloon target: memory asked of the guest.",
            vm,
        )?;
        let actual = gauge_vec(
            &r,
            "balloon_vm_actual_bytes",
            "Balloon size the guest reports having reached.",
            vm,
        )?;
        let resident = gauge_vec(
            &r,
            "balloon_vm_host_resident_bytes",
            "Guest RAM allocated on the host, measured on its memory file.",
            vm,
        )?;
        let returned = gauge_vec(
            &r,
            "balloon_vm_returned_bytes",
            "Host memory the balloon freed for pages still in it.",
            vm,
        )?;
        let limit = gauge_vec(
            &r,
            "balloon_vm_limit_bytes",
            "Largest balloon the policy may set for the VM.",
            vm,
        )?;
        let guest_free = gauge_vec(
            &r,
            "balloon_vm_guest_free_bytes",
            "Guest free memory in the last statistics.",
            vm,
        )?;
        let guest_available = gauge_vec(
            &r,
            "balloon_vm_guest_available_bytes",
            "Guest available memory in the last statistics.",
            vm,
        )?;
        let guest_cache = gauge_vec(
            &r,
            "balloon_vm_guest_cache_bytes",
            "Guest page cache in the last statistics.",
            vm,
        )?;
        let stats_age = gauge_vec(
            &r,
            "balloon_vm_stats_age_seconds",
            "Age of the last guest statistics.",
            vm,
        )?;
        let backend_up = gauge_vec(
            &r,
            "balloon_vm_backend_up",
            "1 when the VM's balloon-backend answered this tick.",
            vm,
        )?;
        let agent_up = gauge_vec(
            &r,
            "balloon_vm_agent_up",
            "1 when the VM's guest agent is connected (VMs with an agent only).",
            vm,
        )?;
        let guest_attached = gauge_vec(
            &r,
            "balloon_vm_guest_attached",
            "1 when a guest is attached to the backend.",
            vm,
        )?;
        let pinned = gauge_vec(
            &r,
            "balloon_vm_pinned",
            "1 when an operator pinned the target (balloonctl set).",
            vm,
        )?;
        let pressure_events = counter_vec(
            &r,
            "balloon_vm_pressure_events_total",
            "Ticks at which the guest showed memory pressure.",
            vm,
        )?;
        let target_changes = counter_vec(
            &r,
            "balloon_vm_target_changes_total",
            "Targets host-policy set, by direction and cause.",
            &["vm", "direction", "cause"],
        )?;
        let policy_errors = counter_vec(
            &r,
            "balloon_vm_policy_errors_total",
            "host-policy's faults talking to the VM's backend and agent, by kind.",
            &["vm", "kind"],
        )?;
        let backend_errors = counter_vec(
            &r,
            "balloon_vm_backend_errors_total",
            "The backend's own fault counters (its status errors), by kind.",
            &["vm", "kind"],
        )?;
        let host_mode = gauge_vec(
            &r,
            "balloon_host_mode",
            "1 for the host's current policy mode.",
            &["mode"],
        )?;
        let host_available = gauge(
            &r,
            "balloon_host_memory_available_bytes",
            "Host MemAvailable at the last tick.",
        )?;
        let host_total = gauge(
            &r,
            "balloon_host_memory_total_bytes",
            "Host MemTotal at the last tick.",
        )?;
        let host_returned = gauge(
            &r,
            "balloon_host_returned_bytes",
            "Host memory returned by all balloons.",
        )?;
        let host_psi = GaugeVec::new(
            Opts::new(
                "balloon_host_memory_pressure_some_avg10",
                "The host's memory PSI, some avg10, in percent (absent when not read).",
            ),
            &[],
        )?;
        r.register(Box::new(host_psi.clone()))?;
        let host_oom_kills = counter_vec(
            &r,
            "balloon_host_cgroup_oom_kills_total",
            "OOM kills in the host cgroup (a cgroup source only).",
            &[],
        )?;
        let host_source = gauge_vec(
            &r,
            "balloon_host_source_info",
            "1 for where the host is read: source (meminfo, cgroup_v1, cgroup_v2), its path, and the PSI file (none: no PSI).",
            &["source", "path", "pressure"],
        )?;
        let tick_duration = Histogram::with_opts(
            HistogramOpts::new(
                "balloon_policy_tick_duration_seconds",
                "Time one tick took, from reading the host to its last reply.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
            ]),
        )?;
        r.register(Box::new(tick_duration.clone()))?;
        let ticks = counter(&r, "balloon_policy_ticks_total", "Policy ticks run.")?;
        let reloads = counter(
            &r,
            "balloon_policy_config_reloads_total",
            "Configurations reloaded on SIGHUP.",
        )?;
        let reload_failures = counter(
            &r,
            "balloon_policy_config_reload_failures_total",
            "SIGHUP reloads refused (the old configuration stayed).",
        )?;
        Ok(Metrics {
            vm_gauges: vec![
                guest_ram.clone(),
                target.clone(),
                actual.clone(),
                resident.clone(),
                returned.clone(),
                limit.clone(),
                guest_free.clone(),
                guest_available.clone(),
                guest_cache.clone(),
                stats_age.clone(),
                backend_up.clone(),
                agent_up.clone(),
                guest_attached.clone(),
                pinned.clone(),
            ],
            registry: r,
            guest_ram,
            target,
            actual,
            resident,
            returned,
            limit,
            guest_free,
            guest_available,
            guest_cache,
            stats_age,
            backend_up,
            agent_up,
            guest_attached,
            pinned,
            pressure_events,
            target_changes,
            policy_errors,
            backend_errors,
            host_mode,
            host_available,
            host_total,
            host_returned,
            host_psi,
            host_oom_kills,
            host_source,
            tick_duration,
            ticks,
            reloads,
            reload_failures,
        })
    }

    /// The text format, as served at `/metrics`.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            warn!("encoding metrics: {error}");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }

    pub fn config_reloaded(&self, ok: bool) {
        if ok {
            self.reloads.inc()
        } else {
            self.reload_failures.inc()
        }
    }
}

/// The label values of a series without labels.
const NO_LABELS: &[&str] = &[];

fn set(gauge: &IntGaugeVec, vm: &str, value: Option<u64>) {
    match value {
        Some(value) => gauge
            .with_label_values(&[vm])
            .set(i64::try_from(value).unwrap_or(i64::MAX)),
        // Unknown this tick: no sample rather than a made-up one.
        None => {
            let _absent = gauge.remove_label_values(&[vm]);
        }
    }
}

/// Turns the daemon's ticks into metrics; counters that come as totals
/// (fault counts, the backend's errors) become increments here.
pub struct Recorder {
    metrics: Arc<Metrics>,
    /// Last seen totals by (metric, vm, kind).
    totals: BTreeMap<(&'static str, String, String), u64>,
    /// Label sets of multi-label counters, by VM, to drop when a VM goes.
    series: BTreeMap<String, BTreeSet<(&'static str, Vec<String>)>>,
    /// The labels of `balloon_host_source_info` now.
    source: Option<[String; 3]>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Recorder {
        Recorder {
            metrics,
            totals: BTreeMap::new(),
            series: BTreeMap::new(),
            source: None,
        }
    }

    /// Adds what a cumulative total gained since the last tick (all of it
    /// when it went down: the source restarted).
    fn add_total(
        &mut self,
        metric: &'static str,
        counters: &IntCounterVec,
        vm: &str,
        kind: &str,
        total: u64,
    ) {
        let last = self
            .totals
            .insert((metric, vm.to_string(), kind.to_string()), total)
            .unwrap_or(0);
        let gained = if total >= last { total - last } else { total };
        counters.with_label_values(&[vm, kind]).inc_by(gained);
        self.series
            .entry(vm.to_string())
            .or_default()
            .insert((metric, vec![vm.to_string(), kind.to_string()]));
    }

    fn forget_vm(&mut self, vm: &str) {
        let m = &self.metrics;
        for gauge in &m.vm_gauges {
            let _absent = gauge.remove_label_values(&[vm]);
        }
        let _absent = m.pressure_events.remove_label_values(&[vm]);
        for (metric, labels) in self.series.remove(vm).unwrap_or_default() {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            let family = match metric {
                "target_changes" => &m.target_changes,
                "policy_errors" => &m.policy_errors,
                _ => &m.backend_errors,
            };
            let _absent = family.remove_label_values(&labels);
        }
        self.totals.retain(|(_, name, _), _| name != vm);
    }

    fn record_host(&mut self, host: &HostReading) {
        let metrics = self.metrics.clone();
        let m = &*metrics;
        m.host_available
            .set(i64::try_from(host.state.available_bytes).unwrap_or(i64::MAX));
        m.host_total
            .set(i64::try_from(host.state.total_bytes).unwrap_or(i64::MAX));
        match host.state.psi_some_avg10 {
            Some(psi) => m.host_psi.with_label_values(NO_LABELS).set(psi),
            None => {
                let _absent = m.host_psi.remove_label_values(NO_LABELS);
            }
        }
        let pressure = match &host.pressure {
            PressureReading::Read { path, .. } => path.display().to_string(),
            PressureReading::Unavailable { .. } => "none".to_string(),
        };
        let labels = [
            host.kind.label().to_string(),
            host.path.display().to_string(),
            pressure,
        ];
        if self.source.as_ref() != Some(&labels) {
            // A new source (a reload): the old one's series go, and its
            // OOM count starts again.
            m.host_source.reset();
            m.host_source
                .with_label_values(&[&labels[0], &labels[1], &labels[2]])
                .set(1);
            let _absent = m.host_oom_kills.remove_label_values(NO_LABELS);
            self.totals
                .remove(&("host_oom_kills", String::new(), String::new()));
            self.source = Some(labels);
        }
        match host.cgroup_oom_kills {
            Some(total) => {
                let last = self
                    .totals
                    .insert(("host_oom_kills", String::new(), String::new()), total);
                // All of it at first sight (the series starts there) or
                // after a reset.
                let gained = match last {
                    Some(last) if total >= last => total - last,
                    _ => total,
                };
                m.host_oom_kills.with_label_values(NO_LABELS).inc_by(gained);
            }
            None => {
                let _absent = m.host_oom_kills.remove_label_values(NO_LABELS);
                self.totals
                    .remove(&("host_oom_kills", String::new(), String::new()));
            }
        }
    }

    pub fn record(&mut self, tick: &TickReport<'_>) {
        let metrics = self.metrics.clone();
        let m = &*metrics;
        m.ticks.inc();
        m.tick_duration.observe(tick.duration.as_secs_f64());
        for mode in [HostMode::Normal, HostMode::Reclaim, HostMode::Hard] {
            let name = format!("{mode:?}").to_lowercase();
            m.host_mode
                .with_label_values(&[&name])
                .set(i64::from(mode == tick.mode));
        }
        self.record_host(tick.host);
        let present: BTreeSet<&str> = tick.vms.iter().map(|vm| vm.name).collect();
        let gone: Vec<String> = self
            .series
            .keys()
            .filter(|vm| !present.contains(vm.as_str()))
            .cloned()
            .collect();
        for vm in gone {
            info!("vm {vm}: gone; its metrics are dropped");
            self.forget_vm(&vm);
        }
        let mut returned_total = 0u64;
        for vm in &tick.vms {
            self.series.entry(vm.name.to_string()).or_default();
            let name = vm.name;
            let status = vm.status;
            let stats = status.and_then(|s| s.stats.as_ref());
            set(&m.backend_up, name, Some(u64::from(status.is_some())));
            set(&m.guest_ram, name, status.map(|s| s.guest_ram_bytes));
            set(&m.target, name, status.map(|s| s.target_bytes));
            set(&m.actual, name, status.map(|s| s.actual_bytes));
            set(
                &m.resident,
                name,
                status.and_then(|s| s.guest_ram_resident_bytes),
            );
            set(&m.returned, name, status.map(|s| s.discarded_bytes));
            set(&m.limit, name, vm.limit_bytes);
            set(&m.guest_free, name, stats.and_then(|s| s.free_bytes));
            set(
                &m.guest_available,
                name,
                stats.and_then(|s| s.available_bytes),
            );
            set(
                &m.guest_cache,
                name,
                stats.and_then(|s| s.disk_caches_bytes),
            );
            set(
                &m.stats_age,
                name,
                stats.map(|s| tick.now_unix_ms.saturating_sub(s.updated_unix_ms) / 1000),
            );
            set(&m.agent_up, name, vm.agent_connected.map(u64::from));
            set(
                &m.guest_attached,
                name,
                status.map(|s| u64::from(s.connected)),
            );
            set(&m.pinned, name, status.map(|s| u64::from(s.pinned)));
            returned_total = returned_total.saturating_add(status.map_or(0, |s| s.discarded_bytes));
            let pressure = m.pressure_events.with_label_values(&[name]);
            if let Some(decision) = vm.decision {
                if decision.pressure {
                    pressure.inc();
                }
                if decision.target_bytes != decision.previous_bytes && decision.cause != Cause::Hold
                {
                    let direction = if decision.target_bytes > decision.previous_bytes {
                        "inflate"
                    } else {
                        "deflate"
                    };
                    let labels = [name, direction, decision.cause.name()];
                    m.target_changes.with_label_values(&labels).inc();
                    self.series.entry(name.to_string()).or_default().insert((
                        "target_changes",
                        labels.iter().map(|l| l.to_string()).collect(),
                    ));
                }
            }
            for (kind, total) in &vm.faults {
                self.add_total("policy_errors", &m.policy_errors, name, kind, *total);
            }
            if let Some(status) = status {
                for (kind, total) in &status.errors {
                    self.add_total("backend_errors", &m.backend_errors, name, kind, *total);
                }
            }
        }
        m.host_returned
            .set(i64::try_from(returned_total).unwrap_or(i64::MAX));
    }
}

/// Serves `/metrics` on its own thread until the process ends.
pub fn serve(listen: &MetricsListen, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let server = match listen {
        MetricsListen::Tcp(address) => tiny_http::Server::http(address),
        MetricsListen::Unix(path) => {
            // A socket file left by an earlier run would make bind fail.
            if std::fs::symlink_metadata(path)
                .is_ok_and(|meta| std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()))
            {
                std::fs::remove_file(path)?;
            }
            tiny_http::Server::http_unix(path)
        }
    }
    .map_err(|error| anyhow::anyhow!("[metrics] listen = {listen}: {error}"))?;
    info!("serving metrics at {listen}");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, body, content_type) = match (request.method(), request.url()) {
                    (tiny_http::Method::Get, "/metrics") => (
                        200,
                        metrics.encode(),
                        TextEncoder::new().format_type().to_string(),
                    ),
                    (tiny_http::Method::Get, _) => (
                        404,
                        "not found: metrics are at /metrics\n".to_string(),
                        "text/plain".to_string(),
                    ),
                    _ => (
                        405,
                        "only GET /metrics\n".to_string(),
                        "text/plain".to_string(),
                    ),
                };
                let mut response = tiny_http::Response::from_string(body).with_status_code(status);
                if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", content_type) {
                    response.add_header(header);
                }
                if let Err(error) = request.respond(response) {
                    warn!("answering a metrics request: {error}");
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_reader::SourceKind;
    use balloon_policy::policy::HostState;
    use std::path::PathBuf;

    fn status(target: u64, errors: &[(&str, u64)]) -> StatusReply {
        StatusReply {
            ok: true,
            connected: true,
            guest_ram_bytes: 512 << 20,
            target_bytes: target,
            discarded_bytes: target,
            errors: errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..StatusReply::default()
        }
    }

    fn decision(previous: u64, target: u64, cause: Cause) -> VmDecision {
        VmDecision {
            name: "web".into(),
            previous_bytes: previous,
            target_bytes: target,
            pressure: cause == Cause::Pressure,
            reason: String::new(),
            cause,
            reclaim_cache_bytes: 0,
            agent_reclaim_bytes: 0,
            held_target_bytes: None,
        }
    }

    fn host(
        kind: SourceKind,
        psi: Option<f64>,
        oom_kills: Option<u64>,
    ) -> crate::host_reader::HostReading {
        crate::host_reader::HostReading {
            kind,
            path: PathBuf::from("/sys/fs/cgroup/machine.slice"),
            state: HostState {
                total_bytes: 8 << 30,
                available_bytes: 1 << 30,
                psi_some_avg10: psi,
            },
            cgroup: None,
            cgroup_oom_kills: oom_kills,
            pressure: match psi {
                Some(psi) => PressureReading::Read {
                    path: PathBuf::from("/sys/fs/cgroup/machine.slice/memory.pressure"),
                    note: None,
                    pressure: crate::host_memory::Pressure {
                        some_avg10: psi,
                        full_avg10: None,
                    },
                },
                None => PressureReading::Unavailable { why: "test".into() },
            },
        }
    }

    fn tick<'a>(vms: Vec<VmReport<'a>>) -> TickReport<'a> {
        at(&MEMINFO_HOST, vms)
    }

    static MEMINFO_HOST: std::sync::LazyLock<crate::host_reader::HostReading> =
        std::sync::LazyLock::new(|| host(SourceKind::Meminfo, None, None));

    fn at<'a>(host: &'a crate::host_reader::HostReading, vms: Vec<VmReport<'a>>) -> TickReport<'a> {
        TickReport {
            host,
            mode: HostMode::Reclaim,
            vms,
            duration: Duration::from_millis(3),
            now_unix_ms: 0,
        }
    }

    fn sample(text: &str, line_start: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn the_host_source_its_psi_and_its_cgroups_oom_kills_are_series() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut recorder = Recorder::new(metrics.clone());
        recorder.record(&tick(Vec::new()));
        let text = metrics.encode();
        assert!(
            text.contains("balloon_host_source_info{path=\"/sys/fs/cgroup/machine.slice\",pressure=\"none\",source=\"meminfo\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("balloon_host_memory_pressure_some_avg10 "),
            "{text}"
        );
        assert!(
            !text.contains("balloon_host_cgroup_oom_kills_total "),
            "{text}"
        );
        let cgroup = host(SourceKind::CgroupV2, Some(12.5), Some(3));
        recorder.record(&at(&cgroup, Vec::new()));
        let later = host(SourceKind::CgroupV2, Some(0.5), Some(5));
        recorder.record(&at(&later, Vec::new()));
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "balloon_host_memory_pressure_some_avg10 "),
            Some(0.5),
            "{text}"
        );
        assert_eq!(
            sample(&text, "balloon_host_cgroup_oom_kills_total "),
            Some(5.0),
            "{text}"
        );
        assert!(text.contains("source=\"cgroup_v2\"} 1"), "{text}");
        assert!(!text.contains("source=\"meminfo\""), "{text}");
        // Back to meminfo (a reload): the cgroup's series go.
        recorder.record(&tick(Vec::new()));
        let text = metrics.encode();
        assert!(
            !text.contains("balloon_host_cgroup_oom_kills_total "),
            "{text}"
        );
        assert!(!text.contains("source=\"cgroup_v2\""), "{text}");
    }

    #[test]
    fn ticks_become_gauges_counters_and_a_histogram() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut recorder = Recorder::new(metrics.clone());
        let first = status(64 << 20, &[("pfn_outside_ram", 3)]);
        let d = decision(0, 64 << 20, Cause::Reclaim);
        recorder.record(&tick(vec![VmReport {
            name: "web",
            status: Some(&first),
            limit_bytes: Some(332 << 20),
            decision: Some(&d),
            agent_connected: None,
            faults: BTreeMap::from([("backend_read_timeouts".to_string(), 2)]),
        }]));
        let second = status(64 << 20, &[("pfn_outside_ram", 5)]);
        let d = decision(64 << 20, 32 << 20, Cause::Pressure);
        recorder.record(&tick(vec![VmReport {
            name: "web",
            status: Some(&second),
            limit_bytes: Some(332 << 20),
            decision: Some(&d),
            agent_connected: Some(false),
            faults: BTreeMap::from([("backend_read_timeouts".to_string(), 2)]),
        }]));
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "balloon_vm_target_bytes{vm=\"web\"}"),
            Some((64u64 << 20) as f64),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "balloon_vm_backend_errors_total{kind=\"pfn_outside_ram\",vm=\"web\"}"
            ),
            Some(5.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "balloon_vm_policy_errors_total{kind=\"backend_read_timeouts\",vm=\"web\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(sample(&text, "balloon_vm_target_changes_total{cause=\"pressure\",direction=\"deflate\",vm=\"web\"}"), Some(1.0), "{text}");
        assert_eq!(
            sample(&text, "balloon_vm_pressure_events_total{vm=\"web\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "balloon_host_mode{mode=\"reclaim\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "balloon_policy_tick_duration_seconds_count"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "balloon_vm_agent_up{vm=\"web\"}"),
            Some(0.0),
            "{text}"
        );

        // The VM goes: its series go with it.
        recorder.record(&tick(Vec::new()));
        let text = metrics.encode();
        assert!(!text.contains("vm=\"web\""), "{text}");
        assert_eq!(
            sample(&text, "balloon_policy_ticks_total"),
            Some(3.0),
            "{text}"
        );
    }
}
