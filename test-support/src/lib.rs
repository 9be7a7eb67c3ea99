//! Test support for every crate's tests: waiting with deadlines (`wait`),
//! child processes that are always stopped and reaped (`child`), memfd
//! guest RAM (`memory`), the in-process device (`rig`), and here an
//! in-process vhost-user frontend for driving the real `balloon-backend`
//! binary: memfd guest RAM with a hole, split virtqueues laid out in that
//! RAM, the backend request channel, and the control socket. Test code:
//! failures panic with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod child;
pub mod memory;
pub mod queue;
pub mod rig;
pub mod wait;

pub use child::ChildGuard;
pub use queue::DriverQueue;
pub use wait::wait_for;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use balloon_backend::device::GuestRamMap;
use balloon_backend::features;
use balloon_protocol::control::ControlClient;
use serde_json::Value;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend};

pub const MIB: u64 = 1 << 20;
/// Region 0: GPA [0, 32 MiB) at file offset 0.
pub const REGION0_BYTES: u64 = 32 * MIB;
/// Region 1: GPA [48 MiB, 64 MiB) at file offset 40 MiB. GPA [32, 48) MiB is a hole.
pub const REGION1_GPA: u64 = 48 * MIB;
pub const REGION1_FILE_OFFSET: u64 = 40 * MIB;
pub const REGION1_BYTES: u64 = 16 * MIB;
/// The memfd: bytes [32, 40) MiB and [56, 72) MiB are *not* guest RAM.
pub const MEMFD_BYTES: u64 = 72 * MIB;
pub const GUEST_RAM_BYTES: u64 = REGION0_BYTES + REGION1_BYTES;
/// Queues and request buffers live at the top of region 1.
pub const QUEUE_AREA_GPA: u64 = 60 * MIB;
pub const BUFFER_AREA_GPA: u64 = 62 * MIB;
pub const QUEUE_SIZE: u16 = 64;
const SENTINEL: u8 = 0x5a;

pub const INFLATE: usize = 0;
pub const DEFLATE: usize = 1;
pub const STATS: usize = 2;
pub const REPORTING: usize = 3;

/// Feature bits the test driver acks (all the device offers but PAGE_POISON).
pub const DRIVER_FEATURES: u64 = features::bit(features::MUST_TELL_HOST)
    | features::bit(features::STATS_VQ)
    | features::bit(features::DEFLATE_ON_OOM)
    | features::bit(features::REPORTING)
    | features::bit(features::RING_EVENT_IDX)
    | features::bit(features::PROTOCOL_FEATURES)
    | features::bit(features::VERSION_1);

/// A binary of this workspace built next to the running test (same target
/// directory and profile), such as `balloon-backend`.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo xtask test` or `cargo test --workspace`",
        binary.display()
    );
    binary
}

/// Bytes allocated in `file` in a range (panics on an I/O error: tests only).
pub fn allocated(file: &File, start: u64, len: u64) -> u64 {
    memory::allocated(file, start, len).unwrap()
}

/// Maps the memfd as guest RAM: region 0 at GPA 0 (file offset 0), region 1
/// at GPA 48 MiB (file offset 40 MiB), a hole between them.
pub fn guest_memory(memfd: &File) -> GuestRamMap {
    GuestRamMap::from_ranges_with_files([
        (
            GuestAddress(0),
            REGION0_BYTES as usize,
            Some(FileOffset::new(memfd.try_clone().unwrap(), 0)),
        ),
        (
            GuestAddress(REGION1_GPA),
            REGION1_BYTES as usize,
            Some(FileOffset::new(
                memfd.try_clone().unwrap(),
                REGION1_FILE_OFFSET,
            )),
        ),
    ])
    .unwrap()
}

