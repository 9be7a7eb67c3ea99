//! `host-policy simulate --family N --seed S --out DIR`: N scenarios drawn
//! from one documented distribution (docs/host-policy.md, "A family of
//! scenarios"), every policy run on each, and a summary of how ours fares
//! against each baseline.
//!
//! Each scenario is written as a scenario file of `simulate`'s own format
//! (`DIR/scenarios/NNN.toml`) and read back through the same parser and
//! checks, so any of them can be run again alone. Scenario `i` of seed `S`
//! depends on `S` and `i` only.

use std::fmt::Write as _;
use std::path::Path;

use balloon_policy::PolicyKind;

use crate::simulate::{run_with, safe_density_bisected, Metrics, Scenario};
use crate::SimError;

/// SplitMix64: small, fast, and the same on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [low, high).
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Log-uniform in [low, high).
    pub fn log_uniform(&mut self, low: f64, high: f64) -> f64 {
        (low.ln() + (high.ln() - low.ln()) * self.unit()).exp()
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One of `items` (the first for an empty slice is never asked for:
    /// callers pass constants).
    pub fn pick<T: Copy>(&mut self, items: &[T], fallback: T) -> T {
        let len = u64::try_from(items.len()).unwrap_or(0);
        if len == 0 {
            return fallback;
        }
        let index = usize::try_from(self.next_u64() % len).unwrap_or(0);
        items.get(index).copied().unwrap_or(fallback)
    }
}

/// The workload classes of the distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Constant working set and page cache.
    Steady,
    /// Idle and busy phases of a period; correlated (all in step) or
    /// spread.
    Phased,
    /// A working set that ramps up at 64 MiB/s to 1 GiB/s once a period,
    /// holds, and comes down.
    Ramp,
    /// A working set that grows steadily towards the guest's whole RAM.
    Leak,
    /// A small working set beside a large page cache.
    CacheHeavy,
    /// VMs that start one after another, each touching most of its RAM
    /// for a while.
    BootStorm,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Steady,
        Class::Phased,
        Class::Ramp,
        Class::Leak,
        Class::CacheHeavy,
        Class::BootStorm,
    ];

    /// The classes whose safe density is searched: more VMs of a boot
    /// storm start after the run ends, and a leak grows to its whole RAM
    /// whatever its count.
    pub const SEARCHABLE: [Class; 4] =
        [Class::Steady, Class::Phased, Class::Ramp, Class::CacheHeavy];

    pub fn searchable(self) -> bool {
        Self::SEARCHABLE.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Steady => "steady",
            Class::Phased => "phased",
            Class::Ramp => "ramp",
            Class::Leak => "leak",
            Class::CacheHeavy => "cache",
            Class::BootStorm => "boot",
        }
    }
}

/// Run length and tick of every scenario of the family.
pub const DURATION_S: u64 = 1200;
pub const TICK_S: u64 = 5;
/// Host sizes, GiB (each equally likely: log-uniform over 8-512 GiB).
pub const HOST_GIB: [u64; 12] = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512];
/// Guest sizes, GiB, at most a quarter of the host.
pub const VM_GIB: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];
/// At most this many VMs in a scenario, at least `MIN_VMS`.
pub const MAX_VMS: u64 = 200;
pub const MIN_VMS: u64 = 4;

/// One kind of VM in a generated scenario.
struct Kind {
    class: Class,
    name: String,
    ram_mib: u64,
    count: u64,
    text: String,
}

