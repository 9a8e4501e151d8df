//! Unit tests of the UI model in [`super`], and the `conn`/`event` builders other top tests share.

use super::*;
use crate::table::verdict::Dead;
use crate::table::{ConnId, Keepalive, TCP_ESTABLISHED};

pub fn conn(cookie: u64, dport: u16) -> Conn {
    Conn {
        id: ConnId {
            cookie,
            netns: 4026531840,
            saddr: Some("198.18.7.1".parse().unwrap()),
            sport: 40000 + cookie as u16,
            daddr: Some("198.18.7.2".parse().unwrap()),
            dport,
            state: TCP_ESTABLISHED,
        },
        full: true,
        ino: cookie,
        owners: vec![Owner {
            pid: 1000 + cookie as u32,
            comm: "app".into(),
        }],
        keepalive: Keepalive {
            enabled: true,
            idle_ms: 1000,
            intvl_ms: 1000,
            probes: 5,
        },
        ..Conn::default()
    }
}

pub fn event(cookie: u64, ts_s: u64, detail: Detail) -> Event {
    let c = conn(cookie, 80);
    Event {
        ts_mono_ns: ts_s * NS,
        cookie,
        netns: c.id.netns,
        saddr: c.id.saddr.unwrap(),
        sport: c.id.sport,
        daddr: c.id.daddr.unwrap(),
        dport: c.id.dport,
        state: TCP_ESTABLISHED,
        owner: None,
        detail,
    }
}

fn model() -> Model {
    let mut m = Model::new(Host::default(), Clock::fixed(0), 2000);
    m.apply(Update::Started {
        rows: vec![
            (conn(1, 80), Verdict::Healthy),
            (conn(2, 443), Verdict::Healthy),
        ],
        hooks: 7,
        mono_ns: 100 * NS,
    });
    m
}

#[test]
fn history_counts_per_second_and_rates_complete_seconds() {
    let mut h = History::default();
    h.count(Series::Probes, 10 * NS, 1);
    h.count(Series::Probes, 10 * NS + 5, 1);
    h.count(Series::Probes, 12 * NS, 3);
    h.count(Series::Resets, 12 * NS, 1);
    // Second 12 is still filling.
    assert_eq!(h.recent(Series::Probes, 10), vec![2, 0]);
    h.advance(13);
    assert_eq!(h.recent(Series::Probes, 10), vec![2, 0, 3]);
    assert_eq!(h.recent(Series::Probes, 1), vec![3]);
    assert_eq!(h.rate(Series::Probes), 5.0 / 3.0);
    assert_eq!(h.rate(Series::Resets), 1.0 / 3.0);
    // A late event for a second still in the window counts there.
    h.count(Series::Timeouts, 11 * NS, 1);
    assert_eq!(h.recent(Series::Timeouts, 10), vec![0, 1, 0]);
}

#[test]
fn history_is_bounded() {
    let mut h = History::default();
    for s in 0..1000u64 {
        h.count(Series::Retransmits, s * NS, 1);
    }
    assert_eq!(h.buckets.len(), HISTORY_SECS);
    assert_eq!(h.recent(Series::Retransmits, 1000).len(), HISTORY_SECS - 1);
    // A jump far ahead leaves only zeros.
    h.advance(100_000);
    assert!(h.recent(Series::Retransmits, 1000).iter().all(|&v| v == 0));
    // An event older than the window is ignored, not misplaced.
    h.count(Series::Retransmits, 5 * NS, 1);
    assert!(h.recent(Series::Retransmits, 1000).iter().all(|&v| v == 0));
}

#[test]
fn events_feed_log_timeline_and_totals() {
    let mut m = model();
    m.apply(Update::Event(event(
        1,
        101,
        Detail::KeepaliveProbe { probe: 1 },
    )));
    m.apply(Update::Event(event(
        1,
        102,
        Detail::KeepaliveProbe { probe: 2 },
    )));
    m.apply(Update::Event(event(
        2,
        102,
        Detail::Retransmit {
            segs: 2,
            syn: false,
            synack: false,
            err: 0,
        },
    )));
    assert_eq!(m.seen, [2, 2, 0, 0]);
    assert_eq!(m.log.len(), 3);
    assert_eq!(m.log[1].text, "keepalive probe 2 (1 unanswered)");
    // The owner comes from the table when the event has none.
    assert_eq!(m.log[0].conn.as_ref().unwrap().owners[0].pid, 1001);
    let t: Vec<_> = m.timelines[&1].iter().map(|x| x.text.as_str()).collect();
    assert_eq!(t, ["keepalive probe 1", "keepalive probe 2 (1 unanswered)"]);
}

#[test]
fn log_and_timelines_are_bounded() {
    let mut m = model();
    for i in 0..(LOG_CAP as u64 + 10) {
        m.apply(Update::Event(event(
            1,
            100 + i / 1000,
            Detail::KeepaliveProbe { probe: 1 },
        )));
    }
    assert_eq!(m.log.len(), LOG_CAP);
    assert_eq!(m.timelines[&1].len(), TIMELINE_CAP);
}

