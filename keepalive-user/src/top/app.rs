//! The state of the `keepalive top` screen and what each key does to it:
//! view, filter, sort, selection and scrolling, pause, recently closed,
//! help. Pure: keys in, state out, no terminal, so every key is unit-tested.

use std::collections::HashMap;
use std::net::IpAddr;

use super::model::{Closed, LogEntry, Model, Row};
use super::query::{Query, Subject};
use crate::events::state_name;
use crate::table::TCP_LISTEN;
use crate::table::verdict::{Dead, Verdict};

/// A key press, as the screen understands it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Char(char),
    /// Ctrl + a letter.
    Ctrl(char),
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    Enter,
    Esc,
    Tab,
    BackTab,
    Backspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Connections,
    Events,
    /// One connection, by cookie.
    Detail(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing a filter; `error` says why the text does not parse yet.
    Filter {
        input: String,
        error: Option<String>,
    },
    Help,
}

/// Columns the connection table can be sorted by, in the order `s` cycles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Worst first: verdict, then how soon the kernel gives up, probes, idle.
    Verdict,
    Probes,
    Retransmits,
    Idle,
    Owner,
    Peer,
    Local,
    State,
    Timer,
}

impl SortKey {
    const ORDER: [SortKey; 9] = [
        SortKey::Verdict,
        SortKey::Probes,
        SortKey::Retransmits,
        SortKey::Idle,
        SortKey::Owner,
        SortKey::Peer,
        SortKey::Local,
        SortKey::State,
        SortKey::Timer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SortKey::Verdict => "verdict",
            SortKey::Probes => "probes",
            SortKey::Retransmits => "retrans",
            SortKey::Idle => "idle",
            SortKey::Owner => "owner",
            SortKey::Peer => "peer",
            SortKey::Local => "local",
            SortKey::State => "state",
            SortKey::Timer => "timer",
        }
    }

    fn next(self) -> SortKey {
        let i = Self::ORDER.iter().position(|&k| k == self).unwrap_or(0);
        Self::ORDER[(i + 1) % Self::ORDER.len()]
    }
}

/// A line of the connection table: live, or recently closed.
#[derive(Clone, Copy, Debug)]
pub enum Item<'a> {
    Live(&'a Row),
    Closed(&'a Closed),
}

impl<'a> Item<'a> {
    pub fn row(&self) -> &'a Row {
        match self {
            Item::Live(r) => r,
            Item::Closed(c) => &c.row,
        }
    }

    pub fn closed(&self) -> Option<&'a Closed> {
        match self {
            Item::Live(_) => None,
            Item::Closed(c) => Some(c),
        }
    }
}

/// A connection's table line, live or recently closed.
pub fn find_item(m: &Model, cookie: u64) -> Option<Item<'_>> {
    m.rows
        .get(&cookie)
        .map(Item::Live)
        .or_else(|| m.closed_row(cookie).map(Item::Closed))
}

fn subject<'a>(row: &'a Row, words: &'a [&'a str]) -> Subject<'a> {
    let c = &row.conn;
    Subject {
        saddr: c.saddr,
        sport: c.sport,
        daddr: c.daddr,
        dport: c.dport,
        state: c.state,
        owners: &c.owners,
        verdict: Some(row.verdict.name()),
        words,
    }
}

/// How many milliseconds until the kernel gives up, for "worst first".
fn gives_up_in(v: &Verdict) -> i64 {
    match v {
        Verdict::Dead(Dead::TimedOut { .. }) => i64::MIN,
        Verdict::Dead(Dead::ProbesUnanswered { gives_up_in_ms, .. })
        | Verdict::Dead(Dead::RetransmitBackoff { gives_up_in_ms, .. }) => *gives_up_in_ms,
        _ => i64::MAX,
    }
}

/// Integers that order rows like the column does, then worst first, then
/// by cookie: sorting 100k rows on 32 bytes each is several times faster
/// than comparing rows field by field.
type SortKeyOf = (u128, u64, u64);

fn ip_key(a: Option<IpAddr>) -> u128 {
    match a {
        Some(IpAddr::V4(v4)) => u128::from(v4.to_ipv6_mapped()),
        Some(IpAddr::V6(v6)) => u128::from(v6),
        None => 0,
    }
}

/// Worst first in 64 bits: verdict (2 bits), then how soon the kernel
/// gives up (saturated at about 9 hours of ms), probes and retransmits
/// outstanding (6 bits each), then idle time (saturated at about 4 hours
/// of seconds, longest first).
fn worst(row: &Row) -> u64 {
    let c = &row.conn;
    let sev = u64::from(3 - row.verdict.severity().min(3));
    let gives_up = match gives_up_in(&row.verdict) {
        i64::MIN => 0,
        i64::MAX => (1 << 35) - 1,
        ms => (ms.max(0) as u64 + 1).min((1 << 35) - 2),
    };
    let probes = 63 - u64::from(c.probes_out.min(63));
    let retrans = 63 - u64::from(c.retransmits.min(63));
    let idle = (1 << 15) - 1 - (c.idle_ms() / 1000).min((1 << 15) - 1);
    sev << 62 | gives_up << 27 | probes << 21 | retrans << 15 | idle
}

