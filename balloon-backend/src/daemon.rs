//! The process: sockets prepared at start-up, the control server, the stats
//! timer, and the vhost-user accept loop that serves one frontend after
//! another on the same listener so that QEMU can reconnect.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use crate::cli::BackendOptions;
use crate::control;
use crate::device::{
    BalloonDevice, DeviceSettings, GuestRamMap, PUNCH_EVENT, STATS_INTERVAL_EVENT,
    STATS_REQUEST_EVENT,
};
use crate::seccomp::{self, ThreadRole};
use crate::state_file::{StateFile, StateFileError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{flag} {path}: another process is listening there")]
    InUse { flag: &'static str, path: PathBuf },
    #[error(
        "{flag} {path}: exists and is not a socket; refusing to replace it (choose another path)"
    )]
    NotASocket { flag: &'static str, path: PathBuf },
    #[error("{flag} {path}: {source}")]
    Bind {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{flag} {path}: the directory {dir} does not exist (create it, or pass --create-dirs)"
    )]
    NoDirectory {
        flag: &'static str,
        path: PathBuf,
        dir: PathBuf,
    },
    #[error("{flag} {path}: creating the directory {dir}: {source}")]
    CreateDirectory {
        flag: &'static str,
        path: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("--socket-mode/--socket-group {path}: {source}")]
    Permissions { path: PathBuf, source: io::Error },
    #[error(transparent)]
    StateFile(StateFileError),
    #[error("creating the device: {0}")]
    Device(io::Error),
    #[error("vhost-user: {0}")]
    VhostUser(vhost_user_backend::Error),
    #[error("{0} (--seccomp off runs without a filter)")]
    Seccomp(seccomp::SeccompError),
}

