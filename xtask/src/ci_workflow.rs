//! The CI workflow for a hosted runner with `/dev/kvm`
//! (`.github/workflows/ci.yml`), checked by a test: against GitHub's
//! workflow schema (the copy `check-jsonschema` bundles as
//! `vendor.github-workflows`, installed from PyPI into a virtual
//! environment in the cache), and for what the job must do: `.ci/run` as
//! root in a Debian 12 container that is given `/dev/kvm`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::provision::{cache_root, is_root, output, succeed, workspace_root};

/// The validator, pinned.
const CHECK_JSONSCHEMA: &str = "check-jsonschema==0.39.0";
/// Debian's Python (not a pyenv or venv one earlier on PATH).
const PYTHON: &str = "/usr/bin/python3";

pub fn workflow() -> PathBuf {
    workspace_root().join(".github/workflows/ci.yml")
}

/// `check-jsonschema` in `~/.cache/balloon-stack/ci-tools`, installed
/// when missing (python3-venv first, from Debian, when that is missing).
fn validator() -> anyhow::Result<PathBuf> {
    // One installer at a time (tests run in parallel).
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLING
        .lock()
        .map_err(|_| anyhow::anyhow!("an earlier install of the validator panicked"))?;
    let venv = cache_root()?.join("ci-tools");
    let tool = venv.join("bin/check-jsonschema");
    if tool.is_file() {
        return Ok(tool);
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv)?;
    }
    let has_venv = output(Command::new(PYTHON).args(["-c", "import ensurepip, venv"]))
        .is_ok_and(|o| o.status.success());
    if !has_venv {
        anyhow::ensure!(
            is_root(),
            "Python's venv module is missing: apt-get install python3-venv (as root)"
        );
        succeed(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "python3-venv",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    succeed(Command::new(PYTHON).args(["-m", "venv"]).arg(&venv))?;
    succeed(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", CHECK_JSONSCHEMA])
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )
    .with_context(|| format!("installing {CHECK_JSONSCHEMA} from PyPI"))?;
    anyhow::ensure!(tool.is_file(), "{} was not installed", tool.display());
    Ok(tool)
}

/// What the job must do, found in the file's text.
const REQUIRED: &[(&str, &str)] = &[
    ("image: debian:bookworm", "a Debian 12 container"),
    ("--device /dev/kvm", "/dev/kvm given to the container"),
    (
        "--privileged",
        "a privileged container (chroot mounts, systemd-nspawn, libvirtd)",
    ),
    ("run: bash .ci/run", "the CI entry point"),
    (
        "rustup-init",
        "rustup's toolchain, as the README says a user brings",
    ),
];

/// `path` against the workflow schema, then for what the job must do.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let out = output(
        Command::new(validator()?)
            .args(["--builtin-schema", "vendor.github-workflows"])
            .arg(path),
    )?;
    anyhow::ensure!(
        out.status.success(),
        "{} does not validate against the GitHub workflow schema:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(path)?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(needle, _)| !text.contains(needle))
        .map(|(_, what)| *what)
        .collect();
    anyhow::ensure!(missing.is_empty(), "{} lacks {missing:?}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workflow_is_valid_against_the_workflow_schema() {
        check(&workflow()).unwrap();
    }

    /// The validator bites: a job without `runs-on` and with a step that
    /// is a number is refused, naming the schema's complaint.
    #[test]
    fn a_workflow_the_schema_refuses_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yml");
        std::fs::write(
            &bad,
            "name: bad\non: push\njobs:\n  ci:\n    steps:\n      - 3\n",
        )
        .unwrap();
        let error = check(&bad).unwrap_err().to_string();
        assert!(error.contains("workflow schema"), "{error}");
    }
}
