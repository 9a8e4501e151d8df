//! `cargo xtask`: provisions the host, builds keepalive with its eBPF
//! programs embedded, runs it, and runs the test suite and the benchmarks.
//!
//! Every command that builds first runs `setup` if (and only if) something
//! is missing, and builds with `KEEPALIVE_REQUIRE_EBPF=1` so a binary
//! without eBPF programs is never produced silently.

mod bench;
mod dist;
mod setup;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Provision, build, run and test keepalive"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the eBPF build and the tests need (apt packages,
    /// bpf-linker, tracefs); does nothing when everything is present.
    Setup {
        /// Only report what is missing; fail if anything is.
        #[arg(long)]
        check: bool,
        /// Also what the benchmarks need (bpftrace, for the peer row).
        #[arg(long)]
        bench: bool,
    },
    /// Build target/{debug,release}/keepalive with the eBPF programs embedded.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build (release unless --debug), then exec keepalive with ARGS,
    /// e.g. `cargo xtask run -- record`.
    Run {
        /// Build with the release profile (the default).
        #[arg(long, conflicts_with = "debug")]
        release: bool,
        /// Build with the dev profile.
        #[arg(long)]
        debug: bool,
        /// Arguments for keepalive.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Build release, then run the whole test suite against the live kernel
    /// (needs root). ARGS go to the test binaries.
    Test {
        /// Arguments for the test binaries (e.g. a test name filter).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Build release, then run the benchmarks: the monitor's overhead next
    /// to bpftrace (options: `cargo xtask bench -- --help`); with
    /// `--snapshot` `keepalive snapshot` against `ss` on 10k and 100k
    /// connections; with `--soak` the monitor's memory under churn; with
    /// `--micro` the criterion benchmarks (each: `--help`).
    Bench {
        /// Arguments for the benchmark runner.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Build release, then the Debian package (binary, systemd unit,
    /// default config, man pages, completions) into target/dist.
    Dist,
    /// Internal: holds the connections of `bench --snapshot`.
    #[command(name = "bench-hold-conns", hide = true)]
    BenchHoldConns {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup { check: true, bench } => setup::report(bench),
        Cmd::Setup {
            check: false,
            bench,
        } => setup::run(bench),
        Cmd::Build { release } => build(release).map(|bin| println!("{}", bin.display())),
        Cmd::Run { debug, args, .. } => run(!debug, &args),
        Cmd::Test { args } => test(&args),
        Cmd::Bench { args } => setup::ensure(true)
            .and_then(|()| build(true))
            .and_then(|bin| bench::run(&bin, &args)),
        Cmd::BenchHoldConns { args } => bench::hold_conns(&args),
        Cmd::Dist => build(true)
            .and_then(|bin| dist::run_dist(&bin))
            .map(|deb| println!("{}", deb.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's directory.
pub(crate) fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a subdirectory of the workspace")
}

/// The cargo running us (`CARGO`), else `cargo` from PATH.
pub(crate) fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// Runs setup if needed, then builds keepalive with the eBPF programs
/// required; returns the absolute path of the binary.
fn build(release: bool) -> Result<PathBuf> {
    setup::ensure(false)?;
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root())
        .args(["build", "-p", "keepalive-user"])
        .env("KEEPALIVE_REQUIRE_EBPF", "1")
        .stdin(Stdio::null());
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run cargo: is it on PATH? (source ~/.cargo/env)")?;
    if !status.success() {
        bail!(
            "cargo build -p keepalive-user failed ({status}): see the errors above; `cargo xtask setup --check` shows what is missing"
        );
    }
    let bin = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("keepalive");
    if !bin.is_file() {
        bail!(
            "cargo build succeeded but {} does not exist: is build.target-dir set in a cargo config? Set CARGO_TARGET_DIR instead",
            bin.display()
        );
    }
    Ok(bin)
}

/// Builds, then replaces this process with keepalive so signals (Ctrl-C,
/// SIGTERM) reach it directly.
fn run(release: bool, args: &[String]) -> Result<()> {
    let bin = build(release)?;
    eprintln!("xtask: running {}", bin.display());
    let err = Command::new(&bin).args(args).exec();
    Err(err).with_context(|| format!("cannot exec {}", bin.display()))
}

/// Builds release, then runs every test in the workspace, one at a time
/// (the integration tests share the live kernel).
fn test(args: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "integration tests need root (they create network namespaces and load eBPF): run as root"
        );
    }
    let bin = build(true)?;
    // The package test installs what `cargo xtask dist` builds.
    let deb = dist::run_dist(&bin)?;
    // keepalive-ebpf only builds for bpfel-unknown-none; keepalive-user's
    // build.rs builds it, and it has no host tests. No doc tests: there are
    // none, and their empty summary would end the log.
    let mut child = Command::new(cargo())
        .current_dir(root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "keepalive-ebpf",
            "--release",
            "--lib",
            "--bins",
            "--tests",
            // Every test binary runs, so one failure does not hide others.
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ])
        .args(args)
        .env("KEEPALIVE_BIN", &bin)
        .env("KEEPALIVE_DEB", &deb)
        .env("KEEPALIVE_REQUIRE_EBPF", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo: is it on PATH? (source ~/.cargo/env)")?;
    // Pass the output through and add up the per-binary summaries.
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some((p, f)) = parse_summary(&line) {
                passed += p;
                failed += f;
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("tests failed ({status}): see the output above");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// `test result: ok. 5 passed; 1 failed; ...` -> (5, 1).
fn parse_summary(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let num = |word: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(word).map(str::trim))
            .and_then(|n| n.rsplit(' ').next()?.parse().ok())
    };
    Some((num("passed")?, num("failed")?))
}

#[cfg(test)]
mod summary_tests {
    use super::parse_summary;

    #[test]
    fn parses_cargo_test_summaries() {
        assert_eq!(
            parse_summary(
                "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 4.20s"
            ),
            Some((5, 0))
        );
        assert_eq!(
            parse_summary("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_summary("running 5 tests"), None);
    }
}
