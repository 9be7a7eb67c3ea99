//! `cargo xtask qemu-deb`: the QEMU that `cargo xtask qemu` builds (Debian's
//! qemu source package with xtask/qemu-patches) as the Debian package
//! `balloon-stack-qemu`, under its own prefix so that it never meets
//! Debian's QEMU: `/usr/lib/balloon-stack-qemu/bin/qemu-system-x86_64`.
//!
//! QEMU finds its data files relative to its own binary (`../share/qemu`
//! and `../share/qemu-firmware`): the package points the first at Debian's
//! `qemu-system-data` and fills the second with links to the BIOS and VGA
//! ROMs of Debian's `seabios` and the network boot ROMs of `ipxe-qemu`,
//! all three in its Depends, so a domain needs no `-L`. Its other Depends
//! come from dpkg-shlibdeps.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::deb::{
    copy, dpkg_deb_build, gzip, installed_kib, md5sums, shared_library_depends, strip, write,
    MAINTAINER,
};
use crate::provision::{succeed, workspace_root};

pub const PACKAGE: &str = "balloon-stack-qemu";
/// The package's own prefix.
pub const PREFIX: &str = "/usr/lib/balloon-stack-qemu";
/// The emulator, as installed.
pub const EMULATOR: &str = "/usr/lib/balloon-stack-qemu/bin/qemu-system-x86_64";
/// Debian's packages whose data files the emulator uses.
const DATA_PACKAGES: &str = "seabios, qemu-system-data, ipxe-qemu";
/// seabios' files in /usr/share/seabios that QEMU's x86 machines load.
const SEABIOS_FILES: &[&str] = &[
    "bios.bin",
    "bios-256k.bin",
    "bios-microvm.bin",
    "vgabios.bin",
    "vgabios-ati.bin",
    "vgabios-bochs-display.bin",
    "vgabios-cirrus.bin",
    "vgabios-isavga.bin",
    "vgabios-qxl.bin",
    "vgabios-ramfb.bin",
    "vgabios-stdvga.bin",
    "vgabios-virtio.bin",
    "vgabios-vmware.bin",
];
/// ipxe-qemu's option ROMs in /usr/lib/ipxe/qemu, for guest NICs.
const IPXE_ROMS: &[&str] = &[
    "efi-e1000.rom",
    "efi-e1000e.rom",
    "efi-eepro100.rom",
    "efi-ne2k_pci.rom",
    "efi-pcnet.rom",
    "efi-rtl8139.rom",
    "efi-virtio.rom",
    "efi-vmxnet3.rom",
];

/// Paths `dpkg-deb --contents` must list (symbolic links included).
pub const PROMISED: &[&str] = &[
    "./usr/lib/balloon-stack-qemu/bin/qemu-system-x86_64",
    "./usr/lib/balloon-stack-qemu/share/qemu",
    "./usr/lib/balloon-stack-qemu/share/qemu-firmware/bios-256k.bin",
    "./usr/lib/balloon-stack-qemu/share/qemu-firmware/efi-virtio.rom",
    "./usr/share/doc/balloon-stack-qemu/copyright",
    "./usr/share/doc/balloon-stack-qemu/changelog.Debian.gz",
    "./usr/share/doc/balloon-stack-qemu/README.Debian",
];

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: QEMU
Upstream-Contact: qemu-devel@nongnu.org
Source: https://www.qemu.org/
Comment: qemu-system-x86_64 built by balloon-stack's `cargo xtask qemu-deb`
 from Debian's qemu source package, with Debian's patch series and the
 patches in balloon-stack's xtask/qemu-patches applied.

Files: *
Copyright: 2003-2025 Fabrice Bellard and the QEMU Project developers
License: GPL-2

