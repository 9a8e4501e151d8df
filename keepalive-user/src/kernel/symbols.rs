//! Looks up kernel function addresses in `/proc/kallsyms`.
//!
//! The keepalive probe has no tracepoint of its own: we recognise
//! `tcp_keepalive_timer` (and `tcp_write_timer`) by address in the generic
//! timer tracepoints, so we need those addresses.

use anyhow::{Context, Result, bail};

pub const KALLSYMS: &str = "/proc/kallsyms";

/// Timer callbacks the programs watch for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerSymbols {
    pub keepalive_timer: u64,
    pub write_timer: u64,
}

/// Finds the address of each of `names` in kallsyms text (0 when absent).
pub fn find(text: &str, names: &[&str]) -> Vec<u64> {
    let mut out = vec![0u64; names.len()];
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| *n == name)
            && out[i] == 0
        {
            out[i] = u64::from_str_radix(addr, 16).unwrap_or(0);
        }
    }
    out
}

pub fn timer_symbols() -> Result<TimerSymbols> {
    let text =
        std::fs::read_to_string(KALLSYMS).with_context(|| format!("cannot read {KALLSYMS}"))?;
    parse_timer_symbols(&text)
}

pub fn parse_timer_symbols(text: &str) -> Result<TimerSymbols> {
    let found = find(text, &["tcp_keepalive_timer", "tcp_write_timer"]);
    if found[0] == 0 {
        if text.lines().any(|l| l.contains(" tcp_keepalive_timer")) {
            bail!(
                "{KALLSYMS} hides addresses (kernel.kptr_restrict); run as root or set `sysctl kernel.kptr_restrict=0`"
            );
        }
        bail!("tcp_keepalive_timer not found in {KALLSYMS}; keepalive probes cannot be traced");
    }
    Ok(TimerSymbols {
        keepalive_timer: found[0],
        write_timer: found[1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ffffffff81000000 T _stext\n\
        ffffffff81a0b0c0 t tcp_keepalive_timer\n\
        ffffffff81a0a000 t tcp_write_timer\n\
        ffffffffc0001000 t tcp_keepalive_timer_x\t[mod]\n";

    #[test]
    fn finds_both_timers() {
        let s = parse_timer_symbols(SAMPLE).unwrap();
        assert_eq!(s.keepalive_timer, 0xffffffff81a0b0c0);
        assert_eq!(s.write_timer, 0xffffffff81a0a000);
    }

    #[test]
    fn hidden_addresses_are_an_error_naming_kptr_restrict() {
        let e = parse_timer_symbols("0000000000000000 t tcp_keepalive_timer\n").unwrap_err();
        assert!(e.to_string().contains("kptr_restrict"), "{e}");
    }

    #[test]
    fn missing_symbol_is_an_error() {
        assert!(parse_timer_symbols("ffffffff81000000 T _stext\n").is_err());
    }
}
