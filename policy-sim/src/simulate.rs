//! `host-policy simulate`: the same policies on a synthetic host. Each VM's
//! workload follows curves of working set and page cache over time; the
//! guest model (`guest_model`) runs every guest one second at a time (free
//! page reporting, the balloon driver, deflate-on-OOM, swap and stalls) and
//! reports statistics as a guest would; the policy decides every tick. One
//! run writes a CSV and an SVG; `--compare` runs every policy on the same
//! scenario and measures them (`Metrics`), a scenario with a `[density]`
//! table finds each policy's safe density, and `--family` (`family`)
//! generates whole distributions of scenarios.

use std::path::Path;

use balloon_policy::policy::{AgentReclaim, GuestSample, HostState, PolicyMemory, VmInput};
use balloon_policy::{PolicyKind, VmPolicy, MIB};
use host_policy_config::config::{self, HostSection, VmSettings};
use plotters::prelude::*;
use serde::Deserialize;

use crate::guest_model::{Features, Guest as Model, Want};
use crate::plot::{grid_svg, Line, Panel};
use crate::SimError;

/// Piecewise-linear curve of (seconds, MiB) points.
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct Curve(pub Vec<(f64, f64)>);

impl Curve {
    pub fn at(&self, t: f64) -> f64 {
        let points = &self.0;
        let Some(&(first_x, first_y)) = points.first() else {
            return 0.0;
        };
        if t < first_x {
            return first_y;
        }
        for pair in points.windows(2) {
            if let [(x0, y0), (x1, y1)] = *pair {
                if t < x1 {
                    if x1 <= x0 {
                        return y1;
                    }
                    return y0 + (y1 - y0) * (t - x0) / (x1 - x0);
                }
            }
        }
        points.last().map_or(0.0, |p| p.1)
    }
}

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimVm {
    pub name: String,
    pub ram_mib: u64,
    /// The workload's anonymous memory over time.
    pub working_set_mib: Curve,
    /// The page cache the workload would keep (reclaimable); none by
    /// default.
    #[serde(default)]
    pub cache_mib: Option<Curve>,
    /// The part of that cache the workload keeps reading (re-read while it
    /// does not fit); none by default.
    #[serde(default)]
    pub hot_cache_mib: Option<Curve>,
    /// The guest's swap: working set that does not fit goes there; past
    /// it, deflate-on-OOM, then an OOM kill.
    #[serde(default)]
    pub swap_mib: u64,
    /// When the VM starts (it uses no host memory before)...
    #[serde(default)]
    pub start_s: u64,
    /// ...and VM k of `count` this many seconds later still.
    #[serde(default)]
    pub start_every_s: u64,
    /// Identical VMs of this kind (named `<name>-<k>`).
    #[serde(default = "one")]
    pub count: u64,
    /// VM k of `count` runs its curves this many seconds ahead of VM 0...
    #[serde(default)]
    pub phase_shift_s: f64,
    /// ...and its curves repeat with this period.
    #[serde(default)]
    pub period_s: Option<f64>,
    /// The guest reports freed memory to the host (default true).
    #[serde(default = "yes")]
    pub free_page_reporting: bool,
    /// The guest's balloon driver deflates before an OOM kill (default
    /// true).
    #[serde(default = "yes")]
    pub deflate_on_oom: bool,
    /// The guest runs the guest agent: its PSI reaches the policy.
    #[serde(default)]
    pub agent: bool,
    /// Seconds over which the workload's cold page cache builds up the
    /// first time (it reads new files now and then): 600 by default, 1 for
    /// a workload that reads all of it at the start (at the disk's pace)...
    #[serde(default)]
    pub cache_fill_s: Option<u64>,
    /// ...and over which cold cache it lost (to a balloon, or to the guest
    /// agent) comes back: 600 by default.
    #[serde(default)]
    pub cache_refill_s: Option<u64>,
    /// Policy settings, as in host-policy.toml's `[defaults]`.
    #[serde(default)]
    pub policy: VmSettings,
}

/// `[density]`: find how many VMs of one kind the host holds safely.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DensitySearch {
    /// The `[[vm]]` whose `count` is searched.
    pub vm: String,
    /// The search stops here.
    pub max_count: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub duration_s: u64,
    #[serde(default = "default_tick")]
    pub tick_s: u64,
    pub host_total_mib: u64,
    /// Memory used on the host by everything but the VMs.
    pub host_other_mib: Curve,
    #[serde(default)]
    pub host: Option<HostSection>,
    #[serde(default)]
    pub defaults: VmSettings,
    pub vm: Vec<SimVm>,
    #[serde(default)]
    pub density: Option<DensitySearch>,
}

fn default_tick() -> u64 {
    5
}