/// The curves and keys of one kind, in MiB and seconds, and its mean
/// resident demand per VM as a share of its RAM (working set and cache).
fn kind_body(rng: &mut Rng, class: Class, ram: f64) -> (String, f64) {
    let mib = |share: f64| (share * ram).round().max(0.0);
    let mut lines = String::new();
    let cache_share;
    let hot_share;
    let demand;
    match class {
        Class::Steady => {
            let ws = rng.uniform(0.2, 0.6);
            cache_share = rng.uniform(0.1, 0.4);
            hot_share = rng.uniform(0.1, 0.5);
            let _ = writeln!(lines, "working_set_mib = [[0, {}]]", mib(ws));
            demand = ws + cache_share;
        }
        Class::Phased => {
            let (idle, busy) = (rng.uniform(0.1, 0.25), rng.uniform(0.45, 0.8));
            let period = rng.uniform(300.0, 900.0).round();
            let busy_s = (period * rng.uniform(0.2, 0.5)).round();
            let ramp = rng.uniform(5.0, 60.0).round();
            let start = (rng.uniform(0.0, (period - busy_s - 2.0 * ramp).max(0.0))).round();
            cache_share = rng.uniform(0.1, 0.3);
            hot_share = rng.uniform(0.1, 0.5);
            let shift = if rng.chance(0.3) {
                0.0
            } else {
                (period * rng.uniform(0.15, 0.45)).round()
            };
            let _ = writeln!(
                lines,
                "working_set_mib = [[0, {i}], [{a}, {i}], [{b}, {w}], [{c}, {w}], [{d}, {i}], [{period}, {i}]]",
                i = mib(idle),
                w = mib(busy),
                a = start,
                b = start + ramp,
                c = start + ramp + busy_s,
                d = start + 2.0 * ramp + busy_s,
            );
            let _ = writeln!(lines, "period_s = {period}\nphase_shift_s = {shift}");
            demand = idle + (busy - idle) * (busy_s + ramp) / period + cache_share;
        }
        Class::Ramp => {
            let (low, high) = (rng.uniform(0.1, 0.3), rng.uniform(0.6, 0.9));
            let period = rng.uniform(600.0, 1200.0).round();
            let rate = rng.log_uniform(64.0, 1024.0);
            let up = ((high - low) * ram / rate).ceil().max(1.0);
            let hold = rng.uniform(60.0, 300.0).round();
            let start = rng
                .uniform(30.0, (period - up - hold - 30.0).max(31.0))
                .round();
            cache_share = rng.uniform(0.1, 0.3);
            hot_share = rng.uniform(0.1, 0.5);
            let shift = if rng.chance(0.3) {
                0.0
            } else {
                (period * rng.uniform(0.15, 0.45)).round()
            };
            let _ = writeln!(
                lines,
                "working_set_mib = [[0, {l}], [{a}, {l}], [{b}, {h}], [{c}, {h}], [{d}, {l}], [{period}, {l}]]",
                l = mib(low),
                h = mib(high),
                a = start,
                b = start + up,
                c = start + up + hold,
                d = start + up + hold + 30.0,
            );
            let _ = writeln!(lines, "period_s = {period}\nphase_shift_s = {shift}");
            demand = low + (high - low) * hold / period + cache_share;
        }
        Class::Leak => {
            let (low, high) = (rng.uniform(0.1, 0.3), rng.uniform(0.85, 0.97));
            cache_share = rng.uniform(0.1, 0.3);
            hot_share = rng.uniform(0.1, 0.3);
            let _ = writeln!(
                lines,
                "working_set_mib = [[0, {}], [{DURATION_S}, {}]]\nphase_shift_s = {}",
                mib(low),
                mib(high),
                rng.uniform(0.0, 300.0).round()
            );
            demand = (low + high) / 2.0 + cache_share;
        }
        Class::CacheHeavy => {
            let ws = rng.uniform(0.05, 0.2);
            cache_share = rng.uniform(0.5, 0.8);
            hot_share = rng.uniform(0.05, 0.3);
            let _ = writeln!(lines, "working_set_mib = [[0, {}]]", mib(ws));
            demand = ws + cache_share;
        }
        Class::BootStorm => {
            let touch = rng.uniform(0.7, 0.95);
            let settle = rng.uniform(0.15, 0.4);
            let boot = rng.uniform(30.0, 90.0).round();
            cache_share = rng.uniform(0.1, 0.3);
            hot_share = rng.uniform(0.1, 0.5);
            let _ = writeln!(
                lines,
                "working_set_mib = [[0, {t}], [{boot}, {t}], [{e}, {s}]]\nstart_every_s = {every}",
                t = mib(touch),
                s = mib(settle),
                e = boot + 10.0,
                every = rng.uniform(5.0, 30.0).round()
            );
            demand = settle + cache_share;
        }
    }
    let _ = writeln!(
        lines,
        "cache_mib = [[0, {}]]\nhot_cache_mib = [[0, {}]]",
        mib(cache_share),
        mib(cache_share * hot_share)
    );
    (lines, demand)
}

