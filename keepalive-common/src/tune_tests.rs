//! Unit tests of the shared tune map layouts and matching in [`super`].

use super::*;

fn comm(s: &str) -> [u8; TASK_COMM_LEN] {
    let mut c = [0u8; TASK_COMM_LEN];
    c[..s.len()].copy_from_slice(s.as_bytes());
    c
}

fn rules(list: &[TuneRule]) -> [TuneRule; MAX_RULES] {
    let mut a = [TuneRule::zeroed(); MAX_RULES];
    a[..list.len()].copy_from_slice(list);
    a
}

fn port_rule(lo: u16, hi: u16) -> TuneRule {
    TuneRule {
        criteria: crit::REMOTE_PORT,
        rport_lo: lo,
        rport_hi: hi,
        ..TuneRule::zeroed()
    }
}

fn key(rport: u16) -> SockKey {
    let mut raddr = [0u8; 16];
    raddr[..4].copy_from_slice(&[10, 1, 2, 3]);
    SockKey {
        family: 2,
        lport: 40000,
        rport,
        raddr,
        comm: None,
    }
}

#[test]
fn first_match_wins_and_ranges_are_inclusive() {
    let r = rules(&[port_rule(5432, 5440), port_rule(5432, 5432)]);
    assert_eq!(first_match(&r, 2, &key(5432), |_| 0), Match::Rule(0));
    assert_eq!(first_match(&r, 2, &key(5440), |_| 0), Match::Rule(0));
    assert_eq!(first_match(&r, 2, &key(5441), |_| 0), Match::None);
    // Rules past n are not looked at.
    assert_eq!(first_match(&r, 0, &key(5432), |_| 0), Match::None);
}

#[test]
fn cidr_and_cgroup_and_comm() {
    let mut cidr = port_rule(0, 0);
    cidr.criteria = crit::REMOTE;
    cidr.remote.family = 2;
    cidr.remote.prefix_len = 16;
    cidr.remote.addr[..2].copy_from_slice(&[10, 1]);
    let mut cg = TuneRule {
        criteria: crit::CGROUP,
        cgroup_id: 77,
        cgroup_level: 2,
        ..TuneRule::zeroed()
    };
    let r = rules(&[cidr]);
    assert_eq!(first_match(&r, 1, &key(1), |_| 0), Match::Rule(0));
    let mut k = key(1);
    k.raddr[1] = 2;
    assert_eq!(first_match(&r, 1, &k, |_| 0), Match::None);
    assert_eq!(
        first_match(&r, 1, &key(1).with_family(10), |_| 0),
        Match::None
    );
    let r = rules(&[cg]);
    assert_eq!(
        first_match(&r, 1, &key(1), |l| if l == 2 { 77 } else { 1 }),
        Match::Rule(0)
    );
    assert_eq!(first_match(&r, 1, &key(1), |_| 1), Match::None);
    cg.criteria |= crit::COMM;
    cg.comm = comm("java");
    let r = rules(&[cg, port_rule(1, 1)]);
    let mut k = key(1);
    assert_eq!(first_match(&r, 2, &k, |_| 77), Match::NeedOwner(0));
    k.comm = Some(comm("java"));
    assert_eq!(first_match(&r, 2, &k, |_| 77), Match::Rule(0));
    k.comm = Some(comm("javac"));
    assert_eq!(first_match(&r, 2, &k, |_| 77), Match::Rule(1));
    // An unknown owner only matters when a comm rule could match.
    assert_eq!(first_match(&r, 2, &key(1), |_| 5), Match::Rule(1));
}

impl SockKey {
    fn with_family(mut self, f: u8) -> Self {
        self.family = f;
        self
    }
}

fn ka_rule() -> TuneRule {
    TuneRule {
        set: opt::KEEPALIVE | opt::IDLE | opt::INTVL | opt::CNT,
        values: KaValues {
            keepalive: 1,
            idle_s: 30,
            intvl_s: 10,
            cnt: 3,
            user_timeout_ms: 0,
        },
        ..TuneRule::zeroed()
    }
}

#[test]
fn plan_sets_only_what_the_application_left_alone() {
    let r = ka_rule();
    let p = plan(&r, &KaValues::default(), false);
    assert_eq!(p.set, r.set);
    assert_eq!(p.kept, 0);
    assert_eq!(p.target, r.values);
    // The app turned keepalive on (same as the rule) and chose its own idle.
    let cur = KaValues {
        keepalive: 1,
        idle_s: 60,
        ..KaValues::default()
    };
    let p = plan(&r, &cur, false);
    assert_eq!(p.set, opt::INTVL | opt::CNT);
    assert_eq!(p.kept, opt::IDLE);
    assert_eq!(p.target.idle_s, 60);
    assert_eq!(p.target.intvl_s, 10);
    let p = plan(&r, &cur, true);
    assert_eq!(p.set, opt::IDLE | opt::INTVL | opt::CNT);
    assert_eq!(p.kept, 0);
    assert_eq!(p.target, r.values);
    // Already as the rule wants: nothing to do.
    assert_eq!(
        plan(&r, &r.values, false),
        Plan {
            set: 0,
            kept: 0,
            target: r.values
        }
    );
}

#[test]
fn dest_key_groups_by_24_and_64() {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[10, 1, 2, 3]);
    let k = DestKey::of(2, &a, 5432);
    assert_eq!(&k.addr[..4], &[10, 1, 2, 0]);
    let mut b = [0xffu8; 16];
    b[0] = 0xfd;
    let k = DestKey::of(10, &b, 1);
    assert_eq!(&k.addr[..8], &b[..8]);
    assert_eq!(&k.addr[8..], &[0; 8]);
}