/// The largest sizes a scenario may give, so that no product of them
/// overflows: 16 TiB of host or guest memory or swap, 100,000 VMs of one
/// kind, 30 days.
pub const MAX_MIB: u64 = 16 << 20;
pub const MAX_COUNT: u64 = 100_000;
pub const MAX_DURATION_S: u64 = 30 * 24 * 3600;

impl Scenario {
    /// The checks `host-policy check` makes of a configuration, plus the
    /// scenario's own: a run that means nothing is refused, not plotted.
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_s == 0 {
            return Err("tick_s must be at least 1 (seconds between ticks)".into());
        }
        if self.duration_s < self.tick_s {
            return Err(format!(
                "duration_s ({}) must be at least tick_s ({})",
                self.duration_s, self.tick_s
            ));
        }
        if self.duration_s > MAX_DURATION_S {
            return Err(format!(
                "duration_s ({}) must be at most {MAX_DURATION_S} (30 days)",
                self.duration_s
            ));
        }
        if self.host_total_mib == 0 || self.host_total_mib > MAX_MIB {
            return Err(format!(
                "host_total_mib must be between 1 and {MAX_MIB}, got {}",
                self.host_total_mib
            ));
        }
        if self.vm.is_empty() {
            return Err("no VMs: add [[vm]] entries (name, ram_mib, working_set_mib)".into());
        }
        if let Some(host) = &self.host {
            config::check_host(host).map_err(|(_, message)| message)?;
        }
        let defaults = config::resolve(&self.defaults, &VmPolicy::default());
        config::check_steps("defaults", &defaults)?;
        if let Some(density) = &self.density {
            if !self.vm.iter().any(|vm| vm.name == density.vm) {
                return Err(format!(
                    "[density] vm {:?} is not a [[vm]] of the scenario",
                    density.vm
                ));
            }
            if density.max_count == 0 || density.max_count > MAX_COUNT {
                return Err(format!(
                    "[density] max_count must be between 1 and {MAX_COUNT}, got {}",
                    density.max_count
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        let mut total_count: u64 = 0;
        for vm in &self.vm {
            if vm.count == 0 || vm.count > MAX_COUNT {
                return Err(format!(
                    "vm {:?}: count must be between 1 and {MAX_COUNT}, got {}",
                    vm.name, vm.count
                ));
            }
            total_count = total_count.saturating_add(vm.count);
            if vm.period_s.is_some_and(|p| !(p > 0.0 && p.is_finite())) {
                return Err(format!("vm {:?}: period_s must be above 0", vm.name));
            }
            if !vm.phase_shift_s.is_finite() {
                return Err(format!("vm {:?}: phase_shift_s must be a number", vm.name));
            }
            config::check_vm_name(&vm.name)?;
            if !names.insert(vm.name.as_str()) {
                return Err(format!("vm name {:?} appears twice", vm.name));
            }
            if vm.ram_mib == 0 || vm.ram_mib > MAX_MIB {
                return Err(format!(
                    "vm {:?}: ram_mib must be between 1 and {MAX_MIB}, got {}",
                    vm.name, vm.ram_mib
                ));
            }
            if vm.swap_mib > MAX_MIB {
                return Err(format!(
                    "vm {:?}: swap_mib must be at most {MAX_MIB}, got {}",
                    vm.name, vm.swap_mib
                ));
            }
            for (key, value) in [
                ("cache_fill_s", vm.cache_fill_s),
                ("cache_refill_s", vm.cache_refill_s),
            ] {
                if value.is_some_and(|s| s == 0 || s > MAX_DURATION_S) {
                    return Err(format!(
                        "vm {:?}: {key} must be between 1 and {MAX_DURATION_S}",
                        vm.name
                    ));
                }
            }
            if vm.start_s > MAX_DURATION_S || vm.start_every_s > MAX_DURATION_S {
                return Err(format!(
                    "vm {:?}: start_s and start_every_s must be at most {MAX_DURATION_S}",
                    vm.name
                ));
            }
            let policy = config::resolve(&vm.policy, &defaults);
            config::check_steps(&format!("vm {:?}", vm.name), &policy)?;
        }
        let searched = self.density.as_ref().map_or(0, |d| d.max_count);
        if total_count.saturating_add(searched) > MAX_COUNT {
            return Err(format!(
                "the scenario has {total_count} VMs (and a density search up to {searched}): at most {MAX_COUNT}"
            ));
        }
        Ok(())
    }
}

/// One row of the simulation's output (one per tick).
#[derive(Clone, Debug)]
pub struct Sample {
    pub t_s: u64,
    pub host_available_mib: f64,
    /// Memory the balloons hold (returned to the host).
    pub returned_mib: f64,
    /// Working set that did not fit in its guest, summed over the VMs.
    pub missing_working_set_mib: f64,
    /// The guests' resident working sets and page caches, summed.
    pub working_set_mib: f64,
    pub cache_mib: f64,
    /// The guests' stall shares of this second, summed (VMs stalled).
    pub stalled_vms: f64,
    pub balloon_mib: Vec<f64>,
    pub guest_free_mib: Vec<f64>,
}

/// What decides between policies, for one run. Counted every second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Seconds the host's available memory was below its hard threshold
    /// (the host would swap).
    pub overload_s: u64,
    /// Guest stall VM-seconds: each second, the share of it some task of
    /// the guest stalled on memory (`guest_model`), summed over the VMs.
    pub pressure_vm_s: f64,
    /// VM-seconds run.
    pub vm_s: u64,
    pub oom_kills: u64,
    /// Out-of-memory events the guests' balloons answered by deflating
    /// (1 MiB each).
    pub oom_deflate_events: u64,
    /// Memory the balloons held, integrated over time.
    pub returned_gib_s: f64,
    /// Balloon target changes.
    pub target_changes: u64,
    /// The lowest host available memory, percent of the total.
    pub min_available_percent: f64,
}

impl Metrics {
    pub fn pressure_percent(&self) -> f64 {
        if self.vm_s == 0 {
            0.0
        } else {
            self.pressure_vm_s * 100.0 / self.vm_s as f64
        }
    }

    /// Safe: no overload, no OOM kill, pressure under 1 % of VM-seconds.
    pub fn safe(&self) -> bool {
        self.overload_s == 0 && self.oom_kills == 0 && self.pressure_percent() < 1.0
    }

    /// The harm a run did, in one number: host overload seconds, guest
    /// stall VM-seconds and OOM kills, added.
    pub fn harm(&self) -> f64 {
        self.overload_s as f64 + self.pressure_vm_s + self.oom_kills as f64
    }
}

/// One VM of the run (a `[[vm]]` with `count` gives several).
struct Guest<'a> {
    name: String,
    spec: &'a SimVm,
    start_s: u64,
    offset_s: f64,
    policy: VmPolicy,
}

impl Guest<'_> {
    fn want(&self, t: f64) -> Want {
        let mut local = t - self.start_s as f64 + self.offset_s;
        if let Some(period) = self.spec.period_s {
            local = local.rem_euclid(period);
        }
        let mib = |curve: &Curve| (curve.at(local).max(0.0) * MIB as f64) as u64;
        Want {
            working_set_bytes: mib(&self.spec.working_set_mib),
            cache_bytes: self.spec.cache_mib.as_ref().map_or(0, mib),
            hot_cache_bytes: self.spec.hot_cache_mib.as_ref().map_or(0, mib),
        }
    }

