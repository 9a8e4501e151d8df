//! Golden test of every JSON record the tool writes (events, verdict
//! changes, lost records, connection rows): the schema in docs/events.md
//! must not move by a byte when the serialisation code is reorganised.
//! `KEEPALIVE_BLESS=1 cargo test golden` rewrites the expected file.

use std::net::IpAddr;

use keepalive_common::ConnStats;

use crate::events::{Detail, Event, Owner, TimeoutCause};
use crate::table::conn_table::VerdictChange;
use crate::table::verdict::{Dead, Orphaned, Unprotected, Verdict};
use crate::table::{Conn, ConnId, Keepalive, Timer, TimerKind};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/records.jsonl");

pub(crate) fn fixture_events() -> Vec<Event> {
    let v4 = |s: &str| -> IpAddr { s.parse().unwrap() };
    let owner = Some(Owner {
        pid: 4242,
        comm: "psql \"x\"\u{1b}".into(),
    });
    let base = |cookie: u64, owner: Option<Owner>, detail: Detail| Event {
        ts_mono_ns: 1_000_000_000 + cookie * 1_234_567,
        cookie,
        netns: 4026531840,
        saddr: v4("198.18.0.1"),
        sport: 40000 + cookie as u16,
        daddr: v4("198.18.0.2"),
        dport: 5432,
        state: 1,
        owner,
        detail,
    };
    let mut evs = vec![
        base(
            1,
            owner.clone(),
            Detail::Retransmit {
                segs: 1,
                syn: false,
                synack: false,
                err: 0,
            },
        ),
        base(
            2,
            None,
            Detail::Retransmit {
                segs: 3,
                syn: true,
                synack: false,
                err: -11,
            },
        ),
        base(
            3,
            owner.clone(),
            Detail::ResetSent {
                reason: Some("NOT_SPECIFIED".into()),
                no_socket: false,
            },
        ),
        base(
            4,
            None,
            Detail::ResetSent {
                reason: None,
                no_socket: true,
            },
        ),
        base(5, None, Detail::ResetReceived),
        base(6, owner.clone(), Detail::StateChange { old: 2, new: 1 }),
        base(7, None, Detail::StateChange { old: 1, new: 7 }),
        base(8, None, Detail::KeepaliveProbe { probe: 2 }),
        base(
            9,
            None,
            Detail::Timeout {
                cause: TimeoutCause::Keepalive,
                probes_out: 3,
                user_timeout_ms: 0,
            },
        ),
        base(
            10,
            owner.clone(),
            Detail::Timeout {
                cause: TimeoutCause::UserTimeout,
                probes_out: 0,
                user_timeout_ms: 5000,
            },
        ),
        base(
            11,
            None,
            Detail::Timeout {
                cause: TimeoutCause::Retransmission,
                probes_out: 0,
                user_timeout_ms: 0,
            },
        ),
    ];
    let mut v6 = base(12, owner, Detail::KeepaliveProbe { probe: 1 });
    v6.saddr = "fd00::1".parse().unwrap();
    v6.daddr = "fd00::2".parse().unwrap();
    evs.push(v6);
    // A listener's SYN-ACK sent again: the request socket has no cookie.
    let mut synack = base(
        13,
        None,
        Detail::Retransmit {
            segs: 1,
            syn: true,
            synack: true,
            err: 0,
        },
    );
    synack.cookie = 0;
    synack.state = 12;
    (synack.saddr, synack.daddr) = (synack.daddr, synack.saddr);
    (synack.sport, synack.dport) = (synack.dport, synack.sport);
    evs.push(synack);
    evs
}

