//! Draws the detail view of one connection (live or recently closed):
//! its counters, keepalive and timer state, and its timeline.

use super::table::closed_reason;
use super::*;

fn kv(theme: &Theme, pairs: &[(&str, String)]) -> Line<'static> {
    let mut spans = Vec::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw("   "));
        }
        spans.push(Span::styled(format!("{k} "), theme.label()));
        spans.push(Span::raw(v.clone()));
    }
    Line::from(spans)
}

pub(super) fn draw_detail(
    f: &mut Frame,
    area: Rect,
    app: &mut App,
    m: &Model,
    cookie: u64,
    theme: &Theme,
) {
    let Some(item) = find_item(m, cookie) else {
        let block = Block::default()
            .borders(Borders::TOP)
            .title(format!(" connection {cookie} "));
        let inner = block.inner(area);
        f.render_widget(block, area);
        f.render_widget(
            Paragraph::new(" no longer tracked (closed more than 5 minutes ago); Esc goes back"),
            inner,
        );
        return;
    };
    let row: &Row = item.row();
    let c = &row.conn;
    let sev = row.verdict.severity();
    let title = format!(
        " {} > {}  cookie {} ",
        endpoint(c.id.saddr, c.id.sport),
        endpoint(c.id.daddr, c.id.dport),
        c.id.cookie
    );
    let block = Block::default()
        .borders(Borders::TOP)
        .title(Span::styled(title, theme.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);

    let mut info: Vec<Line> = vec![Line::from(vec![
        Span::styled(
            format!("{} ", row.verdict.name().to_uppercase()),
            theme.verdict_word(sev),
        ),
        Span::styled(row.verdict.reason(), theme.verdict_row(sev)),
    ])];
    if let Some(closed) = item.closed() {
        info.push(Line::styled(
            closed_reason(closed, m.now_ns),
            theme.alert().remove_modifier(Modifier::REVERSED),
        ));
    }
    info.push(kv(
        theme,
        &[
            (
                "state",
                match item {
                    Item::Closed(_) => "CLOSED".into(),
                    Item::Live(_) => state_name(c.id.state).into(),
                },
            ),
            ("owner", owner(&c.owners, c.kernel_orphan)),
            ("netns", c.id.netns.to_string()),
            ("inode", c.ino.to_string()),
        ],
    ));
    let ka = if c.keepalive.enabled {
        format!(
            "on: idle {}, every {}, {} probes",
            dur(c.keepalive.idle_ms),
            dur(c.keepalive.intvl_ms),
            c.keepalive.probes
        )
    } else {
        "off".into()
    };
    info.push(kv(
        theme,
        &[
            ("keepalive", ka),
            (
                "user timeout",
                if c.user_timeout_ms == 0 {
                    "-".into()
                } else {
                    dur(c.user_timeout_ms as u64)
                },
            ),
            ("rto", format!("{}ms", c.rto_ms)),
            ("retries2", c.retries2.to_string()),
        ],
    ));
    if m.policy.is_some() {
        info.push(kv(
            theme,
            &[(
                "tuned by rule",
                m.tuned
                    .get(&c.id.cookie)
                    .map_or_else(|| "-".into(), TunedBy::describe),
            )],
        ));
    }
    info.push(kv(
        theme,
        &[
            ("unanswered probes", c.probes_out.to_string()),
            (
                "retransmits",
                format!("{} in a row (backoff {})", c.retransmits, c.backoff),
            ),
            ("retransmitted", format!("{} segs", c.total_retrans)),
            (
                "queues",
                format!("recv {} send {}", c.recv_queue, c.send_queue),
            ),
        ],
    ));
    if let Some(s) = c.stats {
        info.push(kv(
            theme,
            &[
                ("seen by the monitor: probes", s.probes.to_string()),
                ("retransmitted segs", s.retransmit_segs.to_string()),
                (
                    "resets",
                    format!("{} sent {} received", s.resets_sent, s.resets_received),
                ),
                ("timeouts", s.timeouts.to_string()),
            ],
        ));
    }
    info.push(kv(
        theme,
        &[
            (
                "timer",
                match c.timer {
                    Some(t) if t.fires_in_ms < 0 => format!("{} due", t.kind.name()),
                    Some(t) => format!("{} in {}", t.kind.name(), dur(t.fires_in_ms as u64)),
                    None => "none".into(),
                },
            ),
            ("last send", format!("{} ago", dur(c.last_send_ms))),
            ("last receive", format!("{} ago", dur(c.last_recv_ms))),
            ("last ACK", format!("{} ago", dur(c.last_ack_ms))),
        ],
    ));
    // Probes and retransmits per second over the last minute.
    let timeline = m.timelines.get(&cookie);
    let now_s = m.now_ns / 1_000_000_000;
    let chart_w = (inner.width as usize).saturating_sub(24).clamp(10, 60);
    let per_sec = |kind: Kind| -> Vec<u32> {
        let mut v = vec![0u32; chart_w];
        for mo in timeline.into_iter().flatten().filter(|mo| mo.kind == kind) {
            let age = now_s.saturating_sub(mo.ts_ns / 1_000_000_000) as usize;
            if age < chart_w {
                v[chart_w - 1 - age] += 1;
            }
        }
        v
    };
    let probes = per_sec(Kind::KeepaliveProbe);
    let retrans = per_sec(Kind::Retransmit);
    let chart_line = |name: &str, v: &[u32], what: &str| {
        Line::from(vec![
            Span::styled(
                format!("{name:<8} {:>3} in {}s ", v.iter().sum::<u32>(), chart_w),
                theme.label(),
            ),
            Span::styled(sparkline(v, chart_w), theme.event(what, 0)),
            Span::raw("│"),
        ])
    };
    info.push(chart_line("probes", &probes, "keepalive_probe"));
    info.push(chart_line("retrans", &retrans, "retransmit"));

    let info_h = (info.len() as u16 + 2).min(inner.height);
    let [top, rest] =
        Layout::vertical([Constraint::Length(info_h), Constraint::Min(0)]).areas(inner);
    f.render_widget(Paragraph::new(info).wrap(Wrap { trim: false }), top);

    let tl_block = Block::default().borders(Borders::TOP).title(Span::styled(
        " timeline (newest last; ↑↓ scroll) ",
        theme.label(),
    ));
    let tl_inner = tl_block.inner(rest);
    f.render_widget(tl_block, rest);
    let moments: Vec<Line> = timeline
        .into_iter()
        .flatten()
        .map(|mo| {
            let ago = dur(m.now_ns.saturating_sub(mo.ts_ns) / 1_000_000);
            let style = theme.event(
                mo.kind.name(),
                if mo.kind == Kind::Verdict { sev } else { 0 },
            );
            Line::styled(
                truncate(
                    &format!("{} {:>8} ago  {}", clock_time(m, mo.ts_ns), ago, mo.text),
                    tl_inner.width as usize,
                ),
                style,
            )
        })
        .collect();
    if moments.is_empty() {
        f.render_widget(
            Paragraph::new(" no events for this connection since top started"),
            tl_inner,
        );
        return;
    }
    let h = tl_inner.height as usize;
    let max_up = moments.len().saturating_sub(h);
    app.detail_scroll = app.detail_scroll.min(max_up);
    let from = max_up - app.detail_scroll;
    let shown: Vec<Line> = moments.into_iter().skip(from).take(h).collect();
    f.render_widget(Paragraph::new(shown), tl_inner);
}
