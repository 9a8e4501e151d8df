//! Builds the eBPF object (`keepalive-ebpf`) and puts it in OUT_DIR for
//! `include_bytes_aligned!`.
//!
//! Toolchain choice, in order:
//! 1. `KEEPALIVE_EBPF_OBJECT=/path/to/object`: use a prebuilt object as is.
//!    `KEEPALIVE_EBPF_TOOLCHAIN=<rustup toolchain>|system|/path/to/rustc` forces a toolchain.
//! 2. a rustup nightly with the rust-src component (`-Z build-std=core`);
//! 3. a system rustc that ships a prebuilt `core` for bpfel-unknown-none
//!    (Debian's rustc-web + libstd-rust-web-dev-bpf), with RUSTC_BOOTSTRAP=1.
//!
//! All need `bpf-linker` on PATH (or in ~/.cargo/bin). When none is usable
//! an empty object is written, so `cargo build`/`clippy` of the workspace
//! still work; that binary refuses to start and says how to build the real
//! one (`cargo xtask build --release`). `KEEPALIVE_REQUIRE_EBPF=1` (set by
//! xtask) turns that fallback into a build error.

#[path = "build/bpf_linker.rs"]
mod bpf_linker;

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use bpf_linker::find_bpf_linker;

const TARGET: &str = "bpfel-unknown-none";

enum Toolchain {
    /// `rustup run <name> cargo ... -Z build-std=core`
    Rustup(String),
    /// `cargo` with `RUSTC=<path>` and `RUSTC_BOOTSTRAP=1`, prebuilt core.
    System(PathBuf),
}

fn main() {
    for var in [
        "KEEPALIVE_EBPF_OBJECT",
        "KEEPALIVE_EBPF_TOOLCHAIN",
        "KEEPALIVE_REQUIRE_EBPF",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for p in [
        "keepalive-ebpf/src",
        "keepalive-ebpf/Cargo.toml",
        "keepalive-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("keepalive.bpf.o");

    if let Some(obj) = env::var_os("KEEPALIVE_EBPF_OBJECT") {
        let obj = PathBuf::from(obj);
        println!("cargo:rerun-if-changed={}", obj.display());
        std::fs::copy(&obj, &out)
            .unwrap_or_else(|e| panic!("KEEPALIVE_EBPF_OBJECT={}: {e}", obj.display()));
        done(&format!("prebuilt object {}", obj.display()));
        return;
    }

    let Some(linker) = find_bpf_linker() else {
        stub(&out, "bpf-linker not found");
        return;
    };
    let toolchain = match env::var("KEEPALIVE_EBPF_TOOLCHAIN") {
        Ok(t) if t == "system" => Toolchain::System(PathBuf::from("/usr/bin/rustc")),
        Ok(t) if t.contains('/') => Toolchain::System(PathBuf::from(t)),
        Ok(t) if !t.is_empty() => Toolchain::Rustup(t),
        _ => match detect() {
            Some(t) => t,
            None => {
                stub(
                    &out,
                    "no eBPF-capable Rust toolchain (rustup nightly with rust-src, or a system rustc with a bpfel core)",
                );
                return;
            }
        },
    };

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ebpf");
    let (mut cmd, how) = match &toolchain {
        Toolchain::Rustup(name) => {
            let mut c = Command::new("rustup");
            c.args(["run", name, "cargo", "build", "-Z", "build-std=core"]);
            (c, format!("rustup toolchain {name} with build-std"))
        }
        Toolchain::System(rustc) => {
            let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            c.arg("build")
                .env("RUSTC", rustc)
                .env("RUSTC_BOOTSTRAP", "1");
            (
                c,
                format!("{} with its prebuilt bpfel core", rustc.display()),
            )
        }
    };
    // Nothing of the host build may leak into the BPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        if !(var == "RUSTC" && matches!(toolchain, Toolchain::System(_))) {
            cmd.env_remove(var);
        }
    }
    let sep = "\x1f";
    cmd.current_dir(&root)
        .args([
            "--package",
            "keepalive-ebpf",
            "--bins",
            "--release",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"x86_64\"{sep}-Cdebuginfo=2{sep}-Clink-arg=--btf"),
        )
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo for the eBPF build ({how}): {e}"));
    if !status.success() {
        panic!("building keepalive-ebpf with {how} failed ({status}); see the errors above");
    }
    let built = target_dir.join(TARGET).join("release").join("keepalive");
    std::fs::copy(&built, &out).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
    done(&how);
}

fn done(how: &str) {
    println!("cargo:rustc-env=KEEPALIVE_EBPF_BUILD={how}");
}

fn stub(out: &Path, why: &str) {
    if env::var_os("KEEPALIVE_REQUIRE_EBPF").is_some_and(|v| v == "1") {
        panic!(
            "KEEPALIVE_REQUIRE_EBPF=1 but the eBPF programs cannot be built: {why}; run `cargo xtask setup`"
        );
    }
    println!("cargo:warning=eBPF programs not built: {why}; run `cargo xtask build` to build them");
    std::fs::write(out, b"").unwrap();
    done(&format!("no eBPF programs: {why}"));
}

/// Picks the first usable toolchain: rustup nightly with rust-src, then a
/// system rustc with a prebuilt bpfel core.
fn detect() -> Option<Toolchain> {
    if let Ok(o) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        && o.status.success()
    {
        let sysroot = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if sysroot
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .is_file()
        {
            return Some(Toolchain::Rustup("nightly".into()));
        }
    }
    let rustc = PathBuf::from("/usr/bin/rustc");
    if rustc.is_file()
        && let Ok(o) = Command::new(&rustc).args(["--print", "sysroot"]).output()
        && o.status.success()
    {
        let sysroot = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        let lib = sysroot.join("lib/rustlib").join(TARGET).join("lib");
        let has_core = std::fs::read_dir(&lib)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
            })
            .unwrap_or(false);
        if has_core {
            return Some(Toolchain::System(rustc));
        }
    }
    None
}
