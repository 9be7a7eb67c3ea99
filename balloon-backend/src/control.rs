//! The control socket: a Unix stream socket speaking one JSON object per
//! line. Only clients with this process's uid, or root, are served; every malformed
//! request gets `{"ok":false,"error":…}` and the connection stays usable.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use serde::Serialize;
use serde_json::json;

use crate::device::{BalloonDevice, DeviceStatus, TargetError};
use crate::features;

/// Longest request line accepted, its newline not counted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Clients served at once; more are answered with an error and closed.
const MAX_CLIENTS: usize = 32;
/// Default and largest wait of `refresh-stats`.
const DEFAULT_REFRESH_TIMEOUT_MS: u64 = 5_000;
const MAX_REFRESH_TIMEOUT_MS: u64 = 60_000;
/// A client that does not read its replies for this long is dropped, so
/// it cannot hold one of the `MAX_CLIENTS` places (or a thread) forever.
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub use balloon_protocol::control::{parse_request, Request};
use balloon_protocol::control::{
    ErrorReply, RefreshStatsReply, SetTargetReply, StatusReply, UnpinReply,
};
use balloon_protocol::lines::{LineSplitter, Piece};

/// Writes one reply line with a single write: written piecemeal, a reply
/// costs one system call per JSON token.
fn send_reply(stream: &mut UnixStream, reply: &str) -> io::Result<()> {
    let mut line = String::with_capacity(reply.len() + 1);
    line.push_str(reply);
    line.push('\n');
    stream.write_all(line.as_bytes())
}

fn error_reply(message: impl Into<String>) -> String {
    to_reply(&ErrorReply::new(message))
}

/// A typed reply as its JSON text, serialised once; our own reply types
/// always serialise.
fn to_reply(reply: &impl Serialize) -> String {
    serde_json::to_string(reply).unwrap_or_else(|error| {
        json!({ "ok": false, "error": format!("reply could not be encoded: {error}") }).to_string()
    })
}

/// The reply to `status`.
pub fn status_reply(status: &DeviceStatus, max_reclaim_percent: u8) -> StatusReply {
    StatusReply {
        ok: true,
        connected: status.connected,
        guest_ram_bytes: status.guest_ram_bytes,
        target_bytes: status.target_bytes,
        actual_bytes: status.actual_bytes,
        max_reclaim_bytes: status.max_reclaim_bytes,
        max_reclaim_percent,
        ballooned_bytes: status.ballooned_bytes,
        discarded_bytes: status.discarded_bytes,
        pending_punch_bytes: status.pending_punch_bytes,
        reported_bytes_total: status.reported_bytes_total,
        guest_ram_resident_bytes: status.resident_bytes,
        features: features::names(status.acked_features)
            .into_iter()
            .map(str::to_string)
            .collect(),
        config_notify: status.config_notify,
        stats: status.stats.clone(),
        errors: status
            .errors
            .iter()
            .map(|(name, count)| ((*name).to_string(), *count))
            .collect(),
        pinned: status.pinned,
        discard_cpu_us: u64::try_from(status.discard_cpu.as_micros()).unwrap_or(u64::MAX),
    }
}

/// Answers one request.
pub fn handle(device: &BalloonDevice, max_reclaim_percent: u8, request: Request) -> String {
    match request {
        Request::Status {} => to_reply(&status_reply(&device.status(), max_reclaim_percent)),
        Request::SetTarget { bytes, pin } => match device.set_target(bytes, pin) {
            Ok(outcome) => to_reply(&SetTargetReply {
                ok: true,
                target_bytes: outcome.target_bytes,
                clamped: outcome.clamped,
                notified: outcome.notified,
                pinned: outcome.pinned,
            }),
            Err(error) => error_reply(error.to_string()),
        },
        Request::Unpin {} => to_reply(&UnpinReply {
            ok: true,
            was_pinned: device.unpin(),
        }),
        Request::RefreshStats { timeout_ms } => {
            let timeout_ms = timeout_ms.unwrap_or(DEFAULT_REFRESH_TIMEOUT_MS);
            if timeout_ms > MAX_REFRESH_TIMEOUT_MS {
                return error_reply(format!(
                    "timeout_ms must be between 0 and {MAX_REFRESH_TIMEOUT_MS}, got {timeout_ms}"
                ));
            }
            // Without a guest nothing can answer: refuse at once, as
            // set-target does, rather than wait and blame the guest.
            if !device.guest_attached() {
                return error_reply(TargetError::NoGuest.to_string());
            }
            match device.refresh_stats(Duration::from_millis(timeout_ms)) {
                Some(stats) => to_reply(&RefreshStatsReply { ok: true, stats }),
                None => error_reply(format!(
                    "the guest sent no statistics within {timeout_ms} ms (is STATS_VQ negotiated and the driver loaded?)"
                )),
            }
        }
    }
}

/// The uid of the process at the other end of a Unix socket.
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len describe a properly sized local; the fd is owned
    // by `stream` for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds the control socket with mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves clients until the process exits, one thread per client.
