//! Unit tests of the screen state and key handling in [`super`].

use super::*;
use crate::events::{Detail, Owner};
use crate::output::Clock;
use crate::table::verdict::{Orphaned, Unprotected};
use crate::table::{TCP_CLOSE_WAIT, Timer, TimerKind};
use crate::top::model::tests::{conn, event};
use crate::top::model::{Host, Update};

const NS: u64 = 1_000_000_000;

fn dead(gives_up_in_ms: i64) -> Verdict {
    Verdict::Dead(Dead::ProbesUnanswered {
        unanswered_probes: 2,
        probes: 5,
        gives_up_in_ms,
    })
}

/// Six connections: two dead (one sooner), an orphan, an unprotected
/// one, two healthy, and a listener.
fn model() -> Model {
    let mut m = Model::new(Host::default(), Clock::fixed(0), 2000);
    let mut rows = Vec::new();
    let mut c = conn(1, 80);
    c.last_recv_ms = 5_000;
    c.last_send_ms = 5_000;
    rows.push((c, Verdict::Healthy));
    let mut c = conn(2, 443);
    c.probes_out = 2;
    rows.push((c, dead(9_000)));
    let mut c = conn(3, 5432);
    c.id.state = TCP_CLOSE_WAIT;
    c.owners = vec![Owner {
        pid: 7,
        comm: "postgres".into(),
    }];
    rows.push((
        c,
        Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms: 70_000 }),
    ));
    let mut c = conn(4, 80);
    c.keepalive.enabled = false;
    c.total_retrans = 4;
    c.retransmits = 1;
    rows.push((
        c,
        Verdict::Unprotected(Unprotected::KeepaliveOff { idle_ms: 61_000 }),
    ));
    let mut c = conn(5, 443);
    c.probes_out = 3;
    c.timer = Some(Timer {
        kind: TimerKind::Keepalive,
        fires_in_ms: 500,
    });
    rows.push((c, dead(2_000)));
    let mut c = conn(6, 22);
    c.last_recv_ms = 9_000;
    c.last_send_ms = 9_000;
    rows.push((c, Verdict::Healthy));
    let mut c = conn(7, 0);
    c.id.state = TCP_LISTEN;
    c.id.sport = 8080;
    rows.push((c, Verdict::Healthy));
    m.apply(Update::Started {
        rows,
        hooks: 7,
        mono_ns: 100 * NS,
    });
    m
}

fn app(m: &Model) -> App {
    let mut a = App {
        page: 3,
        ..App::default()
    };
    a.sync(m);
    a
}

fn keys(a: &mut App, m: &Model, text: &str) {
    for c in text.chars() {
        a.key(Key::Char(c), m);
    }
}

#[test]
fn worst_first_by_default_and_listeners_hidden() {
    let m = model();
    let a = app(&m);
    // Dead soonest-to-give-up first, then dead, orphaned, unprotected,
    // healthy by idle time.
    assert_eq!(a.order, vec![5, 2, 3, 4, 6, 1]);
    assert_eq!(a.selected_cookie, Some(5));
}

#[test]
fn s_cycles_columns_and_capital_s_reverses() {
    let m = model();
    let mut a = app(&m);
    a.key(Key::Char('s'), &m);
    assert_eq!(a.sort, SortKey::Probes);
    assert_eq!(a.order, vec![5, 2, 3, 4, 6, 1]);
    a.key(Key::Char('s'), &m);
    assert_eq!(a.sort, SortKey::Retransmits);
    assert_eq!(a.order[0], 4);
    a.key(Key::Char('S'), &m);
    assert!(a.reverse);
    assert_eq!(*a.order.last().unwrap(), 4);
    a.key(Key::Char('s'), &m);
    assert_eq!(a.sort, SortKey::Idle);
    assert!(!a.reverse, "a new column starts in its natural direction");
    for _ in 0..6 {
        a.key(Key::Char('s'), &m);
    }
    assert_eq!(a.sort, SortKey::Verdict, "the cycle wraps around");
}