/// Scenario `index` of the family of `seed`, as scenario-file text.
pub fn scenario_text(seed: u64, index: u64) -> String {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    // Warm up, so neighbouring indices diverge at once.
    for _ in 0..4 {
        rng.next_u64();
    }
    let host_gib = rng.pick(&HOST_GIB, 32);
    let host_mib = host_gib * 1024;
    let other = (host_mib as f64 * rng.uniform(0.03, 0.08))
        .max(512.0)
        .round();
    let mut text = format!(
        "# family seed {seed}, scenario {index}\nduration_s = {DURATION_S}\ntick_s = {TICK_S}\nhost_total_mib = {host_mib}\n"
    );
    if rng.chance(0.25) {
        // A host process that takes 10-30 % of the host for a while.
        let spike = (host_mib as f64 * rng.uniform(0.1, 0.3)).round();
        let start = rng.uniform(100.0, 800.0).round();
        let rise = rng.uniform(10.0, 60.0).round();
        let hold = rng.uniform(60.0, 300.0).round();
        let _ = writeln!(
            text,
            "host_other_mib = [[0, {other}], [{start}, {other}], [{a}, {peak}], [{b}, {peak}], [{c}, {other}]]",
            a = start + rise,
            b = start + rise + hold,
            c = start + 2.0 * rise + hold,
            peak = other + spike
        );
    } else {
        let _ = writeln!(text, "host_other_mib = [[0, {other}]]");
    }
    let kinds_count = match rng.unit() {
        x if x < 0.25 => 1,
        x if x < 0.6 => 2,
        x if x < 0.85 => 3,
        _ => 4,
    };
    // The fleet's mean resident demand aims at `load` times 80 % of what
    // the host has beside its own use: from a host that never needs to
    // reclaim (0.75) to one that must squeeze page cache hard (1.3).
    let load = rng.uniform(0.75, 1.3);
    let demand_total = load * 0.8 * (host_mib as f64 - other);
    let vms_wanted = rng.log_uniform(MIN_VMS as f64, MAX_VMS as f64 + 1.0);
    let weights: Vec<f64> = (0..kinds_count).map(|_| rng.uniform(0.5, 1.5)).collect();
    let weight_sum: f64 = weights.iter().sum();
    let largest_vm = (host_gib / 4).max(1);
    let mut kinds: Vec<Kind> = Vec::new();
    let last = weights.len().saturating_sub(1);
    for (position, weight) in weights.into_iter().enumerate() {
        let share = weight / weight_sum;
        let mut class = rng.pick(&Class::ALL, Class::Steady);
        if position == last && !kinds.iter().any(|k| k.class.searchable()) && !class.searchable() {
            // Every scenario has a kind whose density can be searched.
            class = rng.pick(&Class::SEARCHABLE, Class::Steady);
        }
        let sizes: Vec<u64> = VM_GIB
            .iter()
            .copied()
            .filter(|g| *g <= largest_vm)
            .collect();
        // The size that gives this kind its share of VMs, rounded to one
        // of the sizes the family uses.
        let count_wanted = (vms_wanted * share).max(1.0);
        let probe_ram = 4096.0;
        let (_, probe_demand) = kind_body(&mut rng.clone(), class, probe_ram);
        let ideal_gib = demand_total * share / (count_wanted * probe_demand.max(0.05)) / 1024.0;
        let ram_gib = sizes
            .iter()
            .copied()
            .min_by(|a, b| {
                let distance = |g: u64| ((g as f64).ln() - ideal_gib.max(0.5).ln()).abs();
                distance(*a).total_cmp(&distance(*b))
            })
            .unwrap_or(1);
        let ram = (ram_gib * 1024) as f64;
        let (body, demand) = kind_body(&mut rng, class, ram);
        let count = match class {
            Class::Leak => 1 + u64::from(rng.chance(0.3)),
            _ => ((demand_total * share / (ram * demand.max(0.05))).round() as u64).max(1),
        };
        let base = class.name();
        let same = kinds.iter().filter(|k| k.class == class).count();
        let name = if same == 0 {
            base.to_string()
        } else {
            format!("{base}{}", same + 1)
        };
        let mut text = format!(
            "\n[[vm]]\nname = \"{name}\"\nram_mib = {}\n{body}",
            ram_gib * 1024
        );
        if rng.chance(0.4) {
            let _ = writeln!(
                text,
                "swap_mib = {}",
                (ram * rng.uniform(0.05, 0.25)).round()
            );
        }
        if rng.chance(0.15) {
            text.push_str("free_page_reporting = false\n");
        }
        if rng.chance(0.1) {
            text.push_str("deflate_on_oom = false\n");
        }
        if rng.chance(0.5) {
            text.push_str("agent = true\n");
        }
        let shares = rng.pick(&[500u64, 1000, 1000, 2000, 4000], 1000);
        let limit = rng.pick(&[50u64, 65, 65, 75], 65);
        let _ = writeln!(
            text,
            "policy = {{ shares = {shares}, max_reclaim_percent = {limit} }}"
        );
        kinds.push(Kind {
            class,
            name,
            ram_mib: ram_gib * 1024,
            count,
            text,
        });
    }
    // Between MIN_VMS and MAX_VMS VMs in all.
    let total = |kinds: &[Kind]| kinds.iter().map(|k| k.count).sum::<u64>();
    while total(&kinds) > MAX_VMS {
        if let Some(k) = kinds.iter_mut().max_by_key(|k| k.count) {
            k.count = k.count * 3 / 4;
        }
    }
    while total(&kinds) < MIN_VMS {
        if let Some(k) = kinds
            .iter_mut()
            .filter(|k| k.class != Class::Leak)
            .min_by_key(|k| k.ram_mib)
        {
            k.count += 1;
        } else if let Some(k) = kinds.first_mut() {
            k.count += 1;
        }
    }
    for kind in &kinds {
        text.push_str(&kind.text);
        let _ = writeln!(text, "count = {}", kind.count);
    }
    // The named class whose safe density is searched: the most numerous
    // kind of a searchable class.
    if let Some(named) = kinds
        .iter()
        .filter(|k| k.class.searchable())
        .max_by_key(|k| (k.count, k.ram_mib))
    {
        let others = total(&kinds) - named.count;
        let max_count = (named.count * 4 + 8).min(MAX_VMS * 2 - others);
        let _ = write!(
            text,
            "\n[density]\nvm = \"{}\"\nmax_count = {max_count}\n",
            named.name
        );
    }
    text
}

