//! Draws the `keepalive top` screens from the model and the UI state:
//! header, connection table, detail view, event log, help overlay and
//! filter prompt. Drawing only reads; what is on screen is decided in
//! [`super::app`].

use std::net::IpAddr;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, Paragraph, Row as TableRow, Table, TableState, Wrap,
};

use super::app::{App, Item, Mode, View, find_item};
use super::model::{Closed, LogEntry, Model, Row, Series, TunedBy};
use crate::events::{Kind, Owner, state_name};
use crate::table::{Conn, TCP_LISTEN, TimerKind};

mod detail;
mod events;
mod table;

use detail::draw_detail;
use events::draw_events;
use table::draw_table;

/// Colours, or none (`NO_COLOR`, `TERM=dumb`): then weight and dimming
/// carry the meaning alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Theme {
    pub color: bool,
}

impl Theme {
    /// Colour unless `NO_COLOR` is set (to anything non-empty) or the
    /// terminal is `dumb` (https://no-color.org).
    pub fn from_env() -> Theme {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Theme {
            color: !no_color && !dumb,
        }
    }

    fn fg(&self, c: Color) -> Style {
        if self.color {
            Style::default().fg(c)
        } else {
            Style::default()
        }
    }

    /// A whole row of this verdict.
    fn verdict_row(&self, severity: u8) -> Style {
        match severity {
            3 => self.fg(Color::Red).add_modifier(Modifier::BOLD),
            2 => self.fg(Color::Magenta),
            1 => self.fg(Color::Yellow),
            _ => Style::default(),
        }
    }

    /// The verdict word itself.
    fn verdict_word(&self, severity: u8) -> Style {
        match severity {
            0 => self.fg(Color::Green),
            s => self.verdict_row(s).add_modifier(Modifier::BOLD),
        }
    }

    fn closed(&self) -> Style {
        Style::default().add_modifier(Modifier::DIM)
    }

    fn selected(&self) -> Style {
        Style::default().add_modifier(Modifier::REVERSED)
    }

    fn alert(&self) -> Style {
        if self.color {
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED)
        }
    }

    fn title(&self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }

    fn label(&self) -> Style {
        Style::default().add_modifier(Modifier::BOLD)
    }

    fn event(&self, what: &str, severity: u8) -> Style {
        match what {
            "verdict" => self.verdict_row(severity),
            "lost" => self.alert(),
            "timeout" | "reset_sent" | "reset_received" => self.fg(Color::Red),
            "keepalive_probe" => self.fg(Color::Yellow),
            "retransmit" => self.fg(Color::Magenta),
            _ => Style::default(),
        }
    }
}

/// `4.2s`, `42s`, `2m03s`, `1h02m`, `3d04h`.
pub fn dur(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86400, (s % 86400) / 3600)
    }
}

fn endpoint(a: Option<IpAddr>, port: u16) -> String {
    match a {
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("{v4}:{port}"),
            None => format!("[{v6}]:{port}"),
        },
        Some(a) => format!("{a}:{port}"),
        None => format!("*:{port}"),
    }
}

fn owner(owners: &[Owner], orphan: bool) -> String {
    match owners {
        [] if orphan => "(orphan)".into(),
        [] => "-".into(),
        [o] => format!("{}/{}", o.comm, o.pid),
        [o, rest @ ..] => format!("{}/{}+{}", o.comm, o.pid, rest.len()),
    }
}

fn keepalive(c: &Conn) -> String {
    if c.keepalive.enabled {
        format!(
            "{}/{}/{}",
            dur(c.keepalive.idle_ms),
            dur(c.keepalive.intvl_ms),
            c.keepalive.probes
        )
    } else {
        "off".into()
    }
}

fn timer_name(k: TimerKind) -> &'static str {
    match k {
        TimerKind::Keepalive => "keepalive",
        TimerKind::Retransmit => "retrans",
        TimerKind::ZeroWindowProbe => "0-window",
    }
}

fn timer(c: &Conn) -> String {
    match c.timer {
        Some(t) if t.fires_in_ms < 0 => format!("{} due", timer_name(t.kind)),
        Some(t) => format!("{} {}", timer_name(t.kind), dur(t.fires_in_ms as u64)),
        None => "-".into(),
    }
}

fn idle(c: &Conn) -> String {
    if c.full && c.id.state != TCP_LISTEN {
        dur(c.idle_ms())
    } else {
        "-".into()
    }
}

