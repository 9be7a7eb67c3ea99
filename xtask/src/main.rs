//! Project tasks: provision QEMU and the guest image, run the demo VM, run
//! every test, run the benchmarks. `cargo xtask --help` lists them.

mod bench;
mod deb;
mod demo;
mod fuzz;
mod libvirt_test;
mod matrix;
mod migration_comparison;
mod package_test;
mod policy_on_guests;
mod provision;
mod qemu_comparison;

use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Provisioning, demo, tests and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Find or build a QEMU 10.2 with our patches (vhost-user-balloon-pci).
    Qemu,
    /// Build (or reuse) the test guest: kernel, busybox, balloon module.
    Guest {
        /// The Debian suite whose cloud kernel the guest runs (default:
        /// 6.12 from bookworm-backports, else bookworm's 6.1).
        #[arg(long, value_enum)]
        kernel: Option<provision::KernelSuite>,
    },
    /// Run scenarios a, b, c, d and g on every guest kernel and print a table.
    GuestMatrix,
    /// Boot a 1 GiB guest and show its memory being reclaimed and given back.
    Demo,
    /// Run the benchmarks and write docs/performance.md.
    Bench {
        /// Only the policies on real guests (about 15 min): print the table,
        /// write the SVG to target/, leave docs/performance.md alone.
        #[arg(long)]
        only_policies_on_guests: bool,
        /// Only the migration comparison (about 1 min): rewrite its section
        /// of docs/performance.md.
        #[arg(long, conflicts_with = "only_policies_on_guests")]
        only_migration: bool,
        /// Only the state file's cost (seconds): rewrite its section of
        /// docs/performance.md.
        #[arg(long, conflicts_with_all = ["only_policies_on_guests", "only_migration"])]
        only_state_file: bool,
    },
    /// Build the Debian package: target/deb/balloon-stack_<version>_amd64.deb.
    Deb,
    /// Check the package (root): contents, lintian, systemd-analyze, an
    /// install, the libvirt hook and a removal in a clean Debian 12 root,
    /// then on this host under a real libvirt with a booted guest.
    PackageTest,
    /// Run every fuzz target for a while (cargo-fuzz, nightly toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Provision everything, run every test in the workspace, then the
    /// package test (with extra arguments: only `cargo test` with them).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.task {
        Task::Qemu => {
            let qemu = provision::ensure_qemu()?;
            println!("{}", qemu.display());
            Ok(())
        }
        Task::Guest { kernel } => {
            let guest = provision::ensure_guest(kernel)?;
            println!("{}", guest.display());
            Ok(())
        }
        Task::GuestMatrix => matrix::run(),
        Task::Demo => {
            let env = provision::ensure_all()?;
            demo::run(&env)
        }
        Task::Bench {
            only_state_file: true,
            ..
        } => bench::run_state_file_only(),
        Task::Bench {
            only_migration: true,
            ..
        } => {
            let env = provision::ensure_all()?;
            bench::run_migration_only(&env)
        }
        Task::Bench {
            only_policies_on_guests: false,
            ..
        } => bench::run(),
        Task::Bench {
            only_policies_on_guests: true,
            ..
        } => {
            provision::ensure_all()?;
            let svg = provision::workspace_root().join("target/policies-on-guests.svg");
            println!("{}", policy_on_guests::run(&svg)?);
            eprintln!("[xtask] wrote {}", svg.display());
            Ok(())
        }
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Deb => {
            println!("{}", deb::build()?.display());
            Ok(())
        }
        Task::PackageTest => package_test::run(),
        Task::Test { cargo_args } => {
            provision::ensure_all()?;
            let status = Command::new(provision::cargo())
                .current_dir(provision::workspace_root())
                .args(["test", "--workspace", "--release"])
                .args(&cargo_args)
                .status()
                .context("running cargo test")?;
            anyhow::ensure!(status.success(), "cargo test failed ({status})");
            // The whole suite includes the package under a real libvirt
            // (`virsh save`/`restore` among its checks); a filtered run
            // is just `cargo test`.
            if cargo_args.is_empty() {
                package_test::run()?;
            }
            Ok(())
        }
    }
}