fn sort_key(key: SortKey, row: &Row, owner_rank: &HashMap<(&str, u32), u64>) -> SortKeyOf {
    let c = &row.conn;
    let w = worst(row);
    let primary: u128 = match key {
        SortKey::Verdict => 0,
        SortKey::Probes => u128::from(u32::MAX - c.probes_out),
        SortKey::Retransmits => {
            u128::from(u32::MAX - c.retransmits) << 32 | u128::from(u32::MAX - c.total_retrans)
        }
        SortKey::Idle => u128::from(u64::MAX - c.idle_ms()),
        SortKey::Owner => c
            .owners
            .first()
            .and_then(|o| owner_rank.get(&(o.comm.as_str(), o.pid)))
            .map_or(u128::MAX, |&r| u128::from(r)),
        SortKey::Peer => ip_key(c.daddr),
        SortKey::Local => ip_key(c.saddr),
        SortKey::State => u128::from(state_rank(c.state)),
        SortKey::Timer => c.timer.map_or(u128::MAX, |t| {
            (i128::from(t.fires_in_ms) - i128::from(i64::MIN)) as u128
        }),
    };
    let secondary = match key {
        SortKey::Peer | SortKey::Local => {
            u64::from(if key == SortKey::Peer {
                c.dport
            } else {
                c.sport
            }) << 48
                | w >> 16
        }
        _ => w,
    };
    (primary, secondary, c.cookie)
}

/// Position of a state's name in alphabetical order.
fn state_rank(state: u32) -> u8 {
    let name = state_name(state);
    (1..=13u32).filter(|&s| state_name(s) < name).count() as u8
}

#[derive(Clone, Debug)]
pub struct App {
    pub view: View,
    /// Where `Esc` goes back to from a detail view.
    pub back_to: View,
    pub mode: Mode,
    pub query: Query,
    /// The filter as typed.
    pub query_text: String,
    pub sort: SortKey,
    pub reverse: bool,
    /// Index of the selected connection in [`App::order`].
    pub selected: usize,
    /// First row shown.
    pub offset: usize,
    /// The selected connection, kept across re-sorts and refreshes.
    pub selected_cookie: Option<u64>,
    /// Selected event in the filtered log; `None`: follow the newest.
    pub event_selected: Option<usize>,
    pub event_offset: usize,
    /// Lines the detail view's timeline is scrolled up from its newest.
    pub detail_scroll: usize,
    /// Display frozen at this copy of the model (ingestion goes on).
    pub frozen: Option<Box<Model>>,
    pub show_closed: bool,
    /// Rows the body can show, set by the renderer.
    pub page: usize,
    pub quit: bool,
    /// Cookies of the connections shown, in display order; live ones
    /// first, then (with `c`) the recently closed, newest first.
    pub order: Vec<u64>,
    /// How many of `order` are live.
    pub live_shown: usize,
    /// Indexes into the model's log of the events shown, oldest first.
    pub events: Vec<usize>,
}

impl Default for App {
    fn default() -> Self {
        App {
            view: View::Connections,
            back_to: View::Connections,
            mode: Mode::Normal,
            query: Query::default(),
            query_text: String::new(),
            sort: SortKey::Verdict,
            reverse: false,
            selected: 0,
            offset: 0,
            selected_cookie: None,
            event_selected: None,
            event_offset: 0,
            detail_scroll: 0,
            frozen: None,
            show_closed: false,
            page: 20,
            quit: false,
            order: Vec::new(),
            live_shown: 0,
            events: Vec::new(),
        }
    }
}

impl App {
    pub fn paused(&self) -> bool {
        self.frozen.is_some()
    }

    /// The model to show: the frozen copy while paused, else the live one.
    pub fn shown<'a>(&'a self, live: &'a Model) -> &'a Model {
        self.frozen.as_deref().unwrap_or(live)
    }

    /// Whether a live row passes the filter (listeners only on request).
    pub fn visible(&self, row: &Row) -> bool {
        if row.conn.state == TCP_LISTEN && !self.query.wants_state(TCP_LISTEN) {
            return false;
        }
        let words = [row.verdict.reason_code()];
        self.query.matches(&subject(row, &words))
    }

