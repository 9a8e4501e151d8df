//! `keepalive snapshot` fields against the live kernel: queues, timers,
//! probes and retransmits against what `ss -tinoe` run in the same
//! namespace says about the same socket, keepalive settings against
//! `getsockopt` in the owning process, and `--all` TIME_WAIT rows.
//!
//! Every test makes its own namespaces and only looks at rows in them (by
//! the `netns` field or by port). Waits poll for the condition they need
//! and are bounded; child processes are killed on drop.

mod common;

use common::*;

// ---------------------------------------------------------------------
// 2. Fields against ss.

#[test]
fn queues_timers_probes_and_retransmits_agree_with_ss() {
    require_root();
    let s = Scenarios::build("ss");
    s.wait_until_judged();
    let (na, nb) = (s.pair.a.inode(), s.pair.b.inode());
    // One jiffy at HZ=100, twice: both sides truncate jiffies to ms.
    const SLACK: u64 = 20;

    // ss, snapshot, ss: a value that is the same in both ss runs must be
    // exactly what the snapshot says; a counter must lie between them.
    let mut attempt = 0;
    let (before, rows, after, gap) = loop {
        attempt += 1;
        let timed = |ns: &Netns| {
            let t = Instant::now();
            (t, ss(ns), Instant::now())
        };
        let (b_a, b_b) = (timed(&s.pair.a), timed(&s.pair.b));
        let rows = snapshot(&[]);
        let (a_a, a_b) = (timed(&s.pair.a), timed(&s.pair.b));
        // Least and most time between the two ss runs, per namespace.
        let gap = [(&b_a, &a_a), (&b_b, &a_b)].map(|(b, a)| {
            (
                a.0.duration_since(b.2).as_millis() as u64,
                a.2.duration_since(b.0).as_millis() as u64,
            )
        });
        let (before, after) = ([b_a.1, b_b.1], [a_a.1, a_b.1]);
        let stable = (0..2).all(|i| {
            before[i].len() == after[i].len()
                && before[i].iter().all(|(k, b)| {
                    after[i].get(k).is_some_and(|a| {
                        (a.recv_q, a.send_q, &a.state) == (b.recv_q, b.send_q, &b.state)
                    })
                })
        });
        if stable {
            break (before, rows, after, gap);
        }
        assert!(attempt < 5, "queues kept moving: {before:#?} {after:#?}");
    };
    let got = by_key(&rows, &[na, nb]);

    // The same connection ends, minus what the snapshot leaves out.
    let mut seen = BTreeSet::new();
    for (i, ns) in [na, nb].into_iter().enumerate() {
        for (&(sport, dport), b) in &before[i] {
            if b.state == "TIME-WAIT" || b.state == "SYN-RECV" {
                continue;
            }
            let a = &after[i][&(sport, dport)];
            let k = (ns, sport, dport);
            seen.insert(k);
            let r = got
                .get(&k)
                .unwrap_or_else(|| panic!("ss shows {b:?} in {ns}; the snapshot does not"));
            let ctx = format!("{b:?}\n{a:?}\n{r}");
            let num = |f: &str| r[f].as_u64().unwrap_or_else(|| panic!("{f}: {ctx}"));

            assert_eq!(r["state"], ss_state(&b.state), "{ctx}");
            assert_eq!(num("ino"), b.ino, "ino: {ctx}");
            assert_eq!(num("cookie"), b.cookie, "cookie (ss sk:): {ctx}");
            assert_eq!(num("recv_queue"), b.recv_q, "Recv-Q: {ctx}");
            assert_eq!(num("send_queue"), b.send_q, "Send-Q: {ctx}");

            // The timer: kind, count (retransmits for `on`, probes for the
            // others) and expiry.
            match (&b.timer, &a.timer) {
                (None, None) => assert!(r["timer"].is_null(), "timer: {ctx}"),
                (Some(tb), Some(ta)) if tb.0 == ta.0 => {
                    let kind = ss_timer_kind(&tb.0);
                    assert_eq!(r["timer"]["kind"], kind, "timer kind: {ctx}");
                    let count = if kind == "retransmit" {
                        num("retransmits")
                    } else {
                        num("probes_out")
                    };
                    assert!(
                        between(count, tb.3, ta.3, 0),
                        "timer count {count} not between ss {} and {}: {ctx}",
                        tb.3,
                        ta.3
                    );
                    // Same timer instance (not re-armed in between: it
                    // came closer by the time between the ss runs): the
                    // snapshot's expiry lies between the two.
                    let (least, most) = gap[i];
                    let res = tb.2.max(ta.2);
                    let closer = tb.1 as i64 - ta.1 as i64;
                    if tb.3 == ta.3
                        && closer + (res + SLACK) as i64 >= least as i64
                        && closer <= (most + res + SLACK) as i64
                    {
                        let fires = r["timer"]["fires_in_ms"].as_i64().unwrap().max(0) as u64;
                        assert!(
                            fires + SLACK >= ta.1 && fires <= tb.1 + tb.2 + SLACK,
                            "fires_in_ms {fires} not within ss {}..{}: {ctx}",
                            ta.1,
                            tb.1 + tb.2
                        );
                    }
                }
                // A timer started or stopped between the two ss runs.
                _ => {}
            }
            if b.info && a.info {
                assert!(
                    between(num("total_retrans"), b.total_retrans, a.total_retrans, 0),
                    "total_retrans vs ss retrans:x/N: {ctx}"
                );
                if b.backoff == a.backoff {
                    assert_eq!(num("backoff"), b.backoff, "backoff: {ctx}");
                }
                if let (Some(rb), Some(ra)) = (b.rto_ms, a.rto_ms)
                    && rb == ra
                {
                    assert_eq!(num("rto_ms"), rb as u64, "rto: {ctx}");
                }
                for (field, vb, va) in [
                    ("last_send_ms", b.lastsnd, a.lastsnd),
                    ("last_recv_ms", b.lastrcv, a.lastrcv),
                    ("last_ack_ms", b.lastack, a.lastack),
                ] {
                    // Only while nothing happened in between: it grew by
                    // at least the time between the ss runs.
                    if va + SLACK >= vb + gap[i].0 {
                        assert!(
                            between(num(field), vb, va, SLACK),
                            "{field} not within ss {vb}..{va}: {ctx}"
                        );
                    }
                }
            }
        }
    }
    let all: BTreeSet<Key> = got.keys().copied().collect();
    assert_eq!(all, seen, "rows ss does not show");

    // The cases this is about, explicitly.
    let row = |what: &str| &got[&s.end(what).key()];
    let ss_of = |what: &str| {
        let e = s.end(what);
        let i = usize::from(e.netns == nb);
        &before[i][&(e.sport, e.dport)]
    };
    // Data into a black hole: Send-Q and a retransmit timer with retransmits.
    let r = row("retransmit: client");
    assert_eq!(
        (r["send_queue"].as_u64(), ss_of("retransmit: client").send_q),
        (Some(3000), 3000)
    );
    assert_eq!(r["timer"]["kind"], "retransmit");
    assert_eq!(ss_of("retransmit: client").timer.as_ref().unwrap().0, "on");
    assert!(r["retransmits"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["total_retrans"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["backoff"].as_u64().unwrap() >= 3, "{r}");
    // Unread data: Recv-Q.
    let r = row("unread: server");
    assert_eq!(
        (r["recv_queue"].as_u64(), ss_of("unread: server").recv_q),
        (Some(1000), 1000)
    );
    assert_eq!(row("unread: client")["send_queue"], 0);
    // Zero window: both queues, and the zero-window probe timer.
    let (c, sv) = (row("zero_window: client"), row("zero_window: server"));
    assert!(c["send_queue"].as_u64().unwrap() > 0, "{c}");
    assert!(sv["recv_queue"].as_u64().unwrap() > 0, "{sv}");
    assert_eq!(c["timer"]["kind"], "zero_window_probe", "{c}");
    // Keepalive: probes outstanding on the silenced client.
    let r = row("silenced: client");
    assert_eq!(r["timer"]["kind"], "keepalive");
    assert!(r["probes_out"].as_u64().unwrap() >= 1, "{r}");
    // The orphan: ino 0 in both, the FIN_WAIT2 timer shows as keepalive.
    let r = row("orphan: client");
    assert_eq!(
        (r["ino"].as_u64(), ss_of("orphan: client").ino),
        (Some(0), 0)
    );
    assert_eq!(r["timer"]["kind"], "keepalive", "{r}");
}

// ---------------------------------------------------------------------
// 3. Keepalive settings against getsockopt.

#[test]
fn keepalive_settings_agree_with_getsockopt() {
    require_root();
    let pair = Pair::new("ks");
    // Fallbacks come from the socket's own namespace: a's differ from b's
    // (which keeps the defaults 7200 s / 75 s / 9).
    pair.a.sysctl("net.ipv4.tcp_keepalive_time", "1234");
    pair.a.sysctl("net.ipv4.tcp_keepalive_intvl", "17");
    pair.a.sysctl("net.ipv4.tcp_keepalive_probes", "6");
    let (na, nb) = (pair.a.inode(), pair.b.inode());

    let own = connect_pair(&pair, &pair.b4);
    set_keepalive(&own.client, 7, 3, 4);
    let max = connect_pair(&pair, &format!("[{}]", pair.b6));
    set_keepalive(&max.client, 32767, 32767, 127);
    // SO_KEEPALIVE alone: everything from the namespace, on both ends.
    let sysctl = connect_pair(&pair, &pair.b4);
    sock::set_keepalive_enabled(&sysctl.client, true).unwrap();
    sock::set_keepalive_enabled(&sysctl.server, true).unwrap();
    // Only the idle time set: the rest from the namespace.
    let partial = connect_pair(&pair, &pair.b4);
    sock::set_keepalive_params(&partial.client, true, Some(45), None, None).unwrap();
    // Settings without SO_KEEPALIVE: off, settings still reported.
    let off = connect_pair(&pair, &pair.b4);
    sock::set_keepalive_params(&off.client, false, Some(50), None, Some(2)).unwrap();
    // Keepalive switched on, then off again.
    let toggled = connect_pair(&pair, &pair.b4);
    set_keepalive(&toggled.client, 9, 9, 9);
    sock::set_keepalive_enabled(&toggled.client, false).unwrap();

    let rows = snapshot(&[]);
    let got = by_key(&rows, &[na, nb]);
    let conns = [&own, &max, &sysctl, &partial, &off, &toggled];
    assert_eq!(got.len(), 2 * conns.len(), "{got:#?}");
    let mut checked = 0;
    for c in conns {
        for (s, ns) in [(&c.client, na), (&c.server, nb)] {
            let k = (ns, local_port(s), peer_port(s));
            let r = &got
                .get(&k)
                .unwrap_or_else(|| panic!("no row for {k:?}: {got:#?}"))["keepalive"];
            let k = sock::keepalive_settings(s).unwrap();
            let kernel = (
                k.enabled,
                k.idle_s * 1000,
                k.intvl_s * 1000,
                u64::from(k.probes),
            );
            let reported = (
                r["enabled"].as_bool().unwrap(),
                r["idle_ms"].as_u64().unwrap(),
                r["intvl_ms"].as_u64().unwrap(),
                r["probes"].as_u64().unwrap(),
            );
            assert_eq!(
                reported, kernel,
                "{k:?}: snapshot (enabled, idle_ms, intvl_ms, probes) vs getsockopt"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);

    // And the values themselves, so a getsockopt surprise cannot hide.
    let ka = |s: &TcpStream, ns: u64| {
        let r = &got[&(ns, local_port(s), peer_port(s))]["keepalive"];
        (
            r["enabled"].as_bool().unwrap(),
            r["idle_ms"].as_u64().unwrap(),
            r["intvl_ms"].as_u64().unwrap(),
            r["probes"].as_u64().unwrap(),
        )
    };
    assert_eq!(ka(&own.client, na), (true, 7_000, 3_000, 4));
    assert_eq!(ka(&max.client, na), (true, 32_767_000, 32_767_000, 127));
    assert_eq!(ka(&sysctl.client, na), (true, 1_234_000, 17_000, 6));
    assert_eq!(ka(&sysctl.server, nb), (true, 7_200_000, 75_000, 9));
    assert_eq!(ka(&partial.client, na), (true, 45_000, 17_000, 6));
    assert_eq!(ka(&off.client, na), (false, 50_000, 17_000, 2));
    assert_eq!(ka(&toggled.client, na), (false, 9_000, 9_000, 9));
    assert_eq!(ka(&own.server, nb), (false, 7_200_000, 75_000, 9));
}

// ---------------------------------------------------------------------
// `--all`: TIME_WAIT rows.

#[test]
fn time_wait_rows_with_all_agree_with_ss() {
    require_root();
    let pair = Pair::new("tw");
    let na = pair.a.inode();
    let c = connect_pair(&pair, &pair.b4);
    let (cp, lp) = (local_port(&c.client), local_port(&c.server));
    // The client closes first and ends in TIME_WAIT.
    drop(c.client);
    drop(c.server);
    let ok = wait_for(Duration::from_secs(5), || {
        ss(&pair.a)
            .get(&(cp, lp))
            .is_some_and(|r| r.state == "TIME-WAIT")
    });
    assert!(ok, "{:#?}", ss(&pair.a));
    let ss_row = ss(&pair.a)[&(cp, lp)].clone();

    // Hidden by default, listed with --all.
    let rows = snapshot(&["--port", &lp.to_string()]);
    assert!(by_key(&rows, &[na]).is_empty(), "{rows:#?}");
    let rows = snapshot(&["--all", "--port", &lp.to_string()]);
    let got = by_key(&rows, &[na]);
    let r = got
        .get(&(na, cp, lp))
        .unwrap_or_else(|| panic!("TIME_WAIT {cp}->{lp} missing: {rows:#?}"));
    assert_eq!(r["state"], "TIME_WAIT", "{r}");
    assert_eq!(r["verdict"], "healthy", "{r}");
    assert_eq!(r["cookie"], ss_row.cookie, "cookie vs ss sk: {r}");
    assert_eq!(r["owners"], serde_json::json!([]), "{r}");
    // A timewait minisock has no inode, queues or retransmission state
    // (`ss`: `TIME-WAIT 0 0 ... ino:0`); nothing read at full-socket
    // offsets of the smaller struct may leak into the row.
    assert_eq!(
        (
            r["ino"].as_u64(),
            r["recv_queue"].as_u64(),
            r["send_queue"].as_u64()
        ),
        (Some(ss_row.ino), Some(ss_row.recv_q), Some(ss_row.send_q)),
        "ino/Recv-Q/Send-Q vs ss {ss_row:?}: {r}"
    );
    for f in [
        "probes_out",
        "retransmits",
        "total_retrans",
        "backoff",
        "user_timeout_ms",
    ] {
        assert_eq!(r[f], 0, "{f}: {r}");
    }
}
