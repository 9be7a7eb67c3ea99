//! `host-policy simulate`: the same policies on a synthetic host. Each VM's
//! workload follows curves of working set and page cache over time; the
//! guest model (`guest_model`) splits its memory and reports statistics as
//! a guest would; ballooned memory leaves the guest and returns to the
//! host. One run writes a CSV and an SVG; `--compare` runs every policy on
//! the same scenario and measures them (`Metrics`), and a scenario with a
//! `[density]` table finds each policy's safe density.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::Deserialize;

use crate::baselines::PolicyKind;
use crate::config::{HostSection, VmPolicy, VmSettings, MIB};
use crate::plot::{grid_svg, Line, Panel};
use crate::policy::{GuestSample, HostState, HostThresholds, PolicyMemory, VmInput};

/// Piecewise-linear curve of (seconds, MiB) points.
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct Curve(pub Vec<(f64, f64)>);

impl Curve {
    pub fn at(&self, t: f64) -> f64 {
        let points = &self.0;
        match points.iter().position(|(x, _)| *x > t) {
            None => points.last().map_or(0.0, |p| p.1),
            Some(0) => points.first().map_or(0.0, |p| p.1),
            Some(i) => {
                let (x0, y0) = points[i - 1];
                let (x1, y1) = points[i];
                y0 + (y1 - y0) * (t - x0) / (x1 - x0)
            }
        }
    }
}

fn one() -> u64 {
    1
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
    /// it, an OOM kill.
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
        if self.host_total_mib == 0 {
            return Err("host_total_mib must be at least 1".into());
        }
        if self.vm.is_empty() {
            return Err("no VMs: add [[vm]] entries (name, ram_mib, working_set_mib)".into());
        }
        if let Some(host) = &self.host {
            crate::config::check_host(host).map_err(|(_, message)| message)?;
        }
        let defaults = crate::config::resolve(&self.defaults, &VmPolicy::default());
        crate::config::check_steps("defaults", &defaults)?;
        if let Some(density) = &self.density {
            if !self.vm.iter().any(|vm| vm.name == density.vm) {
                return Err(format!(
                    "[density] vm {:?} is not a [[vm]] of the scenario",
                    density.vm
                ));
            }
            if density.max_count == 0 {
                return Err("[density] max_count must be at least 1".into());
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for vm in &self.vm {
            if vm.count == 0 {
                return Err(format!("vm {:?}: count must be at least 1", vm.name));
            }
            if vm.period_s.is_some_and(|p| p <= 0.0) {
                return Err(format!("vm {:?}: period_s must be above 0", vm.name));
            }
            crate::config::check_vm_name(&vm.name)?;
            if !names.insert(vm.name.as_str()) {
                return Err(format!("vm name {:?} appears twice", vm.name));
            }
            if vm.ram_mib == 0 {
                return Err(format!("vm {:?}: ram_mib must be at least 1", vm.name));
            }
            let policy = crate::config::resolve(&vm.policy, &defaults);
            crate::config::check_steps(&format!("vm {:?}", vm.name), &policy)?;
        }
        Ok(())
    }
}

/// One row of the simulation's output.
#[derive(Clone, Debug)]
pub struct Sample {
    pub t_s: u64,
    pub host_available_mib: f64,
    /// Memory the balloons hold (returned to the host).
    pub returned_mib: f64,
    /// Working set that did not fit in its guest, summed over the VMs.
    pub missing_working_set_mib: f64,
    pub balloon_mib: Vec<f64>,
    pub guest_free_mib: Vec<f64>,
}

/// What decides between policies, for one run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Seconds the host's available memory was below its hard threshold
    /// (the host would swap).
    pub overload_s: u64,
    /// VM-seconds with the working set not fully resident.
    pub pressure_vm_s: u64,
    /// VM-seconds run.
    pub vm_s: u64,
    pub oom_kills: u64,
    /// Memory returned to the host, integrated over time.
    pub returned_gib_s: f64,
    /// Balloon target changes.
    pub target_changes: u64,
}