pub fn serve(listener: UnixListener, device: Arc<BalloonDevice>, max_reclaim_percent: u8) {
    let active = Arc::new(AtomicUsize::new(0));
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                warn!("control socket accept failed: {error}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match peer_uid(&stream) {
            // Root may always ask: it can read and change the process anyway.
            Ok(uid) if uid == own_uid || uid == 0 => {}
            Ok(uid) => {
                warn!("control client with uid {uid} refused (only uid {own_uid} and root are served)");
                // One line saying why, so the client does not see a bare close.
                let reply = error_reply(format!(
                    "refused: not the backend's user (uid {uid}; only uid {own_uid} and root are served)"
                ));
                if let Err(error) = send_reply(&mut stream, &reply) {
                    debug!("refused control client went away: {error}");
                }
                continue;
            }
            Err(error) => {
                warn!("control client refused: cannot read its credentials: {error}");
                continue;
            }
        }
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            let reply = error_reply(format!("too many control clients (at most {MAX_CLIENTS})"));
            if let Err(error) = send_reply(&mut stream, &reply) {
                debug!("control client went away: {error}");
            }
            continue;
        }
        let device = device.clone();
        let active = active.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(error) = serve_client(stream, &device, max_reclaim_percent) {
                    debug!("control client ended: {error}");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(error) = spawned {
            warn!("cannot start a control client thread: {error}");
        }
    }
}

/// The reply to one complete request line.
pub fn reply_to_line(device: &BalloonDevice, max_reclaim_percent: u8, line: &[u8]) -> String {
    if line.iter().all(u8::is_ascii_whitespace) {
        return error_reply("empty request: send one JSON object per line");
    }
    match parse_request(line) {
        Ok(request) => handle(device, max_reclaim_percent, request),
        Err(message) => error_reply(message),
    }
}

/// Serves one client: exactly one reply line for every request line. A
/// line over `MAX_REQUEST_BYTES` (newline not counted) gets one error reply
/// and is dropped up to its newline; the connection stays open. A client
/// that leaves a reply unread for `CLIENT_WRITE_TIMEOUT` is dropped.
pub fn serve_client(
    mut stream: UnixStream,
    device: &BalloonDevice,
    max_reclaim_percent: u8,
) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    writer.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))?;
    let mut splitter = LineSplitter::new(MAX_REQUEST_BYTES);
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        for piece in splitter.push(buffer.get(..read).unwrap_or_default()) {
            let reply = match piece {
                Piece::Line(line) => reply_to_line(device, max_reclaim_percent, &line),
                Piece::Oversized => error_reply(format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes; dropped up to its newline"
                )),
            };
            send_reply(&mut writer, &reply)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_never_reads_is_dropped() {
        let device = BalloonDevice::new(crate::device::DeviceSettings {
            switches: Default::default(),
            max_reclaim_percent: 65,
            seccomp: crate::seccomp::SeccompMode::Off,
            stats_interval_s: 0,
            state_version: crate::saved_state::STATE_VERSION,
        })
        .unwrap();
        let (client, server) = UnixStream::pair().unwrap();
        let (done, served) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(serve_client(server, &device, 65)));
        // Requests without end, replies never read: the backend's writes
        // fill the socket and must give up rather than block for ever.
        let mut writer = client.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let request = b"{\"cmd\":\"status\"}\n".repeat(64);
            while writer.write_all(&request).is_ok() {}
        });
        let waited = CLIENT_WRITE_TIMEOUT * 6;
        let error = served
            .recv_timeout(waited)
            .unwrap_or_else(|_| panic!("still serving a client that never reads after {waited:?}"))
            .unwrap_err();
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{error}"
        );
        drop(client);
        sender.join().unwrap();
    }

    #[test]
    fn parses_the_documented_requests() {
        assert_eq!(
            parse_request(br#"{"cmd":"status"}"#),
            Ok(Request::Status {})
        );
        assert_eq!(
            parse_request(br#"{"cmd":"set-target","bytes":268435456}"#),
            Ok(Request::SetTarget {
                bytes: 268435456,
                pin: false
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"refresh-stats"}"#),
            Ok(Request::RefreshStats { timeout_ms: None })
        );
    }

    #[test]
    fn malformed_requests_name_the_problem() {
        let unknown = parse_request(br#"{"cmd":"explode"}"#).unwrap_err();
        assert!(
            unknown.contains("explode") && unknown.contains("set-target"),
            "{unknown}"
        );
        let missing = parse_request(br#"{"cmd":"set-target"}"#).unwrap_err();
        assert!(missing.contains("bytes"), "{missing}");
        let negative = parse_request(br#"{"cmd":"set-target","bytes":-1}"#).unwrap_err();
        assert!(negative.contains("-1"), "{negative}");
        let extra = parse_request(br#"{"cmd":"status","x":1}"#).unwrap_err();
        assert!(extra.contains('x'), "{extra}");
        assert!(parse_request(b"not json").is_err());
        assert!(parse_request(&[0xff, 0xfe]).is_err());
    }
}
