//! The configuration file (`--config FILE`, TOML): verdict thresholds that
//! command-line flags may override. Errors name the file and line.
//!
//! ```toml
//! [thresholds]
//! idle = "60s"               # unprotected after this long idle
//! middlebox_timeout = "350s" # NAT/LB idle timeout keepalive must beat
//! close_wait = "60s"         # CLOSE_WAIT this long is a leak
//! dead_retransmits = 3       # unanswered retransmissions that make it dead
//! ```

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use toml::Spanned;

use crate::table::verdict::Thresholds;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub thresholds: ThresholdsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsFile {
    pub idle: Option<Spanned<String>>,
    pub middlebox_timeout: Option<Spanned<String>>,
    pub close_wait: Option<Spanned<String>>,
    pub dead_retransmits: Option<Spanned<u32>>,
}

/// Largest configuration file read: far more than any real one, and it
/// stops `--config /dev/zero`-style mistakes from eating memory.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file (`what` names it in errors): a regular file
/// only (a FIFO would block, a device never end) of at most
/// [`MAX_CONFIG_BYTES`], UTF-8 text.
pub fn read_config_text(path: &Path, what: &str) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    // O_NONBLOCK: opening a FIFO with no writer returns at once.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot read {what} {shown}"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {what} {shown}"))?;
    if !meta.is_file() {
        anyhow::bail!("cannot read {what} {shown}: not a regular file");
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {what} {shown}"))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        anyhow::bail!(
            "cannot read {what} {shown}: larger than {} KiB",
            MAX_CONFIG_BYTES / 1024
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        anyhow!("{shown}:{line}: not UTF-8 text")
    })
}

/// Accepted ranges of the verdict thresholds (flags and file alike).
pub const THRESHOLD_MIN_MS: u64 = 1_000;
pub const THRESHOLD_MAX_MS: u64 = 30 * 24 * 3_600_000;
pub const DEAD_RETRANSMITS_MAX: u32 = 255;

fn check_threshold_ms(ms: u64) -> Result<u64, String> {
    if (THRESHOLD_MIN_MS..=THRESHOLD_MAX_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(format!(
            "must be between 1s and 30days, got {}",
            humantime::format_duration(std::time::Duration::from_millis(ms))
        ))
    }
}

fn check_dead_retransmits(n: u32) -> Result<u32, String> {
    if (1..=DEAD_RETRANSMITS_MAX).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "must be between 1 and {DEAD_RETRANSMITS_MAX}, got {n}"
        ))
    }
}

/// Thresholds given on the command line (None: not given).
#[derive(Debug, Default, Clone, Copy)]
pub struct ThresholdFlags {
    pub idle_ms: Option<u64>,
    pub middlebox_idle_ms: Option<u64>,
    pub close_wait_ms: Option<u64>,
    pub dead_retransmits: Option<u32>,
    pub no_owners: bool,
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses `90s`, `5m`, `1h30m`, `250ms` into milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| format!("invalid duration `{s}` ({e}): use e.g. 90s, 5m, 1h"))
}

/// A parsed configuration with the text it came from, for error lines.
pub struct Loaded {
    file: ConfigFile,
    text: String,
    name: String,
}