impl Metrics {
    pub fn pressure_percent(&self) -> f64 {
        if self.vm_s == 0 {
            0.0
        } else {
            self.pressure_vm_s as f64 * 100.0 / self.vm_s as f64
        }
    }

    /// Safe: no overload, no OOM kill, pressure under 1 % of VM-seconds.
    pub fn safe(&self) -> bool {
        self.overload_s == 0 && self.oom_kills == 0 && self.pressure_percent() < 1.0
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
    fn want(&self, t: f64) -> crate::guest_model::Want {
        let mut local = t - self.start_s as f64 + self.offset_s;
        if let Some(period) = self.spec.period_s {
            local = local.rem_euclid(period);
        }
        let mib = |curve: &Curve| (curve.at(local).max(0.0) * MIB as f64) as u64;
        crate::guest_model::Want {
            working_set_bytes: mib(&self.spec.working_set_mib),
            cache_bytes: self.spec.cache_mib.as_ref().map_or(0, mib),
            hot_cache_bytes: self.spec.hot_cache_mib.as_ref().map_or(0, mib),
        }
    }
}

fn guests<'a>(scenario: &'a Scenario, defaults: &VmPolicy) -> Vec<Guest<'a>> {
    scenario
        .vm
        .iter()
        .flat_map(|spec| {
            let policy = crate::config::resolve(&spec.policy, defaults);
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

/// Runs the scenario under `policy` (None: the scenario's own `[host]
/// policy`).
pub fn run_with(scenario: &Scenario, policy: Option<PolicyKind>) -> (Vec<Sample>, Metrics) {
    let host_section = scenario.host.clone().unwrap_or_default();
    let kind = policy.unwrap_or(host_section.policy);
    let thresholds = HostThresholds {
        reclaim_start_percent: host_section.reclaim_start_percent.0,
        reclaim_hard_percent: host_section.reclaim_hard_percent.0,
        give_back_percent: host_section.give_back_percent.0,
    };
    let defaults = crate::config::resolve(&scenario.defaults, &VmPolicy::default());
    let guests = guests(scenario, &defaults);
    let mut balloons = vec![0u64; guests.len()];
    // Guest memory the guest has ever used: what the host holds for it
    // (less what the balloon takes of it).
    let mut touched = vec![0u64; guests.len()];
    let mut counters = vec![crate::guest_model::fresh_counters(); guests.len()];
    let mut memory = PolicyMemory::default();
    let mut samples = Vec::new();
    let mut metrics = Metrics::default();
    let total = scenario.host_total_mib * MIB;
    let tick_s = scenario.tick_s.max(1);
    let hard = total * host_section.reclaim_hard_percent.0 / 100;
    for t_s in (0..=scenario.duration_s).step_by(tick_s as usize) {
        let t = t_s as f64;
        let mut inputs = Vec::new();
        let mut running = Vec::new();
        let mut free = vec![0.0; guests.len()];
        let (mut resident, mut missing) = (0u64, 0u64);
        for (i, guest) in guests.iter().enumerate() {
            if t_s < guest.start_s {
                continue;
            }
            let ram = guest.spec.ram_mib * MIB;
            let tick = crate::guest_model::step(
                ram,
                balloons[i],
                guest.spec.swap_mib * MIB,
                guest.want(t),
                &mut counters[i],
            );
            metrics.vm_s += tick_s;
            if tick.pressure {
                metrics.pressure_vm_s += tick_s;
            }
            metrics.oom_kills += u64::from(tick.oom_kill);
            missing += tick.missing_working_set_bytes;
            free[i] = tick.free_bytes as f64 / MIB as f64;
            let memory = ram - balloons[i];
            touched[i] = touched[i].max(memory - tick.free_bytes).min(memory);
            resident += touched[i];
            running.push(i);
            inputs.push(VmInput {
                name: guest.name.clone(),
                guest_ram_bytes: ram,
                target_bytes: balloons[i],
                // The simulated balloon lands within the tick.
                actual_bytes: balloons[i],
                device_max_reclaim_bytes: ram * 75 / 100,
                sample: Some(GuestSample {
                    available_bytes: tick.available_bytes(),
                    free_bytes: Some(tick.free_bytes),
                    counters: counters[i],
                    age_s: 0,
                    psi_some_avg10: None,
                    balloon_bytes: Some(balloons[i]),
                }),
                policy: guest.policy.clone(),
                pinned: false,
            });
        }
        let other = (scenario.host_other_mib.at(t).max(0.0) * MIB as f64) as u64;
        let available = total.saturating_sub(other + resident);
        if available < hard {
            metrics.overload_s += tick_s;
        }
        let returned: u64 = balloons.iter().sum();
        metrics.returned_gib_s += returned as f64 / (1u64 << 30) as f64 * tick_s as f64;
        samples.push(Sample {
            t_s,
            host_available_mib: available as f64 / MIB as f64,
            returned_mib: returned as f64 / MIB as f64,
            missing_working_set_mib: missing as f64 / MIB as f64,
            balloon_mib: balloons.iter().map(|b| *b as f64 / MIB as f64).collect(),
            guest_free_mib: free,
        });
        let host = HostState {
            total_bytes: total,
            available_bytes: available,
        };
        let decision =
            crate::baselines::decide_with(kind, t_s, &host, &thresholds, &inputs, &memory);
        for (&i, d) in running.iter().zip(&decision.vms) {
            if d.target_bytes != balloons[i] {
                metrics.target_changes += 1;
            }
            balloons[i] = d.target_bytes;
        }
        memory = decision.memory;
    }
    (samples, metrics)
}

pub fn run(scenario: &Scenario) -> Vec<Sample> {
    run_with(scenario, None).0
}

/// The largest count of the `[density]` VM that `policy` holds safely
/// (no overload, no OOM kill, pressure under 1 % of VM-seconds); 0 when
/// not even one is safe.
pub fn safe_density(scenario: &Scenario, search: &DensitySearch, policy: PolicyKind) -> u64 {
    let mut best = 0;
    let mut scenario = scenario.clone();
    scenario.density = None;
    for count in 1..=search.max_count {
        for vm in scenario.vm.iter_mut().filter(|vm| vm.name == search.vm) {
            vm.count = count;
        }
        if run_with(&scenario, Some(policy)).1.safe() {
            best = count;
        } else if count > best + 2 {
            // Three unsafe counts in a row: past the edge.
            break;
        }
    }
    best
}

/// The names of the scenario's VMs, `count` expanded.
pub fn guest_names(scenario: &Scenario) -> Vec<String> {
    guests(scenario, &VmPolicy::default())
        .into_iter()
        .map(|guest| guest.name)
        .collect()
}

pub fn csv(scenario: &Scenario, samples: &[Sample]) -> String {
    let mut out = String::from("t_s,host_available_mib,returned_mib,missing_working_set_mib");
    for name in guest_names(scenario) {
        out.push_str(&format!(",{name}_balloon_mib,{name}_guest_free_mib"));
    }
    out.push('\n');
    for s in samples {
        out.push_str(&format!(
            "{},{:.0},{:.0},{:.0}",
            s.t_s, s.host_available_mib, s.returned_mib, s.missing_working_set_mib
        ));
        for (b, f) in s.balloon_mib.iter().zip(&s.guest_free_mib) {
            out.push_str(&format!(",{b:.0},{f:.0}"));
        }
        out.push('\n');
    }
    out
}

pub fn svg(scenario: &Scenario, samples: &[Sample], path: &Path) -> anyhow::Result<()> {
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
pub fn simulate(scenario_path: &Path, out: &Path) -> anyhow::Result<String> {
    let scenario = load(scenario_path)?;
    let samples = run(&scenario);
    let csv_path = out.with_extension("csv");
    let svg_path = out.with_extension("svg");
    std::fs::write(&csv_path, csv(&scenario, &samples))
        .with_context(|| format!("writing {}", csv_path.display()))?;
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

/// Loads and checks a scenario file.
pub fn load(path: &Path) -> anyhow::Result<Scenario> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let scenario: Scenario =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    scenario
        .validate()
        .map_err(|message| anyhow::anyhow!("{}: {message}", path.display()))?;
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
        "| policy | host overload s | guest pressure VM-s (% of VM-s) | OOM kills | returned GiB x s | target changes | safe density |\n|---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        let m = &run.metrics;
        out.push_str(&format!(
            "| {} | {} | {} ({:.2} %) | {} | {:.0} | {} | {} |\n",
            run.policy.name(),
            m.overload_s,
            m.pressure_vm_s,
            m.pressure_percent(),
            m.oom_kills,
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
pub fn compare_svg(scenario: &Scenario, runs: &[Compared], path: &Path) -> anyhow::Result<()> {
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
) -> anyhow::Result<String> {
    let scenario = load(scenario_path)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let runs = compare_runs(&scenario, policies);
    for run in &runs {
        let path = dir.join(format!("{}.csv", run.policy.name()));
        std::fs::write(&path, csv(&scenario, &run.samples))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    compare_svg(&scenario, &runs, &dir.join("compare.svg"))?;
    let text = table(&runs);
    std::fs::write(dir.join("table.md"), &text)
        .with_context(|| format!("writing {}", dir.join("table.md").display()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/scenario.toml");

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
            .join("scenarios")
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
                assert!(metrics.vm_s > 0 && metrics.pressure_vm_s <= metrics.vm_s);
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

    /// The comparison's ordering: in every scenario ours is no worse than
    /// any baseline on host overload and on guest pressure.
    #[test]
    fn ours_is_no_worse_than_any_baseline_on_overload_and_pressure() {
        for name in ["phases", "burst", "cache", "squeeze", "boot-storm"] {
            let scenario = load(&scenario_file(name)).unwrap_or_else(|e| panic!("{e}"));
            let (_, ours) = run_with(&scenario, Some(PolicyKind::BalloonStack));
            for baseline in &PolicyKind::ALL[1..] {
                let (_, theirs) = run_with(&scenario, Some(*baseline));
                assert!(
                    ours.overload_s <= theirs.overload_s
                        && ours.pressure_vm_s <= theirs.pressure_vm_s,
                    "{name}: ours {ours:?} against {} {theirs:?}",
                    baseline.name()
                );
            }
        }
    }

    /// The headline: ours holds at least 1.3 times the `phases` VMs of the
    /// best baseline, safely.
    #[test]
    fn ours_holds_a_third_more_vms_than_the_best_baseline() {
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
            best > 0 && ours * 10 >= best * 13,
            "ours {ours} VMs, best baseline {best}"
        );
    }

    #[test]
    fn a_balloon_that_takes_working_set_shows_as_pressure_and_oom_kills() {
        // One VM whose working set fills its RAM, on a host far too small:
        // any policy that balloons it hurts it, and the metrics say so.
        let scenario: Scenario = toml::from_str(
            "duration_s = 300\nhost_total_mib = 4096\nhost_other_mib = [[0, 2048]]\n[[vm]]\nname = \"full\"\nram_mib = 4096\nworking_set_mib = [[0, 3800]]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (_, esx) = run_with(&scenario, Some(PolicyKind::EsxIdleTax));
        assert!(esx.pressure_vm_s > 0 && esx.oom_kills > 0, "{esx:?}");
        assert!(esx.overload_s > 0, "{esx:?}");
        let (_, ours) = run_with(&scenario, Some(PolicyKind::BalloonStack));
        assert_eq!(ours.oom_kills, 0, "{ours:?}");
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
