//! The VMs a configuration manages: its `[[vm]]` entries, then the control
//! sockets found in its `[discover]` directory; and each VM's guest agent:
//! its `agent =`, else the channel socket libvirt made for the domain of
//! the VM's name, looked for again at every call.

use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Mutex;

use balloon_policy::VmPolicy;
use balloon_protocol::agent::libvirt::{parse_channel_dir, short_name_matches};
use balloon_protocol::agent::{DEFAULT_PORT_NAME, LIBVIRT_CHANNEL_ROOTS};

use crate::config::Config;

/// A VM the daemon manages: from `[[vm]]` or found in `[discover]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedVm {
    pub name: String,
    pub control: PathBuf,
    pub agent: Option<PathBuf>,
    pub policy: VmPolicy,
}

/// Configured VMs, then discovered sockets whose names are not configured;
/// a VM without `agent =` gets the libvirt channel of its name, if any.
pub fn managed_vms(config: &Config) -> Vec<ManagedVm> {
    let mut vms: Vec<ManagedVm> = config
        .vms
        .iter()
        .map(|vm| ManagedVm {
            name: vm.name.clone(),
            control: vm.control.clone(),
            agent: vm.agent.clone(),
            policy: config.policy_for(&vm.name),
        })
        .collect();
    let (mut found, _skipped) = discovered_vms(config);
    found.retain(|vm| !vms.iter().any(|configured| configured.name == vm.name));
    vms.extend(found);
    if vms.iter().any(|vm| vm.agent.is_none()) {
        let channels = scan_libvirt_channels(&libvirt_channel_dirs(config), DEFAULT_PORT_NAME);
        for vm in vms.iter_mut().filter(|vm| vm.agent.is_none()) {
            vm.agent = channels.agent_for(&vm.name);
        }
    }
    vms
}

/// Where libvirt's channel sockets are looked for: `[host]
/// libvirt_channel_dirs`, else both of libvirt's places.
pub fn libvirt_channel_dirs(config: &Config) -> Vec<PathBuf> {
    config
        .host
        .libvirt_channel_dirs
        .clone()
        .unwrap_or_else(|| LIBVIRT_CHANNEL_ROOTS.iter().map(PathBuf::from).collect())
}

/// The agent's port in one per-domain directory of a channel root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelPort {
    /// The port's socket is there.
    Present(PathBuf),
    /// The directory (this path) cannot be looked into: its group is
    /// libvirt's QEMU user's, which this process lacks.
    Denied(PathBuf),
}

/// A per-domain directory (`<id>-<short name>`, or before libvirt 9.7
/// `domain-<id>-<short name>`) that has the agent's port or may have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelDir {
    pub id: u32,
    /// The domain's name as libvirt cut it (maybe mid-character).
    pub short_name: Vec<u8>,
    pub port: ChannelPort,
}

/// Each channel root, in order, with its per-domain directories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LibvirtChannels {
    pub roots: Vec<(PathBuf, Vec<ChannelDir>)>,
}

/// What the channel roots say about one VM's agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LibvirtAgent {
    Found(PathBuf),
    /// No running domain of this name has the port: no agent.
    NotFound,
    /// Several running domains could be this VM (their names share the
    /// first 20 characters): no agent rather than another VM's.
    Ambiguous {
        root: PathBuf,
        ids: Vec<u32>,
    },
    /// The domain's directory cannot be looked into.
    Denied(PathBuf),
}

/// The agent of the VM `name` among `roots` (as
/// [`scan_libvirt_channels`] lists them): the first root with a directory
/// of that name decides, and it must have exactly one.
pub fn choose_libvirt_agent(name: &str, roots: &[(PathBuf, Vec<ChannelDir>)]) -> LibvirtAgent {
    for (root, dirs) in roots {
        let candidates: Vec<&ChannelDir> = dirs
            .iter()
            .filter(|dir| short_name_matches(&dir.short_name, name))
            .collect();
        match candidates.as_slice() {
            [] => continue,
            [only] => {
                return match &only.port {
                    ChannelPort::Present(socket) => LibvirtAgent::Found(socket.clone()),
                    ChannelPort::Denied(dir) => LibvirtAgent::Denied(dir.clone()),
                }
            }
            several => {
                return LibvirtAgent::Ambiguous {
                    root: root.clone(),
                    ids: several.iter().map(|dir| dir.id).collect(),
                }
            }
        }
    }
    LibvirtAgent::NotFound
}