    fn model(&self) -> Model {
        Model::new(
            self.spec.ram_mib.saturating_mul(MIB),
            self.spec.swap_mib.saturating_mul(MIB),
            Features {
                free_page_reporting: self.spec.free_page_reporting,
                deflate_on_oom: self.spec.deflate_on_oom,
            },
        )
        .with_cold_cache_pace(
            self.spec
                .cache_fill_s
                .unwrap_or(crate::guest_model::COLD_CACHE_FILL_S),
            self.spec
                .cache_refill_s
                .unwrap_or(crate::guest_model::COLD_CACHE_FILL_S),
        )
    }

    /// The policy's view of the guest: the backend's status and the
    /// guest's statistics, fresh at every tick; its agent (`agent_model`)
    /// last dropped cache `reclaim_done_s_ago` seconds ago (None: never).
    fn input(
        &self,
        model: &Model,
        agent_model: AgentModel,
        reclaim_done_s_ago: Option<u64>,
    ) -> VmInput {
        let ram = model.ram_bytes();
        VmInput {
            name: self.name.clone(),
            guest_ram_bytes: ram,
            target_bytes: model.target_bytes(),
            actual_bytes: model.balloon_bytes(),
            device_max_reclaim_bytes: ram / 100 * 75,
            sample: Some(GuestSample {
                available_bytes: model.available_bytes(),
                free_bytes: Some(model.free_bytes()),
                counters: model.counters(),
                age_s: 0,
                psi_some_avg10: self.spec.agent.then(|| model.psi_some_avg10()),
                balloon_bytes: Some(model.balloon_bytes()),
            }),
            policy: self.policy.clone(),
            pinned: false,
            free_page_reporting: Some(self.spec.free_page_reporting),
            resident_bytes: Some(model.resident_bytes()),
            agent_page_cache_bytes: self.spec.agent.then(|| model.cache_bytes()),
            // The modelled agent answers a reclaim within the second: none
            // is ever in flight at a tick.
            agent_reclaim: match agent_model {
                AgentModel::AsTheDaemonAsks if self.spec.agent => AgentReclaim::Idle {
                    done_s_ago: reclaim_done_s_ago,
                },
                _ => AgentReclaim::Unavailable,
            },
        }
    }
}

