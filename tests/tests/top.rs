//! `keepalive top` end to end, in a real terminal (tmux), against real
//! traffic in test namespaces: a peer silenced with nftables shows up as
//! `dead` with its reason and probe count, `/port:N` narrows the table,
//! `Enter` shows the probe timeline, and `q` or SIGTERM end it with the
//! screen restored and no program left loaded.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keepalive_tests::*;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A tmux server of our own (its own socket) running one command in a
/// pane that stays after the command exits, so its exit can be inspected.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cmd: &str, width: u16, height: u16) -> Tmux {
        let ok = Command::new("tmux")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "`tmux` not found: run `cargo xtask setup`");
        let t = Tmux {
            socket: std::env::temp_dir()
                .join(format!(
                    "ka-top-tmux-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ))
                .display()
                .to_string(),
        };
        t.tmux(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            cmd,
            ";",
            "set-option",
            "-t",
            "top",
            "remain-on-exit",
            "on",
        ]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-S", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "top"])
    }

    fn show(&self, format: &str) -> String {
        self.tmux(&["display-message", "-p", "-t", "top", format])
            .trim()
            .to_string()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    fn text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "top", "-l", text]);
    }

    /// Waits for a screen that satisfies `pred`; fails with the last screen.
    fn wait_screen(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let ok = wait_for(limit, || {
            last = self.screen();
            pred(&last)
        });
        assert!(ok, "{what}: not on screen after {limit:?}:\n{last}");
        last
    }

    /// Waits for the command to exit; its exit status when tmux learned
    /// it. tmux marks the pane dead when the terminal closes and reaps the
    /// process a moment later; on a loaded machine it has been seen to
    /// leave an exited process unreaped for more than 30 s, so an exited
    /// (zombie) process counts as exited, with its status unknown.
    fn wait_exit(&self, pid: u32) -> Option<i32> {
        let mut status = String::new();
        let zombie = || {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.contains("State:\tZ"))
        };
        let exited = wait_for(Duration::from_secs(30), || {
            status = self.show("#{pane_dead_status}#{pane_dead_signal}");
            !status.is_empty() || (self.show("#{pane_dead}") == "1" && zombie())
        });
        assert!(
            exited,
            "top did not exit (pane dead: {}); its threads:\n{}\nscreen:\n{}",
            self.show("#{pane_dead}"),
            threads(pid),
            self.screen()
        );
        assert!(
            self.show("#{pane_dead_signal}").is_empty(),
            "top was killed by signal {status}:\n{}",
            self.screen()
        );
        status.parse().ok()
    }
}

/// State and kernel stack of each thread of `pid`, for a hang report.
fn threads(pid: u32) -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            let p = t.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let state = read("status")
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or_default()
                .to_string();
            out += &format!(
                "{} {} {state} wchan {}\n{}\n",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack")
            );
        }
    }
    out
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-S", &self.socket, "kill-server"])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn top_cmd(extra: &str) -> String {
    format!(
        "exec {} top --interval 200ms {extra}",
        keepalive_bin().display()
    )
}

/// The line of the table for the connection from `local` to `peer`.
fn row<'a>(screen: &'a str, local: &str, peer: &str) -> Option<&'a str> {
    // LOCAL then PEER, in that order: the other end's row holds the same
    // two addresses the other way round.
    screen.lines().find(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.windows(2).any(|w| w == [local, peer])
    })
}

/// Waits until the kernel has unloaded every program in `ids`.
fn assert_unloaded(ids: &[u32]) {
    let gone = wait_for(Duration::from_secs(10), || {
        let loaded = loaded_prog_ids();
        ids.iter().all(|id| !loaded.contains(id))
    });
    assert!(gone, "programs {ids:?} still loaded after top exited");
}

/// The pid running in the pane and the BPF programs it holds, once the
/// monitor is attached.
fn programs_of(t: &Tmux) -> (u32, Vec<u32>) {
    let pid: u32 = t.show("#{pane_pid}").parse().unwrap();
    let mut ids = Vec::new();
    let ok = wait_for(Duration::from_secs(20), || {
        ids = prog_ids_held_by(pid);
        ids.len() == 10
    });
    assert!(
        ok,
        "top holds {ids:?}, expected 8 hooks + the socket and owner iterators"
    );
    (pid, ids)
}