#[test]
fn selection_moves_scrolls_and_clamps() {
    let m = model();
    let mut a = app(&m);
    a.key(Key::Down, &m);
    a.key(Key::Char('j'), &m);
    assert_eq!(a.selected, 2);
    assert_eq!(a.offset, 0);
    a.key(Key::Down, &m);
    assert_eq!(a.selected, 3);
    assert_eq!(a.offset, 1, "scrolls to keep the selection on the page");
    a.key(Key::Char('k'), &m);
    a.key(Key::Up, &m);
    a.key(Key::Up, &m);
    assert_eq!((a.selected, a.offset), (0, 0));
    a.key(Key::Up, &m);
    assert_eq!(a.selected, 0, "stops at the top");
    a.key(Key::PageDown, &m);
    assert_eq!(a.selected, 3);
    a.key(Key::PageDown, &m);
    a.key(Key::PageDown, &m);
    assert_eq!(a.selected, 5, "stops at the bottom");
    assert_eq!(a.offset, 3);
    a.key(Key::Home, &m);
    assert_eq!((a.selected, a.offset), (0, 0));
    a.key(Key::End, &m);
    assert_eq!((a.selected, a.selected_cookie), (5, Some(1)));
    a.key(Key::PageUp, &m);
    assert_eq!(a.selected, 2);
}

#[test]
fn selection_follows_its_connection_across_updates() {
    let mut m = model();
    let mut a = app(&m);
    a.key(Key::Down, &m);
    a.key(Key::Down, &m);
    assert_eq!(a.selected_cookie, Some(3));
    // Connection 6 turns dead: it moves above the selection.
    let mut c = m.rows[&6].conn.clone();
    c.probes_out = 1;
    m.apply(Update::Rows(vec![(c, dead(1_000))]));
    a.sync(&m);
    assert_eq!(a.selected_cookie, Some(3));
    assert_eq!(a.selected, 3);
    // The selected connection goes: the position stays.
    m.apply(Update::Table {
        rows: m
            .rows
            .values()
            .filter(|r| r.conn.id.cookie != 3)
            .map(|r| (r.conn.clone(), r.verdict.clone()))
            .collect(),
    });
    a.sync(&m);
    assert_eq!(a.selected, 3);
    assert_ne!(a.selected_cookie, Some(3));
}