#[test]
fn verdict_changes_update_the_row_and_the_log() {
    let mut m = model();
    let mut c = conn(1, 80);
    c.probes_out = 1;
    let dead = Verdict::Dead(Dead::ProbesUnanswered {
        unanswered_probes: 1,
        probes: 5,
        gives_up_in_ms: 4000,
    });
    m.apply(Update::Verdict {
        change: VerdictChange {
            conn: c,
            old: Verdict::Healthy,
            new: dead.clone(),
        },
        mono_ns: 103 * NS,
    });
    assert_eq!(m.rows[&1].verdict, dead);
    assert_eq!(m.rows[&1].conn.probes_out, 1);
    let last = m.log.back().unwrap();
    assert_eq!(last.what, "verdict");
    assert_eq!(last.verdict, Some("dead"));
    assert!(
        last.text.starts_with("healthy -> dead: 1 of 5"),
        "{}",
        last.text
    );
    assert_eq!(m.by_verdict(|_| true), [1, 0, 0, 1]);
}

#[test]
fn close_after_timeout_keeps_how_it_ended() {
    let mut m = model();
    m.apply(Update::Event(event(
        1,
        110,
        Detail::Timeout {
            cause: TimeoutCause::Keepalive,
            probes_out: 5,
            user_timeout_ms: 0,
        },
    )));
    m.apply(Update::Event(event(
        1,
        110,
        Detail::StateChange {
            old: TCP_ESTABLISHED,
            new: TCP_CLOSE,
        },
    )));
    assert!(!m.rows.contains_key(&1));
    let c = m.closed_row(1).unwrap();
    assert_eq!(
        c.ending,
        Ending::TimedOut {
            cause: TimeoutCause::Keepalive,
            probes_out: 5
        }
    );
    assert_eq!(
        c.ending.describe(),
        "timed out: 5 keepalive probes unanswered (ETIMEDOUT)"
    );
    assert_eq!(c.closed_ns, 110 * NS);
}

#[test]
fn timeout_reported_after_the_close_still_counts() {
    let mut m = model();
    m.apply(Update::Event(event(
        2,
        110,
        Detail::StateChange {
            old: TCP_ESTABLISHED,
            new: TCP_CLOSE,
        },
    )));
    assert_eq!(
        m.closed_row(2).unwrap().ending,
        Ending::Closed {
            from: TCP_ESTABLISHED
        }
    );
    m.apply(Update::Event(event(
        2,
        110,
        Detail::Timeout {
            cause: TimeoutCause::Retransmission,
            probes_out: 0,
            user_timeout_ms: 0,
        },
    )));
    assert_eq!(
        m.closed_row(2).unwrap().ending.describe(),
        "timed out: retransmissions unanswered (ETIMEDOUT)"
    );
}

#[test]
fn reset_then_close_ends_as_reset() {
    let mut m = model();
    m.apply(Update::Event(event(1, 105, Detail::ResetReceived)));
    m.apply(Update::Event(event(
        1,
        105,
        Detail::StateChange {
            old: TCP_ESTABLISHED,
            new: TCP_CLOSE,
        },
    )));
    assert_eq!(m.closed_row(1).unwrap().ending, Ending::ResetReceived);
}

#[test]
fn a_walk_that_misses_a_connection_closes_it_and_closed_ones_expire() {
    let mut m = model();
    m.tick(120 * NS);
    m.apply(Update::Table {
        rows: vec![(conn(2, 443), Verdict::Healthy)],
    });
    assert_eq!(m.rows.len(), 1);
    let c = m.closed_row(1).unwrap();
    assert_eq!(c.ending, Ending::Vanished);
    assert_eq!(c.closed_ns, 120 * NS);
    m.tick(120 * NS + CLOSED_KEEP_NS - 1);
    assert!(m.closed_row(1).is_some());
    m.tick(120 * NS + CLOSED_KEEP_NS + 1);
    assert!(m.closed_row(1).is_none());
}

#[test]
fn lost_events_are_counted_and_logged() {
    let mut m = model();
    m.apply(Update::Lost {
        count: 3,
        total: 3,
        mono_ns: 101 * NS,
    });
    m.apply(Update::Totals(Totals {
        lost: 5,
        ..Totals::default()
    }));
    assert_eq!(m.lost, 5);
    assert_eq!(m.log.back().unwrap().what, "lost");
}

#[test]
fn touched_rows_replace_the_table_view() {
    let mut m = model();
    let mut c = conn(1, 80);
    c.total_retrans = 9;
    m.apply(Update::Rows(vec![(c, Verdict::Healthy)]));
    assert_eq!(m.rows[&1].conn.total_retrans, 9);
}