/// Scenario `index` of the family of `seed`, parsed and checked.
pub fn scenario(seed: u64, index: u64) -> Result<Scenario, SimError> {
    let text = scenario_text(seed, index);
    let invalid = |message: String| SimError::Family {
        seed,
        index,
        message,
        text: text.clone(),
    };
    let scenario: Scenario = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    scenario.validate().map_err(invalid)?;
    Ok(scenario)
}

/// One policy on one scenario of the family.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub policy: PolicyKind,
    pub metrics: Metrics,
    /// Safe density of the named class (`[density]`).
    pub density: u64,
}

/// Every policy on one scenario.
#[derive(Clone, Debug)]
pub struct Row {
    pub index: u64,
    pub host_gib: u64,
    pub vms: u64,
    pub classes: String,
    pub named: String,
    pub outcomes: Vec<Outcome>,
}

impl Row {
    fn outcome(&self, policy: PolicyKind) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.policy == policy)
    }

    /// Ours against the baselines: (ours, the best baseline by harm, the
    /// best baseline density).
    fn ours_and_best(&self) -> Option<(&Outcome, f64, u64)> {
        let ours = self.outcome(PolicyKind::BalloonStack)?;
        let baselines = self
            .outcomes
            .iter()
            .filter(|o| o.policy != PolicyKind::BalloonStack);
        let best_harm = baselines
            .clone()
            .map(|o| o.metrics.harm())
            .fold(f64::INFINITY, f64::min);
        let best_density = baselines.map(|o| o.density).max().unwrap_or(0);
        Some((ours, best_harm, best_density))
    }
}

