//! `host-policy simulate`: the same policy on a synthetic host. VMs follow
//! working-set curves; ballooned memory leaves the guest and returns to the
//! host. Writes a CSV and an SVG plot of host available memory and each
//! VM's balloon and guest free memory over time.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::Deserialize;

use crate::config::{HostSection, VmPolicy, VmSettings, MIB};
use crate::policy::{GuestCounters, GuestSample, HostState, HostThresholds, PolicyMemory, VmInput};

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

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimVm {
    pub name: String,
    pub ram_mib: u64,
    pub working_set_mib: Curve,
    /// Policy settings, as in host-policy.toml's `[defaults]`.
    #[serde(default)]
    pub policy: VmSettings,
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
        let mut names = std::collections::BTreeSet::new();
        for vm in &self.vm {
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
    pub balloon_mib: Vec<f64>,
    pub guest_free_mib: Vec<f64>,
}

pub fn run(scenario: &Scenario) -> Vec<Sample> {
    let host_section = scenario.host.clone().unwrap_or_default();
    let thresholds = HostThresholds {
        reclaim_start_percent: host_section.reclaim_start_percent.0,
        reclaim_hard_percent: host_section.reclaim_hard_percent.0,
        give_back_percent: host_section.give_back_percent.0,
    };
    let defaults = crate::config::resolve(&scenario.defaults, &VmPolicy::default());
    let policies: Vec<VmPolicy> = scenario
        .vm
        .iter()
        .map(|vm| crate::config::resolve(&vm.policy, &defaults))
        .collect();
    let mut balloons = vec![0u64; scenario.vm.len()];
    let mut counters = vec![
        GuestCounters {
            swap_in: Some(0),
            ..Default::default()
        };
        scenario.vm.len()
    ];
    let mut memory = PolicyMemory::default();
    let mut samples = Vec::new();
    let total = scenario.host_total_mib * MIB;
    for t_s in (0..=scenario.duration_s).step_by(scenario.tick_s.max(1) as usize) {
        let t = t_s as f64;
        let mut inputs = Vec::new();
        let mut free = Vec::new();
        let mut resident = 0u64;
        for (i, vm) in scenario.vm.iter().enumerate() {
            let ram = vm.ram_mib * MIB;
            let used = (vm.working_set_mib.at(t).max(0.0) * MIB as f64) as u64;
            let guest_free = ram as i128 - balloons[i] as i128 - used as i128;
            if guest_free < 0 {
                // The guest thrashes: it swaps in what does not fit.
                let swapped = counters[i].swap_in.unwrap_or(0) + (-guest_free) as u64 / 4096;
                counters[i].swap_in = Some(swapped);
            }
            free.push(guest_free as f64 / MIB as f64);
            resident += ram - balloons[i];
            inputs.push(VmInput {
                name: vm.name.clone(),
                guest_ram_bytes: ram,
                target_bytes: balloons[i],
                // The simulated balloon lands within the tick.
                actual_bytes: balloons[i],
                device_max_reclaim_bytes: ram * 75 / 100,
                sample: Some(GuestSample {
                    available_bytes: guest_free.max(0) as u64,
                    free_bytes: Some(guest_free.max(0) as u64),
                    counters: counters[i],
                    age_s: 0,
                    psi_some_avg10: None,
                    // The simulated balloon lands at once.
                    balloon_bytes: Some(balloons[i]),
                }),
                policy: policies[i].clone(),
                pinned: false,
            });
        }
        let other = (scenario.host_other_mib.at(t).max(0.0) * MIB as f64) as u64;
        let available = total.saturating_sub(other + resident);
        let host = HostState {
            total_bytes: total,
            available_bytes: available,
        };
        let decision = crate::baselines::decide_with(
            host_section.policy,
            t_s,
            &host,
            &thresholds,
            &inputs,
            &memory,
        );
        samples.push(Sample {
            t_s,
            host_available_mib: available as f64 / MIB as f64,
            balloon_mib: balloons.iter().map(|b| *b as f64 / MIB as f64).collect(),
            guest_free_mib: free,
        });
        balloons = decision.vms.iter().map(|d| d.target_bytes).collect();
        memory = decision.memory;
    }
    samples
}

pub fn csv(scenario: &Scenario, samples: &[Sample]) -> String {
    let mut out = String::from("t_s,host_available_mib");
    for vm in &scenario.vm {
        out.push_str(&format!(",{0}_balloon_mib,{0}_guest_free_mib", vm.name));
    }
    out.push('\n');
    for s in samples {
        out.push_str(&format!("{},{:.0}", s.t_s, s.host_available_mib));
        for (b, f) in s.balloon_mib.iter().zip(&s.guest_free_mib) {
            out.push_str(&format!(",{b:.0},{f:.0}"));
        }
        out.push('\n');
    }
    out
}

pub fn svg(scenario: &Scenario, samples: &[Sample], path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max_y = samples
        .iter()
        .flat_map(|s| {
            std::iter::once(s.host_available_mib)
                .chain(s.balloon_mib.iter().copied())
                .chain(s.guest_free_mib.iter().copied())
        })
        .fold(1.0f64, f64::max);
    let min_y = samples
        .iter()
        .flat_map(|s| s.guest_free_mib.iter().copied())
        .fold(0.0f64, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..scenario.duration_s as f64, min_y..max_y * 1.05)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![(
        "host available".into(),
        samples
            .iter()
            .map(|s| (s.t_s as f64, s.host_available_mib))
            .collect(),
    )];
    for (i, vm) in scenario.vm.iter().enumerate() {
        series.push((
            format!("{} balloon", vm.name),
            samples
                .iter()
                .map(|s| (s.t_s as f64, s.balloon_mib[i]))
                .collect(),
        ));
        series.push((
            format!("{} guest free", vm.name),
            samples
                .iter()
                .map(|s| (s.t_s as f64, s.guest_free_mib[i]))
                .collect(),
        ));
    }
    for (index, (name, points)) in series.into_iter().enumerate() {
        let colour = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Loads a scenario, runs it, writes `<out>.csv` and `<out>.svg`.
pub fn simulate(scenario_path: &Path, out: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(scenario_path)
        .with_context(|| format!("reading {}", scenario_path.display()))?;
    let scenario: Scenario =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", scenario_path.display()))?;
    scenario
        .validate()
        .map_err(|message| anyhow::anyhow!("{}: {message}", scenario_path.display()))?;
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
