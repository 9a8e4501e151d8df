//! `cargo xtask setup`: checks for, and installs, everything the eBPF build
//! and the integration tests need on a Debian/Ubuntu host.
//!
//! Three things are needed: Debian packages (system rustc with a prebuilt
//! bpfel `core`, LLVM 22 for bpf-linker, nftables and iproute2 for the
//! tests), `bpf-linker` itself, and tracefs mounted. [`check`] only looks;
//! [`install`] acts, one printed line per action, and when it cannot act
//! (not root, not Debian) prints the exact commands and fails.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

#[path = "../../keepalive-user/build/bpf_linker.rs"]
mod bpf_linker;

pub use bpf_linker::find_bpf_linker;
pub use testkit::is_root;

/// Debian packages the build and the tests need.
pub const PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "nftables",
    "iproute2",
    // serve's tests: a real Prometheus scrapes it; promtool checks the
    // exposition and the alert rules; systemd-analyze checks the unit.
    "prometheus",
    "systemd",
    // tests/tests/top.rs drives `keepalive top` in a real terminal.
    "tmux",
];

const CARGO_DEB_VERSION: &str = "3.8.0";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Debian packages `cargo xtask bench` needs besides: bpftrace runs the
/// peer row (the same workloads under a bpftrace script); clang builds
/// the tp_btf floor programs (bench/floor_tp_btf.bpf.c), from the same
/// LLVM 22 as the eBPF toolchain.
pub const BENCH_PACKAGES: &[&str] = &["bpftrace", "clang-22"];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const TRACEFS: &str = "/sys/kernel/tracing";

/// What is missing on this host; empty means ready.
#[derive(Debug, Default)]
pub struct Missing {
    /// Debian packages not installed (empty when dpkg is not available).
    pub packages: Vec<&'static str>,
    /// `bpf-linker` is neither on PATH nor in the cargo bin directory.
    pub bpf_linker: bool,
    /// tracefs is not mounted at `/sys/kernel/tracing`.
    pub tracefs: bool,
    /// `cargo deb` (for `cargo xtask dist`) is not installed.
    pub cargo_deb: bool,
    /// Python's kubernetes-validate (checks dist/kubernetes) is not installed.
    pub kubernetes_validate: bool,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
            && !self.bpf_linker
            && !self.tracefs
            && !self.cargo_deb
            && !self.kubernetes_validate
    }
}

/// Looks at the host without changing anything; with `bench`, for what
/// the benchmarks need too.
pub fn check(bench: bool) -> Missing {
    let mut wanted = PACKAGES.to_vec();
    if bench {
        wanted.extend_from_slice(BENCH_PACKAGES);
    }
    Missing {
        packages: missing_packages(&wanted),
        bpf_linker: find_bpf_linker().is_none(),
        tracefs: !tracefs_mounted(),
        cargo_deb: !succeeds(Command::new(crate::cargo()).args(["deb", "--version"])),
        kubernetes_validate: !succeeds(Command::new("python3").args([
            "-m",
            "kubernetes_validate",
            "--version",
        ])),
    }
}

/// Whether `cmd` runs and exits 0 (quietly).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo xtask setup --check`: reports what is missing, fails if anything is.
pub fn report(bench: bool) -> Result<()> {
    let missing = check(bench);
    if missing.is_empty() {
        eprintln!("setup: everything present");
        return Ok(());
    }
    if !missing.packages.is_empty() {
        eprintln!(
            "setup: missing apt packages: {}",
            missing.packages.join(" ")
        );
    }
    if missing.bpf_linker {
        eprintln!(
            "setup: missing bpf-linker (not on PATH nor in {})",
            cargo_bin_dir().display()
        );
    }
    if missing.tracefs {
        eprintln!("setup: tracefs not mounted at {TRACEFS}");
    }
    if missing.cargo_deb {
        eprintln!("setup: missing cargo-deb (cargo xtask dist)");
    }
    if missing.kubernetes_validate {
        eprintln!(
            "setup: missing the kubernetes-validate Python package (python3 -m kubernetes_validate)"
        );
    }
    bail!(
        "this host is not ready: run `cargo xtask setup` to install what is missing (as root for apt packages and tracefs)"
    )
}

/// Runs [`install`] only if [`check`] finds something missing.
pub fn ensure(bench: bool) -> Result<()> {
    let missing = check(bench);
    if missing.is_empty() {
        return Ok(());
    }
    install(missing, bench)
}

/// `cargo xtask setup`: installs whatever [`check`] finds missing.
pub fn run(bench: bool) -> Result<()> {
    let missing = check(bench);
    if missing.is_empty() {
        eprintln!("setup: everything present");
        return Ok(());
    }
    install(missing, bench)
}