/// Makes way for a socket at `path`: nothing there is fine, and a socket
/// file nobody listens on (left by a process that died) is removed. Any
/// other file is refused and left untouched: a mistyped path must never
/// cost an operator a file.
fn claim_socket_path(flag: &'static str, path: &Path) -> Result<(), DaemonError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DaemonError::Bind {
                flag,
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(DaemonError::NotASocket {
            flag,
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            return Err(DaemonError::InUse {
                flag,
                path: path.to_path_buf(),
            })
        }
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(source) => {
            return Err(DaemonError::Bind {
                flag,
                path: path.to_path_buf(),
                source,
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DaemonError::Bind {
            flag,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Mode of directories made by --create-dirs: the owner's, readable by its
/// group (QEMU's, when --socket-group is used), closed to others.
const CREATED_DIRECTORY_MODE: u32 = 0o750;

/// Makes sure the directory a socket goes into exists: created (with its
/// parents) when `create` is set, otherwise a clear error naming the flag.
fn prepare_directory(flag: &'static str, path: &Path, create: bool) -> Result<(), DaemonError> {
    let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    if !create {
        return Err(DaemonError::NoDirectory {
            flag,
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        });
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(CREATED_DIRECTORY_MODE)
        .create(dir)
        .map_err(|source| DaemonError::CreateDirectory {
            flag,
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            source,
        })
}

/// Gives the vhost-user socket file its mode and group.
fn set_socket_permissions(path: &Path, mode: u32, gid: Option<u32>) -> Result<(), DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |source| DaemonError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(failed)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(failed)
}

/// The socket files this process creates, so that exactly those are
/// removed on SIGINT/SIGTERM or a failed start.
#[derive(Debug, Default)]
pub struct SocketFiles {
    paths: Mutex<Vec<PathBuf>>,
}

impl SocketFiles {
    /// Recorded just before binding: a signal between the bind and the
    /// record would otherwise leave the file behind.
    fn claim(&self, path: &Path) {
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_path_buf());
    }

    /// Removes every claimed file (one not made yet is no error).
    pub fn remove_all(&self) {
        let paths = std::mem::take(&mut *self.paths.lock().unwrap_or_else(|e| e.into_inner()));
        for path in paths {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => warn!("removing {}: {error}", path.display()),
            }
        }
    }
}

/// Everything bound and ready; `run` serves until the process ends.
pub struct Backend {
    config: BackendOptions,
    device: Arc<BalloonDevice>,
    listener: Listener,
}

impl Backend {
    /// Binds both sockets, so start-up problems surface before serving;
    /// every socket file made is claimed in `files`.
    pub fn bind(config: BackendOptions, files: &SocketFiles) -> Result<Self, DaemonError> {
        prepare_directory("--socket", &config.socket, config.create_dirs)?;
        claim_socket_path("--socket", &config.socket)?;
        if let Some(control) = &config.control {
            prepare_directory("--control", control, config.create_dirs)?;
            claim_socket_path("--control", control)?;
        }
        let device = Arc::new(
            BalloonDevice::new(DeviceSettings {
                switches: config.switches,
                max_reclaim_percent: config.max_reclaim_percent,
                seccomp: config.seccomp,
                stats_interval_s: config.stats_interval_s,
                state_version: config.state_version,
            })
            .map_err(DaemonError::Device)?,
        );
        if let Some(path) = &config.state_file {
            prepare_directory("--state-file", path, config.create_dirs)?;
            let file = StateFile::open(path).map_err(DaemonError::StateFile)?;
            if file.kept_regions().is_some() {
                info!(
                    "{}: holds a balloon, taken over if the guest RAM that arrives is the same",
                    path.display()
                );
            }
            device.keep_state_in(file);
        }
        files.claim(&config.socket);
        let listener = Listener::new(&config.socket, false).map_err(|e| DaemonError::Bind {
            flag: "--socket",
            path: config.socket.clone(),
            source: io::Error::other(e),
        })?;
        set_socket_permissions(&config.socket, config.socket_mode, config.socket_gid)?;
        if let Some(path) = &config.control {
            files.claim(path);
            let control = control::bind(path).map_err(|source| DaemonError::Bind {
                flag: "--control",
                path: path.clone(),
                source,
            })?;
            let device = device.clone();
            let percent = config.max_reclaim_percent;
            let mode = config.seccomp;
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    seccomp::confine_or_exit(ThreadRole::Control, mode);
                    control::serve(control, device, percent)
                })
                .map_err(DaemonError::Device)?;
        }
        Ok(Backend {
            config,
            device,
            listener,
        })
    }

    /// Serves frontends one after another, forever.
    pub fn run(mut self) -> Result<(), DaemonError> {
        // Last: threads started after this inherit the main thread's filter.
        seccomp::confine_current_thread(ThreadRole::Vhost, self.config.seccomp)
            .map_err(DaemonError::Seccomp)?;
        info!("waiting for a frontend on {}", self.config.socket.display());
        loop {
            self.serve_one()?;
            self.device.disconnected();
            info!("frontend disconnected; waiting for it to reconnect");
        }
    }

    fn serve_one(&mut self) -> Result<(), DaemonError> {
        let mut daemon = VhostUserDaemon::new(
            "balloon".into(),
            self.device.clone(),
            GuestMemoryAtomic::new(GuestRamMap::new()),
        )
        .map_err(DaemonError::VhostUser)?;
        let handlers = daemon.get_epoll_handlers();
        let stats_events =
            std::iter::once((self.device.stats_request().as_raw_fd(), STATS_REQUEST_EVENT)).chain(
                self.device
                    .stats_interval_fd()
                    .map(|fd| (fd, STATS_INTERVAL_EVENT)),
            );
        for (fd, event) in stats_events {
            for handler in &handlers {
                if let Err(error) = handler.register_listener(fd, EventSet::IN, u64::from(event)) {
                    warn!("stats event {event} not registered; statistics refresh only when the guest kicks: {error}");
                }
            }
        }
        for handler in &handlers {
            let fd = self.device.punch_timer_fd();
            if let Err(error) = handler.register_listener(fd, EventSet::IN, u64::from(PUNCH_EVENT))
            {
                warn!("punch timer not registered; inflated pages are punched at once, one request at a time: {error}");
                self.device.punch_without_timer();
            }
        }
        daemon
            .start(&mut self.listener)
            .map_err(DaemonError::VhostUser)?;
        info!("frontend connected");
        match daemon.wait() {
            Ok(()) => {}
            // QEMU closing its end (shutdown, migration, restart) is the
            // normal end of a connection, not a fault.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => info!("frontend closed the connection"),
            Err(error) => warn!("frontend connection ended with an error: {error}"),
        }
        // The worker threads exit only on their exit events; a daemon
        // dropped without them hangs on join.
        for handler in handlers {
            handler.send_exit_event();
        }
        Ok(())
    }
}