/// Harm is counted per second: within one second of another run's it is
/// no worse.
pub const HARM_TOLERANCE: f64 = 1.0;

/// Whether `ours` did no more harm than `theirs` (`Metrics::harm`).
pub fn no_worse(ours: &Metrics, theirs: &Metrics) -> bool {
    ours.harm() <= theirs.harm() + HARM_TOLERANCE
}

/// Ours / the best baseline's safe density; None when both are 0 (no
/// policy holds even one VM of the named class safely beside the others:
/// the scenario says nothing of density), ours + 1 against a best baseline
/// of 0.
pub fn density_ratio(ours: u64, best: u64) -> Option<f64> {
    match (ours, best) {
        (0, 0) => None,
        (ours, 0) => Some(ours as f64 + 1.0),
        (ours, best) => Some(ours as f64 / best as f64),
    }
}

/// Runs every policy of `policies` (ours first) on scenario `index`.
pub fn run_one(seed: u64, index: u64, policies: &[PolicyKind]) -> Result<Row, SimError> {
    let scenario = scenario(seed, index)?;
    let named = scenario
        .density
        .as_ref()
        .map(|d| d.vm.clone())
        .unwrap_or_default();
    let outcomes = policies
        .iter()
        .map(|&policy| Outcome {
            policy,
            metrics: run_with(&scenario, Some(policy)).1,
            density: scenario
                .density
                .as_ref()
                .map_or(0, |search| safe_density_bisected(&scenario, search, policy)),
        })
        .collect();
    let mut classes: Vec<&str> = scenario.vm.iter().map(|vm| vm.name.as_str()).collect();
    classes.sort_unstable();
    Ok(Row {
        index,
        host_gib: scenario.host_total_mib / 1024,
        vms: scenario.vm.iter().map(|vm| vm.count).sum(),
        classes: classes.join(" "),
        named,
        outcomes,
    })
}

/// Runs scenarios `0..count` of `seed` on every thread the machine has.
pub fn run_family(seed: u64, count: u64, policies: &[PolicyKind]) -> Result<Vec<Row>, SimError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicU64::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= count {
                    break;
                }
                let row = run_one(seed, index, policies);
                if let Ok(mut results) = results.lock() {
                    results.push((index, row));
                }
            });
        }
    });
    let mut results = results.into_inner().map_err(|_| SimError::ThreadPanicked)?;
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, row)| row).collect()
}

/// The quantile `q` (0-1) of sorted `values` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let last = sorted.len() - 1;
    let rank = ((last as f64) * q.clamp(0.0, 1.0)).round() as usize;
    sorted.get(rank.min(last)).copied().unwrap_or(f64::NAN)
}

/// What the family says, in numbers the tests assert.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub scenarios: usize,
    /// Per baseline: the share of scenarios where ours did no more harm.
    pub no_worse_than: Vec<(PolicyKind, f64)>,
    /// The share where ours did no more harm than the best baseline.
    pub no_worse_than_best: f64,
    /// Ours / best baseline safe density, sorted (scenarios where no
    /// policy holds one VM of the named class are left out).
    pub density_ratios: Vec<f64>,
}

impl Summary {
    pub fn median_density_ratio(&self) -> f64 {
        quantile(&self.density_ratios, 0.5)
    }
}

