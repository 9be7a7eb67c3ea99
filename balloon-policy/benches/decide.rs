//! Decision time per tick for 10, 100, 1,000 and 10,000 VMs (the pure policy, as the
//! daemon and the simulator run it). Prints a Markdown table; the baseline
//! is the 10-VM tick of the same run.

use std::time::{Duration, Instant};

use balloon_policy::policy::{
    decide, GuestCounters, GuestSample, HostState, HostThresholds, PolicyMemory, VmInput,
};
use balloon_policy::VmPolicy;

const GIB: u64 = 1 << 30;

fn vms(count: usize) -> Vec<VmInput> {
    (0..count)
        .map(|i| VmInput {
            name: format!("vm{i}"),
            guest_ram_bytes: (4 + (i as u64 % 8)) * GIB,
            target_bytes: (i as u64 % 5) * (256 << 20),
            actual_bytes: (i as u64 % 5) * (256 << 20),
            device_max_reclaim_bytes: 3 * GIB,
            sample: Some(GuestSample {
                available_bytes: (1 + (i as u64 % 3)) * GIB,
                free_bytes: Some(GIB / 2),
                counters: GuestCounters {
                    alloc_stalls: Some(i as u64),
                    ..Default::default()
                },
                age_s: 2,
                psi_some_avg10: None,
                balloon_bytes: None,
            }),
            policy: VmPolicy::default(),
            pinned: false,
            free_page_reporting: None,
            resident_bytes: None,
            agent_page_cache_bytes: None,
            agent_reclaim: Default::default(),
        })
        .collect()
}

fn median_tick(count: usize) -> Duration {
    let inputs = vms(count);
    let host = HostState {
        total_bytes: 512 * GIB,
        available_bytes: 60 * GIB,
        psi_some_avg10: None,
    };
    let thresholds = HostThresholds {
        reclaim_start_percent: 20,
        reclaim_hard_percent: 10,
        give_back_percent: 35,
        psi_some_avg10: 10.0,
    };
    let mut memory = PolicyMemory::default();
    let mut times: Vec<Duration> = (0..301)
        .map(|tick| {
            let start = Instant::now();
            let decision = decide(tick, &host, &thresholds, &inputs, &memory);
            let elapsed = start.elapsed();
            memory = decision.memory;
            elapsed
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let baseline = median_tick(10);
    println!("| VMs | decision time per tick (median of 301) | per VM | vs 10 VMs per VM (limit 1.30x up to 1,000) |");
    println!("|---|---|---|---|");
    for count in [10usize, 100, 1000, 10_000] {
        let time = if count == 10 {
            baseline
        } else {
            median_tick(count)
        };
        let per_vm = time.as_secs_f64() / count as f64;
        let base_per_vm = baseline.as_secs_f64() / 10.0;
        println!(
            "| {count} | {:.1} µs | {:.2} µs | {:.2}x |",
            time.as_secs_f64() * 1e6,
            per_vm * 1e6,
            per_vm / base_per_vm
        );
    }
}
