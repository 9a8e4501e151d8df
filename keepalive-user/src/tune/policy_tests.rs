//! Unit tests of policy parsing, validation and matching in [`super`].

use super::*;
use keepalive_common::tune::{Match, SockKey, first_match};

fn err(text: &str) -> String {
    parse(text, "p.toml").unwrap_err().to_string()
}

const PG: &str = r#"
[[rule]]
name = "postgres"
remote_port = 5432
keepalive = true
idle = "30s"
interval = "10s"
count = 3
"#;

#[test]
fn the_issue_example_parses() {
    let p = parse(PG, "p.toml").unwrap();
    assert_eq!(p.rules.len(), 1);
    let r = &p.rules[0];
    assert_eq!(r.name, "postgres");
    assert_eq!(r.line, 3);
    assert_eq!(r.remote_port, Some(PortRange { lo: 5432, hi: 5432 }));
    assert_eq!(
        (r.idle_s, r.interval_s, r.count),
        (Some(30), Some(10), Some(3))
    );
    assert_eq!(r.keepalive, Some(true));
    assert_eq!(
        r.option_mask(),
        opt::KEEPALIVE | opt::IDLE | opt::INTVL | opt::CNT
    );
}

#[test]
fn every_key() {
    let p = parse(
        r#"
[thresholds]
idle = "60s"
[serve]
listen = "127.0.0.1:9000"

[[rule]]
name = "all"
remote_port = "5432-5440"
local_port = 40000
remote = "10.0.0.0/8"
comm = "java"
cgroup = "/system.slice/app.service"
keepalive = true
interval = 10
count = 127
user_timeout = "1m30s"
adaptive = { min_idle = "20s", max_idle = "600s" }
"#,
        "p.toml",
    )
    .unwrap();
    let r = &p.rules[0];
    assert_eq!(r.remote_port, Some(PortRange { lo: 5432, hi: 5440 }));
    assert_eq!(
        r.local_port,
        Some(PortRange {
            lo: 40000,
            hi: 40000
        })
    );
    assert_eq!(r.remote, Some("10.0.0.0/8".parse().unwrap()));
    assert_eq!(r.comm.as_deref(), Some("java"));
    assert_eq!(r.cgroup.as_deref(), Some("/system.slice/app.service"));
    assert_eq!(r.interval_s, Some(10));
    assert_eq!(r.count, Some(127));
    assert_eq!(r.user_timeout_ms, Some(90_000));
    assert_eq!(
        r.adaptive,
        Some(Adaptive {
            min_idle_s: 20,
            max_idle_s: 600
        })
    );
    let k = compile(&p, |c| {
        assert_eq!(c, "/system.slice/app.service");
        Ok((99, 2))
    })
    .unwrap();
    assert_eq!(
        k[0].criteria,
        crit::REMOTE_PORT
            | crit::LOCAL_PORT
            | crit::REMOTE
            | crit::COMM
            | crit::CGROUP
            | crit::ADAPTIVE
    );
    assert_eq!((k[0].cgroup_id, k[0].cgroup_level), (99, 2));
    assert_eq!(k[0].values.idle_s, 20, "adaptive starts at the safe end");
    assert_eq!(&k[0].comm[..5], b"java\0");
}