fn guests<'a>(scenario: &'a Scenario, defaults: &VmPolicy) -> Vec<Guest<'a>> {
    scenario
        .vm
        .iter()
        .flat_map(|spec| {
            let policy = config::resolve(&spec.policy, defaults);
            (0..spec.count).map(move |k| Guest {
                name: if spec.count == 1 {
                    spec.name.clone()
                } else {
                    format!("{}-{k}", spec.name)
                },
                spec,
                start_s: spec
                    .start_s
                    .saturating_add(k.saturating_mul(spec.start_every_s)),
                offset_s: k as f64 * spec.phase_shift_s,
                policy: policy.clone(),
            })
        })
        .collect()
}

/// How the guests' agents meet the policy's requests to drop page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentModel {
    /// As the simulator has always modelled them (and its documented
    /// results were measured): an agent drops all the cache a policy asks
    /// for (`reclaim_cache_bytes`), every tick, and no inflation waits for
    /// it. The daemon's guest-agent gate is not run.
    AtOnce,
    /// As the daemon asks them (balloon-policy's `gate`, the same code):
    /// an inflation of a guest with enough cache waits a tick while its
    /// agent drops that much first, and the policy's drops are paced and
    /// halved. The agent answers within the second.
    AsTheDaemonAsks,
}

/// The agent model of every run (`run_with`): the daemon's own gate, so
/// the simulator runs what the daemon runs. (Measured on the goal family,
/// seed 26: ours' median safe density 1.46x the best baseline's; 1.50x
/// with `AtOnce`.)
pub const AGENT_MODEL: AgentModel = AgentModel::AsTheDaemonAsks;

/// Runs the scenario under `policy` (None: the scenario's own `[host]
/// policy`). Every guest lives one second at a time; the policy decides
/// at every multiple of `tick_s`, and its targets reach the guests'
/// drivers from the next second on.
pub fn run_with(scenario: &Scenario, policy: Option<PolicyKind>) -> (Vec<Sample>, Metrics) {
    run_modelled(scenario, policy, AGENT_MODEL)
}