#[test]
fn a_silenced_peer_shows_up_dead_filters_narrow_enter_details_q_quits() {
    exact(|| {
        require_root();
        let pair = Pair::new("top");
        let silenced = connect_pair(&pair, &pair.b4);
        let other = connect_pair(&pair, &pair.b4);
        let port = silenced.listener.local_addr().unwrap().port();
        let other_port = other.listener.local_addr().unwrap().port();
        let client = format!(
            "{}:{}",
            pair.a4,
            silenced.client.local_addr().unwrap().port()
        );
        let server = format!("{}:{port}", pair.b4);
        let other_server = format!("{}:{other_port}", pair.b4);

        // Keepalive is on from the start (answered while the peer is alive).
        set_keepalive(&silenced.client, 1, 1, 30);
        let t = Tmux::start(&top_cmd(&format!("--addr {}/32", pair.b4)), 200, 50);
        let (pid, ours) = programs_of(&t);
        t.wait_screen("both connections", Duration::from_secs(10), |s| {
            row(s, &client, &server).is_some() && s.contains(&other_server)
        });

        // Silence the server's side: the client's keepalive probes vanish.
        let before = pair.a.counters();
        blackhole(&pair.b, Some(port));
        let screen = t.wait_screen("the silenced peer as dead", Duration::from_secs(10), |s| {
            row(s, &client, &server).is_some_and(|r| r.starts_with("dead"))
        });
        let sent_after = before.delta(&pair.a.counters(), "TcpExt.TCPKeepAlive");
        let line = row(&screen, &client, &server).unwrap();
        assert!(
            line.contains("keepalive probes unanswered"),
            "no reason on the dead row: {line}"
        );
        // The PROBES column is the kernel's count of probes out (no probe was
        // answered, so what it sent): no more than it had sent by the time the
        // screen was read. The reason counts all but the newest, which has
        // not had its chance yet: at least one.
        let words: Vec<&str> = line.split_whitespace().collect();
        let of = words.iter().position(|&w| w == "of").unwrap();
        let in_reason: i64 = words[of - 1].parse().unwrap();
        assert_eq!(words[of + 1], "30", "{line}");
        let probes_col: i64 = words[6]
            .parse()
            .unwrap_or_else(|_| panic!("PROBES in {line}"));
        assert_eq!(probes_col, in_reason + 1, "{line}");
        assert!(
            in_reason >= 1 && probes_col <= sent_after,
            "{in_reason} unanswered shown, the kernel sent {sent_after}: {line}"
        );

        // `/port:N` narrows the table to that connection (both its ends).
        t.keys(&["/"]);
        t.text(&format!("port:{port}"));
        t.keys(&["Enter"]);
        let screen = t.wait_screen("the table narrowed", Duration::from_secs(5), |s| {
            !s.contains(&other_server) && s.contains(&format!("filter: port:{port}"))
        });
        let rows: Vec<&str> = screen
            .lines()
            .filter(|l| l.starts_with("dead") || l.starts_with("healthy"))
            .collect();
        assert_eq!(rows.len(), 2, "{screen}");
        assert!(rows[0].starts_with("dead"), "worst first: {screen}");
        assert!(rows.iter().all(|r| r.contains(&server)), "{screen}");

        // Enter: the dead connection's detail, with its probe timeline.
        t.keys(&["Enter"]);
        let screen = t.wait_screen("the probe timeline", Duration::from_secs(5), |s| {
            s.lines().filter(|l| l.contains("keepalive probe ")).count() >= 2
        });
        assert!(screen.contains("DEAD"), "{screen}");
        assert!(
            screen.contains(&format!("{client} > {server}")),
            "detail of the wrong connection:\n{screen}"
        );

        // q: the screen is restored and nothing stays loaded.
        t.keys(&["q"]);
        let quit_at = std::time::Instant::now();
        let status = t.wait_exit(pid);
        assert!(
            matches!(status, Some(0) | None),
            "top's exit status {status:?}"
        );
        eprintln!("top exited {:?} after q", quit_at.elapsed());
        assert_eq!(
            t.show("#{alternate_on}"),
            "0",
            "still on the alternate screen"
        );
        assert_unloaded(&ours);
        unblackhole(&pair.b);
    });
}

