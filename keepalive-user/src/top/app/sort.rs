//! Sorting the connection table: the [`SortKey`]s `s` cycles through and
//! the key each row sorts by (worst first, address, owner, state, ...).

use super::*;

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

    pub(super) fn next(self) -> SortKey {
        let i = Self::ORDER.iter().position(|&k| k == self).unwrap_or(0);
        Self::ORDER[(i + 1) % Self::ORDER.len()]
    }
}

/// How many milliseconds until the kernel gives up, for "worst first".
pub(super) fn gives_up_in(v: &Verdict) -> i64 {
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
pub(super) type SortKeyOf = (u128, u64, u64);

pub(super) fn ip_key(a: Option<IpAddr>) -> u128 {
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
pub(super) fn worst(row: &Row) -> u64 {
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

pub(super) fn sort_key(
    key: SortKey,
    row: &Row,
    owner_rank: &HashMap<(&str, u32), u64>,
) -> SortKeyOf {
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
        SortKey::Peer => ip_key(c.id.daddr),
        SortKey::Local => ip_key(c.id.saddr),
        SortKey::State => u128::from(state_rank(c.id.state)),
        SortKey::Timer => c.timer.map_or(u128::MAX, |t| {
            (i128::from(t.fires_in_ms) - i128::from(i64::MIN)) as u128
        }),
    };
    let secondary = match key {
        SortKey::Peer | SortKey::Local => {
            u64::from(if key == SortKey::Peer {
                c.id.dport
            } else {
                c.id.sport
            }) << 48
                | w >> 16
        }
        _ => w,
    };
    (primary, secondary, c.id.cookie)
}

/// Position of a state's name in alphabetical order.
pub(super) fn state_rank(state: u32) -> u8 {
    let name = state_name(state);
    (1..=13u32).filter(|&s| state_name(s) < name).count() as u8
}
