//! The optional `comm` and server `port` labels of the event counters, each
//! capped at a fixed number of distinct values so a busy host cannot grow
//! the series without bound: values past the cap fold into one explicit
//! overflow series.

use std::collections::HashSet;

use crate::events::Event;

/// Value of a label past its cap.
pub const OVERFLOW: &str = "_overflow";
/// `comm` of an event whose owner is not known.
pub const NO_COMM: &str = "_unknown";
/// `port` of a connection between two ephemeral ports (no server port).
pub const EPHEMERAL: &str = "ephemeral";
/// Ports below this are server ports (the default start of
/// net.ipv4.ip_local_port_range), as ebpf_exporter's `main_port`.
pub const EPHEMERAL_START: u16 = 32768;

/// Which optional labels the event counters carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabelOptions {
    pub comm: bool,
    pub port: bool,
    /// Most distinct values of each label before the overflow series.
    pub limit: usize,
}

pub const DEFAULT_LIMIT: usize = 64;

/// Parses `--metrics-labels comm,port` (empty: none).
pub fn parse_label_names(names: &[String], limit: usize) -> Result<LabelOptions, String> {
    let mut o = LabelOptions {
        limit,
        ..LabelOptions::default()
    };
    for n in names.iter().flat_map(|s| s.split(',')).map(str::trim) {
        match n {
            "comm" => o.comm = true,
            "port" => o.port = true,
            "" => {}
            other => {
                return Err(format!(
                    "unknown metrics label `{other}`: expected comm or port"
                ));
            }
        }
    }
    Ok(o)
}

/// The server side of a connection: the lower port below
/// [`EPHEMERAL_START`], else none.
pub fn server_port(sport: u16, dport: u16) -> Option<u16> {
    [sport, dport]
        .into_iter()
        .filter(|&p| p != 0 && p < EPHEMERAL_START)
        .min()
}

/// Admits the first `limit` distinct values, then answers [`OVERFLOW`].
#[derive(Debug)]
pub struct Cap {
    limit: usize,
    seen: HashSet<String>,
}

impl Cap {
    pub fn new(limit: usize) -> Self {
        Cap {
            limit,
            seen: HashSet::new(),
        }
    }

    pub fn admit(&mut self, value: &str) -> String {
        if self.seen.contains(value) {
            return value.to_string();
        }
        if self.seen.len() < self.limit {
            self.seen.insert(value.to_string());
            return value.to_string();
        }
        OVERFLOW.to_string()
    }
}

/// The optional label pairs of an event (empty when none are on).
pub type ExtraLabels = Vec<(&'static str, String)>;

/// Computes the optional labels of events, keeping one cap per label.
#[derive(Debug)]
pub struct Labeler {
    opts: LabelOptions,
    comms: Cap,
    ports: Cap,
}

impl Labeler {
    pub fn new(opts: LabelOptions) -> Self {
        Labeler {
            opts,
            comms: Cap::new(opts.limit),
            ports: Cap::new(opts.limit),
        }
    }

    pub fn labels(&mut self, ev: &Event) -> ExtraLabels {
        let mut v = Vec::new();
        if self.opts.comm {
            let comm = ev.owner.as_ref().map_or(NO_COMM, |o| o.comm.as_str());
            v.push(("comm", self.comms.admit(comm)));
        }
        if self.opts.port {
            let port = match server_port(ev.sport, ev.dport) {
                Some(p) => self.ports.admit(&p.to_string()),
                None => EPHEMERAL.to_string(),
            };
            v.push(("port", port));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Detail, Owner};

    fn ev(comm: Option<&str>, sport: u16, dport: u16) -> Event {
        Event {
            ts_mono_ns: 0,
            cookie: 1,
            netns: 1,
            saddr: "10.0.0.1".parse().unwrap(),
            sport,
            daddr: "10.0.0.2".parse().unwrap(),
            dport,
            state: 1,
            owner: comm.map(|c| Owner {
                pid: 1,
                comm: c.into(),
            }),
            detail: Detail::KeepaliveProbe { probe: 1 },
        }
    }

    #[test]
    fn server_port_is_the_low_non_ephemeral_one() {
        assert_eq!(server_port(45000, 443), Some(443));
        assert_eq!(server_port(5432, 51000), Some(5432));
        assert_eq!(server_port(22, 8080), Some(22));
        assert_eq!(server_port(40000, 50000), None);
        assert_eq!(server_port(0, 40000), None);
    }

    #[test]
    fn cap_folds_new_values_into_overflow_but_keeps_known_ones() {
        let mut c = Cap::new(2);
        assert_eq!(c.admit("a"), "a");
        assert_eq!(c.admit("b"), "b");
        assert_eq!(c.admit("c"), OVERFLOW);
        assert_eq!(c.admit("a"), "a");
        assert_eq!(c.admit("d"), OVERFLOW);
    }

    #[test]
    fn labels_follow_the_options() {
        let mut none = Labeler::new(LabelOptions::default());
        assert!(none.labels(&ev(Some("curl"), 40000, 443)).is_empty());
        let mut both = Labeler::new(LabelOptions {
            comm: true,
            port: true,
            limit: 1,
        });
        assert_eq!(
            both.labels(&ev(Some("curl"), 40000, 443)),
            vec![("comm", "curl".to_string()), ("port", "443".to_string())]
        );
        assert_eq!(
            both.labels(&ev(None, 40000, 50000)),
            vec![
                ("comm", OVERFLOW.to_string()),
                ("port", EPHEMERAL.to_string())
            ]
        );
        assert_eq!(
            both.labels(&ev(Some("curl"), 22, 50000)),
            vec![("comm", "curl".to_string()), ("port", OVERFLOW.to_string())]
        );
    }

    #[test]
    fn label_names_parse() {
        let o = parse_label_names(&["comm,port".into()], 5).unwrap();
        assert!(o.comm && o.port && o.limit == 5);
        let o = parse_label_names(&["port".into()], 5).unwrap();
        assert!(!o.comm && o.port);
        assert!(parse_label_names(&["pid".into()], 5).is_err());
    }
}
