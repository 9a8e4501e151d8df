//! Loading a policy file from disk: refusing one a non-root user could
//! change (owner, mode and directory checks), then parsing it.

use super::*;

/// Why a policy file's permissions let a non-root user change it, if they do.
/// Pure: the caller passes what `stat` said about the file and its directory.
pub fn unsafe_permissions(file: Perm, dir: Perm) -> Option<String> {
    const WORLD_W: u32 = 0o002;
    const GROUP_W: u32 = 0o020;
    const STICKY: u32 = 0o1000;
    if file.uid != 0 {
        return Some(format!("owned by uid {}, not root", file.uid));
    }
    if file.mode & WORLD_W != 0 {
        return Some("writable by every user (chmod o-w)".into());
    }
    if file.mode & GROUP_W != 0 && file.gid != 0 {
        return Some(format!("writable by group {} (chmod g-w)", file.gid));
    }
    // Whoever may write the directory may replace the file, unless the
    // directory is sticky (then only the file's owner, root, may).
    if dir.mode & STICKY == 0 {
        if dir.uid != 0 {
            return Some(format!(
                "its directory is owned by uid {}, who can replace the file",
                dir.uid
            ));
        }
        if dir.mode & WORLD_W != 0 {
            return Some("its directory is writable by every user".into());
        }
        if dir.mode & GROUP_W != 0 && dir.gid != 0 {
            return Some(format!("its directory is writable by group {}", dir.gid));
        }
    }
    None
}

/// What `stat` says about ownership and mode.
#[derive(Clone, Copy, Debug)]
pub struct Perm {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

fn perm_of(p: &Path) -> Result<Perm> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).map_err(|e| anyhow!("cannot read policy {}: {e}", p.display()))?;
    Ok(Perm {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode(),
    })
}

/// Reads, checks the permissions of, and parses a policy file.
pub fn load(path: &Path) -> Result<Policy> {
    let shown = path.display().to_string();
    let file = perm_of(path)?;
    let canon =
        std::fs::canonicalize(path).map_err(|e| anyhow!("cannot read policy {shown}: {e}"))?;
    let dir = perm_of(canon.parent().unwrap_or(Path::new("/")))?;
    if let Some(why) = unsafe_permissions(file, dir) {
        return Err(anyhow!(
            "{shown}:1: refusing a policy a non-root user could change: {why}"
        ));
    }
    let text = crate::config::read_config_text(path, "policy")?;
    parse(&text, &shown)
}