/// Cuts `s` to `width` characters, marking the cut with `…`.
pub fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut t: String = s.chars().take(width - 1).collect();
    t.push('…');
    t
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Values as a line of block characters, scaled to their maximum; a
/// quiet second is a space.
pub fn sparkline(values: &[u32], width: usize) -> String {
    let vals = &values[values.len().saturating_sub(width)..];
    let max = vals.iter().copied().max().unwrap_or(0).max(1) as u64;
    let mut s: String = " ".repeat(width - vals.len());
    for &v in vals {
        s.push(if v == 0 {
            ' '
        } else {
            BARS[((v as u64 * 8).div_ceil(max)).clamp(1, 8) as usize - 1]
        });
    }
    s
}

/// `HH:MM:SS.mmm` (UTC) of a CLOCK_MONOTONIC stamp.
fn clock_time(m: &Model, mono_ns: u64) -> String {
    let s = m.clock.rfc3339(mono_ns);
    s.get(11..23).unwrap_or(&s).to_string()
}

/// The whole screen.
pub fn draw(f: &mut Frame, app: &mut App, live: &Model, theme: &Theme) {
    let area = f.area();
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);
    // The model shown: frozen while paused. Cloned out of `app` only as a
    // reference, so `app` can still be updated for scrolling.
    let frozen = app.frozen.take();
    {
        let m = frozen.as_deref().unwrap_or(live);
        draw_header(f, header, m, live, frozen.is_some(), theme);
        match app.view {
            View::Connections => draw_table(f, body, app, m, theme),
            View::Events => draw_events(f, body, app, m, theme),
            View::Detail(cookie) => draw_detail(f, body, app, m, cookie, theme),
        }
        draw_footer(f, footer, app, theme);
        if app.mode == Mode::Help {
            draw_help(f, area, theme);
        }
    }
    app.frozen = frozen;
}

fn draw_header(f: &mut Frame, area: Rect, m: &Model, live: &Model, paused: bool, theme: &Theme) {
    let sep = || Span::raw("  ");
    let up = dur(m.now_ns.saturating_sub(m.started_ns) / 1_000_000);
    let mut l1 = vec![
        Span::styled("keepalive top", theme.title()),
        sep(),
        Span::raw(format!("host {}", m.host.hostname)),
        sep(),
        Span::raw(format!("kernel {}", m.host.kernel)),
        sep(),
        Span::raw(format!("up {up}")),
        sep(),
        Span::raw(format!("refresh {}", dur(m.refresh_ms))),
    ];
    if paused {
        l1.push(sep());
        l1.push(Span::styled(" PAUSED ", theme.alert()));
    }
    if live.stopped {
        l1.push(sep());
        l1.push(Span::styled(" STOPPED ", theme.alert()));
    }
    let n = m.by_verdict(|r| r.conn.id.state != TCP_LISTEN);
    let total: usize = n.iter().sum();
    let mut l2 = vec![Span::styled(
        format!("{total} connections: "),
        theme.label(),
    )];
    for (i, name) in ["dead", "orphaned", "unprotected", "healthy"]
        .iter()
        .enumerate()
    {
        let style = if n[i] > 0 || i == 3 {
            theme.verdict_word(3 - i as u8)
        } else {
            Style::default()
        };
        l2.push(Span::styled(format!("{name} {}", n[i]), style));
        l2.push(sep());
    }
    let closed = m
        .closed
        .iter()
        .filter(|c| c.row.conn.id.state != TCP_LISTEN)
        .count();
    l2.push(Span::raw(format!("closed {closed}")));
    l2.push(sep());
    // Lost events are never hidden, and they are the live count even
    // while the display is paused.
    let lost = live.lost;
    l2.push(Span::styled(
        format!("lost {lost}"),
        if lost > 0 {
            theme.alert()
        } else {
            Style::default()
        },
    ));
    if live.ui_dropped > 0 {
        l2.push(sep());
        l2.push(Span::styled(
            format!("not shown {} (UI behind)", live.ui_dropped),
            theme.alert(),
        ));
    }
    let half = (area.width as usize).saturating_sub(1) / 2;
    let series_span = |s: Series| -> Vec<Span<'static>> {
        let label = format!(" {:<8} {:>7.1}/s ", s.name(), m.history.rate(s));
        let width = half.saturating_sub(label.chars().count() + 1);
        let line = sparkline(&m.history.recent(s, width), width);
        vec![
            Span::styled(label, theme.label()),
            Span::styled(line, theme.event(series_kind(s), 0)),
            Span::raw(" "),
        ]
    };
    let l3: Vec<Span> = [Series::Probes, Series::Retransmits]
        .into_iter()
        .flat_map(series_span)
        .collect();
    let l4: Vec<Span> = [Series::Resets, Series::Timeouts]
        .into_iter()
        .flat_map(series_span)
        .collect();
    let text = vec![
        Line::from(l1),
        Line::from(l2),
        Line::from(l3),
        Line::from(l4),
    ];
    f.render_widget(Paragraph::new(text), area);
}