/// `run_with`, with the guests' agents modelled as `agent_model` says.
pub fn run_modelled(
    scenario: &Scenario,
    policy: Option<PolicyKind>,
    agent_model: AgentModel,
) -> (Vec<Sample>, Metrics) {
    let host_section = scenario.host.clone().unwrap_or_default();
    let kind = policy.unwrap_or(host_section.policy);
    let thresholds = host_section.thresholds();
    let defaults = config::resolve(&scenario.defaults, &VmPolicy::default());
    let guests = guests(scenario, &defaults);
    let mut models: Vec<Option<Model>> = vec![None; guests.len()];
    // When each guest's agent last dropped cache (simulated seconds).
    let mut reclaimed_s: Vec<Option<u64>> = vec![None; guests.len()];
    let mut memory = PolicyMemory::default();
    let mut samples = Vec::new();
    let mut metrics = Metrics {
        min_available_percent: 100.0,
        ..Metrics::default()
    };
    let total = scenario.host_total_mib.saturating_mul(MIB);
    let tick_s = scenario.tick_s.max(1);
    let hard = total / 100 * host_section.reclaim_hard_percent.0;
    let mut missing = vec![0u64; guests.len()];
    for t_s in 0..=scenario.duration_s {
        let t = t_s as f64;
        let mut resident: u64 = 0;
        let (mut working_set, mut cache, mut stalled) = (0u64, 0u64, 0.0);
        for ((guest, model), missing) in guests.iter().zip(models.iter_mut()).zip(&mut missing) {
            if t_s < guest.start_s {
                continue;
            }
            let model = model.get_or_insert_with(|| guest.model());
            let second = model.second(guest.want(t));
            metrics.vm_s += 1;
            metrics.pressure_vm_s += second.stall;
            metrics.oom_kills += second.oom_kills;
            metrics.oom_deflate_events += second.oom_deflate_events;
            *missing = second.missing_working_set_bytes;
            resident = resident.saturating_add(model.resident_bytes());
            working_set = working_set.saturating_add(model.working_set_bytes());
            cache = cache.saturating_add(model.cache_bytes());
            stalled += second.stall;
        }
        let other = (scenario.host_other_mib.at(t).max(0.0) * MIB as f64) as u64;
        let available = total.saturating_sub(other.saturating_add(resident));
        if available < hard {
            metrics.overload_s += 1;
        }
        let host = HostState {
            total_bytes: total,
            available_bytes: available,
            psi_some_avg10: None,
        };
        metrics.min_available_percent = metrics.min_available_percent.min(host.available_percent());
        let balloons: Vec<u64> = models
            .iter()
            .map(|m| m.as_ref().map_or(0, Model::balloon_bytes))
            .collect();
        let returned: u64 = balloons.iter().sum();
        metrics.returned_gib_s += returned as f64 / (1u64 << 30) as f64;
        if t_s % tick_s != 0 {
            continue;
        }
        samples.push(Sample {
            t_s,
            host_available_mib: available as f64 / MIB as f64,
            returned_mib: returned as f64 / MIB as f64,
            missing_working_set_mib: missing.iter().sum::<u64>() as f64 / MIB as f64,
            working_set_mib: working_set as f64 / MIB as f64,
            cache_mib: cache as f64 / MIB as f64,
            stalled_vms: stalled,
            balloon_mib: balloons.iter().map(|b| *b as f64 / MIB as f64).collect(),
            guest_free_mib: models
                .iter()
                .map(|m| {
                    m.as_ref()
                        .map_or(0.0, |m| m.free_bytes() as f64 / MIB as f64)
                })
                .collect(),
        });
        let (running, inputs): (Vec<usize>, Vec<VmInput>) = guests
            .iter()
            .zip(&models)
            .zip(&reclaimed_s)
            .enumerate()
            .filter_map(|(i, ((guest, model), reclaimed))| {
                let done_s_ago = reclaimed.map(|at| t_s.saturating_sub(at));
                Some((i, guest.input(model.as_ref()?, agent_model, done_s_ago)))
            })
            .unzip();
        let decision = balloon_policy::decide_with(kind, t_s, &host, &thresholds, &inputs, &memory);
        // The decision's outputs: targets, and the page cache each guest
        // agent is asked to drop (as the daemon sends it, or all the
        // policy asked for: `AgentModel`).
        for (&i, d) in running.iter().zip(&decision.vms) {
            if let Some(model) = models.get_mut(i).and_then(Option::as_mut) {
                if d.target_bytes != model.target_bytes() {
                    metrics.target_changes += 1;
                }
                model.set_target(d.target_bytes);
                let drop = match agent_model {
                    AgentModel::AtOnce => d.reclaim_cache_bytes,
                    AgentModel::AsTheDaemonAsks => d.agent_reclaim_bytes,
                };
                if drop > 0 && guests.get(i).is_some_and(|g| g.spec.agent) {
                    model.drop_cache(drop);
                    if let Some(at) = reclaimed_s.get_mut(i) {
                        *at = Some(t_s);
                    }
                }
            }
        }
        memory = decision.memory;
    }
    (samples, metrics)
}

pub fn run(scenario: &Scenario) -> Vec<Sample> {
    run_with(scenario, None).0
}

/// The scenario with `count` VMs of the `[density]` kind.
fn with_count(scenario: &Scenario, vm: &str, count: u64) -> Scenario {
    let mut scenario = scenario.clone();
    scenario.density = None;
    for spec in scenario.vm.iter_mut().filter(|spec| spec.name == vm) {
        spec.count = count;
    }
    scenario
}

/// The largest count of the `[density]` VM that `policy` holds safely
/// (no overload, no OOM kill, pressure under 1 % of VM-seconds); 0 when
/// not even one is safe. Counts are tried upwards; three unsafe counts in
/// a row end the search.
pub fn safe_density(scenario: &Scenario, search: &DensitySearch, policy: PolicyKind) -> u64 {
    let mut best = 0;
    for count in 1..=search.max_count {
        if run_with(&with_count(scenario, &search.vm, count), Some(policy))
            .1
            .safe()
        {
            best = count;
        } else if count > best + 2 {
            break;
        }
    }
    best
}

/// `safe_density` for large searches: doubling from 1 until a count is
/// unsafe, then bisecting between the last safe and the first unsafe
/// count (about 2 log2(max) runs).
pub fn safe_density_bisected(
    scenario: &Scenario,
    search: &DensitySearch,
    policy: PolicyKind,
) -> u64 {
    let safe = |count: u64| {
        run_with(&with_count(scenario, &search.vm, count), Some(policy))
            .1
            .safe()
    };
    let (mut good, mut bad) = (0u64, None);
    let mut count = 1u64;
    while count <= search.max_count {
        if safe(count) {
            good = count;
            count = count.saturating_mul(2);
        } else {
            bad = Some(count);
            break;
        }
    }
    let mut bad = bad.unwrap_or(search.max_count.saturating_add(1));
    while bad > good.saturating_add(1) {
        let middle = good + (bad - good) / 2;
        if safe(middle) {
            good = middle;
        } else {
            bad = middle;
        }
    }
    good
}

