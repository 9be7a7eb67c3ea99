//! Where libvirt puts the host end of a guest-agent channel.
//!
//! A domain with
//!
//! ```xml
//! <channel type='unix'>
//!   <source mode='bind'/>
//!   <target type='virtio' name='org.balloon.agent.0'/>
//! </channel>
//! ```
//!
//! (no `path` on `<source>`) gets its socket from libvirt, made when the
//! domain starts and removed when it stops:
//!
//! - libvirt 9.7 and later (bookworm-backports' 11.x, Debian 13):
//!   `/run/libvirt/qemu/channel/<id>-<short name>/org.balloon.agent.0`
//!   (seen with libvirt 11.3: `.../channel/1-balloon-stack-channe/...`
//!   for the domain `balloon-stack-channel-probe-vm`, directory mode 0750
//!   and socket owned by QEMU's user `libvirt-qemu`);
//! - before (Debian 12's 9.0):
//!   `/var/lib/libvirt/qemu/channel/target/domain-<id>-<short name>/org.balloon.agent.0`.
//!
//! `<id>` is the running domain's id (`virsh domid`). The short name is
//! the domain's name cut to its first 20 characters; a libvirtd whose
//! locale cannot decode the name (the C locale and a non-ASCII name) cuts
//! it to 20 bytes instead. So two running domains whose names share their
//! first 20 characters are told apart only by their ids.
//!
//! Everything here reads only directory names; nothing opens a socket.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// libvirt 9.7 and later (system daemon).
pub const LIBVIRT_CHANNEL_ROOT: &str = "/run/libvirt/qemu/channel";
/// libvirt before 9.7 (Debian 12's 9.0).
pub const LIBVIRT_CHANNEL_ROOT_BEFORE_9_7: &str = "/var/lib/libvirt/qemu/channel/target";
/// Both, newest first: where to look when libvirt's version is unknown.
pub const LIBVIRT_CHANNEL_ROOTS: [&str; 2] =
    [LIBVIRT_CHANNEL_ROOT, LIBVIRT_CHANNEL_ROOT_BEFORE_9_7];
/// The characters of a domain's name that libvirt keeps in its per-domain
/// directories (`VIR_DOMAIN_SHORT_NAME_MAX`; measured in libvirt 11.3).
pub const LIBVIRT_SHORT_NAME_MAX: usize = 20;

/// A per-domain channel directory holding the port's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtChannel {
    /// The running domain's id.
    pub id: u32,
    /// The domain's name as libvirt cut it (lossy if it is not UTF-8).
    pub short_name: String,
    /// The port's socket.
    pub socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LibvirtChannelError {
    #[error("no libvirt channel {port} for domain {domain:?} under {root}")]
    NotFound {
        root: PathBuf,
        domain: String,
        port: String,
    },
    #[error(
        "several running domains under {root} could be {domain:?} (ids {ids:?}: their names \
         share the first {LIBVIRT_SHORT_NAME_MAX} characters); give the domain's id"
    )]
    Ambiguous {
        root: PathBuf,
        domain: String,
        ids: Vec<u32>,
    },
    #[error("reading {root}: {source}")]
    Read { root: PathBuf, source: io::Error },
}

/// The id and short name in a directory name `<id>-<short name>`
/// (libvirt 9.7 and later) or `domain-<id>-<short name>` (before);
/// `None` for any other name.
pub fn parse_channel_dir(file_name: &[u8]) -> Option<(u32, &[u8])> {
    let rest = file_name.strip_prefix(b"domain-").unwrap_or(file_name);
    let dash = rest.iter().position(|b| *b == b'-')?;
    let (digits, short) = (rest.get(..dash)?, rest.get(dash + 1..)?);
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let id = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (!short.is_empty()).then_some((id, short))
}

/// Whether libvirt could have made `short` (from a directory name) of the
/// domain name `name`: its first 20 characters, or its first 20 bytes.
pub fn short_name_matches(short: &[u8], name: &str) -> bool {
    let by_chars = name
        .char_indices()
        .nth(LIBVIRT_SHORT_NAME_MAX)
        .map_or(name, |(end, _)| name.get(..end).unwrap_or(name));
    let bytes = name.as_bytes();
    let by_bytes = bytes.get(..LIBVIRT_SHORT_NAME_MAX).unwrap_or(bytes);
    !name.is_empty() && (short == by_chars.as_bytes() || short == by_bytes)
}

