//! Telling the frontend that the config space changed, so the guest re-reads
//! `num_pages` and starts inflating or deflating.
//!
//! Why this module exists: the frontend hands over the backend request
//! channel in VHOST_USER_SET_BACKEND_REQ_FD, and the `vhost` 0.18 crate wraps
//! that socket in its opaque `Backend` type. `Backend` does not forward
//! `handle_config_change` (the trait's default body returns ENOSYS without
//! sending anything) and offers no way to reach its socket. So, while the
//! crate's `Backend` is still alive, we find that socket among our own file
//! descriptors, duplicate it, and write VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
//! ourselves. The channel is the only Unix stream socket in this process whose
//! two ends are both unnamed (QEMU creates it with socketpair()); every other
//! socket here is bound to, or connected to, a path.

use std::io::{self, Read, Write};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const HEADER_BYTES: usize = 12;
/// How long to wait for the frontend to acknowledge.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("listing /proc/self/fd: {0}")]
    ListFds(io::Error),
    #[error("no backend request channel found among this process's sockets")]
    ChannelNotFound,
    #[error("{0} candidate backend request channels found; refusing to guess")]
    ChannelAmbiguous(usize),
    #[error("duplicating the backend request channel: {0}")]
    Duplicate(io::Error),
    #[error("sending the config-change message: {0}")]
    Send(io::Error),
    #[error("reading the frontend's reply: {0}")]
    Reply(io::Error),
    #[error(
        "the frontend's reply is malformed (request {request}, flags {flags:#x}, size {size})"
    )]
    MalformedReply { request: u32, flags: u32, size: u32 },
    #[error("the frontend reported failure {0} handling the config change")]
    Refused(u64),
}

/// The backend request channel, owned by us.
#[derive(Debug)]
pub struct ConfigChangeNotifier {
    stream: UnixStream,
}

impl ConfigChangeNotifier {
    pub fn new(stream: UnixStream) -> Self {
        ConfigChangeNotifier { stream }
    }

    /// Sends the config-change message and waits for the frontend's ack
    /// (QEMU answers every message that carries NEED_REPLY).
    pub fn notify(&mut self) -> Result<(), NotifyError> {
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        header[4..8].copy_from_slice(&(VERSION_1 | NEED_REPLY).to_le_bytes());
        self.stream.write_all(&header).map_err(NotifyError::Send)?;

        self.stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(NotifyError::Reply)?;
        let mut reply = [0u8; HEADER_BYTES + 8];
        self.stream
            .read_exact(&mut reply)
            .map_err(NotifyError::Reply)?;
        let word = |at: usize| {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(&reply[at..at + 4]);
            u32::from_le_bytes(bytes)
        };
        let (request, flags, size) = (word(0), word(4), word(8));
        if request != CONFIG_CHANGE_MSG || flags & REPLY == 0 || size != 8 {
            return Err(NotifyError::MalformedReply {
                request,
                flags,
                size,
            });
        }
        let mut value = [0u8; 8];
        value.copy_from_slice(&reply[HEADER_BYTES..]);
        match u64::from_le_bytes(value) {
            0 => Ok(()),
            failure => Err(NotifyError::Refused(failure)),
        }
    }
}

/// This process's `/proc/self/fd`, opened at start-up: listing it later
/// needs no `open`, which the seccomp filters forbid once serving starts.
#[derive(Debug)]
pub struct FdDirectory {
    directory: OwnedFd,
}

impl FdDirectory {
    pub fn open() -> io::Result<Self> {
        let file = std::fs::File::open("/proc/self/fd")?;
        Ok(FdDirectory {
            directory: file.into(),
        })
    }

    /// The descriptors open now (the directory's contents are read afresh
    /// on every listing).
    pub fn list(&self) -> io::Result<Vec<RawFd>> {
        // The duplicate shares the read position, so rewind it before reading.
        let duplicate = self.directory.try_clone()?;
        let names = read_directory_names(duplicate)?;
        Ok(names
            .iter()
            .filter_map(|name| name.parse::<RawFd>().ok())
            .collect())
    }
}

/// The entry names of an open directory, read from its start; `directory`
/// is consumed (closed) whatever happens.
fn read_directory_names(directory: OwnedFd) -> io::Result<Vec<String>> {
    use std::os::fd::IntoRawFd;
    let raw = directory.into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor that we own; on success
    // the DIR stream takes it over and closedir below closes it.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let error = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(error);
    }
    let mut names = Vec::new();
    // SAFETY: `stream` is a valid DIR stream used only by this thread;
    // each dirent stays valid until the next readdir, and its name is a
    // NUL-terminated string inside it.
    unsafe {
        libc::rewinddir(stream);
        loop {
            let entry = libc::readdir(stream);
            if entry.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr());
            names.push(name.to_string_lossy().into_owned());
        }
        libc::closedir(stream);
    }
    Ok(names)
}