/// The per-domain directories under each of `roots` that hold `port`, or
/// cannot be looked into. A missing root has none (libvirt keeps its
/// channels in the other one, or no domain runs); an unreadable one is
/// logged once.
pub fn scan_libvirt_channels(roots: &[PathBuf], port: &str) -> LibvirtChannels {
    let mut scanned = Vec::new();
    for root in roots {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                warn_once(format!(
                    "cannot read libvirt's channel directory {}: {error}; guest agents there are \
                     not found (host-policy's user needs read access)",
                    root.display()
                ));
                continue;
            }
        };
        let mut dirs: Vec<ChannelDir> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let file = entry.file_name();
                let (id, short) = parse_channel_dir(file.as_bytes())?;
                let dir = entry.path();
                let socket = dir.join(port);
                let port = match socket.symlink_metadata() {
                    Ok(_) => ChannelPort::Present(socket),
                    Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                        ChannelPort::Denied(dir)
                    }
                    Err(_) => return None,
                };
                Some(ChannelDir {
                    id,
                    short_name: short.to_vec(),
                    port,
                })
            })
            .collect();
        dirs.sort_by_key(|dir| dir.id);
        scanned.push((root.clone(), dirs));
    }
    LibvirtChannels { roots: scanned }
}

impl LibvirtChannels {
    /// The VM `name`'s agent socket; an ambiguous or unreadable channel is
    /// logged once and counts as none.
    pub fn agent_for(&self, name: &str) -> Option<PathBuf> {
        match choose_libvirt_agent(name, &self.roots) {
            LibvirtAgent::Found(socket) => Some(socket),
            LibvirtAgent::NotFound => None,
            LibvirtAgent::Ambiguous { root, ids } => {
                warn_once(format!(
                    "vm {name}: several running domains under {} could be it (ids {ids:?}: \
                     libvirt keeps the first 20 characters of a name); managed without its \
                     guest agent: name the socket with `agent =` in its [[vm]]",
                    root.display()
                ));
                None
            }
            LibvirtAgent::Denied(dir) => {
                warn_once(format!(
                    "vm {name}: cannot look into libvirt's channel directory {}: host-policy's \
                     user needs its group (libvirt's QEMU group, libvirt-qemu on Debian); \
                     managed without its guest agent",
                    dir.display()
                ));
                None
            }
        }
    }
}

/// Logs `message` as a warning the first time this process sees it.
fn warn_once(message: String) {
    static LOGGED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = match LOGGED.lock() {
        Ok(mut logged) => logged.insert(message.clone()),
        Err(poisoned) => poisoned.into_inner().insert(message.clone()),
    };
    if first {
        log::warn!("{message}");
    }
}

/// Why a file in the `[discover]` directory is not a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotDiscovered {
    NotASocket,
    BadName(String),
}

impl std::fmt::Display for NotDiscovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotDiscovered::NotASocket => f.write_str("not a socket"),
            NotDiscovered::BadName(message) => f.write_str(message),
        }
    }
}

/// Whether a directory entry named `file` is a VM: its name without
/// `suffix`, or why not; None for files without the suffix.
pub fn classify_discovered(
    file: &str,
    suffix: &str,
    is_socket: bool,
) -> Option<Result<String, NotDiscovered>> {
    let name = file.strip_suffix(suffix)?;
    if name.is_empty() {
        return None;
    }
    if let Err(message) = crate::config::check_vm_name(name) {
        return Some(Err(NotDiscovered::BadName(message)));
    }
    if !is_socket {
        return Some(Err(NotDiscovered::NotASocket));
    }
    Some(Ok(name.to_string()))
}