/// Among the directory names `entries` of a channel root, the one of the
/// domain `name` (with id `id` when it is known). `Err` lists the ids of
/// every candidate when there is not exactly one (none: empty).
pub fn pick_channel_dir<'a>(
    entries: impl IntoIterator<Item = &'a [u8]>,
    name: &str,
    id: Option<u32>,
) -> Result<&'a [u8], Vec<u32>> {
    let mut found: Vec<(u32, &[u8])> = entries
        .into_iter()
        .filter(|entry| {
            parse_channel_dir(entry).is_some_and(|(dir_id, short)| {
                !matches!(id, Some(id) if id != dir_id) && short_name_matches(short, name)
            })
        })
        .filter_map(|entry| parse_channel_dir(entry).map(|(dir_id, _)| (dir_id, entry)))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0).1),
        _ => Err(found.iter().map(|(dir_id, _)| *dir_id).collect()),
    }
}

fn read_names(root: &Path) -> Result<Vec<Vec<u8>>, LibvirtChannelError> {
    let read = |source| LibvirtChannelError::Read {
        root: root.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(read)? {
        names.push(entry.map_err(read)?.file_name().as_bytes().to_vec());
    }
    names.sort();
    Ok(names)
}

fn socket_in(root: &Path, dir: &[u8], port: &str) -> PathBuf {
    root.join(OsStr::from_bytes(dir)).join(port)
}

/// Every per-domain directory under `root` that holds an entry named
/// `port` (a domain that has the channel and runs), sorted by directory
/// name. A missing root is no error: no domain runs, or libvirt keeps its
/// channels in the other root.
pub fn list_libvirt_channels(
    root: &Path,
    port: &str,
) -> Result<Vec<LibvirtChannel>, LibvirtChannelError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    Ok(read_names(root)?
        .iter()
        .filter_map(|name| {
            let (id, short) = parse_channel_dir(name)?;
            let socket = socket_in(root, name, port);
            socket.symlink_metadata().ok()?;
            Some(LibvirtChannel {
                id,
                short_name: String::from_utf8_lossy(short).into_owned(),
                socket,
            })
        })
        .collect())
}