fn series_kind(s: Series) -> &'static str {
    match s {
        Series::Probes => Kind::KeepaliveProbe.name(),
        Series::Retransmits => Kind::Retransmit.name(),
        Series::Resets => Kind::ResetReceived.name(),
        Series::Timeouts => Kind::Timeout.name(),
    }
}

fn draw_footer(f: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let line = match &app.mode {
        Mode::Filter { input, error } => {
            let mut spans = vec![
                Span::styled("/", theme.label()),
                Span::raw(input.clone()),
                Span::styled("█", Style::default().add_modifier(Modifier::SLOW_BLINK)),
                Span::raw("  "),
            ];
            match error {
                Some(e) => spans.push(Span::styled(e.clone(), theme.alert())),
                None => spans.push(Span::raw(
                    "Enter apply  Esc clear  port:N addr:CIDR comm:NAME pid:N verdict:V state:S words",
                )),
            }
            Line::from(spans)
        }
        _ => {
            let mut spans = Vec::new();
            if !app.query_text.is_empty() {
                spans.push(Span::styled(
                    format!(" filter: {} ", app.query_text),
                    theme.selected(),
                ));
                spans.push(Span::raw(" "));
            }
            let view = match app.view {
                View::Connections => format!(
                    "{} shown{}",
                    app.live_shown,
                    if app.show_closed {
                        format!(" + {} closed", app.order.len() - app.live_shown)
                    } else {
                        String::new()
                    }
                ),
                View::Events => format!("{} events", app.events.len()),
                View::Detail(_) => "detail".into(),
            };
            spans.push(Span::styled(view, theme.label()));
            spans.push(Span::raw(format!(
                "  sort {}{}  ",
                app.sort.name(),
                if app.reverse { "↑" } else { "↓" }
            )));
            spans.push(Span::raw(
                "? help  q quit  / filter  s sort  Enter detail  Tab view  Space pause  c closed",
            ));
            Line::from(spans)
        }
    };
    f.render_widget(Paragraph::new(line), area);
}

/// Every key, as the help overlay lists them.
pub const KEYS: [(&str, &str); 15] = [
    ("q, Ctrl-C", "quit"),
    ("?, h", "this help (any key closes it)"),
    ("/", "filter: port:N addr:CIDR comm:NAME pid:N"),
    ("", "verdict:V state:S, bare words match anything"),
    ("Esc", "clear the filter; back from a detail view"),
    ("s", "sort by the next column"),
    ("S", "reverse the sort"),
    ("↑ ↓, j k", "move"),
    ("PgUp PgDn", "move a page"),
    ("Home End, g G", "first / last (End follows new events)"),
    ("Enter", "details of the selected connection"),
    ("Tab", "connections / event log"),
    ("Space", "pause the display (monitoring goes on)"),
    ("c", "show recently closed connections"),
    ("", "colours: dead, orphaned, unprotected, healthy"),
];

fn draw_help(f: &mut Frame, area: Rect, theme: &Theme) {
    let w = area.width.min(64);
    let h = area.height.min(KEYS.len() as u16 + 4);
    let r = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, v)| {
            Line::from(vec![
                Span::styled(format!(" {k:<14}"), theme.label()),
                Span::raw(v.to_string()),
            ])
        })
        .collect();
    if let Some(last) = lines.last_mut() {
        *last = Line::from(vec![
            Span::raw(format!(" {:<14}", "")),
            Span::styled("dead ", theme.verdict_word(3)),
            Span::styled("orphaned ", theme.verdict_word(2)),
            Span::styled("unprotected ", theme.verdict_word(1)),
            Span::styled("healthy ", theme.verdict_word(0)),
            Span::styled("closed", theme.closed()),
        ]);
    }
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(Span::styled(" keepalive top: keys ", theme.title()))),
        r,
    );
}