/// Finds the backend request channel among this process's descriptors and
/// returns our own duplicate of it.
pub fn find_backend_channel(fds: &FdDirectory) -> Result<UnixStream, NotifyError> {
    let mut candidates = Vec::new();
    for fd in fds.list().map_err(NotifyError::ListFds)? {
        // Standard streams may be sockets set up by a supervisor; the
        // listing's own descriptor is not a socket and drops out below.
        if fd > 2 && is_unnamed_stream_pair(fd) {
            candidates.push(fd);
        }
    }
    match candidates.as_slice() {
        [] => Err(NotifyError::ChannelNotFound),
        [fd] => duplicate(*fd).map_err(NotifyError::Duplicate),
        many => Err(NotifyError::ChannelAmbiguous(many.len())),
    }
}

fn duplicate(fd: RawFd) -> io::Result<UnixStream> {
    // SAFETY: `fd` was listed in /proc/self/fd a moment ago and is still
    // owned by the crate's `Backend`, which the caller keeps alive; the
    // borrow ends before this function returns.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned: OwnedFd = borrowed.try_clone_to_owned()?;
    Ok(UnixStream::from(owned))
}

/// Whether `fd` is a connected AF_UNIX stream socket with no name on
/// either end, as socketpair() creates.
fn is_unnamed_stream_pair(fd: RawFd) -> bool {
    let int_option = |option: libc::c_int| -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len point to properly sized locals; a non-socket
        // fd just makes getsockopt fail with ENOTSOCK.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    if int_option(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || int_option(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || int_option(libc::SO_ACCEPTCONN) != Some(0)
    {
        return false;
    }
    address_is_unnamed(fd, false) == Some(true) && address_is_unnamed(fd, true) == Some(true)
}

/// Whether the local (or peer) address of a Unix socket has no path.
fn address_is_unnamed(fd: RawFd, peer: bool) -> Option<bool> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let pointer = (&mut address as *mut libc::sockaddr_un).cast::<libc::sockaddr>();
    // SAFETY: pointer and len describe the local `address`; the kernel writes
    // at most `len` bytes.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, pointer, &mut len)
        } else {
            libc::getsockname(fd, pointer, &mut len)
        }
    };
    (rc == 0).then_some(len as usize <= std::mem::size_of::<libc::sa_family_t>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn frontend_answer(
        mut frontend: UnixStream,
        value: u64,
        flags: u32,
    ) -> std::thread::JoinHandle<[u8; 12]> {
        std::thread::spawn(move || {
            let mut header = [0u8; 12];
            frontend.read_exact(&mut header).unwrap();
            let mut reply = Vec::new();
            reply.extend_from_slice(&header[0..4]);
            reply.extend_from_slice(&flags.to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&value.to_le_bytes());
            frontend.write_all(&reply).unwrap();
            header
        })
    }

    #[test]
    fn sends_the_config_change_header_and_accepts_the_ack() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let frontend = frontend_answer(theirs, 0, VERSION_1 | REPLY);
        ConfigChangeNotifier::new(ours).notify().unwrap();
        let header = frontend.join().unwrap();
        assert_eq!(&header[0..4], &2u32.to_le_bytes());
        assert_eq!(&header[4..8], &(0x1u32 | 0x8).to_le_bytes());
        assert_eq!(&header[8..12], &0u32.to_le_bytes());
    }

    #[test]
    fn reports_a_refusal_and_a_malformed_reply() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let frontend = frontend_answer(theirs, 1, VERSION_1 | REPLY);
        assert!(matches!(
            ConfigChangeNotifier::new(ours).notify(),
            Err(NotifyError::Refused(1))
        ));
        frontend.join().unwrap();

        let (ours, theirs) = UnixStream::pair().unwrap();
        let frontend = frontend_answer(theirs, 0, VERSION_1);
        assert!(matches!(
            ConfigChangeNotifier::new(ours).notify(),
            Err(NotifyError::MalformedReply { .. })
        ));
        frontend.join().unwrap();
    }

    #[test]
    fn a_closed_channel_is_an_error_not_a_hang() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(ConfigChangeNotifier::new(ours).notify().is_err());
    }

    #[test]
    fn the_fd_directory_lists_descriptors_opened_after_it() {
        let fds = FdDirectory::open().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        // Twice: the second listing must start from the top again.
        for _ in 0..2 {
            let listed = fds.list().unwrap();
            assert!(listed.contains(&a.as_raw_fd()), "{listed:?}");
        }
    }

    #[test]
    fn discovery_refuses_to_guess_between_two_candidates() {
        // Both ends of a socketpair live in this test process: ambiguous.
        // (Other tests may create pairs concurrently, so more is possible.)
        let (_a, _b) = UnixStream::pair().unwrap();
        let fds = FdDirectory::open().unwrap();
        assert!(
            matches!(find_backend_channel(&fds), Err(NotifyError::ChannelAmbiguous(n)) if n >= 2)
        );
        let listener_dir = tempfile::tempdir().unwrap();
        let path = listener_dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        assert!(!is_unnamed_stream_pair(client.as_raw_fd()));
        assert!(is_unnamed_stream_pair(_a.as_raw_fd()));
    }
}