/// The socket libvirt made for the channel `port` of the running domain
/// `domain` under `root` (one of [`LIBVIRT_CHANNEL_ROOTS`]); pass the
/// domain's `id` when it is known, since it alone tells apart domains
/// whose names share their first 20 characters. Only directories that
/// hold `port` count.
pub fn libvirt_channel_socket(
    root: &Path,
    domain: &str,
    id: Option<u32>,
    port: &str,
) -> Result<PathBuf, LibvirtChannelError> {
    let names = if root.exists() {
        read_names(root)?
    } else {
        Vec::new()
    };
    let with_port = names
        .iter()
        .map(Vec::as_slice)
        .filter(|dir| socket_in(root, dir, port).symlink_metadata().is_ok());
    match pick_channel_dir(with_port, domain, id) {
        Ok(dir) => Ok(socket_in(root, dir, port)),
        Err(ids) if ids.is_empty() => Err(LibvirtChannelError::NotFound {
            root: root.to_path_buf(),
            domain: domain.to_string(),
            port: port.to_string(),
        }),
        Err(ids) => Err(LibvirtChannelError::Ambiguous {
            root: root.to_path_buf(),
            domain: domain.to_string(),
            ids,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::DEFAULT_PORT_NAME;

    #[test]
    fn directory_names_parse() {
        assert_eq!(parse_channel_dir(b"domain-3-vm1"), Some((3, &b"vm1"[..])));
        // libvirt 11.3's, as seen for the domain balloon-stack-channel-probe-vm.
        assert_eq!(
            parse_channel_dir(b"1-balloon-stack-channe"),
            Some((1, &b"balloon-stack-channe"[..]))
        );
        assert!(short_name_matches(
            b"balloon-stack-channe",
            "balloon-stack-channel-probe-vm"
        ));
        assert_eq!(
            parse_channel_dir(b"domain-12-web-front-01"),
            Some((12, &b"web-front-01"[..]))
        );
        for bad in [
            &b"domain--vm1"[..],
            b"-vm1",
            b"domain-3-",
            b"3-",
            b"vm1",
            b"domain-x-vm1",
            b"domain-3",
            b"dom-3-vm1",
            b"domain-99999999999-vm1",
            b"",
        ] {
            assert_eq!(parse_channel_dir(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn long_names_match_their_first_twenty_characters() {
        let long = "database-primary-eu-west-1";
        assert!(short_name_matches(b"database-primary-eu-", long));
        assert!(!short_name_matches(b"database-primary-eu-west-1", long));
        assert!(short_name_matches(b"vm1", "vm1"));
        assert!(!short_name_matches(b"vm1", "vm10"));
        assert!(!short_name_matches(b"vm10", "vm1"));
        assert!(!short_name_matches(b"", ""));
        // Exactly 20 characters: nothing is cut.
        assert!(short_name_matches(
            b"abcdefghijklmnopqrst",
            "abcdefghijklmnopqrst"
        ));
    }

    #[test]
    fn multibyte_names_match_by_characters_or_by_bytes() {
        // 23 characters, 28 bytes: a UTF-8 libvirtd keeps 20 characters
        // (25 bytes), one in the C locale 20 bytes.
        let name = "größe-überprüfung-äbc12";
        let chars: String = name.chars().take(20).collect();
        assert!(short_name_matches(chars.as_bytes(), name));
        assert!(short_name_matches(&name.as_bytes()[..20], name));
        assert!(!short_name_matches(&name.as_bytes()[..19], name));
    }

    #[test]
    fn the_id_tells_apart_domains_that_share_a_prefix() {
        let entries: [&[u8]; 4] = [
            b"domain-4-database-primary-eu-",
            b"domain-7-database-primary-eu-",
            b"domain-5-vm1",
            b"other",
        ];
        assert_eq!(
            pick_channel_dir(entries, "database-primary-eu-west-1", None),
            Err(vec![4, 7])
        );
        assert_eq!(
            pick_channel_dir(entries, "database-primary-eu-west-1", Some(7)),
            Ok(&b"domain-7-database-primary-eu-"[..])
        );
        assert_eq!(
            pick_channel_dir(entries, "vm1", None),
            Ok(&b"domain-5-vm1"[..])
        );
        assert_eq!(pick_channel_dir(entries, "vm1", Some(4)), Err(vec![]));
        assert_eq!(pick_channel_dir(entries, "vm2", None), Err(vec![]));
    }

    #[test]
    fn sockets_are_found_only_where_the_port_is() {
        let root = tempfile::tempdir().unwrap();
        // Both layouts: libvirt 9.7+ (`ID-NAME`) and older (`domain-ID-NAME`).
        for dir in ["1-vm1", "domain-2-vm2", "domain-3-long-name-of-a-guest"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
        }
        // vm2 runs without the agent's channel.
        std::fs::write(root.path().join("1-vm1").join(DEFAULT_PORT_NAME), "").unwrap();
        std::fs::write(
            root.path()
                .join("domain-3-long-name-of-a-guest")
                .join(DEFAULT_PORT_NAME),
            "",
        )
        .unwrap();
        assert_eq!(
            libvirt_channel_socket(root.path(), "vm1", None, DEFAULT_PORT_NAME).unwrap(),
            root.path().join("1-vm1").join(DEFAULT_PORT_NAME)
        );
        let long = libvirt_channel_socket(
            root.path(),
            "long-name-of-a-guest-vm",
            Some(3),
            DEFAULT_PORT_NAME,
        )
        .unwrap();
        assert!(long.ends_with("domain-3-long-name-of-a-guest/org.balloon.agent.0"));
        assert!(matches!(
            libvirt_channel_socket(root.path(), "vm2", None, DEFAULT_PORT_NAME),
            Err(LibvirtChannelError::NotFound { .. })
        ));
        let listed = list_libvirt_channels(root.path(), DEFAULT_PORT_NAME).unwrap();
        let ids: Vec<u32> = listed.iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 3]);
        assert_eq!(listed[1].short_name, "long-name-of-a-guest");
        // A root that does not exist lists nothing and finds nothing.
        let missing = root.path().join("absent");
        assert_eq!(
            list_libvirt_channels(&missing, DEFAULT_PORT_NAME).unwrap(),
            []
        );
        assert!(matches!(
            libvirt_channel_socket(&missing, "vm1", None, DEFAULT_PORT_NAME),
            Err(LibvirtChannelError::NotFound { .. })
        ));
    }

    #[test]
    fn arbitrary_directory_names_never_panic() {
        for name in [
            &b"domain-"[..],
            b"domain-1-\xff\xfe",
            b"domain-4294967295-x",
            b"domain-4294967296-x",
            b"\xff",
        ] {
            let _ = parse_channel_dir(name);
            let _ = pick_channel_dir([name], "x", None);
        }
        assert_eq!(
            parse_channel_dir(b"domain-4294967295-x"),
            Some((u32::MAX, &b"x"[..]))
        );
    }
}
