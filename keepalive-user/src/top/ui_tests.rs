//! Snapshot tests of every `keepalive top` screen, drawn on ratatui's
//! `TestBackend` from constructed states (snapshots in `snapshots/`).

use keepalive_common::ConnStats;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::style::{Color, Modifier};

use super::app::{App, Key};
use super::model::{Host, Model, Totals, Update};
use super::ui::{Theme, draw, dur, sparkline, truncate};
use crate::events::{Detail, Event, Owner, TimeoutCause};
use crate::output::Clock;
use crate::table::conn_table::VerdictChange;
use crate::table::verdict::{Dead, Orphaned, Unprotected, Verdict};
use crate::table::{Conn, ConnId, Keepalive, TCP_CLOSE_WAIT, TCP_ESTABLISHED, Timer, TimerKind};

const NS: u64 = 1_000_000_000;
const T0: u64 = 1_000 * NS;

fn conn(cookie: u64, peer: &str, dport: u16, comm: &str) -> Conn {
    Conn {
        id: ConnId {
            cookie,
            netns: 4026531840,
            saddr: Some(if peer.contains(':') {
                "fd00:ca:7::1".parse().unwrap()
            } else {
                "10.0.0.5".parse().unwrap()
            }),
            sport: 50_000 + cookie as u16,
            daddr: Some(peer.parse().unwrap()),
            dport,
            state: TCP_ESTABLISHED,
        },
        full: true,
        ino: 9000 + cookie,
        owners: vec![Owner {
            pid: 300 + cookie as u32,
            comm: comm.into(),
        }],
        keepalive: Keepalive {
            enabled: true,
            idle_ms: 60_000,
            intvl_ms: 10_000,
            probes: 5,
        },
        rto_ms: 204,
        retries2: 15,
        last_send_ms: 3_000 * cookie,
        last_recv_ms: 3_000 * cookie,
        last_ack_ms: 3_000 * cookie,
        ..Conn::default()
    }
}

fn ev(c: &Conn, ts: u64, detail: Detail) -> Event {
    Event {
        ts_mono_ns: ts,
        cookie: c.id.cookie,
        netns: c.id.netns,
        saddr: c.id.saddr.unwrap(),
        sport: c.id.sport,
        daddr: c.id.daddr.unwrap(),
        dport: c.id.dport,
        state: c.id.state,
        owner: c.owners.first().cloned(),
        detail,
    }
}

