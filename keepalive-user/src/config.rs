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
    pub dead_retransmits: Option<u32>,
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
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn duration(&self, v: &Option<Spanned<String>>, key: &str) -> Result<Option<u64>> {
        let Some(v) = v else { return Ok(None) };
        parse_duration(v.get_ref()).map(Some).map_err(|e| {
            anyhow!(
                "{}:{}: thresholds.{key}: {e}",
                self.name,
                line_of(&self.text, v.span().start)
            )
        })
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
        dead = t.dead_retransmits;
    }
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