#[test]
fn filter_prompt_filters_as_you_type_and_esc_clears() {
    let m = model();
    let mut a = app(&m);
    a.key(Key::Char('/'), &m);
    assert!(matches!(a.mode, Mode::Filter { .. }));
    keys(&mut a, &m, "port:443");
    assert_eq!(a.order, vec![5, 2]);
    // A half-typed term shows an error and keeps the last good filter.
    keys(&mut a, &m, " pid:x");
    match &a.mode {
        Mode::Filter { error: Some(e), .. } => assert!(e.contains("pid:x"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.query_text, "port:443 pid", "the last text that parsed");
    // Enter does not accept a bad filter.
    a.key(Key::Enter, &m);
    assert!(matches!(a.mode, Mode::Filter { .. }));
    a.key(Key::Backspace, &m);
    keys(&mut a, &m, "1005");
    a.key(Key::Enter, &m);
    assert_eq!(a.mode, Mode::Normal);
    assert_eq!(a.query_text, "port:443 pid:1005");
    assert_eq!(a.order, vec![5]);
    // `/` again starts from the current filter; Esc clears it.
    a.key(Key::Char('/'), &m);
    assert_eq!(
        a.mode,
        Mode::Filter {
            input: "port:443 pid:1005".into(),
            error: None
        }
    );
    a.key(Key::Esc, &m);
    assert_eq!(a.mode, Mode::Normal);
    assert_eq!(a.order.len(), 6);
    // Esc in the table clears an applied filter too.
    a.key(Key::Char('/'), &m);
    keys(&mut a, &m, "verdict:dead");
    a.key(Key::Enter, &m);
    assert_eq!(a.order, vec![5, 2]);
    a.key(Key::Esc, &m);
    assert_eq!(a.order.len(), 6);
}

#[test]
fn keyword_filters_and_listeners_on_request() {
    let m = model();
    let mut a = app(&m);
    for (q, want) in [
        ("comm:postgres", vec![3]),
        ("verdict:unprotected", vec![4]),
        ("state:close_wait", vec![3]),
        ("state:listen", vec![7]),
        ("keepalive_off", vec![4]),
        ("addr:198.18.7.0/24 port:22", vec![6]),
    ] {
        a.key(Key::Char('/'), &m);
        keys(&mut a, &m, q);
        a.key(Key::Enter, &m);
        assert_eq!(a.order, want, "{q}");
        a.key(Key::Esc, &m);
    }
}

#[test]
fn views_switch_with_tab_enter_and_esc() {
    let m = model();
    let mut a = app(&m);
    a.key(Key::Down, &m);
    a.key(Key::Enter, &m);
    assert_eq!(a.view, View::Detail(2));
    a.key(Key::Esc, &m);
    assert_eq!(a.view, View::Connections);
    a.key(Key::Tab, &m);
    assert_eq!(a.view, View::Events);
    a.key(Key::Tab, &m);
    assert_eq!(a.view, View::Connections);
    // Tab from a detail view goes back to the table.
    a.key(Key::Enter, &m);
    a.key(Key::Tab, &m);
    assert_eq!(a.view, View::Connections);
}

#[test]
fn events_follow_the_newest_until_moved() {
    let mut m = model();
    for i in 0..5 {
        m.apply(Update::Event(event(
            2 + (i % 2),
            101 + i,
            Detail::KeepaliveProbe { probe: 1 },
        )));
    }
    let mut a = app(&m);
    a.key(Key::Tab, &m);
    assert_eq!(a.events.len(), 5);
    assert_eq!(a.event_window(3), (2, 4));
    a.key(Key::Up, &m);
    a.key(Key::Up, &m);
    a.key(Key::Up, &m);
    assert_eq!(a.event_selected, Some(1));
    assert_eq!(a.event_window(3), (1, 1));
    // New events do not move a selection that stopped following.
    m.apply(Update::Event(event(2, 110, Detail::ResetReceived)));
    a.sync(&m);
    assert_eq!(a.event_window(3), (1, 1));
    a.key(Key::End, &m);
    assert_eq!(a.event_selected, None);
    assert_eq!(a.event_window(3), (3, 5));
    // Enter opens the connection of the selected event.
    a.key(Key::Home, &m);
    a.key(Key::Enter, &m);
    assert_eq!(a.view, View::Detail(2));
    a.key(Key::Esc, &m);
    assert_eq!(a.view, View::Events, "Esc goes back where Enter came from");
    // The filter applies to events too.
    a.key(Key::Char('/'), &m);
    keys(&mut a, &m, "reset");
    a.key(Key::Enter, &m);
    assert_eq!(a.events.len(), 1);
}

#[test]
fn pause_freezes_the_display_not_the_model() {
    let mut m = model();
    let mut a = app(&m);
    a.key(Key::Char(' '), &m);
    assert!(a.paused());
    m.apply(Update::Rows(vec![(conn(9, 9), dead(1))]));
    m.apply(Update::Event(event(9, 120, Detail::ResetReceived)));
    a.sync(&m);
    assert_eq!(a.order.len(), 6, "the display is frozen");
    assert_eq!(m.rows.len(), 8, "ingestion went on");
    a.key(Key::Char(' '), &m);
    assert!(!a.paused());
    assert_eq!(a.order.len(), 7);
    assert_eq!(a.order[0], 9);
}

#[test]
fn c_shows_recently_closed_after_the_live_ones() {
    let mut m = model();
    m.apply(Update::Event(event(
        2,
        105,
        Detail::StateChange { old: 1, new: 7 },
    )));
    let mut a = app(&m);
    assert!(!a.order.contains(&2));
    a.key(Key::Char('c'), &m);
    assert_eq!(a.order.last(), Some(&2));
    assert_eq!(a.live_shown, 5);
    a.key(Key::Char('c'), &m);
    assert!(!a.order.contains(&2));
}

#[test]
fn help_and_quit() {
    let m = model();
    let mut a = app(&m);
    a.key(Key::Char('?'), &m);
    assert_eq!(a.mode, Mode::Help);
    a.key(Key::Esc, &m);
    assert_eq!(a.mode, Mode::Normal);
    a.key(Key::Char('h'), &m);
    assert_eq!(a.mode, Mode::Help);
    a.key(Key::Char('j'), &m);
    assert_eq!(a.mode, Mode::Normal, "any key closes help");
    assert!(!a.quit);
    a.key(Key::Char('q'), &m);
    assert!(a.quit);
    let mut a = app(&m);
    a.key(Key::Char('/'), &m);
    a.key(Key::Char('q'), &m);
    assert!(!a.quit, "q is text in the filter prompt");
    a.key(Key::Ctrl('c'), &m);
    assert!(a.quit, "Ctrl-C quits from anywhere");
}