    pub fn event_visible(&self, e: &LogEntry) -> bool {
        if self.query.is_empty() {
            return true;
        }
        let words = [e.what, e.text.as_str()];
        match &e.conn {
            Some(c) => self.query.matches(&Subject {
                saddr: Some(c.saddr),
                sport: c.sport,
                daddr: Some(c.daddr),
                dport: c.dport,
                state: c.state,
                owners: &c.owners,
                verdict: e.verdict,
                words: &words,
            }),
            // Lost records concern every connection.
            None => true,
        }
    }

    /// Recomputes what is shown (filter, sort) from the model and keeps
    /// the selection on the same connection.
    pub fn sync(&mut self, live: &Model) {
        let m = self.shown(live);
        // The table is sorted only when it is what is shown.
        let table = (self.view == View::Connections).then(|| {
            let owner_rank = if self.sort == SortKey::Owner {
                let mut owners: Vec<(&str, u32)> = m
                    .rows
                    .values()
                    .chain(m.closed.iter().map(|c| &c.row))
                    .filter_map(|r| r.conn.owners.first())
                    .map(|o| (o.comm.as_str(), o.pid))
                    .collect();
                owners.sort_unstable();
                owners.dedup();
                owners
                    .into_iter()
                    .enumerate()
                    .map(|(i, o)| (o, i as u64))
                    .collect()
            } else {
                HashMap::new()
            };
            let key = self.sort;
            let mut rows: Vec<(SortKeyOf, u64)> = m
                .rows
                .values()
                .filter(|r| self.visible(r))
                .map(|r| (sort_key(key, r, &owner_rank), r.conn.cookie))
                .collect();
            rows.sort_unstable();
            if self.reverse {
                rows.reverse();
            }
            let mut order: Vec<u64> = rows.into_iter().map(|(_, c)| c).collect();
            let live_shown = order.len();
            if self.show_closed {
                order.extend(
                    m.closed
                        .iter()
                        .rev()
                        .filter(|c| self.visible(&c.row))
                        .map(|c| c.row.conn.cookie),
                );
            }
            (order, live_shown)
        });
        let events: Vec<usize> = m
            .log
            .iter()
            .enumerate()
            .filter(|(_, e)| self.event_visible(e))
            .map(|(i, _)| i)
            .collect();
        if let Some((order, live_shown)) = table {
            self.order = order;
            self.live_shown = live_shown;
        }
        self.events = events;
        self.reselect();
    }

    /// Puts the selection back on the selected connection, or keeps the
    /// position when it is gone.
    fn reselect(&mut self) {
        if let Some(cookie) = self.selected_cookie
            && let Some(i) = self.order.iter().position(|&c| c == cookie)
        {
            self.selected = i;
        }
        self.clamp();
    }

    /// Keeps the selection on the page after the page size changed.
    pub fn sync_page(&mut self) {
        self.clamp();
    }

    fn clamp(&mut self) {
        let n = self.order.len();
        self.selected = self.selected.min(n.saturating_sub(1));
        self.selected_cookie = self.order.get(self.selected).copied();
        let page = self.page.max(1);
        if self.selected < self.offset {
            self.offset = self.selected;
        } else if self.selected >= self.offset + page {
            self.offset = self.selected + 1 - page;
        }
        self.offset = self.offset.min(n.saturating_sub(page));
        if let Some(i) = self.event_selected
            && i >= self.events.len()
        {
            self.event_selected = None;
        }
    }

    /// Handles one key; the model is needed for what the key selects.
    pub fn key(&mut self, key: Key, live: &Model) {
        if matches!(key, Key::Ctrl('c')) {
            self.quit = true;
            return;
        }
        match self.mode.clone() {
            Mode::Help => match key {
                Key::Char('q') => self.quit = true,
                _ => self.mode = Mode::Normal,
            },
            Mode::Filter { input, .. } => self.filter_key(key, input, live),
            Mode::Normal => self.normal_key(key, live),
        }
    }

    fn filter_key(&mut self, key: Key, mut input: String, live: &Model) {
        match key {
            Key::Esc => {
                self.mode = Mode::Normal;
                self.set_query(String::new(), Query::default(), live);
                return;
            }
            Key::Enter => {
                if let Ok(q) = Query::parse(&input) {
                    self.mode = Mode::Normal;
                    self.set_query(input, q, live);
                }
                return;
            }
            Key::Backspace => {
                input.pop();
            }
            Key::Char(c) => input.push(c),
            _ => return,
        }
        // Filters as you type; a half-typed term keeps the last good filter.
        let error = match Query::parse(&input) {
            Ok(q) => {
                self.set_query(input.clone(), q, live);
                None
            }
            Err(e) => Some(e),
        };
        self.mode = Mode::Filter { input, error };
    }

    fn set_query(&mut self, text: String, q: Query, live: &Model) {
        self.query_text = text;
        self.query = q;
        self.selected = 0;
        self.offset = 0;
        self.selected_cookie = None;
        self.sync(live);
        self.selected_cookie = self.order.first().copied();
    }