#[test]
fn errors_name_the_line() {
    let cases: &[(&str, &str)] = &[
        (
            "[[rule]]\nname = \"a\"\nidle = \"30s\"\nbogus = 1\n",
            "p.toml:4: ",
        ),
        (
            "[[rule]]\nname = \"a\"\nidle = \"40000s\"\n",
            "p.toml:3: rule \"a\": idle: 40000s out of the kernel's range (1s..=32767s)",
        ),
        (
            "[[rule]]\nname = \"a\"\nidle = \"0s\"\n",
            "p.toml:3: rule \"a\": idle: 0s out of",
        ),
        (
            "[[rule]]\nname = \"a\"\nidle = \"1500ms\"\n",
            "p.toml:3: rule \"a\": idle: 1500ms the kernel counts it in whole seconds",
        ),
        (
            "[[rule]]\nname = \"a\"\n\ninterval = \"32768s\"\n",
            "p.toml:4: rule \"a\": interval: 32768s out",
        ),
        (
            "[[rule]]\nname = \"a\"\ncount = 128\n",
            "p.toml:3: rule \"a\": count: 128 out of the kernel's range (1..=127)",
        ),
        (
            "[[rule]]\nname = \"a\"\ncount = 0\n",
            "p.toml:3: rule \"a\": count: 0 out",
        ),
        (
            "[[rule]]\nname = \"a\"\nuser_timeout = \"0s\"\n",
            "p.toml:3: rule \"a\": user_timeout: 0s out",
        ),
        (
            "[[rule]]\nname = \"a\"\nidle = \"soon\"\n",
            "p.toml:3: rule \"a\": idle: invalid duration `soon`",
        ),
        (
            "[[rule]]\nname = \"a\"\nremote_port = 70000\ncount = 1\n",
            "p.toml:3: rule \"a\": remote_port: 70000 is not a port",
        ),
        (
            "[[rule]]\nname = \"a\"\nremote_port = \"5440-5432\"\ncount = 1\n",
            "p.toml:3: rule \"a\": remote_port: range 5440-5432 is empty",
        ),
        (
            "[[rule]]\nname = \"a\"\nlocal_port = \"x\"\ncount = 1\n",
            "p.toml:3: rule \"a\": local_port: `x` is not a port",
        ),
        (
            "[[rule]]\nname = \"a\"\nremote = \"10.0.0.1/8\"\ncount = 1\n",
            "p.toml:3: rule \"a\": remote: `10.0.0.1/8` has bits set past its prefix; did you mean 10.0.0.0/8?",
        ),
        (
            "[[rule]]\nname = \"a\"\nremote = \"nope\"\ncount = 1\n",
            "p.toml:3: rule \"a\": remote: `nope` is not",
        ),
        (
            "[[rule]]\nname = \"a\"\ncomm = \"a-very-long-command\"\ncount = 1\n",
            "p.toml:3: rule \"a\": comm `a-very-long-command` is longer than 15 bytes and can match nothing",
        ),
        (
            "[[rule]]\nname = \"a\"\ncgroup = \"system.slice\"\ncount = 1\n",
            "p.toml:3: rule \"a\": cgroup `system.slice` must be an absolute path",
        ),
        (
            "[[rule]]\nname = \"a\"\nremote_port = 1\n",
            "p.toml:2: rule \"a\" changes nothing",
        ),
        (
            "[[rule]]\nremote_port = 1\ncount = 1\n",
            "p.toml:1: rule without `name`",
        ),
        (
            "[[rule]]\nname = \"a\"\ncount = 1\nremote_port = 1\n\n[[rule]]\nname = \"a\"\ncount = 2\nremote_port = 2\n",
            "p.toml:7: duplicate rule name \"a\" (first at line 2)",
        ),
        (
            "[[rule]]\nname = \"wide\"\nremote_port = \"1-100\"\ncount = 1\n[[rule]]\nname = \"narrow\"\nremote_port = 5\ncomm = \"x\"\ncount = 2\n",
            "p.toml:6: rule \"narrow\" can never apply: rule \"wide\" (line 2) comes first",
        ),
        (
            "[[rule]]\nname = \"all\"\ncount = 1\n[[rule]]\nname = \"b\"\nremote = \"10.0.0.0/8\"\ncount = 2\n",
            "p.toml:5: rule \"b\" can never apply: rule \"all\" (line 2) comes first and matches every connection it would (every connection)",
        ),
        (
            "[[rule]]\nname = \"a\"\nkeepalive = true\nidle = \"30s\"\nadaptive = { min_idle = \"20s\", max_idle = \"600s\" }\n",
            "p.toml:4: rule \"a\": idle and adaptive together",
        ),
        (
            "[[rule]]\nname = \"a\"\nkeepalive = true\nadaptive = { min_idle = \"600s\", max_idle = \"20s\" }\n",
            "p.toml:4: rule \"a\": adaptive: min_idle (600s) must be below max_idle (20s)",
        ),
        (
            "[[rule]]\nname = \"a\"\nadaptive = { min_idle = \"20s\", max_idle = \"60s\" }\n",
            "p.toml:3: rule \"a\": adaptive needs `keepalive = true`",
        ),
        (
            "[[rule]]\nname = \"a\"\nkeepalive = true\nadaptive = { min_idle = \"20s\", max = \"60s\" }\n",
            "p.toml:4: ",
        ),
        (
            "[[rules]]\nname = \"a\"\ncount = 1\n",
            "p.toml:1: unknown section `rules`: rules are `[[rule]]`",
        ),
        (
            "[thresholds]\nidle = \"5m\"\n",
            "p.toml:1: no [[rule]] in the policy",
        ),
        ("[[rule]]\nname = \"a\"\ncount = \n", "p.toml:3: "),
        (
            "[[rule]]\nname = \"a\"\nkeepalive = \"yes\"\n",
            "p.toml:3: ",
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.starts_with(want), "for {text:?}\n got: {e}\nwant: {want}");
    }
}

#[test]
fn too_many_rules() {
    let text: String = (0..=MAX_RULES)
        .map(|i| {
            format!(
                "[[rule]]\nname = \"r{i}\"\nremote_port = {}\ncount = 1\n",
                i + 1
            )
        })
        .collect();
    let e = err(&text);
    assert!(e.contains("too many rules (17; at most 16)"), "{e}");
}