/// The VMs in the `[discover]` directory, sorted by name, and the files
/// with the suffix that were skipped, with the reason (`check` prints them).
pub fn discovered_vms(config: &Config) -> (Vec<ManagedVm>, Vec<(PathBuf, NotDiscovered)>) {
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    let Some(discover) = &config.discover else {
        return (found, skipped);
    };
    let Ok(entries) = std::fs::read_dir(&discover.directory) else {
        return (found, skipped);
    };
    for entry in entries.filter_map(Result::ok) {
        let file = entry.file_name().to_string_lossy().to_string();
        // Followed: a symbolic link to a control socket is a VM too.
        let is_socket =
            std::fs::metadata(entry.path()).is_ok_and(|meta| meta.file_type().is_socket());
        match classify_discovered(&file, &discover.suffix, is_socket) {
            None => {}
            Some(Ok(name)) => found.push(ManagedVm {
                policy: config.policy_for(&name),
                name,
                control: entry.path(),
                agent: None,
            }),
            Some(Err(reason)) => skipped.push((entry.path(), reason)),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    skipped.sort_by(|a, b| a.0.cmp(&b.0));
    (found, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_with_the_suffix_and_a_valid_name_is_a_vm() {
        assert_eq!(
            classify_discovered("web1.ctl", ".ctl", true),
            Some(Ok("web1".to_string()))
        );
        assert_eq!(
            classify_discovered("web1.ctl", ".ctl", false),
            Some(Err(NotDiscovered::NotASocket))
        );
        assert!(matches!(
            classify_discovered("web 1.ctl", ".ctl", true),
            Some(Err(NotDiscovered::BadName(_)))
        ));
        assert_eq!(classify_discovered(".ctl", ".ctl", true), None);
        assert_eq!(classify_discovered("web1.sock", ".ctl", true), None);
    }

    #[test]
    fn configured_vms_come_first_and_shadow_discovered_ones() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for name in ["a", "b"] {
            std::os::unix::net::UnixListener::bind(dir.path().join(format!("{name}.ctl")))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(dir.path().join("c.ctl"), "").unwrap_or_else(|e| panic!("{e}"));
        let text = format!(
            "[discover]\ndirectory = {:?}\n[[vm]]\nname = \"b\"\ncontrol = \"/run/b.ctl\"\nshares = 5\n",
            dir.path()
        );
        let config = Config::parse(std::path::Path::new("host-policy.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        let vms = managed_vms(&config);
        let names: Vec<(&str, &std::path::Path)> = vms
            .iter()
            .map(|vm| (vm.name.as_str(), vm.control.as_path()))
            .collect();
        assert_eq!(
            names,
            [
                ("b", std::path::Path::new("/run/b.ctl")),
                ("a", dir.path().join("a.ctl").as_path())
            ]
        );
        assert_eq!(vms.first().map(|vm| vm.policy.shares), Some(5));
        let (_, skipped) = discovered_vms(&config);
        assert_eq!(
            skipped,
            [(dir.path().join("c.ctl"), NotDiscovered::NotASocket)]
        );
    }

    fn channel(id: u32, short: &str, socket: &str) -> ChannelDir {
        ChannelDir {
            id,
            short_name: short.as_bytes().to_vec(),
            port: ChannelPort::Present(PathBuf::from(socket)),
        }
    }

    #[test]
    fn the_first_root_with_the_domain_decides_and_needs_exactly_one() {
        let new = PathBuf::from("/new");
        let old = PathBuf::from("/old");
        let roots = vec![
            (
                new.clone(),
                vec![
                    channel(1, "vm1", "/new/1-vm1/p"),
                    channel(4, "database-primary-eu-", "/new/4-database-primary-eu-/p"),
                    channel(7, "database-primary-eu-", "/new/7-database-primary-eu-/p"),
                    ChannelDir {
                        id: 9,
                        short_name: b"locked".to_vec(),
                        port: ChannelPort::Denied(PathBuf::from("/new/9-locked")),
                    },
                ],
            ),
            (
                old.clone(),
                vec![
                    channel(2, "vm1", "/old/domain-2-vm1/p"),
                    channel(3, "vm2", "/old/domain-3-vm2/p"),
                ],
            ),
        ];
        let choose = |name| choose_libvirt_agent(name, &roots);
        assert_eq!(choose("vm1"), LibvirtAgent::Found("/new/1-vm1/p".into()));
        assert_eq!(
            choose("vm2"),
            LibvirtAgent::Found("/old/domain-3-vm2/p".into())
        );
        assert_eq!(choose("vm3"), LibvirtAgent::NotFound);
        assert_eq!(choose("vm"), LibvirtAgent::NotFound);
        assert_eq!(
            choose("database-primary-eu-west-1"),
            LibvirtAgent::Ambiguous {
                root: new,
                ids: vec![4, 7]
            }
        );
        assert_eq!(
            choose("locked"),
            LibvirtAgent::Denied("/new/9-locked".into())
        );
        assert_eq!(choose_libvirt_agent("vm1", &[]), LibvirtAgent::NotFound);
    }

    /// Makes `root/dir/`, with the port's socket when `port`.
    fn domain_dir(root: &std::path::Path, dir: &str, port: bool) -> PathBuf {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let socket = dir.join(DEFAULT_PORT_NAME);
        if port {
            std::os::unix::net::UnixListener::bind(&socket).unwrap_or_else(|e| panic!("{e}"));
        }
        socket
    }

    #[test]
    fn vms_without_an_agent_get_their_libvirt_channel_in_either_layout() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (new, old) = (dir.path().join("run"), dir.path().join("var"));
        let discover = dir.path().join("discover");
        std::fs::create_dir(&discover).unwrap_or_else(|e| panic!("{e}"));
        for name in [
            "web1",
            "db1",
            "plain",
            "long-name-of-a-guest-vm",
            "configured",
        ] {
            std::os::unix::net::UnixListener::bind(discover.join(format!("{name}.ctl")))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let web1 = domain_dir(&new, "3-web1", true);
        let db1 = domain_dir(&old, "domain-5-db1", true);
        // plain runs without the channel; the long name is cut to 20
        // characters, and two running domains share them.
        domain_dir(&new, "4-plain", false);
        domain_dir(&new, "6-long-name-of-a-gues", true);
        domain_dir(&new, "8-long-name-of-a-gues", true);
        domain_dir(&new, "2-configured", true);
        std::fs::write(new.join("not-a-domain"), "").unwrap_or_else(|e| panic!("{e}"));
        let text = format!(
            "[host]\nlibvirt_channel_dirs = [{new:?}, {old:?}, {:?}]\n[discover]\ndirectory = {discover:?}\n\
             [[vm]]\nname = \"configured\"\ncontrol = \"/run/c.ctl\"\nagent = \"/run/c.agent\"\n\
             [[vm]]\nname = \"web1\"\ncontrol = \"/run/web1.ctl\"\n",
            dir.path().join("absent")
        );
        let path = std::path::Path::new("host-policy.toml");
        let config = Config::parse(path, &text).unwrap_or_else(|e| panic!("{e}"));
        let agents = || -> Vec<(String, Option<PathBuf>)> {
            managed_vms(&config)
                .into_iter()
                .map(|vm| (vm.name, vm.agent))
                .collect()
        };
        assert_eq!(
            agents(),
            [
                (
                    "configured".to_string(),
                    Some(PathBuf::from("/run/c.agent"))
                ),
                ("web1".to_string(), Some(web1.clone())),
                ("db1".to_string(), Some(db1)),
                ("long-name-of-a-guest-vm".to_string(), None),
                ("plain".to_string(), None),
            ]
        );
        // Looked for again each time: a channel that appears is found, one
        // that goes away is forgotten.
        let plain = domain_dir(&new, "4-plain", true);
        std::fs::remove_dir_all(new.join("3-web1")).unwrap_or_else(|e| panic!("{e}"));
        let now = agents();
        assert_eq!(now[1], ("web1".to_string(), None));
        assert_eq!(now[4], ("plain".to_string(), Some(plain)));

        // The default roots are libvirt's; an empty list looks nowhere.
        let defaults = Config::parse(path, "[[vm]]\nname = \"a\"\ncontrol = \"/a\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            libvirt_channel_dirs(&defaults),
            [
                PathBuf::from("/run/libvirt/qemu/channel"),
                PathBuf::from("/var/lib/libvirt/qemu/channel/target")
            ]
        );
        let text = text.replacen(
            &format!(
                "libvirt_channel_dirs = [{new:?}, {old:?}, {:?}]",
                dir.path().join("absent")
            ),
            "libvirt_channel_dirs = []",
            1,
        );
        let none = Config::parse(path, &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(managed_vms(&none)
            .iter()
            .all(|vm| vm.agent.is_none() || vm.name == "configured"));
    }

    #[test]
    fn a_directory_this_user_cannot_enter_is_denied_not_absent() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        domain_dir(dir.path(), "1-vm1", true);
        let locked = dir.path().join("1-vm1");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000))
            .unwrap_or_else(|e| panic!("{e}"));
        let channels = scan_libvirt_channels(&[dir.path().to_path_buf()], DEFAULT_PORT_NAME);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o750))
            .unwrap_or_else(|e| panic!("{e}"));
        // root enters any directory: there is nothing to deny.
        if channels.agent_for("vm1").is_some() {
            return;
        }
        assert_eq!(
            choose_libvirt_agent("vm1", &channels.roots),
            LibvirtAgent::Denied(locked)
        );
    }
}
