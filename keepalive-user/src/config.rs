//! The configuration file (`--config FILE`, TOML): verdict thresholds and
//! the settings of `keepalive serve`, which command-line flags may
//! override. Errors name the file and line. `[[rule]]` tables (the tuning
//! policy) are left to the policy's own parser.
//!
//! ```toml
//! [serve]
//! metrics = "127.0.0.1:9977"
//! output = "/var/log/keepalive/events.jsonl"
//! rotate_size = "100MiB"
//! rotate_keep = 5
//!
//! [thresholds]
//! idle = "60s"               # unprotected after this long idle
//! middlebox_timeout = "350s" # NAT/LB idle timeout keepalive must beat
//! close_wait = "60s"         # CLOSE_WAIT this long is a leak
//! dead_retransmits = 3       # unanswered retransmissions that make it dead
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use toml::Spanned;

use ipnet::IpNet;

use crate::events::Kind;
use crate::events::comm::escape_controls;
use crate::output::file::{MAX_ROTATE_KEEP, MIN_ROTATE_SIZE};
use crate::table::verdict::Thresholds;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub thresholds: ThresholdsFile,
    #[serde(default)]
    pub serve: ServeFile,
    /// The tuning policy's rules, read by its own parser.
    #[serde(default)]
    pub rule: Vec<toml::Table>,
}

/// `[serve]`: what `keepalive serve` runs; every key has a flag of the same name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    pub metrics: Option<Spanned<String>>,
    pub metrics_labels: Option<Spanned<Vec<String>>>,
    pub metrics_label_limit: Option<usize>,
    pub output: Option<PathBuf>,
    pub rotate_size: Option<Spanned<SizeValue>>,
    pub rotate_keep: Option<Spanned<u32>>,
    pub events: Option<Spanned<Vec<String>>>,
    pub log_format: Option<Spanned<String>>,
    pub refresh: Option<Spanned<String>>,
    pub max_conns: Option<usize>,
    pub ring_size: Option<Spanned<u32>>,
    pub port: Option<Vec<u16>>,
    pub addr: Option<Spanned<Vec<String>>>,
    pub pid: Option<Vec<u32>>,
    pub policy: Option<PathBuf>,
}

/// A size in bytes, as a number or with a unit (`"100MiB"`, `"1G"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Logs on stderr: for people, or one JSON object per line for machines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[serve]`, checked: `None` where the file says nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServeSettings {
    pub metrics: Option<SocketAddr>,
    pub metrics_labels: Option<Vec<String>>,
    pub metrics_label_limit: Option<usize>,
    pub output: Option<PathBuf>,
    pub rotate_size: Option<u64>,
    pub rotate_keep: Option<u32>,
    pub events: Option<Vec<Kind>>,
    pub log_format: Option<LogFormat>,
    pub refresh_ms: Option<u64>,
    pub max_conns: Option<usize>,
    pub ring_size: Option<u32>,
    pub ports: Option<Vec<u16>>,
    pub cidrs: Option<Vec<IpNet>>,
    pub pids: Option<Vec<u32>>,
    pub policy: Option<PathBuf>,
    /// `[[rule]]` tables in the file (a tuning policy inline).
    pub rules: usize,
}

/// Parses `100MiB`, `10M`, `1G`, `4096` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| {
            let s = escape_controls(s);
            format!("invalid size `{s}`: use e.g. 100MiB, 10M, 1G or a number of bytes")
        })
}

