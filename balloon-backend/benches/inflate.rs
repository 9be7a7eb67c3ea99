//! Inflate-path throughput over a 1 GiB shmem file with every page
//! resident, in one run: the device's path (validate, sort, dedupe,
//! coalesce, track, punch) for contiguous and for scattered PFNs, against
//! one `fallocate` per 4 KiB page (the naive baseline) and one punch of the
//! whole range (the physical limit), also while a second process maps and
//! has touched every page, as QEMU does guest RAM (then the kernel must also
//! unmap the pages from it). Prints a Markdown table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use balloon_backend::host_memory::{allocated_bytes, punch_hole, GuestRam};
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{map_file, InflatePath};

const RAM_BYTES: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// PFNs per request, as the Linux driver sends them.
const BATCH: usize = 256;
const REPEATS: usize = 3;

fn populate(file: &File) {
    let chunk = vec![0xa5u8; 1 << 20];
    for offset in (0..RAM_BYTES).step_by(chunk.len()) {
        file.write_all_at(&chunk, offset).unwrap();
    }
    assert_eq!(allocated_bytes(file, 0, RAM_BYTES).unwrap(), RAM_BYTES);
}

/// Set in the environment of the second process: the memory file's path.
const HOLDER_ENV: &str = "INFLATE_BENCH_MAPPED_FILE";

/// The second process: maps the file and, for every line on stdin, writes
/// one byte into each page (as a running guest would have) and answers.
fn hold_mapped(path: &str) {
    let file = File::options().read(true).write(true).open(path).unwrap();
    let memory = map_file(&file, RAM_BYTES);
    let mut stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        line.unwrap();
        for page in 0..RAM_BYTES / PAGE {
            memory.write_obj(0xa5u8, GuestAddress(page * PAGE)).unwrap();
        }
        writeln!(stdout, "touched").unwrap();
        stdout.flush().unwrap();
    }
}

/// A second process that maps the memory file at `path`.
struct Holder {
    child: Child,
    replies: BufReader<std::process::ChildStdout>,
}

impl Holder {
    fn start(path: &std::path::Path) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(HOLDER_ENV, path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let replies = BufReader::new(child.stdout.take().unwrap());
        Holder { child, replies }
    }

    /// Has the second process touch every page through its mapping.
    fn touch_all(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "touch").unwrap();
        stdin.flush().unwrap();
        let mut reply = String::new();
        self.replies.read_line(&mut reply).unwrap();
        assert_eq!(reply.trim(), "touched");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
    }
}

/// Median time of `run` over fresh, fully resident memory; checks that
/// every byte was freed.
fn measure(file: &File, run: impl FnMut()) -> Duration {
    measure_prepared(file, || populate(file), run)
}

/// `measure` with its own way of making the memory resident.
fn measure_prepared(file: &File, mut prepare: impl FnMut(), mut run: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..REPEATS)
        .map(|_| {
            prepare();
            let start = Instant::now();
            run();
            let elapsed = start.elapsed();
            assert_eq!(
                allocated_bytes(file, 0, RAM_BYTES).unwrap(),
                0,
                "not everything was freed"
            );
            elapsed
        })
        .collect();
    times.sort();
    times[REPEATS / 2]
}

/// A deterministic shuffle (xorshift), so runs are comparable.
fn shuffled(mut pfns: Vec<u32>) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..pfns.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        pfns.swap(i, (state % (i as u64 + 1)) as usize);
    }
    pfns
}

fn device_path(ram: &GuestRam, pfns: &[u32]) {
    let mut path = InflatePath::new(ram);
    for batch in pfns.chunks(BATCH) {
        path.request(batch.iter().copied());
    }
    path.finish();
}

fn main() {
    if let Ok(path) = std::env::var(HOLDER_ENV) {
        return hold_mapped(&path);
    }
    let named = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
    let file = named.as_file().try_clone().unwrap();
    file.set_len(RAM_BYTES).unwrap();
    let memory = map_file(&file, RAM_BYTES);
    let ram = GuestRam::from_memory(&memory).unwrap();
    let contiguous: Vec<u32> = (0..(RAM_BYTES / PAGE) as u32).collect();
    let scattered = shuffled(contiguous.clone());

    let per_page = measure(&file, || {
        for page in 0..RAM_BYTES / PAGE {
            punch_hole(&file, page * PAGE, PAGE).unwrap();
        }
    });
    let whole = measure(&file, || punch_hole(&file, 0, RAM_BYTES).unwrap());
    let ours_contiguous = measure(&file, || device_path(&ram, &contiguous));
    let ours_scattered = measure(&file, || device_path(&ram, &scattered));
    let mut holder = Holder::start(named.path());
    let whole_mapped = measure_prepared(
        &file,
        || holder.touch_all(),
        || punch_hole(&file, 0, RAM_BYTES).unwrap(),
    );
    drop(holder);

    let gib_s = |d: Duration| RAM_BYTES as f64 / (1u64 << 30) as f64 / d.as_secs_f64();
    println!("| inflate path (1 GiB, {BATCH} PFNs per request) | time | GiB/s | vs one fallocate per page | vs whole-range punch |");
    println!("|---|---|---|---|---|");
    for (name, time) in [
        ("baseline: one `fallocate` per 4 KiB page", per_page),
        ("balloon-backend, contiguous PFNs", ours_contiguous),
        ("balloon-backend, scattered PFNs (shuffled)", ours_scattered),
        ("limit: one punch of the whole range", whole),
        (
            "limit, as guest RAM is: one punch of the whole range, every page mapped and touched by a second process",
            whole_mapped,
        ),
    ] {
        println!(
            "| {name} | {:.3} s | {:.1} | {:.2}x | {:.2}x |",
            time.as_secs_f64(),
            gib_s(time),
            per_page.as_secs_f64() / time.as_secs_f64(),
            whole.as_secs_f64() / time.as_secs_f64(),
        );
    }
}
