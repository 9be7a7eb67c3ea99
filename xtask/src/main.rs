//! Project tasks: provision QEMU and the guest image, run the demo VM, run
//! every test, run the benchmarks. `cargo xtask --help` lists them.

mod alert_rules;
mod bench;
#[cfg(test)]
mod ci_workflow;
mod deb;
mod demo;
mod fresh_check;
mod fuzz;
mod guest_deb;
mod guest_deb_test;
mod libvirt_test;
mod matrix;
mod migration_comparison;
mod nspawn;
mod package_test;
mod policy_on_guests;
mod provision;
mod qemu_comparison;
mod qemu_deb;
mod soak;
mod syscall_filter;
mod systemd_test;

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
    /// Build and check the guest side (root): the package
    /// target/deb/balloon-stack-guest_<version>_amd64.deb (static agent,
    /// unit, udev rule, man page) and a tarball for any x86_64 Linux.
    GuestDeb,
    /// The guest package in a Debian 12 guest under QEMU (root): udev
    /// starts the agent when the port exists, and never without it.
    GuestDebTest,
    /// Package the QEMU of `cargo xtask qemu` (built first if needed) as
    /// target/deb/balloon-stack-qemu_<version>_amd64.deb.
    QemuDeb,
    /// Check the package (root): contents, lintian, systemd-analyze, an
    /// install, the libvirt hook and a removal in a clean Debian 12 root;
    /// the root booted under systemd 252 and 254+ as PID 1 with the units
    /// running a guest's balloon; then on this host under a real libvirt.
    PackageTest {
        /// Only this part (after the package's contents and lintian).
        #[arg(long, value_enum)]
        only: Option<package_test::Part>,
    },
    /// Run the README's two commands on a new machine (root): a new
    /// debootstrap Debian 12 root with only gcc and rustup's toolchain,
    /// booted with systemd; prints pass/fail and the time of each.
    FreshCheck,
    /// Run every fuzz target for a while (cargo-fuzz, nightly toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// A randomized soak on real guests (docs/reliability.md): operations
    /// and faults from a seeded schedule, invariants checked throughout.
    Soak {
        /// How long the schedule runs, in seconds.
        #[arg(long)]
        seconds: u64,
        /// The schedule's seed (default: taken from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Provision everything, run every test in the workspace, a 2-minute
    /// soak, then the package test (with extra arguments: only `cargo
    /// test` with them).
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
        Task::FreshCheck => fresh_check::run(),
        Task::Deb => {
            println!("{}", deb::build()?.display());
            Ok(())
        }
        Task::GuestDeb => guest_deb::run(),
        Task::GuestDebTest => guest_deb_test::run(),
        Task::QemuDeb => {
            let qemu = provision::ensure_qemu()?;
            println!("{}", qemu_deb::build(&qemu)?.display());
            Ok(())
        }
        Task::PackageTest { only } => package_test::run(only),
        Task::Soak { seconds, seed } => soak::command(seconds, seed),
        Task::Test { cargo_args } => {
            let env = provision::ensure_all()?;
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
                soak::in_test(&env)?;
                package_test::run(None)?;
            }
            Ok(())
        }
    }
}