/// The memfd ranges that are not guest RAM: (file offset, length).
const OUTSIDE_RAM: [(u64, u64); 2] = [
    (REGION0_BYTES, REGION1_FILE_OFFSET - REGION0_BYTES),
    (
        REGION1_FILE_OFFSET + REGION1_BYTES,
        MEMFD_BYTES - REGION1_FILE_OFFSET - REGION1_BYTES,
    ),
];

/// Fills the memfd bytes that are not guest RAM with a sentinel.
pub fn fill_outside_ram(memfd: &File) {
    for (start, len) in OUTSIDE_RAM {
        memfd
            .write_all_at(&vec![SENTINEL; len as usize], start)
            .unwrap();
    }
}

/// Asserts the memfd bytes that are not guest RAM are allocated and unchanged.
pub fn assert_outside_ram_intact(memfd: &File) {
    for (start, len) in OUTSIDE_RAM {
        assert_eq!(
            allocated(memfd, start, len),
            len,
            "memory outside guest RAM was freed"
        );
        let mut bytes = vec![0u8; len as usize];
        memfd.read_exact_at(&mut bytes, start).unwrap();
        assert!(
            bytes.iter().all(|b| *b == SENTINEL),
            "memory outside guest RAM changed"
        );
    }
}

pub struct Harness {
    /// The backend process (stopped and reaped when the harness drops).
    pub child: ChildGuard,
    pub dir: tempfile::TempDir,
    pub frontend: Frontend,
    pub memfd: File,
    pub mem: GuestRamMap,
    pub queues: Vec<DriverQueue>,
    pub channel: UnixStream,
    control: ControlClient,
    buffer_cursor: u64,
    stats_buffer: Option<u64>,
}

impl Harness {
    pub fn start(binary: &Path, extra_args: &[&str]) -> Harness {
        Self::start_with_features(binary, extra_args, DRIVER_FEATURES)
    }

    /// Starts `binary` (a balloon-backend) with sockets in a new temporary
    /// directory and attaches to it, acking `driver_features` of its offer.
    pub fn start_with_features(
        binary: &Path,
        extra_args: &[&str],
        driver_features: u64,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("balloon.sock");
        let control = dir.path().join("control.sock");
        let child = ChildGuard::new(
            "balloon-backend",
            Command::new(binary)
                .arg("--socket")
                .arg(&socket)
                .arg("--control")
                .arg(&control)
                .args(["--stats-interval", "0"])
                .args(extra_args)
                .env("RUST_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(dir.path().join("backend.log")).unwrap(),
                ))
                .spawn()
                .unwrap(),
        );
        let control_client = wait_for("the control socket", Duration::from_secs(20), || {
            Ok(ControlClient::connect(&control, CONTROL_REPLY_TIMEOUT).ok())
        })
        .unwrap();
        let mut frontend = wait_for("the vhost-user socket", Duration::from_secs(20), || {
            Ok(Frontend::connect(&socket, 5).ok())
        })
        .unwrap();

        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let acked = offered & driver_features;
        frontend.set_features(acked).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();
        let (channel, backend_end) = UnixStream::pair().unwrap();
        frontend.set_backend_request_fd(&backend_end).unwrap();
        drop(backend_end);