pub fn summarise(rows: &[Row]) -> Summary {
    let baselines: Vec<PolicyKind> = rows
        .first()
        .map(|row| {
            row.outcomes
                .iter()
                .map(|o| o.policy)
                .filter(|p| *p != PolicyKind::BalloonStack)
                .collect()
        })
        .unwrap_or_default();
    let share = |hits: usize| {
        if rows.is_empty() {
            0.0
        } else {
            hits as f64 / rows.len() as f64
        }
    };
    let no_worse_than = baselines
        .iter()
        .map(|&baseline| {
            let hits = rows
                .iter()
                .filter(|row| {
                    match (row.outcome(PolicyKind::BalloonStack), row.outcome(baseline)) {
                        (Some(ours), Some(theirs)) => no_worse(&ours.metrics, &theirs.metrics),
                        _ => false,
                    }
                })
                .count();
            (baseline, share(hits))
        })
        .collect();
    let best_hits = rows
        .iter()
        .filter(|row| {
            row.ours_and_best()
                .is_some_and(|(ours, best, _)| ours.metrics.harm() <= best + HARM_TOLERANCE)
        })
        .count();
    let mut density_ratios: Vec<f64> = rows
        .iter()
        .filter_map(|row| {
            row.ours_and_best()
                .and_then(|(ours, _, best)| density_ratio(ours.density, best))
        })
        .collect();
    density_ratios.sort_by(f64::total_cmp);
    Summary {
        scenarios: rows.len(),
        no_worse_than,
        no_worse_than_best: share(best_hits),
        density_ratios,
    }
}

/// `DIR/table.md`: the summary, then a row per scenario.
pub fn table(seed: u64, rows: &[Row]) -> String {
    let summary = summarise(rows);
    let mut out = format!(
        "# Policy family: {} scenarios of seed {seed}\n\n\
         Harm = host overload s + guest stall VM-s + OOM kills; \"no worse\" = at most \
         {HARM_TOLERANCE} more. Safe density: the largest count of the named class with no \
         overload, no OOM kill and guest stalls under 1 % of VM-seconds.\n\n\
         | ours against | scenarios where ours does no more harm |\n|---|---|\n",
        summary.scenarios
    );
    for (baseline, share) in &summary.no_worse_than {
        let _ = writeln!(out, "| {} | {:.1} % |", baseline.name(), share * 100.0);
    }
    let _ = writeln!(
        out,
        "| the best baseline of each scenario | {:.1} % |\n",
        summary.no_worse_than_best * 100.0
    );
    let r = &summary.density_ratios;
    let _ = writeln!(
        out,
        "Safe density, ours / the best baseline's, over the {} scenarios where some policy \
         holds one VM of the named class safely ({} where none does are left out):\n\n\
         | min | 10 % | 25 % | median | 75 % | 90 % | max |\n|---|---|---|---|---|---|---|\n\
         | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
        r.len(),
        summary.scenarios.saturating_sub(r.len()),
        quantile(r, 0.0),
        quantile(r, 0.1),
        quantile(r, 0.25),
        quantile(r, 0.5),
        quantile(r, 0.75),
        quantile(r, 0.9),
        quantile(r, 1.0)
    );
    let policies: Vec<PolicyKind> = rows
        .first()
        .map(|row| row.outcomes.iter().map(|o| o.policy).collect())
        .unwrap_or_default();
    out.push_str("| # | host GiB | VMs | kinds | named |");
    for policy in &policies {
        let _ = write!(
            out,
            " {p}: overload s / stall VM-s / OOM kills / deflate-on-OOM / balloon GiB x s / density |",
            p = policy.name()
        );
    }
    out.push('\n');
    out.push_str("|---|---|---|---|---|");
    for _ in &policies {
        out.push_str("---|");
    }
    out.push('\n');
    for row in rows {
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.index, row.host_gib, row.vms, row.classes, row.named
        );
        for o in &row.outcomes {
            let m = &o.metrics;
            let _ = write!(
                out,
                " {} / {:.0} / {} / {} / {:.0} / {} |",
                m.overload_s,
                m.pressure_vm_s,
                m.oom_kills,
                m.oom_deflate_events,
                m.returned_gib_s,
                o.density
            );
        }
        out.push('\n');
    }
    out
}

