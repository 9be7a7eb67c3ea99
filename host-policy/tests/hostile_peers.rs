//! The host-policy daemon next to peers that misbehave: fake backends and
//! fake guest agents that never read, flood without a newline, send garbage
//! at speed, or accept and never answer, each beside one healthy VM (a real
//! balloon-backend). The healthy VM is decided every tick at the normal
//! pace, host-policy's memory stays bounded, and every misbehaviour is
//! counted under its own name in the state `host-policy status` reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::{Harness, GUEST_RAM_BYTES, MIB};

const BINARY: &str = env!("CARGO_BIN_EXE_host-policy");
/// What one flooding peer sends without a newline.
const FLOOD_BYTES: usize = 100 << 20;
/// host-policy's peak resident memory under all of it stays below this.
const RSS_BOUND_KIB: u64 = 32 * 1024;

fn backend_binary() -> PathBuf {
    test_support::workspace_binary("balloon-backend")
}

#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    NeverReads,
    FloodsWithoutNewline,
    Garbage,
    AcceptsAndNeverAnswers,
}

const ALL: [Misbehaviour; 4] = [
    Misbehaviour::NeverReads,
    Misbehaviour::FloodsWithoutNewline,
    Misbehaviour::Garbage,
    Misbehaviour::AcceptsAndNeverAnswers,
];

/// Writes until `stop`, the flood is out, or the reader goes away.
fn flood(mut stream: UnixStream, stop: &AtomicBool, chunk: &[u8], total: usize) {
    let mut sent = 0;
    while sent < total && !stop.load(Ordering::Relaxed) {
        if stream.write_all(chunk).is_err() {
            return;
        }
        sent += chunk.len();
    }
}

/// Garbage and invalid JSON lines, as fast as they are taken.
const GARBAGE: &[u8] = b"\x00\xffnot json at all\n{\"v\":1,\"type\":\"report\",\"seq\":\"x\"}\n{{{{\n[1,2,3]\n{\"ok\":tru\n";

/// Serves one misbehaving peer on `listener` until `stop`. An agent first
/// sends one valid report (1 GiB of page cache, so host-policy asks it to
/// reclaim before inflating).
fn serve_badly(listener: UnixListener, how: Misbehaviour, agent: bool, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    let mut held = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        stream.set_nonblocking(false).unwrap();
        if agent {
            let report = json!({"v":1,"type":"report","reason":"hello","seq":1,
                "meminfo":{"total_bytes":4u64<<30,"free_bytes":1u64<<30,"available_bytes":3u64<<30,
                           "page_cache_bytes":1u64<<30,"shmem_bytes":0},
                "vmstat":{"major_faults":0,"swap_in_pages":0,"swap_out_pages":0,"alloc_stalls":0,"direct_scans":0,"oom_kills":0},
                "psi":null,"cgroup":null});
            if writeln!(stream, "{report}").is_err() {
                continue;
            }
        }
        let stop = stop.clone();
        match how {
            Misbehaviour::NeverReads | Misbehaviour::AcceptsAndNeverAnswers => {
                if matches!(how, Misbehaviour::AcceptsAndNeverAnswers) {
                    // Reads everything, answers nothing.
                    let reader = stream.try_clone().unwrap();
                    std::thread::spawn(move || {
                        let mut sink = Vec::new();
                        if let Err(error) = BufReader::new(reader).read_to_end(&mut sink) {
                            eprintln!("fake peer stopped reading: {error}");
                        }
                    });
                }
                held.push(stream);
            }
            Misbehaviour::FloodsWithoutNewline => {
                std::thread::spawn(move || flood(stream, &stop, &[b'x'; 64 * 1024], FLOOD_BYTES));
            }
            Misbehaviour::Garbage => {
                std::thread::spawn(move || {
                    let chunk: Vec<u8> = GARBAGE.repeat(1000);
                    flood(stream, &stop, &chunk, usize::MAX)
                });
            }
        }
    }
}