pub(crate) fn fixture_conns() -> Vec<(Conn, Verdict)> {
    let base = Conn {
        id: ConnId {
            cookie: 77,
            netns: 4026531840,
            saddr: Some("10.0.0.1".parse().unwrap()),
            sport: 50000,
            daddr: Some("10.0.0.2".parse().unwrap()),
            dport: 443,
            state: 1,
        },
        ino: 12345,
        kernel_orphan: false,
        owners: vec![
            Owner {
                pid: 1,
                comm: "app".into(),
            },
            Owner {
                pid: 2,
                comm: "app-child".into(),
            },
        ],
        keepalive: Keepalive {
            enabled: true,
            idle_ms: 30_000,
            intvl_ms: 10_000,
            probes: 5,
        },
        probes_out: 1,
        retransmits: 0,
        backoff: 0,
        total_retrans: 4,
        user_timeout_ms: 0,
        rto_ms: 204,
        retries2: 15,
        last_send_ms: 1200,
        last_recv_ms: 3400,
        last_ack_ms: 3400,
        recv_queue: 0,
        send_queue: 17,
        timer: Some(Timer {
            kind: TimerKind::Keepalive,
            fires_in_ms: 8123,
        }),
        stats: Some(ConnStats {
            probes: 3,
            retransmit_segs: 4,
            resets_sent: 0,
            resets_received: 1,
            timeouts: 0,
            ..Default::default()
        }),
        timed_out: None,
        full: true,
    };
    let mut v6 = base.clone();
    v6.id.cookie = 78;
    v6.id.saddr = Some("fd00::1".parse().unwrap());
    v6.id.daddr = None;
    v6.owners.clear();
    v6.kernel_orphan = true;
    v6.timer = None;
    v6.stats = None;
    v6.id.state = 5;
    vec![
        (
            base.clone(),
            Verdict::Dead(Dead::ProbesUnanswered {
                unanswered_probes: 1,
                probes: 5,
                gives_up_in_ms: 40_000,
            }),
        ),
        (
            base.clone(),
            Verdict::Dead(Dead::RetransmitBackoff {
                retransmits: 4,
                since_last_ack_ms: Some(9000),
                gives_up_in_ms: 90_000,
            }),
        ),
        (
            base.clone(),
            Verdict::Dead(Dead::TimedOut {
                cause: TimeoutCause::Keepalive,
            }),
        ),
        (
            v6.clone(),
            Verdict::Orphaned(Orphaned::Kernel {
                state: 5,
                waiting_for: "the peer's FIN",
                idle_ms: 1500,
            }),
        ),
        (
            base.clone(),
            Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms: 61_000 }),
        ),
        (
            base.clone(),
            Verdict::Orphaned(Orphaned::NoOwner { idle_ms: 5 }),
        ),
        (
            base.clone(),
            Verdict::Unprotected(Unprotected::KeepaliveOff { idle_ms: 70_000 }),
        ),
        (
            base.clone(),
            Verdict::Unprotected(Unprotected::KeepaliveTooLate {
                idle_ms: 70_000,
                keepalive_idle_ms: 7_200_000,
                middlebox_idle_ms: 350_000,
            }),
        ),
        (v6, Verdict::Healthy),
    ]
}

/// Every record, one per line: JSON then text.
fn render_all() -> String {
    use super::Clock;
    use super::json::{EventOut, LostOut, RowOut, VerdictOut, write_line};
    use super::text::{event_text, lost_text, table_lines, verdict_text};
    use crate::table::walk::Row;
    let clock = Clock::fixed(1_764_000_000_000_000_000);
    let mut out = Vec::new();
    let text = |out: &mut Vec<u8>, l: String| {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    };
    for e in fixture_events() {
        write_line(&mut out, &EventOut::new(&e, &clock)).unwrap();
        text(&mut out, event_text(&e, &clock));
    }
    let conns = fixture_conns();
    for (i, (conn, verdict)) in conns.iter().enumerate() {
        let ch = VerdictChange {
            conn: conn.clone(),
            old: conns[(i + 1) % conns.len()].1.clone(),
            new: verdict.clone(),
        };
        let ts = 5_000_000_000 + i as u64;
        write_line(&mut out, &VerdictOut::new(&ch, ts, &clock)).unwrap();
        text(&mut out, verdict_text(&ch, ts, &clock));
        let row = Row {
            conn: conn.clone(),
            verdict: verdict.clone(),
        };
        write_line(&mut out, &RowOut::new(&row)).unwrap();
    }
    let rows: Vec<Row> = conns
        .into_iter()
        .map(|(conn, verdict)| Row { conn, verdict })
        .collect();
    let refs: Vec<&Row> = rows.iter().collect();
    for l in table_lines(&refs) {
        text(&mut out, l);
    }
    write_line(&mut out, &LostOut::new(17, 40, 6_000_000_000, &clock)).unwrap();
    text(&mut out, lost_text(17, 40, 6_000_000_000, &clock));
    String::from_utf8(out).unwrap()
}

#[test]
fn golden_records_are_unchanged() {
    let got = render_all();
    if std::env::var_os("KEEPALIVE_BLESS").is_some() {
        std::fs::write(GOLDEN, &got).unwrap();
    }
    let want = std::fs::read_to_string(GOLDEN).expect("golden file (bless with KEEPALIVE_BLESS=1)");
    for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {} differs", i + 1);
    }
    assert_eq!(got.lines().count(), want.lines().count());
}