/// A host with a dead database connection probing, a dead one
/// retransmitting, a CLOSE_WAIT leak, one without keepalive, healthy ones,
/// one IPv6, and one that timed out and closed.
fn model(lost: u64) -> Model {
    let mut m = Model::new(
        Host {
            hostname: "db-proxy-1".into(),
            kernel: "6.18.0-test".into(),
        },
        Clock::fixed(1_764_000_000 * NS as i128),
        2_000,
    );
    let mut rows = Vec::new();
    let mut probing = conn(1, "10.0.3.17", 5432, "pgbouncer");
    probing.keepalive = Keepalive {
        enabled: true,
        idle_ms: 1_000,
        intvl_ms: 1_000,
        probes: 5,
    };
    probing.probes_out = 3;
    probing.timer = Some(Timer {
        kind: TimerKind::Keepalive,
        fires_in_ms: 400,
    });
    probing.stats = Some(ConnStats {
        probes: 4,
        last_probe: 4,
        ..ConnStats::default()
    });
    let probing_v = Verdict::Dead(Dead::ProbesUnanswered {
        unanswered_probes: 3,
        probes: 5,
        gives_up_in_ms: 2_400,
    });
    rows.push((probing.clone(), probing_v.clone()));
    let mut rtx = conn(2, "10.0.9.2", 443, "envoy");
    rtx.retransmits = 6;
    rtx.backoff = 6;
    rtx.total_retrans = 11;
    rtx.last_ack_ms = 25_000;
    rtx.timer = Some(Timer {
        kind: TimerKind::Retransmit,
        fires_in_ms: 12_800,
    });
    rows.push((
        rtx.clone(),
        Verdict::Dead(Dead::RetransmitBackoff {
            retransmits: 6,
            since_last_ack_ms: Some(25_000),
            gives_up_in_ms: 700_000,
        }),
    ));
    let mut leak = conn(3, "10.0.4.8", 8080, "java");
    leak.id.state = TCP_CLOSE_WAIT;
    leak.keepalive.enabled = false;
    rows.push((
        leak,
        Verdict::Orphaned(Orphaned::CloseWaitLeak { idle_ms: 94_000 }),
    ));
    let mut off = conn(4, "10.0.4.9", 6379, "redis-cli");
    off.keepalive.enabled = false;
    off.last_recv_ms = 612_000;
    off.last_send_ms = 612_000;
    rows.push((
        off,
        Verdict::Unprotected(Unprotected::KeepaliveOff { idle_ms: 612_000 }),
    ));
    rows.push((conn(5, "10.0.3.18", 5432, "pgbouncer"), Verdict::Healthy));
    rows.push((
        conn(6, "fd00:ca:7::2", 9000, "grpc-server"),
        Verdict::Healthy,
    ));
    let mut ka = conn(7, "10.0.3.19", 5432, "pgbouncer");
    ka.timer = Some(Timer {
        kind: TimerKind::Keepalive,
        fires_in_ms: 38_000,
    });
    rows.push((ka, Verdict::Healthy));
    let gone = conn(8, "10.0.7.7", 5672, "celery");
    rows.push((gone.clone(), Verdict::Healthy));
    m.apply(Update::Started {
        rows,
        hooks: 7,
        mono_ns: T0,
    });
    // The probing connection: four probes a second apart, then dead.
    for p in 1..=4u32 {
        m.apply(Update::Event(ev(
            &probing,
            T0 + (56 + p as u64) * NS,
            Detail::KeepaliveProbe { probe: p },
        )));
    }
    m.apply(Update::Verdict {
        change: VerdictChange {
            conn: probing.clone(),
            old: Verdict::Healthy,
            new: probing_v,
        },
        mono_ns: T0 + 58 * NS + 5_000_000,
    });
    for i in 0..3u64 {
        m.apply(Update::Event(ev(
            &rtx,
            T0 + (40 + 8 * i) * NS,
            Detail::Retransmit {
                segs: 1,
                syn: false,
                synack: false,
                err: 0,
            },
        )));
    }
    // The celery connection timed out and closed.
    m.apply(Update::Event(ev(
        &gone,
        T0 + 50 * NS,
        Detail::Timeout {
            cause: TimeoutCause::Keepalive,
            probes_out: 9,
            user_timeout_ms: 0,
        },
    )));
    m.apply(Update::Event(ev(
        &gone,
        T0 + 50 * NS,
        Detail::StateChange { old: 1, new: 7 },
    )));
    m.apply(Update::Event(ev(&rtx, T0 + 59 * NS, Detail::ResetReceived)));
    if lost > 0 {
        m.apply(Update::Lost {
            count: lost,
            total: lost,
            mono_ns: T0 + 59 * NS,
        });
    }
    m.apply(Update::Totals(Totals {
        emitted: 12,
        received: 12,
        lost,
        evicted: 0,
        tracked: 7,
    }));
    m.tick(T0 + 61 * NS);
    m
}

fn render(app: &mut App, m: &Model, theme: Theme, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    app.sync(m);
    t.draw(|f| draw(f, app, m, &theme)).unwrap();
    t
}

const COLOR: Theme = Theme { color: true };

fn keys(app: &mut App, m: &Model, keys: &[Key]) {
    for &k in keys {
        app.key(k, m);
    }
}

#[test]
fn connections_wide() {
    let m = model(0);
    let mut app = App::default();
    let t = render(&mut app, &m, COLOR, 180, 16);
    insta::assert_snapshot!(t.backend());
}

#[test]
fn connections_narrow_80x24() {
    let m = model(0);
    let mut app = App::default();
    let t = render(&mut app, &m, COLOR, 80, 24);
    insta::assert_snapshot!(t.backend());
    // Every line fits: nothing wraps, the reason is cut with an ellipsis.
    let text = t.backend().to_string();
    assert!(text.contains('…'), "{text}");
}

#[test]
fn header_shows_lost_events_in_red() {
    let m = model(42);
    let mut app = App::default();
    let t = render(&mut app, &m, COLOR, 120, 6);
    insta::assert_snapshot!(t.backend());
    let buf = t.backend().buffer();
    let text: String = (0..120).map(|x| buf[(x, 1)].symbol().to_string()).collect();
    let at = text.find("lost 42").expect("lost count in the header") as u16;
    assert_eq!(buf[(at, 1)].fg, Color::Red);
    assert!(buf[(at, 1)].modifier.contains(Modifier::BOLD));
}