/// A backend that answers well: a connected 4 GiB guest with fresh
/// statistics, and every set-target.
fn serve_well(listener: UnixListener, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let Ok((stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        stream.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            let mut out = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let request: Value = serde_json::from_str(&line).unwrap();
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                let reply = match request["cmd"].as_str() {
                    Some("set-target") => {
                        json!({"ok":true,"target_bytes":request["bytes"],"clamped":false,"notified":true})
                    }
                    _ => {
                        json!({"ok":true,"connected":true,"guest_ram_bytes":4u64<<30,"target_bytes":0,
                        "actual_bytes":0,"max_reclaim_bytes":(4u64<<30)*65/100/4096*4096,"max_reclaim_percent":65,
                        "ballooned_bytes":0,"discarded_bytes":0,"reported_bytes_total":0,
                        "guest_ram_resident_bytes":null,"features":[],"config_notify":true,
                        "stats":{"free_bytes":0,"available_bytes":3u64<<30,"updated_unix_ms":now_ms},
                        "errors":{}})
                    }
                };
                if writeln!(out, "{reply}").is_err() {
                    return;
                }
            }
        });
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(error) = self.0.kill() {
            eprintln!("stopping host-policy: {error}");
        }
        if let Err(error) = self.0.wait() {
            eprintln!("reaping host-policy: {error}");
        }
    }
}

fn vm_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap()
}