fn install(missing: Missing, bench: bool) -> Result<()> {
    let root = is_root();
    let debian = is_debian();
    let needs_root = !missing.packages.is_empty() || missing.tracefs;
    if needs_root && !(root && debian) {
        print_manual_steps(&missing, root, debian);
        if !debian {
            bail!(
                "cannot install automatically on this system (not Debian/Ubuntu with apt-get): run the equivalent of the commands above, then `cargo xtask setup --check`"
            );
        }
        bail!(
            "setup needs root for apt-get and mount: run the commands above, or `cargo xtask setup` as root"
        );
    }

    if !missing.packages.is_empty() {
        eprintln!(
            "setup: installing apt packages: {}",
            missing.packages.join(" ")
        );
        run_cmd(Command::new("apt-get").arg("update"), "apt-get update")?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y"])
                .args(&missing.packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )?;
    }
    if missing.tracefs {
        eprintln!("setup: mounting tracefs on {TRACEFS}");
        run_cmd(
            Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]),
            "mount -t tracefs",
        )?;
    }
    if missing.bpf_linker {
        eprintln!(
            "setup: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22) into {} with cargo install",
            cargo_bin_dir().display()
        );
        run_cmd(&mut bpf_linker_install(), "cargo install bpf-linker")?;
    }
    if missing.cargo_deb {
        eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION} with cargo install");
        run_cmd(
            Command::new(crate::cargo()).args([
                "install",
                "cargo-deb",
                "--locked",
                "--version",
                CARGO_DEB_VERSION,
            ]),
            "cargo install cargo-deb",
        )?;
    }
    if missing.kubernetes_validate {
        eprintln!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} with pip");
        run_cmd(
            Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
            ]),
            "pip install kubernetes-validate",
        )?;
    }

    let left = check(bench);
    if !left.is_empty() {
        report(bench)?;
    }
    Ok(())
}

/// Prints, on stderr, the commands the user must run to get ready.
fn print_manual_steps(missing: &Missing, root: bool, debian: bool) {
    let sudo = if root { "" } else { "sudo " };
    if debian {
        eprintln!("setup: cannot install as a non-root user; run these commands:");
    } else {
        eprintln!(
            "setup: not a Debian/Ubuntu system with apt-get; these are the commands for Debian 12, adapt the package names:"
        );
    }
    if !missing.packages.is_empty() {
        eprintln!("  {sudo}apt-get update");
        eprintln!(
            "  {sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            missing.packages.join(" ")
        );
    }
    if missing.tracefs {
        eprintln!("  {sudo}mount -t tracefs nodev {TRACEFS}");
    }
    if missing.cargo_deb {
        eprintln!("  cargo install cargo-deb --locked --version {CARGO_DEB_VERSION}");
    }
    if missing.kubernetes_validate {
        eprintln!("  python3 -m pip install kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
    }
    if missing.bpf_linker {
        eprintln!(
            "  PATH={LLVM_PREFIX}/bin:$PATH LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        );
    }
}

/// `cargo install bpf-linker` against Debian's LLVM 22. Without the PATH
/// change and LLVM_PREFIX the build finds the system llvm-config (LLVM 14)
/// and fails with "unable to find library -lLLVM".
fn bpf_linker_install() -> Command {
    let mut path = OsString::from(format!("{LLVM_PREFIX}/bin"));
    if let Some(p) = std::env::var_os("PATH") {
        path.push(":");
        path.push(p);
    }
    let mut cmd = Command::new(crate::cargo());
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ])
    .env("PATH", path)
    .env("LLVM_PREFIX", LLVM_PREFIX)
    .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX);
    cmd
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {what}: is it installed and on PATH?"))?;
    if !status.success() {
        bail!(
            "{what} failed ({status}): see its output above, fix that, then run `cargo xtask setup` again"
        );
    }
    Ok(())
}

/// Packages from [`PACKAGES`] that dpkg does not report as installed. On a
/// system without dpkg there is nothing to ask, and nothing is reported:
/// the eBPF build then says itself what it lacks.
fn missing_packages(wanted: &[&'static str]) -> Vec<&'static str> {
    wanted
        .iter()
        .copied()
        .filter(|pkg| {
            match Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            {
                Ok(o) => String::from_utf8_lossy(&o.stdout).trim() != "install ok installed",
                Err(_) => false,
            }
        })
        .collect()
}

/// Where `cargo install` puts binaries.
fn cargo_bin_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(home).join("bin");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin"))
        .unwrap_or_else(|| PathBuf::from("~/.cargo/bin"))
}

/// `/sys/kernel/tracing/events` is a directory, or (for users who cannot
/// look inside the root-only mount point) the mount table lists tracefs there.
fn tracefs_mounted() -> bool {
    if Path::new(TRACEFS).join("events").is_dir() {
        return true;
    }
    // mountinfo: id parent dev root MOUNTPOINT options [optional...] - FSTYPE source super
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| {
            text.lines().any(|line| {
                let mut fields = line.split(' ');
                let mountpoint = fields.nth(4);
                let fstype = fields.skip_while(|f| *f != "-").nth(1);
                mountpoint == Some(TRACEFS) && fstype == Some("tracefs")
            })
        })
        .unwrap_or(false)
}

/// Debian or a derivative, with apt-get where setup calls it.
fn is_debian() -> bool {
    if !Path::new("/usr/bin/apt-get").is_file() {
        return false;
    }
    let Ok(text) = std::fs::read_to_string("/etc/os-release") else {
        return false;
    };
    text.lines().any(|line| {
        let Some((key, value)) = line.split_once('=') else {
            return false;
        };
        (key == "ID" || key == "ID_LIKE")
            && value
                .trim_matches(|c| c == '"' || c == '\'')
                .split_whitespace()
                .any(|id| id == "debian" || id == "ubuntu")
    })
}