/// The names of the scenario's VMs, `count` expanded.
pub fn guest_names(scenario: &Scenario) -> Vec<String> {
    guests(scenario, &VmPolicy::default())
        .into_iter()
        .map(|guest| guest.name)
        .collect()
}

pub fn csv(scenario: &Scenario, samples: &[Sample]) -> String {
    let mut out = String::from(
        "t_s,host_available_mib,returned_mib,missing_working_set_mib,working_set_mib,cache_mib,stalled_vms",
    );
    for name in guest_names(scenario) {
        out.push_str(&format!(",{name}_balloon_mib,{name}_guest_free_mib"));
    }
    out.push('\n');
    for s in samples {
        out.push_str(&format!(
            "{},{:.0},{:.0},{:.0},{:.0},{:.0},{:.2}",
            s.t_s,
            s.host_available_mib,
            s.returned_mib,
            s.missing_working_set_mib,
            s.working_set_mib,
            s.cache_mib,
            s.stalled_vms
        ));
        for (b, f) in s.balloon_mib.iter().zip(&s.guest_free_mib) {
            out.push_str(&format!(",{b:.0},{f:.0}"));
        }
        out.push('\n');
    }
    out
}

pub fn svg(scenario: &Scenario, samples: &[Sample], path: &Path) -> Result<(), SimError> {
    let series = |name: String, value: &dyn Fn(&Sample) -> f64| Line {
        name,
        colour: RGBColor(0, 0, 0),
        points: samples.iter().map(|s| (s.t_s as f64, value(s))).collect(),
    };
    let mut lines = vec![series("host available".into(), &|s| s.host_available_mib)];
    for (i, name) in guest_names(scenario).iter().enumerate() {
        let at = |values: &[f64]| values.get(i).copied().unwrap_or(0.0);
        lines.push(series(format!("{name} balloon"), &|s| at(&s.balloon_mib)));
        lines.push(series(format!("{name} guest free"), &|s| {
            at(&s.guest_free_mib)
        }));
    }
    for (index, line) in lines.iter_mut().enumerate() {
        let colour = Palette99::pick(index).to_rgba();
        line.colour = RGBColor(colour.0, colour.1, colour.2);
    }
    let panel = Panel {
        title: String::new(),
        lines,
    };
    grid_svg(path, scenario.duration_s as f64, &["MiB"], &[vec![panel]])
}

/// Loads a scenario, runs it, writes `<out>.csv` and `<out>.svg`.
pub fn simulate(scenario_path: &Path, out: &Path) -> Result<String, SimError> {
    let scenario = load(scenario_path)?;
    let samples = run(&scenario);
    let csv_path = out.with_extension("csv");
    let svg_path = out.with_extension("svg");
    write(&csv_path, csv(&scenario, &samples))?;
    svg(&scenario, &samples, &svg_path)?;
    let lowest = samples
        .iter()
        .map(|s| s.host_available_mib)
        .fold(f64::MAX, f64::min);
    Ok(format!(
        "{} ticks; lowest host available {lowest:.0} MiB; wrote {} and {}",
        samples.len(),
        csv_path.display(),
        svg_path.display()
    ))
}