        let memfd = memory::memfd("guest-ram", MEMFD_BYTES).unwrap();
        // Fill everything: guest RAM with data, the rest with a sentinel.
        memfd
            .write_all_at(&vec![SENTINEL; MEMFD_BYTES as usize], 0)
            .unwrap();
        let mem = guest_memory(&memfd);
        let regions: Vec<VhostUserMemoryRegionInfo> = [
            (0, REGION0_BYTES, 0),
            (REGION1_GPA, REGION1_BYTES, REGION1_FILE_OFFSET),
        ]
        .iter()
        .map(|&(gpa, size, offset)| VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: mem.get_host_address(GuestAddress(gpa)).unwrap() as u64,
            mmap_offset: offset,
            mmap_handle: memfd.as_raw_fd(),
        })
        .collect();
        frontend.set_mem_table(&regions).unwrap();

        let queue_count = balloon_backend::features::queue_roles(acked).len();
        let mut queues = Vec::new();
        for index in 0..queue_count {
            let queue = DriverQueue::new(&mem, index);
            let (desc, avail, used) = queue.addresses();
            let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
            frontend.set_vring_num(index, QUEUE_SIZE).unwrap();
            frontend
                .set_vring_addr(
                    index,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: host(desc),
                        used_ring_addr: host(used),
                        avail_ring_addr: host(avail),
                        log_addr: None,
                    },
                )
                .unwrap();
            frontend.set_vring_base(index, 0).unwrap();
            frontend.set_vring_call(index, &queue.call).unwrap();
            frontend.set_vring_kick(index, &queue.kick).unwrap();
            frontend.set_vring_enable(index, true).unwrap();
            queues.push(queue);
        }
        let mut harness = Harness {
            child,
            dir,
            frontend,
            memfd,
            mem,
            queues,
            channel,
            control: control_client,
            buffer_cursor: BUFFER_AREA_GPA,
            stats_buffer: None,
        };
        // Set-up messages are not acknowledged: wait until the backend has
        // taken the memory table and every ring.
        harness.wait_status("the memory table", |s| {
            s["guest_ram_bytes"] == GUEST_RAM_BYTES
        });
        harness
    }

    /// Copies bytes into the buffer area and returns their guest address.
    pub fn buffer(&mut self, bytes: &[u8]) -> u64 {
        let gpa = self.buffer_cursor;
        self.buffer_cursor += (bytes.len() as u64).max(1).next_multiple_of(64);
        assert!(self.buffer_cursor < REGION1_GPA + REGION1_BYTES);
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
        gpa
    }

    /// Puts a chain of (gpa, len, device-writable) descriptors on a queue and kicks.
    pub fn push(&mut self, queue: usize, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.queues[queue].next_desc();
        let raw: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let index = (head + i as u16) % QUEUE_SIZE;
                let last = i + 1 == descs.len();
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { (index + 1) % QUEUE_SIZE };
                (addr, len, flags, next)
            })
            .collect();
        self.push_raw(queue, &raw)
    }

    /// Puts raw descriptors (addr, len, flags, next) at the queue's next
    /// free slots, makes the first one available and kicks. Nothing is fixed
    /// up: this is for malformed chains.
    pub fn push_raw(&mut self, queue: usize, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.queues[queue].write_chain(&self.mem, descs);
        self.queues[queue].kick.write(1).unwrap();
        head
    }

    /// Where the next pushed chain's head descriptor will go.
    pub fn next_desc(&self, queue: usize) -> u16 {
        self.queues[queue].next_desc()
    }

    /// Waits until the device has used `count` more chains; returns (head, len).
    pub fn wait_used(&mut self, queue: usize, count: u16) -> Vec<(u32, u32)> {
        let (queues, mem) = (&mut self.queues, &self.mem);
        wait_for("used buffers", Duration::from_secs(20), || {
            Ok(queues[queue].take_used(mem, count))
        })
        .unwrap()
    }

    pub fn used_idx(&self, queue: usize) -> u16 {
        self.queues[queue].used_idx(&self.mem)
    }

    /// Sends PFNs as one readable buffer and waits for the device to use it.
    pub fn send_pfns(&mut self, queue: usize, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let gpa = self.buffer(&bytes);
        self.push(queue, &[(gpa, bytes.len() as u32, false)]);
        self.wait_used(queue, 1);
    }

    /// A second control connection, usable from another thread.
    pub fn control_clone(&self) -> ControlClient {
        let control = self.dir.path().join("control.sock");
        ControlClient::connect(&control, CONTROL_REPLY_TIMEOUT).unwrap()
    }

    /// The control connection, for typed requests.
    pub fn control(&mut self) -> &mut ControlClient {
        &mut self.control
    }

    /// Sends one request line as it is (malformed ones too) and returns
    /// the reply as JSON, refusals included.
    pub fn request(&mut self, request: &str) -> Value {
        self.control.request_raw(request.as_bytes()).unwrap()
    }

    /// What the backend has logged so far (it logs at debug level).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("backend.log")).unwrap_or_default()
    }

    pub fn status(&mut self) -> Value {
        let status = self.request(r#"{"cmd":"status"}"#);
        assert_eq!(status["ok"], true, "{status}");
        status
    }

    /// Polls status until `done` holds (deadline 10 s).
    pub fn wait_status(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn error_count(&mut self, name: &str) -> u64 {
        self.status()["errors"][name].as_u64().unwrap_or(0)
    }

    /// Acknowledges every config-change message from now on, as QEMU does,
    /// on a thread that ends when the backend closes the channel.
    pub fn answer_config_changes(&self) -> std::thread::JoinHandle<u32> {
        let mut channel = self.channel.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut answered = 0;
            let mut header = [0u8; 12];
            while channel.read_exact(&mut header).is_ok() {
                let mut reply = header[0..4].to_vec();
                reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&0u64.to_le_bytes());
                if channel.write_all(&reply).is_err() {
                    break;
                }
                answered += 1;
            }
            answered
        })
    }

    /// Plays the guest driver's part for statistics: the first call queues
    /// a stats buffer; later calls wait for the device to hand it back
    /// (asking with refresh-stats), refill it and queue it again.
    pub fn send_stats(&mut self, records: &[(u16, u64)]) {
        let bytes = balloon_backend::stats::encode(records);
        match self.stats_buffer {
            None => {
                let gpa = self.buffer(&[0u8; 16 * 10]);
                self.mem.write_slice(&bytes, GuestAddress(gpa)).unwrap();
                self.stats_buffer = Some(gpa);
                self.push(STATS, &[(gpa, bytes.len() as u32, false)]);
            }
            Some(gpa) => {
                let mut control = self.control_clone();
                let refresh = std::thread::spawn(move || control.refresh_stats(10_000));
                self.wait_used(STATS, 1);
                self.mem.write_slice(&bytes, GuestAddress(gpa)).unwrap();
                self.push(STATS, &[(gpa, bytes.len() as u32, false)]);
                refresh.join().unwrap().unwrap();
            }
        }
        let free = records.iter().find(|(tag, _)| *tag == 4).map(|r| r.1);
        self.wait_status("the statistics", |s| {
            free.is_none() || s["stats"]["free_bytes"] == free.unwrap_or(0)
        });
    }

    /// Answers one config-change message on the backend channel; returns its flags.
    pub fn answer_config_change(&mut self) -> u32 {
        let mut header = [0u8; 12];
        self.channel
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        self.channel.read_exact(&mut header).unwrap();
        let request = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(header[4..8].try_into().unwrap());
        assert_eq!(request, 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
        let mut reply = Vec::new();
        reply.extend_from_slice(&2u32.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        self.channel.write_all(&reply).unwrap();
        flags
    }

    pub fn get_config(&mut self) -> [u8; 16] {
        let (_, payload) = self
            .frontend
            .get_config(0, 16, VhostUserConfigFlags::WRITABLE, &[0u8; 16])
            .unwrap();
        payload.as_slice().try_into().unwrap()
    }

    /// Waits until the backend has no deferred punch left (it punches
    /// 20 ms after an inflate at the latest).
    pub fn punched(&mut self) -> Value {
        self.wait_status("every deferred punch done", |s| {
            s["pending_punch_bytes"] == 0
        })
    }

    pub fn resident(&self) -> u64 {
        allocated(&self.memfd, 0, MEMFD_BYTES)
    }

    /// Asserts the bytes of the memfd that are not guest RAM are untouched.
    pub fn assert_outside_ram_intact(&self) {
        assert_outside_ram_intact(&self.memfd);
    }
}

/// Longest a test waits for one control reply (refresh-stats may wait 60 s).
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(70);