impl Loaded {
    pub fn parse(text: &str, name: &str) -> Result<Loaded> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            anyhow!("{name}:{line}: {}", e.message().trim())
        })?;
        Ok(Loaded {
            file,
            text: text.to_string(),
            name: name.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Loaded> {
        let text = read_config_text(path, "config")?;
        Self::parse(&text, &path.display().to_string())
    }

    fn duration(&self, v: &Option<Spanned<String>>, key: &str) -> Result<Option<u64>> {
        let Some(v) = v else { return Ok(None) };
        parse_duration(v.get_ref())
            .and_then(check_threshold_ms)
            .map(Some)
            .map_err(|e| self.error_at(v.span().start, key, &e))
    }

    fn error_at(&self, offset: usize, key: &str, e: &str) -> anyhow::Error {
        anyhow!(
            "{}:{}: thresholds.{key}: {e}",
            self.name,
            line_of(&self.text, offset)
        )
    }
}

/// Flags win over the file, the file over the defaults.
pub fn thresholds(flags: &ThresholdFlags, file: Option<&Loaded>) -> Result<Thresholds> {
    let d = Thresholds::default();
    let (mut idle, mut middlebox, mut close_wait, mut dead) = (None, None, None, None);
    if let Some(f) = file {
        let t = &f.file.thresholds;
        idle = f.duration(&t.idle, "idle")?;
        middlebox = f.duration(&t.middlebox_timeout, "middlebox_timeout")?;
        close_wait = f.duration(&t.close_wait, "close_wait")?;
        if let Some(v) = &t.dead_retransmits {
            dead = Some(
                check_dead_retransmits(*v.get_ref())
                    .map_err(|e| f.error_at(v.span().start, "dead_retransmits", &e))?,
            );
        }
    }
    let flag = |name: &str, v: Option<u64>| -> Result<Option<u64>> {
        v.map(check_threshold_ms)
            .transpose()
            .map_err(|e| anyhow!("{name} {e}"))
    };
    let flags = ThresholdFlags {
        idle_ms: flag("--idle-threshold", flags.idle_ms)?,
        middlebox_idle_ms: flag("--middlebox-timeout", flags.middlebox_idle_ms)?,
        close_wait_ms: flag("--close-wait-threshold", flags.close_wait_ms)?,
        dead_retransmits: flags
            .dead_retransmits
            .map(check_dead_retransmits)
            .transpose()
            .map_err(|e| anyhow!("--dead-retransmits {e}"))?,
        no_owners: flags.no_owners,
    };
    Ok(Thresholds {
        idle_ms: flags.idle_ms.or(idle).unwrap_or(d.idle_ms),
        middlebox_idle_ms: flags
            .middlebox_idle_ms
            .or(middlebox)
            .unwrap_or(d.middlebox_idle_ms),
        close_wait_ms: flags
            .close_wait_ms
            .or(close_wait)
            .unwrap_or(d.close_wait_ms),
        dead_retransmits: flags
            .dead_retransmits
            .or(dead)
            .unwrap_or(d.dead_retransmits),
        owners_known: !flags.no_owners,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_apply_and_flags_override() {
        let f = Loaded::parse(
            "[thresholds]\nidle = \"5m\"\nclose_wait = \"90s\"\ndead_retransmits = 5\n",
            "k.toml",
        )
        .unwrap();
        let t = thresholds(&ThresholdFlags::default(), Some(&f)).unwrap();
        assert_eq!(t.idle_ms, 300_000);
        assert_eq!(t.close_wait_ms, 90_000);
        assert_eq!(t.dead_retransmits, 5);
        assert_eq!(t.middlebox_idle_ms, 350_000, "default kept");
        let flags = ThresholdFlags {
            idle_ms: Some(1_000),
            ..Default::default()
        };
        assert_eq!(thresholds(&flags, Some(&f)).unwrap().idle_ms, 1_000);
    }

    #[test]
    fn bad_duration_names_file_and_line() {
        let f = Loaded::parse("# comment\n[thresholds]\n\nidle = \"soon\"\n", "k.toml").unwrap();
        let e = thresholds(&ThresholdFlags::default(), Some(&f))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("k.toml:4: thresholds.idle: invalid duration `soon`"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_the_line() {
        let e = Loaded::parse("[thresholds]\nidle = \n", "k.toml")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("k.toml:2: "), "{e}");
        let e = Loaded::parse("[thresholds]\n\nidel = \"5m\"\n", "k.toml")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("k.toml:3: ") && e.contains("idel"), "{e}");
        let e = Loaded::parse("[thresholds]\ndead_retransmits = \"x\"\n", "k.toml")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("k.toml:2: "), "{e}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let f = Loaded::parse("", "k.toml").unwrap();
        assert_eq!(
            thresholds(&ThresholdFlags::default(), Some(&f)).unwrap(),
            Thresholds::default()
        );
    }
}