/// `simulate --family N --seed S --out DIR`: writes every scenario to
/// `DIR/scenarios/NNN.toml` and the summary to `DIR/table.md`; returns the
/// summary's head.
pub fn simulate_family(
    count: u64,
    seed: u64,
    policies: &[PolicyKind],
    dir: &Path,
) -> Result<String, SimError> {
    let scenarios = dir.join("scenarios");
    std::fs::create_dir_all(&scenarios).map_err(|source| SimError::CreateDir {
        path: scenarios.clone(),
        source,
    })?;
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|source| SimError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    for index in 0..count {
        write(
            &scenarios.join(format!("{index:03}.toml")),
            &scenario_text(seed, index),
        )?;
    }
    let rows = run_family(seed, count, policies)?;
    let text = table(seed, &rows);
    write(&dir.join("table.md"), &text)?;
    let head: String = text.split("| # |").next().unwrap_or_default().to_string();
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_of_the_family_parses_and_stays_in_its_ranges() {
        for index in 0..300 {
            let scenario = scenario(7, index).unwrap_or_else(|e| panic!("{e}"));
            let host_gib = scenario.host_total_mib / 1024;
            assert!(HOST_GIB.contains(&host_gib));
            let vms: u64 = scenario.vm.iter().map(|vm| vm.count).sum();
            assert!((MIN_VMS..=MAX_VMS).contains(&vms), "{index}: {vms} VMs");
            for vm in &scenario.vm {
                assert!(
                    VM_GIB.contains(&(vm.ram_mib / 1024)),
                    "{index}: {}",
                    vm.ram_mib
                );
                assert!(vm.ram_mib / 1024 <= (host_gib / 4).max(1));
            }
            assert!(scenario.density.is_some());
        }
        // The same seed and index give the same scenario.
        assert_eq!(scenario_text(7, 3), scenario_text(7, 3));
        assert_ne!(scenario_text(7, 3), scenario_text(8, 3));
    }

    /// The seed the goals are asserted on.
    pub const GOAL_SEED: u64 = 26;
    pub const GOAL_SCENARIOS: u64 = 200;

    /// Issue 26's goals over 200 generated scenarios: ours does no more
    /// harm (host overload s + guest stall VM-s + OOM kills) than the best
    /// baseline in at least 95 % of them, and its median safe density is
    /// at least 1.3 times the best baseline's. About a minute in release;
    /// `cargo xtask test` runs it (release), a debug `cargo test` skips it.
    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "about 15 minutes unoptimised: run with --release"
    )]
    fn ours_meets_the_goals_over_200_generated_scenarios() {
        let rows = run_family(GOAL_SEED, GOAL_SCENARIOS, &PolicyKind::ALL)
            .unwrap_or_else(|e| panic!("{e}"));
        let summary = summarise(&rows);
        let table = table(GOAL_SEED, &rows);
        assert_eq!(summary.scenarios, 200);
        assert!(
            summary.no_worse_than_best >= 0.95,
            "ours no worse than the best baseline in only {:.1} % of the scenarios\n{table}",
            summary.no_worse_than_best * 100.0
        );
        assert!(
            summary.density_ratios.len() >= 150,
            "too few scenarios say anything of density: {}",
            summary.density_ratios.len()
        );
        assert!(
            summary.median_density_ratio() >= 1.3,
            "median safe density only {:.2}x the best baseline's\n{table}",
            summary.median_density_ratio()
        );
    }

    #[test]
    fn quantiles_and_ratios() {
        let values = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&values, 0.5), 3.0);
        assert_eq!(quantile(&values, 0.0), 1.0);
        assert_eq!(quantile(&values, 1.0), 5.0);
        assert_eq!(density_ratio(0, 0), None);
        assert_eq!(density_ratio(3, 0), Some(4.0));
        assert_eq!(density_ratio(13, 10), Some(1.3));
    }
}
