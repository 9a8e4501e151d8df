//! Draws the connection table: its columns, which of them a narrow
//! screen drops, and the verdict reason shown on each row.

use super::*;

/// A column of the connection table.
struct Col {
    title: &'static str,
    /// Lower numbers stay longer on a narrow screen.
    keep: u8,
    right: bool,
    text: fn(&Item, &Model) -> String,
}

const REASON_MIN: usize = 16;

/// The columns; RULE only while tuning (`--policy`).
fn columns(m: &Model) -> Vec<Col> {
    let mut cols = vec![
        Col {
            title: "VERDICT",
            keep: 0,
            right: false,
            text: |i, _| i.row().verdict.name().into(),
        },
        Col {
            title: "STATE",
            keep: 5,
            right: false,
            text: |i, _| match i {
                Item::Closed(_) => "CLOSED".into(),
                Item::Live(r) => state_name(r.conn.id.state).into(),
            },
        },
        Col {
            title: "LOCAL",
            keep: 6,
            right: false,
            text: |i, _| endpoint(i.row().conn.id.saddr, i.row().conn.id.sport),
        },
        Col {
            title: "PEER",
            keep: 1,
            right: false,
            text: |i, _| endpoint(i.row().conn.id.daddr, i.row().conn.id.dport),
        },
        Col {
            title: "OWNER",
            keep: 2,
            right: false,
            text: |i, _| owner(&i.row().conn.owners, i.row().conn.kernel_orphan),
        },
        Col {
            title: "KEEPALIVE",
            keep: 7,
            right: false,
            text: |i, _| keepalive(&i.row().conn),
        },
        Col {
            title: "PROBES",
            keep: 3,
            right: true,
            text: |i, _| i.row().conn.probes_out.to_string(),
        },
        Col {
            title: "RETR",
            keep: 4,
            right: true,
            text: |i, _| i.row().conn.total_retrans.to_string(),
        },
        Col {
            title: "IDLE",
            keep: 3,
            right: true,
            text: |i, _| idle(&i.row().conn),
        },
        Col {
            title: "TIMER",
            keep: 8,
            right: false,
            text: |i, _| timer(&i.row().conn),
        },
    ];
    if m.policy.is_some() {
        cols.insert(
            5,
            Col {
                title: "RULE",
                keep: 4,
                right: false,
                text: |i, m| {
                    m.tuned
                        .get(&i.row().conn.id.cookie)
                        .map_or_else(|| "-".into(), TunedBy::describe)
                },
            },
        );
    }
    cols
}

fn reason(item: &Item, now_ns: u64) -> String {
    match item {
        Item::Live(r) => r.verdict.reason(),
        Item::Closed(c) => closed_reason(c, now_ns),
    }
}

pub(super) fn closed_reason(c: &Closed, now_ns: u64) -> String {
    format!(
        "closed {} ago: {}",
        dur(now_ns.saturating_sub(c.closed_ns) / 1_000_000),
        c.ending.describe()
    )
}

