//! `cargo xtask deb`: the Debian package, assembled in target/deb/ from
//! the release binaries, the static guest agent, packaging/ (systemd
//! units, tmpfiles, maintainer scripts, the default configuration), man
//! pages and shell completions generated from the clap definitions, and
//! the docs, then built by `dpkg-deb`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::CommandFactory;

use crate::provision::{build_guest_programs, cargo, succeed, workspace_root};

pub const PACKAGE: &str = "balloon-stack";
/// The host programs, each with a man page and completions.
const PROGRAMS: [&str; 3] = ["balloon-backend", "host-policy", "balloonctl"];
pub const MAINTAINER: &str = "balloon-stack developers <balloon-stack@lists.debian.net>";

/// Where each file of packaging/ goes, and its mode.
const PACKAGING_FILES: [(&str, &str, u32); 6] = [
    (
        "systemd/balloon-backend@.service",
        "lib/systemd/system/balloon-backend@.service",
        0o644,
    ),
    (
        "systemd/host-policy.service",
        "lib/systemd/system/host-policy.service",
        0o644,
    ),
    (
        "tmpfiles/balloon-stack.conf",
        "usr/lib/tmpfiles.d/balloon-stack.conf",
        0o644,
    ),
    (
        "host-policy.toml",
        "etc/balloon-stack/host-policy.toml",
        0o644,
    ),
    (
        "libvirt/balloon-stack",
        "etc/libvirt/hooks/qemu.d/balloon-stack",
        0o755,
    ),
    (
        "prometheus/balloon-stack-alerts.yml",
        "usr/share/balloon-stack/prometheus/balloon-stack-alerts.yml",
        0o644,
    ),
];
/// Files under /etc, which dpkg keeps an operator's changes to.
const CONFFILES: [&str; 2] = [
    "/etc/balloon-stack/host-policy.toml",
    "/etc/libvirt/hooks/qemu.d/balloon-stack",
];
/// docs/ pages shipped in /usr/share/doc/balloon-stack.
const DOCS: [&str; 9] = [
    "install.md",
    "architecture.md",
    "balloon-backend.md",
    "balloonctl.md",
    "control-protocol.md",
    "guest-agent.md",
    "host-policy.md",
    "metrics.md",
    "qemu.md",
];

pub fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Strips what Debian does not ship: symbols, comments, notes.
pub fn strip(path: &Path) -> anyhow::Result<()> {
    succeed(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(path),
    )?;
    Ok(())
}

/// gzip -9n: no name or time stamp in the header, as Debian wants.
pub fn gzip(path: &Path) -> anyhow::Result<()> {
    succeed(Command::new("gzip").args(["-9nf"]).arg(path))?;
    Ok(())
}

/// The clap definition of each host program.
fn program_command(name: &str) -> anyhow::Result<clap::Command> {
    Ok(match name {
        "balloon-backend" => balloon_backend::cli::Args::command(),
        "host-policy" => host_policy::cli::Cli::command(),
        "balloonctl" => balloonctl::cli::Cli::command(),
        other => anyhow::bail!("no command line known for {other}"),
    })
}

