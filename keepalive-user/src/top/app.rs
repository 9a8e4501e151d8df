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

mod sort;

pub use sort::SortKey;
use sort::{SortKeyOf, sort_key};

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
        saddr: c.id.saddr,
        sport: c.id.sport,
        daddr: c.id.daddr,
        dport: c.id.dport,
        state: c.id.state,
        owners: &c.owners,
        verdict: Some(row.verdict.name()),
        words,
    }
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
        if row.conn.id.state == TCP_LISTEN && !self.query.wants_state(TCP_LISTEN) {
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
                .map(|r| (sort_key(key, r, &owner_rank), r.conn.id.cookie))
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
                        .map(|c| c.row.conn.id.cookie),
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
#[path = "app_tests.rs"]
mod tests;