/// Writes `contents` to `path`.
fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), SimError> {
    std::fs::write(path, contents).map_err(|source| SimError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads and checks a scenario file.
pub fn load(path: &Path) -> Result<Scenario, SimError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| SimError::Scenario {
        path: path.to_path_buf(),
        message,
    };
    let scenario: Scenario = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    scenario.validate().map_err(invalid)?;
    Ok(scenario)
}

/// One policy's run in a comparison.
pub struct Compared {
    pub policy: PolicyKind,
    pub samples: Vec<Sample>,
    pub metrics: Metrics,
    pub safe_density: Option<u64>,
}

/// Runs every policy of `policies` on the scenario (and its density
/// search, if it has one).
pub fn compare_runs(scenario: &Scenario, policies: &[PolicyKind]) -> Vec<Compared> {
    policies
        .iter()
        .map(|&policy| {
            let (samples, metrics) = run_with(scenario, Some(policy));
            Compared {
                policy,
                samples,
                metrics,
                safe_density: scenario
                    .density
                    .as_ref()
                    .map(|search| safe_density(scenario, search, policy)),
            }
        })
        .collect()
}

/// The comparison as a Markdown table.
pub fn table(runs: &[Compared]) -> String {
    let mut out = String::from(
        "| policy | host overload s | guest pressure VM-s (% of VM-s) | OOM kills | deflate-on-OOM events | returned GiB x s | target changes | safe density |\n|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        let m = &run.metrics;
        out.push_str(&format!(
            "| {} | {} | {:.0} ({:.2} %) | {} | {} | {:.0} | {} | {} |\n",
            run.policy.name(),
            m.overload_s,
            m.pressure_vm_s,
            m.pressure_percent(),
            m.oom_kills,
            m.oom_deflate_events,
            m.returned_gib_s,
            m.target_changes,
            run.safe_density
                .map_or("-".to_string(), |n| format!("{n} VMs"))
        ));
    }
    out
}

/// The runs side by side: per policy, host available memory, memory
/// returned, and working set that did not fit (guest pressure).
pub fn compare_svg(scenario: &Scenario, runs: &[Compared], path: &Path) -> Result<(), SimError> {
    type Value = fn(&Sample) -> f64;
    let series: [(&str, RGBColor, Value); 3] = [
        ("host available", BLUE, |s| s.host_available_mib),
        ("returned by balloons", GREEN, |s| s.returned_mib),
        ("working set not resident", RED, |s| {
            s.missing_working_set_mib
        }),
    ];
    let columns: Vec<Vec<Panel>> = runs
        .iter()
        .map(|run| {
            vec![Panel {
                title: run.policy.name().to_string(),
                lines: series
                    .iter()
                    .map(|(name, colour, value)| Line {
                        name: name.to_string(),
                        colour: *colour,
                        points: run
                            .samples
                            .iter()
                            .map(|s| (s.t_s as f64, value(s)))
                            .collect(),
                    })
                    .collect(),
            }]
        })
        .collect();
    grid_svg(path, scenario.duration_s as f64, &["MiB"], &columns)
}

/// `simulate --compare`: every policy of `policies` on the scenario;
/// writes `<dir>/<policy>.csv`, `<dir>/compare.svg`, `<dir>/table.md`;
/// returns the table.
pub fn compare(
    scenario_path: &Path,
    policies: &[PolicyKind],
    dir: &Path,
) -> Result<String, SimError> {
    let scenario = load(scenario_path)?;
    std::fs::create_dir_all(dir).map_err(|source| SimError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let runs = compare_runs(&scenario, policies);
    for run in &runs {
        let path = dir.join(format!("{}.csv", run.policy.name()));
        write(&path, csv(&scenario, &run.samples))?;
    }
    compare_svg(&scenario, &runs, &dir.join("compare.svg"))?;
    let text = table(&runs);
    write(&dir.join("table.md"), &text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../host-policy/examples/scenario.toml");

    fn validate(text: &str) -> Result<(), String> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        scenario.validate()
    }

    #[test]
    fn the_example_scenario_is_valid() {
        assert_eq!(validate(EXAMPLE), Ok(()));
    }

    fn scenario_file(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../host-policy/scenarios")
            .join(format!("{name}.toml"))
    }

    #[test]
    fn every_scenario_runs_every_policy_and_the_comparison_is_written() {
        for name in ["phases", "burst", "cache", "squeeze", "boot-storm"] {
            let scenario = load(&scenario_file(name)).unwrap_or_else(|e| panic!("{e}"));
            let ticks = scenario.duration_s / scenario.tick_s + 1;
            for policy in PolicyKind::ALL {
                let (samples, metrics) = run_with(&scenario, Some(policy));
                assert_eq!(samples.len() as u64, ticks, "{name} {}", policy.name());
                assert!(metrics.vm_s > 0 && metrics.pressure_vm_s <= metrics.vm_s as f64);
                assert!(metrics.overload_s <= scenario.duration_s + scenario.tick_s);
            }
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let table = compare(&scenario_file("cache"), &PolicyKind::ALL, dir.path())
            .unwrap_or_else(|e| panic!("{e}"));
        for policy in PolicyKind::ALL {
            assert!(table.contains(&format!("| {} |", policy.name())), "{table}");
            assert!(dir.path().join(format!("{}.csv", policy.name())).exists());
        }
        let svg = std::fs::read_to_string(dir.path().join("compare.svg")).unwrap_or_default();
        assert!(svg.contains("esx-idle-tax") && svg.contains("working set not resident"));
    }

    /// The comparison's ordering: in every scenario ours does no more harm
    /// (host overload s + guest stall VM-s + OOM kills, `Metrics::harm`)
    /// than any baseline, and kills no more.
    #[test]
    fn ours_does_no_more_harm_than_any_baseline_in_every_scenario() {
        for name in ["phases", "burst", "cache", "squeeze", "boot-storm"] {
            let scenario = load(&scenario_file(name)).unwrap_or_else(|e| panic!("{e}"));
            let (_, ours) = run_with(&scenario, Some(PolicyKind::BalloonStack));
            for baseline in &PolicyKind::ALL[1..] {
                let (_, theirs) = run_with(&scenario, Some(*baseline));
                assert!(
                    crate::family::no_worse(&ours, &theirs) && ours.oom_kills <= theirs.oom_kills,
                    "{name}: ours {ours:?} against {} {theirs:?}",
                    baseline.name()
                );
            }
        }
    }

    /// `phases`: ours holds more VMs safely than any baseline.
    #[test]
    fn ours_holds_more_phases_vms_than_the_best_baseline() {
        let scenario = load(&scenario_file("phases")).unwrap_or_else(|e| panic!("{e}"));
        let search = scenario
            .density
            .clone()
            .unwrap_or_else(|| panic!("phases has [density]"));
        let ours = safe_density(&scenario, &search, PolicyKind::BalloonStack);
        let best = PolicyKind::ALL[1..]
            .iter()
            .map(|kind| safe_density(&scenario, &search, *kind))
            .max()
            .unwrap_or(0);
        assert!(
            best > 0 && ours > best,
            "ours {ours} VMs, best baseline {best}"
        );
    }

    #[test]
    fn a_balloon_that_squeezes_a_busy_guest_shows_as_stalls_not_kills() {
        // One VM whose working set nearly fills its RAM, on a host far too
        // small: a policy that balloons it anyway stalls it (the balloon
        // driver never OOM-kills, it takes what it can); ours leaves it be.
        let scenario: Scenario = toml::from_str(
            "duration_s = 300\nhost_total_mib = 4096\nhost_other_mib = [[0, 2048]]\n[[vm]]\nname = \"full\"\nram_mib = 4096\nworking_set_mib = [[0, 3800]]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (_, esx) = run_with(&scenario, Some(PolicyKind::EsxIdleTax));
        assert!(esx.pressure_vm_s > 0.0 && esx.oom_kills == 0, "{esx:?}");
        assert!(esx.overload_s > 0, "{esx:?}");
        let (_, ours) = run_with(&scenario, Some(PolicyKind::BalloonStack));
        assert_eq!(ours.oom_kills, 0, "{ours:?}");
        assert!(ours.pressure_vm_s < esx.pressure_vm_s, "{ours:?}");
    }

    /// With the agents modelled as the daemon asks them, the gate runs:
    /// MOM's first inflation of a guest with little free memory, whose
    /// agent has the cache, waits a tick while the agent drops that much.
    #[test]
    fn agents_modelled_as_the_daemon_asks_them_go_through_the_gate() {
        let scenario: Scenario = toml::from_str(
            "duration_s = 120\nhost_total_mib = 8192\nhost_other_mib = [[0, 6144]]\n[[vm]]\nname = \"web\"\nram_mib = 4096\nworking_set_mib = [[0, 1536]]\ncache_mib = [[0, 2496]]\ncache_fill_s = 1\nfree_page_reporting = false\nagent = true\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mom = Some(PolicyKind::Mom);
        let (at_once, _) = run_modelled(&scenario, mom, AgentModel::AtOnce);
        let (gated, _) = run_modelled(&scenario, mom, AgentModel::AsTheDaemonAsks);
        assert_eq!(at_once.len(), gated.len());
        let first = at_once
            .iter()
            .position(|s| s.returned_mib > 0.0)
            .unwrap_or_else(|| panic!("MOM never inflates"));
        let gated_first = gated.iter().position(|s| s.returned_mib > 0.0);
        assert_eq!(gated_first, Some(first + 1), "held a tick");
    }

    #[test]
    fn a_scenario_is_checked_as_a_configuration_is() {
        for (from, to, expected) in [
            ("tick_s = 5", "tick_s = 0", "tick_s must be at least 1"),
            (
                "duration_s = 1200",
                "duration_s = 2",
                "duration_s (2) must be at least tick_s (5)",
            ),
            (
                "deflate_step_mib = 512",
                "deflate_step_mib = 64",
                "deflate_step_mib (64) must be at least inflate_step_mib (128)",
            ),
            (
                "give_back_percent = 35",
                "give_back_percent = 5",
                "host.give_back_percent (5) must be above",
            ),
            (
                "reclaim_hard_percent = 10",
                "reclaim_hard_percent = 30",
                "host.reclaim_hard_percent (30) must be below",
            ),
            (
                "name = \"web\"",
                "name = \"we b\"",
                "vm name \"we b\" must be non-empty without spaces",
            ),
            (
                "name = \"web\"",
                "name = \"batch\"",
                "vm name \"batch\" appears twice",
            ),
            (
                "policy = { shares = 2000 }",
                "policy = { inflate_step_mib = 1024 }",
                "vm \"web\": deflate_step_mib (512) must be at least inflate_step_mib (1024)",
            ),
            (
                "duration_s = 1200",
                "duration_s = 1200\nbogus = 1",
                "unknown field `bogus`",
            ),
        ] {
            assert!(EXAMPLE.contains(from), "{from}");
            let error = validate(&EXAMPLE.replacen(from, to, 1)).unwrap_err();
            assert!(error.contains(expected), "{to}: {error}");
        }
    }
}
