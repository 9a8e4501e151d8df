//! Far more connections than `--max-conns`: each connection's verdict
//! change is reported once, not once per refresh (the flood of
//! `healthy -> unprotected` lines for every connection that did not fit).

use std::net::TcpStream;
use std::time::Duration;

use keepalive_tests::*;

/// Raises the open-file limit to its hard limit (a thousand sockets).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn over_the_cap_each_connection_turns_unprotected_once() {
    require_root();
    raise_nofile();
    let pair = Pair::new("cap");
    let mut mon = Monitor::start(&[
        "--max-conns",
        "50",
        "--refresh",
        "1s",
        "--idle-threshold",
        "1s",
        "--event",
        "verdict",
        PAIR_ONLY[0],
        PAIR_ONLY[1],
        PAIR_ONLY[2],
        PAIR_ONLY[3],
    ]);
    // 400 idle connections with keepalive off: 800 sockets, 16 times the cap.
    let listener = listen(&pair.b, &format!("{}:0", pair.b4));
    let to = listener.local_addr().unwrap();
    let mut socks: Vec<TcpStream> = Vec::new();
    for _ in 0..4 {
        let clients = pair.a.enter(move || {
            (0..100)
                .map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap())
                .collect::<Vec<_>>()
        });
        socks.extend(clients);
        for _ in 0..100 {
            socks.push(listener.accept().unwrap().0);
        }
    }
    let cookies: std::collections::HashSet<u64> = socks.iter().map(cookie).collect();
    // Idle past the threshold until every socket's verdict is out (a
    // refresh walks every TCP socket of the host: seconds on a loaded
    // machine), then three refreshes more, in which none may come again.
    let reported = |mon: &Monitor| {
        mon.events()
            .iter()
            .filter(|e| e["event"] == "verdict")
            .filter_map(|e| e["cookie"].as_u64())
            .filter(|c| cookies.contains(c))
            .collect::<std::collections::HashSet<u64>>()
            .len()
    };
    wait_for(Duration::from_secs(90), || reported(&mon) == cookies.len());
    std::thread::sleep(Duration::from_secs(3));
    let events = mon.stop_lossless();
    let mut per_cookie: std::collections::HashMap<u64, Vec<String>> = Default::default();
    for e in events.iter().filter(|e| e["event"] == "verdict") {
        let c = e["cookie"].as_u64().unwrap();
        if cookies.contains(&c) {
            per_cookie
                .entry(c)
                .or_default()
                .push(format!("{} -> {}", e["old"], e["new"]));
        }
    }
    let repeated: Vec<_> = per_cookie.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        repeated.is_empty(),
        "{} connections reported more than once, e.g. {:?}",
        repeated.len(),
        repeated.first()
    );
    // Every socket went healthy -> unprotected exactly once, in or out of the table.
    assert_eq!(per_cookie.len(), cookies.len(), "{per_cookie:?}");
    assert!(
        per_cookie
            .values()
            .all(|v| v[0] == "\"healthy\" -> \"unprotected\""),
        "{per_cookie:?}"
    );
    drop(socks);
}
