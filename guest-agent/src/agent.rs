//! The agent's loop: find the virtio-serial port, send a report every
//! interval and at once when the PSI trigger fires, answer host requests,
//! and start over when the host side goes away.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use balloon_protocol::agent::{parse_command, Command, FromAgent, Reply, ReportReason};
use balloon_protocol::lines::{LineSplitter, Piece};

use crate::reclaim::reclaim;
use crate::report::{collect, to_message, Sources};

/// Longest request line accepted from the host.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// PSI-triggered reports are sent at most this often.
const PSI_REPORT_MIN_GAP: Duration = Duration::from_secs(1);

const EVENT_TIMER: u64 = 1;
const EVENT_PSI: u64 = 2;
const EVENT_PORT: u64 = 3;

#[derive(Clone, Debug)]
pub struct Settings {
    pub port_name: String,
    pub device: Option<PathBuf>,
    pub interval: Duration,
    pub psi_stall_us: u64,
    pub psi_window_us: u64,
    pub sources: Sources,
}

/// The /dev node of the virtio-serial port called `name`.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let ports = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    ports.filter_map(Result::ok).find_map(|entry| {
        let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// Opens a PSI trigger: the file becomes readable (EPOLLPRI) when memory
/// stalls exceed `stall_us` within `window_us`.
fn psi_trigger(sources: &Sources, stall_us: u64, window_us: u64) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(sources.proc_dir.join("pressure/memory"))?;
    file.write_all(format!("some {stall_us} {window_us}\0").as_bytes())?;
    Ok(file)
}

/// Runs forever, reconnecting whenever the port closes.
pub fn run(settings: &Settings) -> ! {
    let mut waiting_logged = false;
    loop {
        let device = settings
            .device
            .clone()
            .or_else(|| find_port(&settings.port_name));
        match device
            .as_deref()
            .map(|d| OpenOptions::new().read(true).write(true).open(d))
        {
            Some(Ok(port)) => {
                waiting_logged = false;
                info!(
                    "connected on {}",
                    device.as_deref().unwrap_or(Path::new("?")).display()
                );
                match serve(settings, port) {
                    Ok(()) => info!("the host side closed the port; reconnecting"),
                    Err(error) => warn!("port error: {error}; reconnecting"),
                }
            }
            Some(Err(error)) if !waiting_logged => {
                warn!("cannot open the port yet: {error}");
                waiting_logged = true;
            }
            None if !waiting_logged => {
                warn!("no virtio-serial port named {} yet", settings.port_name);
                waiting_logged = true;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn send(port: &mut File, message: &FromAgent) -> io::Result<()> {
    let mut line = message.to_line().map_err(io::Error::other)?;
    line.push(b'\n');
    port.write_all(&line)
}

/// Answers one request line.
pub fn answer(settings: &Settings, line: &[u8]) -> Reply {
    match parse_command(line) {
        Err(reply) => reply,
        Ok(Command::Ping { id, .. }) => Reply::pong(id),
        Ok(Command::Reclaim { id, bytes, .. }) => match reclaim(&settings.sources, bytes) {
            Ok(outcome) => Reply::reclaimed(id, outcome),
            Err(error) => Reply::error(Some(id), error.to_string()),
        },
    }
}

/// Serves one connection; returns when the host side goes away.
fn serve(settings: &Settings, mut port: File) -> io::Result<()> {
    let epoll = Epoll::new()?;
    let mut timer = TimerFd::new()?;
    timer.reset(settings.interval, Some(settings.interval))?;
    epoll.ctl(
        ControlOperation::Add,
        timer.as_raw_fd(),
        EpollEvent::new(EventSet::IN, EVENT_TIMER),
    )?;
    // Kept open for the whole connection: closing it removes the trigger.
    let _psi_trigger = match psi_trigger(
        &settings.sources,
        settings.psi_stall_us,
        settings.psi_window_us,
    ) {
        Ok(file) => {
            epoll.ctl(
                ControlOperation::Add,
                file.as_raw_fd(),
                EpollEvent::new(EventSet::READ_HANG_UP | EventSet::PRIORITY, EVENT_PSI),
            )?;
            Some(file)
        }
        Err(error) => {
            warn!("no PSI trigger ({error}); reporting on the timer only");
            None
        }
    };
    epoll.ctl(
        ControlOperation::Add,
        port.as_raw_fd(),
        EpollEvent::new(EventSet::IN | EventSet::HANG_UP, EVENT_PORT),
    )?;

    let mut seq = 0;
    let mut report = |port: &mut File, reason: ReportReason| {
        seq += 1;
        send(port, &to_message(collect(&settings.sources, reason, seq)))
    };
    report(&mut port, ReportReason::Hello)?;
    let mut last_psi_report = Instant::now() - PSI_REPORT_MIN_GAP;
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        for event in events.iter().take(ready) {
            match event.data() {
                EVENT_TIMER => {
                    timer.wait()?;
                    report(&mut port, ReportReason::Timer)?;
                }
                EVENT_PSI if last_psi_report.elapsed() >= PSI_REPORT_MIN_GAP => {
                    debug!("PSI trigger fired");
                    last_psi_report = Instant::now();
                    report(&mut port, ReportReason::Psi)?;
                }
                EVENT_PORT => {
                    if event.event_set().contains(EventSet::HANG_UP) {
                        return Ok(());
                    }
                    let mut buffer = [0u8; 4096];
                    let n = port.read(&mut buffer)?;
                    if n == 0 {
                        return Ok(());
                    }
                    for piece in splitter.push(buffer.get(..n).unwrap_or_default()) {
                        let reply = match piece {
                            Piece::Line(line) if line.iter().all(u8::is_ascii_whitespace) => {
                                continue
                            }
                            Piece::Line(line) => answer(settings, &line),
                            // The rest of that line is dropped up to its
                            // newline, never run as a request of its own.
                            Piece::Oversized => Reply::error(
                                None,
                                format!("request longer than {MAX_LINE_BYTES} bytes"),
                            ),
                        };
                        send(&mut port, &FromAgent::Reply(reply))?;
                    }
                }
                _ => {}
            }
        }
    }
}