#[test]
fn sigterm_restores_the_screen_and_unloads() {
    require_root();
    let t = Tmux::start(&top_cmd("--port 9"), 100, 30);
    let (pid, ours) = programs_of(&t);
    t.wait_screen("the header", Duration::from_secs(10), |s| {
        s.contains("keepalive top")
    });
    assert_eq!(t.show("#{alternate_on}"), "1");
    // SAFETY: signalling the process in our own tmux pane.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(matches!(t.wait_exit(pid), Some(0) | None));
    assert_eq!(t.show("#{alternate_on}"), "0");
    assert_unloaded(&ours);
}

#[test]
fn a_closed_terminal_ends_top_and_unloads() {
    require_root();
    let t = Tmux::start(&top_cmd("--port 9"), 100, 30);
    let (pid, ours) = programs_of(&t);
    t.wait_screen("the header", Duration::from_secs(10), |s| {
        s.contains("keepalive top")
    });
    // The terminal goes away (an SSH session dropped): SIGHUP, then a
    // hung-up tty.
    drop(t);
    let gone = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_or(true, |s| s.contains("State:\tZ"))
    });
    assert!(
        gone,
        "top still runs after its terminal closed:\n{}",
        threads(pid)
    );
    assert_unloaded(&ours);
}

#[test]
fn not_a_terminal_is_one_line_pointing_to_record_and_snapshot() {
    let out = Command::new(keepalive_bin())
        .arg("top")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("keepalive record") && err.contains("keepalive snapshot"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn with_a_policy_rows_show_the_rule_that_tuned_them_and_sigterm_restores() {
    require_root();
    let pair = Pair::new("tpp");
    let c = connect_pair(&pair, &pair.b4);
    let to = c.listener.local_addr().unwrap();
    let before = keepalive_tests::testkit::sock::keepalive_settings(&c.client).unwrap();
    // /tmp is sticky: a root-owned 0644 file there is a policy tune accepts.
    let policy = std::env::temp_dir().join(format!(
        "ka-top-policy-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nname = \"tmuxrule\"\nremote = \"{}/32\"\nremote_port = {}\nkeepalive = true\nidle = \"7s\"\n",
            to.ip(),
            to.port()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let t = Tmux::start(
        &top_cmd(&format!(
            "--port {} --policy {}",
            to.port(),
            policy.display()
        )),
        200,
        30,
    );
    let pid: u32 = t.show("#{pane_pid}").parse().unwrap();
    let local = format!("{}:{}", pair.a4, c.client.local_addr().unwrap().port());
    let peer = to.to_string();
    let screen = t.wait_screen("the row tuned by its rule", Duration::from_secs(90), |s| {
        s.contains("RULE") && row(s, &local, &peer).is_some_and(|r| r.contains("tmuxrule"))
    });
    assert_eq!(
        screen.matches("tmuxrule").count(),
        1,
        "only the client side matches (the server side's remote port is not the rule's):\n{screen}"
    );
    let tuned = keepalive_tests::testkit::sock::keepalive_settings(&c.client).unwrap();
    assert_eq!((tuned.enabled, tuned.idle_s), (true, 7), "{screen}");
    // SAFETY: signalling the process in our own tmux pane.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(matches!(t.wait_exit(pid), Some(0) | None));
    assert_eq!(t.show("#{alternate_on}"), "0");
    assert_eq!(
        keepalive_tests::testkit::sock::keepalive_settings(&c.client).unwrap(),
        before,
        "restored at exit"
    );
    let _ = std::fs::remove_file(&policy);
}
