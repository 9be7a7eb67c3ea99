//! Where the provisioned QEMU, guest image and binaries are. `cargo xtask`
//! chooses them (honouring `BALLOON_QEMU` and `BALLOON_ACCEL`) and writes
//! them to `target/balloon-env.json`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestEnv {
    pub qemu: PathBuf,
    pub guest_dir: PathBuf,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub backend_binary: PathBuf,
    pub host_policy_binary: PathBuf,
    pub firmware_dirs: Vec<PathBuf>,
}

/// The file `cargo xtask` writes.
pub fn env_file(workspace: &Path) -> PathBuf {
    workspace.join("target").join("balloon-env.json")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

impl TestEnv {
    pub fn load() -> anyhow::Result<TestEnv> {
        let path = env_file(&workspace_root());
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is missing: run the tests with `cargo xtask test`, which provisions QEMU and the guest",
                path.display()
            )
        })?;
        let env: TestEnv =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        eprintln!("[guest-tests] accelerator: {}", env.accel);
        Ok(env)
    }

    pub fn save(&self, workspace: &Path) -> anyhow::Result<()> {
        let path = env_file(workspace);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn kernel(&self) -> PathBuf {
        self.guest_dir.join("vmlinuz")
    }

    pub fn initramfs(&self) -> PathBuf {
        self.guest_dir.join("initramfs.gz")
    }
}