    fn normal_key(&mut self, key: Key, live: &Model) {
        match key {
            Key::Char('q') => self.quit = true,
            Key::Char('?') | Key::Char('h') => self.mode = Mode::Help,
            Key::Char('/') => {
                self.mode = Mode::Filter {
                    input: self.query_text.clone(),
                    error: None,
                }
            }
            Key::Char('s') => {
                self.sort = self.sort.next();
                self.reverse = false;
                self.sync(live);
            }
            Key::Char('S') => {
                self.reverse = !self.reverse;
                self.sync(live);
            }
            Key::Char(' ') => {
                self.frozen = match self.frozen {
                    Some(_) => None,
                    None => Some(Box::new(live.clone())),
                };
                self.sync(live);
            }
            Key::Char('c') => {
                self.show_closed = !self.show_closed;
                self.sync(live);
            }
            Key::Tab | Key::BackTab => {
                self.view = match self.view {
                    View::Connections => View::Events,
                    View::Events | View::Detail(_) => View::Connections,
                };
                self.back_to = self.view;
            }
            Key::Esc => match self.view {
                View::Detail(_) => self.view = self.back_to,
                _ if !self.query.is_empty() => {
                    self.set_query(String::new(), Query::default(), live)
                }
                _ => {}
            },
            Key::Enter => match self.view {
                View::Connections => {
                    if let Some(&cookie) = self.order.get(self.selected) {
                        self.back_to = View::Connections;
                        self.detail_scroll = 0;
                        self.view = View::Detail(cookie);
                    }
                }
                View::Events => {
                    let m = self.shown(live);
                    let i = self
                        .event_selected
                        .or_else(|| self.events.len().checked_sub(1));
                    if let Some(cookie) = i
                        .and_then(|i| self.events.get(i))
                        .and_then(|&li| m.log.get(li))
                        .map(|e| e.cookie)
                        .filter(|&c| c != 0)
                    {
                        self.back_to = View::Events;
                        self.detail_scroll = 0;
                        self.view = View::Detail(cookie);
                    }
                }
                View::Detail(_) => {}
            },
            Key::Up | Key::Char('k') => self.move_by(-1),
            Key::Down | Key::Char('j') => self.move_by(1),
            Key::PageUp => self.move_by(-(self.page.max(1) as i64)),
            Key::PageDown => self.move_by(self.page.max(1) as i64),
            Key::Home | Key::Char('g') => self.move_to(Some(0)),
            Key::End | Key::Char('G') => self.move_to(None),
            _ => {}
        }
    }

    fn move_by(&mut self, delta: i64) {
        match self.view {
            View::Connections => {
                let i = (self.selected as i64 + delta).max(0) as usize;
                self.selected = i;
                self.selected_cookie = None;
                self.clamp();
            }
            View::Events => {
                let n = self.events.len();
                if n == 0 {
                    return;
                }
                let cur = self.event_selected.unwrap_or(n - 1) as i64;
                let i = (cur + delta).clamp(0, n as i64 - 1) as usize;
                // Back at the newest: follow again.
                self.event_selected = (i + 1 < n).then_some(i);
            }
            // The timeline is scrolled up from its newest line.
            View::Detail(_) => {
                self.detail_scroll = (self.detail_scroll as i64 - delta).max(0) as usize;
            }
        }
    }

    /// `Some(0)`: the first line; `None`: the last.
    fn move_to(&mut self, at: Option<usize>) {
        match self.view {
            View::Connections => {
                self.selected = at.unwrap_or(usize::MAX);
                self.selected_cookie = None;
                self.clamp();
            }
            View::Events => {
                self.event_selected = match at {
                    Some(i) if i + 1 < self.events.len() => Some(i),
                    _ => None,
                };
            }
            View::Detail(_) => {
                self.detail_scroll = match at {
                    Some(_) => usize::MAX / 2,
                    None => 0,
                }
            }
        }
    }

    /// The first event line shown and the selected one, for `rows` lines.
    pub fn event_window(&mut self, rows: usize) -> (usize, usize) {
        let n = self.events.len();
        let rows = rows.max(1);
        let sel = self.event_selected.unwrap_or(n.saturating_sub(1));
        if self.event_selected.is_none() {
            self.event_offset = n.saturating_sub(rows);
        } else if sel < self.event_offset {
            self.event_offset = sel;
        } else if sel >= self.event_offset + rows {
            self.event_offset = sel + 1 - rows;
        }
        self.event_offset = self.event_offset.min(n.saturating_sub(rows));
        (self.event_offset, sel)
    }
}

#[cfg(test)]
mod tests {
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
        c.state = TCP_CLOSE_WAIT;
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
        c.state = TCP_LISTEN;
        c.sport = 8080;
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
                .filter(|r| r.conn.cookie != 3)
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
}
