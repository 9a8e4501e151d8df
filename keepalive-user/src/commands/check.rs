//! `keepalive check`: diagnoses whether `record` can run on this host, and
//! for every hook whether it attaches and, if not, why.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, Result};

use crate::events::filter::Filter;
use crate::kernel::{self, btf::KernelBtf, loader, privileges, symbols};

/// One line of the report.
struct Line {
    what: String,
    ok: bool,
    /// Failing this item stops `record`.
    required: bool,
    detail: String,
}

fn line(what: impl Into<String>, ok: bool, required: bool, detail: impl Into<String>) -> Line {
    Line {
        what: what.into(),
        ok,
        required,
        detail: detail.into(),
    }
}

/// Prints the report; returns whether `record` can run.
pub fn run() -> Result<bool> {
    let mut lines = vec![line("kernel", true, false, kernel::kernel_release())];
    let privileged = kernel::check_privileges();
    lines.push(line(
        "privileges",
        privileged.is_ok(),
        true,
        privileged
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "root / CAP_BPF+CAP_PERFMON".into()),
    ));
    let kept = privileges::steady_state(true);
    lines.push(line(
        "privileges after attach",
        true,
        false,
        format!(
            "keeps {} (setns into each namespace for walks, /proc of other users' processes for namespaces and owners); drops every other capability, sets NoNewPrivs",
            privileges::names(kept).join(", ")
        ),
    ));
    let obj = loader::ensure_object();
    lines.push(line(
        "eBPF object",
        obj.is_ok(),
        true,
        match &obj {
            Ok(()) => loader::EBPF_BUILD.to_string(),
            Err(e) => e.to_string(),
        },
    ));
    let btf = KernelBtf::load();
    let offsets = btf
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|b| b.offsets().map_err(|e| e.to_string()));
    lines.push(line(
        "BTF",
        offsets.is_ok(),
        true,
        match &offsets {
            Ok(_) => format!(
                "{} (all struct offsets resolved)",
                crate::kernel::btf::VMLINUX_BTF
            ),
            Err(e) => e.clone(),
        },
    ));
    let syms = symbols::timer_symbols();
    lines.push(line(
        "kallsyms",
        syms.is_ok(),
        true,
        match &syms {
            Ok(s) => format!("tcp_keepalive_timer at {:#x}", s.keepalive_timer),
            Err(e) => e.to_string(),
        },
    ));
    let tracefs = kernel::tracefs_mount();
    lines.push(line(
        "tracefs",
        tracefs.is_some(),
        false,
        match tracefs {
            Some(p) => format!("{} (not needed: hooks are tp_btf)", p.display()),
            None => "not mounted (not needed: hooks are tp_btf); `mount -t tracefs nodev /sys/kernel/tracing` for tracepoint formats".into(),
        },
    ));
    let cg = kernel::cgroup2_mount();
    lines.push(line(
        "cgroup v2",
        cg.is_some(),
        false,
        match cg {
            Some(p) => format!("mounted at {}", p.display()),
            None => "not mounted (needed later for keepalive tuning): `mount -t cgroup2 none /sys/fs/cgroup`".into(),
        },
    ));

    // Try every hook for real, when the prerequisites hold.
    let prereqs = lines.iter().all(|l| l.ok || !l.required);
    if prereqs {
        match hooks_report() {
            Ok(hook_lines) => lines.extend(hook_lines),
            Err(e) => lines.push(line("hooks", false, true, e.to_string())),
        }
    } else {
        for h in loader::HOOKS {
            lines.push(line(
                format!("tp_btf/{}", h.tracepoint),
                false,
                true,
                "not tried: fix the items above first",
            ));
        }
    }

    let ready = lines.iter().all(|l| l.ok || !l.required);
    let mut report = String::new();
    for l in &lines {
        let mark = match (l.ok, l.required) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        let _ = writeln!(report, "{mark} {:<28} {}", l.what, l.detail);
    }
    let _ = writeln!(
        report,
        "{}",
        if ready {
            "keepalive record can run on this host"
        } else {
            "keepalive record cannot run on this host: fix the FAIL lines above"
        }
    );
    // Written at once; the io::Error is kept so main can tell a reader that
    // went away (exit 0) from a full disk (an error), and never panics.
    let mut out = std::io::stdout().lock();
    out.write_all(report.as_bytes())
        .and_then(|()| out.flush())
        .context("writing the report")?;
    Ok(ready)
}

fn hooks_report() -> Result<Vec<Line>> {
    let info = loader::kernel_info(&Filter::default(), loader::Use::Monitor)?;
    // Held across load and attach: parsed once.
    let btf = loader::aya_btf()?;
    let mut ebpf = loader::load(&info.config, loader::Sizes::default())?;
    let mut lines: Vec<Line> = loader::HOOKS
        .iter()
        .map(|h| {
            let r = loader::attach(&mut ebpf, &btf, h);
            line(
                format!("tp_btf/{}", h.tracepoint),
                r.is_ok(),
                true,
                match r {
                    Ok(()) => format!("attaches; provides {}", h.provides),
                    Err(e) => format!("{e:#}; without it: no {}", h.provides),
                },
            )
        })
        .collect();
    let walk = loader::walk_sockets(&mut ebpf);
    lines.push(line(
        "iter/tcp",
        walk.is_ok(),
        true,
        match walk {
            Ok(rows) => format!(
                "walks every namespace ({} sockets now); provides snapshot, the connection table, cookies of existing connections",
                rows.len()
            ),
            Err(e) => format!("{e:#}; without it: no snapshot, no connection table"),
        },
    ));
    Ok(lines)
}