License: GPL-2
 This program is free software; you can redistribute it and/or modify it
 under the terms of the GNU General Public License, version 2, as
 published by the Free Software Foundation.
 .
 On Debian systems, the full text of the GNU General Public License
 version 2 can be found in the file `/usr/share/common-licenses/GPL-2'.
";

/// Lintian's tags that this package carries on purpose, each with why.
const LINTIAN_OVERRIDES: &str = "\
# Built locally from a checkout, never uploaded: there is no bug to close.
balloon-stack-qemu: initial-upload-closes-no-bugs [usr/share/doc/balloon-stack-qemu/changelog.Debian.gz:1]
";

fn readme(version: &str, patches: &[String]) -> String {
    format!(
        "balloon-stack-qemu {version}\n\
         =====================\n\n\
         QEMU's x86_64 system emulator with balloon-stack's patches\n\
         ({}), for the vhost-user balloon of balloon-stack:\n\n  \
         {EMULATOR}\n\n\
         It lives under its own prefix and never replaces Debian's QEMU. Use it as\n\
         a libvirt domain's <emulator> and attach the balloon with\n\n  \
         -chardev socket,id=bal0,path=/run/balloon/DOMAIN/balloon.sock,reconnect-ms=1000\n  \
         -device vhost-user-balloon-pci,chardev=bal0\n\n\
         (see /usr/share/doc/balloon-stack/install.md). Its firmware comes from\n\
         Debian's seabios, qemu-system-data and ipxe-qemu through the links in\n\
         {PREFIX}/share, so no -L is needed.\n",
        patches.join(", ")
    )
}

/// The emulator's version (`10.2.2`) from `--version`.
fn qemu_version(qemu: &Path) -> anyhow::Result<String> {
    let text = succeed(Command::new(qemu).arg("--version"))?;
    text.lines()
        .next()
        .and_then(|l| l.split("version ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(str::to_string)
        .with_context(|| format!("no version in {}'s --version: {text:?}", qemu.display()))
}

/// The patches of xtask/qemu-patches, by name.
fn patches() -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(workspace_root().join("xtask/qemu-patches"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".patch"))
        .collect();
    names.sort();
    Ok(names)
}

/// The package version: QEMU's, then the build's time (the binary's
/// modification time, UTC), so that every rebuild is an upgrade.
fn package_version(qemu: &Path) -> anyhow::Result<String> {
    let built = std::fs::metadata(qemu)?
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let stamp =
        succeed(Command::new("date").args(["-u", "-d", &format!("@{built}"), "+%Y%m%d%H%M"]))?;
    Ok(format!("{}+balloon{}-1", qemu_version(qemu)?, stamp.trim()))
}

fn symlink(target: &str, link: &Path) -> anyhow::Result<()> {
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {target}", link.display()))
}

fn control(version: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}, {DATA_PACKAGES}\n\
         Suggests: balloon-stack\n\
         Section: otherosfs\n\
         Priority: optional\n\
         Homepage: https://www.qemu.org/\n\
         Description: QEMU x86_64 emulator with balloon-stack's vhost-user balloon\n \
         QEMU's x86_64 system emulator built from Debian's qemu source package\n \
         with balloon-stack's patches: the migratable vhost-user-balloon-pci\n \
         device, a fix for a configuration change while the device is stopped,\n \
         and reconnection to a restarted device backend. It lives under\n \
         {PREFIX} and leaves Debian's QEMU alone.\n"
    )
}

/// Builds target/deb/balloon-stack-qemu_<version>_amd64.deb from the
/// emulator at `qemu` (`cargo xtask qemu`'s build) and returns its path.
pub fn build(qemu: &Path) -> anyhow::Result<PathBuf> {
    let version = package_version(qemu)?;
    let patches = patches()?;
    let out = workspace_root().join("target/deb");
    let root = out.join(format!("{PACKAGE}_{version}_amd64"));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let prefix = root.join(PREFIX.trim_start_matches('/'));
    let emulator = prefix.join("bin/qemu-system-x86_64");
    copy(qemu, &emulator, 0o755)?;
    strip(&emulator)?;
    // QEMU's data directory is Debian's qemu-system-data; its firmware
    // directory holds links to seabios' and ipxe-qemu's files. Relative
    // links, as Debian wants within /usr.
    symlink("../../../share/qemu", &prefix.join("share/qemu"))?;
    let firmware = prefix.join("share/qemu-firmware");
    for file in SEABIOS_FILES {
        symlink(
            &format!("../../../../share/seabios/{file}"),
            &firmware.join(file),
        )?;
    }
    for rom in IPXE_ROMS {
        symlink(&format!("../../../ipxe/qemu/{rom}"), &firmware.join(rom))?;
    }
    let doc = root.join(format!("usr/share/doc/{PACKAGE}"));
    write(&doc.join("copyright"), COPYRIGHT.as_bytes(), 0o644)?;
    write(
        &doc.join("README.Debian"),
        readme(&version, &patches).as_bytes(),
        0o644,
    )?;
    let date = succeed(Command::new("date").args(["-R", "-u"]))?;
    // The build's cache directory names its recipe (qemu-HASH).
    let build_name = qemu
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .map_or_else(
            || qemu.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
    let patch_lines: String = patches.iter().map(|p| format!("    - {p}\n")).collect();
    let changelog = format!(
        "{PACKAGE} ({version}) bookworm; urgency=medium\n\n  \
         * QEMU {} from Debian's qemu source package, with the patches of\n    \
         balloon-stack's xtask/qemu-patches:\n{patch_lines}  \
         * Built by `cargo xtask qemu-deb` from the build {build_name}.\n\n \
         -- {MAINTAINER}  {}\n",
        qemu_version(qemu)?,
        date.trim()
    );
    write(&doc.join("changelog.Debian"), changelog.as_bytes(), 0o644)?;
    gzip(&doc.join("changelog.Debian"))?;
    write(
        &root.join(format!("usr/share/lintian/overrides/{PACKAGE}")),
        LINTIAN_OVERRIDES.as_bytes(),
        0o644,
    )?;
    let depends = shared_library_depends(PACKAGE, std::slice::from_ref(&emulator))?;
    let size = installed_kib(&root)?;
    let sums = md5sums(&root)?;
    let debian = root.join("DEBIAN");
    write(
        &debian.join("control"),
        control(&version, &depends, size).as_bytes(),
        0o644,
    )?;
    write(&debian.join("md5sums"), sums.as_bytes(), 0o644)?;
    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    dpkg_deb_build(&root, &deb)?;
    Ok(deb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_firmware_link_leads_where_debian_puts_the_file() {
        let base = Path::new(PREFIX).join("share/qemu-firmware");
        let resolve = |target: &str| {
            let mut path = base.clone();
            for part in target.split('/') {
                if part == ".." {
                    path.pop();
                } else {
                    path.push(part);
                }
            }
            path
        };
        assert_eq!(
            resolve("../../../../share/seabios/bios-256k.bin"),
            Path::new("/usr/share/seabios/bios-256k.bin")
        );
        assert_eq!(
            resolve("../../../ipxe/qemu/efi-virtio.rom"),
            Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom")
        );
        let mut data = Path::new(PREFIX).join("share");
        for _ in 0..3 {
            data.pop();
        }
        assert_eq!(data.join("share/qemu"), Path::new("/usr/share/qemu"));
    }
}
