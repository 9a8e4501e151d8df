//! Draws the event log view, one line per logged event, newest last.

use super::*;

fn log_line(m: &Model, e: &LogEntry) -> String {
    let mut s = format!("{} {:<15} ", clock_time(m, e.ts_ns), e.what);
    if let Some(c) = &e.conn {
        s += &format!(
            "{} > {} {} {} ",
            endpoint(Some(c.saddr), c.sport),
            endpoint(Some(c.daddr), c.dport),
            state_name(c.state),
            owner(&c.owners, false)
        );
    }
    s + &e.text
}

pub(super) fn draw_events(f: &mut Frame, area: Rect, app: &mut App, m: &Model, theme: &Theme) {
    let block = Block::default().borders(Borders::TOP).title(Span::styled(
        format!(
            " events: {} shown of {} kept, newest last ",
            app.events.len(),
            m.log.len()
        ),
        theme.label(),
    ));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let rows = inner.height as usize;
    let (from, sel) = app.event_window(rows);
    let width = inner.width as usize;
    let lines: Vec<Line> = app
        .events
        .iter()
        .enumerate()
        .skip(from)
        .take(rows)
        .filter_map(|(i, &li)| {
            let e = m.log.get(li)?;
            let mut style = theme.event(e.what, e.severity);
            if app.event_selected.is_some() && i == sel {
                style = style.patch(theme.selected());
            }
            Some(Line::styled(truncate(&log_line(m, e), width), style))
        })
        .collect();
    if lines.is_empty() {
        f.render_widget(Paragraph::new(" no events yet"), inner);
    } else {
        f.render_widget(Paragraph::new(lines), inner);
    }
}