#[test]
fn misbehaving_peers_cost_their_deadline_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut config = String::new();
    // The healthy VM: a real backend with a guest that sends statistics.
    let mut healthy = Harness::start(&backend_binary(), &[]);
    let _answers = healthy.answer_config_changes();
    healthy.send_stats(&[(4, 40 * MIB), (5, GUEST_RAM_BYTES), (6, 40 * MIB)]);
    config.push_str(&format!(
        "[[vm]]\nname = \"healthy\"\ncontrol = {:?}\n\n",
        healthy.dir.path().join("control.sock")
    ));
    for (i, how) in ALL.iter().enumerate() {
        let path = dir.path().join(format!("backend-{i}.ctl"));
        let listener = UnixListener::bind(&path).unwrap();
        let stop_bad = stop.clone();
        let how = *how;
        threads.push(std::thread::spawn(move || {
            serve_badly(listener, how, false, stop_bad)
        }));
        config.push_str(&format!(
            "[[vm]]\nname = \"backend-{i}\"\ncontrol = {path:?}\n\n"
        ));

        let control = dir.path().join(format!("agent-vm-{i}.ctl"));
        let listener = UnixListener::bind(&control).unwrap();
        let stop_good = stop.clone();
        threads.push(std::thread::spawn(move || serve_well(listener, stop_good)));
        let agent = dir.path().join(format!("agent-{i}.sock"));
        let listener = UnixListener::bind(&agent).unwrap();
        let stop_bad = stop.clone();
        threads.push(std::thread::spawn(move || {
            serve_badly(listener, how, true, stop_bad)
        }));
        config.push_str(&format!(
            "[[vm]]\nname = \"agent-{i}\"\ncontrol = {control:?}\nagent = {agent:?}\n\n"
        ));
    }
    // Host at 8 % available: every VM with fresh statistics is inflated, so
    // host-policy also asks each fake agent to reclaim first.
    let meminfo = dir.path().join("meminfo");
    std::fs::write(
        &meminfo,
        "MemTotal: 16777216 kB\nMemAvailable: 1342177 kB\n",
    )
    .unwrap();
    let state = dir.path().join("state.json");
    let config_path = dir.path().join("host-policy.toml");
    std::fs::write(
        &config_path,
        format!(
            "[host]\ninterval_s = 1\nmeminfo = {meminfo:?}\nstate_file = {state:?}\n\n[defaults]\nmin_free_mib = 4\nmin_free_percent = 0\ninflate_step_mib = 1\nhard_inflate_step_mib = 1\nmin_change_mib = 0\n\n{config}"
        ),
    )
    .unwrap();
    let daemon = Daemon(
        Command::new(BINARY)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = daemon.0.id();

    // Watch the state file: every tick must decide the healthy VM, and the
    // ticks keep their 1 s pace. 25 s outlast the agents' 20 s reclaim
    // deadline.
    let started = Instant::now();
    let mut ticks: Vec<(u64, u64, u64)> = Vec::new(); // (unix_s, tick_ms, healthy target)
    let mut last_unix_s = 0;
    let mut last: Value = Value::Null;
    while started.elapsed() < Duration::from_secs(25) {
        if let Ok(bytes) = std::fs::read(&state) {
            if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
                let unix_s = value["unix_s"].as_u64().unwrap();
                if unix_s != last_unix_s {
                    last_unix_s = unix_s;
                    let healthy_decision = value["decision"]["vms"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|vm| vm["name"] == "healthy")
                        .cloned();
                    let healthy_decision = healthy_decision
                        .unwrap_or_else(|| panic!("no decision for the healthy VM: {value}"));
                    ticks.push((
                        unix_s,
                        value["tick_ms"].as_u64().unwrap(),
                        healthy_decision["target_bytes"].as_u64().unwrap(),
                    ));
                    last = value;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak_kib = vm_status_kib(pid, "VmHWM:");
    let rss_kib = vm_status_kib(pid, "VmRSS:");
    stop.store(true, Ordering::Relaxed);
    drop(daemon);
    for thread in threads {
        thread.join().unwrap();
    }

    let slowest_ms = ticks.iter().map(|t| t.1).max().unwrap();
    eprintln!(
        "[hostile] {} ticks in 25 s, slowest tick {slowest_ms} ms; host-policy VmHWM {peak_kib} KiB, VmRSS {rss_kib} KiB",
        ticks.len()
    );
    eprintln!("[hostile] counters: {}", last["errors"]);
    // Every second a tick, each under the interval, and the healthy VM's
    // balloon grows under host pressure.
    assert!(
        ticks.len() >= 20,
        "only {} ticks in 25 s: {ticks:?}",
        ticks.len()
    );
    assert!(slowest_ms <= 1000, "a tick took {slowest_ms} ms: {ticks:?}");
    let healthy_target = ticks.last().unwrap().2;
    assert!(
        healthy_target >= 10 * MIB,
        "healthy VM not inflated: {ticks:?}"
    );
    assert!(
        peak_kib < RSS_BOUND_KIB,
        "host-policy peaked at {peak_kib} KiB (bound {RSS_BOUND_KIB} KiB)"
    );

    let count = |vm: &str, name: &str| last["errors"][vm][name].as_u64().unwrap_or(0);
    // (vm, counter, lowest count, highest count).
    // Backends: 0 never reads, 1 floods, 2 garbage, 3 never answers.
    // Agents: 0 never reads and 3 never answers (both: the reclaim times
    // out, once), 1 floods (a tick reads at most 1 MiB of it), 2 sends garbage.
    let expected: [(&str, &str, u64, u64); 10] = [
        ("backend-0", "backend_read_timeouts", 10, u64::MAX),
        ("backend-1", "backend_read_cap_reached", 1, u64::MAX),
        ("backend-1", "backend_oversized_lines", 1, u64::MAX),
        ("backend-2", "backend_bad_replies", 10, u64::MAX),
        ("backend-3", "backend_read_timeouts", 10, u64::MAX),
        ("agent-0", "reclaim_timeouts", 1, 1),
        ("agent-3", "reclaim_timeouts", 1, 1),
        ("agent-1", "agent_read_cap_reached", 1, u64::MAX),
        ("agent-1", "agent_oversized_lines", 1, u64::MAX),
        ("agent-2", "agent_malformed_lines", 1000, u64::MAX),
    ];
    for (vm, name, lowest, highest) in expected {
        let seen = count(vm, name);
        assert!(
            (lowest..=highest).contains(&seen),
            "{vm} {name}: {seen}, expected {lowest}..={highest}: {}",
            last["errors"]
        );
    }
    // The healthy VM's connection never failed.
    assert!(last["errors"]["healthy"].is_null(), "{}", last["errors"]);
}