#[test]
fn rows_are_coloured_by_verdict_and_closed_ones_dimmed() {
    let m = model(0);
    let mut app = App::default();
    app.key(Key::Char('c'), &m);
    let t = render(&mut app, &m, COLOR, 180, 16);
    let buf = t.backend().buffer();
    let row_of = |word: &str| {
        (0..16u16)
            .find(|&y| {
                let line: String = (0..180).map(|x| buf[(x, y)].symbol().to_string()).collect();
                line.contains(word)
            })
            .unwrap_or_else(|| panic!("{word} not on screen"))
    };
    // Column 30 is inside the PEER column of every row.
    assert_eq!(buf[(30, row_of("envoy"))].fg, Color::Red);
    assert_eq!(buf[(30, row_of("java"))].fg, Color::Magenta);
    assert_eq!(buf[(30, row_of("redis-cli"))].fg, Color::Yellow);
    let celery = row_of("celery");
    assert!(buf[(30, celery)].modifier.contains(Modifier::DIM));
    insta::assert_snapshot!(t.backend());
}

#[test]
fn no_colour_keeps_weight_and_uses_no_colour() {
    let m = model(3);
    let mut app = App::default();
    app.key(Key::Char('c'), &m);
    let t = render(&mut app, &m, Theme { color: false }, 120, 16);
    let buf = t.backend().buffer();
    for y in 0..16 {
        for x in 0..120 {
            let c = &buf[(x, y)];
            assert_eq!(c.fg, Color::Reset, "colour at {x},{y}");
            assert_eq!(c.bg, Color::Reset, "colour at {x},{y}");
        }
    }
    // The selected (worst) row is reversed, dead rows are bold.
    assert!(buf[(0, 5)].modifier.contains(Modifier::REVERSED));
    assert!(buf[(0, 6)].modifier.contains(Modifier::BOLD));
    insta::assert_snapshot!(t.backend());
}

#[test]
fn detail_view_with_probe_timeline() {
    let m = model(0);
    let mut app = App::default();
    app.sync(&m);
    app.key(Key::Enter, &m);
    let t = render(&mut app, &m, COLOR, 120, 30);
    insta::assert_snapshot!(t.backend());
    let text = t.backend().to_string();
    for p in 1..=4 {
        assert!(text.contains(&format!("keepalive probe {p}")), "{text}");
    }
}

#[test]
fn detail_view_of_a_closed_connection_narrow() {
    let m = model(0);
    let mut app = App::default();
    app.sync(&m);
    keys(&mut app, &m, &[Key::Char('c'), Key::End, Key::Enter]);
    let t = render(&mut app, &m, COLOR, 80, 24);
    insta::assert_snapshot!(t.backend());
}

#[test]
fn events_view() {
    let m = model(5);
    let mut app = App::default();
    app.sync(&m);
    app.key(Key::Tab, &m);
    let t = render(&mut app, &m, COLOR, 140, 18);
    insta::assert_snapshot!(t.backend());
}

#[test]
fn help_overlay() {
    let m = model(0);
    let mut app = App::default();
    app.sync(&m);
    app.key(Key::Char('?'), &m);
    let t = render(&mut app, &m, COLOR, 100, 26);
    insta::assert_snapshot!(t.backend());
}

#[test]
fn filter_prompt_while_typing_and_with_an_error() {
    let m = model(0);
    let mut app = App::default();
    app.sync(&m);
    app.key(Key::Char('/'), &m);
    for c in "port:5432".chars() {
        app.key(Key::Char(c), &m);
    }
    let t = render(&mut app, &m, COLOR, 120, 12);
    insta::assert_snapshot!("filter_prompt_typing", t.backend());
    for c in " verdict:sick".chars() {
        app.key(Key::Char(c), &m);
    }
    let t = render(&mut app, &m, COLOR, 120, 12);
    insta::assert_snapshot!("filter_prompt_error", t.backend());
    // Applied, then shown in the footer.
    for _ in 0.." verdict:sick".len() {
        app.key(Key::Backspace, &m);
    }
    app.key(Key::Enter, &m);
    let t = render(&mut app, &m, COLOR, 120, 12);
    insta::assert_snapshot!("filter_applied", t.backend());
}