#[test]
fn shadowing_needs_a_superset_on_every_criterion() {
    // Narrower first, wider second: both reachable.
    parse(
            "[[rule]]\nname = \"n\"\nremote_port = 5\ncount = 1\n[[rule]]\nname = \"w\"\nremote_port = \"1-100\"\ncount = 2\n",
            "p.toml",
        )
        .unwrap();
    // A cgroup parent covers its children but not a sibling with a common prefix.
    let base = "[[rule]]\nname = \"p\"\ncgroup = \"/a\"\ncount = 1\n[[rule]]\nname = \"c\"\ncount = 2\ncgroup = ";
    assert!(parse(&format!("{base}\"/a/b\"\n"), "p").is_err());
    parse(&format!("{base}\"/ab\"\n"), "p").unwrap();
    // Different comms do not shadow.
    parse(
            "[[rule]]\nname = \"a\"\ncomm = \"x\"\ncount = 1\n[[rule]]\nname = \"b\"\ncomm = \"y\"\ncount = 2\n",
            "p",
        )
        .unwrap();
}

#[test]
fn compiled_rules_match_like_the_policy_says() {
    let p = parse(
        r#"
[[rule]]
name = "pg-java"
remote_port = "5432-5440"
comm = "java"
count = 5
[[rule]]
name = "pg"
remote_port = "5432-5440"
remote = "10.0.0.0/8"
count = 4
[[rule]]
name = "v6"
remote = "fd00::/16"
local_port = 22
count = 3
"#,
        "p",
    )
    .unwrap();
    let k = compile(&p, |_| unreachable!()).unwrap();
    let mut rules = [TuneRule::zeroed(); MAX_RULES];
    rules[..k.len()].copy_from_slice(&k);
    let n = k.len() as u32;
    let v4 = |a: [u8; 4], rport: u16, comm: Option<&str>| {
        let mut raddr = [0; 16];
        raddr[..4].copy_from_slice(&a);
        SockKey {
            family: 2,
            lport: 40000,
            rport,
            raddr,
            comm: comm.map(|c| {
                let mut b = [0u8; 16];
                b[..c.len()].copy_from_slice(c.as_bytes());
                b
            }),
        }
    };
    assert_eq!(
        first_match(&rules, n, &v4([10, 1, 1, 1], 5433, Some("java")), |_| 0),
        Match::Rule(0)
    );
    assert_eq!(
        first_match(&rules, n, &v4([10, 1, 1, 1], 5433, Some("psql")), |_| 0),
        Match::Rule(1)
    );
    assert_eq!(
        first_match(&rules, n, &v4([10, 1, 1, 1], 5433, None), |_| 0),
        Match::NeedOwner(0)
    );
    assert_eq!(
        first_match(&rules, n, &v4([11, 1, 1, 1], 5433, Some("psql")), |_| 0),
        Match::None
    );
    assert_eq!(
        first_match(&rules, n, &v4([10, 1, 1, 1], 5441, Some("java")), |_| 0),
        Match::None
    );
    let mut s6 = SockKey {
        family: 10,
        lport: 22,
        rport: 50000,
        raddr: "fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets(),
        comm: None,
    };
    assert_eq!(first_match(&rules, n, &s6, |_| 0), Match::Rule(2));
    s6.lport = 23;
    assert_eq!(first_match(&rules, n, &s6, |_| 0), Match::None);
}

#[test]
fn missing_cgroup_names_the_rule_line() {
    let p = parse(
        "[[rule]]\nname = \"svc\"\ncgroup = \"/nope.slice\"\ncount = 1\n",
        "p.toml",
    )
    .unwrap();
    let e = compile(&p, |c| {
        resolve_cgroup(Path::new("/nonexistent-cgroup-root"), c)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("p.toml:2: rule \"svc\": cgroup /nope.slice not found"),
        "{e}"
    );
}

#[test]
fn permissions() {
    let root_dir = Perm {
        uid: 0,
        gid: 0,
        mode: 0o40755,
    };
    let f = |uid, gid, mode| Perm { uid, gid, mode };
    assert_eq!(unsafe_permissions(f(0, 0, 0o100644), root_dir), None);
    assert_eq!(
        unsafe_permissions(f(0, 0, 0o100664), root_dir),
        None,
        "root group"
    );
    assert!(
        unsafe_permissions(f(1000, 0, 0o100600), root_dir)
            .unwrap()
            .contains("uid 1000")
    );
    assert!(
        unsafe_permissions(f(0, 0, 0o100646), root_dir)
            .unwrap()
            .contains("every user")
    );
    assert!(
        unsafe_permissions(f(0, 50, 0o100664), root_dir)
            .unwrap()
            .contains("group 50")
    );
    let user_dir = Perm {
        uid: 1000,
        gid: 1000,
        mode: 0o40755,
    };
    assert!(
        unsafe_permissions(f(0, 0, 0o100644), user_dir)
            .unwrap()
            .contains("directory")
    );
    let tmp = Perm {
        uid: 0,
        gid: 0,
        mode: 0o41777,
    };
    assert_eq!(
        unsafe_permissions(f(0, 0, 0o100644), tmp),
        None,
        "sticky /tmp"
    );
    let open_dir = Perm {
        uid: 0,
        gid: 0,
        mode: 0o40777,
    };
    assert!(unsafe_permissions(f(0, 0, 0o100644), open_dir).is_some());
}