/// Checks `--ring-size`: a power of two of at least one page.
pub fn check_ring_size(size: u32) -> Result<u32, String> {
    if size < 4096 || !size.is_power_of_two() {
        return Err(format!(
            "ring size must be a power of two of at least 4096 bytes, got {size}"
        ));
    }
    Ok(size)
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
/// (or /dev/null) only (a FIFO would block, a device never end) of at most
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
    // /dev/null is the usual way to say "no configuration" (a unit file).
    let null = {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        meta.file_type().is_char_device() && meta.rdev() == libc::makedev(1, 3)
    };
    if !meta.is_file() && !null {
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
        .map_err(|e| {
            escape_controls(&format!(
                "invalid duration `{s}` ({e}): use e.g. 90s, 5m, 1h"
            ))
            .into_owned()
        })
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

    /// `FILE:LINE: KEY: message` for the value starting at byte `at`.
    fn error(&self, at: usize, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}:{}: {key}: {msg}", self.name, line_of(&self.text, at))
    }

    /// The `[serve]` table, each value checked.
    pub fn serve(&self) -> Result<ServeSettings> {
        let f = &self.file.serve;
        let mut s = ServeSettings {
            metrics_label_limit: f.metrics_label_limit,
            output: f.output.clone(),
            rotate_keep: None,
            max_conns: f.max_conns,
            ports: f.port.clone(),
            pids: f.pid.clone(),
            policy: f.policy.clone(),
            rules: self.file.rule.len(),
            ..ServeSettings::default()
        };
        if let Some(v) = &f.metrics {
            s.metrics = Some(v.get_ref().parse().map_err(|_| {
                self.error(
                    v.span().start,
                    "serve.metrics",
                    format!(
                        "invalid address `{}`: expected IP:PORT like 127.0.0.1:9977",
                        v.get_ref()
                    ),
                )
            })?);
        }
        if let Some(v) = &f.metrics_labels {
            for name in v.get_ref() {
                if name != "comm" && name != "port" {
                    return Err(self.error(
                        v.span().start,
                        "serve.metrics_labels",
                        format!("unknown label `{name}`: expected comm or port"),
                    ));
                }
            }
            s.metrics_labels = Some(v.get_ref().clone());
        }
        if let Some(v) = &f.rotate_size {
            let bytes = match v.get_ref() {
                SizeValue::Bytes(n) => Ok(*n),
                SizeValue::Text(t) => parse_size(t),
            }
            .and_then(|n| {
                if n < MIN_ROTATE_SIZE {
                    Err(format!("must be at least {MIN_ROTATE_SIZE} bytes, got {n}"))
                } else {
                    Ok(n)
                }
            });
            s.rotate_size =
                Some(bytes.map_err(|e| self.error(v.span().start, "serve.rotate_size", e))?);
        }
        if let Some(v) = &f.rotate_keep {
            if *v.get_ref() > MAX_ROTATE_KEEP {
                return Err(self.error(
                    v.span().start,
                    "serve.rotate_keep",
                    format!("must be at most {MAX_ROTATE_KEEP}, got {}", v.get_ref()),
                ));
            }
            s.rotate_keep = Some(*v.get_ref());
        }
        if let Some(v) = &f.events {
            let mut kinds = Vec::new();
            for name in v.get_ref() {
                kinds.push(
                    Kind::ALL
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| {
                            let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
                            self.error(
                                v.span().start,
                                "serve.events",
                                format!(
                                    "unknown event kind `{name}`: expected one of {}",
                                    names.join(", ")
                                ),
                            )
                        })?,
                );
            }
            s.events = Some(kinds);
        }
        if let Some(v) = &f.log_format {
            s.log_format = Some(match v.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(self.error(
                        v.span().start,
                        "serve.log_format",
                        format!("unknown log format `{other}`: expected text or json"),
                    ));
                }
            });
        }
        if let Some(v) = &f.refresh {
            s.refresh_ms = Some(
                parse_duration(v.get_ref())
                    .map_err(|e| self.error(v.span().start, "serve.refresh", e))?,
            );
        }
        if let Some(v) = &f.ring_size {
            s.ring_size = Some(
                check_ring_size(*v.get_ref())
                    .map_err(|e| self.error(v.span().start, "serve.ring_size", e))?,
            );
        }
        if let Some(v) = &f.addr {
            let mut cidrs = Vec::new();
            for a in v.get_ref() {
                cidrs.push(
                    crate::events::filter::parse_cidr(a)
                        .map_err(|e| self.error(v.span().start, "serve.addr", e))?,
                );
            }
            s.cidrs = Some(cidrs);
        }
        Ok(s)
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
        // Decided by who judges (the monitor's table sets it).
        newest_probe_in_flight: d.newest_probe_in_flight,
    })
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
