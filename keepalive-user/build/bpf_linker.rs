//! Where `bpf-linker` is: shared by keepalive-user's build.rs and `cargo
//! xtask setup` (included by path in both), so that setup installs it
//! exactly where the build looks.

use std::path::PathBuf;

/// `bpf-linker` on PATH, else in `$CARGO_HOME/bin` or `~/.cargo/bin` (where
/// `cargo install` puts it).
pub fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