fn man_and_completions(root: &Path) -> anyhow::Result<()> {
    use clap_complete::Shell;
    for name in PROGRAMS {
        let command = program_command(name)?;
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone()).render(&mut page)?;
        let man = root.join(format!("usr/share/man/man1/{name}.1"));
        write(&man, &page, 0o644)?;
        gzip(&man)?;
        for (shell, path) in [
            (
                Shell::Bash,
                format!("usr/share/bash-completion/completions/{name}"),
            ),
            (
                Shell::Zsh,
                format!("usr/share/zsh/vendor-completions/_{name}"),
            ),
            (
                Shell::Fish,
                format!("usr/share/fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command.clone(), name, &mut script);
            write(&root.join(path), &script, 0o644)?;
        }
    }
    Ok(())
}

/// A package's dependencies on shared libraries, from dpkg-shlibdeps
/// (which needs a debian/control to read, so it gets one of its own).
pub fn shared_library_depends(package: &str, binaries: &[PathBuf]) -> anyhow::Result<String> {
    let scratch = tempfile::tempdir()?;
    write(
        &scratch.path().join("debian/control"),
        format!("Source: {package}\n\nPackage: {package}\nArchitecture: amd64\n").as_bytes(),
        0o644,
    )?;
    let mut command = Command::new("dpkg-shlibdeps");
    command.current_dir(scratch.path()).arg("-O");
    for binary in binaries {
        command.arg(format!("-e{}", binary.display()));
    }
    let output = succeed(&mut command)?;
    output
        .lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

/// A one-entry changelog.Debian for `package`, built by `cargo xtask
/// {task}`.
pub fn changelog(package: &str, version: &str, task: &str) -> anyhow::Result<String> {
    let date = succeed(Command::new("date").args(["-R", "-u"]))?;
    Ok(format!(
        "{package} ({version}) bookworm; urgency=medium\n\n  \
         * Built from the balloon-stack repository by `cargo xtask {task}`.\n\n \
         -- {MAINTAINER}  {}\n",
        date.trim()
    ))
}

/// Builds the package `deb` from the tree `root` (its DEBIAN/ written).
pub fn dpkg_deb_build(root: &Path, deb: &Path) -> anyhow::Result<()> {
    succeed(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(root)
            .arg(deb),
    )?;
    Ok(())
}

pub const COPYRIGHT: &str =
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: balloon-stack

Files: *
Copyright: 2026 balloon-stack developers
License: Apache-2.0

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the \"License\"); you may
 not use this software except in compliance with the License.
 .
 On Debian systems, the full text of the Apache License, Version 2.0 can
 be found in the file `/usr/share/common-licenses/Apache-2.0'.
";

/// Lintian's tags that this package carries on purpose, each with why.
const LINTIAN_OVERRIDES: &str = "\
# The guest agent is a static x86_64 program for the guests, which the host
# only hands out (copied into guest images): data for the host, not a
# program it runs.
balloon-stack: arch-dependent-file-in-usr-share [usr/share/balloon-stack/guest/guest-agent]
# Being static (a static PIE), it needs no library, which lintian reads as
# a shared library without its dependencies.
balloon-stack: shared-library-lacks-prerequisites [usr/share/balloon-stack/guest/guest-agent]
";

fn control(version: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}, passwd\n\
         Suggests: libvirt-daemon-driver-qemu\n\
         Section: admin\n\
         Priority: optional\n\
         Description: memory ballooning for KVM/QEMU hosts that overcommit memory\n \
         A vhost-user virtio-balloon device (balloon-backend) that returns\n \
         the pages a guest's balloon driver inflates to the host, a host\n \
         daemon (host-policy) that sets every VM's balloon from host and\n \
         guest memory within a per-VM limit, an operator's command line\n \
         (balloonctl), systemd units, a libvirt hook that starts a VM's\n \
         backend with the VM, and a static guest agent for the guests.\n"
    )
}

/// Sizes of every file under `root`, in KiB rounded up per file.
pub fn installed_kib(root: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in walk(root)? {
        total += std::fs::symlink_metadata(&entry)?.len().div_ceil(1024);
    }
    Ok(total)
}

/// Every regular file under `root`, sorted.
pub fn walk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let kind = std::fs::symlink_metadata(&path)?.file_type();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

pub fn md5sums(root: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    for file in walk(root)? {
        let relative = file.strip_prefix(root)?;
        if relative.starts_with("DEBIAN") {
            continue;
        }
        let sum = succeed(Command::new("md5sum").arg(&file))?;
        let digest = sum.split_whitespace().next().unwrap_or_default();
        text.push_str(&format!("{digest}  {}\n", relative.display()));
    }
    Ok(text)
}

/// Builds target/deb/balloon-stack_<version>_amd64.deb and returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let workspace = workspace_root();
    let upstream = env!("CARGO_PKG_VERSION");
    let version = format!("{upstream}-1");
    eprintln!("[xtask] building the release binaries");
    succeed(
        Command::new(cargo())
            .current_dir(&workspace)
            .args(["build", "--release", "--quiet"])
            .args(PROGRAMS.iter().flat_map(|p| ["-p", p])),
    )?;
    let guest_programs = build_guest_programs()?;
    let out = workspace.join("target/deb");
    let root = out.join(format!("{PACKAGE}_{version}_amd64"));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let mut binaries = Vec::new();
    for name in PROGRAMS {
        let installed = root.join("usr/bin").join(name);
        copy(
            &workspace.join("target/release").join(name),
            &installed,
            0o755,
        )?;
        strip(&installed)?;
        binaries.push(installed);
    }
    let agent = guest_programs
        .iter()
        .find(|p| p.ends_with("guest-agent"))
        .context("the guest agent was not built")?;
    let installed_agent = root.join("usr/share/balloon-stack/guest/guest-agent");
    copy(agent, &installed_agent, 0o755)?;
    strip(&installed_agent)?;
    let packaging = workspace.join("packaging");
    for (from, to, mode) in PACKAGING_FILES {
        copy(&packaging.join(from), &root.join(to), mode)?;
    }
    std::fs::create_dir_all(root.join("etc/balloon-stack/vm.d"))?;
    man_and_completions(&root)?;
    let doc = root.join(format!("usr/share/doc/{PACKAGE}"));
    for page in DOCS {
        copy(&workspace.join("docs").join(page), &doc.join(page), 0o644)?;
    }
    copy(&workspace.join("README.md"), &doc.join("README.md"), 0o644)?;
    write(&doc.join("copyright"), COPYRIGHT.as_bytes(), 0o644)?;
    write(
        &doc.join("changelog.Debian"),
        changelog(PACKAGE, &version, "deb")?.as_bytes(),
        0o644,
    )?;
    gzip(&doc.join("changelog.Debian"))?;
    write(
        &root.join(format!("usr/share/lintian/overrides/{PACKAGE}")),
        LINTIAN_OVERRIDES.as_bytes(),
        0o644,
    )?;
    let depends = shared_library_depends(PACKAGE, &binaries)?;
    let size = installed_kib(&root)?;
    let sums = md5sums(&root)?;
    let debian = root.join("DEBIAN");
    write(
        &debian.join("control"),
        control(&version, &depends, size).as_bytes(),
        0o644,
    )?;
    write(
        &debian.join("conffiles"),
        format!("{}\n", CONFFILES.join("\n")).as_bytes(),
        0o644,
    )?;
    write(&debian.join("md5sums"), sums.as_bytes(), 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &packaging.join("debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    dpkg_deb_build(&root, &deb)?;
    Ok(deb)
}