#[test]
fn paused_display_says_so() {
    let m = model(0);
    let mut app = App::default();
    app.sync(&m);
    app.key(Key::Char(' '), &m);
    let t = render(&mut app, &m, COLOR, 120, 4);
    assert!(t.backend().to_string().contains("PAUSED"));
}

#[test]
fn text_helpers() {
    assert_eq!(dur(4_200), "4.2s");
    assert_eq!(dur(42_000), "42s");
    assert_eq!(dur(123_000), "2m03s");
    assert_eq!(dur(3_720_000), "1h02m");
    assert_eq!(dur(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    assert_eq!(truncate("abcdef", 4), "abc…");
    assert_eq!(truncate("abc", 4), "abc");
    assert_eq!(truncate("abc", 0), "");
    assert_eq!(sparkline(&[0, 1, 7, 14], 6), "   ▁▄█");
    assert_eq!(sparkline(&[5, 5, 5], 2), "██");
    assert_eq!(sparkline(&[], 3), "   ");
}

/// `top --policy`: the model after the tuner loaded `policy.toml`, tuned
/// the pgbouncer connections with rule `postgres` (one of them a dry run of
/// rule `db-dry`), and took its values back from the redis one.
fn tuned_model() -> Model {
    use crate::tune::PolicyNotice;
    use crate::tune::report::{Action, Change, Source, Tuned};
    let mut m = model(0);
    m.apply(Update::Policy(PolicyNotice {
        action: "loaded",
        file: "/etc/keepalive/policy.toml".into(),
        rules: vec!["postgres".into(), "db-dry".into()],
        error: None,
        dry_run: false,
        enforce: false,
    }));
    let tuned = |cookie: u64, rule: &str, action: Action| {
        let c = m.rows[&cookie].conn.clone();
        Update::Tuned(Box::new(Tuned {
            ts_mono_ns: T0 + 60 * NS,
            id: ConnId { cookie, ..c.id },
            owner: c.owners.first().cloned(),
            action,
            source: Source::Existing,
            rule: rule.into(),
            changes: vec![Change {
                option: "idle_s",
                old: 7200.into(),
                new: 30.into(),
                old_from_sysctl: true,
                new_from_sysctl: false,
            }],
            kept: vec![],
            failed: vec![],
            evidence: None,
        }))
    };
    let updates = [
        tuned(1, "postgres", Action::Tuned),
        tuned(5, "postgres", Action::Tuned),
        tuned(7, "db-dry", Action::DryRun),
        tuned(4, "postgres", Action::Tuned),
        tuned(4, "postgres", Action::Restored),
    ];
    for u in updates {
        m.apply(u);
    }
    m
}

#[test]
fn with_a_policy_the_rule_column_says_which_rule_tuned_each_row() {
    let m = tuned_model();
    let mut app = App::default();
    let t = render(&mut app, &m, COLOR, 200, 14);
    insta::assert_snapshot!(t.backend());
    let text = t.backend().to_string();
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle}: {text}"))
            .to_string()
    };
    assert!(line("VERDICT").contains("RULE"));
    assert!(line("10.0.3.17:5432").contains("postgres"));
    assert!(line("10.0.3.19:5432").contains("db-dry (dry run)"));
    // Restored: no longer the rule's.
    assert!(!line("10.0.4.9:6379").contains("postgres"));
    // Without --policy there is no such column.
    let mut app = App::default();
    let plain = render(&mut app, &model(0), COLOR, 200, 14);
    assert!(!plain.backend().to_string().contains("RULE"));
}

#[test]
fn with_a_policy_the_detail_view_and_log_show_the_rule() {
    let m = tuned_model();
    let mut app = App::default();
    app.sync(&m);
    app.key(Key::Enter, &m);
    let t = render(&mut app, &m, COLOR, 120, 30);
    let text = t.backend().to_string();
    assert!(text.contains("tuned by rule postgres"), "{text}");
    let mut app = App::default();
    app.sync(&m);
    app.key(Key::Tab, &m);
    let t = render(&mut app, &m, COLOR, 160, 18);
    let text = t.backend().to_string();
    assert!(
        text.contains("tuned rule=postgres (existing) idle 7200s(sysctl)->30s"),
        "{text}"
    );
    assert!(text.contains("loaded /etc/keepalive/policy.toml rules=[postgres,db-dry]"));
}