pub(super) fn draw_table(f: &mut Frame, area: Rect, app: &mut App, m: &Model, theme: &Theme) {
    let rows_area = area.height.saturating_sub(1) as usize;
    app.page = rows_area.max(1);
    app.sync_page();
    let from = app.offset.min(app.order.len());
    let to = (from + rows_area).min(app.order.len());
    let items: Vec<Item> = app.order[from..to]
        .iter()
        .filter_map(|&c| {
            // Live first (the order lists live ones first), closed after.
            find_item(m, c)
        })
        .collect();
    let cols = columns(m);
    let texts: Vec<Vec<String>> = items
        .iter()
        .map(|i| cols.iter().map(|c| (c.text)(i, m)).collect())
        .collect();
    let mut widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            texts
                .iter()
                .map(|t| t[ci].chars().count())
                .max()
                .unwrap_or(0)
                .max(c.title.len())
        })
        .collect();
    // Drop the least needed columns until the reason gets its minimum.
    let mut shown: Vec<bool> = vec![true; cols.len()];
    let total = area.width as usize;
    // Width of the shown columns, a space after each.
    let used = |widths: &[usize], shown: &[bool]| -> usize {
        widths
            .iter()
            .zip(shown)
            .filter(|(_, s)| **s)
            .map(|(w, _)| w + 1)
            .sum()
    };
    loop {
        if used(&widths, &shown) + REASON_MIN <= total {
            break;
        }
        let Some(drop) = cols
            .iter()
            .enumerate()
            .filter(|(i, _)| shown[*i])
            .max_by_key(|(_, c)| c.keep)
            .map(|(i, _)| i)
        else {
            break;
        };
        if cols[drop].keep == 0 {
            // Only the verdict is left: shrink it.
            widths[drop] = total.saturating_sub(REASON_MIN + 1).min(widths[drop]);
            break;
        }
        shown[drop] = false;
    }
    let reason_w = total.saturating_sub(used(&widths, &shown)).max(1);
    let mut constraints: Vec<Constraint> = widths
        .iter()
        .zip(&shown)
        .filter(|(_, s)| **s)
        .map(|(w, _)| Constraint::Length(*w as u16))
        .collect();
    constraints.push(Constraint::Length(reason_w as u16));

    let sort_mark = if app.reverse { "↑" } else { "↓" };
    let sort_title = match app.sort {
        crate::top::app::SortKey::Verdict => "VERDICT",
        crate::top::app::SortKey::Probes => "PROBES",
        crate::top::app::SortKey::Retransmits => "RETR",
        crate::top::app::SortKey::Idle => "IDLE",
        crate::top::app::SortKey::Owner => "OWNER",
        crate::top::app::SortKey::Peer => "PEER",
        crate::top::app::SortKey::Local => "LOCAL",
        crate::top::app::SortKey::State => "STATE",
        crate::top::app::SortKey::Timer => "TIMER",
    };
    let mut header: Vec<Cell> = cols
        .iter()
        .zip(&shown)
        .filter(|(_, s)| **s)
        .map(|(c, _)| {
            let t = if c.title == sort_title {
                format!("{}{sort_mark}", c.title)
            } else {
                c.title.to_string()
            };
            Cell::from(t)
        })
        .collect();
    header.push(Cell::from("REASON"));
    let rows: Vec<TableRow> = items
        .iter()
        .zip(&texts)
        .map(|(item, t)| {
            let sev = item.row().verdict.severity();
            let mut cells: Vec<Cell> = cols
                .iter()
                .enumerate()
                .filter(|(i, _)| shown[*i])
                .map(|(i, c)| {
                    let w = widths[i];
                    let s = truncate(&t[i], w);
                    let s = if c.right { format!("{s:>w$}") } else { s };
                    if i == 0 {
                        Cell::from(Span::styled(s, theme.verdict_word(sev)))
                    } else {
                        Cell::from(s)
                    }
                })
                .collect();
            cells.push(Cell::from(truncate(&reason(item, m.now_ns), reason_w)));
            let style = match item {
                Item::Closed(_) => theme.closed(),
                Item::Live(_) => theme.verdict_row(sev),
            };
            TableRow::new(cells).style(style)
        })
        .collect();
    let empty = rows.is_empty();
    let table = Table::new(rows, constraints)
        .header(TableRow::new(header).style(theme.label().add_modifier(Modifier::UNDERLINED)))
        .column_spacing(1)
        .row_highlight_style(theme.selected());
    let mut state = TableState::default();
    if !empty {
        state.select(Some(app.selected.saturating_sub(from)));
    }
    f.render_stateful_widget(table, area, &mut state);
    if empty {
        let msg = if app.query.is_empty() {
            "no connections"
        } else {
            "no connection matches the filter (Esc clears it)"
        };
        let inner = Rect {
            y: area.y + 1,
            height: area.height.saturating_sub(1),
            ..area
        };
        f.render_widget(Paragraph::new(format!(" {msg}")), inner);
    }
}
